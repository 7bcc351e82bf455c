"""Claims and leases on the shared PostgreSQL spool, with two spools standing in for two nodes."""

from __future__ import annotations

import asyncio
import time

import asyncpg
import pytest

from postlane.spool import RecipientUpdate, State
from postlane.spool.postgres import NodeConflict
from tests.support.pg import PG_DSN, pg_schema  # noqa: F401  (fixture)
from tests.support.waiting import until
from tests.test_store_contract import make_message


def ids(rcpts) -> list[tuple[str, int]]:
    return [(r.msg.id, r.idx) for r in rcpts]


async def test_claim_takes_the_most_urgent_first(two_spools):
    a, _ = two_spools
    late, lr, lb = make_message(1, rcpts=1, priority=3)
    urgent, ur, ub = make_message(2, rcpts=1, priority=0)
    soon, sr, sb = make_message(3, rcpts=1, priority=3)
    soon.deadline = late.deadline - 100
    for m, r, b in ((late, lr, lb), (urgent, ur, ub), (soon, sr, sb)):
        await a.enqueue(m, r, b)
    got = await a.claim("a", "bulk", 2, 30)
    assert ids(got) == [(urgent.id, 0), (soon.id, 0)]
    assert a.body(urgent.id) == ub
    assert got[0].msg.remaining == 1
    assert ids(await a.claim("a", "bulk", 5, 30)) == [(late.id, 0)]
    assert await a.claim("a", "bulk", 5, 30) == []
    assert await a.claim("a", "other-pool", 5, 30) == []


async def test_concurrent_claims_never_overlap(two_spools):
    a, b = two_spools
    await asyncio.gather(*(a.enqueue(*make_message(i, rcpts=3)) for i in range(40)))
    got_a, got_b = [], []
    for _ in range(6):
        ra, rb = await asyncio.gather(a.claim("a", "bulk", 11, 30), b.claim("b", "bulk", 11, 30))
        got_a += ids(ra)
        got_b += ids(rb)
    assert not set(got_a) & set(got_b)
    assert len(got_a) + len(got_b) == 120 == len(set(got_a) | set(got_b))


async def test_expired_lease_is_taken_over_and_renewal_prevents_it(two_spools):
    a, b = two_spools
    await a.register("keeper", "host-a", 1)
    for i in range(2):
        await a.enqueue(*make_message(i, rcpts=1))
    # 2 s leases: the steps below must each come within them on a loaded machine (0.5 s did
    # not leave enough room under CI's load)
    assert len(await a.claim("a", "bulk", 1, 2.0)) == 1
    assert len(await a.claim("keeper", "bulk", 1, 2.0)) == 1
    assert await b.claim("b", "bulk", 5, 30) == []
    await asyncio.sleep(1.0)  # real time: the heartbeat gap below and the 2 s leases age
    draining, gap = await a.heartbeat("keeper", 30)  # a heartbeat with a lease renews
    assert draining is False and 1.0 <= gap < 10
    await asyncio.sleep(1.2)  # real time: a's 2 s lease lapses (keeper's was renewed for 30 s)
    taken = await b.claim("b", "bulk", 5, 30)
    assert ids(taken) == [("M000000", 0)], "the lapsed lease moves, the renewed one stays"


async def test_heartbeat_skips_rows_an_outcome_is_writing(two_spools):
    """The lease renewal never waits for a row lock: a node's own outcome commit (another
    connection) holds one recipient and would wait for another the renewal had locked first,
    a deadlock PostgreSQL breaks after a second by failing one of them (seen in a 2-node bench:
    "heartbeat failed: deadlock detected", notices' p99 1.1 s)."""
    a, _ = two_spools
    await a.register("keeper", "host-a", 1)
    for i in range(2):
        await a.enqueue(*make_message(i, rcpts=1))
    assert len(await a.claim("keeper", "bulk", 2, 0.5)) == 2
    outcome = await asyncpg.connect(PG_DSN, server_settings={"search_path": a.schema})
    try:
        async with outcome.transaction():
            await outcome.execute("UPDATE recipients SET state = 'delivered'"
                                  " WHERE msg_id = 'M000000'")
            renewed = await asyncio.wait_for(a.heartbeat("keeper", 30), 20)
            assert renewed is not None, "it returns while the outcome's lock is held"
            leases = dict(await outcome.fetch(
                "SELECT msg_id, lease_until - extract(epoch FROM clock_timestamp())"
                " FROM recipients"))
            assert leases["M000001"] > 10, "the free row's lease was renewed"
            assert leases["M000000"] < 1, "the locked one was skipped (it is being finished)"
    finally:
        await outcome.close()


