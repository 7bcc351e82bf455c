"""Operating a cluster from the command line, and clear errors for a wrong DSN or name."""

from __future__ import annotations

import asyncio
import json
import secrets
import subprocess
import sys

import asyncpg
import psycopg
import pytest

from postlane.accounting.records import Record, unpack
from postlane.operations import OperationError
from postlane.scheduler.control import Selector
from postlane.spool import PostgresSpool, State
from postlane.spool.postgres import NodeConflict
from postlane.startup import ConfigError, load_config, parse_config
from tests.conftest import OPERATOR, config_text, message, send
from tests.support.pg import PG_DSN, pg_reachable, pg_schema  # noqa: F401  (fixture)
from tests.support.waiting import until
from tests.test_cluster import cluster_text, send_many, settled, start_node


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "postlane.cli", *args], capture_output=True,
                          text=True, timeout=60)


def test_status_and_drain_from_the_command_line(tmp_path):
    if not pg_reachable():
        pytest.skip("PostgreSQL is not reachable on 127.0.0.1:5432 (make test starts it)")
    schema = f"pl_test_{secrets.token_hex(4)}"
    path = tmp_path / "node.toml"
    path.write_text(cluster_text(tmp_path, 2525, schema, "node-a").replace(
        'poll = "0.2s"', 'poll = "0.2s"\nlease = "5m"\ndead_after = "2m"'))  # slow machine

    async def setup() -> None:
        spool = PostgresSpool(PG_DSN, schema)
        await spool.open()
        await spool.register("node-a", "host-a", 4242)
        await spool.close()

    asyncio.run(setup())
    # node-a's session: the name lock a live node holds
    session = psycopg.connect(PG_DSN, autocommit=True)
    session.execute("SELECT pg_advisory_lock(hashtext(%s), hashtext('node-a'))",
                    (f"postlane/{schema}",))
    try:
        out = cli("cluster", "status", "-c", str(path), "--json")
        assert out.returncode == 0, out.stderr
        status = json.loads(out.stdout)
        assert [(n["name"], n["pid"], n["alive"]) for n in status["nodes"]] == [
            ("node-a", 4242, True)]
        text = cli("cluster", "status", "-c", str(path))
        assert "node-a" in text.stdout and "alive" in text.stdout
        assert cli("cluster", "drain", "node-a", "-c", str(path)).returncode == 0
        assert json.loads(cli("cluster", "status", "-c", str(path), "--json").stdout)[
            "nodes"][0]["draining"] is True
        # the request is an operator's action: on the record (operations.request_drain)
        [drained] = [r for r in _outbox(schema) if r.type == "o"]
        assert drained.dsn_action == "drain" and drained.src_type == "cli"
        assert drained.dsn_diag == f"node node-a asked to drain by operator {drained.operator}"
        assert drained.operator
        missing = cli("cluster", "drain", "nobody", "-c", str(path))
        assert missing.returncode == 1 and "no node named 'nobody'" in missing.stderr
        assert len(_outbox(schema)) == 1, "nothing done, nothing recorded"
        session.close()  # node-a dies: its session closes
        dead = json.loads(cli("cluster", "status", "-c", str(path), "--json").stdout)
        assert [(n["state"], n["session"]) for n in dead["nodes"]] == [("suspect", False)]
        assert "CLOSED" in cli("cluster", "status", "-c", str(path)).stdout
    finally:
        session.close()
        asyncio.run(_drop(schema))


def _outbox(schema: str) -> list[Record]:
    """The records waiting in the shared spool's outbox."""
    with psycopg.connect(PG_DSN) as conn:
        rows = conn.execute(f'SELECT data FROM "{schema}".events ORDER BY writer, n').fetchall()
    return [Record(*unpack(bytes(data))) for (data,) in rows]


async def _drop(schema: str) -> None:
    conn = await asyncpg.connect(PG_DSN)
    await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    await conn.close()


def test_cluster_commands_on_a_sqlite_node_say_why_not(tmp_path):
    path = tmp_path / "node.toml"
    path.write_text(config_text(tmp_path, 2525))
    out = cli("cluster", "status", "-c", str(path))
    assert out.returncode == 2 and "not a PostgreSQL DSN" in out.stderr


def test_a_dsn_is_kept_as_is_by_the_config_loader(tmp_path):
    path = tmp_path / "node.toml"
    path.write_text(cluster_text(tmp_path, 2525, "s", "n"))
    assert load_config(path).node.spool == PG_DSN


async def test_unreachable_database_is_a_clear_error_without_the_password():
    spool = PostgresSpool("postgresql://postlane:s3cret@127.0.0.1:1/db", "x")
    with pytest.raises(ConnectionError, match="cannot open the PostgreSQL spool") as err:
        await spool.open()
    assert "s3cret" not in str(err.value) and "***" in str(err.value)


