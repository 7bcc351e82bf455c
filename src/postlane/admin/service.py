"""Running under a service manager: systemd readiness and watchdog, and reload on SIGHUP.

**sd_notify** is a datagram to the socket systemd names in ``$NOTIFY_SOCKET`` (``@`` for the
abstract namespace): a dozen lines, so no library. The node says ``READY=1`` once it listens,
``RELOADING=1``/``READY=1`` around a reload, ``STOPPING=1`` when it drains, and, while the unit
sets ``WatchdogSec``, ``WATCHDOG=1`` every half of it from the event loop: a loop that stalls
(or a process that hangs) is restarted by systemd; queued mail is on disk and is resumed.

**Reload** (``systemctl reload``, i.e. SIGHUP) reads the config again and applies, without
closing a listener or a connection: DKIM keys (added, rotated, removed), TLS certificates and
keys (re-read even when their paths did not change: a renewed certificate), destination rules,
classification rules, bounce rules, routes, and each class's SLA, retry schedule, expiry and
priority. Everything is built first and swapped only if all of it loads: a broken file leaves
the node running as it was, with the errors logged. What a running node cannot change in place
(listeners' addresses, pools and their IPs, the spool, the API, cluster settings, classes added
or removed …) is named in the log as waiting for a restart, as Postfix does for
``inet_interfaces``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import sqlite3
import ssl
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..node import Node
from ..schema import DOWNGRADE_ADVICE, NewerSchema
from ..secretfile import UnusableFile
from ..spool import SpoolInUse
from ..spool.postgres import NodeConflict
from ..startup import ConfigError, load_config
from ..workers.pool import WorkerStartError

if TYPE_CHECKING:
    from ..config import Config
    from ..edge.tls import ServerCertificate

__all__ = ["Notifier", "reload", "run"]

log = logging.getLogger("postlane.service")
_node_log = logging.getLogger("postlane.node")
"""What ``run`` says about the node's life (listening, draining, stopped)."""


