"""Cluster mode end to end: nodes on one PostgreSQL schema share the queue, over real SMTP.

Two in-process nodes share a campaign (each message delivered once), keep priority order across
nodes and share pause; two ``postlane serve`` subprocesses show that after ``kill -9`` of one,
every message it acknowledged is delivered by the other.
"""

from __future__ import annotations

import asyncio
import contextlib
import email
import json
import os
import signal
import smtplib
import subprocess
import sys
import time
from pathlib import Path

import asyncpg
import httpx

from postlane.cli.cluster import cluster_status
from postlane.node import Node
from postlane.spool import PostgresSpool
from postlane.startup import parse_config
from tests.conftest import OPERATOR, config_text, message, send
from tests.support.pg import PG_DSN, pg_schema  # noqa: F401  (fixture)
from tests.support.tcpproxy import TCPProxy
from tests.support.waiting import until


def cluster_text(tmp_path: Path, sink_port: int, schema: str, name: str, extra: str = "",
                 **kwargs) -> str:
    """The test config of ``conftest`` as node ``name`` of a cluster on ``schema``."""
    text = config_text(tmp_path, sink_port, extra, **kwargs)
    text = text.replace(f'spool = "{tmp_path}/spool"', f'spool = "{PG_DSN}"')
    text = text.replace('name = "test-node"', f'name = "{name}"')
    text = text.replace(f'directory = "{tmp_path}/acct"', f'directory = "{tmp_path}/acct-{name}"')
    return text + f'\n[cluster]\nschema_name = "{schema}"\npoll = "0.2s"\n'


def send_many(port: int, subjects: list[str], cls: str | None = None) -> list[str]:
    """Submit one message per subject over one SMTP session; returns those acknowledged."""
    acked = []
    with contextlib.suppress(smtplib.SMTPException, OSError), \
            smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        for subject in subjects:
            client.sendmail("sender@insurer.test", [f"{subject}@example.com"],
                            message(subject, cls=cls))
            acked.append(subject)
    return acked


def subjects_of(arrivals) -> list[str]:
    return [email.message_from_bytes(a.data)["Subject"] for a in arrivals]


def delivered_by(tmp_path: Path, name: str) -> int:
    count = 0
    for path in (tmp_path / f"acct-{name}").glob("*.jsonl"):
        count += sum(1 for line in path.read_text().splitlines() if json.loads(line)["type"] == "d")
    return count


async def start_node(text: str) -> Node:
    node = Node(parse_config(text))
    await node.start()
    return node


async def settled(*nodes: Node) -> None:
    """Nothing is left that could still be delivered: every node's scheduler is empty and the
    shared spool holds no message (a check that nothing arrives twice needs no sleep after)."""
    await until(lambda: all(n.scheduler.queued() == 0 for n in nodes), timeout=30,
                what="every node's scheduler empty")

    async def empty() -> bool:
        for node in nodes:
            await node.spool.flush()
        async with nodes[0].spool.acquire() as conn:
            return await conn.fetchval("SELECT count(*) FROM messages") == 0

    await until(empty, timeout=30, step=0.05, what="no message left in the shared spool")


async def test_two_nodes_share_a_campaign_and_deliver_each_message_once(tmp_path, sink,
                                                                        pg_schema):  # noqa: F811
    sink.delay = 0.005
    a = await start_node(cluster_text(tmp_path, sink.port, pg_schema, "node-a"))
    b = await start_node(cluster_text(tmp_path, sink.port, pg_schema, "node-b"))
    try:
        names = [f"m{i:03d}" for i in range(300)]
        acked = await asyncio.gather(
            asyncio.to_thread(send_many, a.listeners[0].port, names[:150]),
            asyncio.to_thread(send_many, b.listeners[0].port, names[150:]))
        assert sum(map(len, acked)) == 300
        arrivals = await sink.wait_for(300, timeout=90)
        await settled(a, b)
        got = subjects_of(arrivals)
        assert sorted(got) == names, "every message exactly once"
        status = await cluster_status(a.spool, a.config.cluster)
        assert [n["name"] for n in status["nodes"]] == ["node-a", "node-b"]
        assert all(n["alive"] for n in status["nodes"])
    finally:
        await a.stop()
        await b.stop()
    da, db = delivered_by(tmp_path, "node-a"), delivered_by(tmp_path, "node-b")
    assert da + db == 300
    assert da > 0 and db > 0, f"both nodes delivered ({da} + {db})"