async def test_second_live_node_with_the_same_name_is_refused(tmp_path, sink,
                                                              pg_schema):  # noqa: F811
    a = await start_node(cluster_text(tmp_path, sink.port, pg_schema, "twin"))
    try:
        with pytest.raises(NodeConflict, match="already live"):
            await start_node(cluster_text(tmp_path / "b", sink.port, pg_schema, "twin"))
        assert a.status()["cluster"]["schema"] == pg_schema
    finally:
        await a.stop()


def test_cluster_section_errors_name_their_field(tmp_path):
    text = config_text(tmp_path, 2525) + (
        '\n[cluster]\nschema_name = "Bad-Name"\nlease = "0.5s"\nclaim_ahead = 0\n')
    with pytest.raises(ConfigError) as err:
        parse_config(text)
    fields = sorted(line.split(":")[0] for line in err.value.errors)
    assert fields == ["cluster.claim_ahead", "cluster.lease", "cluster.schema_name"]


def test_a_lease_shorter_than_twice_dead_after_is_refused(tmp_path):
    text = config_text(tmp_path, 2525) + '\n[cluster]\nlease = "5s"\ndead_after = "4s"\n'
    with pytest.raises(ConfigError, match="cluster.lease .5s. must be at least twice"):
        parse_config(text)
    cluster = parse_config(config_text(tmp_path, 2525)).cluster
    assert (cluster.dead_after, cluster.lease, cluster.heartbeat, cluster.fence) == (
        4.0, 10.0, 1.0, 3.0)


def _records(tmp_path, name: str) -> list[dict]:
    return [json.loads(line) for path in sorted((tmp_path / f"acct-{name}").glob("*.jsonl"))
            for line in path.read_text().splitlines()]


def _hourly(tmp_path, sink, schema: str, name: str) -> str:
    """A cluster node whose policy notices, once deferred, wait an hour for their retry."""
    return cluster_text(tmp_path, sink.port, schema, name).replace(
        'retry = ["1s", "1s", "2s"]', 'retry = ["1h"]')


async def test_retry_now_on_one_node_retries_what_the_other_nodes_hold(tmp_path, sink,
                                                                      pg_schema):  # noqa: F811
    """``postlane retry POOL`` (retry now) sent to any node: a deferred recipient stays with
    the node that deferred it, so a retry that acted on the asked node alone left it to its
    retry time (an hour here) and said nothing of it. Every node is asked (a shared request
    row), and the node that holds it retries it, on the record as the operator's retry."""
    sink.rcpt_replies = {"slow@example.com": ["450 4.2.1 try later", "250 2.1.5 ok"]}

    b = await start_node(_hourly(tmp_path, sink, pg_schema, "node-b"))
    a = None
    try:
        await send(b.listeners[0].port, "sender@insurer.test", ["slow@example.com"],
                   message("slow", cls="policy-documents"))
        await until(lambda: [r.state for r in b.scheduler.recipients()] == [State.DEFERRED],
                    timeout=30, what="node-b holding the deferred recipient")
        a = await start_node(_hourly(tmp_path, sink, pg_schema, "node-a"))
        out = await a.operations.retry("critical", who=OPERATOR)
        assert (out["recipients"], out["elsewhere"]) == (0, 1), out
        [arrival] = await sink.wait_for(1, timeout=30)
        assert arrival.rcpts == ["slow@example.com"]
        await until(lambda: b.scheduler.queued() == 0, timeout=30, what="node-b done")
    finally:
        for node in (a, b):
            if node is not None:
                await node.stop()
    retried = [r for r in _records(tmp_path, "node-b") if r["type"] == "o"]
    assert [(r["dsnAction"], r["rcpt"]) for r in retried] == [("retry", "slow@example.com")]
    assert OPERATOR.name in retried[0]["dsnDiag"]
    assert not [r for r in _records(tmp_path, "node-a") if r["type"] == "o"], \
        "node-a held nothing: its own records say so"


async def test_a_pause_on_any_node_counts_the_clusters_queue(tmp_path, sink,
                                                             pg_schema):  # noqa: F811
    """The answer to a pause (and its record, "paused … (N recipients queued)") counted the
    lanes of the node asked: 0 on a node that held none of the pool's queued mail."""
    a = await start_node(cluster_text(tmp_path, sink.port, pg_schema, "node-a"))
    b = await start_node(cluster_text(tmp_path, sink.port, pg_schema, "node-b"))
    try:
        await a.operations.pause("bulk", who=OPERATOR)
        await until(lambda: ("bulk", "*") in b.scheduler.paused, what="b sees the pause")
        await asyncio.to_thread(send_many, a.listeners[0].port, ["p0", "p1", "p2"])
        assert b.scheduler.queued() == 0
        assert await b.operations.pause("bulk", "example.com", who=OPERATOR) == 3
        assert await b.operations.resume("bulk", "example.com", who=OPERATOR) == 3
    finally:
        await a.stop()
        await b.stop()
    paused = [r for r in _records(tmp_path, "node-b") if r["type"] == "o"]
    assert [(r["dsnAction"], "(3 recipients queued)" in r["dsnDiag"]) for r in paused] == [
        ("pause", True), ("resume", True)], paused