class Notifier:
    """Tells systemd about the node's state; does nothing when not started by systemd."""

    def __init__(self, environ: dict[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET", "")
        self.address = "\0" + address[1:] if address.startswith("@") else address
        usec = env.get("WATCHDOG_USEC", "")
        mine = env.get("WATCHDOG_PID", str(os.getpid())) == str(os.getpid())
        self.watchdog_interval = int(usec) / 2e6 if usec.isdigit() and mine else None
        """Seconds between watchdog pings (half of WatchdogSec), or None."""

    def send(self, *fields: str) -> None:
        if not self.address:
            return
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            try:
                sock.sendto("\n".join(fields).encode(), self.address)
            except OSError as exc:  # systemd gone: nothing to tell, nothing to stop for
                log.debug("sd_notify failed: %s", exc)

    def ready(self, status: str) -> None:
        self.send("READY=1", f"STATUS={status}")

    def reloading(self) -> None:
        now = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self.send("RELOADING=1", f"MONOTONIC_USEC={now}")

    def stopping(self) -> None:
        self.send("STOPPING=1", "STATUS=draining: 421 to new mail, deliveries finishing")

    async def watchdog(self) -> None:
        """Ping while the event loop runs (a task of the node's loop)."""
        if self.watchdog_interval is None:
            return
        while True:
            self.send("WATCHDOG=1")
            await asyncio.sleep(self.watchdog_interval)


_RELOADED = {"classes", "destinations", "default_destinations", "routes", "classification",
             "default_class", "correlation_header", "dkim", "feedback"}
"""Top-level settings a reload takes over (dkim: its keys; feedback: its bounce rules)."""
_RELOADED_FIELDS = {"feedback": {"bounce_rules"}, "dkim": {"keys"}}


def _needs_restart(old: Config, new: Config) -> list[str]:
    """The settings that differ and that a running node cannot take over."""
    sections = (set(type(old).model_fields) - _RELOADED) | set(_RELOADED_FIELDS)
    before = old.model_dump(include=sections, exclude=_RELOADED_FIELDS)
    after = new.model_dump(include=sections, exclude=_RELOADED_FIELDS)
    out = [s for s in sorted(sections) if before[s] != after[s]]
    if set(new.classes) != set(old.classes):
        out.append("classes (added or removed)")
    out += [f"classes.{n}.pool" for n, c in new.classes.items()
            if n in old.classes and c.pool != old.classes[n].pool]
    if bool(new.dkim.keys) != bool(old.dkim.keys):
        out.append("dkim.keys (signing turned on or off)")
    return out


def _certificates(node: Node) -> list[ServerCertificate]:
    """The listeners' certificates, each pair checked by loading it afresh (a renewed file
    under the same path; a path changed in the config waits for a restart)."""
    from ..edge.tls import server_context

    entries = list(node.certificates.by_files.values())
    for entry in entries:
        server_context(entry.cert_file, entry.key_file)  # raises on a broken or mismatched pair
    return entries


async def reload(node: Node, path: Path, notifier: Notifier) -> bool:
    """Apply what can change in place from the config at ``path``; False (and nothing
    changed) if it does not load."""
    from ..feedback.categories import load_classifier
    from ..policy.dkim import DKIMError, KeyRing

    notifier.reloading()
    try:
        new = await asyncio.to_thread(load_config, path)
        certs = await asyncio.to_thread(_certificates, node)
        keyring = (KeyRing(new.dkim, node.health) if node.signer is not None and new.dkim.keys
                   else None)
        classifier = load_classifier(new.feedback.bounce_rules)
    except ConfigError as exc:
        log.error("reload refused, still running the previous configuration: %s",
                  "; ".join(exc.errors))
        notifier.ready("reload refused: the config is not valid (see the log)")
        return False
    except (OSError, ValueError, ssl.SSLError, DKIMError) as exc:
        log.error("reload refused, still running the previous configuration: %s", exc)
        notifier.ready("reload refused (see the log)")
        return False
    waiting = _needs_restart(node.config, new)
    node.reload(new, certificates=certs, keyring=keyring, classifier=classifier)
    if node.workers is not None:  # their part (certificates, DKIM keys...) before "reloaded"
        await node.workers.reload()
    log.info("configuration reloaded", extra={
        "certificates": len(certs), "dkim_keys": len(new.dkim.keys),
        "destination_rules": len(new.destinations), "restart_needed": waiting})
    if waiting:
        log.warning("reload: %s changed; those take effect at the next restart",
                    ", ".join(waiting))
    notifier.ready("reloaded" + (f"; restart needed for {', '.join(waiting)}"
                                 if waiting else ""))
    return True


def _source_ips(config: Config) -> list[str]:
    """The pools' source IPs this machine cannot send from: every connection of theirs would
    fail (EADDRNOTAVAIL) and their mail wait in the queue as if the destination were away."""
    errors = []
    for name, pool in config.pools.items():
        for i, ip in enumerate(pool.ips):
            family = socket.AF_INET6 if ":" in ip.address else socket.AF_INET
            with socket.socket(family, socket.SOCK_STREAM) as sock:
                try:
                    sock.bind((ip.address, 0))
                except OSError as exc:
                    errors.append(f"pools.{name}.ips[{i}].address: {ip.address} is not an"
                                  f" address of this machine: {os.strerror(exc.errno or 0)}")
    return errors


def _why(exc: Exception) -> str:
    """One line for a start failure: the file and the reason, or the SQLite error."""
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.filename}: {exc.strerror}" if exc.filename else exc.strerror
    if isinstance(exc, sqlite3.Error):
        return f"SQLite: {exc}"
    return str(exc)


def run(config: Config, path: Path | None = None) -> None:
    """Run a node until SIGTERM/SIGINT, then drain; SIGHUP reloads the config at ``path``
    (docs/operations.md); systemd is told when it is ready, reloading and stopping."""
    runner: Callable[..., Any]
    try:
        import uvloop
        runner = uvloop.run
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        runner = asyncio.run

    async def main() -> None:
        notifier, reloading = Notifier(), asyncio.Lock()
        watchdog = asyncio.get_running_loop().create_task(notifier.watchdog())  # from the start
        if foreign := _source_ips(config):
            for error in foreign:
                _node_log.error("cannot start: %s", error)
            raise SystemExit(1)
        loop = asyncio.get_running_loop()
        try:
            node = Node(config)

            def stop(sig: signal.Signals) -> None:
                """Drain once mail may be coming in: from the moment the listeners are bound
                (intake workers greet clients before ``start`` returns); before that (the spool
                opening, a queue loading) the signal does what it did without a handler."""
                if node.started_at or any(ln.server is not None for ln in node.listeners):
                    node.stop_requested.set()
                else:
                    loop.remove_signal_handler(sig)
                    signal.raise_signal(sig)

            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, stop, sig)
            await node.start()
        except NewerSchema as exc:  # a downgrade: retrying cannot help
            _node_log.error("cannot start: %s: %s", exc, DOWNGRADE_ADVICE)
            raise SystemExit(2) from None
        except (OSError, sqlite3.Error, NodeConflict, SpoolInUse, UnusableFile,
                WorkerStartError) as exc:  # why, not a traceback
            _node_log.error("cannot start: %s", _why(exc))
            raise SystemExit(1) from None

        async def reload_once() -> None:
            async with reloading:  # one after the other: the last SIGHUP's file wins
                assert path is not None  # (only then is SIGHUP handled)
                await reload(node, path, notifier)

        if path is not None:
            loop.add_signal_handler(signal.SIGHUP, lambda: node._spawn(reload_once()))
        ports = {ln.name: ln.port for ln in node.listeners}
        _node_log.info("listening", extra={"listeners": ports})
        notifier.ready("listening on " + ", ".join(f"{n} :{p}" for n, p in ports.items()))
        await node.stop_requested.wait()
        notifier.stopping()
        _node_log.info("draining")
        await node.stop()
        watchdog.cancel()
        _node_log.info("stopped")

    with contextlib.suppress(KeyboardInterrupt):
        runner(main())