async def test_priority_and_pause_hold_across_nodes(tmp_path, sink, pg_schema):  # noqa: F811
    extra = '[classes.claims]\npool = "bulk"\npriority = 1\nsla = "30m"\nexpiry = "1h"\n'
    sink.delay = 0.05
    a = await start_node(cluster_text(tmp_path, sink.port, pg_schema, "node-a", extra,
                                      marketing_max_out=1))
    b = await start_node(cluster_text(tmp_path, sink.port, pg_schema, "node-b", extra,
                                      marketing_max_out=1))
    try:
        await a.operations.pause("bulk", who=OPERATOR)
        await _until(lambda: ("bulk", "*") in b.scheduler.paused)
        await asyncio.to_thread(send_many, a.listeners[0].port, [f"mkt{i}" for i in range(20)])
        await asyncio.to_thread(send_many, b.listeners[0].port, [f"clm{i}" for i in range(5)],
                                "claims")
        # a bound, not a state: a node that ignored the pause would claim within one poll
        # (0.2 s) and deliver at once; both looked at the queue at least twice meanwhile
        await asyncio.sleep(0.5)
        assert sink.arrivals == [], "a pause on one node holds the pool on every node"
        await b.operations.resume("bulk", who=OPERATOR)
        arrivals = await sink.wait_for(25, timeout=60)
        order = subjects_of(arrivals)
        claims_at = [i for i, s in enumerate(order) if s.startswith("clm")]
        # two nodes each send what they claimed; claims are taken most urgent first cluster-wide
        assert max(claims_at) < 5 + 2, order
    finally:
        await a.stop()
        await b.stop()


async def _until(predicate, timeout: float = 10.0) -> None:
    """``until`` with this file's 10 s default (other test files import this name)."""
    await until(predicate, timeout=timeout)


async def busy_node(tmp_path: Path, sink, schema: str, prefix: str, count: int,
                    database: str = "127.0.0.1:5432") -> tuple[Node, list[str]]:
    """node-a (one bulk connection, its database at ``database``) given ``count`` messages,
    the first of them delivered: it holds the rest."""
    node = await start_node(cluster_text(tmp_path, sink.port, schema, "node-a",
                                         marketing_max_out=1).replace("127.0.0.1:5432",
                                                                      database))
    names = [f"{prefix}{i:02d}" for i in range(count)]
    await asyncio.to_thread(send_many, node.listeners[0].port, names)
    await sink.wait_for(1, timeout=30)
    return node, names


async def test_drain_request_stops_a_node_and_hands_its_work_over(tmp_path, sink,
                                                                  pg_schema):  # noqa: F811
    sink.delay = 0.5
    a, names = await busy_node(tmp_path, sink, pg_schema, "d", 12)
    b = None
    try:
        # node-a's work held while node-b starts, which may take longer than node-a's 12
        # deliveries (6 s) on a loaded machine: then nothing was left to hand over
        await a.operations.pause("bulk", who=OPERATOR)
        b = await start_node(cluster_text(tmp_path, sink.port, pg_schema, "node-b",
                                          marketing_max_out=1))
        await a.operations.resume("bulk", who=OPERATOR)  # node-a delivers again, then drains
        assert await a.spool.request_drain("node-a")
        await asyncio.wait_for(a.stop_requested.wait(), 10)
        assert a.claimer is not None and a.claimer.draining
        await a.stop()
        await sink.wait_for(12, timeout=30)
        await settled(b)
        assert sorted(subjects_of(sink.arrivals)) == names, "each once: a finished or released"
        status = await cluster_status(b.spool, b.config.cluster)
        assert [n["name"] for n in status["nodes"]] == ["node-b"], "a drained node leaves"
        await b.stop()
        assert delivered_by(tmp_path, "node-b") > 0
    finally:
        for node in (a, b):
            if node is not None and not node.stopped.is_set():
                await node.stop()


