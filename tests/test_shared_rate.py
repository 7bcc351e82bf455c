"""Per-pool destination rates: token buckets in PostgreSQL taken in chunks by each node, wired
into the scheduler (two nodes hold one limit together), and the same limit locally on SQLite.

Rates are checked by counting sink arrivals within windows against the token-bucket bound, with
slack; never by tight wall-clock thresholds."""

from __future__ import annotations

import asyncio
import time

import pytest
from pydantic import ValidationError

from postlane.config.model import DestinationRule
from postlane.scheduler.shared_rate import SharedRate
from tests.conftest import OPERATOR, config_text, message, send
from tests.support.pg import PG_DSN, pg_schema  # noqa: F401  (fixture)
from tests.support.waiting import until
from tests.test_cluster import (
    cluster_text,
    delivered_by,
    send_many,
    start_node,
    subjects_of,
)


async def test_bucket_grants_its_burst_then_its_rate(two_spools):
    a, b = two_spools
    started = time.monotonic()
    assert await a.take_tokens("gmail", 10.0, 5.0, 8.0) == 5.0, "a full bucket holds the burst"
    refill = await b.take_tokens("gmail", 10.0, 5.0, 8.0)
    # the other node finds it empty: it gets only what flowed in between the two takes (a
    # fixed "< 1 token" failed once 0.1 s passed between them, as on a loaded machine)
    assert refill <= 10.0 * (time.monotonic() - started), "the other node finds it empty"
    await asyncio.sleep(0.6)  # the scenario: the bucket refills in real time (database clock)
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


# -- wired into the scheduler: destination rules with ``max_rate_per_pool`` ----------------------

RATE_RULE = ('[destinations.example]\ndomains = ["example.com"]\n'
             'max_rate_per_pool = "{rate}"\nburst_per_pool = {burst}\n')


def most_in_window(times: list[float], width: float) -> int:
    """The largest number of arrivals within any ``width`` seconds."""
    times = sorted(times)
    best, first = 0, 0
    for i, t in enumerate(times):
        while t - times[first] > width:
            first += 1
        best = max(best, i - first + 1)
    return best


def test_rule_fields_are_validated():
    rule = DestinationRule.model_validate({"max_rate_per_pool": "600/m"})
    assert rule.max_rate_per_pool == 10.0 and rule.pool_burst == 10.0, "burst: one second"
    assert DestinationRule.model_validate({"max_rate_per_pool": "1/h"}).pool_burst == 1.0
    for bad in ({"burst_per_pool": 5}, {"max_rate_per_pool": 0},
                {"max_rate_per_pool": "5/s", "burst_per_pool": 0.5}):
        with pytest.raises(ValidationError):
            DestinationRule.model_validate(bad)


