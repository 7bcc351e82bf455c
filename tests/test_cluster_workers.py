"""A cluster whose nodes run intake workers (``[node] workers = 2`` on two nodes of one
PostgreSQL schema): mail taken by any worker of any node is delivered once and its trail
verifies; a pool paused through one node's API is held on the other node's workers too; each
node's status and /metrics count the connections and messages of its own workers, once, and
the cluster's delivered total counts every delivery once. (SIGKILL of one node's main process
with workers: tests/test_killtest.py.)
"""

from __future__ import annotations

import asyncio
import email
import json
import re

from typer.testing import CliRunner

from postlane.cli import app
from tests.conftest import message, send
from tests.support.pg import pg_schema  # noqa: F401  (fixture)
from tests.support.waiting import until
from tests.test_api import api_client
from tests.test_cli_ops import run_cli
from tests.test_cluster import cluster_text, start_node, subjects_of
from tests.test_metrics_exposition import _metrics
from tests.test_workers import _ready, _with_workers
from tests.test_workers_guarantees import _on_every_worker


async def _sla(node, tmp_path) -> dict:
    async with api_client(node, tmp_path) as client:
        return (await client.get("/api/v1/sla")).json()


async def test_two_nodes_with_two_workers_each_pause_count_and_deliver_once(
        tmp_path, sink, pg_schema):  # noqa: F811
    texts = {name: _with_workers(cluster_text(tmp_path, sink.port, pg_schema, name))
             for name in ("node-a", "node-b")}
    cfg = tmp_path / "node-a.toml"
    cfg.write_text(texts["node-a"])
    a = await start_node(texts["node-a"])
    b = await start_node(texts["node-b"])
    held: list = []
    try:
        await _ready(a)
        await _ready(b)
        # 1. paused through node-a's API: node-b's workers accept, nobody delivers bulk
        async with api_client(a, tmp_path) as client:
            assert (await client.post("/api/v1/pools/bulk/pause")).json()["paused"] is True
        await until(lambda: ("bulk", "*") in b.scheduler.paused, what="the pause on node-b")

        async def client(node, prefix: str, n: int, cls: str) -> None:
            for i in range(n):
                await send(node.listeners[0].port, "s@insurer.test",
                           [f"{prefix}{i}@example.com"], message(f"{prefix}{i}", cls=cls))

        # several connections at once on each node: the kernel hands them to both workers
        await asyncio.gather(*(client(b, f"m{k}-", 4, "marketing") for k in range(4)),
                             *(client(a, f"p{k}-", 3, "policy-documents") for k in range(2)))
        await sink.wait_for(6, timeout=60)
        # a bound, not a state: a node ignoring the pause would claim within one poll (0.2 s)
        await asyncio.sleep(0.5)
        assert sorted(subjects_of(sink.arrivals)) == sorted(
            f"p{k}-{i}" for k in range(2) for i in range(3)), "bulk is held on every node"

        # 2. each node counts its own workers' messages and connections, once
        assert a.status()["accepted"] == 6 and b.status()["accepted"] == 16
        held = await _on_every_worker(a.listeners[0].port, 3)
        held += await _on_every_worker(b.listeners[0].port, 5)
        for node, n in ((a, 3), (b, 5)):
            await until(lambda node=node, n=n: node.status()["listeners"][0]["connections"] == n,
                        what=f"{n} connections on {node.config.node.name}")
            async with api_client(node, tmp_path) as api:
                status = (await api.get("/api/v1/status")).json()
            assert status["listeners"][0]["connections"] == n, status
            code, out, err = await run_cli("status", "--json", "--url",
                                           f"http://127.0.0.1:{node.api.port}",
                                           "--token-file", str(tmp_path / "api-token"))
            assert code == 0, err
            assert json.loads(out)["status"]["listeners"][0]["connections"] == n
            text = await _metrics(node, tmp_path)
            assert f'postlane_smtp_connections{{listener="in"}} {float(n)}' in text, text
        for raw in held:
            await raw.close()
        held = []

        # 3. resumed through node-b's API: everything delivered once, whichever node claims
        async with api_client(b, tmp_path) as api:
            assert (await api.post("/api/v1/pools/bulk/resume")).status_code == 200
        await sink.wait_for(22, timeout=60)
        await asyncio.sleep(0.5)  # a bound: a second delivery would come within it
        subjects = subjects_of(sink.arrivals)
        assert len(subjects) == len(set(subjects)) == 22, subjects
        # each process of each node numbers its queue ids under its own tag: the two nodes'
        # workers once shared theirs (one Python process), and the spool refused a duplicate
        tags = {name: {re.search(rb" id ([0-9A-F]+);", m.data)[1][11:-5] for m in sink.arrivals
                       if email.message_from_bytes(m.data)["Subject"].startswith(prefix)}
                for name, prefix in (("a", "p"), ("b", "m"))}
        assert tags["a"] and tags["b"] and not tags["a"] & tags["b"], tags

        # the cluster's figures: every delivery of both nodes, counted once, on both nodes
        async def totals(node) -> dict | None:
            sla = await _sla(node, tmp_path)
            got = {c["class"]: c["delivered_total"] for c in sla["classes"]}
            return got if got.get("marketing") == 16 and got.get("policy-documents") == 6 \
                else None

        for node in (a, b):
            await until(lambda node=node: totals(node), timeout=30,
                        what=f"the cluster's totals on {node.config.node.name}")
        await a.flush_evidence()
        await b.flush_evidence()
        res = await asyncio.to_thread(CliRunner().invoke, app, ["audit", "verify", "-c",
                                                                str(cfg)])
        assert res.exit_code == 0 and res.output.startswith("ok:"), res.output
    finally:
        for raw in held:
            await raw.close()
        await a.stop()
        await b.stop()

