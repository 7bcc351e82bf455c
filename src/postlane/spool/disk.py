"""The free-space floor (``security.min_free_space``): intake refuses mail with 452 4.3.1
before a disk that holds the queue or its evidence fills, rather than failing a write half-way,
so that the records of mail already accepted (accounting files, audit store) still have room
(Postfix's ``queue_minfree``)."""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from ..config.locations import is_dsn
from ..health import Health

if TYPE_CHECKING:
    from ..config import Config

__all__ = ["DiskGuard", "guarded_folders"]


def guarded_folders(config: Config, state: Path) -> list[Path]:
    """The folders the floor watches: the node's own (``state``: the SQLite spool, or a
    cluster node's state), the accounting folder, and the audit store's folder when it is a
    file. Each may be its own file system."""
    folders = [state, Path(config.accounting.directory)]
    if config.audit.enabled and config.audit.path and not is_dsn(config.audit.path):
        folders.append(Path(config.audit.path).parent)
    return list(dict.fromkeys(folders))


class DiskGuard:
    """Whether the file systems of the spool and the evidence have room for more mail.
    Checked at most once a second (statvfs is cheap, but intake asks for every MAIL and RCPT);
    recovers on its own when space returns, since each check looks afresh. Running low and
    recovering are each logged once (``Health``); the refusals in between are counted."""

    KEY = "disk"
    TEXT = "4.3.1 Insufficient system storage, try again later"

    def __init__(self, paths: str | Path | Sequence[str | Path], min_free: int,
                 free_bytes: Callable[[Path], int] | None = None,
                 health: Health | None = None) -> None:
        listed = [paths] if isinstance(paths, str | Path) else list(paths)
        self.paths = [Path(p) for p in listed]
        self.path = self.paths[0]
        self.min_free = min_free
        self.free_bytes = free_bytes or _free_bytes
        self.health = health or Health()
        self._checked = 0.0
        self._ok = True

    def ok(self) -> bool:
        now = time.monotonic()
        if now - self._checked >= 1.0:
            self._checked = now
            free, path = min((self.free_bytes(p), p) for p in self.paths)
            ok = free >= self.min_free
            if ok and not self._ok:
                self.health.end(self.KEY)
            elif not ok and self._ok:
                self.health.begin(
                    self.KEY, "disk", "low disk space", effect="intake answers 452 4.3.1",
                    cause=f"{free >> 20} MB free at {path}, below security.min_free_space"
                          f" ({self.min_free >> 20} MB)", level=logging.ERROR)
            self._ok = ok
        return self._ok

    def refusal(self) -> str:
        """The 452 reply, counted as one refusal of the low-disk state."""
        self.health.count(self.KEY)
        return f"452 {self.TEXT}"

    def recheck(self) -> None:
        """Forget the cached answer (tests and operators changing ``min_free``)."""
        self._checked = 0.0


def _free_bytes(path: Path) -> int:
    for candidate in (path, *path.parents):
        if candidate.exists():
            return shutil.disk_usage(candidate).free
    return 0