# -- kill -9 ------------------------------------------------------------------------------------


class Served:
    """``postlane serve`` in a subprocess; its ports are read from its JSON log."""

    def __init__(self, tmp_path: Path, name: str, text: str) -> None:
        self.name = name
        self.token_file = tmp_path / "api-token"
        path = tmp_path / f"{name}.toml"
        path.write_text(text)
        self.log_path = tmp_path / f"{name}.log"
        self.log = open(self.log_path, "w+b")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "postlane.cli", "serve", "-c", str(path)],
            stdout=self.log, stderr=self.log)
        self.api_port = 0

    def lines(self) -> list[dict]:
        """The node's log so far, one JSON object per line (others, e.g. a traceback printed
        by Python itself, as {"raw": line})."""
        out = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                out.append({"raw": line})
        return out

    async def port(self, timeout: float = 30.0) -> int:
        """The SMTP listener's port, once the node listens (and its API's, in ``api_port``)."""

        def listening() -> int | None:
            for record in self.lines():
                if record.get("msg") == "API listening":
                    self.api_port = record["port"]
                if record.get("msg") == "listening":
                    return record["listeners"]["in"]
            return None

        with contextlib.suppress(AssertionError):
            port = await until(lambda: listening() or self.proc.poll() is not None,
                               timeout=timeout, step=0.05, what="the node listening")
            if port is not True:
                return port
        self.log.seek(0)
        raise RuntimeError(f"node did not start: {self.log.read().decode(errors='replace')}")

    async def api(self, path: str) -> dict | str:
        """GET from the node's API (JSON, or the text of /metrics)."""
        token = self.token_file.read_text().strip()
        async with httpx.AsyncClient(timeout=30) as client:
            resp = await client.get(f"http://127.0.0.1:{self.api_port}{path}",
                                    headers={"Authorization": f"Bearer {token}"})
        resp.raise_for_status()
        return resp.text if path == "/metrics" else resp.json()

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, sig)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)
        self.log.close()


