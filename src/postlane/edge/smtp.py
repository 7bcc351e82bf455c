"""The SMTP intake listener, on aiosmtpd.

aiosmtpd does the protocol; this module adds what an MTA's edge needs on top: DSN parameters
(RFC 3461 ENVID/RET/NOTIFY/ORCPT, which aiosmtpd would refuse), enhanced status codes, the relay
check, recipient limits, a 421 while the node drains, and a 250 only once the spool has the
message on disk. Who may relay, TLS, AUTH and the intake limits are ``guard.py``'s.
"""

from __future__ import annotations

import asyncio
import logging
import re

from aiosmtpd.smtp import SMTP, Envelope, Session

from ..config import ListenerConfig
from ..policy.intake import Intake, RcptIn, Rejection
from .guard import Guard, GuardedSMTP

log = logging.getLogger("postlane.edge")

_MAIL_DSN = {"ENVID", "RET"}
_RCPT_DSN = {"NOTIFY", "ORCPT"}
_XCHAR = r"[\x21-\x2a\x2c-\x3c\x3e-\x7e]*"
_XTEXT = re.compile(rf"^{_XCHAR}(\+[0-9A-F]{{2}}{_XCHAR})*$")
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


class EdgeSMTP(GuardedSMTP):
    """aiosmtpd's SMTP with DSN parameters, 501 for malformed addresses and drain handling."""

    def __init__(self, handler: SMTPIntake, **kwargs) -> None:
        super().__init__(handler, **kwargs)
        self.intake_handler = handler
        self.dsn_params: dict[str, str] = {}

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
        await super().smtp_DATA(arg)


class SMTPIntake:
    """aiosmtpd handler of one listener."""

    def __init__(self, name: str, config: ListenerConfig, intake: Intake) -> None:
        self.name = name
        self.config = config
        self.intake = intake
        self.draining = False
        self.guard = Guard(config, intake)

    async def handle_EHLO(self, server: SMTP, session: Session, envelope: Envelope,
                          hostname: str, responses: list[str]) -> list[str]:
        session.host_name = hostname
        responses = self.guard.ehlo(responses)
        extra = ["250-PIPELINING", "250-ENHANCEDSTATUSCODES", "250-DSN"]
        return responses[:-1] + extra + responses[-1:]

    async def handle_MAIL(self, server: EdgeSMTP, session: Session, envelope: Envelope,
                          address: str, mail_options: list[str]) -> str:
        if address == "<>":  # aiosmtpd's spelling of the null reverse-path
            address = ""
        if address and not _valid_address(address):
            return "501 5.1.7 Bad sender address syntax"
        refusal = self.guard.check_mail(session, address)
        if refusal is not None:
            return refusal
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        envelope.dsn_mail = dict(server.dsn_params)  # type: ignore[attr-defined]
        envelope.rcpt_dsn = []  # type: ignore[attr-defined]
        return "250 2.1.0 Sender ok"

    async def handle_RCPT(self, server: EdgeSMTP, session: Session, envelope: Envelope,
                          address: str, rcpt_options: list[str]) -> str:
        refusal = self.guard.check_rcpt(session)
        if refusal is not None:
            return refusal
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
        peer = session.peer[0] if isinstance(session.peer, tuple) else ""
        try:
            qid = await self.intake.submit(
                envelope.mail_from or "", rcpts, envelope.original_content or b"",
                envid=dsn.get("ENVID", ""), ret=dsn.get("RET", "").upper(), listener=self.name,
                client_ip=peer, client_name=session.host_name or "",
                auth_user=str(session.auth_data) if self.guard.user(session) else "",
                default_class=self.config.default_class)
        except Rejection as exc:
            return exc.reply
        except Exception:  # never 250 what is not on disk
            log.exception("intake failed")
            return "451 4.3.0 Temporary failure storing the message, try again"
        return f"250 2.0.0 Ok: queued as {qid}"


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

        def factory() -> EdgeSMTP:
            return EdgeSMTP(self.handler, data_size_limit=cfg.max_message_size,
                            enable_SMTPUTF8=True, decode_data=False, hostname=self.hostname,
                            ident="Postlane ESMTP", loop=loop,
                            **self.handler.guard.smtp_options())

        self.server = await loop.create_server(factory, cfg.address, cfg.port, reuse_address=True,
                                               ssl=self.handler.guard.server_ssl)

    @property
    def port(self) -> int:
        assert self.server is not None
        return self.server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        self.handler.draining = True
        if self.server is not None:
            self.server.close()
