"""Cluster-wide rate limits: token buckets in PostgreSQL, taken in chunks by each node."""

from __future__ import annotations

import asyncio
import time

from postlane.scheduler.shared_rate import SharedRate
from tests.support.pg import PG_DSN, pg_schema  # noqa: F401  (fixture)


async def test_bucket_grants_its_burst_then_its_rate(two_spools):
    a, b = two_spools
    assert await a.take_tokens("gmail", 10.0, 5.0, 8.0) == 5.0, "a full bucket holds the burst"
    assert await b.take_tokens("gmail", 10.0, 5.0, 8.0) < 1.0, "the other node finds it empty"
    await asyncio.sleep(0.6)
    assert await b.take_tokens("gmail", 10.0, 5.0, 8.0) == 5.0, "refilled, capped at the burst"
    assert await a.take_tokens("outlook", 10.0, 5.0, 2.0) == 2.0, "buckets are per key"


async def test_two_nodes_together_stay_within_the_shared_rate(two_spools):
    a, b = two_spools
    rate, burst = 40.0, 5.0
    spent = {"a": 0, "b": 0}
    limiters = {"a": SharedRate(a, chunk=0.2), "b": SharedRate(b, chunk=0.2)}
    started = time.monotonic()

    async def send(name: str) -> None:
        while time.monotonic() - started < 1.0:
            await limiters[name].acquire("yahoo", rate, burst)
            spent[name] += 1

    await asyncio.gather(send("a"), send("b"))
    elapsed = time.monotonic() - started
    assert sum(spent.values()) <= burst + rate * elapsed + 1, (spent, elapsed)
    assert spent["a"] > 0 and spent["b"] > 0


async def test_try_acquire_refuses_then_calls_back_when_tokens_arrive(two_spools):
    a, _ = two_spools
    arrived = asyncio.Event()
    limiter = SharedRate(a, on_tokens=lambda key: arrived.set())
    assert limiter.try_acquire("gmx", 10.0, 3.0) is False, "no tokens in hand yet"
    await asyncio.wait_for(arrived.wait(), 10)
    assert [limiter.try_acquire("gmx", 10.0, 3.0) for _ in range(4)] == [True, True, True, False]
