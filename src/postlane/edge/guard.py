"""The security layer of an SMTP listener: who may relay, TLS and AUTH, and the limits.

``Guard`` holds one listener's security state and answers the questions the SMTP handler asks
at MAIL and RCPT; ``GuardedSMTP`` is aiosmtpd's protocol with the per-connection limits. Kept
apart from ``smtp.py`` (the MTA's own protocol extensions) so each reads as one concern.
"""

from __future__ import annotations

import ipaddress
import logging
import re
import ssl
from typing import TYPE_CHECKING, Any

from aiosmtpd.smtp import SMTP, Session

from ..config import ListenerConfig
from .auth import User
from .limits import ConnectionLimits, RateLimiter

if TYPE_CHECKING:
    from ..policy.intake import Intake

log = logging.getLogger("postlane.edge")
# aiosmtpd logs AUTH challenge responses (base64 user names and passwords) at DEBUG and every
# command line (addresses) at INFO: secrets never reach a log, whatever level the operator runs
# at, and a campaign does not cost a log line per SMTP command. Postlane logs what matters itself.
logging.getLogger("mail.log").setLevel(logging.WARNING)

# Enhanced codes (RFC 3463) for aiosmtpd's own error replies, which carry none.
_ENHANCED = {421: "4.3.0", 450: "4.2.0", 451: "4.3.0", 452: "4.3.1", 500: "5.5.2",
             501: "5.5.4", 502: "5.5.1", 503: "5.5.1", 504: "5.5.4", 530: "5.7.0",
             550: "5.0.0", 552: "5.3.4", 554: "5.7.0"}
_HAS_ENHANCED = re.compile(r"^\d{3}[ -][245]\.\d{1,3}\.\d{1,3}(\s|$)")
# 503 (bad sequence) is left out: a pipelining client whose MAIL was refused gets one for every
# RCPT and DATA that follows, through no fault of its own.
_BAD_COMMAND = {500, 501, 502, 504, 535, 538}


def with_enhanced(reply: str) -> str:
    """``500 Error: bad syntax`` -> ``500 5.5.2 Error: bad syntax``; 2xx/3xx untouched except
    aiosmtpd's bare ``250 OK`` and ``221 Bye``."""
    if reply in ("250 OK", "221 Bye"):
        return f"{reply[:3]} 2.0.0 {reply[4:]}"
    code = int(reply[:3]) if reply[:3].isdigit() else 0
    enhanced = "5.5.1" if code == 500 and "not recognized" in reply else _ENHANCED.get(code)
    if enhanced is None or _HAS_ENHANCED.match(reply):
        return reply
    return f"{reply[:4]}{enhanced} {reply[4:]}"


def peer_ip(session: Session) -> str:
    return session.peer[0] if isinstance(session.peer, tuple) else ""


def server_tls_context(cert: str, key: str) -> ssl.SSLContext:
    """TLS 1.2+ server context from PEM files (clients are not asked for certificates)."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert, key)
    return ctx


class Guard:
    """One listener's security state: relay networks, connection counts, message rates, TLS."""

    def __init__(self, config: ListenerConfig, intake: Intake) -> None:
        self.config = config
        self.intake = intake
        self.relay_nets = [ipaddress.ip_network(n, strict=False) for n in config.relay_from]
        self._relay_ips: dict[str, bool] = {}
        self.connections = ConnectionLimits(config.limits.max_connections,
                                            config.limits.max_connections_per_ip)
        self.rate = RateLimiter(config.limits.messages_per_minute)
        self.tls = (server_tls_context(config.tls_cert, config.tls_key)
                    if config.tls != "none" and config.tls_cert and config.tls_key else None)

    def smtp_options(self) -> dict[str, Any]:
        """Keyword arguments for aiosmtpd's SMTP: TLS, AUTH and the idle timeout."""
        users = self.intake.users
        return {"timeout": self.config.limits.command_timeout,
                "tls_context": self.tls if self.config.tls == "starttls" else None,
                "authenticator": users.authenticator if users else None,
                # an implicit-TLS socket is encrypted though aiosmtpd cannot tell
                "auth_require_tls": self.config.tls != "implicit"}

    @property
    def server_ssl(self) -> ssl.SSLContext | None:
        """The context for the listening socket itself (implicit TLS only)."""
        return self.tls if self.config.tls == "implicit" else None

    def ehlo(self, responses: list[str]) -> list[str]:
        """No AUTH keyword without users to check it against."""
        if self.intake.users is None:
            return [r for r in responses if not r.startswith("250-AUTH")]
        return responses

    def user(self, session: Session) -> User | None:
        if not session.authenticated or self.intake.users is None:
            return None
        return self.intake.users.get(str(session.auth_data))

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

    def check_mail(self, session: Session, address: str) -> str | None:
        """The refusal of a MAIL command, or None to go on."""
        user = self.user(session)
        if self.config.require_auth and user is None:
            return "530 5.7.0 Authentication required"
        if not self.intake.disk.ok():
            return self.intake.disk.refusal()
        if user is not None and not user.may_send_from(address):
            log.warning("sender domain refused", extra={"user": user.name, "from": address})
            return f"550 5.7.1 User {user.name!r} may not send from {address or '<>'!r}"
        key = user.name if user is not None else peer_ip(session)
        if (user is not None or not self.trusted(key)) and not self.rate.allow(key):
            return "450 4.7.1 Too many messages, slow down and try again later"
        return None

    def check_rcpt(self, session: Session) -> str | None:
        """The refusal of a RCPT command, or None to go on."""
        if not self.may_relay(session):
            return "550 5.7.1 Relaying denied: authenticate first"
        if not self.intake.disk.ok():
            return self.intake.disk.refusal()
        return None


