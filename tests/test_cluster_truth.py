"""Does a cluster tell one truth? Two ``postlane serve`` processes on one PostgreSQL schema, each
with its own API port and token, mail through both (delivered, deferred by a 451, held in a
paused pool): every node's CLI and API say the same about the cluster's queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import asyncpg

from postlane.startup import parse_config
from tests.conftest import message, send
from tests.support.pg import PG_DSN, pg_schema  # noqa: F401  (fixture)
from tests.support.waiting import until
from tests.test_cluster import Served, cluster_text, send_many, subjects_of

FAST = 'dead_after = "1s"\nlease = "2s"\n'
"""Appended to ``[cluster]``: a killed node is dead a second after its last heartbeat."""


def _node(tmp_path: Path, sink_port: int, schema: str, name: str,
          edit: Callable[[str], str] = str, **kwargs) -> Served:
    """Node ``name`` of the cluster on ``schema``, with an API token of its own (``edit``
    changes the config text first)."""
    token = tmp_path / f"token-{name}"
    text = edit(cluster_text(tmp_path, sink_port, schema, name, **kwargs)).replace(
        f'token_file = "{tmp_path}/api-token"', f'token_file = "{token}"') + FAST
    node = Served(tmp_path, name, text)
    node.token_file = token
    node.text = text
    return node


def ops_cli(node: Served, *args: str) -> subprocess.CompletedProcess:
    """``postlane ARGS`` against ``node``'s API (its own URL and token)."""
    return subprocess.run(
        [sys.executable, "-m", "postlane.cli", *args, "--url",
         f"http://127.0.0.1:{node.api_port}", "--token-file", str(node.token_file)],
        capture_output=True, text=True, timeout=60)


async def _mail_through_both(nodes: list[Served]) -> None:
    """Per node: one delivered, two recipients deferred by a 451, two in the paused pool."""
    for i, node in enumerate(nodes):
        port = await node.port()
        await send(port, "sender@insurer.test", [f"ok{i}@example.com"],
                   message(f"ok{i}", cls="policy-documents"))
        await send(port, "sender@insurer.test", [f"later{i}@example.com",
                                                 f"later{i + 2}@example.com"],
                   message(f"later{i}", cls="policy-documents"))
        await send(port, "sender@insurer.test", [f"bulk{i}@example.com",
                                                 f"bulk{i + 2}@example.com"],
                   message(f"bulk{i}", cls="marketing"))


async def test_queues_as_json_is_the_clusters_queue_on_every_node(tmp_path, sink,
                                                                  pg_schema):  # noqa: F811
    """``postlane queues --json`` printed only the asked node's lanes (what it had claimed):
    the paused pool's mail, which no node claims, was in neither node's answer, and the two
    nodes answered differently about one queue, while the text output showed the cluster's.
    Now the JSON carries the shared queue per pool and per lane too, the same on every node."""
    sink.rcpt_replies = {f"later{i}@example.com": ["451 4.3.0 try later"] for i in range(4)}
    nodes = [_node(tmp_path, sink.port, pg_schema, name) for name in ("node-a", "node-b")]
    try:
        await asyncio.gather(*(node.port() for node in nodes))
        paused = ops_cli(nodes[0], "pause", "bulk")
        assert paused.returncode == 0, paused.stderr
        await _mail_through_both(nodes)

        async def settled() -> list[dict] | None:
            """Both nodes' ``queues --json`` once the cluster's figures count it all."""
            outs = []
            for node in nodes:
                out = await asyncio.to_thread(ops_cli, node, "queues", "--json")
                assert out.returncode == 0, out.stderr
                outs.append(json.loads(out.stdout))
            shared = [o.get("cluster", {}) if isinstance(o, dict) else {} for o in outs]
            if all(s.get("pools", {}).get("bulk", {}).get("queued") == 4 and s["pools"][
                    "critical"]["deferred"] == 4 for s in shared):
                return outs
            return None

        outs = await until(settled, timeout=30, step=0.2, what="the cluster's queue in JSON")
        a, b = outs
        counts = [{name: {k: pool[k] for k in ("queued", "deferred", "claimed", "unowned",
                                               "on_hold")}
                   for name, pool in o["cluster"]["pools"].items()} for o in outs]
        assert counts[0] == counts[1] == {  # (the drain rates move on between two reads)
            "bulk": {"queued": 4, "deferred": 0, "claimed": 0, "unowned": 0, "on_hold": 0},
            "critical": {"queued": 0, "deferred": 4, "claimed": 4, "unowned": 0,
                         "on_hold": 0}}, "one queue, one answer"
        lanes = {n: {(ln["pool"], ln["domain"]): (ln["queued"], ln["deferred"], ln["paused"])
                     for ln in o["cluster"]["lanes"]} for n, o in zip("ab", outs, strict=True)}
        assert lanes["a"] == lanes["b"] == {("bulk", "example.com"): (4, 0, True),
                                            ("critical", "example.com"): (0, 4, False)}
        # beside it, each node's own lanes: what it has claimed (the deferred ones it tried)
        held = [sum(ln["depth"] for ln in o["lanes"]) for o in outs]
        assert sum(held) == 4, held
    finally:
        for node in nodes:
            await asyncio.to_thread(node.stop)