async def test_two_nodes_hold_a_per_pool_rate_together(tmp_path, sink, pg_schema):  # noqa: F811
    rate, burst, count = 20.0, 5, 120
    extra = RATE_RULE.format(rate="20/s", burst=burst)
    a = await start_node(cluster_text(tmp_path, sink.port, pg_schema, "node-a", extra))
    b = await start_node(cluster_text(tmp_path, sink.port, pg_schema, "node-b", extra))
    try:
        # queue the whole campaign first, so the limit (not intake) sets the pace
        await a.operations.pause("bulk", who=OPERATOR)
        await until(lambda: ("bulk", "*") in b.scheduler.paused, what="node-b took the pause")
        names = [f"r{i:03d}" for i in range(count)]
        acked = await asyncio.gather(
            asyncio.to_thread(send_many, a.listeners[0].port, names[:count // 2]),
            asyncio.to_thread(send_many, b.listeners[0].port, names[count // 2:]))
        assert sum(map(len, acked)) == count
        await a.operations.resume("bulk", who=OPERATOR)
        arrivals = await sink.wait_for(count, timeout=90)
        await asyncio.sleep(0.3)  # a bound after the last arrival: no duplicate comes later
        assert sorted(subjects_of(arrivals)) == names, "every message exactly once"
    finally:
        await a.stop()
        await b.stop()
    times = [arr.time for arr in arrivals]
    # bound: burst + rate × (t + nodes × chunk), chunk = 0.5 s; plus slack for arrival jitter
    assert most_in_window(times, 2.0) <= burst + rate * (2.0 + 2 * 0.5) + 10, times
    assert max(times) - min(times) >= 0.8 * ((count - burst) / rate - 2 * 0.5), times
    da, db = delivered_by(tmp_path, "node-a"), delivered_by(tmp_path, "node-b")
    assert da + db == count and da > 0 and db > 0, f"both nodes sent ({da} + {db})"


async def test_one_node_on_sqlite_holds_the_same_rate_locally(tmp_path, sink, make_node):
    rate, burst, count = 20.0, 5, 80
    node = await make_node(config_text(tmp_path, sink.port,
                                       RATE_RULE.format(rate="1200/m", burst=burst)))
    await node.operations.pause("bulk", who=OPERATOR)
    names = [f"s{i:03d}" for i in range(count)]
    assert len(await asyncio.to_thread(send_many, node.listeners[0].port, names)) == count
    await node.operations.resume("bulk", who=OPERATOR)
    arrivals = await sink.wait_for(count, timeout=60)
    times = [arr.time for arr in arrivals]
    assert most_in_window(times, 1.0) <= burst + rate * 1.0 + 3, times
    assert max(times) - min(times) >= 0.8 * (count - burst) / rate, times


async def test_a_transactional_pool_never_waits_for_campaign_tokens_sqlite(tmp_path, sink,
                                                                          make_node):
    await _transactional_not_held(sink, await make_node(config_text(
        tmp_path, sink.port, RATE_RULE.format(rate="2/m", burst=3))))


async def test_a_transactional_pool_never_waits_for_campaign_tokens_postgresql(
        tmp_path, sink, pg_schema, make_node):  # noqa: F811  (schema dropped after the node)
    await _transactional_not_held(sink, await make_node(cluster_text(
        tmp_path, sink.port, pg_schema, "node-a", RATE_RULE.format(rate="2/m", burst=3))))


async def _transactional_not_held(sink, node) -> None:
    """One message per 30 s after a burst of 3: the campaign empties its pool's bucket at once;
    policy notices to the same destination then go from their own pool's bucket."""
    port = node.listeners[0].port
    await asyncio.to_thread(send_many, port, [f"mkt{i}" for i in range(6)])
    await sink.wait_for(3, timeout=30)
    bulk = node.scheduler.lanes[("bulk", "example.com")]
    await until(lambda: bulk.rate_wait, what="the lane waits for rate tokens")
    await asyncio.to_thread(send_many, port, [f"pol{i}" for i in range(3)], "policy-documents")
    # one bucket for both pools would hold each notice ~30 s
    arrivals = await sink.wait_for(6, timeout=20)
    got = subjects_of(arrivals)
    assert sorted(got[3:]) == ["pol0", "pol1", "pol2"], got
    sent = subjects_of(sink.arrivals)
    assert bulk.rate_wait and sum(s.startswith("mkt") for s in sent) == 3, "the campaign waits"


async def test_a_rate_limited_destination_does_not_stop_a_node_claiming_others(
        tmp_path, sink, pg_schema, make_node):  # noqa: F811  (schema dropped after the node)
    # "other.test" joins the [routes] table that config_text ends with
    extra = f'"other.test" = "127.0.0.1:{sink.port}"\n' + RATE_RULE.format(rate="2/m", burst=1)
    node = await make_node(cluster_text(tmp_path, sink.port, pg_schema, "node-a", extra))
    port = node.listeners[0].port
    await asyncio.to_thread(send_many, port, [f"ex{i:02d}" for i in range(30)])
    await sink.wait_for(1, timeout=30)
    lane = node.scheduler.lanes[("bulk", "example.com")]
    await until(lambda: lane.rate_wait, what="the lane waits for rate tokens")
    for i in range(3):
        await send(port, "sender@insurer.test", [f"o{i}@other.test"], message(f"other{i}"))
    # the node holds more example.com work than its claim target, all waiting for tokens
    arrivals = await sink.wait_for(4, timeout=20)
    assert sorted(subjects_of(arrivals)[1:]) == ["other0", "other1", "other2"]
