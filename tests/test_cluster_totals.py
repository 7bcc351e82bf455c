"""A cluster's totals never go back: the cluster-wide ``delivered_total`` of /api/v1/sla
(``postlane status``, the dashboard) stays what it was when the node evaluating the cluster's
figures changes - at a takeover, a restart of every node, after ``cluster forget`` - and
counts nothing twice.

(The defect this answers: the total was the evaluator's memory - the slices of the last 15
minutes it read when it took over, plus what it saw since - so a takeover after 15 minutes
showed an auditor 5 delivered before and 0 after.)
"""

from __future__ import annotations

import asyncio

import asyncpg

from postlane.accounting.records import Record
from postlane.node import Node
from postlane.operations import forget_node
from postlane.spool.pgschema import MIGRATIONS
from tests.conftest import OPERATOR
from tests.support.pg import PG_DSN, pg_schema  # noqa: F401  (fixture)
from tests.support.waiting import until
from tests.test_cluster import cluster_text, send_many, start_node


async def _figures(node: Node, evaluator: str, total: int | None = None) -> dict:
    """The cluster's figures as ``node`` reads them, once ``evaluator`` computed them (and,
    with ``total``, once they count that many deliveries of marketing)."""
    async def ready() -> dict | None:
        figures = await node.monitor.cluster.current()
        if figures is None or figures["leader"] != evaluator or figures["stale"]:
            return None
        if total is not None and _delivered(figures) != total:
            return None
        return figures

    return await until(ready, timeout=30, step=0.1,
                       what=f"the figures of {evaluator}" + (f" at {total}" if total else ""))


def _delivered(figures: dict) -> int:
    return {c["class"]: c["delivered_total"] for c in figures["classes"]}["marketing"]


def _failed(figures: dict) -> int:
    return {c["class"]: c["failed_total"] for c in figures["classes"]}["marketing"]


async def _rows(schema: str, sql: str, *args) -> list:
    conn = await asyncpg.connect(PG_DSN, server_settings={"search_path": f'"{schema}"'})
    try:
        return await conn.fetch(sql, *args)
    finally:
        await conn.close()


async def _age_slices(schema: str, seconds: int) -> None:
    """What ``seconds`` of time do to the published slices: they fall out of the 15-minute
    window a new evaluator reads (the test cannot wait a quarter of an hour)."""
    conn = await asyncpg.connect(PG_DSN, server_settings={"search_path": f'"{schema}"'})
    try:
        await conn.execute("UPDATE monitor_slices SET at = at - $1", seconds)
    finally:
        await conn.close()


async def test_the_clusters_delivered_total_survives_every_change_of_evaluator(
        tmp_path, sink, pg_schema):  # noqa: F811
    a = await start_node(cluster_text(tmp_path, sink.port, pg_schema, "node-a"))
    b: Node | None = None
    c: Node | None = None
    try:
        await _figures(a, "node-a")  # a evaluates: it was first
        b = await start_node(cluster_text(tmp_path, sink.port, pg_schema, "node-b"))
        await asyncio.to_thread(send_many, a.listeners[0].port, [f"t{i}" for i in range(5)])
        await sink.wait_for(5, timeout=30)
        before = _delivered(await _figures(b, "node-a", 5))

        # 1. a stops within the quarter hour: b takes over and reads the same slices again
        await a.stop()
        a = None
        taken = await _figures(b, "node-b")
        assert _delivered(taken) == before == 5, "counted once, not twice"

        # 2. a quarter of an hour later b stops and a restarted a takes over
        await asyncio.to_thread(send_many, b.listeners[0].port, [f"u{i}" for i in range(3)])
        await sink.wait_for(8, timeout=30)
        await _figures(b, "node-b", 8)
        await _age_slices(pg_schema, 1000)
        await b.stop()
        b = None
        c = await start_node(cluster_text(tmp_path, sink.port, pg_schema, "node-a"))
        restarted = await _figures(c, "node-a")
        assert _delivered(restarted) == 8, "the total never goes back"

        # 3. b left the nodes table as it stopped (what ``cluster forget`` does for a dead
        # node): what it delivered stays counted, and the new deliveries add to it
        assert [n.name for n in await c.spool.nodes()] == ["node-a"]
        assert not await forget_node(c.spool, "node-b", who=OPERATOR, record=c.emit)
        await asyncio.to_thread(send_many, c.listeners[0].port, ["v0"])
        await sink.wait_for(9, timeout=30)
        assert _delivered(await _figures(c, "node-a", 9)) == 9
    finally:
        for node in (a, b, c):
            if node is not None:
                await node.stop()


async def test_a_schema_of_the_previous_release_counts_its_kept_slices_once(
        tmp_path, sink, pg_schema):  # noqa: F811
    """Upgraded from schema 9 (no totals): the slices it kept - the last quarter hour's
    deliveries - are the totals' start, counted once by the first evaluation."""
    conn = await asyncpg.connect(PG_DSN)
    try:
        async with conn.transaction():
            await conn.execute(f'CREATE SCHEMA "{pg_schema}"')
            await conn.execute(f'SET LOCAL search_path TO "{pg_schema}"')
            await conn.execute("CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY,"
                               " applied_at TIMESTAMPTZ NOT NULL DEFAULT now())")
            for version, sql in MIGRATIONS:
                if version <= 9:
                    await conn.execute(sql)
                    await conn.execute("INSERT INTO schema_migrations VALUES ($1)", version)
            # a node of the previous release delivered 3 marketing mails 10 s ago
            # (and one bounced)
            await conn.execute("INSERT INTO monitor_slices VALUES ('old', 'marketing',"
                               " extract(epoch from now())::bigint - 10, 4, '{100}', '{3}')")
    finally:
        await conn.close()
    a = await start_node(cluster_text(tmp_path, sink.port, pg_schema, "node-a"))
    try:
        first = await _figures(a, "node-a")
        assert _delivered(first) == 3 and _failed(first) == 1
        await asyncio.to_thread(send_many, a.listeners[0].port, ["w0"])
        await sink.wait_for(1, timeout=30)
        assert _delivered(await _figures(a, "node-a", 4)) == 4
    finally:
        await a.stop()


