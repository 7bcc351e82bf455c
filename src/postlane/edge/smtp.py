"""The SMTP intake listener, on aiosmtpd.

aiosmtpd does the protocol; this module adds what an MTA's edge needs on top: DSN parameters
(RFC 3461 ENVID/RET/NOTIFY/ORCPT, which aiosmtpd would refuse), enhanced status codes, the relay
check, recipient limits, a 421 while the node drains, and a 250 only once the spool has the
message on disk. TLS, AUTH and the intake limits are configured per listener (``security.py`` in
config, ``auth.py`` and ``limits.py`` here).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import re
import ssl

from aiosmtpd.smtp import SMTP, Envelope, Session

from ..config import ListenerConfig
from ..policy.intake import Intake, RcptIn, Rejection
from .limits import ConnectionLimits, RateLimiter

log = logging.getLogger("postlane.edge")
# aiosmtpd logs AUTH challenge responses (base64 user names and passwords) at DEBUG and every
# command line (addresses) at INFO: secrets never reach a log, whatever level the operator runs
# at, and a campaign does not cost a log line per SMTP command. Postlane logs what matters itself.
logging.getLogger("mail.log").setLevel(logging.WARNING)

_MAIL_DSN = {"ENVID", "RET"}
_RCPT_DSN = {"NOTIFY", "ORCPT"}
_XCHAR = r"[\x21-\x2a\x2c-\x3c\x3e-\x7e]*"
_XTEXT = re.compile(rf"^{_XCHAR}(\+[0-9A-F]{{2}}{_XCHAR})*$")
# Enhanced codes (RFC 3463) for aiosmtpd's own error replies, which carry none.
_ENHANCED = {421: "4.3.0", 450: "4.2.0", 451: "4.3.0", 452: "4.3.1", 500: "5.5.2",
             501: "5.5.4", 502: "5.5.1", 503: "5.5.1", 504: "5.5.4", 530: "5.7.0",
             550: "5.0.0", 552: "5.3.4", 554: "5.7.0"}
_HAS_ENHANCED = re.compile(r"^\d{3}[ -][245]\.\d{1,3}\.\d{1,3}(\s|$)")
_BAD_COMMAND = {500, 501, 502, 503, 504, 535, 538}
_ADDR = re.compile(r"^[^\s@<>()\[\],;:\"\\]+(\.[^\s@<>()\[\],;:\"\\]+)*@[A-Za-z0-9\-._\[\]:]+$|"
                   r"^\"[^\"\r\n]*\"@[A-Za-z0-9\-._\[\]:]+$")


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _valid_address(address: str) -> bool:
    """Syntax, no control characters, and valid UTF-8: aiosmtpd hands undecodable bytes over as
    surrogates, which could never be written out again by the relay."""
    if not _ADDR.match(address) or _CONTROL.search(address):
        return False
    try:
        address.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _split_params(arg: str, keyword: str) -> tuple[str, str, dict[str, str]] | None:
    """``FROM:<a@b> K=V ...`` -> (path, other params, DSN params); None if malformed."""
    body = arg[len(keyword):].lstrip() if arg.upper().startswith(keyword) else None
    if body is None:
        return None
    if body.startswith("<"):
        end = body.find(">")
        if end < 0:
            return None
        path, rest = body[: end + 1], body[end + 1:]
    else:
        path, _, rest = body.partition(" ")
    keep, dsn = [], {}
    for param in rest.split():
        key, _, value = param.partition("=")
        if key.upper() in _MAIL_DSN | _RCPT_DSN:
            dsn[key.upper()] = value
        else:
            keep.append(param)
    return path, " ".join(keep), dsn


def _with_enhanced(reply: str) -> str:
    """``500 Error: bad syntax`` -> ``500 5.5.2 Error: bad syntax``; 2xx/3xx untouched except
    aiosmtpd's bare ``250 OK`` and ``221 Bye``."""
    if reply in ("250 OK", "221 Bye"):
        return f"{reply[:3]} 2.0.0 {reply[4:]}"
    code = int(reply[:3]) if reply[:3].isdigit() else 0
    enhanced = "5.5.1" if code == 500 and "not recognized" in reply else _ENHANCED.get(code)
    if enhanced is None or _HAS_ENHANCED.match(reply):
        return reply
    return f"{reply[:4]}{enhanced} {reply[4:]}"