async def test_release_and_node_restart_give_work_back(two_spools):
    a, b = two_spools
    await a.enqueue(*make_message(1, rcpts=2))
    await a.claim("a", "bulk", 5, 30)
    assert await b.claim("b", "bulk", 5, 30) == []
    assert await a.release("a") == 2
    assert len(await b.claim("b", "bulk", 5, 30)) == 2
    await b.register("b", "host-b", 1)  # a restarted "b" holds nothing any more
    assert len(await a.claim("a", "bulk", 5, 30)) == 2


async def test_paused_skipped_domains_and_future_retries_are_not_claimed(two_spools):
    a, _ = two_spools
    m, r, body = make_message(1, rcpts=1)
    await a.enqueue(m, r, body)
    m2, r2, b2 = make_message(2, rcpts=1)
    r2[0].next_attempt = time.time() + 3600
    r2[0].state = State.DEFERRED
    await a.enqueue(m2, r2, b2)
    await a.set_paused("bulk", "*", True)
    assert await a.claim("a", "bulk", 5, 30) == []
    await a.set_paused("bulk", "*", False)
    await a.set_paused("bulk", "example.com", True)
    assert await a.claim("a", "bulk", 5, 30) == []
    await a.set_paused("bulk", "example.com", False)
    assert await a.claim("a", "bulk", 5, 30, skip_domains=["example.com"]) == []
    assert ids(await a.claim("a", "bulk", 5, 30)) == [(m.id, 0)]


async def test_message_split_across_nodes_is_deleted_by_the_last_one(two_spools):
    a, b = two_spools
    m, r, body = make_message(1, rcpts=2)
    await a.enqueue(m, r, body)
    [ra] = await a.claim("a", "bulk", 1, 30)
    [rb] = await b.claim("b", "bulk", 1, 30)
    assert (ra.idx, rb.idx) == (0, 1) and ra.msg.remaining == rb.msg.remaining == 1
    a.update([RecipientUpdate(m.id, 0, State.DELIVERED, 1, 0.0, "250 ok")])
    a.finish(m.id)
    await a.flush()
    assert len((await b.pending()).recipients) == 1, "b's recipient is still queued"
    b.update([RecipientUpdate(m.id, 1, State.DELIVERED, 1, 0.0, "250 ok")])
    b.finish(m.id)
    await b.flush()
    async with a.acquire() as conn:
        assert await conn.fetchval("SELECT count(*) FROM messages") == 0
        assert await conn.fetchval("SELECT count(*) FROM bodies") == 0


async def test_a_live_node_name_cannot_be_used_twice(two_spools):
    a, b = two_spools
    session = await a.session("n1", lambda _channel, _payload: None)
    await a.register("n1", "host-a", 1)
    with pytest.raises(NodeConflict, match="already live"):
        await b.session("n1", lambda _channel, _payload: None)
    assert (await a.heartbeat("n1"))[0] is False
    assert await b.request_drain("n1") is True
    assert (await a.heartbeat("n1"))[0] is True
    assert await b.request_drain("nobody") is False
    assert await b.heartbeat("nobody") is None
    await b.register("n2", "host-b", 2)
    nodes = await a.nodes()
    assert [(n.name, n.session) for n in nodes] == [("n1", True), ("n2", False)]
    await session.close()  # n1 died: its name is free at once, whatever its heartbeat says
    replacement = await b.session("n1", lambda _channel, _payload: None)
    await replacement.close()