async def test_a_node_stopped_gracefully_leaves_every_delivery_in_the_clusters_totals(
        tmp_path, sink, pg_schema):  # noqa: F811
    """A node publishes its deliveries to the cluster's figures a second at a time, the
    seconds that ended before its monitor's tick. Stopped (SIGTERM: a drain, a rolling
    upgrade) it published nothing more: what it delivered in its last second or two was never
    in the cluster's ``delivered_total`` (17 of 20, for ever). Its slices are now written with
    its outcomes, in the spool's commits (nothing is left to publish when it stops)."""
    nodes = [_node(tmp_path, sink.port, pg_schema, "node-a", max_out=4),
             _node(tmp_path, sink.port, pg_schema, "node-b", max_out=1)]
    a, b = nodes
    try:
        await asyncio.gather(*(node.port() for node in nodes))
        names = [f"t{i:02d}" for i in range(20)]
        assert len(await asyncio.to_thread(send_many, await a.port(), names,
                                           "policy-documents")) == len(names)

        async def a_done() -> int:
            """node-a's own deliveries, once it holds nothing (its outcomes committed)."""
            own = (await a.api("/api/v1/sla"))["node"]["classes"]
            [mine] = [c for c in own if c["class"] == "policy-documents"]
            return mine["delivered_total"] if mine["held"] == 0 and mine[
                "delivered_total"] else 0

        await until(a_done, timeout=30, step=0.02, what="node-a delivered its share")
        await asyncio.to_thread(a.stop)  # SIGTERM, at once: its last second is unpublished
        await sink.wait_for(len(names))  # node-b's share too (one connection: it may lag)

        async def counted() -> int:
            sla = await b.api("/api/v1/sla")  # (no classes yet while node-b takes over
            # evaluating the cluster's figures from node-a)
            found = [c for c in sla["classes"] if c["class"] == "policy-documents"]
            return found[0]["delivered_total"] if found and found[0]["depth"] == 0 else 0

        await until(counted, timeout=20, step=0.2, what="the cluster's figures settled")

        async def every_delivery() -> bool:
            return await counted() == len(names)

        await until(every_delivery, timeout=5, step=0.2, what="every delivery in the total")
        assert len(sink.arrivals) == len(names), "each delivered once"
    finally:
        for node in nodes:
            await asyncio.to_thread(node.stop)


async def test_every_class_is_listed_before_any_node_evaluated_the_clusters_figures(
        tmp_path, sink, pg_schema):  # noqa: F811
    """A node with no cluster figures yet - none stored by the evaluator it waits for, or
    taking the evaluation over before its own first - answered ``/api/v1/sla`` with an empty
    ``classes`` list: a client iterating the classes saw none. Every configured class is
    listed at all times; figures nobody has evaluated are null, and ``stale`` says so."""
    holder = await asyncpg.connect(PG_DSN)  # an evaluator that has stored nothing yet
    await holder.execute(f"SELECT pg_advisory_lock(hashtext('postlane-monitor/{pg_schema}'), 0)")
    b = _node(tmp_path, sink.port, pg_schema, "node-b")
    configured = list(parse_config(b.text).classes)
    try:
        await b.port()
        before = await b.api("/api/v1/sla")
        assert [c["class"] for c in before["classes"]] == configured
        assert before["stale"] is True and before["evaluated_by"] is None
        assert {c["delivered_total"] for c in before["classes"]} == {None}, "not known yet"
        assert [c["pool"] for c in before["classes"]] == ["critical", "bulk"]
        shown = await asyncio.to_thread(ops_cli, b, "status")
        assert shown.returncode == 0, shown.stderr
        assert "policy-documents" in shown.stdout and "no figures yet" in shown.stdout
        await holder.close()  # it dies: node-b takes the evaluation over

        async def taken_over() -> dict | None:
            sla = await b.api("/api/v1/sla")
            assert [c["class"] for c in sla["classes"]] == configured, sla
            return sla if sla["evaluated_by"] == "node-b" else None

        after = await until(taken_over, timeout=20, step=0.02, what="node-b evaluating")
        assert after["stale"] is False
        assert {c["delivered_total"] for c in after["classes"]} == {0}
    finally:
        if not holder.is_closed():
            await holder.close()
        await asyncio.to_thread(b.stop)


