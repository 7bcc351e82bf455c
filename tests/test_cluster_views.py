"""What any node of a cluster says about one message: every node finds it wherever it waits.

A message waits in the shared spool unclaimed (its pool paused, or simply not claimed yet: each
node claims only what its slots can use soon), or claimed by another node (a deferred recipient
stays with the node that tried it). Asked about it by queue id, correlation id or recipient
address, every node must show it, not answer "no message ... never queued".
"""

from __future__ import annotations

import asyncio
import json
import signal

import asyncpg

from postlane.monitor.alerts import Condition
from postlane.spool import PostgresSpool
from tests.conftest import OPERATOR, message, send
from tests.support.pg import PG_DSN, pg_schema  # noqa: F401  (fixture)
from tests.support.waiting import until
from tests.test_api import api_client
from tests.test_cluster import Served, _until, cluster_text, start_node
from tests.test_cluster_ops import cli

SLOW_RETRY = ('[classes.claims]\npool = "critical"\npriority = 1\nretry = ["1h"]\n'
              'expiry = "2h"\n')
"""A class whose deferred mail waits an hour: it stays deferred, with the node that tried it."""


async def _queue_id(node, address: str) -> str:
    async with node.spool.acquire() as conn:
        return await conn.fetchval("SELECT msg_id FROM recipients WHERE address = $1", address)


async def test_every_node_finds_a_message_wherever_it_waits_in_the_cluster(
        tmp_path, sink, pg_schema):  # noqa: F811
    sink.rcpt_replies = {"busy@example.com": ["450 4.2.1 mailbox busy"]}
    a = await start_node(cluster_text(tmp_path, sink.port, pg_schema, "node-a",
                                          SLOW_RETRY))
    b = await start_node(cluster_text(tmp_path, sink.port, pg_schema, "node-b", SLOW_RETRY))
    try:
        await a.operations.pause("bulk", who=OPERATOR)
        await _until(lambda: ("bulk", "*") in b.scheduler.paused)
        # unclaimed: its pool is paused, so no node holds it
        await send(b.listeners[0].port, "sender@insurer.test", ["waiting@example.com"],
                   message("waiting", extra="X-Correlation-ID: corr-waiting\r\n"))
        # claimed: deferred by the node that tried it, which keeps it for its retries
        await send(b.listeners[0].port, "sender@insurer.test", ["busy@example.com"],
                   message("busy", cls="claims"))
        await until(lambda: sink.rcpt_attempts["busy@example.com"] >= 1, timeout=30)
        waiting = await _queue_id(a, "waiting@example.com")
        busy = await _queue_id(a, "busy@example.com")

        async def deferred_somewhere() -> bool:
            async with a.spool.acquire() as conn:
                return await conn.fetchval(
                    "SELECT state = 'deferred' AND lease_owner IS NOT NULL FROM recipients"
                    " WHERE address = 'busy@example.com'")

        await until(deferred_somewhere, timeout=30, what="busy@ deferred and kept by its node")
        for node in (a, b):
            name = node.config.node.name
            async with api_client(node, tmp_path) as client:
                for qid, address in ((waiting, "waiting@example.com"),
                                     (busy, "busy@example.com")):
                    shown = await client.get(f"/api/v1/queue/messages/{qid}")
                    assert shown.status_code == 200, (name, address, shown.text)
                    assert [r["address"] for r in shown.json()["recipients"]] == [address]
                    found = await client.get(f"/api/v1/messages/{qid}")
                    assert found.status_code == 200, (name, address, found.text)
                    assert [r["address"] for r in found.json()["recipients"]] == [address]
                    by_rcpt = (await client.get("/api/v1/messages",
                                                params={"recipient": address})).json()
                    assert [m["queue_id"] for m in by_rcpt["messages"]] == [qid], (name, address)
                by_corr = (await client.get("/api/v1/messages",
                                            params={"correlation_id": "corr-waiting"})).json()
                assert [m["queue_id"] for m in by_corr["messages"]] == [waiting], name
                [rcpt] = (await client.get(f"/api/v1/queue/messages/{waiting}")).json()[
                    "recipients"]
                assert rcpt["state"] == "queued"
        assert sink.arrivals == [], "looking moved nothing"
    finally:
        await asyncio.gather(a.stop(), b.stop())


