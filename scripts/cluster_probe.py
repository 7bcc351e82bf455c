"""Probe: do three ``postlane serve`` nodes on one PostgreSQL schema tell one truth?

Starts a sink and three nodes (loopback only), drives mail, pause/resume, retry, a deferral, a
kill -9, and prints what each node says side by side. Run: ``nice -n 19 .venv/bin/python
scripts/cluster_probe.py`` (needs PostgreSQL on 127.0.0.1:5432, db ``test``).
"""

from __future__ import annotations

import asyncio
import json
import re
import secrets
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import asyncpg

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.support.pg import PG_DSN  # noqa: E402
from tests.test_cluster import Served, cluster_text, send_many, subjects_of  # noqa: E402

from postlane.harness.sink import Sink  # noqa: E402

MON = """
[monitor]
resolve_after = "2s"
[monitor.sla.policy-documents]
lead_time = "4s"
p95 = "1h"
"""


def say(*args: object) -> None:
    print(*args, flush=True)


def metric(text: str, name: str) -> dict[str, float]:
    return {labels: float(v) for labels, v in re.findall(
        rf"^{name}(\{{[^}}]*\}})? (\S+)$", text, re.M)}


async def main() -> None:
    tmp = Path(tempfile.mkdtemp(prefix="probe-"))
    schema = f"pl_probe_{secrets.token_hex(3)}"
    sink = await Sink().start()
    sink.delay = 0.05
    names = ("node-a", "node-b", "node-c")
    nodes = {n: Served(tmp, n, cluster_text(tmp, sink.port, schema, n, MON, max_out=1,
                                            marketing_max_out=1).replace('sla = "2m"',
                                                                         'sla = "20s"'))
             for n in names}
    try:
        ports = {n: await s.port() for n, s in nodes.items()}
        say("ports", ports)

        async def each(path: str) -> dict:
            return {n: await s.api(path) for n, s in nodes.items()}

        # 1. pause bulk on a, a lane on b; visible everywhere?
        a, b, c = (nodes[n] for n in names)
        token = a.token_file.read_text().strip()
        import httpx

        async def post(node: Served, path: str, **params) -> dict:
            async with httpx.AsyncClient(timeout=30) as cl:
                r = await cl.post(f"http://127.0.0.1:{node.api_port}{path}", params=params,
                                  headers={"Authorization": f"Bearer {token}"})
            return {"code": r.status_code, "body": r.json()}

        say("pause bulk on a:", await post(a, "/api/v1/pools/bulk/pause"))
        say("pause lane critical/other.test on b:",
            await post(b, "/api/v1/pools/critical/pause", domain="other.test"))
        await asyncio.sleep(2)
        for n, st in (await each("/api/v1/status")).items():
            say(n, "pools paused:", {p["name"] if "name" in p else p.get("pool"): p.get("paused")
                                     for p in st["pools"]},
                "lanes:", [(ln.get("pool"), ln.get("domain"), ln.get("paused")) for ln in
                           st["lanes"]])
        # 2. 30 marketing messages into a (paused): the same depth on every node?
        await asyncio.to_thread(send_many, ports["node-a"], [f"m{i:02d}" for i in range(30)])
        await asyncio.sleep(4)
        for n, st in (await each("/api/v1/status")).items():
            say(n, "queued(own)", st["queued"], "cluster pools", json.dumps(st["cluster"]["pools"]),
                "evaluated_by", st["cluster"].get("evaluated_by"))
            say(n, "lanes", [(ln.get("pool"), ln.get("domain"), ln.get("depth"),
                              ln.get("paused")) for ln in st["lanes"]])
        for n, m in (await each("/metrics")).items():
            say(n, "queue_depth", metric(m, "postlane_queue_depth"))
            say(n, "domain_depth", metric(m, "postlane_domain_queue_depth"))
            say(n, "lane_depth", metric(m, "postlane_lane_depth"))
            say(n, "paused", metric(m, "postlane_pool_paused"), metric(m, "postlane_lane_paused"))
        for n in names:
            out = subprocess.run([sys.executable, "-m", "postlane.cli", "queues", "-c",
                                  str(tmp / f"{n}.toml")], capture_output=True, text=True)
            say(n, "postlane queues:\n", out.stdout, out.stderr[-500:])
        # 3. resume on c: delivered once
        say("resume bulk on c:", await post(c, "/api/v1/pools/bulk/resume"))
        await sink.wait_for(30, timeout=60)
        got = subjects_of(sink.arrivals)
        say("delivered", len(got), "distinct", len(set(got)))
        # 4. a deferral on node: policy docs to soft@ get 450 several times; retry_now from c
        sink.rcpt_replies = {f"soft{i}@example.com": ["450 4.2.1 busy"] * 3 + ["250 ok"]
                             for i in range(4)}
        for i in range(4):
            await asyncio.to_thread(send_many, ports["node-a"], [f"soft{i}"], "policy-documents")
        await asyncio.sleep(1.5)
        say("retry critical on c:", await post(c, "/api/v1/pools/critical/retry"))
        # 5. sla/alerts on every node
        for n, s in (await each("/api/v1/sla")).items():
            say(n, "sla scope", s.get("scope"), "evaluated_by", s.get("evaluated_by"),
                [(k["class"], k["depth"], k.get("latency", {}).get("5m") if isinstance(
                    k.get("latency"), dict) else None) for k in s["classes"]])
        for n, al in (await each("/api/v1/alerts")).items():
            say(n, "alerts", al)
        # 6. activity panel
        for n, act in (await each("/api/v1/activity")).items():
            say(n, "activity keys", list(act), "totals", act.get("totals") or act.get("hours"))
        # 7. kill -9 of a node holding work
        sink.delay = 0.5
        await asyncio.to_thread(send_many, ports["node-a"], [f"k{i:02d}" for i in range(20)])
        await asyncio.sleep(1.0)
        before = len(sink.arrivals)
        a.proc.kill()
        killed = time.monotonic()
        a.proc.wait(10)
        say("killed a with", before, "arrivals so far")
        await sink.wait_for(30 + 4 + 20, timeout=90)
        say("all k delivered after", round(time.monotonic() - killed, 2), "s")
        await asyncio.sleep(6)
        got = subjects_of(sink.arrivals)
        dup = sorted({s for s in got if got.count(s) > 1})
        say("total arrivals", len(got), "distinct", len(set(got)), "dups", dup)
        for n in ("node-b", "node-c"):
            st = await nodes[n].api("/api/v1/status")
            say(n, "nodes", [(x["name"], x["state"]) for x in st["cluster"]["nodes"]])
            m = await nodes[n].api("/metrics")
            say(n, "cluster_nodes metric", metric(m, "postlane_cluster_nodes"))
        for n, s in nodes.items():
            lines = s.lines()
            interesting = [r for r in lines if r.get("logger", "").startswith(
                ("postlane.cluster", "postlane.monitor", "postlane.operations"))]
            say(n, "log lines of interest:")
            for r in interesting:
                say("   ", {k: v for k, v in r.items() if k not in ("ts",)})
        out = subprocess.run([sys.executable, "-m", "postlane.cli", "audit", "verify", "-c",
                              str(tmp / "node-b.toml")], capture_output=True, text=True)
        say("audit verify:", out.returncode, out.stdout[-1500:], out.stderr[-1500:])
    finally:
        for s in nodes.values():
            await asyncio.to_thread(s.stop)
        await sink.stop()
        conn = await asyncpg.connect(PG_DSN)
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        await conn.close()
        say("tmp", tmp)


if __name__ == "__main__":
    asyncio.run(main())