async def test_kill_9_of_a_node_loses_no_acknowledged_message(tmp_path, sink,
                                                              pg_schema):  # noqa: F811
    sink.delay = 0.05
    a = Served(tmp_path, "node-a", cluster_text(tmp_path, sink.port, pg_schema, "node-a",
                                                marketing_max_out=2))
    b = Served(tmp_path, "node-b", cluster_text(tmp_path, sink.port, pg_schema, "node-b",
                                                marketing_max_out=2))
    watcher = PostgresSpool(PG_DSN, pg_schema)  # an operator's `cluster status`
    cluster = parse_config(cluster_text(tmp_path, sink.port, pg_schema, "x")).cluster
    try:
        port_a = await a.port()
        await b.port()
        await watcher.open()
        names = [f"k{i:03d}" for i in range(150)]
        submit = asyncio.create_task(asyncio.to_thread(send_many, port_a, names))
        await sink.wait_for(20, timeout=60)
        a.proc.kill()  # SIGKILL: no drain, no lease release
        killed = time.monotonic()
        a.proc.wait(10)
        acked = await submit
        assert len(acked) >= 20
        # meanwhile the operator sees node-a gone, its work unowned and when it moves
        seen = None

        async def given_back() -> bool:
            nonlocal seen
            status = await cluster_status(watcher, cluster)
            node_a = next(n for n in status["nodes"] if n["name"] == "node-a")
            if node_a["claimed"] == 0:
                return True
            if not node_a["session"] and seen is None:
                seen = (node_a, sum(p["unowned"] for p in status["pools"].values()))
            return False

        await until(given_back, timeout=60, step=0.05, what="node-a's work given back")
        taken_over = time.monotonic() - killed
        after = await cluster_status(watcher, cluster)
        assert [(n["state"], n["claimed"], n["takeover_in_s"]) for n in after["nodes"]
                if n["name"] == "node-a"] == [("dead", 0, None)], "dead, nothing left to take"
        assert seen is not None, "node-a's work was shown before it was taken over"
        node_a, unowned = seen
        assert node_a["state"] in ("suspect", "dead") and unowned == node_a["claimed"] > 0
        # taken over for its closed session, not after its 10 s lease: at dead_after (4 s)
        assert node_a["takeover_in_s"] <= cluster.dead_after
        told = [r for r in b.lines() if r.get("dead_node") == "node-a"]
        assert [(r["logger"], r.get("node")) for r in told] == [("postlane.cluster", "node-b")], \
            "told once, by the node that gave the work back, which the line names"
        assert {r.get("node") for r in b.lines() if "raw" not in r} == {"node-b"}, \
            "every line names its node: the nodes' logs are read merged"
        print(f"node-a's work taken over {taken_over:.2f}s after kill -9")
        await _until(lambda: set(acked) <= set(subjects_of(sink.arrivals)), timeout=90)
        got = subjects_of(sink.arrivals)
        twice = len(got) - len(set(got))
        # only what node-a held at the kill may arrive twice: on its 2 connections, or delivered
        # but not yet recorded (it never holds more than 2 slots x (claim_ahead 2 + 1))
        assert twice <= 6, twice

        async def adopted() -> bool:  # node-b's recorder took what node-a's left in the outbox
            conn = await asyncpg.connect(PG_DSN)
            try:
                left = await conn.fetchval(
                    f'SELECT count(*) FROM "{pg_schema}".events e JOIN "{pg_schema}".writers w'
                    " ON w.writer = e.writer WHERE w.node = 'node-a'")
            finally:
                await conn.close()
            return left == 0

        await until(adopted, timeout=60, what="node-a's events recorded by node-b")
        assert not [r for r in b.lines() if "evidence gap" in r.get("msg", "")], \
            "what node-a's recorder stored before the kill is no gap"
    finally:
        await watcher.close()
        a.stop(signal.SIGKILL)
        await asyncio.to_thread(b.stop)


async def test_retries_and_bounces_work_on_the_shared_spool(tmp_path, sink,
                                                            pg_schema):  # noqa: F811
    sink.rcpt_replies = {"soft@example.com": ["450 4.2.1 mailbox busy", "250 2.1.5 ok"],
                         "hard@example.com": ["550 5.1.1 no such user"]}
    node = await start_node(cluster_text(tmp_path, sink.port, pg_schema, "node-a"))
    try:
        await send(node.listeners[0].port, "sender@example.com",
                   ["ok@example.com", "soft@example.com", "hard@example.com"],
                   message("three", cls="policy-documents"))
        arrivals = await sink.wait_for(3, timeout=30)  # ok, soft after its retry, the bounce
        by_rcpt = {tuple(a.rcpts): a for a in arrivals}
        assert ("ok@example.com",) in by_rcpt and ("soft@example.com",) in by_rcpt
        bounce = email.message_from_bytes(by_rcpt[("sender@example.com",)].data)
        assert "hard@example.com" in bounce.get_payload()[1].as_string()
        await _until(lambda: node.scheduler.queued() == 0)
        await node.spool.flush()
        async with node.spool.acquire() as conn:
            assert await conn.fetchval("SELECT count(*) FROM messages") == 0, "all cleaned up"
    finally:
        await node.stop()