async def test_a_stalled_evaluator_hands_the_clusters_figures_and_alerts_over(
        tmp_path, sink, pg_schema):  # noqa: F811
    """An evaluator that stalls with its session open (SIGSTOP: a frozen process whose kernel
    still answers) kept the monitor's lock: every node went on showing its last figures - the
    stalled node "alive" - and nobody evaluated the SLA rules, however long it stalled. Its
    work is taken over when its leases lapse; so is the evaluation."""
    a = Served(tmp_path, "node-a", cluster_text(tmp_path, sink.port, pg_schema, "node-a"))
    b = None
    try:
        await a.port()

        async def evaluated_by(node: Served, name: str) -> bool:
            sla = await node.api("/api/v1/sla")
            return isinstance(sla, dict) and sla["evaluated_by"] == name and not sla["stale"]

        await until(lambda: evaluated_by(a, "node-a"), timeout=30, what="node-a evaluates")
        b = Served(tmp_path, "node-b", cluster_text(tmp_path, sink.port, pg_schema, "node-b"))
        await b.port()
        a.proc.send_signal(signal.SIGSTOP)

        async def taken_over() -> bool:
            status = await b.api("/api/v1/status")
            assert isinstance(status, dict)
            states = {n["name"]: n["state"] for n in status["cluster"]["nodes"]}
            return status["cluster"]["evaluated_by"] == "node-b" and states == {
                "node-a": "dead", "node-b": "alive"}

        await until(taken_over, timeout=60, step=0.2,
                    what="node-b evaluates and shows node-a dead")
        metrics = await b.api("/metrics")
        assert 'postlane_cluster_nodes{state="dead"} 1.0' in metrics
        assert "postlane_cluster_evaluator 1.0" in metrics
        a.proc.send_signal(signal.SIGCONT)  # it wakes: it finds the lock gone and reads
        await until(lambda: evaluated_by(a, "node-b"), timeout=60,
                    what="node-a shows node-b's figures")
        assert "postlane_cluster_evaluator 0.0" in await a.api("/metrics")
        assert [r for r in a.lines() if r.get("msg", "").startswith(
            "lost the cluster monitor's lock")], "node-a says it lost the evaluation"
    finally:
        a.proc.send_signal(signal.SIGCONT)
        await asyncio.to_thread(a.stop)
        if b is not None:
            await asyncio.to_thread(b.stop)


async def test_a_drain_asked_of_a_dead_node_is_refused_not_promised(tmp_path,
                                                                    pg_schema):  # noqa: F811
    """`cluster drain` of a node killed a minute ago answered "drain requested (it stops within
    3s)" and put the operator's drain on the record: nothing runs there to stop. A node whose
    session is closed is told as not running, and nothing is recorded."""
    path = tmp_path / "node.toml"
    path.write_text(cluster_text(tmp_path, 2525, pg_schema, "node-x"))
    spool = PostgresSpool(PG_DSN, pg_schema)
    await spool.open()
    try:
        await spool.register("node-a", "host-a", 4242)  # registered; no session holds its name
        out = await asyncio.to_thread(cli, "cluster", "drain", "node-a", "-c", str(path))
        assert out.returncode == 1, out.stdout
        assert "node-a is not running (its session is closed)" in out.stderr
        assert "drain requested" not in out.stdout
        async with spool.acquire() as conn:
            assert await conn.fetchval("SELECT draining FROM nodes WHERE name = 'node-a'") \
                is False
            assert await conn.fetchval("SELECT count(*) FROM events") == 0, "nothing recorded"
    finally:
        await spool.close()


async def test_the_reputation_alerts_are_the_clusters_too(tmp_path, sink,
                                                          pg_schema):  # noqa: F811
    """The reputation service's alerts (SNDS red, Gmail reputation, DMARC) come from its view of
    the shared reputation store, the same on every node; the cluster's evaluator ran only the
    SLA rules, so in a cluster they never fired, on any node."""
    a = await start_node(cluster_text(tmp_path, sink.port, pg_schema, "node-a"))
    b = await start_node(cluster_text(tmp_path, sink.port, pg_schema, "node-b"))
    try:
        red = Condition("snds-red", "127.0.0.30", "bulk", 2.0, 2.0,
                        "SNDS: 127.0.0.30 is RED (spam trap hits)")
        for node in (a, b):  # what each node's view of the shared store computes
            node.reputation._conditions = [red]

        async def fired() -> list[dict] | None:
            lists = [await n.monitor.alert_lists() for n in (a, b)]
            return lists if all(x["active"] for x in lists) else None

        lists = await until(fired, timeout=30, what="the reputation alert on both nodes")
        for alerts in lists:
            assert [x["id"] for x in alerts["active"]] == ["snds-red:127.0.0.30"]
        async with a.spool.acquire() as conn:
            assert await conn.fetchval("SELECT count(*) FROM alerts") == 1, "one alert, once"
    finally:
        await asyncio.gather(a.stop(), b.stop())


