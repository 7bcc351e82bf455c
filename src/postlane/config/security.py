"""Config of intake security: TLS and AUTH per listener, intake limits, the users file, the
free-space floor of the spool. Kept apart from ``model.py`` so the security section reads as one
piece; ``model.py`` imports these classes into ``ListenerConfig`` and ``Config``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field


def _duration(value: object) -> float:
    from .model import parse_duration  # model.py imports this module; resolve at call time

    return parse_duration(value)


def _size(value: object) -> int:
    from .model import parse_size

    return parse_size(value)


Duration = Annotated[float, BeforeValidator(_duration)]
Size = Annotated[int, BeforeValidator(_size)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ListenerLimits(_Strict):
    """Per-listener limits; each refusal carries an RFC 3463 enhanced status code."""

    max_connections: int = Field(500, ge=1)
    """Concurrent connections in total (421 4.7.0 beyond)."""
    max_connections_per_ip: int = Field(50, ge=1)
    """Concurrent connections from one client IP (421 4.7.0 beyond)."""
    max_line_length: int = Field(1000, ge=80, le=1_000_000)
    """Longest DATA line in octets including CRLF (RFC 5321 4.5.3.1.6: 1000); 500 5.5.2."""
    command_timeout: Duration = 300.0
    """Idle time allowed between commands (RFC 5321 4.5.3.2.7: 5 min); 421 4.4.2, then close."""
    max_bad_commands: int = Field(20, ge=1)
    """Syntax errors, unknown commands and failed AUTH before 421 4.7.0 and disconnect
    (Postfix's smtpd_hard_error_limit is 20 too)."""
    messages_per_minute: int = Field(600, ge=0)
    """Messages per minute per AUTH user, else per client IP (0 = unlimited); 450 4.7.1."""


class ListenerSecurity(_Strict):
    """The fields ``ListenerConfig`` inherits: how a listener does TLS and AUTH."""

    tls: Literal["none", "starttls", "implicit"] = "none"
    """``starttls`` offers STARTTLS; ``implicit`` speaks TLS from the first byte (port 465)."""
    tls_cert: str | None = None
    tls_key: str | None = None
    require_auth: bool = False
    """Every client must authenticate; ``relay_from`` no longer lets anyone relay."""
    limits: ListenerLimits = ListenerLimits()


class SecurityConfig(_Strict):
    users_file: str | None = None
    """TOML file of SMTP AUTH users (``postlane users add``); no file, no AUTH."""
    auth_failures_per_minute: int = Field(10, ge=1)
    """Failed AUTH attempts per client IP; beyond, AUTH answers 454 4.7.0 without checking."""
    min_free_space: Size = 256 * 1024 * 1024
    """Below this much free space on the spool's file system intake answers 452 4.3.1."""


def check_security(cfg, base: Path | None) -> list[str]:
    """Resolve relative paths against ``base`` (the config file's folder, None when parsing text)
    and check that the files a listener needs exist and that the users file is valid."""
    from ..edge.auth import UsersError, load_users

    errors: list[str] = []

    def resolve(value: str | None) -> str | None:
        if value is None or base is None or Path(value).is_absolute():
            return value
        return str(base / value)

    sec = cfg.security
    sec.users_file = resolve(sec.users_file)
    for name, lst in cfg.listeners.items():
        lst.tls_cert, lst.tls_key = resolve(lst.tls_cert), resolve(lst.tls_key)
        where = f"listeners.{name}"
        if lst.tls != "none":
            for field in ("tls_cert", "tls_key"):
                path = getattr(lst, field)
                if not path:
                    errors.append(f"{where}.{field}: required when tls = {lst.tls!r}")
                elif Path(path).is_absolute() and not Path(path).is_file():
                    errors.append(f"{where}.{field}: no such file: {path}")
        elif lst.require_auth:
            errors.append(f"{where}.require_auth: AUTH is only offered over TLS;"
                          f" set tls = \"starttls\" or \"implicit\"")
        if lst.require_auth and not sec.users_file:
            errors.append(f"{where}.require_auth: needs security.users_file")
    if sec.users_file and Path(sec.users_file).is_absolute():
        try:
            users = load_users(sec.users_file)
        except UsersError as exc:
            errors.extend(f"security.users_file: {e}" for e in exc.errors)
        else:
            for uname, user in users.items():
                for cls in [*user.classes, *([user.default_class] if user.default_class else [])]:
                    if cls not in cfg.classes:
                        errors.append(f"security.users_file: user {uname!r}: no class named"
                                      f" {cls!r}")
    return errors
