"""One SMTP intake worker process (``[node] workers`` > 1; docs/architecture.md, *Processes*).

The worker runs the whole SMTP edge on its own core: aiosmtpd's protocol, the guard's checks,
the suppression look-up at RCPT, classification, header work and DKIM signing (its own signing
children). It never writes the spool: each accepted message goes to the node's main process
over a socket pair, and the worker answers 250 only once the main process says the message is
committed. What must hold across the whole node is asked of the main process: admission of a
connection (per-listener and per-IP caps) and the messages-per-minute allowance.

It exits when the main process goes (the socket closes; ``PR_SET_PDEATHSIG`` kills it at once
if the main process is killed), and drains when told: no new mail (421), transfers under way
finish, then it exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import pickle
import signal
import socket
import sys
from collections.abc import Callable, Sequence
from dataclasses import astuple, fields
from typing import Any, ClassVar

from aiosmtpd.smtp import Envelope, Session

from ..accounting.records import Record
from ..childproc import frame, frames
from ..config import Config, ListenerConfig
from ..config.model import SecurityConfig
from ..edge.auth import Authenticator
from ..edge.guard import peer_ip
from ..edge.limits import client_key
from ..edge.smtp import EdgeSMTP, SMTPIntake
from ..edge.tls import Certificates, ServerCertificate
from ..feedback.service import FeedbackService
from ..health import Health
from ..policy.intake import Intake, QueueIds, Rejection
from ..policy.users import Users
from ..spool import Message, Recipient

log = logging.getLogger("postlane.workers.process")

MESSAGE_FIELDS = tuple(f.name for f in fields(Message) if f.name != "remaining")
"""A message crosses the channel as these values, in this order (``Message(*values)``)."""
RECORD_FIELDS = tuple(f.name for f in fields(Record))


def message_values(msg: Message) -> tuple:
    return tuple(getattr(msg, name) for name in MESSAGE_FIELDS)


def record_values(rec: Record) -> tuple:
    return tuple(getattr(rec, name) for name in RECORD_FIELDS)


class MainChannel(asyncio.Protocol):
    """The worker's end of the socket pair: asks (answered in any order, by number), tells
    (no answer), and the main process's commands (hello, reload, drain)."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self._pending: dict[int, asyncio.Future] = {}
        self._next = 0
        self._buffer = bytearray()
        self.commands: asyncio.Queue[tuple] = asyncio.Queue()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def request(self, op: str, *args: Any) -> asyncio.Future:
        """Ask the main process; the future holds its answer."""
        self._next += 1
        future = asyncio.get_running_loop().create_future()
        self._pending[self._next] = future
        assert self.transport is not None
        self.transport.write(frame((op, self._next, *args)))
        return future

    async def ask(self, op: str, *args: Any) -> Any:
        return await self.request(op, *args)

    def tell(self, op: str, *args: Any) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(frame((op, 0, *args)))

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        for msg in frames(self._buffer):
            if isinstance(msg[0], int):  # an answer
                future = self._pending.pop(msg[0], None)
                if future is not None and not future.done():
                    future.set_result(msg[1])
            else:
                self.commands.put_nowait(msg)

    def connection_lost(self, exc: Exception | None) -> None:
        # The main process is gone: nothing more can be committed, so nothing more can be
        # acknowledged. Leave at once; clients mid-transfer get no 250 and send again.
        os._exit(0)


class RemoteSpool:
    """What ``Intake`` needs of a spool, answered by the main process's spool writer."""

    HEALTH_KEY: ClassVar[str] = "spool"

    def __init__(self, channel: MainChannel) -> None:
        self.channel = channel
        self._records: list[tuple] = []
        self._urgent = False

    async def enqueue(self, msg: Message, recipients: list[Recipient], content: bytes,
                      urgent: bool = False, events: list[Record] | tuple = (),
                      finals: Sequence[object] = ()) -> None:
        """Returns once the main process has committed the message (and its records).
        ``finals`` (other recipients' final states, a DSN's) never come here: the main
        process queues the DSNs."""
        if finals:
            raise ValueError("an intake worker queues no DSN")
        refusal = await self.channel.ask(
            "enqueue", message_values(msg),
            [(r.idx, r.address, r.domain, r.orcpt, r.notify) for r in recipients], content,
            urgent, [record_values(e) for e in events])
        if refusal is not None:
            raise Rejection(*refusal)

    def record(self, events: list[Record], urgent: bool = False) -> None:
        self._records.extend(record_values(e) for e in events)
        self._urgent = self._urgent or urgent

    async def flush(self) -> None:
        """Records handed over so far are committed (and the main process's spool flushed)."""
        held, urgent = self._records, self._urgent
        self._records, self._urgent = [], False
        await self.channel.ask("flush", held, urgent)