async def test_a_node_cut_off_holds_delivery_and_goes_on_when_the_database_returns(
        tmp_path, sink, pg_schema):  # noqa: F811
    sink.delay = 0.2
    proxy = await TCPProxy("127.0.0.1", 5432).start()
    text = cluster_text(tmp_path, sink.port, pg_schema, "node-a", marketing_max_out=1).replace(
        "127.0.0.1:5432", f"127.0.0.1:{proxy.port}")
    node = await start_node(text)
    try:
        names = [f"c{i:02d}" for i in range(20)]
        await asyncio.to_thread(send_many, node.listeners[0].port, names)
        await sink.wait_for(2, timeout=30)
        proxy.cut()
        assert node.claimer is not None
        await _until(lambda: node.claimer.fenced, timeout=30)
        at_fence = len(sink.arrivals)
        # real time in the scenario: the node stays cut off (fenced) for a while; 1.5 s is
        # seven of the sink's 0.2 s deliveries, any of which would start if the fence leaked
        await asyncio.sleep(1.5)
        # the one transaction on the wire at the fence may finish; nothing new starts
        assert len(sink.arrivals) <= at_fence + 1
        assert node.scheduler.fenced and not node.stop_requested.is_set()
        await proxy.start()
        await _until(lambda: not node.claimer.fenced, timeout=30)
        await sink.wait_for(20, timeout=60)
        assert sorted(subjects_of(sink.arrivals)) == names, "each once, none lost"
        assert not node.stop_requested.is_set(), "nothing was taken: it delivers on"
    finally:
        await asyncio.wait_for(node.stop(), 30)


async def test_a_node_whose_work_was_taken_over_while_cut_off_stops(tmp_path, sink,
                                                                   pg_schema):  # noqa: F811
    sink.delay = 0.2
    proxy = await TCPProxy("127.0.0.1", 5432).start()
    a, names = await busy_node(tmp_path, sink, pg_schema, "t", 10, f"127.0.0.1:{proxy.port}")
    b = None
    try:
        # node-a's work held while node-b starts, which may take longer than node-a's 10
        # deliveries (2 s) on a loaded machine: then node-a was cut off holding nothing
        await a.operations.pause("bulk", who=OPERATOR)
        b = await start_node(cluster_text(tmp_path, sink.port, pg_schema, "node-b",
                                          marketing_max_out=1))
        await a.operations.resume("bulk", who=OPERATOR)
        proxy.cut()  # node-a is cut off holding work; its session closes
        assert a.claimer is not None and b.claimer is not None
        await _until(lambda: b.claimer.taken_over > 0, timeout=60)
        assert a.claimer.fenced, "a stopped delivering before b took its work"
        await sink.wait_for(10, timeout=60)
        await proxy.start()
        await asyncio.wait_for(a.stop_requested.wait(), 30)  # it learns, and stops
        got = subjects_of(sink.arrivals)
        assert sorted(set(got)) == names
        # twice at most: on its one connection, the message on the wire at the cut and the one
        # delivered just before whose outcome had not been committed yet
        assert len(got) - len(set(got)) <= 2
    finally:
        await asyncio.wait_for(a.stop(), 30)
        if b is not None:
            await b.stop()


async def test_a_node_with_another_feedback_key_is_told(tmp_path, sink, pg_schema):  # noqa: F811
    """`postlane init` makes a feedback key per node; a cluster needs one: the VERP address or
    unsubscribe link one node makes is read by whichever node gets the bounce, complaint or
    click. A node whose key differs from a live node's says so (a degraded state)."""
    a = await start_node(cluster_text(tmp_path, sink.port, pg_schema, "node-a"))
    other = f'[feedback]\nkey_file = "{tmp_path}/other.key"\n'
    b = await start_node(cluster_text(tmp_path, sink.port, pg_schema, "node-b", other))
    try:
        [state] = [d for d in b.status()["degraded"] if d["key"] == "feedback-key"]
        assert state["what"] == "feedback key differs from node(s) node-a"
        assert a.feedback.key_id != b.feedback.key_id
        assert str(b.feedback.key_id) not in str(state)  # names the nodes, not the key
    finally:
        await b.stop()
    b = await start_node(cluster_text(tmp_path, sink.port, pg_schema, "node-b"))
    try:
        assert not [d for d in b.status()["degraded"] if d["key"] == "feedback-key"]
    finally:
        await a.stop()
        await b.stop()
