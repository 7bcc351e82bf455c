"""A small real file system for disk-full tests: a tmpfs mounted for the test (the tests run
as root in CI), so ENOSPC comes from the kernel, partial writes and all, not from a mock."""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest


class SmallFS:
    """A tmpfs at ``path``; ``grow`` gives it more room (space coming back)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def mount(self, size: str) -> None:
        path = self.path
        path.mkdir(parents=True, exist_ok=True)
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755",
                               "tmpfs", str(path)], capture_output=True, text=True)
        if done.returncode != 0:
            pytest.fail(f"cannot mount a tmpfs at {path}: {done.stderr.strip()}")

    def grow(self, size: str = "64m") -> None:
        subprocess.run(["mount", "-o", f"remount,size={size}", str(self.path)], check=True)

    def fill(self) -> None:
        """Take what room is left (a file of zeros until ENOSPC)."""
        with open(self.path / "ballast", "wb") as fh, contextlib.suppress(OSError):
            while True:
                fh.write(b"\0" * 65536)
                fh.flush()

    def free(self) -> None:
        (self.path / "ballast").unlink(missing_ok=True)

    def unmount(self) -> None:
        subprocess.run(["umount", "-l", str(self.path)], capture_output=True)


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Callable[[str, str], SmallFS]]:
    """``small_fs(name, size)``: a tmpfs of ``size`` ("256k", "2m") at ``tmp_path/name``,
    unmounted after the test. Needs root (mount); skipped otherwise."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (CI runs the tests as root)")
    mounted: list[SmallFS] = []

    def make(name: str, size: str) -> SmallFS:
        fs = SmallFS(tmp_path / name)
        fs.mount(size)
        mounted.append(fs)
        return fs

    yield make
    for fs in mounted:
        fs.unmount()
