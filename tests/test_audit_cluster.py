"""The audit trail of a cluster, end to end: nodes on the PostgreSQL spool write one audit chain
in the same database, ``postlane audit`` reads it with nothing but the node config, and a
webhook is sent by one node, not once per node."""

from __future__ import annotations

import asyncio

from typer.testing import CliRunner

from postlane.audit.backend import open_store_at
from postlane.audit.evidence import trails
from postlane.audit.postgres import PostgresAuditStore
from postlane.audit.store import Query
from postlane.cli import app
from tests.conftest import message, send
from tests.support.pg import PG_DSN
from tests.support.waiting import until
from tests.test_audit_webhooks import hook, receiver  # noqa: F401  (fixture)
from tests.test_cluster import cluster_text, start_node


def cursor_at_end(schema: str) -> bool:
    """The webhook's shared cursor is past every record of the chain."""
    store = open_store_at(PG_DSN, schema, readonly=True)
    try:
        last = max((r["seq"] for r in store.rows_between(None, None)), default=0)
        return store.cursor("policy-system") >= last
    finally:
        store.close()


def cli(*args: str):
    return CliRunner().invoke(app, ["audit", *args])


async def test_audit_show_prints_a_trail_from_postgresql(tmp_path, sink, pg_schema):
    cfg = tmp_path / "node.toml"
    cfg.write_text(cluster_text(tmp_path, sink.port, pg_schema, "node-a"))
    node = await start_node(cfg.read_text())
    try:
        assert node.audit.location == PG_DSN
        await send(node.listeners[0].port, "sender@insurer.test", ["anna@example.com"],
                   message("renewal", cls="policy-documents",
                           extra="X-Correlation-ID: policy-4711\r\n"))
        await sink.wait_for(1)
        await node.flush_evidence()
        # the real command, run while the node is still writing to the same store
        res = await asyncio.to_thread(cli, "show", "-c", str(cfg), "--correlation-id",
                                      "policy-4711")
        assert res.exit_code == 0, res.output
        assert "correlation policy-4711" in res.output
        assert "recipient anna@example.com" in res.output
        assert "attempt 1: delivered from 127.0.0.20 (tx0.test)" in res.output
        assert "SLA 120s met" in res.output
        res = await asyncio.to_thread(cli, "verify", "-c", str(cfg))
        assert res.exit_code == 0 and res.output.startswith("ok: 2 records"), res.output
        res = await asyncio.to_thread(cli, "show", "--db", PG_DSN, "--schema", pg_schema,
                                      "--correlation-id", "policy-4711", "--format", "json")
        assert res.exit_code == 0 and '"outcome": "delivered"' in res.output, res.output
    finally:
        await node.stop()
    assert not list(tmp_path.rglob("audit.sqlite"))  # nothing went to a local file
    res = cli("show", "--db", PG_DSN, "--schema", "pl_no_such_schema", "--correlation-id", "x")
    assert res.exit_code == 2 and "no audit store in schema 'pl_no_such_schema'" in res.output


async def test_two_nodes_write_one_chain_and_one_sends_the_webhook(tmp_path, sink, pg_schema,
                                                                   receiver):  # noqa: F811
    extra = hook(receiver.url)
    a = await start_node(cluster_text(tmp_path, sink.port, pg_schema, "node-a", extra))
    b = await start_node(cluster_text(tmp_path, sink.port, pg_schema, "node-b", extra))
    try:
        for i in range(6):
            node, name = (a, "a") if i % 2 == 0 else (b, "b")
            await send(node.listeners[0].port, "sender@insurer.test", [f"p{i}@example.com"],
                       message(f"p{i}", cls="policy-documents",
                               extra=f"X-Correlation-ID: via-{name}-{i}\r\n"))
        await sink.wait_for(6)
        await until(lambda: len(receiver.events) >= 6, timeout=30)
        senders = [node.audit.webhooks[0] for node in (a, b)]
        await until(lambda: asyncio.to_thread(cursor_at_end, pg_schema), timeout=30, step=0.1,
                    what="the shared cursor at the last record")
        # a round that began before the cursor moved may still be posting (a second sender's
        # duplicate): wake both, and wait until each has ended a round since then
        rounds = [s.rounds for s in senders]
        for node in (a, b):
            node.audit.stored()
        await until(lambda: all(s.rounds > n for s, n in zip(senders, rounds, strict=True)),
                    what="a round of each node's sender after the cursor reached the end")
    finally:
        await a.stop()
        await b.stop()
    store = open_store_at(PG_DSN, pg_schema, readonly=True)
    try:
        result = store.verify()
        assert result.ok and result.checked == 12, result.problem  # r and d of six messages
        for i in range(6):
            name = "a" if i % 2 == 0 else "b"
            [trail] = trails(store.find(Query(correlation_id=f"via-{name}-{i}")))
            assert trail.outcome == "delivered" and trail.received is not None
        delivered = [r["seq"] for r in store.rows_between(None, None) if r["type"] == "d"]
    finally:
        store.close()
    assert sorted(e["seq"] for e in receiver.events) == delivered  # each event once, in total


