"""Rate limits that hold across the nodes of a cluster (e.g. "gmail.com: 50 messages/s in all").

Why PostgreSQL and not Redis (see docs/cluster.md): the cluster already depends on PostgreSQL,
replicated and failed over; a second stateful service would double what can fail. The cost is
kept low by taking tokens in chunks: a node takes about ``chunk`` seconds' worth of the rate in
one statement and spends it locally, so the database sees a few statements per second per limit,
not one per message. The global limit holds exactly (the bucket never grants more than it
holds); sharing between nodes is first come, first served per chunk.

Not wired yet: the scheduler's destination rules are being written separately. A rule with a
cluster-wide rate calls ``try_acquire`` before each message and, when refused, waits for
``on_tokens`` (or ``acquire``). With one node (SQLite) a local limit in the rule is enough.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from ..spool import PostgresSpool

log = logging.getLogger("postlane.cluster")


class SharedRate:
    """Token buckets in the shared spool, with this node's tokens in hand."""

    def __init__(self, spool: PostgresSpool, chunk: float = 0.5,
                 on_tokens: Callable[[str], None] | None = None) -> None:
        self.spool = spool
        self.chunk = chunk
        self.on_tokens = on_tokens
        """Called with the key when tokens arrive after a refusal (the scheduler kicks)."""
        self._hand: dict[str, float] = {}
        self._refilling: dict[str, asyncio.Task] = {}

    def try_acquire(self, key: str, rate: float, burst: float) -> bool:
        """Spend one token of ``key`` if this node holds one; otherwise start fetching some
        and refuse (the caller waits for ``on_tokens``). Never blocks the event loop."""
        tokens = self._hand.get(key, 0.0)
        if tokens >= 1.0:
            self._hand[key] = tokens - 1.0
            if tokens - 1.0 < 1.0:  # fetch the next chunk while this message goes out
                self._refill(key, rate, burst)
            return True
        self._refill(key, rate, burst)
        return False

    async def acquire(self, key: str, rate: float, burst: float) -> None:
        """Wait until a token of ``key`` is this node's and spend it."""
        while not self.try_acquire(key, rate, burst):
            task = self._refilling.get(key)
            if task is not None:
                await asyncio.shield(task)
            if self._hand.get(key, 0.0) < 1.0:
                await asyncio.sleep(min(1.0, 1.0 / rate))

    def _refill(self, key: str, rate: float, burst: float) -> None:
        if key in self._refilling:
            return
        want = max(1.0, rate * self.chunk)
        task = asyncio.get_running_loop().create_task(self._take(key, rate, burst, want))
        self._refilling[key] = task

    async def _take(self, key: str, rate: float, burst: float, want: float) -> None:
        try:
            granted = await self.spool.take_tokens(key, rate, burst, want)
        except Exception as exc:  # database away: no tokens, the caller retries later
            log.warning("taking rate tokens for %s failed: %s", key, exc)
            granted = 0.0
        finally:
            self._refilling.pop(key, None)
        if granted:
            self._hand[key] = self._hand.get(key, 0.0) + granted
            if self.on_tokens is not None:
                self.on_tokens(key)
