"""The main process's side of SMTP intake in several processes (``[node] workers`` > 1).

The main process binds every listener (so a port taken or port 0 is resolved once, and its
error names the listener) but never accepts on it: N worker processes (``workers/process.py``)
inherit the listening sockets and the kernel hands each new connection to one of them. Each
worker runs the SMTP edge and sends every accepted message here over its socket pair; the
main process commits it with the same spool writer (group commit, urgent queue first), emits
its records, schedules it, and only then tells the worker, which answers 250. The scheduler,
the connection slots of every pool IP (``max_smtp_out``), the relay, pause/resume and the
evidence stay in this process, so priority and the caps hold node-wide as before.

Also answered here, because they must hold across the node: admission of a connection (each
listener's ``max_connections`` and ``max_connections_per_ip``), the messages-per-minute
allowance of each AUTH user or client IP, and the failed AUTHs of each client IP
(``security.auth_failures_per_minute``). The main process counts them in the listener's own
``Guard`` objects and the node's ``Authenticator``, as in one process; a worker that dies gives
its connections back.

A worker that exits is started again (a second later if it lived less than a second); the
messages it was transferring were never acknowledged. Frames are ``childproc``'s
length-prefixed ``marshal``; the config goes to a worker pickled, once, and again on reload.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import pickle
import socket
import sys
import time
from collections import Counter
from dataclasses import astuple
from typing import Any

from ..accounting.records import Record
from ..childproc import frame, frames
from ..edge.limits import client_key
from ..edge.smtp import EdgeSMTP, Listener
from ..policy.dkim import SignerStats
from ..policy.intake import Rejection
from ..spool import Message, Recipient

__all__ = ["WorkerPool", "WorkerStartError", "worker_count"]

log = logging.getLogger("postlane.workers")


def worker_count(setting: int | str) -> int:
    """``[node] workers``: ``"auto"`` is the cores this process may run on."""
    if setting == "auto":
        try:
            return max(1, len(os.sched_getaffinity(0)))
        except AttributeError:  # pragma: no cover - not Linux
            return os.cpu_count() or 1
    return int(setting)


class WorkerStartError(RuntimeError):
    """An intake worker ended, or did not say it listens, while the node started: the node
    cannot take mail as configured (``serve`` says ``cannot start:`` and why, exit 1)."""


class WorkerChannel(asyncio.Protocol):
    """The main process's end of one worker's socket pair."""

    def __init__(self, pool: WorkerPool, index: int) -> None:
        self.pool = pool
        self.index = index
        self.transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self.held: Counter[tuple[str, str]] = Counter()
        """Connections this worker was admitted for and has not given back."""
        self.degraded: set[str] = set()
        """The keys of the degraded states this worker is in (``Health``)."""
        self.signer_stats: tuple[int, ...] = ()
        """The worker's DKIM figures as it told them last (``SignerStats`` as a tuple)."""
        self.ready = asyncio.get_running_loop().create_future()
        self.closed = asyncio.get_running_loop().create_future()
        self.reloaded: asyncio.Future | None = None
        self.failure = ""
        """Why the worker could not start, as it said before it exited ("" if it did not)."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def send(self, obj: object) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(frame(obj))

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        for msg in frames(self._buffer):
            try:
                self.pool.dispatch(self, msg)
            except Exception:  # a bad frame must not take the main process down
                log.exception("intake worker %d: frame %r failed", self.index, msg[0])

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.pool.retire_signer_stats(self.signer_stats)
        self.signer_stats = ()
        for (listener, ip), count in self.held.items():  # the worker's clients are gone
            connections = self.pool.guards[listener].connections
            for _ in range(count):
                connections.release(ip)
        listeners = {listener for listener, _ in self.held}
        self.held.clear()
        for listener in listeners:
            self.pool.tell_stress(listener)
        for key in list(self.degraded):  # a worker gone is in no state any more
            self.pool.worker_health(self, "end", key)
        if not self.ready.done():
            self.ready.set_exception(WorkerStartError(self.index))
        if not self.closed.done():
            self.closed.set_result(None)


class WorkerPool:
    """N intake worker processes sharing the node's listening sockets."""

    def __init__(self, node: Any, count: int) -> None:  # a Node: node.py imports this module
        self.node = node
        self.count = count
        self.guards = {ln.name: ln.handler.guard for ln in node.listeners}
        self.channels: dict[int, WorkerChannel] = {}
        self.procs: dict[int, asyncio.subprocess.Process] = {}
        self.restarts = 0
        self._tasks: set[asyncio.Task] = set()
        self._watchers: list[asyncio.Task] = []
        self._stopping = False
        self._retired: tuple[int, ...] = astuple(SignerStats())
        self._stressed: dict[str, bool] = {}
        """Listeners under stress as the workers were told."""

    # -- start and stop -------------------------------------------------------------------------

    async def start(self) -> None:
        """Bind every listener here (not serving), then start the workers and wait until each
        listens."""
        loop = asyncio.get_running_loop()
        for listener in self.node.listeners:
            await _bind(listener, loop)
        starting = []
        for index in range(1, self.count + 1):
            starting.append(await self._spawn(index))
        try:
            await asyncio.wait_for(asyncio.gather(*(c.ready for c in starting)), 120)
        except BaseException as exc:
            await self._kill_all()
            if isinstance(exc, WorkerStartError):
                raise WorkerStartError(self._start_failure(exc.args[0])) from None
            if isinstance(exc, TimeoutError):
                raise WorkerStartError("intake workers did not start listening within 120 s"
                                       " (a machine short of memory or CPU?)") from None
            raise
        self._watchers = [loop.create_task(self._watch(i)) for i in range(1, self.count + 1)]
        log.info("intake workers started", extra={"workers": self.count})

    def _start_failure(self, index: int) -> str:
        """``cannot start:`` text for worker ``index``, which ended during the start: what it
        said, else its exit status."""
        failure = self.channels[index].failure
        if failure:
            return f"intake worker {index} could not start: {failure}"
        code = self.procs[index].returncode
        how = (f"was killed by signal {-code}" if code is not None and code < 0 else
               f"exited during start-up with status {code}")
        return (f"intake worker {index} {how} (its own message, if it wrote one, is just"
                " above)")

    async def _spawn(self, index: int) -> WorkerChannel:
        loop = asyncio.get_running_loop()
        mine, theirs = socket.socketpair()
        fds = {ln.name: ln.server.sockets[0].fileno() for ln in self.node.listeners
               if ln.server is not None}
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "postlane.workers.process", str(theirs.fileno()),
                str(os.getpid()), pass_fds=(theirs.fileno(), *fds.values()),
                stdin=asyncio.subprocess.DEVNULL)
        finally:
            theirs.close()
        channel = WorkerChannel(self, index)
        await loop.create_unix_connection(lambda: channel, sock=mine)
        self.channels[index], self.procs[index] = channel, proc
        level = logging.getLevelName(logging.getLogger().getEffectiveLevel())
        channel.send(("hello", pickle.dumps(self.node.config), fds,
                      (self.node.intake.ids.tag + index) & 0xFFFFFFFF, level))
        for listener, stressed in self._stressed.items():  # a worker started under stress
            if stressed:
                channel.send(("stress", listener, True))
        return channel

    async def _watch(self, index: int) -> None:
        """Start a worker again when it exits (unless the node is stopping)."""
        while True:
            started = time.monotonic()
            code = await self.procs[index].wait()
            await self.channels[index].closed
            if self._stopping:
                return
            self.restarts += 1
            log.error("intake worker %d exited (status %s); starting it again", index, code)
            if time.monotonic() - started < 1.0:
                await asyncio.sleep(1.0)
            if self._stopping:
                return
            try:
                channel = await self._spawn(index)
                await asyncio.wait_for(channel.ready, 120)
            except WorkerStartError:
                await self.procs[index].wait()  # its status, for the line below
                log.error("%s", self._start_failure(index))
            except (OSError, RuntimeError, TimeoutError) as exc:
                log.error("intake worker %d did not start: %s", index, exc)

    async def stop(self, timeout: float) -> None:
        """Drain every worker (transfers under way are committed and answered), then wait for
        them to exit; kill what is left after ``timeout``."""
        self._stopping = True
        for watcher in self._watchers:
            watcher.cancel()
        for channel in self.channels.values():
            channel.send(("drain",))
        waits = [proc.wait() for proc in self.procs.values()]
        try:
            await asyncio.wait_for(asyncio.gather(*waits), timeout + 5)
        except TimeoutError:
            log.error("intake workers did not stop in time; killing them")
            await self._kill_all()
        if self._tasks:  # commits asked for before the workers went
            await asyncio.wait(set(self._tasks), timeout=timeout)

    async def _kill_all(self) -> None:
        for proc in self.procs.values():
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
        for proc in self.procs.values():
            await proc.wait()

    async def reload(self, timeout: float = 30.0) -> None:
        """Hand the reloaded config to every worker (admin/service.py merged it here) and wait
        until each has applied it."""
        data = pickle.dumps(self.node.config)
        loop = asyncio.get_running_loop()
        waits = []
        for channel in self.channels.values():
            if channel.transport is None:
                continue  # starting again: it gets the current config in its hello
            channel.reloaded = loop.create_future()
            waits.append(channel.reloaded)
            channel.send(("reload", data))
        done, pending = await asyncio.wait(waits, timeout=timeout) if waits else (set(), set())
        if pending:
            log.error("%d intake worker(s) did not confirm the reload", len(pending))

    def worker_health(self, channel: WorkerChannel, what: str, key: str, *args: Any) -> None:
        """A worker's degraded state, in the node's ``Health``: begun by the first worker
        (logged once), counted from all, ended when no worker is in it any more (low disk:
        and this process's own check agrees)."""
        health = self.node.health
        if what == "begin":
            channel.degraded.add(key)
            health.begin(key, *args)
        elif what == "count":
            health.count(key, *args)
        elif what == "end":
            channel.degraded.discard(key)
            disk = self.node.intake.disk
            if not any(key in c.degraded for c in self.channels.values()) and (
                    key != disk.KEY or disk.ok()):
                health.end(key)

    def tell_stress(self, listener: str) -> None:
        """When strangers' connections put a listener under stress (or it ends), log it once
        and tell every worker: their idle strangers get ``stress_timeout`` (``Guard``)."""
        guard = self.guards[listener]
        stressed = guard.connections.stressed
        if stressed == self._stressed.get(listener, False):
            return
        self._stressed[listener] = stressed
        if stressed:
            log.warning("listener under stress: idle strangers get the short timeout",
                        extra={"listener": guard.config.port,
                               "connections": guard.connections.open,
                               "timeout": guard.config.limits.stress_timeout})
        else:
            log.info("listener no longer under stress", extra={"listener": guard.config.port})
        for channel in self.channels.values():
            channel.send(("stress", listener, stressed))

    def retire_signer_stats(self, stats: tuple[int, ...]) -> None:
        """A worker that exited keeps counting in ``signer_stats`` (its figures stay)."""
        if stats:
            self._retired = tuple(a + b for a, b in zip(self._retired, stats, strict=True))

    def signer_stats(self, own: SignerStats) -> SignerStats:
        """The node's DKIM figures: ``own`` (this process signs what the API submits) plus
        every worker's, those that exited included."""
        total = list(astuple(own))
        for stats in [self._retired, *(c.signer_stats for c in self.channels.values())]:
            for i, value in enumerate(stats):
                total[i] += value
        return SignerStats(*total)

    def pids(self) -> list[int]:
        return [p.pid for p in self.procs.values() if p.returncode is None]

    # -- requests from the workers ----------------------------------------------------------------

    def dispatch(self, channel: WorkerChannel, msg: tuple) -> None:
        op, ask = msg[0], msg[1]
        if op == "enqueue":
            self._spawn_task(self._enqueue(channel, ask, *msg[2:]))
        elif op == "admit":
            listener, ip, per_ip = msg[2:]
            refusal = self.guards[listener].connections.admit(ip, per_ip=per_ip)
            if refusal is None:
                channel.held[(listener, ip)] += 1
            channel.send((ask, refusal))
            self.tell_stress(listener)
        elif op == "release":
            listener, ip = msg[2:]
            if channel.held[(listener, ip)] > 0:
                channel.held[(listener, ip)] -= 1
                self.guards[listener].connections.release(ip)
            if not channel.held[(listener, ip)]:
                del channel.held[(listener, ip)]
            self.tell_stress(listener)
        elif op == "rate":
            channel.send((ask, self.guards[msg[2]].rate.allow(msg[3])))
        elif op == "auth_may_try":
            auth = self.node.auth
            channel.send((ask, auth is None or auth.failures.available(client_key(msg[2]))))
        elif op == "auth_failed":
            if self.node.auth is not None:
                self.node.auth.failures.allow(client_key(msg[2]))
            channel.send((ask, None))
        elif op == "signer_stats":
            channel.signer_stats = tuple(msg[2])
        elif op == "health":
            self.worker_health(channel, msg[2], *msg[3:])
        elif op == "persist":
            self.node.persist(Record(*msg[2]))
        elif op == "flush":
            self._spawn_task(self._flush(channel, ask, *msg[2:]))
        elif op == "report":
            self._spawn_task(self._report(channel, ask, *msg[2:]))
        elif op == "reloaded":
            if channel.reloaded is not None and not channel.reloaded.done():
                channel.reloaded.set_result(None)
        elif op == "failed":
            channel.failure = str(msg[2])
        elif op == "ready":
            if not channel.ready.done():
                channel.ready.set_result(None)
        else:
            log.error("intake worker %d: unknown request %r", channel.index, op)

    def _spawn_task(self, work: Any) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _enqueue(self, channel: WorkerChannel, ask: int, values: tuple, rcpts: list,
                       content: bytes, urgent: bool, events: list) -> None:
        """Commit a message a worker accepted, then tell the worker (which answers 250)."""
        intake = self.node.intake
        if intake.audit_behind():
            channel.send((ask, (451, "4.3.0 Audit trail is behind, try again later")))
            return
        msg = Message(*values)
        recipients = [Recipient(msg=msg, idx=idx, address=address, domain=sys.intern(domain),
                                orcpt=orcpt, notify=notify)
                      for idx, address, domain, orcpt, notify in rcpts]
        msg.remaining = len(recipients)
        records = [Record(*e) for e in events]
        try:
            await intake.store(msg, recipients, content, urgent=urgent, events=records)
        except Rejection as exc:  # the spool is away (counted by the intake)
            channel.send((ask, (exc.code, exc.text)))
            return
        except Exception:
            log.exception("commit of a worker's message failed")
            channel.send((ask, (451, "4.3.0 Temporary failure storing the message, try again")))
            return
        channel.send((ask, None))

    async def _flush(self, channel: WorkerChannel, ask: int, events: list, urgent: bool) -> None:
        records = [Record(*e) for e in events]
        try:
            if records:
                self.node.spool.record(records, urgent=urgent)
            await self.node.spool.flush()
        except Exception:
            log.exception("flush for an intake worker failed")
            channel.send((ask, False))
            return
        for rec in records:
            self.node.intake.record(rec)
        channel.send((ask, True))

    async def _report(self, channel: WorkerChannel, ask: int, data: bytes, rcpts: list[str],
                      client: str) -> None:
        """A bounce, complaint or DMARC report for the node's own addresses."""
        try:
            await self.node.feedback.receive(data, rcpts, client)
        except Exception as exc:
            log.exception("report processing failed")
            channel.send((ask, f"{type(exc).__name__}: {exc}"))
            return
        channel.send((ask, ""))


async def _bind(listener: Listener, loop: asyncio.AbstractEventLoop) -> None:
    """Listen on the listener's address without accepting: the workers accept."""
    cfg = listener.config

    def never() -> EdgeSMTP:  # pragma: no cover - a server that is not serving accepts nothing
        raise RuntimeError("the main process does not accept SMTP connections")

    try:
        listener.server = await loop.create_server(never, cfg.address, cfg.port,
                                                   reuse_address=True, start_serving=False,
                                                   backlog=cfg.limits.listen_backlog)
    except OSError as exc:
        raise OSError(exc.errno, f"listener {listener.name!r} (listeners.{listener.name} in"
                                 f" the config) cannot listen on {cfg.address}:{cfg.port}:"
                                 f" {os.strerror(exc.errno or 0)}") from None