class EdgeSMTP(SMTP):
    """aiosmtpd's SMTP with DSN parameters, 501 for malformed addresses, drain handling and the
    per-connection limits (connection caps, idle timeout with 421, bad-command count)."""

    def __init__(self, handler: SMTPIntake, **kwargs) -> None:
        # +1: aiosmtpd counts the transparent dot of a stuffed line (RFC 5321 4.5.3.1.6)
        self.line_length_limit = handler.config.limits.max_line_length + 1
        super().__init__(handler, **kwargs)
        self.intake_handler = handler
        self.dsn_params: dict[str, str] = {}
        self._counted_ip: str | None = None
        self._refused = False
        self._bad_commands = 0
        self._receiving = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self.transport is None and self._original_transport is None:  # not the STARTTLS call
            peer = transport.get_extra_info("peername")
            ip = peer[0] if isinstance(peer, tuple) else ""
            refusal = self.intake_handler.connections.admit(ip)
            if refusal is not None:
                log.info("connection refused", extra={"client": ip, "reply": refusal})
                self._refused = True
                transport.write(refusal.encode() + b"\r\n")  # type: ignore[attr-defined]
                transport.close()
                return
            self._counted_ip = ip
        super().connection_made(transport)

    def connection_lost(self, error: Exception | None) -> None:
        if self._refused:
            return
        if self._counted_ip is not None:
            self.intake_handler.connections.release(self._counted_ip)
            self._counted_ip = None
        super().connection_lost(error)

    def _timeout_cb(self) -> None:
        """RFC 5321 4.5.3.2: say 421 before closing an idle connection."""
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(b"421 4.4.2 Idle too long, closing connection\r\n")
        super()._timeout_cb()

    async def push(self, status: str | bytes) -> None:
        text = status if isinstance(status, str) else status.decode("utf-8", "replace")
        text = _with_enhanced(text)
        await super().push(text)
        if text[:3].isdigit() and int(text[:3]) in _BAD_COMMAND:
            self._bad_commands += 1
            limit = self.intake_handler.config.limits.max_bad_commands
            if self._bad_commands >= limit and self.transport is not None:
                log.info("too many bad commands", extra={"client": self._counted_ip})
                await super().push("421 4.7.0 Too many errors, closing connection")
                self.transport.close()

    async def smtp_AUTH(self, arg: str) -> None:
        if self.intake_handler.intake.users is None:
            await self.push("502 5.5.1 AUTH not available on this server")
            return
        await super().smtp_AUTH(arg)

    async def _refuse_if_draining(self) -> bool:
        if self.intake_handler.draining:
            await self.push("421 4.3.2 Service shutting down, try again later")
            if self.transport is not None:
                self.transport.close()
            return True
        return False

    async def smtp_MAIL(self, arg: str | None) -> None:
        if await self._refuse_if_draining():
            return
        parts = _split_params(arg or "", "FROM:")
        self.dsn_params = {}
        if parts is not None and self.session is not None and self.session.extended_smtp:
            path, others, dsn = parts
            ret = dsn.get("RET")
            if ret is not None and ret.upper() not in ("FULL", "HDRS"):
                await self.push("501 5.5.4 RET must be FULL or HDRS")
                return
            envid = dsn.get("ENVID")
            if envid is not None and (not _XTEXT.match(envid) or len(envid) > 100):
                await self.push("501 5.5.4 ENVID is not valid xtext")
                return
            self.dsn_params = dsn
            arg = f"FROM:{path} {others}".rstrip()
        await super().smtp_MAIL(arg)

    async def smtp_RCPT(self, arg: str | None) -> None:
        if await self._refuse_if_draining():
            return
        parts = _split_params(arg or "", "TO:")
        self.dsn_params = {}
        if parts is not None:
            path, others, dsn = parts
            address = path.strip("<>")
            if path and (not _valid_address(address) or len(address) > 254):
                await self.push("501 5.1.3 Bad recipient address syntax")
                return
            notify = dsn.get("NOTIFY", "").upper()
            if notify:
                words = set(notify.split(","))
                if not words <= {"NEVER", "SUCCESS", "FAILURE", "DELAY"} or (
                        "NEVER" in words and len(words) > 1):
                    await self.push("501 5.5.4 NOTIFY must be NEVER or SUCCESS,FAILURE,DELAY")
                    return
            self.dsn_params = dsn
            if self.session is not None and self.session.extended_smtp:
                arg = f"TO:{path} {others}".rstrip()
        await super().smtp_RCPT(arg)

    async def smtp_DATA(self, arg: str) -> None:
        if await self._refuse_if_draining():
            return
        self._receiving = True
        try:
            await super().smtp_DATA(arg)
        finally:
            self._receiving = False

    def data_received(self, data: bytes) -> None:
        # aiosmtpd arms its timeout per command only, so a large message on a slow link would be
        # cut after command_timeout in total; while DATA flows, the timeout means idle time.
        if self._receiving:
            self._reset_timeout()
        super().data_received(data)