class RemoteHealth(Health):
    """The worker's degraded states (low disk, a DKIM key unavailable) are the node's: they
    begin, are counted and end in the main process's ``Health``, which logs each once and
    shows them in ``status`` and ``/metrics`` (the refusals of every worker added up)."""

    def __init__(self, channel: MainChannel) -> None:
        super().__init__()
        self.channel = channel
        self._begun: set[str] = set()

    def begin(self, key: str, kind: str, what: str, cause: str, effect: str,
              unit: str | None = "refusals", level: int = logging.WARNING) -> None:
        if key not in self._begun:
            self._begun.add(key)
            self.channel.tell("health", "begin", key, kind, what, cause, effect, unit, level)

    def count(self, key: str, n: int = 1) -> None:
        self.channel.tell("health", "count", key, n)

    def end(self, key: str) -> None:
        if key in self._begun:
            self._begun.discard(key)
            self.channel.tell("health", "end", key)


class _NoScheduler:
    """The main process schedules what it commits."""

    def add_message(self, recipients: list[Recipient]) -> None:
        pass


class _Rua:
    """The DMARC ``rua`` addresses (their reports go to the main process)."""

    def __init__(self, addresses: list[str]) -> None:
        self.addresses = {a.lower() for a in addresses}

    def is_rua(self, address: str) -> bool:
        return address.lower() in self.addresses

    async def receive(self, data: bytes, client: str = "") -> None:
        """Never called: ``WorkerFeedback.receive`` hands every report to the main process."""
        raise NotImplementedError("DMARC reports are stored by the main process")


class WorkerFeedback(FeedbackService):
    """Suppression look-ups and List-Unsubscribe here; inbound reports (bounces, complaints,
    DMARC) are acted on by the main process, which owns the suppression writes and records."""

    def __init__(self, config: Config, record: Callable[[Record], None],
                 channel: MainChannel) -> None:
        super().__init__(config, record, dmarc=_Rua(config.reputation.dmarc.addresses))
        self.channel = channel

    async def receive(self, data: bytes, rcpts: list[str], client: str = "") -> None:
        error = await self.channel.ask("report", data, rcpts, client)
        if error:
            raise RuntimeError(error)


class WorkerSMTP(EdgeSMTP):
    """The edge protocol with admission asked of the main process before the greeting."""

    _admitted = False
    _gone = False

    async def _handle_client(self) -> None:
        handler: WorkerHandler = self.intake_handler  # type: ignore[assignment]
        ip = self._counted_ip or ""
        answer = handler.channel.request("admit", handler.name, ip, not self.guard.trusted(ip))
        answer.add_done_callback(self._admission)
        refusal = await asyncio.shield(answer)
        if refusal is not None:
            log.info("connection refused", extra={"client": ip, "reply": refusal})
            if self.transport is not None:
                self.transport.write(refusal.encode() + b"\r\n")
                self.transport.close()
            return
        handler.sessions += 1
        try:
            await super()._handle_client()
        finally:
            handler.sessions -= 1

    def _admission(self, answer: asyncio.Future) -> None:
        """Count the admission in, or give it back when the client left while we asked."""
        if answer.cancelled() or answer.result() is not None:
            return
        if self._gone:
            self._release()
        else:
            self._admitted = True

    def _release(self) -> None:
        handler: WorkerHandler = self.intake_handler  # type: ignore[assignment]
        handler.channel.tell("release", handler.name, self._counted_ip or "")

    def connection_lost(self, error: Exception | None) -> None:
        if not self._gone:  # a failed STARTTLS calls it twice
            self._gone = True
            if self._admitted:
                self._admitted = False
                self._release()
        super().connection_lost(error)

    async def smtp_DATA(self, arg: str) -> None:
        try:
            await super().smtp_DATA(arg)
        finally:
            handler: WorkerHandler = self.intake_handler  # type: ignore[assignment]
            handler.tell_signer_stats()


