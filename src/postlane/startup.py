"""Startup validation: reading a config with the checks that need other parts - addresses parsed
the way the edge parses them, the SMTP users file, the DKIM keys. ``config/`` is data and
validation of data and imports none of them; every way to start, reload or check a node reads
its config through here (``load_config``, ``parse_config``)."""

from __future__ import annotations

from pathlib import Path

from .address import PathError, parse_path
from .config import Config, ConfigError
from .config.load import PartChecks, parse_config_text, read_config_file
from .policy.dkim import DKIMError, read_key
from .policy.users import UsersError, load_users

__all__ = ["CHECKS", "ConfigError", "load_config", "parse_config"]


def _mailbox(addr: str) -> bool:
    try:
        return parse_path(f"<{addr}>", utf8=True)[1] == ""
    except PathError:
        return False


def _users_file(path: str, cfg: Config) -> list[str]:
    """The users file loads, and names only classes that exist."""
    try:
        users = load_users(path)
    except UsersError as exc:
        return [f"security.users_file: {e}" for e in exc.errors]
    errors = []
    for uname, user in users.items():
        for cls in [*user.classes, *([user.default_class] if user.default_class else [])]:
            if cls not in cfg.classes:
                errors.append(f"security.users_file: user {uname!r}: no class named {cls!r}")
    return errors


def _dkim_key(path: str, algorithm: str) -> str | None:
    try:
        read_key(path, algorithm)
    except DKIMError as exc:
        return str(exc)
    return None


CHECKS = PartChecks(mailbox=_mailbox, users_file=_users_file, dkim_key=_dkim_key)
"""The checks of a config that need the edge and policy parts."""


def parse_config(text: str, source: str = "<config>") -> Config:
    """Parse TOML text into a Config, raising ConfigError with every problem found."""
    return parse_config_text(text, source, CHECKS)


def load_config(path: str | Path, *, check_files: bool = True) -> Config:
    """Read a config file; relative paths inside it are taken relative to the file's folder.
    ``check_files=False`` resolves the paths without opening the keys and certificates they
    name (``postlane restore`` learns from it where to put them)."""
    return read_config_file(path, CHECKS, check_files=check_files)