class GuardedSMTP(SMTP):
    """aiosmtpd's SMTP with the per-connection limits: connection caps, line length, idle
    timeout (with a 421, and counting DATA as activity), bad-command count, enhanced codes on
    aiosmtpd's own replies. The handler must have a ``guard``."""

    def __init__(self, handler: Any, **kwargs: Any) -> None:
        self.guard: Guard = handler.guard
        # +1: aiosmtpd counts the transparent dot of a stuffed line (RFC 5321 4.5.3.1.6)
        self.line_length_limit = self.guard.config.limits.max_line_length + 1
        super().__init__(handler, **kwargs)
        self._counted_ip: str | None = None
        self._refused = False
        self._bad_commands = 0
        self._receiving = False

    def connection_made(self, transport: Any) -> None:
        if self.transport is None and self._original_transport is None:  # not the STARTTLS call
            peer = transport.get_extra_info("peername")
            ip = peer[0] if isinstance(peer, tuple) else ""
            refusal = self.guard.connections.admit(ip, per_ip=not self.guard.trusted(ip))
            if refusal is not None:
                log.info("connection refused", extra={"client": ip, "reply": refusal})
                self._refused = True
                transport.write(refusal.encode() + b"\r\n")
                transport.close()
                return
            self._counted_ip = ip
        super().connection_made(transport)

    def connection_lost(self, error: Exception | None) -> None:
        if self._refused:
            return
        if self._counted_ip is not None:
            self.guard.connections.release(self._counted_ip)
            self._counted_ip = None
        super().connection_lost(error)

    def _timeout_cb(self) -> None:
        """RFC 5321 4.5.3.2: say 421 before closing an idle connection."""
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(b"421 4.4.2 Idle too long, closing connection\r\n")
        super()._timeout_cb()

    def data_received(self, data: bytes) -> None:
        # aiosmtpd arms its timeout per command only, so a large message on a slow link would be
        # cut after command_timeout in total; while DATA flows, the timeout means idle time.
        if self._receiving:
            self._reset_timeout()
        super().data_received(data)

    async def smtp_DATA(self, arg: str) -> None:
        self._receiving = True
        try:
            await super().smtp_DATA(arg)
        finally:
            self._receiving = False

    async def push(self, status: str | bytes) -> None:
        text = status if isinstance(status, str) else status.decode("utf-8", "replace")
        text = with_enhanced(text)
        await super().push(text)
        if text[:3].isdigit() and int(text[:3]) in _BAD_COMMAND:
            self._bad_commands += 1
            if (self._bad_commands >= self.guard.config.limits.max_bad_commands
                    and self.transport is not None):
                log.info("too many bad commands", extra={"client": self._counted_ip})
                await super().push("421 4.7.0 Too many errors, closing connection")
                self.transport.close()

    async def smtp_AUTH(self, arg: str) -> None:
        if self.guard.intake.users is None:
            await self.push("502 5.5.1 AUTH not available on this server")
            return
        await super().smtp_AUTH(arg)