async def _lane(lanes, pool: str) -> bool:
    return any(x["pool"] == pool for x in await lanes)


async def _paused_campaign_and_deferrals(a, b, busy: list) -> None:
    """Pool bulk paused (on a, seen by b) with three messages waiting in it (w0..w2@, taken
    by b), and each (node, address) of ``busy`` sent a claims message there that its receiver
    defers: kept by that node until its retry."""
    await a.operations.pause("bulk", who=OPERATOR)
    await _until(lambda: ("bulk", "*") in b.scheduler.paused)
    for i in range(3):
        await send(b.listeners[0].port, "sender@insurer.test", [f"w{i}@example.com"],
                   message(f"w{i}"))
    for node, address in busy:
        await send(node.listeners[0].port, "sender@insurer.test", [address],
                   message(address.partition("@")[0], cls="claims"))

    async def all_deferred() -> bool:
        async with a.spool.acquire() as conn:
            return await conn.fetchval(
                "SELECT count(*) FROM recipients WHERE state = 'deferred'"
                " AND lease_owner IS NOT NULL") == len(busy)

    await until(all_deferred, timeout=30, what="the busy recipients deferred, kept by their node")


async def test_the_queue_listing_is_the_clusters_on_every_node(tmp_path, sink,
                                                               pg_schema):  # noqa: F811
    """`queue list` (GET /queue/messages) listed only what the asked node had claimed (and
    held mail): "0 messages" on every node while the status counted a paused pool's mail, and
    each node a different part of a campaign. It lists the cluster's queue, on every node."""
    sink.rcpt_replies = {"busy@example.com": ["450 4.2.1 mailbox busy"]}
    a = await start_node(cluster_text(tmp_path, sink.port, pg_schema, "node-a",
                                          SLOW_RETRY))
    b = await start_node(cluster_text(tmp_path, sink.port, pg_schema, "node-b", SLOW_RETRY))
    try:
        await _paused_campaign_and_deferrals(a, b, [(a, "busy@example.com")])
        waiting = [await _queue_id(a, f"w{i}@example.com") for i in range(3)]
        busy = await _queue_id(a, "busy@example.com")
        for node in (a, b):
            name = node.config.node.name
            async with api_client(node, tmp_path) as client:
                every = (await client.get("/api/v1/queue/messages")).json()
                assert sorted(m["queue_id"] for m in every["messages"]) == sorted(
                    [*waiting, busy]), name
                assert (every["total_messages"], every["total_recipients"]) == (4, 4), name
                first = (await client.get("/api/v1/queue/messages",
                                          params={"limit": 1})).json()
                assert [m["queue_id"] for m in first["messages"]] == [waiting[0]], name
                assert first["total_messages"] == 4, name
                bulk = (await client.get("/api/v1/queue/messages",
                                         params={"pool": "bulk", "state": "queued"})).json()
                assert [m["queue_id"] for m in bulk["messages"]] == waiting, name
                deferred = (await client.get("/api/v1/queue/messages",
                                             params={"state": "deferred"})).json()
                assert [m["queue_id"] for m in deferred["messages"]] == [busy], name

                async def shared_lanes() -> list:
                    return (await client.get("/api/v1/status")).json()["cluster"]["lanes"]

                await until(lambda: _lane(shared_lanes(), "bulk"), what="the shared lanes")
                lanes = await shared_lanes()
                # the status's shared lanes say which are paused, as `cluster status` does
                assert sorted((x["pool"], x["domain"], x["paused"]) for x in lanes) == [
                    ("bulk", "example.com", True), ("critical", "example.com", False)], name
        assert sink.arrivals == []
    finally:
        await asyncio.gather(a.stop(), b.stop())


