"""The node's feedback secret: signs VERP addresses and unsubscribe tokens.

Generated on first start into a 0600 file, so a fresh node is secure without configuration;
every node of a cluster must share the file (tokens minted by one are checked by another).
"""

from __future__ import annotations

import secrets
from pathlib import Path

from ..secretfile import create_secret

__all__ = ["load_or_create_key"]


def load_or_create_key(path: str | Path) -> bytes:
    """The key in ``path``, creating it (32 random bytes, hex, mode 0600) if it is missing."""
    path = Path(path)
    try:
        text = path.read_text("ascii").strip()
    except FileNotFoundError:
        create_secret(path, (secrets.token_hex(32) + "\n").encode())
        text = path.read_text("ascii").strip()
    if len(text) < 32:
        raise ValueError(f"{path}: feedback key is too short (need at least 32 characters)")
    return text.encode("ascii")
