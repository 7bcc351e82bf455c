"""Files that hold secrets or customer data: only the node's user may read them, whatever the
umask (message bodies, addresses, keys, tokens: 0600 files in 0700 folders).

Nodes of a cluster may share a state folder and start at the same moment; a secret opened with
O_EXCL and then written can be read empty in between, so ``create_secret`` writes a private
temporary file first and links it into place, which fails if another process got there first.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

__all__ = ["NotTheOwner", "UnusableFile", "as_the_owner", "create_secret", "private_dir",
           "private_file", "private_open", "replace_secret"]

FILE_MODE = 0o600
DIR_MODE = 0o700


class UnusableFile(ValueError):
    """A file the operator keeps (a key) that exists but cannot be used: ``serve`` and the CLI
    say which and why in one line, as for a file they cannot open."""


class NotTheOwner(PermissionError):
    """Root about to write into a folder the node's user owns."""


def as_the_owner(path: str | Path) -> None:
    """Refuse to write, as root, into a folder another user owns (the node's, under systemd):
    a 0600 file root makes there is one the node cannot read (a token it refuses, a DKIM key
    it cannot sign with). The nearest existing folder of ``path`` decides."""
    if os.geteuid() != 0:
        return
    folder = Path(path).absolute()
    while not folder.is_dir() and folder != folder.parent:
        folder = folder.parent
    owner = folder.stat().st_uid
    if owner == 0:
        return
    import pwd

    try:
        name = pwd.getpwuid(owner).pw_name
    except KeyError:
        name = f"#{owner}"
    raise NotTheOwner(f"{folder} belongs to {name}: run this as that user (sudo -u {name}"
                      f" postlane …); a file root writes there is one the node cannot read")


def private_dir(path: str | Path) -> None:
    """Create ``path`` and any missing parents as 0700 folders (existing ones are left as the
    operator made them)."""
    path = Path(path)
    missing = []
    while not path.exists() and path != path.parent:
        missing.append(path)
        path = path.parent
    for folder in reversed(missing):
        with contextlib.suppress(FileExistsError):  # another process made it meanwhile
            folder.mkdir(mode=DIR_MODE)
            os.chmod(folder, DIR_MODE)  # exactly, whatever the umask


def private_file(path: str | Path) -> Path:
    """Create an empty 0600 file at ``path`` (in a 0700 folder) unless it exists, before a
    library such as SQLite creates it with the umask's mode. SQLite gives its -wal and -shm
    files the database file's mode."""
    path = Path(path)
    private_dir(path.parent)
    with contextlib.suppress(FileExistsError):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
        os.fchmod(fd, FILE_MODE)
        os.close(fd)
    return path


def private_open(path: str | Path, mode: str = "w", **kwargs: Any) -> IO:
    """``open`` for writing a file only its owner can read (created or truncated 0600)."""
    def opener(name: str, flags: int) -> int:
        fd = os.open(name, flags, FILE_MODE)
        os.fchmod(fd, FILE_MODE)
        return fd

    return open(path, mode, opener=opener, **kwargs)  # noqa: SIM115


def create_secret(path: Path, data: bytes) -> bool:
    """Write ``data`` to a new 0600 file at ``path``, durably; False (and ``path`` untouched)
    if it exists already."""
    try:
        _place(path, data, os.link)
    except FileExistsError:
        return False
    return True


def replace_secret(path: Path, data: bytes) -> None:
    """Write ``data`` as the 0600 file at ``path``, durably and at once: a reader sees the
    old content or the new, never a part."""
    _place(path, data, os.replace)


def _place(path: Path, data: bytes, put: Callable[[str, Path], None]) -> None:
    """Write a private temporary file beside ``path``, fsync it, then ``put`` it there."""
    private_dir(path.parent)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")  # mode 0600
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        put(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