async def test_queue_shape_and_deferrals_are_the_clusters_on_every_node(
        tmp_path, sink, pg_schema):  # noqa: F811
    """`queue shape` and `queue deferrals` counted what the asked node held: the paused pool's
    mail was in no node's shape, and each node showed its own deferrals."""
    sink.rcpt_replies = {f"busy{i}@example.com": ["450 4.2.1 mailbox busy"] for i in range(2)}
    a = await start_node(cluster_text(tmp_path, sink.port, pg_schema, "node-a", SLOW_RETRY))
    b = await start_node(cluster_text(tmp_path, sink.port, pg_schema, "node-b", SLOW_RETRY))
    try:
        await _paused_campaign_and_deferrals(a, b, [(a, "busy0@example.com"),
                                                   (b, "busy1@example.com")])
        for node in (a, b):
            name = node.config.node.name
            async with api_client(node, tmp_path) as client:
                shape = (await client.get("/api/v1/queue/shape")).json()
                totals = {row["key"]: row["total"] for row in shape["rows"]}
                assert totals == {"TOTAL": 5, "example.com": 5}, (name, shape)
                reasons = (await client.get("/api/v1/queue/deferrals")).json()["reasons"]
                assert [(r["reason"], r["recipients"]) for r in reasons] == [
                    ("450 4.2.1 mailbox busy", 2)], name
    finally:
        await asyncio.gather(a.stop(), b.stop())


async def test_a_dead_node_that_will_not_come_back_can_be_forgotten(tmp_path,
                                                                    pg_schema):  # noqa: F811
    """A node killed and never restarted stayed listed DEAD, and counted as dead in /metrics,
    for ever (only a node started under its name could clear it). `cluster forget` removes it,
    on the record; refused while its session is open or it still holds work."""
    path = tmp_path / "node.toml"
    path.write_text(cluster_text(tmp_path, 2525, pg_schema, "node-x"))
    spool = PostgresSpool(PG_DSN, pg_schema)
    await spool.open()
    lock = f"hashtext('postlane/{pg_schema}'), hashtext('node-a')"
    session = await asyncpg.connect(PG_DSN)  # node-a's session: the name lock a live node holds
    try:
        await spool.register("node-a", "host-a", 4242)
        await session.execute(f"SELECT pg_advisory_lock({lock})")
        alive = await asyncio.to_thread(cli, "cluster", "forget", "node-a", "-c", str(path))
        assert alive.returncode == 1 and "node-a is running (its session is open)" in \
            alive.stderr
        await session.close()  # killed; it still holds a recipient nobody took over yet
        async with spool.acquire() as conn:
            await conn.execute(
                "INSERT INTO messages (id, cls, pool, mail_from, queued_at, deadline, expire_at,"
                " priority, size) VALUES ('Q1', 'marketing', 'bulk', 's@x.test', 0, 1e10, 1e10,"
                " 3, 1)")
            await conn.execute(
                "INSERT INTO recipients (msg_id, idx, address, domain, state, attempts,"
                " next_attempt, cls, pool, priority, deadline, lease_owner, lease_until)"
                " VALUES ('Q1', 0, 'r@example.com', 'example.com', 'queued', 0, 0, 'marketing',"
                " 'bulk', 3, 1e10, 'node-a', 1e10)")
        holding = await asyncio.to_thread(cli, "cluster", "forget", "node-a", "-c", str(path))
        assert holding.returncode == 1 and "node-a still holds 1 recipients" in holding.stderr
        async with spool.acquire() as conn:  # a live node gave it back
            await conn.execute("UPDATE recipients SET lease_owner = NULL, lease_until = NULL")
            assert await conn.fetchval("SELECT count(*) FROM events") == 0, "nothing recorded"
        out = await asyncio.to_thread(cli, "cluster", "forget", "node-a", "-c", str(path),
                                      "--json")
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout) == {"node": "node-a", "forgotten": True}
        assert [n.name for n in await spool.nodes()] == []
        async with spool.acquire() as conn:
            assert await conn.fetchval("SELECT count(*) FROM events") == 1, "on the record"
        missing = await asyncio.to_thread(cli, "cluster", "forget", "node-a", "-c", str(path))
        assert missing.returncode == 1 and "no node named 'node-a'" in missing.stderr
    finally:
        if not session.is_closed():
            await session.close()
        await spool.close()
