"""The security layer of an SMTP listener: who may relay, TLS and AUTH, and the limits.

``Guard`` holds one listener's security state and answers the questions the SMTP handler asks
at MAIL and RCPT; ``GuardedSMTP`` is aiosmtpd's protocol with the per-connection limits. Kept
apart from ``smtp.py`` (the MTA's own protocol extensions) so each reads as one concern.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import re
import socket
import sys
import weakref
from base64 import b64decode, b64encode
from typing import TYPE_CHECKING, Any

import aiosmtpd.smtp
from aiosmtpd.smtp import (
    MISSING,
    AuthResult,
    LoginPassword,
    Session,
    TLSSetupException,
    syntax,
)

from ..config import ListenerConfig
from ..policy.users import User
from ..streams import pending_bytes
from .limits import ConnectionLimits, RateLimiter, client_key
from .protocol import QuickSMTP

if TYPE_CHECKING:
    from ..policy.intake import Intake
    from .auth import Authenticator
    from .tls import ServerCertificate

log = logging.getLogger("postlane.edge")

# aiosmtpd logs AUTH challenge responses (base64 user names and passwords) at DEBUG and every
# command line (addresses) at INFO: secrets never reach a log, whatever level the operator runs
# at, and a campaign does not cost a log line per SMTP command. Postlane logs what matters itself.
logging.getLogger("mail.log").setLevel(logging.WARNING)
# aiosmtpd also warns of what is not the operator's to fix: its own AUTH code sets the
# deprecated Session.login_data after every successful login, and a client's unknown command is
# a WARNING line each (a log flood at a line per command; the guard counts them with the other
# bad commands and logs the cut-off). An AUTH cancelled with "*" is the guard's own
# (``challenge_auth``), which logs nothing.
_NOT_THE_OPERATORS = ("Session.login_data is deprecated", "%r unrecognised: %s")
logging.getLogger("mail.log").addFilter(
    lambda record: not str(record.msg).startswith(_NOT_THE_OPERATORS))
# aiosmtpd ends a session at its 5th unknown command with "502 ... goodbye" (BOGUS_LIMIT, one
# for the whole module): a 5xx reply to a command, not the 421 that RFC 5321 3.8 asks before a
# server closes, and regardless of the listener's max_bad_commands. GuardedSMTP counts unknown
# commands with the other bad ones and says 421 at max_bad_commands.
aiosmtpd.smtp.BOGUS_LIMIT = sys.maxsize

QUICKACK = getattr(socket, "TCP_QUICKACK", None)
"""Linux only: acknowledge what was received now, not after the delayed-ACK timer."""

# Enhanced codes (RFC 3463) for aiosmtpd's own error replies, which carry none.
_ENHANCED = {421: "4.3.0", 450: "4.2.0", 451: "4.3.0", 452: "4.3.1", 454: "4.7.0",
             500: "5.5.2", 501: "5.5.4", 502: "5.5.1", 503: "5.5.1", 504: "5.5.4",
             530: "5.7.0", 550: "5.0.0", 552: "5.3.4", 553: "5.1.3", 554: "5.7.0",
             555: "5.5.4"}
# aiosmtpd's own 2xx replies that need a code (RFC 2034: every reply but the greeting and
# HELO/EHLO's); HELP answers 214 (RFC 5321 4.2), not 250.
_SUCCESS = {"250 OK": "250 2.0.0 OK", "221 Bye": "221 2.0.0 Bye",
            "220 Ready to start TLS": "220 2.0.0 Ready to start TLS"}
_HAS_ENHANCED = re.compile(r"^\d{3}[ -][245]\.\d{1,3}\.\d{1,3}(\s|$)")
# 503 (bad sequence) is left out: a pipelining client whose MAIL was refused gets one for every
# RCPT and DATA that follows, through no fault of its own.
# 555 (a parameter not implemented) is the client's error as 501 is.
_BAD_COMMAND = frozenset({"500", "501", "502", "504", "535", "538", "555"})  # the code's 3
RELAY_DENIED = "550 5.7.1 Relaying denied: authenticate first"
"""Counted as a junk command: a stranger repeating it held a slot for ever at no cost."""
_REPLY_LINE = 510
"""Octets of a reply line before its CRLF (RFC 5321 4.5.3.1.5: 512 with it)."""


def with_enhanced(reply: str) -> str:
    """``500 Error: bad syntax`` -> ``500 5.5.2 Error: bad syntax``; aiosmtpd's bare 2xx replies
    (``250 OK``, ``221 Bye``, STARTTLS's 220, VRFY's 252, HELP) get theirs too."""
    if reply[0] == "2":
        if reply in _SUCCESS:
            return _SUCCESS[reply]
        if reply.startswith(("250 Supported commands", "250 Syntax:")):
            return f"214 2.0.0 {reply[4:]}"
        if reply.startswith("252 Cannot VRFY"):
            return f"252 2.1.5 {reply[4:]}"
        return reply
    code = int(reply[:3]) if reply[:3].isdigit() else 0
    enhanced = "5.5.1" if code == 500 and "not recognized" in reply else _ENHANCED.get(code)
    if enhanced is None or _HAS_ENHANCED.match(reply):
        return reply
    return f"{reply[:4]}{enhanced} {reply[4:]}"


def peer_ip(session: Session) -> str:
    return session.peer[0] if isinstance(session.peer, tuple) else ""


class _Unlimited:
    """Admits every connection: admission is counted elsewhere (a worker process asks its
    main process, node-wide, which also tells it when the listener is under stress)."""

    stressed = False
    open = 0

    def admit(self, ip: str, per_ip: bool = True) -> str | None:
        return None

    def release(self, ip: str) -> None:
        pass


class Guard:
    """One listener's security state: relay networks, connection counts, message rates, TLS,
    and the node's SMTP AUTH (``auth``; None: no users file, no AUTH)."""

    def __init__(self, config: ListenerConfig, intake: Intake,
                 certificate: ServerCertificate | None = None,
                 auth: Authenticator | None = None, *, local_limits: bool = True) -> None:
        """``local_limits`` False: connection caps and message rates are not counted here
        (an intake worker asks the main process, which counts them for the whole node)."""
        self.config = config
        self.intake = intake
        self.certificate = certificate
        self.auth = auth
        self.relay_nets = [ipaddress.ip_network(n, strict=False) for n in config.relay_from]
        self._relay_ips: dict[str, bool] = {}
        self.connections: ConnectionLimits | _Unlimited = (
            ConnectionLimits(config.limits.max_connections, config.limits.max_connections_per_ip)
            if local_limits else _Unlimited())
        self.rate = RateLimiter(config.limits.messages_per_minute if local_limits else 0)
        self._strangers: weakref.WeakSet[GuardedSMTP] = weakref.WeakSet()
        self.sessions: weakref.WeakSet[GuardedSMTP] = weakref.WeakSet()
        """Every open session, for ``close_idle``."""
        self._under_stress = False

    def stranger_came(self, session: GuardedSMTP) -> None:
        """When strangers' connections put the listener under stress, the idle ones among
        them (an attacker's, typically, holding slots) get the short timeout at once."""
        self._strangers.add(session)
        if self.connections.stressed and not self._under_stress:
            log.warning("listener under stress: idle strangers get the short timeout",
                        extra={"listener": self.config.port, "connections": len(self._strangers),
                               "timeout": self.config.limits.stress_timeout})
            self.stress_changed()

    def stress_changed(self, told: bool | None = None) -> None:
        """Follow ``connections.stressed`` (an intake worker: ``told`` by its main process,
        which counts the node's connections and logs the change): under stress, the idle
        strangers get the short timeout now."""
        if told is not None and isinstance(self.connections, _Unlimited):
            self.connections.stressed = told
        if self.connections.stressed and not self._under_stress:
            self._under_stress = True
            for other in list(self._strangers):
                other.stress()
        elif self._under_stress and not self.connections.stressed:
            self._under_stress = False

    def close_idle(self) -> None:
        """The node is stopping: each session waiting for its next command is told so with
        421 and closed now (RFC 5321 3.8), instead of being cut without a word when the
        process ends; one receiving or storing a message finishes it (its next command gets
        the drain's 421)."""
        for session in list(self.sessions):
            session.close_if_idle()

    def stranger_left(self, session: GuardedSMTP) -> None:
        self._strangers.discard(session)
        if self._under_stress and not self.connections.stressed:
            self._under_stress = False
            log.info("listener no longer under stress", extra={"listener": self.config.port})

    def smtp_options(self) -> dict[str, Any]:
        """Keyword arguments for aiosmtpd's SMTP: STARTTLS and the idle timeout (AUTH goes
        through ``GuardedSMTP``, which checks passwords off the event loop)."""
        cert = self.certificate
        return {"timeout": self.config.limits.command_timeout,
                "tls_context": cert.context if cert and self.config.tls == "starttls" else None,
                # an implicit-TLS socket is encrypted though aiosmtpd cannot tell
                "auth_require_tls": self.config.tls != "implicit"}

    @property
    def server_ssl(self) -> Any:
        """The ``SSLContext`` of the listening socket itself (implicit TLS only)."""
        cert = self.certificate
        return cert.context if cert and self.config.tls == "implicit" else None

    def ehlo(self, responses: list[str]) -> list[str]:
        """No AUTH keyword without users to check it against."""
        if self.auth is None:
            return [r for r in responses if not r.startswith("250-AUTH")]
        return responses

    def user(self, session: Session) -> User | None:
        if not session.authenticated or self.auth is None:
            return None
        return self.auth.users.get(str(session.auth_data))

    def trusted(self, ip: str) -> bool:
        """Whether a client IP is in ``relay_from`` (and the listener does not require AUTH):
        it may relay, and like Postfix's mynetworks it is exempt from the per-client limits
        (connections per IP, messages per minute), so an application host submitting a campaign
        is not throttled as if it were a stranger."""
        if self.config.require_auth:
            return False
        allowed = self._relay_ips.get(ip)
        if allowed is None:  # parsing and matching cost ~15 us, and this runs for every RCPT
            try:
                addr = ipaddress.ip_address(ip)
            except ValueError:
                return False
            if len(self._relay_ips) > 10_000:
                self._relay_ips.clear()
            allowed = self._relay_ips[ip] = any(addr in net for net in self.relay_nets)
        return allowed

    def may_relay(self, session: Session) -> bool:
        """Only an authenticated user or a trusted client may relay: there is no other way to
        get a recipient accepted."""
        return self.user(session) is not None or self.trusted(peer_ip(session))

    def check_mail(self, session: Session, address: str, encrypted: bool) -> str | None:
        """The refusal of a MAIL command, or None to go on."""
        user = self.user(session)
        if self.config.require_tls and not encrypted:
            return "530 5.7.0 Must issue a STARTTLS command first"
        if self.config.require_auth and user is None:
            return "530 5.7.0 Authentication required"
        if not self.intake.disk.ok():
            return self.intake.disk.refusal()
        if user is not None and not user.may_send_from(address):
            log.warning("sender domain refused", extra={"user": user.name, "from": address})
            return f"550 5.7.1 User {user.name!r} may not send from {address or '<>'!r}"
        ip = peer_ip(session)
        key = user.name if user is not None else client_key(ip)
        if (user is not None or not self.trusted(ip)) and not self.rate.allow(key):
            return "450 4.7.1 Too many messages, slow down and try again later"
        return None

    def check_rcpt(self, session: Session) -> str | None:
        """The refusal of a RCPT command, or None to go on."""
        if not self.may_relay(session):
            return RELAY_DENIED
        if not self.intake.disk.ok():
            return self.intake.disk.refusal()
        return None