class WorkerAuthenticator(Authenticator):
    """SMTP AUTH in a worker: failed logins are counted by the main process (per client IP,
    node-wide), so a guesser spreading its connections over the workers gets no more tries
    than from one process."""

    def __init__(self, users: Users, security: SecurityConfig, channel: MainChannel) -> None:
        super().__init__(users, security.auth_failures_per_minute, security.auth_concurrency)
        self.channel = channel

    async def may_try(self, client: str) -> bool:
        return bool(await self.channel.ask("auth_may_try", client))

    async def failed(self, client: str) -> None:
        """Counted before the 535 goes out, so the client's next try, on any worker, sees it."""
        await self.channel.ask("auth_failed", client)


class WorkerHandler(SMTPIntake):
    """The listener's handler with the messages-per-minute allowance asked of the main
    process (node-wide, per AUTH user or client IP, as in one process)."""

    def __init__(self, name: str, config: ListenerConfig, intake: Intake,
                 certificate: ServerCertificate | None, channel: MainChannel,
                 auth: Authenticator | None = None) -> None:
        # admission and the message rate are counted by the main process instead
        super().__init__(name, config, intake, certificate, auth, local_limits=False)
        self.channel = channel
        self.rate_limited = config.limits.messages_per_minute > 0
        self.sessions = 0
        self._told: tuple[int, ...] = ()

    def tell_signer_stats(self) -> None:
        """The worker's DKIM figures (signed, unsigned, refused, deferred) to the main process
        when they changed, for ``status``: the workers sign, not the main process."""
        signer = self.intake.signer
        if signer is None:
            return
        stats = astuple(signer.stats)
        if stats != self._told:
            self._told = stats
            self.channel.tell("signer_stats", stats)

    async def handle_MAIL(self, server: EdgeSMTP, session: Session, envelope: Envelope,
                          address: str, mail_options: list[str]) -> str:
        reply = await super().handle_MAIL(server, session, envelope, address, mail_options)
        if not self.rate_limited or not reply.startswith("250"):
            return reply
        user = self.guard.user(session)
        ip = peer_ip(session)
        key = user.name if user is not None else client_key(ip)
        if (user is not None or not self.guard.trusted(ip)) and \
                not await self.channel.ask("rate", self.name, key):
            envelope.mail_from = None
            envelope.mail_options.clear()
            return "450 4.7.1 Too many messages, slow down and try again later"
        return reply


