"""The node's feedback secret: signs VERP addresses and unsubscribe tokens.

Generated on first start into a 0600 file, so a fresh node is secure without configuration;
every node of a cluster must share the file (tokens minted by one are checked by another).
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

__all__ = ["load_or_create_key"]


def load_or_create_key(path: str | Path) -> bytes:
    """The key in ``path``, creating it (32 random bytes, hex, mode 0600) if it is missing."""
    path = Path(path)
    try:
        text = path.read_text("ascii").strip()
    except FileNotFoundError:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # another process created it meanwhile
            return load_or_create_key(path)
        with os.fdopen(fd, "w") as out:
            out.write(secrets.token_hex(32) + "\n")
        return load_or_create_key(path)
    if len(text) < 32:
        raise ValueError(f"{path}: feedback key is too short (need at least 32 characters)")
    return text.encode("ascii")