async def test_a_killed_nodes_last_outcomes_are_in_the_clusters_totals_after_takeover(
        tmp_path, sink, pg_schema):  # noqa: F811
    """A node published its outcomes to the cluster's totals a second at a time, from memory:
    SIGKILLed under load it took its last second or two with it, and ``delivered_total``
    stayed short of what the sink received for ever, though the audit store had every
    record. After the takeover the totals are exact: every final outcome of both nodes,
    delivered or failed, counted once."""
    sink.delay = 0.1
    bounced = [f"gone{i}" for i in range(4)]
    sink.rcpt_replies = {f"{name}@example.com": ["550 5.1.1 no such user"] for name in bounced}
    nodes = [_node(tmp_path, sink.port, pg_schema, name, max_out=2, marketing_max_out=2)
             for name in ("node-a", "node-b")]
    a, b = nodes
    try:
        ports = await asyncio.gather(*(node.port() for node in nodes))
        batches = [[f"p{n}{i:03d}" for i in range(40)] + bounced[n::2] for n in (0, 1)]
        batches += [[f"m{n}{i:03d}" for i in range(60)] for n in (0, 1)]
        acked = await asyncio.gather(*(
            asyncio.to_thread(send_many, ports[n % 2], names,
                              "policy-documents" if n < 2 else "marketing")
            for n, names in enumerate(batches)))
        assert sum(map(len, acked)) == sum(map(len, batches))
        await sink.wait_for(80, timeout=60)
        a.stop(signal.SIGKILL)  # in the middle of its deliveries: no drain, nothing published
        expected = sum(map(len, batches)) - len(bounced)

        async def received() -> bool:
            return len(set(subjects_of(sink.arrivals))) >= expected

        await until(received, timeout=60, what="every message at the sink")

        async def adopted() -> bool:  # node-b's recorder took what node-a left in the outbox
            rows = await _rows(pg_schema, "SELECT count(*) AS n FROM events e JOIN writers w"
                               " ON w.writer = e.writer WHERE w.node = 'node-a'")
            return rows[0]["n"] == 0

        await until(adopted, timeout=60, what="node-a's evidence adopted by node-b")
        got: dict = {}

        async def exact() -> bool:
            sla = await b.api("/api/v1/sla")
            if sla["evaluated_by"] != "node-b" or any(c["depth"] for c in sla["classes"]):
                return False
            subjects = set(subjects_of(sink.arrivals))
            stored = {(r["cls"], r["type"]): r["n"] for r in await _rows(
                pg_schema, "SELECT cls, type, count(*) AS n FROM audit_records"
                " WHERE type IN ('d', 'b') GROUP BY cls, type")}
            got.clear()
            for c in sla["classes"]:
                prefix = "p" if c["class"] == "policy-documents" else "m"
                got[c["class"]] = {
                    "delivered_total": c["delivered_total"], "failed_total": c["failed_total"],
                    "at the sink": sum(1 for s in subjects if s.startswith(prefix)),
                    "stored d": stored.get((c["class"], "d"), 0),
                    "stored b": stored.get((c["class"], "b"), 0)}
            return all(g["delivered_total"] == g["at the sink"] == g["stored d"]
                       and g["failed_total"] == g["stored b"] for g in got.values())

        with contextlib.suppress(AssertionError):
            await until(exact, timeout=20, step=0.5, what="the cluster's totals exact")
        assert got and all(
            g["delivered_total"] == g["at the sink"] == g["stored d"]
            and g["failed_total"] == g["stored b"] for g in got.values()), got
        assert got["policy-documents"]["stored b"] >= len(bounced), got
    finally:
        for node in nodes:
            await asyncio.to_thread(node.stop, signal.SIGKILL)


async def _rows(schema: str, sql: str) -> list:
    conn = await asyncpg.connect(PG_DSN, server_settings={"search_path": f'"{schema}"'})
    try:
        return await conn.fetch(sql)
    finally:
        await conn.close()
