"""The SMTP users store: who may submit, with which traffic classes and sender domains, and
their salted scrypt password hashes, in a TOML file (``postlane users add`` writes it).

scrypt from the standard library (OpenSSL underneath) rather than a hand-rolled KDF or another
dependency. One verification costs ~40-70 ms of CPU with the default parameters (n=2**14, r=8,
measured in docs/performance.md), so ``Users.check`` blocks: the edge's SMTP AUTH
(``edge/auth.py``) runs it in a worker thread under a node-wide cap, and limits failures per
client IP. A successful check is remembered for the life of the process as a keyed HMAC of
(user, password) (a client that logs in on every connection pays scrypt once; nothing
reversible to the password is kept). Intake reads a user's classes and default class from here
to classify; the listeners read its sender domains.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import logging
import os
import secrets
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from ..address import domain_key

log = logging.getLogger("postlane.auth")

_N, _R, _P = 2**14, 8, 1
_USER = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._@+-"


class UsersError(Exception):
    def __init__(self, errors: list[str]) -> None:
        super().__init__("; ".join(errors))
        self.errors = errors


def hash_password(password: str) -> str:
    """``scrypt$n$r$p$salt$hash`` with a fresh 16-byte salt."""
    salt = os.urandom(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, n=_N, r=_R, p=_P, dklen=32)
    b64 = base64.b64encode
    return f"scrypt${_N}${_R}${_P}${b64(salt).decode()}${b64(digest).decode()}"


def verify_password(password: str | bytes, stored: str) -> bool:
    try:
        scheme, n, r, p, salt, digest = stored.split("$")
        if scheme != "scrypt":
            return False
        expected = base64.b64decode(digest)
        pw = password if isinstance(password, bytes) else password.encode()
        got = hashlib.scrypt(pw, salt=base64.b64decode(salt), n=int(n), r=int(r), p=int(p),
                             dklen=len(expected), maxmem=256 * 1024 * 1024)
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(got, expected)


@dataclass(slots=True)
class User:
    name: str
    password: str = field(repr=False)
    classes: list[str] = field(default_factory=list)
    """Traffic classes this user may name in X-Postlane-Class; empty = any."""
    default_class: str | None = None
    sender_domains: list[str] = field(default_factory=list)
    """Domains this user may send from ("*" = any); empty = none, so a new user cannot forge."""

    def may_send_from(self, address: str) -> bool:
        """Whether MAIL FROM ``address`` is in one of ``sender_domains``, compared in A-labels:
        a client without SMTPUTF8 sends ``bücher.example`` as ``xn--bcher-kva.example``."""
        if "*" in self.sender_domains:
            return True
        if not address:
            return False
        domain = domain_key(address.rpartition("@")[2])
        return any(domain_key(allowed) == domain for allowed in self.sender_domains)

    def may_use(self, cls: str) -> bool:
        return not self.classes or cls in self.classes


def load_users(path: str | Path) -> dict[str, User]:
    """Read the users file, raising UsersError with one line per problem."""
    try:
        data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:  # ValueError: a NUL in the path
        raise UsersError([f"cannot read {path}: {getattr(exc, 'strerror', None) or exc}"]
                         ) from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise UsersError([f"{path}: not valid TOML: {exc}"]) from None
    users: dict[str, User] = {}
    errors: list[str] = []
    table = data.get("users", {})
    if not isinstance(table, dict) or set(data) - {"users"}:
        raise UsersError([f"{path}: expected only [users.NAME] tables"])
    for name, entry in table.items():
        where = f"users.{name}"
        if not isinstance(entry, dict) or not isinstance(entry.get("password"), str):
            errors.append(f"{where}.password: required (a hash from `postlane users add`)")
            continue
        if not entry["password"].startswith("scrypt$"):
            errors.append(f"{where}.password: not a scrypt hash (never store a plain password)")
            continue
        unknown = set(entry) - {"password", "classes", "default_class", "sender_domains"}
        if unknown:
            errors.append(f"{where}: unknown field(s) {', '.join(sorted(unknown))}")
        lists = {}
        for key in ("classes", "sender_domains"):
            value = entry.get(key, [])
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                errors.append(f"{where}.{key}: must be a list of strings")
                value = []
            lists[key] = value
        default = entry.get("default_class")
        if default is not None and not isinstance(default, str):
            errors.append(f"{where}.default_class: must be a string")
            default = None
        users[name] = User(name, entry["password"], lists["classes"], default,
                           [d.lower() for d in lists["sender_domains"]])
    if errors:
        raise UsersError(errors)
    return users


def save_user(path: str | Path, user: User) -> None:
    """Add or replace one user, keeping the file 0600 (it holds password hashes)."""
    path = Path(path)
    users = load_users(path) if path.exists() else {}
    users[user.name] = user
    lines = []
    for u in users.values():
        lines.append(f'[users."{u.name}"]')
        lines.append(f'password = "{u.password}"')
        lines.append(f"classes = [{', '.join(_toml_str(c) for c in u.classes)}]")
        if u.default_class:
            lines.append(f"default_class = {_toml_str(u.default_class)}")
        lines.append(f"sender_domains = [{', '.join(_toml_str(d) for d in u.sender_domains)}]")
        lines.append("")
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write("\n".join(lines))
    os.replace(tmp, path)


def _toml_str(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def valid_user_name(name: str) -> bool:
    return 0 < len(name) <= 128 and all(c in _USER for c in name)


class Users:
    """The users file, re-read when it changes (``postlane users add`` needs no restart)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._mtime = -1.0
        self._users: dict[str, User] = {}
        self._key = secrets.token_bytes(32)
        self._verified: set[bytes] = set()
        self.refresh()

    def refresh(self) -> None:
        """Re-read the file if it changed; a broken edit keeps the previous users."""
        try:
            mtime = self.path.stat().st_mtime
        except OSError:
            return
        if mtime != self._mtime:
            try:
                self._users = load_users(self.path)
            except UsersError as exc:
                if self._mtime < 0:
                    raise
                log.error("users file not reloaded, keeping the previous one: %s", exc)
                return
            self._mtime = mtime
            self._verified.clear()

    def get(self, name: str) -> User | None:
        return self._users.get(name)

    def _mac(self, name: str, password: bytes) -> bytes:
        return hmac.new(self._key, name.encode() + b"\0" + password, "sha256").digest()

    def remembered(self, name: str, password: bytes) -> User | None:
        """The user if ``check`` passed this name and password before (no scrypt), else None."""
        user = self._users.get(name)
        return user if user is not None and self._mac(name, password) in self._verified else None

    def check(self, name: str, password: bytes) -> User | None:
        """The user if the password is right, else None (the same answer, and the same cost,
        for unknown users). Blocking: scrypt takes tens of milliseconds."""
        self.refresh()
        user = self._users.get(name)
        mac = self._mac(name, password)
        if user is not None and mac in self._verified:
            return user
        if user is None:
            verify_password(password, _dummy_hash())  # same cost: timing does not reveal names
            return None
        if not verify_password(password, user.password):
            return None
        self._verified.add(mac)
        return user


@functools.cache
def _dummy_hash() -> str:
    return hash_password(secrets.token_hex(8))