async def test_a_stalled_node_neither_reclaims_its_own_rows_nor_revives_delivered_ones(two_spools):
    a, b = two_spools
    m, r, body = make_message(1, rcpts=1)
    await a.enqueue(m, r, body)
    assert len(await a.claim("a", "bulk", 1, 0.2)) == 1
    # real time: "a" stalls past its 0.2 s lease while still holding the recipient
    await asyncio.sleep(0.4)
    assert await a.claim("a", "bulk", 1, 30) == [], "already in a's memory"
    assert len(await b.claim("b", "bulk", 1, 30)) == 1
    b.update([RecipientUpdate(m.id, 0, State.DELIVERED, 1, 0.0, "250 ok")])
    await b.flush()
    a.update([RecipientUpdate(m.id, 0, State.DEFERRED, 1, 0.0, "451 later")])  # a wakes up
    await a.flush()
    async with a.acquire() as conn:
        assert await conn.fetchval("SELECT state FROM recipients") == "delivered"


async def test_outcomes_are_retried_across_a_lost_database_connection(two_spools):
    a, _ = two_spools
    m, r, body = make_message(1, rcpts=2)
    await a.enqueue(m, r, body)
    conn = await asyncpg.connect(PG_DSN)
    try:
        killed = await conn.fetchval(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
            " WHERE application_name = $1", a.app_name)
        assert killed >= 1
        a.update([RecipientUpdate(m.id, 0, State.DELIVERED, 1, 0.0, "250 ok")])

        async def delivered() -> bool:
            return await conn.fetchval(
                f'SELECT state FROM "{a.schema}".recipients WHERE idx = 0') == "delivered"

        await until(delivered, timeout=10, step=0.05,
                    what="the outcome written once the database was back")
        await a.enqueue(*make_message(2, rcpts=1))  # and the spool works on
    finally:
        await conn.close()


async def test_without_takeover_lapsed_leases_stay_with_their_owner(two_spools):
    a, b = two_spools
    await a.enqueue(*make_message(1, rcpts=1))
    await a.enqueue(*make_message(2, rcpts=1))
    assert len(await a.claim("a", "bulk", 1, 0.2)) == 1
    await asyncio.sleep(0.4)  # real time: a's 0.2 s lease lapses
    assert ids(await b.claim("b", "bulk", 5, 30, takeover=False)) == [("M000002", 0)]
    assert ids(await b.claim("b", "bulk", 5, 30)) == [("M000001", 0)]


async def test_dead_nodes_work_is_given_back_and_live_ones_kept(two_spools):
    a, b = two_spools
    sessions = {name: await a.session(name, lambda _channel, _payload: None)
                for name in ("killed", "stalled", "frozen", "fine")}
    for i, name in enumerate(sessions):
        await a.register(name, "host-a", i)
        await a.enqueue(*make_message(i, rcpts=2))
        assert len(await a.claim(name, "bulk", 2, 30)) == 2
    await sessions.pop("killed").close()  # its process died: the session closes
    await asyncio.sleep(2.0)  # real time: nobody heartbeats for 2 s ...
    await a.heartbeat("fine")  # ... but "fine", which must stay younger than 1 s below
    assert await b.reap("b", 5.0, 30.0) == {}, "heartbeats younger than dead_after"
    assert await b.reap("b", 1.0, 30.0) == {"killed": 2}, "session closed, heartbeat old"
    assert await b.reap("b", 1.0, 30.0) == {}, "given back once"
    assert await b.reap("b", 1.0, 1.5) == {"stalled": 2, "frozen": 2}, "past the lease"
    assert {(r.msg.id, r.idx) for r in await b.claim("b", "bulk", 10, 30)} == {
        ("M000000", 0), ("M000000", 1), ("M000001", 0), ("M000001", 1),
        ("M000002", 0), ("M000002", 1)}
    assert await a.owned("fine") == {("M000003", 0), ("M000003", 1)}
    for session in sessions.values():
        await session.close()