class _SessionReader(asyncio.StreamReader):
    """A session's reader once its client has closed its side: a read that needs bytes which
    will never come ends the session (CancelledError, aiosmtpd's way out, which closes the
    connection after the replies already written) instead of raising IncompleteReadError,
    which aiosmtpd's command loop answers with a 500 and reads again, for ever."""

    async def readuntil(self, separator: Any = b"\n") -> bytes:
        try:
            return await super().readuntil(separator)
        except asyncio.IncompleteReadError:
            raise asyncio.CancelledError from None


class GuardedSMTP(QuickSMTP):
    """aiosmtpd's SMTP with the per-connection limits: connection caps, line length, idle
    timeout (with a 421), DATA deadline and minimum rate, the pregreet test, bad-command count,
    password checks off the event loop, enhanced codes on aiosmtpd's own replies. The handler
    must have a ``guard``."""

    transport: asyncio.WriteTransport | None
    """aiosmtpd declares a BaseTransport; a stream server's connection (plain or after
    STARTTLS) is always written to, and the idle timeout writes its 421 on it directly."""

    def __init__(self, handler: Any, **kwargs: Any) -> None:
        self.guard: Guard = handler.guard
        # +1: aiosmtpd counts the transparent dot of a stuffed line (RFC 5321 4.5.3.1.6)
        self.line_length_limit = self.guard.config.limits.max_line_length + 1
        super().__init__(handler, **kwargs)
        self._counted_ip: str | None = None
        self._refused = False
        self._bad_commands = 0
        self._junk_commands = 0
        self._receiving = False
        self._data_started = self._data_at = self._data_bank = 0.0
        self._auth_request: tuple[str, Any] | None = None
        self._stranger = False
        self._quickack: Any = None

    @property
    def encrypted(self) -> bool:
        return self._tls_protocol is not None or self.guard.config.tls == "implicit"

    def connection_made(self, transport: Any) -> None:
        if self.transport is None and self._original_transport is None:  # not the STARTTLS call
            peer = transport.get_extra_info("peername")
            ip = peer[0] if isinstance(peer, tuple) else ""
            stranger = not self.guard.trusted(ip)
            refusal = self.guard.connections.admit(ip, per_ip=stranger)
            if refusal is not None:
                log.info("connection refused", extra={"client": ip, "reply": refusal})
                self._refused = True
                transport.write(refusal.encode() + b"\r\n")
                transport.close()
                return
            self._counted_ip, self._stranger = ip, stranger
            self.guard.sessions.add(self)
            if QUICKACK is not None and isinstance(peer, tuple):
                self._quickack = transport.get_extra_info("socket")
            super().connection_made(transport)
            if stranger:
                self.guard.stranger_came(self)
            return
        super().connection_made(transport)

    def connection_lost(self, error: Exception | None) -> None:
        if self._refused:
            return
        if self._counted_ip is not None:
            self.guard.connections.release(self._counted_ip)
            self.guard.sessions.discard(self)
            self._counted_ip = None
            if self._stranger:
                self.guard.stranger_left(self)
        super().connection_lost(error)

    def close_if_idle(self) -> None:
        """421 and close if the session waits for a command (its reader waits for bytes
        outside DATA); a command in progress (a look-up, a message being stored) is left
        to finish."""
        transport = self.transport
        if transport is None or transport.is_closing() or self._receiving or \
                getattr(self._reader, "_waiter", None) is None:  # (no public "waiting")
            return
        transport.write(b"421 4.3.2 Service shutting down, closing connection\r\n")
        transport.close()

    def _cb_client_connected(self, reader: asyncio.StreamReader,
                             writer: asyncio.StreamWriter) -> None:
        reader.__class__ = _SessionReader  # the object the protocol feeds, so not a new one
        super()._cb_client_connected(reader, writer)

    def eof_received(self) -> bool:
        """When the client closes its side, what it sent before is still answered, then the
        connection closes (RFC 5321 4.1.1.10: QUIT gets its reply before the close; a client
        may pipeline a whole session, QUIT included, and shut its side). aiosmtpd cancelled
        the session at once: the buffered commands, and a message being stored, got no reply.
        The reader ends the session once nothing answerable is left (``_SessionReader``), so a
        half-closed client's slot is not held for ``command_timeout`` (500 connect-and-close
        clients held every slot of a listener for 5 minutes). TLS cannot stay half-open:
        closed at once."""
        if self.session is None or self.session.ssl is not None or \
                self.guard.config.tls == "implicit":
            super().eof_received()
            return False
        self._reader.feed_eof()
        return True

    async def _handle_client(self) -> None:
        if not await self._pregreeted():
            await super()._handle_client()

    async def _pregreeted(self) -> bool:
        """Postfix postscreen's pregreet test: a client that talks before the greeting is over
        is a bot (or a broken client) and gets 554. Strangers on listeners that do not require
        AUTH get a two-line greeting with a pause after its first line; everyone is checked
        for bytes sent before the greeting."""
        cfg = self.guard.config
        ip = self._counted_ip or ""
        waited = bool(cfg.limits.pregreet_wait and not cfg.require_auth
                      and not self.guard.trusted(ip))
        if waited:
            self._writer.write(f"220-{self.hostname} ESMTP\r\n".encode())
            await asyncio.sleep(cfg.limits.pregreet_wait)
        if not pending_bytes(self._reader):
            return False
        log.info("client talked before the greeting", extra={"client": ip})
        if waited:  # the greeting is ended, then the client's first command refused
            self._writer.write(f"220 {self.hostname} ESMTP\r\n".encode())
        self._writer.write(b"554 5.5.1 Protocol error: talking before the greeting\r\n")
        if self.transport is not None:
            self.transport.close()
        return True

    _deadline = 0.0
    _timer_armed = False

    def _reset_timeout(self, duration: float | None = None) -> None:
        """aiosmtpd's per-command clock, with one timer per connection: aiosmtpd cancels and
        arms a timer for each command line and (here) each DATA packet; this moves a deadline
        and lets the armed timer, when it fires early, set itself again for it. A shorter
        deadline (the DATA clock) re-arms at once."""
        loop = self.loop
        if duration is None and self._stranger and self.guard.connections.stressed:
            duration = min(self._timeout_duration, self.guard.config.limits.stress_timeout)
        self._deadline = deadline = loop.time() + (duration or self._timeout_duration)
        handle = self._timeout_handle
        if handle is not None and self._timer_armed and handle.when() <= deadline and \
                not handle.cancelled():  # (aiosmtpd cancels it when the connection is lost)
            return
        if handle is not None:
            handle.cancel()
        self._timer_armed = True
        self._timeout_handle = loop.call_at(deadline, self._clock_fired)

    def stress(self) -> None:
        """The listener came under stress: an idle connection gets the short timeout now
        (a DATA phase keeps its own clock)."""
        if not self._receiving and self.transport is not None:
            self._reset_timeout()

    def _clock_fired(self) -> None:
        self._timer_armed = False
        if self._deadline - self.loop.time() > 0.001:  # activity since: not idle yet
            self._timer_armed = True
            self._timeout_handle = self.loop.call_at(self._deadline, self._clock_fired)
            return
        self._timeout_cb()

    def _timeout_cb(self) -> None:
        """RFC 5321 4.5.3.2: say 421 before closing an idle (or too slow) connection."""
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(b"421 4.4.2 Data too slow, closing connection\r\n"
                                 if self._receiving else
                                 b"421 4.4.2 Idle too long, closing connection\r\n")
        super()._timeout_cb()

    def data_received(self, data: bytes) -> None:
        if self._receiving:
            self._data_progress(len(data))
            if self._quickack is not None and not data.endswith(b".\r\n"):
                self._ack_now()  # (the reply to a whole message carries its ACK)
        super().data_received(data)

    def _ack_now(self) -> None:
        """A client that writes DATA a line per send without TCP_NODELAY (PHPMailer, PHP's
        mail streams) holds its next lines until this side acknowledges (Nagle); Linux delays
        that ACK by up to 40 ms when it has nothing to send, so every message waited ~45 ms
        (200 PHPMailer messages on one connection: 48.5 ms each, 5.8 with this; docs/
        performance.md). Setting TCP_QUICKACK while an ACK is pending sends it now."""
        try:
            self._quickack.setsockopt(socket.IPPROTO_TCP, QUICKACK, 1)
        except (OSError, AttributeError):  # not a TCP socket after all: stop trying
            self._quickack = None

    def _data_progress(self, size: int) -> None:
        """The DATA clock (Postfix's smtpd_min_data_rate, plus a total deadline): each packet
        buys ``size / min_data_rate`` seconds, banked up to ``command_timeout``; the connection
        is cut when the bank or ``data_deadline`` runs out. aiosmtpd's own timeout is per
        command, so without this a client sending a byte a second was never cut."""
        limits = self.guard.config.limits
        now = self.loop.time()
        if limits.min_data_rate:
            self._data_bank = min(limits.command_timeout, self._data_bank
                                  - (now - self._data_at) + size / limits.min_data_rate)
        else:
            self._data_bank = limits.command_timeout
        self._data_at = now
        left = min(self._data_bank, self._data_started + limits.data_deadline - now)
        if left <= 0:
            log.info("DATA too slow", extra={"client": self._counted_ip})
            self._timeout_cb()
        else:
            self._reset_timeout(left)

    async def smtp_DATA(self, arg: str) -> None:
        self._data_started = self._data_at = self.loop.time()
        self._data_bank = self.guard.config.limits.command_timeout
        self._receiving = True
        try:
            await super().smtp_DATA(arg)
        finally:
            self._receiving = False

    async def _call_handler_hook(self, command: str, *args: Any) -> Any:
        """aiosmtpd's, inlined (one coroutine less for each MAIL, RCPT and DATA)."""
        if command == "DATA":  # the message is read: the DATA clock stops while it is stored
            self._receiving = False
            self._reset_timeout()
        hook = self._handle_hooks.get(command)
        if hook is None:
            return MISSING
        status = await hook(self, self.session, self.envelope, *args)
        if command == "DATA" and isinstance(status, str) and status.startswith("250"):
            self._junk_commands = 0  # a message accepted: the count starts again (Postfix's)
        return status

    async def push(self, status: str | bytes) -> None:
        text = status if isinstance(status, str) else status.decode("utf-8", "replace")
        if not text.isprintable():  # aiosmtpd echoes an unknown command as sent: NUL, ESC,
            # a bare CR went back to the client (a reply is printable text, RFC 5321 4.2)
            text = "".join(c if c.isprintable() else "?" for c in text)
        if not text.isascii():  # RFC 5321 4.2: US-ASCII; a refusal quoting a class header or
            # a suppression reason in UTF-8 went to clients that never said SMTPUTF8
            text = text.encode("ascii", "backslashreplace").decode("ascii")
        text = with_enhanced(text)
        if len(text) > _REPLY_LINE:  # a refusal quoting the client (an unknown parameter or
            # command, a class header) was as long as what it quoted
            text = text[:_REPLY_LINE - 3] + "..."
        await super().push(text)
        code = text[:3]
        if code in _BAD_COMMAND:
            await self._bad_command()
        elif code == "550" and text == RELAY_DENIED:  # work for nothing, as NOOP is
            await self._junk_command()

    async def _junk_command(self) -> None:
        """One more command that does no work (``limits.max_junk_commands``)."""
        self._junk_commands += 1
        if self._junk_commands > self.guard.config.limits.max_junk_commands:
            await self._bad_command()

    @syntax("NOOP [ignored]")
    async def smtp_NOOP(self, arg: str) -> None:
        await super().smtp_NOOP(arg)
        await self._junk_command()

    @syntax("RSET")
    async def smtp_RSET(self, arg: str) -> None:
        await super().smtp_RSET(arg)
        await self._junk_command()

    @syntax("EXPN <address>")
    async def smtp_EXPN(self, arg: str) -> None:
        await super().smtp_EXPN(arg)
        await self._junk_command()

    @syntax("HELP [command]")
    async def smtp_HELP(self, arg: str) -> None:
        await super().smtp_HELP(arg)
        await self._junk_command()

    async def _bad_command(self) -> None:
        self._bad_commands += 1
        if self._bad_commands >= self.guard.config.limits.max_bad_commands and \
                self.transport is not None:
            log.info("too many bad commands", extra={"client": self._counted_ip})
            await super().push("421 4.7.0 Too many errors, closing connection")
            self.transport.close()

    @property
    def _starttls_offered(self) -> bool:
        """HELP lists STARTTLS only where EHLO offers it (not inside TLS)."""
        return self.tls_context is not None and not self.encrypted

    @property
    def _auth_offered(self) -> bool:
        """HELP lists AUTH only where EHLO offers it (users to check, TLS if required)."""
        return self.guard.auth is not None and (self.encrypted or not self._auth_require_tls)

    @syntax("STARTTLS", when="_starttls_offered")
    async def smtp_STARTTLS(self, arg: str) -> None:
        """503 inside TLS (aiosmtpd answered 220 and failed with a TypeError), and one log line
        for a failed handshake instead of aiosmtpd's traceback at ERROR.

        A handshake cut short without an error (the idle timeout closing a client that never
        finished it, a clean close mid-handshake) ends too: asyncio then wakes aiosmtpd as if
        the handshake had succeeded but never tells the session the connection is lost, and
        the session waited for commands for ever, holding its connection slot."""
        if self.encrypted:
            await self.push("503 5.5.1 TLS already active")
            return
        if self.tls_context is None:  # tls = "none": not offered, so not implemented here;
            # aiosmtpd's 454 returned as from a handshake cut short, and the session was closed
            await self.push("502 5.5.1 Error: command not implemented")
            return
        if arg:  # aiosmtpd answers 501 and returns: taken below for a handshake cut short,
            # and the connection was closed after the 501 (a retried STARTTLS got nothing)
            await self.push("501 5.5.4 Syntax: STARTTLS")
            return
        try:
            await super().smtp_STARTTLS(arg)
        except TLSSetupException as exc:
            cause = exc.__cause__ or exc  # (an SSLEOFError or a reset may say nothing)
            why = (str(cause) or f"{type(cause).__name__} (the client closed the connection)")[:200]
        else:
            if self.session is not None and self.session.ssl is not None:
                return  # connection_made() of the TLS layer made the new session
            why = "connection closed or timed out during the handshake"
        log.info("TLS handshake failed: %s", why, extra={"client": self._counted_ip})
        if self.transport is not None:
            self.transport.close()
        self.connection_lost(None)

    @syntax("AUTH <mechanism>", when="_auth_offered")
    async def smtp_AUTH(self, arg: str) -> None:
        if self.guard.auth is None:
            await self.push("502 5.5.1 AUTH not available on this server")
            return
        if self.envelope is not None and self.envelope.mail_from:
            # RFC 4954 4: 503 inside a transaction. aiosmtpd took it, and the MAIL it followed
            # (checked with no user: no sender-domain check) went out under the user's name
            await self.push("503 5.5.1 AUTH not permitted during a mail transaction")
            return
        if arg:  # the mechanism in any case ("auth plain ..."), as Cyrus and Dovecot take it:
            # aiosmtpd looked it up as sent and answered 504 to all but upper case
            mechanism, sep, rest = arg.partition(" ")
            arg = mechanism.upper() + sep + rest
        before = self._bad_commands
        await super().smtp_AUTH(arg)
        if self.session is not None and not self.session.authenticated and \
                self._bad_commands == before:  # a refused AUTH (454 ...) is a bad command too
            await self._bad_command()

    def _authenticate(self, mechanism: str, auth_data: Any) -> AuthResult:
        """aiosmtpd calls this synchronously: note the credentials; ``_checked`` checks them."""
        self._auth_request = (mechanism, auth_data)
        return AuthResult(success=False, handled=True)

    async def _checked(self, result: AuthResult) -> AuthResult:
        request, self._auth_request = self._auth_request, None
        auth = self.guard.auth
        if request is None or auth is None:
            return result
        return await auth.authenticate(self._counted_ip or "", *request)

    async def challenge_auth(self, challenge: str | bytes, encode_to_b64: bool = True,
                             log_client_response: bool = False) -> Any:
        """aiosmtpd's (334, then the client's base64 line; ``*`` cancels), reading the line to
        its end whatever its length. aiosmtpd's ``readline`` raised ValueError past the
        reader's limit: a traceback at ERROR per response (a client wrote the log at will), a
        reply in Python's words, and the rest of the line read as a command. Such a line gets
        RFC 4954 6's ``500 5.5.6``."""
        data = challenge.encode() if isinstance(challenge, str) else challenge
        await self.push(b"334 " + (b64encode(data) if encode_to_b64 else data))
        reader, too_long = self._reader, False
        while True:
            try:
                line = await reader.readuntil(b"\n")
                break
            except asyncio.LimitOverrunError as exc:  # skipped to the line's end
                too_long = True
                await reader.read(exc.consumed)
        if too_long:
            await self.push("500 5.5.6 Authentication Exchange line is too long")
            return MISSING
        blob = line.strip()
        if blob == b"*":
            await self.push("501 5.7.0 Auth aborted")
            return MISSING
        try:
            return b64decode(blob, validate=True)
        except ValueError:  # binascii.Error
            await self.push("501 5.5.2 Can't decode base64")
            return MISSING

    async def auth_PLAIN(self, _: Any, args: list[str]) -> AuthResult:
        """aiosmtpd's, refusing an authorization identity other than the user's own (RFC 4616
        2: there is no proxy authorization here; aiosmtpd ignored it, ``x\0app\0pw`` logged
        in as app)."""
        if len(args) == 1:
            blob = await self.challenge_auth("")
            if blob is MISSING:
                return AuthResult(success=False)
        else:
            try:
                blob = b64decode(args[1].encode(), validate=True)
            except ValueError:
                await self.push("501 5.5.2 Can't decode base64")
                return AuthResult(success=False, handled=True)
        parts = blob.split(b"\0")
        if len(parts) != 3:
            await self.push("501 5.5.2 Can't split auth value")
            return AuthResult(success=False, handled=True)
        authzid, login, password = parts
        if authzid and authzid != login:
            await self.push("535 5.7.8 Authentication credentials invalid (no proxy"
                            " authorization: leave the authorization identity empty)")
            return AuthResult(success=False, handled=True)
        return await self._checked(self._authenticate("PLAIN", LoginPassword(login, password)))

    async def auth_LOGIN(self, _: Any, args: list[str]) -> AuthResult:
        return await self._checked(await super().auth_LOGIN(_, args))