async def test_an_outcome_committed_for_a_second_already_counted_still_counts_once(
        tmp_path, sink, pg_schema):  # noqa: F811
    """A final outcome whose commit comes after its second was counted (a commit straddling
    the evaluation, or retried after an outage) is one more slice of that second, counted in
    the cluster's total once. (Before, when a node published its seconds from memory, the
    late row hit the primary key, ``ON CONFLICT DO NOTHING``, and the delivery was missing
    for good; slices are now written in the commit that records the outcome.)"""
    a = await start_node(cluster_text(tmp_path, sink.port, pg_schema, "node-a"))
    try:
        await asyncio.to_thread(send_many, a.listeners[0].port, ["t0"])
        await sink.wait_for(1, timeout=30)
        await _figures(a, "node-a", 1)
        [second] = [r["at"] for r in await _rows(
            pg_schema, "SELECT at FROM monitor_slices WHERE cls = 'marketing' AND counted")]
        # the record of a delivery finished within that second, committed now
        a.spool.record([Record("d", second + 0.9, second - 2.0, "sender@insurer.test",
                               "late@example.com", "LATE0001", "marketing", "bulk")])
        await a.spool.flush()
        asked = (await _figures(a, "node-a", 2))["at"]

        async def evaluated_again() -> dict | None:
            figures = await _figures(a, "node-a")
            return figures if figures["at"] > asked + 1 else None

        assert _delivered(await until(evaluated_again, timeout=30, what="two evaluations")) == 2
        rows = await _rows(pg_schema, "SELECT at, counted FROM monitor_slices"
                           " WHERE cls = 'marketing'")
        assert [(r["at"], r["counted"]) for r in rows] == [(second, True)] * 2
    finally:
        await a.stop()


async def test_the_cluster_counts_bounced_outcomes_for_good(tmp_path, sink, pg_schema):  # noqa: F811
    """``failed_total`` per class: final failures of every node, kept in ``monitor_totals``
    like ``delivered_total`` (never back at a change of evaluator); the node's own part has
    its own."""
    sink.rcpt_replies = {"gone@example.com": ["550 5.1.1 no such user"]}
    a = await start_node(cluster_text(tmp_path, sink.port, pg_schema, "node-a"))
    b: Node | None = None
    try:
        b = await start_node(cluster_text(tmp_path, sink.port, pg_schema, "node-b"))
        await asyncio.to_thread(send_many, b.listeners[0].port, ["gone", "t1", "t2"])
        await sink.wait_for(2, timeout=30)

        async def counted() -> dict | None:
            figures = await _figures(b, "node-a", 2)
            # the bounce, and its DSN to sender@insurer.test (a domain that does not resolve)
            return figures if _failed(figures) == 2 else None

        await until(counted, timeout=30, what="the failures counted")
        await a.stop()
        a = None
        taken = await _figures(b, "node-b")
        assert (_delivered(taken), _failed(taken)) == (2, 2)
        sla = await b.monitor.sla(taken["at"])
        own = {c["class"]: c for c in sla["node"]["classes"]}["marketing"]
        assert 0 <= own["failed_total"] <= 2, own  # node-b's own, whatever it took
    finally:
        for node in (a, b):
            if node is not None:
                await node.stop()


async def test_a_schema_of_release_10_starts_its_failures_at_the_kept_slices(
        tmp_path, sink, pg_schema):  # noqa: F811
    """Upgraded from schema 10 (delivered totals, no failures): the failures of the slices it
    kept and counted - the last quarter hour's - are where ``failed_total`` starts."""
    conn = await asyncpg.connect(PG_DSN)
    try:
        async with conn.transaction():
            await conn.execute(f'CREATE SCHEMA "{pg_schema}"')
            await conn.execute(f'SET LOCAL search_path TO "{pg_schema}"')
            await conn.execute("CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY,"
                               " applied_at TIMESTAMPTZ NOT NULL DEFAULT now())")
            for version, sql in MIGRATIONS:
                if version <= 10:
                    await conn.execute(sql)
                    await conn.execute("INSERT INTO schema_migrations VALUES ($1)", version)
            await conn.execute("INSERT INTO monitor_slices VALUES ('old', 'marketing',"
                               " extract(epoch from now())::bigint - 10, 3, '{100}', '{1}',"
                               " true)")
            await conn.execute("INSERT INTO monitor_totals VALUES ('marketing', 7)")
    finally:
        await conn.close()
    a = await start_node(cluster_text(tmp_path, sink.port, pg_schema, "node-a"))
    try:
        figures = await _figures(a, "node-a")
        assert (_delivered(figures), _failed(figures)) == (7, 2)
    finally:
        await a.stop()
