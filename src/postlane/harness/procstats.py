"""How much CPU and memory a process and its descendants use, read from /proc (Linux).

``postlane bench`` measures its node processes with these (a node's figures are its whole
process tree's: recorder, signers, intake workers); they live apart from the load driver so
that any harness can measure a process tree the same way.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

__all__ = ["TreeSampler", "children_cpu_seconds", "cpu_seconds", "descendants", "rss_peak_mb",
           "tree_cpu_seconds", "tree_rss_peak_mb", "tree_system_seconds"]


def _stat_fields(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()


def cpu_seconds(pid: int, reaped: bool = False, system_only: bool = False) -> float:
    """User + system CPU time of a process, from /proc (Linux); ``reaped``: with that of its
    children it has waited for (fields cutime, cstime), which a tree walk no longer sees;
    ``system_only``: the kernel's part alone (system calls: on loopback a send carries the
    receiving side's TCP work too)."""
    try:
        fields = _stat_fields(pid)
        ticks = int(fields[12]) + (0 if system_only else int(fields[11]))
        if reaped:
            ticks += int(fields[14]) + (0 if system_only else int(fields[13]))
        return round(ticks / os.sysconf("SC_CLK_TCK"), 2)
    except (OSError, IndexError, ValueError):
        return 0.0


def descendants(pid: int) -> list[int]:
    """Every live process below ``pid`` (children, their children …): a node's recorder,
    signers and workers, however they are nested."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parents.setdefault(int(_stat_fields(int(entry.name))[1]), []).append(
                    int(entry.name))
            except (OSError, IndexError, ValueError):
                continue
    out, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), ()):
            out.append(child)
            todo.append(child)
    return out


def children_cpu_seconds(pid: int) -> float:
    """CPU time of a process's live descendants (the node's recorder and signing processes)."""
    return round(sum(cpu_seconds(child) for child in descendants(pid)), 2)


def tree_cpu_seconds(pid: int) -> float:
    """CPU time of a node's whole process tree: the node, every live descendant, and the
    children each of them has reaped. What "node CPU" means in every figure of the bench,
    however many processes the node runs."""
    return round(sum(cpu_seconds(p, reaped=True) for p in [pid, *descendants(pid)]), 2)


def tree_system_seconds(pid: int) -> float:
    """The kernel's part of ``tree_cpu_seconds``: what no change to the node's Python can cut
    while it makes the same system calls."""
    return round(sum(cpu_seconds(p, reaped=True, system_only=True)
                     for p in [pid, *descendants(pid)]), 2)


def _status_kb(pid: int, key: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def rss_peak_mb(pid: int) -> float:
    return round(_status_kb(pid, "VmHWM:") / 1024, 1)


def tree_rss_peak_mb(pid: int) -> float:
    """Peak RSS of a node and its live descendants together (each one's own peak, summed: an
    upper bound)."""
    return round(sum(rss_peak_mb(p) for p in [pid, *descendants(pid)]), 1)


def _tree_rss_mb(pid: int) -> float:
    """RSS of a node's whole process tree now."""
    return round(sum(_status_kb(p, "VmRSS:") for p in [pid, *descendants(pid)]) / 1024, 1)


class TreeSampler:
    """Samples the summed RSS of the nodes' process trees twice a second, in a thread: the
    highest sum seen is a truer "memory of all node processes" than a sum of each one's peak."""

    def __init__(self, pids: list[int], every: float = 0.5) -> None:
        self.pids = pids
        self.every = every
        self.max_mb = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tree-sampler", daemon=True)
        self._thread.start()

    def now_mb(self) -> float:
        return round(sum(_tree_rss_mb(pid) for pid in self.pids), 1)

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            self.max_mb = max(self.max_mb, self.now_mb())

    def stop(self) -> float:
        self._stop.set()
        self._thread.join(5)
        self.max_mb = max(self.max_mb, self.now_mb())
        return self.max_mb
