"""A backup's hold on the spool's events: while a backup runs, no node trims them.

``postlane backup`` copies the audit store and the accounting files first and the spool after
them. Events the recorder consumed between those copies are then still in the spool copy (the
node did not trim them), so a restored node's recorder writes on from each consumer's position
and the restored evidence is complete: nothing in the audit copy is missing from the spool copy
nor the other way round. The hold is an ``flock`` on ``trim.hold`` in the node's state folder: it
ends with the backup's process, even a killed one.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

HOLD = "trim.hold"


@contextlib.contextmanager
def holding(state: Path) -> Iterator[None]:
    """Hold the events of the spool in ``state`` (blocks while another backup holds them)."""
    fd = os.open(state / HOLD, os.O_CREAT | os.O_RDWR, 0o600)
    try:
        if os.geteuid() == 0:  # a backup run as root: the node's user must see the hold
            folder = state.stat()
            os.fchown(fd, folder.st_uid, folder.st_gid)
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # (closing releases the lock)


def held(state: Path) -> bool:
    """Whether a backup holds the events of the spool in ``state`` now."""
    return locked(state / HOLD)


def locked(path: Path) -> bool:
    """Whether some process holds an exclusive ``flock`` on ``path`` (a file or a folder) now."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