class SMTPIntake:
    """aiosmtpd handler of one listener."""

    def __init__(self, name: str, config: ListenerConfig, intake: Intake) -> None:
        self.name = name
        self.config = config
        self.intake = intake
        self.draining = False
        self.relay_nets = [ipaddress.ip_network(n, strict=False) for n in config.relay_from]
        self.connections = ConnectionLimits(config.limits.max_connections,
                                            config.limits.max_connections_per_ip)
        self.rate = RateLimiter(config.limits.messages_per_minute)

    async def handle_EHLO(self, server: SMTP, session: Session, envelope: Envelope,
                          hostname: str, responses: list[str]) -> list[str]:
        session.host_name = hostname
        if self.intake.users is None:
            responses = [r for r in responses if not r.startswith("250-AUTH")]
        extra = ["250-PIPELINING", "250-ENHANCEDSTATUSCODES", "250-DSN"]
        return responses[:-1] + extra + responses[-1:]

    async def handle_MAIL(self, server: EdgeSMTP, session: Session, envelope: Envelope,
                          address: str, mail_options: list[str]) -> str:
        if address == "<>":  # aiosmtpd's spelling of the null reverse-path
            address = ""
        if address and not _valid_address(address):
            return "501 5.1.7 Bad sender address syntax"
        user = self._user(session)
        if self.config.require_auth and user is None:
            return "530 5.7.0 Authentication required"
        if not self.intake.disk.ok():
            return f"452 {self.intake.disk.TEXT}"
        if user is not None and not user.may_send_from(address):
            log.warning("sender domain refused", extra={"user": user.name, "from": address})
            return f"550 5.7.1 User {user.name!r} may not send from {address or '<>'!r}"
        if not self.rate.allow(user.name if user is not None else _peer_ip(session)):
            return "450 4.7.1 Too many messages, slow down and try again later"
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        envelope.dsn_mail = dict(server.dsn_params)  # type: ignore[attr-defined]
        envelope.rcpt_dsn = []  # type: ignore[attr-defined]
        return "250 2.1.0 Sender ok"

    def _user(self, session: Session):
        if not session.authenticated or self.intake.users is None:
            return None
        return self.intake.users.get(str(session.auth_data))

    def _may_relay(self, session: Session) -> bool:
        """Only an authenticated user, or (unless the listener requires AUTH) a client in
        ``relay_from``, may relay: there is no other way to get a recipient accepted."""
        if self._user(session) is not None:
            return True
        if self.config.require_auth:
            return False
        try:
            ip = ipaddress.ip_address(_peer_ip(session))
        except ValueError:
            return False
        return any(ip in net for net in self.relay_nets)

    async def handle_RCPT(self, server: EdgeSMTP, session: Session, envelope: Envelope,
                          address: str, rcpt_options: list[str]) -> str:
        if not self._may_relay(session):
            return "550 5.7.1 Relaying denied: authenticate first"
        if not self.intake.disk.ok():
            return f"452 {self.intake.disk.TEXT}"
        if len(envelope.rcpt_tos) >= self.config.max_recipients:
            return "452 4.5.3 Too many recipients"
        if "@" not in address:
            return "501 5.1.3 Recipient needs a domain"
        envelope.rcpt_tos.append(address)
        envelope.rcpt_dsn.append(dict(server.dsn_params))  # type: ignore[attr-defined]
        return "250 2.1.5 Recipient ok"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        dsn = getattr(envelope, "dsn_mail", {})
        rcpt_dsn = getattr(envelope, "rcpt_dsn", [])
        rcpts = []
        for i, addr in enumerate(envelope.rcpt_tos):
            params = rcpt_dsn[i] if i < len(rcpt_dsn) else {}
            rcpts.append(RcptIn(addr, params.get("NOTIFY", "").upper(), params.get("ORCPT", "")))
        peer = _peer_ip(session)
        try:
            qid = await self.intake.submit(
                envelope.mail_from or "", rcpts, envelope.original_content or b"",
                envid=dsn.get("ENVID", ""), ret=dsn.get("RET", "").upper(), listener=self.name,
                client_ip=peer, client_name=session.host_name or "",
                auth_user=str(session.auth_data) if self._user(session) else "",
                default_class=self.config.default_class)
        except Rejection as exc:
            return exc.reply
        except Exception:  # never 250 what is not on disk
            log.exception("intake failed")
            return "451 4.3.0 Temporary failure storing the message, try again"
        return f"250 2.0.0 Ok: queued as {qid}"