async def test_queue_retry_by_selector_on_one_node_reaches_the_node_holding_it(
        tmp_path, sink, pg_schema):  # noqa: F811
    """``postlane queue retry --recipient …`` on node-a: node-b holds the deferred recipient
    and retries it; a recipient the selector does not name stays deferred."""
    sink.rcpt_replies = {"one@example.com": ["450 4.2.1 try later", "250 2.1.5 ok"],
                         "two@example.com": ["450 4.2.1 try later", "250 2.1.5 ok"]}

    b = await start_node(_hourly(tmp_path, sink, pg_schema, "node-b"))
    a = None
    try:
        await send(b.listeners[0].port, "sender@insurer.test",
                   ["one@example.com", "two@example.com"], message("two", cls="policy-documents"))
        await until(lambda: [r.state for r in b.scheduler.recipients()] == [State.DEFERRED] * 2,
                    timeout=30, what="node-b holding both deferred")
        a = await start_node(_hourly(tmp_path, sink, pg_schema, "node-a"))
        out = await a.operations.queue("retry", Selector(recipient="one@example.com"),
                                       who=OPERATOR)
        assert (out["recipients"], out["elsewhere"]) == (0, 1), out
        [arrival] = await sink.wait_for(1, timeout=30)
        assert arrival.rcpts == ["one@example.com"]
        await until(lambda: [r.address for r in b.scheduler.recipients()] == ["two@example.com"],
                    timeout=30, what="only one retried")
    finally:
        for node in (a, b):
            if node is not None:
                await node.stop()


async def _delete_untold(node, conn, schema: str) -> None:
    """A message to gone@example.com held back (its pool paused) and deleted with a DSN while
    the shared spool refuses new messages (a constraint no new body meets): the answer is 503
    after ``DSN_WAIT``, and the recipient is still open, leased to the node, not bounced."""
    await node.operations.pause("bulk", who=OPERATOR)
    await send(node.listeners[0].port, "notices@example.com", ["gone@example.com"],
               message("m"))
    [qid] = await conn.fetchval(f'SELECT array_agg(id) FROM "{schema}".messages')
    await conn.execute(f'ALTER TABLE "{schema}".bodies ADD CONSTRAINT spool_full'
                       " CHECK (false) NOT VALID")
    with pytest.raises(OperationError, match="the DSN is not yet queued") as err:
        await node.operations.queue("delete", Selector(queue_ids=(qid,)), who=OPERATOR,
                                    dsn=True)
    assert err.value.status == 503
    await node.spool.flush()
    assert [tuple(r) for r in await conn.fetch(
        f'SELECT state, lease_owner FROM "{schema}".recipients')] == [("queued", "node-a")]


async def _spool_takes_mail(conn, schema: str) -> None:
    await conn.execute(f'ALTER TABLE "{schema}".bodies DROP CONSTRAINT spool_full')


@pytest.mark.parametrize("stopped", [False, True], ids=["DSN queued later", "node stopped"])
async def test_a_delete_whose_dsn_cannot_be_queued_is_answered_503_in_a_cluster(
        tmp_path, sink, pg_schema, stopped):  # noqa: F811
    """In a cluster, as on one node, a delete's final states and "b" records are committed
    only once its DSN is queued (they were committed first, in one transaction: a node
    stopped before the DSN left the sender untold). Once the spool takes messages again the
    DSN is queued and delivered, once, and the message is gone. A node that stops before it
    could queue the DSN has bounced nothing (no "b" record, no DSN): the message is still the
    cluster's, and the next node delivers it."""
    text = cluster_text(tmp_path, sink.port, pg_schema, "node-a")
    node = await start_node(text)
    conn = await asyncpg.connect(PG_DSN)
    try:
        await _delete_untold(node, conn, pg_schema)
        if stopped:
            await node.stop()
        await _spool_takes_mail(conn, pg_schema)
        if stopped:
            node = await start_node(text)
        await node.operations.resume("bulk", who=OPERATOR)
        [arrival] = await sink.wait_for(1, timeout=60)
        await settled(node)
    finally:
        await conn.close()
        await node.stop()
    assert len(sink.arrivals) == 1
    rows = _records(tmp_path, "node-a")
    gone = [(r["type"], r["bounceCat"]) for r in rows if r["rcpt"] == "gone@example.com"]
    if stopped:
        assert arrival.rcpts == ["gone@example.com"]
        assert gone == [("r", ""), ("d", "")]
        return
    assert arrival.rcpts == ["notices@example.com"] and b"deleted by operator" in arrival.data
    assert gone == [("r", ""), ("b", "purged")]
    assert [r["type"] for r in rows if r["rcpt"] == "notices@example.com"] == ["r", "d"]
