"""Load and check a TOML config, reporting every error with the path of the field it is about."""

from __future__ import annotations

import tomllib
from pathlib import Path

from pydantic import ValidationError

from ..spool import is_dsn
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
    errors = _cross_checks(cfg)
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
    if not is_dsn(cfg.node.spool) and not Path(cfg.node.spool).is_absolute():
        cfg.node.spool = str(base / cfg.node.spool)
    if not Path(cfg.accounting.directory).is_absolute():
        cfg.accounting.directory = str(base / cfg.accounting.directory)
    return cfg
