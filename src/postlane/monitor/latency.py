"""Sliding-window latency percentiles with bounded memory.

Keeping every sample of the last 15 minutes would cost ~100 bytes per delivery (90 MB at
1,000 msgs/s), so each series keeps one sparse log-bucket histogram per time slice instead:
insert is one dict increment, a window's percentile merges its slices. Buckets grow by 2 %, so a
reported percentile is within 1 % of the true sample value. (Written here rather than taken from a
sketch library because the windowing - slices that expire - is the part that matters, and the
bucket arithmetic is two lines.)
"""

from __future__ import annotations

import math
from collections import deque

_GAMMA = 1.02
_LOG_GAMMA = math.log(_GAMMA)
_MIN = 0.001
"""Latencies under 1 ms share the lowest bucket."""

WINDOWS: dict[str, float] = {"1m": 60.0, "5m": 300.0, "15m": 900.0}
QUANTILES: tuple[float, ...] = (0.5, 0.95, 0.99)


def bucket_of(value: float) -> int:
    """The histogram bucket of a latency in seconds."""
    return 0 if value <= _MIN else int(math.log(value / _MIN) / _LOG_GAMMA) + 1


def _value(bucket: int) -> float:
    """The midpoint of a bucket, in seconds."""
    if bucket == 0:
        return _MIN
    return _MIN * _GAMMA ** (bucket - 0.5)


class Series:
    """Latency samples of one class or pool, kept in ``slice_s``-second slices for ``span_s``."""

    __slots__ = ("slice_s", "span_s", "_slices", "total")

    def __init__(self, slice_s: float = 5.0, span_s: float = 900.0) -> None:
        self.slice_s = slice_s
        self.span_s = span_s
        self._slices: deque[tuple[int, dict[int, int]]] = deque()
        self.total = 0

    def add(self, now: float, latency: float) -> None:
        self.count(now, bucket_of(latency))

    def count(self, now: float, bucket: int) -> None:
        """A sample already in its bucket (``bucket_of``): the tracker puts a delivery into
        its class's series and its pool's, and finds the bucket once."""
        slices = self._slices
        if slices and slices[-1][0] >= now // self.slice_s:  # the slice under way
            hist = slices[-1][1]
        else:
            hist = self._current(now)[1]
        hist[bucket] = hist.get(bucket, 0) + 1
        self.total += 1

    def merge(self, at: float, counts: dict[int, int]) -> None:
        """Add bucket counts observed at ``at`` (slices of other nodes, which may come late)."""
        index = int(at // self.slice_s)
        slices = self._slices
        if not slices or slices[-1][0] <= index:
            hist = self._current(at)[1]
        elif index <= slices[-1][0] - int(self.span_s // self.slice_s):
            return  # older than the span
        else:
            pos = len(slices)
            while pos and slices[pos - 1][0] > index:
                pos -= 1
            if pos and slices[pos - 1][0] == index:
                hist = slices[pos - 1][1]
            else:
                hist = {}
                slices.insert(pos, (index, hist))
        for bucket, n in counts.items():
            hist[bucket] = hist.get(bucket, 0) + n
        self.total += sum(counts.values())

    def quantiles(self, now: float, window: float,
                  qs: tuple[float, ...] = QUANTILES) -> dict[float, float] | None:
        """Latency at each quantile over the last ``window`` seconds (None: no samples)."""
        first = self._first_slice(now, window)
        merged: dict[int, int] = {}
        for start, hist in self._slices:
            if start >= first:
                for bucket, n in hist.items():
                    merged[bucket] = merged.get(bucket, 0) + n
        total = sum(merged.values())
        if not total:
            return None
        out: dict[float, float] = {}
        buckets = sorted(merged)
        for q in qs:
            rank = max(1, math.ceil(q * total))
            seen = 0
            for bucket in buckets:
                seen += merged[bucket]
                if seen >= rank:
                    out[q] = _value(bucket)
                    break
        return out

    def _first_slice(self, now: float, window: float) -> int:
        return int((now - window) // self.slice_s) + 1

    def _current(self, now: float) -> tuple[int, dict[int, int]]:
        index = int(now // self.slice_s)
        slices = self._slices
        if not slices or slices[-1][0] < index:
            slices.append((index, {}))
            oldest = index - int(self.span_s // self.slice_s)
            while slices[0][0] <= oldest:
                slices.popleft()
        return slices[-1]
