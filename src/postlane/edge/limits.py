"""Intake limits that span connections: concurrent connections per listener and client IP, and
messages (or failed AUTHs) per minute per client. The spool's free-space floor is
``spool/disk.py``'s."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable


class ConnectionLimits:
    """Counts open connections of one listener, in total and per client IP."""

    def __init__(self, total: int, per_ip: int) -> None:
        self.total_cap = total
        self.per_ip_cap = per_ip
        self.total = 0
        self.per_ip: Counter[str] = Counter()

    def admit(self, ip: str, per_ip: bool = True) -> str | None:
        """Count the connection in and return None, or return the 421 reply refusing it
        (``per_ip`` False: only the listener's total applies)."""
        if self.total >= self.total_cap:
            return "421 4.7.0 Too many connections, try again later"
        if per_ip and self.per_ip[ip] >= self.per_ip_cap:
            return "421 4.7.0 Too many connections from your address, try again later"
        self.total += 1
        self.per_ip[ip] += 1
        return None

    def release(self, ip: str) -> None:
        self.total -= 1
        self.per_ip[ip] -= 1
        if self.per_ip[ip] <= 0:
            del self.per_ip[ip]


class RateLimiter:
    """A token bucket per key (AUTH user or client IP): ``per_minute`` messages, refilled
    continuously, so a client may burst to its minute's allowance but not beyond."""

    def __init__(self, per_minute: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.per_minute = per_minute
        self.clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}

    def _level(self, key: str, now: float) -> float:
        tokens, at = self._buckets.get(key, (float(self.per_minute), now))
        return min(float(self.per_minute), tokens + (now - at) * self.per_minute / 60.0)

    def available(self, key: str) -> bool:
        """Whether ``key`` has allowance left, without taking any."""
        return not self.per_minute or self._level(key, self.clock()) >= 1.0

    def allow(self, key: str) -> bool:
        """Take one message from ``key``'s allowance; False when it is used up."""
        if not self.per_minute:
            return True
        now = self.clock()
        level = self._level(key, now)
        if level < 1.0:
            return False
        self._buckets[key] = (level - 1.0, now)
        if len(self._buckets) > 100_000:  # forget full buckets; they equal a fresh one
            self._buckets = {k: v for k, v in self._buckets.items()
                             if self._level(k, now) < self.per_minute}
        return True