class Worker:
    """The edge of one worker process: the listeners on the inherited sockets."""

    def __init__(self, config: Config, channel: MainChannel, sockets: dict[str, int]) -> None:
        self.config = config
        self.channel = channel
        self.feedback = WorkerFeedback(config, self.persist, channel)
        self.health = RemoteHealth(channel)
        self.signer = None
        if config.dkim.keys:
            from ..policy.dkim import Signer

            self.signer = Signer(config, self.persist, health=self.health)
        self.spool = RemoteSpool(channel)
        self.intake = Intake(config, self.spool, _NoScheduler(), lambda rec: None, self.signer,  # type: ignore[arg-type]
                             self.health, feedback=self.feedback)
        self.certificates = Certificates(config)
        self.auth = (WorkerAuthenticator(self.intake.users, config.security, channel)
                     if self.intake.users is not None else None)
        self.handlers = {name: WorkerHandler(name, config.listeners[name], self.intake,
                                             self.certificates.for_listener(name), channel,
                                             self.auth)
                         for name in sockets}
        self.sockets = sockets
        self.servers: list[asyncio.Server] = []

    def persist(self, rec: Record) -> None:
        """A record without a spool state change (a signing failure): the main process
        writes it."""
        self.channel.tell("persist", record_values(rec))

    async def start(self) -> None:
        if self.signer is not None:
            await self.signer.start()
        loop = asyncio.get_running_loop()
        hostname = self.config.node.hostname
        for name, fd in self.sockets.items():
            handler, cfg = self.handlers[name], self.config.listeners[name]

            def factory(handler: WorkerHandler = handler, cfg: ListenerConfig = cfg) -> WorkerSMTP:
                return WorkerSMTP(handler, data_size_limit=cfg.max_message_size,
                                  enable_SMTPUTF8=True, decode_data=False, hostname=hostname,
                                  ident="Postlane ESMTP", loop=loop,
                                  **handler.guard.smtp_options())

            sock = socket.socket(fileno=fd)
            self.servers.append(await loop.create_server(
                factory, sock=sock, ssl=handler.guard.server_ssl,
                backlog=cfg.limits.listen_backlog))  # listen() again: keep the backlog

    def reload(self, new: Config) -> None:
        """What a reload changes at the edge (admin/service.py applies the same in the main
        process, whose merged config this is): certificates, classes, classification, DKIM."""
        from ..policy.dkim import KeyRing

        cfg = self.config
        for entry in self.certificates.by_files.values():
            entry.reload_if_changed()
        for name, cls in new.classes.items():
            if name in cfg.classes and cls.pool == cfg.classes[name].pool:
                cfg.classes[name] = cls
        cfg.routes, cfg.classification = new.routes, new.classification
        cfg.default_class, cfg.correlation_header = new.default_class, new.correlation_header
        if self.signer is not None and new.dkim.keys:
            self.signer.use_keyring(KeyRing(new.dkim, self.signer.health))
            cfg.dkim.keys = new.dkim.keys  # the rest waits for a restart (reload says so)

    def stress(self, listener: str, stressed: bool) -> None:
        """The main process counts the node's connections and says when strangers put a
        listener under stress: this worker's idle strangers get ``stress_timeout`` too."""
        handler = self.handlers.get(listener)
        if handler is not None:
            handler.guard.stress_changed(stressed)

    async def drain(self) -> None:
        """421 to new mail, no new connections; wait for transfers under way (their commit
        needs the main process, which waits for us), then stop."""
        for handler in self.handlers.values():
            handler.drain()
        for server in self.servers:
            server.close()
        await asyncio.gather(*(h.finish(self.config.node.drain_timeout)
                               for h in self.handlers.values()))
        if self.signer is not None:  # the signing children's exits: awaited in threads
            await self.signer.stop()
        await asyncio.to_thread(self.feedback.close)  # joins the list's writer thread


def start_failure(exc: BaseException) -> str:
    """One line for why a worker could not start (a file, a descriptor, a resource), for the
    operator: the main process's ``cannot start:`` line carries it."""
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.filename}: {exc.strerror}" if exc.filename else exc.strerror
    return f"{type(exc).__name__}: {exc}"


def _die_with_parent(parent: int) -> None:
    """Linux: SIGKILL this process when the main process dies (a kill -9 included), so a
    restarted node finds its port free at once."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:
        os._exit(0)


async def _serve(fd: int) -> None:
    loop = asyncio.get_running_loop()
    channel = MainChannel()
    await loop.create_unix_connection(lambda: channel, sock=socket.socket(fileno=fd))
    op, config_bytes, sockets, tag, level = await channel.commands.get()
    assert op == "hello"
    from ..logsetup import setup_logging

    config: Config = pickle.loads(config_bytes)
    setup_logging(level, config.node.name)
    try:
        worker = Worker(config, channel, sockets)
        worker.intake.ids = QueueIds(tag)  # queue ids stay unique across the node's processes
        await worker.start()
    except Exception as exc:  # the main process says "cannot start: intake worker N: why"
        why = start_failure(exc)
        log.error("intake worker cannot start: %s", why)
        channel.tell("failed", why)
        await asyncio.sleep(0)  # the frame out before the exit
        raise SystemExit(1) from None
    watch = loop.create_task(worker.certificates.watch())
    channel.tell("ready")
    while True:
        command = await channel.commands.get()
        if command[0] == "reload":
            try:
                worker.reload(pickle.loads(command[1]))
            except Exception:  # noqa: BLE001 - the previous settings stay
                log.exception("worker reload failed")
            channel.tell("reloaded")
        elif command[0] == "stress":
            worker.stress(command[1], command[2])
        elif command[0] == "drain":
            await worker.drain()
            watch.cancel()
            return


def main(argv: list[str]) -> None:
    fd, parent = int(argv[0]), int(argv[1])
    _die_with_parent(parent)
    # The main process drains the node and tells its workers; a Ctrl-C or a SIGTERM sent to
    # the whole process group must not cut transfers under way.
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    try:
        import uvloop
        uvloop.run(_serve(fd))
    except ImportError:  # pragma: no cover
        asyncio.run(_serve(fd))


if __name__ == "__main__":
    main(sys.argv[1:])
