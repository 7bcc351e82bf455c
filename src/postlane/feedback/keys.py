"""The node's feedback secret: signs VERP addresses and unsubscribe tokens.

Generated on first start into a 0600 file, so a fresh node is secure without configuration;
every node of a cluster must share the file (tokens minted by one are checked by another).
"""

from __future__ import annotations

import secrets
from pathlib import Path

from ..secretfile import UnusableFile, create_secret

__all__ = ["FeedbackKeyError", "load_or_create_key"]


class FeedbackKeyError(UnusableFile):
    """A feedback key file that exists but cannot be used: the node does not start (a new key
    would break every VERP address and unsubscribe link already sent)."""


def load_or_create_key(path: str | Path) -> bytes:
    """The key in ``path``, creating it (32 random bytes, hex, mode 0600) if it is missing."""
    path = Path(path)
    try:
        text = path.read_text("ascii").strip()
    except FileNotFoundError:
        create_secret(path, (secrets.token_hex(32) + "\n").encode())
        text = path.read_text("ascii").strip()
    except UnicodeDecodeError:
        raise FeedbackKeyError(f"feedback key file {path} is not text: a key is at least 32"
                               " ASCII characters, e.g. from `openssl rand -hex 32`") from None
    if len(text) < 32:
        raise FeedbackKeyError(f"feedback key file {path} is too short: a key is at least 32"
                               " ASCII characters, e.g. from `openssl rand -hex 32`")
    return text.encode("ascii")