def _peer_ip(session: Session) -> str:
    return session.peer[0] if isinstance(session.peer, tuple) else ""


def server_tls_context(cert: str, key: str) -> ssl.SSLContext:
    """TLS 1.2+ server context from PEM files (clients are not asked for certificates)."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert, key)
    return ctx


class Listener:
    """One bound intake socket."""

    def __init__(self, name: str, config: ListenerConfig, intake: Intake, hostname: str) -> None:
        self.name = name
        self.config = config
        self.handler = SMTPIntake(name, config, intake)
        self.hostname = hostname
        self.server: asyncio.Server | None = None

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        cfg = self.config
        ctx = server_tls_context(cfg.tls_cert, cfg.tls_key) if cfg.tls != "none" else None
        users = self.handler.intake.users

        def factory() -> EdgeSMTP:
            return EdgeSMTP(self.handler, data_size_limit=cfg.max_message_size,
                            enable_SMTPUTF8=True, decode_data=False, hostname=self.hostname,
                            ident="Postlane ESMTP", timeout=cfg.limits.command_timeout,
                            tls_context=ctx if cfg.tls == "starttls" else None,
                            authenticator=users.authenticator if users else None,
                            # an implicit-TLS socket is encrypted though aiosmtpd cannot tell
                            auth_require_tls=cfg.tls != "implicit", loop=loop)

        self.server = await loop.create_server(
            factory, cfg.address, cfg.port, reuse_address=True,
            ssl=ctx if cfg.tls == "implicit" else None)

    @property
    def port(self) -> int:
        assert self.server is not None
        return self.server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        self.handler.draining = True
        if self.server is not None:
            self.server.close()