async def test_events_written_by_another_node_wake_the_sender(tmp_path, sink, pg_schema,
                                                              receiver, monkeypatch):  # noqa: F811
    """Node A's audit service sends the webhook and writes nothing itself; another node's
    recorder appends. Its commits are announced with NOTIFY, so A sends them at once: with the
    fallback poll set to an hour, they still come."""
    from postlane.accounting.records import Record
    from postlane.audit.service import AuditService
    from postlane.startup import parse_config

    monkeypatch.setattr("postlane.audit.webhooks._POLL", 3600.0)
    service = AuditService(parse_config(cluster_text(tmp_path, sink.port, pg_schema, "node-a",
                                                     hook(receiver.url))))
    await service.start()
    other = PostgresAuditStore(PG_DSN, pg_schema)
    try:
        # A's sender made its first round, then one more when the commit listener was up (it
        # wakes the senders once it listens); now it waits for a commit (the poll is an hour)
        sender = service.webhooks[0]
        await until(lambda: sender.rounds >= 2, what="A's sender's round after LISTEN")
        batch = [(Record(type="d", time_logged=10.0 + i, time_queued=1.0, orig="s@x.test",
                         rcpt=f"p{i}@example.com", queue_id=f"Q{i}", cls="policy-documents",
                         vmta_pool="critical"), 120.0, "node-b/1", i + 1) for i in range(3)]
        assert await asyncio.to_thread(other.append, batch) == 3
        await until(lambda: len(receiver.events) >= 3, timeout=30)
    finally:
        other.close()
        await service.stop()
    assert [e["rcpt"] for e in receiver.events] == [f"p{i}@example.com" for i in range(3)]


async def test_an_audit_store_gone_does_not_hold_the_shutdown_and_loses_nothing(
        tmp_path, sink, pg_schema, caplog):
    """The store disappears under a running node: its records wait in the spool, a stopping
    node does not wait for the store, and the next start writes them to a store that works."""
    import asyncpg

    from postlane.spool.outbox import SQLiteOutbox
    from tests.conftest import config_text

    def text(schema: str) -> str:
        return config_text(tmp_path, sink.port, f'[cluster]\nschema_name = "{schema}"\n'
                           f'[audit]\npath = "{PG_DSN}"\n')

    node = await start_node(text(pg_schema))
    await send(node.listeners[0].port, "s@insurer.test", ["a@example.com"], message("one"))
    await sink.wait_for(1)
    await node.flush_evidence()
    conn = await asyncpg.connect(PG_DSN)
    await conn.execute(f'DROP SCHEMA "{pg_schema}" CASCADE')
    await conn.close()
    await send(node.listeners[0].port, "s@insurer.test", ["b@example.com"], message("two"))
    await sink.wait_for(2)
    await asyncio.wait_for(node.stop(), 60)
    assert "audit store write failed" in caplog.text
    outbox = SQLiteOutbox(tmp_path / "spool")
    try:
        waiting = sum(len(outbox.read(w, 0, 100)) for w in outbox.writers())
    finally:
        outbox.close()
    assert waiting == 2  # the second message's "r" and "d": in the spool, not lost
    node = await start_node(text(pg_schema + "_b"))
    try:
        await node.flush_evidence()
    finally:
        await node.stop()
    store = open_store_at(PG_DSN, pg_schema + "_b", readonly=True)
    try:
        assert {r["rcpt"] for r in store.rows_between(None, None)} == {"b@example.com"}
    finally:
        store.close()
    conn = await asyncpg.connect(PG_DSN)
    await conn.execute(f'DROP SCHEMA IF EXISTS "{pg_schema}_b" CASCADE')
    await conn.close()


async def test_a_dead_nodes_events_wait_for_its_restart_before_another_node_adopts_them(
        pg_schema):
    """The events a killed node's recorder had not consumed are fed by one recorder: the node's
    own when it comes back (its files' position says exactly which lines they have), another
    node's only once the dead node's heartbeat is ``dead_after`` old. Adopted at once by the
    other node, the lines the dead recorder wrote after its last published position were
    written again there: the same lines in two nodes' files after every crash and restart."""
    import asyncpg

    from postlane.spool import PostgresSpool
    from postlane.spool.outbox import PostgresOutbox

    spool = PostgresSpool(PG_DSN, pg_schema, node="node-c")  # makes the schema
    await spool.open()
    await spool.close()
    conn = await asyncpg.connect(PG_DSN)
    try:
        await conn.execute(f'SET search_path TO "{pg_schema}"')
        await conn.execute("INSERT INTO writers VALUES ('node-a/old', 'node-a', 1, 0)")
        await conn.execute("INSERT INTO nodes (name, hostname, pid, started_at, heartbeat)"
                           " VALUES ('node-a', 'h', 1, 1, extract(epoch from now()))")
        other = PostgresOutbox(PG_DSN, pg_schema, "node-b/1", dead_after=4.0)
        try:
            assert "node-a/old" not in other.writers(), "node-a may be restarting"
            restarted = PostgresOutbox(PG_DSN, pg_schema, "node-a/2", dead_after=4.0)
            try:
                assert "node-a/old" in restarted.writers(), "its own, at once"
                assert "node-a/old" not in other.writers(), "fed by one recorder"
            finally:
                restarted.close()
            await conn.execute("UPDATE nodes SET heartbeat = heartbeat - 5")
            # (a closed session's advisory lock is let go when its backend has ended: soon)
            await until(lambda: "node-a/old" in other.writers(),
                        what="node-a is dead: the other takes them")
        finally:
            other.close()
        await conn.execute("DELETE FROM nodes")
        gone = PostgresOutbox(PG_DSN, pg_schema, "node-b/3", dead_after=4.0)
        try:
            await until(lambda: "node-a/old" in gone.writers(),
                        what="a node no longer listed is gone")
        finally:
            gone.close()
    finally:
        await conn.close()
