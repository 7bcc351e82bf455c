"""Per-pool rate limits of destination rules (``max_rate_per_pool``): token buckets that hold for
one node (``LocalRate``, SQLite) or across every node of a cluster (``SharedRate``, PostgreSQL).

Both answer the same question the same way: ``try_acquire(key, rate, burst)`` spends one token of
a bucket that holds at most ``burst`` and refills at ``rate`` per second, or refuses and calls
``on_tokens(key)`` once a token can be had. The scheduler calls it before each message of a lane
whose rule has a per-pool rate, and a refused lane waits for that callback (no polling), so the
same setting means the same thing on one node and on a cluster.

Why PostgreSQL and not Redis (see docs/cluster.md): the cluster already depends on PostgreSQL,
replicated and failed over; a second stateful service would double what can fail. The cost is
kept low by taking tokens in chunks: a node takes about ``chunk`` seconds' worth of the rate in
one statement and spends it locally, so the database sees a few statements per second per limit,
not one per message. The bucket never grants more than it holds; sharing between nodes is first
come, first served per chunk.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Protocol

from ..spool import PostgresSpool
from ..spool.postgres import UNREACHABLE

log = logging.getLogger("postlane.cluster")

DB_RETRY = 1.0
"""Seconds before asking the database again after a failed take (no tokens meanwhile)."""


class RateLimiter(Protocol):
    """What the scheduler needs from a rate limiter (``LocalRate`` or ``SharedRate``)."""

    on_tokens: Callable[[str], None] | None

    def try_acquire(self, key: str, rate: float, burst: float) -> bool: ...

    def available(self, key: str, rate: float, burst: float) -> float: ...


class LocalRate:
    """Token buckets in this process: the one-node (SQLite) form of ``SharedRate``."""

    def __init__(self, on_tokens: Callable[[str], None] | None = None) -> None:
        self.on_tokens = on_tokens
        self._buckets: dict[str, tuple[float, float]] = {}
        """key -> (tokens, monotonic time they were counted); a new bucket starts full."""
        self._timers: dict[str, asyncio.TimerHandle] = {}

    def try_acquire(self, key: str, rate: float, burst: float) -> bool:
        """Spend one token of ``key``, or refuse and call ``on_tokens`` when one has refilled."""
        now = time.monotonic()
        tokens, then = self._buckets.get(key, (burst, now))
        tokens = min(burst, tokens + rate * (now - then))
        if tokens >= 1.0:
            self._buckets[key] = (tokens - 1.0, now)
            return True
        self._buckets[key] = (tokens, now)
        if key not in self._timers:
            self._timers[key] = asyncio.get_running_loop().call_later(
                (1.0 - tokens) / rate, self._refilled, key)
        return False

    def available(self, key: str, rate: float, burst: float) -> float:
        """Tokens of ``key`` that could be spent now (the scheduler opens no more connections
        than that)."""
        now = time.monotonic()
        tokens, then = self._buckets.get(key, (burst, now))
        return min(burst, tokens + rate * (now - then))

    def _refilled(self, key: str) -> None:
        self._timers.pop(key, None)
        if self.on_tokens is not None:
            self.on_tokens(key)


class SharedRate:
    """Token buckets in the shared spool, with this node's tokens in hand.

    Bounds: the buckets never grant more than ``burst + rate × t`` over ``t`` seconds; what a
    node holds in hand (at most one chunk, ``rate × chunk`` tokens, per node and key) may be
    spent on top of that in a window, so over ``t`` seconds a cluster of ``n`` nodes sends at
    most ``burst + rate × (t + n × chunk)``. Tokens left in hand when a node stops are lost,
    never added: the limit errs on the slow side. If the database is away no tokens are granted,
    so a rate-limited destination pauses rather than exceeds its limit.
    """

    def __init__(self, spool: PostgresSpool, chunk: float = 0.5,
                 on_tokens: Callable[[str], None] | None = None) -> None:
        self.spool = spool
        self.chunk = chunk
        self.on_tokens = on_tokens
        """Called with the key when tokens arrive after a refusal (the scheduler kicks)."""
        self._hand: dict[str, float] = {}
        self._limits: dict[str, tuple[float, float]] = {}
        self._refilling: dict[str, asyncio.Task] = {}
        self._later: dict[str, asyncio.TimerHandle] = {}
        self._refused: set[str] = set()
        self._waiters: dict[str, list[asyncio.Future]] = {}

    def try_acquire(self, key: str, rate: float, burst: float) -> bool:
        """Spend one token of ``key`` if this node holds one; otherwise start fetching some
        and refuse (the caller waits for ``on_tokens``). Never blocks the event loop."""
        self._limits[key] = (rate, burst)
        tokens = self._hand.get(key, 0.0)
        if tokens >= 1.0:
            self._hand[key] = tokens - 1.0
            if tokens - 1.0 < 1.0:  # fetch the next chunk while this message goes out
                self._refill(key)
            return True
        self._refused.add(key)
        self._refill(key)
        return False

    def available(self, key: str, rate: float, burst: float) -> float:
        """Tokens of ``key`` in this node's hand (the scheduler opens no more connections than
        that, and at least one to ask for more)."""
        return self._hand.get(key, 0.0)

    async def acquire(self, key: str, rate: float, burst: float) -> None:
        """Wait until a token of ``key`` is this node's and spend it."""
        while not self.try_acquire(key, rate, burst):
            fut = asyncio.get_running_loop().create_future()
            self._waiters.setdefault(key, []).append(fut)
            await fut

    def close(self) -> None:
        """Cancel pending fetches (the node is stopping)."""
        for handle in self._later.values():
            handle.cancel()
        self._later.clear()
        for task in self._refilling.values():
            task.cancel()

    def _refill(self, key: str) -> None:
        if key in self._refilling or key in self._later:
            return  # a fetch is running or scheduled: it will call back
        rate, burst = self._limits[key]
        want = min(burst, max(1.0, rate * self.chunk))
        task = asyncio.get_running_loop().create_task(self._take(key, rate, burst, want))
        self._refilling[key] = task

    def _refill_later(self, key: str) -> None:
        self._later.pop(key, None)
        self._refill(key)

    async def _take(self, key: str, rate: float, burst: float, want: float) -> None:
        failed = False
        try:
            granted = await self.spool.take_tokens(key, rate, burst, want)
        except UNREACHABLE:  # the database is away (told once by the spool): ask again later
            granted, failed = 0.0, True
        except Exception:  # a bug: say so, and ask again later
            log.exception("taking rate tokens for %s failed", key)
            granted, failed = 0.0, True
        finally:
            self._refilling.pop(key, None)
        hand = self._hand[key] = self._hand.get(key, 0.0) + granted
        if hand >= 1.0:
            if key in self._refused:
                self._refused.discard(key)
                for fut in self._waiters.pop(key, []):
                    if not fut.done():
                        fut.set_result(None)
                if self.on_tokens is not None:
                    self.on_tokens(key)
            return
        if key not in self._refused:
            return  # a prefetch that found the bucket empty: the next refusal asks again
        # Someone waits and the bucket is (nearly) empty: ask again once a token has refilled,
        # or half a chunk (never longer than half the bucket takes to fill, so no refill is
        # lost to the cap while several nodes share it).
        delay = max((1.0 - hand) / rate, min(self.chunk, burst / rate) / 2)
        if failed:
            delay = max(delay, DB_RETRY)
        self._later[key] = asyncio.get_running_loop().call_later(delay, self._refill_later, key)
