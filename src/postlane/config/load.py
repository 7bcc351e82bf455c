"""Load and check a TOML config, reporting every error with the path of the field it is about."""

from __future__ import annotations

import tomllib
from pathlib import Path

from pydantic import ValidationError

from .model import Config


class ConfigError(Exception):
    """A config file that cannot run; ``errors`` lists ``path: message`` lines, one per problem."""

    def __init__(self, source: str, errors: list[str]) -> None:
        super().__init__(f"{source}: {len(errors)} error(s)\n" + "\n".join(errors))
        self.source = source
        self.errors = errors


def _path(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out or "(top level)"


def _message(err: dict) -> str:
    msg = str(err.get("msg", "invalid"))
    msg = msg.removeprefix("Value error, ")
    if err.get("type") == "extra_forbidden":
        return "unknown field"
    if err.get("type") == "missing":
        return "required field is missing"
    return msg


def _cross_checks(cfg: Config) -> list[str]:
    """Checks that span sections (a class names a pool that exists, ...)."""
    errors: list[str] = []
    for name, cls in cfg.classes.items():
        if cls.pool not in cfg.pools:
            errors.append(f"classes.{name}.pool: no pool named {cls.pool!r}"
                          f" (pools: {', '.join(sorted(cfg.pools))})")
    for name, lst in cfg.listeners.items():
        if lst.default_class and lst.default_class not in cfg.classes:
            errors.append(f"listeners.{name}.default_class: no class named {lst.default_class!r}")
    if cfg.default_class and cfg.default_class not in cfg.classes:
        errors.append(f"default_class: no class named {cfg.default_class!r}")
    seen: dict[str, str] = {}
    for pname, pool in cfg.pools.items():
        for i, ip in enumerate(pool.ips):
            if ip.address in seen:
                errors.append(f"pools.{pname}.ips[{i}].address: {ip.address} already belongs to"
                          f" pool {seen[ip.address]!r} (an IP serves one pool)")
            seen[ip.address] = pname
    for domain, target in cfg.routes.items():
        host, _, port = target.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            errors.append(f"routes.{domain}: {target!r} is not host:port")
    return errors


def _security_checks(cfg: Config, base: Path | None) -> list[str]:
    """Resolve the security section's relative paths against ``base`` (the config file's folder;
    None when parsing text) and check the TLS files and the users file that absolute paths name."""
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


def parse_config(text: str, source: str = "<config>") -> Config:
    """Parse TOML text into a Config, raising ConfigError with every problem found."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(source, [f"not valid TOML: {exc}"]) from None
    try:
        cfg = Config.model_validate(data)
    except ValidationError as exc:
        errors = [f"{_path(e['loc'])}: {_message(e)}" for e in exc.errors()]
        raise ConfigError(source, errors) from None
    errors = _cross_checks(cfg) + _security_checks(cfg, None)
    if errors:
        raise ConfigError(source, errors)
    return cfg


def load_config(path: str | Path) -> Config:
    """Read a config file; relative paths inside it are taken relative to the file's folder."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(str(path), [f"cannot read: {exc.strerror}"]) from None
    cfg = parse_config(text, str(path))
    base = path.resolve().parent
    if not Path(cfg.node.spool).is_absolute():
        cfg.node.spool = str(base / cfg.node.spool)
    if not Path(cfg.accounting.directory).is_absolute():
        cfg.accounting.directory = str(base / cfg.accounting.directory)
    errors = _security_checks(cfg, base)
    if errors:
        raise ConfigError(str(path), errors)
    return cfg
