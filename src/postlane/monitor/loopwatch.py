"""The event-loop watchdog: how late the loop runs a timer that is due every 50 ms.

Everything of a node (SMTP sessions, deliveries, the API) runs on one event loop, so any call
that blocks it (a synchronous database query waiting for a lock, a ``proc.wait``, a walk over
the whole queue) delays every session at once. docs/architecture.md's rule is that nothing
blocks the loop; this measures whether that holds.

A timer is armed every ``INTERVAL``; when it fires, its lateness is the lag. Any block longer
than the interval delays some timer by about its length, so every such block is seen; shorter
ones are seen in proportion to their length. Each lag is observed into the histogram
``postlane_event_loop_lag_seconds`` and the largest of the last minute is the gauge
``postlane_event_loop_lag_max_seconds`` (docs/monitoring.md says why both).

On Linux the run-queue wait of each of the node's threads (``/proc/self/task/*/schedstat``)
is read at each tick too: lag the kernel caused by giving the CPU to other processes (to the
loop thread, or to a thread holding the GIL the loop waits for) is then told apart from lag
the node caused itself (``Stalls.max_blocked``), which is what the tests check.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

__all__ = ["INTERVAL", "LAG_BUCKETS", "LoopWatch", "Stalls"]

INTERVAL = 0.05
"""Seconds between ticks: 20 timer callbacks a second, well under 1 ms of CPU a second."""
WINDOW = 60.0
"""The gauge's window: the largest lag of the last minute, whoever scrapes and how often."""
LAG_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
               30.0)


@dataclass(slots=True)
class Stalls:
    """The worst lag seen while tracking (``LoopWatch.track``)."""

    ticks: int = 0
    max_lag: float = 0.0
    """Seconds, as the wall clock saw it."""
    max_blocked: float = 0.0
    """Seconds of lag not explained by waiting for a CPU (the longest run-queue wait of any of
    the node's threads over the same tick subtracted): what the node's own code blocked."""


class LoopWatch:
    """Started on the running loop (``start``); ``stop`` cancels the timer."""

    def __init__(self, registry: CollectorRegistry | None = None,
                 interval: float = INTERVAL) -> None:
        self.interval = interval
        self.histogram = Histogram(
            "postlane_event_loop_lag_seconds", "How late the event loop ran a timer due every"
            f" {interval * 1000:g} ms (one observation per tick)", buckets=LAG_BUCKETS,
            registry=registry)
        self.last = 0.0
        self._recent: collections.deque[tuple[float, float]] = collections.deque()
        """(tick time, lag) with lags decreasing: the window's maximum is the first."""
        self._trackers: list[Stalls] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._handle: asyncio.TimerHandle | None = None
        self._due = 0.0
        self._schedstat: dict[str, int] = {}
        """Thread id -> open schedstat file."""
        self._waited: dict[str, int] = {}
        if registry is not None:
            registry.register(_MaxCollector(self))

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._waited = self._runqueue_ns()
        self._due = self._loop.time() + self.interval
        self._handle = self._loop.call_at(self._due, self._tick)

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        for fd in self._schedstat.values():
            os.close(fd)
        self._schedstat.clear()

    def _runqueue_ns(self) -> dict[str, int]:
        """Per thread of this process, the nanoseconds it has waited for a CPU, in all (empty
        when the system does not say: not Linux, no schedstats)."""
        try:
            tids = os.listdir("/proc/self/task")
        except OSError:
            return {}
        fds = self._schedstat
        for gone in fds.keys() - set(tids):
            os.close(fds.pop(gone))
        out = {}
        for tid in tids:
            try:
                fd = fds.get(tid)
                if fd is None:
                    fd = fds[tid] = os.open(f"/proc/self/task/{tid}/schedstat", os.O_RDONLY)
                out[tid] = int(os.pread(fd, 64, 0).split()[1])
            except (OSError, IndexError, ValueError):
                continue
        return out

    def _tick(self) -> None:
        assert self._loop is not None
        now = self._loop.time()
        lag = max(0.0, now - self._due)
        waited = self._runqueue_ns()
        before = self._waited
        # a thread started within the tick (a to_thread worker) waited within it
        starved = max((n - before.get(t, 0) for t, n in waited.items()), default=0) / 1e9
        self._waited = waited
        self.last = lag
        self.histogram.observe(lag)
        recent = self._recent
        while recent and recent[-1][1] <= lag:
            recent.pop()
        recent.append((now, lag))
        while recent[0][0] < now - WINDOW:
            recent.popleft()
        for stalls in self._trackers:
            stalls.ticks += 1
            stalls.max_lag = max(stalls.max_lag, lag)
            stalls.max_blocked = max(stalls.max_blocked, lag - starved)
        self._due = now + self.interval
        self._handle = self._loop.call_at(self._due, self._tick)

    def max_lag(self) -> float:
        """The largest lag of the last ``WINDOW`` seconds."""
        if self._loop is None:
            return 0.0
        cutoff = self._loop.time() - WINDOW
        return max((lag for at, lag in self._recent if at >= cutoff), default=0.0)

    @contextlib.contextmanager
    def track(self) -> Iterator[Stalls]:
        """The worst lag while the block runs (a test's measurement)."""
        stalls = Stalls()
        self._trackers.append(stalls)
        try:
            yield stalls
        finally:
            self._trackers.remove(stalls)


class _MaxCollector(Collector):
    def __init__(self, watch: LoopWatch) -> None:
        self.watch = watch

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily(
            "postlane_event_loop_lag_max_seconds",
            f"The largest event-loop lag of the last {WINDOW:g} seconds",
            value=self.watch.max_lag())
        loop = self.watch._loop
        if loop is not None:  # a count that climbs while the traffic is flat is a task leak
            yield GaugeMetricFamily(
                "postlane_event_loop_tasks", "asyncio tasks not yet done on the node's event"
                " loop (SMTP sessions, deliveries, background jobs)",
                value=len(asyncio.all_tasks(loop)))
