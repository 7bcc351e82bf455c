"""The scheduler's clock: passed in, so the queue's decisions (deadlines, retry times, rates) can
be tested on a clock the test sets, in milliseconds and without sockets."""

from __future__ import annotations

import time as _time
from typing import Protocol


class Clock(Protocol):
    def time(self) -> float:
        """Wall-clock seconds (the epoch of deadlines, retry times and records)."""
        ...

    def monotonic(self) -> float:
        """Seconds that never go back (idle and dormancy measures)."""
        ...


class SystemClock:
    """The real clocks."""

    time = staticmethod(_time.time)
    monotonic = staticmethod(_time.monotonic)


SYSTEM_CLOCK: Clock = SystemClock()
