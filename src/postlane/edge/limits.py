"""Intake limits that span connections: concurrent connections per listener and client IP, and
messages (or failed AUTHs) per minute per client. The spool's free-space floor is
``spool/disk.py``'s."""

from __future__ import annotations

import functools
import ipaddress
import time
from collections import Counter
from collections.abc import Callable

from ..address import plain_ip

IPV6_CLIENT_PREFIX = 64
"""An IPv6 client is counted by its /64: the smallest network an end site gets (RFC 6177,
RIPE-690; SLAAC needs one), so one host picks any of its 2**64 addresses and per-address limits
hold nobody (docs/security.md, "Limits")."""


@functools.lru_cache(maxsize=65536)
def client_key(ip: str) -> str:
    """Whom the per-client limits count: an IPv4 address, or an IPv6 address's /64
    (``2001:db8:1:2::/64``); an IPv4-mapped IPv6 address is its IPv4 address, anything that
    is no address stays as it is."""
    ip = plain_ip(ip)
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return ip
    if address.version == 6:
        return str(ipaddress.IPv6Network((address, IPV6_CLIENT_PREFIX), strict=False))
    return ip


class ConnectionLimits:
    """Counts open connections of one listener, in total and per client (an IPv4 address or an
    IPv6 /64: ``client_key``).

    Strangers and trusted clients (``relay_from``) are counted apart, each up to the cap:
    strangers filling a listener's slots never lock out the applications submitting through
    it. Past ``STRESS`` of the cap taken by strangers the listener is under stress
    (``stressed``): their idle connections get a short timeout (``guard.py``), as Postfix's
    smtpd does when all its processes are busy."""

    STRESS = 0.8

    def __init__(self, total: int, per_ip: int) -> None:
        self.total_cap = total
        self.per_ip_cap = per_ip
        self.total = 0
        """Strangers' connections."""
        self.trusted_total = 0
        self.per_ip: Counter[str] = Counter()
        self._trusted: Counter[str] = Counter()
        self._stress_at = max(1, int(total * self.STRESS))

    @property
    def open(self) -> int:
        """Connections open now, strangers' and trusted clients' (``status``)."""
        return self.total + self.trusted_total

    @property
    def stressed(self) -> bool:
        return self.total >= self._stress_at

    def admit(self, ip: str, per_ip: bool = True) -> str | None:
        """Count the connection in and return None, or return the 421 reply refusing it
        (``per_ip`` False: a trusted client, only the trusted clients' total applies)."""
        ip = client_key(ip)
        if not per_ip:
            if self.trusted_total >= self.total_cap:
                return "421 4.7.0 Too many connections, try again later"
            self.trusted_total += 1
            self._trusted[ip] += 1
            return None
        if self.total >= self.total_cap:
            return "421 4.7.0 Too many connections, try again later"
        if self.per_ip[ip] >= self.per_ip_cap:
            return "421 4.7.0 Too many connections from your address, try again later"
        self.total += 1
        self.per_ip[ip] += 1
        return None

    def release(self, ip: str) -> None:
        """Count a connection out (a stranger's first: an IP's trust may change on reload)."""
        ip = client_key(ip)
        counter = self.per_ip if ip in self.per_ip else self._trusted
        if counter is self.per_ip:
            self.total -= 1
        else:
            self.trusted_total -= 1
        counter[ip] -= 1
        if counter[ip] <= 0:
            del counter[ip]


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
