"""Named API tokens: several callers, each with a name that goes on the record of every action
it orders (``Record.operator``), optionally read-only (refused with 403 on POST and DELETE).

Two files:

- ``api.token_file`` (one line, the secret; created 0600 at the first start) is the token named
  ``admin``: the one the CLI on the node's machine reads. It works as it always did.
- ``api.tokens_file`` (JSON, 0600, written by ``postlane api token add|revoke``) maps each
  other name to the SHA-256 of its token, ``read_only`` and when it was made. It holds no
  secret: a token is 256 random bits shown once when it is made, so a plain hash cannot be
  turned back (a salt or a slow hash protects guessable passwords, not random keys).

The node reads both files again when they change (two ``stat`` calls per request), so a token
added or revoked counts at once, without a restart. Tokens are compared in constant time, each
presented token against every known one; no token or hash is ever logged.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from starlette.requests import Request

from ..operations import Operator
from ..secretfile import FILE_MODE, create_secret, private_dir, replace_secret

__all__ = ["ADMIN", "Token", "TokenError", "Tokens", "add_token", "caller", "list_tokens",
           "load_token", "revoke_token"]

log = logging.getLogger("postlane.api")

ADMIN = "admin"
"""The name of the token in ``api.token_file``."""
FORMAT = "postlane-api-tokens/1"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")


class TokenError(ValueError):
    """A token file that cannot be used, or a bad name; the message says which and why."""


@dataclass(frozen=True, slots=True)
class Token:
    name: str
    read_only: bool = False


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def load_token(path: str | Path) -> str:
    """The token in ``path``; created (mode 0600, 256 random bits) if the file does not exist.
    The token itself is never logged."""
    path = Path(path)
    try:
        token = path.read_text("utf-8").strip()
    except FileNotFoundError:
        if create_secret(path, (secrets.token_urlsafe(32) + "\n").encode()):
            log.info("created API token file", extra={"path": str(path)})
        return load_token(path)  # ours, or the one another node made meanwhile
    except UnicodeDecodeError:
        raise TokenError(f"API token file {path} is not text (a token is printable"
                         " characters, e.g. from `openssl rand -hex 32`)") from None
    if not token:
        raise TokenError(f"API token file {path} is empty")
    if path.stat().st_mode & 0o077:
        log.warning("API token file is readable by group/others; chmod 600 it",
                    extra={"path": str(path)})
    return token


def _read(path: Path) -> dict[str, dict]:
    """The named tokens in ``path`` ({} if there is no file)."""
    try:
        data = json.loads(path.read_text("utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise TokenError(f"API tokens file {path}: {exc}") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(
            data.get("tokens"), dict):
        raise TokenError(f"API tokens file {path}: not a {FORMAT} file")
    for name, entry in data["tokens"].items():
        if not (isinstance(entry, dict) and isinstance(entry.get("sha256"), str)
                and re.fullmatch(r"[0-9a-f]{64}", entry["sha256"])):
            raise TokenError(f"API tokens file {path}: token {name!r} has no valid sha256")
    return data["tokens"]


def _stamp(path: Path) -> tuple[int, int, int] | None:
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


class Tokens:
    """The tokens a node's API accepts: ``admin`` from the token file and the named ones."""

    def __init__(self, token_file: str | Path, tokens_file: str | Path) -> None:
        self.token_file = Path(token_file)
        self.tokens_file = Path(tokens_file)
        self._stamps: tuple = ()
        self._known: list[tuple[bytes, Token]] = []
        self.reload()

    def reload(self) -> None:
        """Read both files again if either changed. A tokens file that cannot be read leaves
        only ``admin`` (fail closed: a revoked token must not live on), and says why."""
        stamps = (_stamp(self.token_file), _stamp(self.tokens_file))
        if stamps == self._stamps:
            return
        known = []
        try:
            known.append((_digest(load_token(self.token_file)), Token(ADMIN)))
        except TokenError as exc:  # fail closed, and say why
            log.error("%s; the admin token is refused until it is fixed", exc)
        try:
            named = _read(self.tokens_file)
        except TokenError as exc:
            log.error("%s; only the admin token is accepted until it is fixed", exc)
            named = {}
        if named and self.tokens_file.stat().st_mode & 0o077:
            log.warning("API tokens file is readable by group/others; chmod 600 it",
                        extra={"path": str(self.tokens_file)})
        known += [(bytes.fromhex(e["sha256"]), Token(name, bool(e.get("read_only"))))
                  for name, e in named.items() if name != ADMIN]
        self._known, self._stamps = known, (_stamp(self.token_file), stamps[1])
        log.info("API tokens loaded", extra={"tokens": [t.name for _, t in known]})

    def check(self, presented: str) -> Token | None:
        """The token ``presented`` is, or None. Compared with every known token (no early
        exit), each comparison in constant time."""
        self.reload()
        digest = _digest(presented)
        found = None
        for known, token in self._known:
            if hmac.compare_digest(digest, known):
                found = token
        return found


def caller(request: Request) -> Operator:
    """Who sent an API request: its token's name (the app's token check keeps the token)."""
    return Operator(request.state.token.name, "api")


# -- the file, for ``postlane api token …`` ------------------------------------------------------

@contextlib.contextmanager
def _locked(path: Path) -> Iterator[dict[str, dict]]:
    """The named tokens, to change under an exclusive lock (two commands at once do not lose
    each other's change); written back (0600, atomically) when the block ends."""
    private_dir(path.parent)
    fd = os.open(path.with_name(path.name + ".lock"), os.O_RDWR | os.O_CREAT, FILE_MODE)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        tokens = _read(path)
        yield tokens
        replace_secret(path, (json.dumps({"format": FORMAT, "tokens": tokens}, indent=2)
                              + "\n").encode())
    finally:
        os.close(fd)


def add_token(path: str | Path, name: str, read_only: bool = False) -> str:
    """Make a token named ``name``; returns it (the file keeps only its hash)."""
    if not _NAME.fullmatch(name):
        raise TokenError(f"token name {name!r}: use 1 to 64 letters, digits and . _ @ -,"
                         " starting with a letter or digit")
    if name == ADMIN:
        raise TokenError("'admin' is the token in api.token_file: replace that file's content"
                         " to change it")
    token = secrets.token_urlsafe(32)
    with _locked(Path(path)) as tokens:
        if name in tokens:
            raise TokenError(f"a token named {name!r} exists; revoke it first")
        tokens[name] = {"sha256": _digest(token).hex(), "read_only": read_only,
                        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    return token


def revoke_token(path: str | Path, name: str) -> bool:
    """Remove the token named ``name``; False if there is none."""
    with _locked(Path(path)) as tokens:
        return tokens.pop(name, None) is not None


def list_tokens(path: str | Path) -> list[dict]:
    """Name, read_only and creation time of each named token (never its hash)."""
    return [{"name": name, "read_only": bool(e.get("read_only")), "created": e.get("created")}
            for name, e in sorted(_read(Path(path)).items())]
