"""Probe 2: lane pause, SLA percentiles, alerts and their webhook on three nodes."""

from __future__ import annotations

import asyncio
import json
import secrets
import sys
import tempfile
from pathlib import Path

import asyncpg
import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.support.httpfixture import FixtureHTTP  # noqa: E402
from tests.support.pg import PG_DSN  # noqa: E402
from tests.test_cluster import Served, cluster_text, send_many  # noqa: E402

from postlane.harness.sink import Sink  # noqa: E402


def say(*args: object) -> None:
    print(*args, flush=True)


async def main() -> None:
    tmp = Path(tempfile.mkdtemp(prefix="probe2-"))
    schema = f"pl_probe_{secrets.token_hex(3)}"
    sink = await Sink().start()
    hook = FixtureHTTP()
    hook.json("POST", "/hook", {"ok": True})
    mon = f"""
[monitor]
resolve_after = "2s"
webhook_url = "{hook.url}/hook"
[monitor.sla.policy-documents]
lead_time = "4s"
p95 = "1h"
"""
    names = ("node-a", "node-b", "node-c")
    nodes = {n: Served(tmp, n, cluster_text(tmp, sink.port, schema, n, mon, max_out=1)
                       .replace('sla = "2m"', 'sla = "10s"')) for n in names}
    try:
        ports = {n: await s.port() for n, s in nodes.items()}
        a, b, c = (nodes[n] for n in names)
        token = a.token_file.read_text().strip()

        async def post(node: Served, path: str, **params) -> dict:
            async with httpx.AsyncClient(timeout=30) as cl:
                r = await cl.post(f"http://127.0.0.1:{node.api_port}{path}", params=params,
                                  headers={"Authorization": f"Bearer {token}"})
            return {"code": r.status_code, "body": r.json()}

        say("pause lane bulk/example.com on b:",
            await post(b, "/api/v1/pools/bulk/pause", domain="example.com"))
        await asyncio.sleep(1.5)
        for n, s in nodes.items():
            st = await s.api("/api/v1/status")
            say(n, "pools", [(p.get("name"), p.get("paused"), p.get("paused_lanes")) for p in
                             st["pools"]], "lanes",
                [(ln.get("pool"), ln.get("domain"), ln.get("paused"), ln.get("depth"))
                 for ln in st["lanes"]])
            m = await s.api("/metrics")
            say(n, "paused metric lines", [ln for ln in m.splitlines() if "paused" in ln
                                           and not ln.startswith("#")])
        await asyncio.to_thread(send_many, ports["node-a"], [f"m{i}" for i in range(5)])
        await asyncio.sleep(2)
        say("arrivals while lane paused:", len(sink.arrivals))
        say("resume lane on c:", await post(c, "/api/v1/pools/bulk/resume", domain="example.com"))
        await sink.wait_for(5, timeout=30)
        say("delivered after resume", len(sink.arrivals))
        # backlog -> alert; webhook count
        sink.delay = 1.0
        await asyncio.to_thread(send_many, ports["node-b"], [f"s{i:02d}" for i in range(40)],
                                "policy-documents")
        for _ in range(60):
            al = await a.api("/api/v1/alerts")
            if al["active"]:
                break
            await asyncio.sleep(1)
        say("alert on a:", [x["id"] for x in al["active"]])
        for n, s in nodes.items():
            say(n, "alerts", [(x["id"], x["fired_at"]) for x in (await s.api(
                "/api/v1/alerts"))["active"]])
            sla = await s.api("/api/v1/sla")
            pd = [k for k in sla["classes"] if k["class"] == "policy-documents"][0]
            say(n, "sla policy-documents", json.dumps({k: pd[k] for k in pd if k not in (
                "rules",)}))
        sink.delay = 0.0
        for _ in range(90):
            al = await c.api("/api/v1/alerts")
            if not al["active"] and al["resolved"]:
                break
            await asyncio.sleep(1)
        await asyncio.sleep(3)
        for n, s in nodes.items():
            say(n, "after: alerts", await s.api("/api/v1/alerts"))
        say("webhook posts:", len([r for r in hook.requests if r[1] == "/hook"]))
        for n, s in nodes.items():
            told = [r for r in s.lines() if str(r.get("msg", "")).startswith("alert ")]
            say(n, "alert log lines", [(r["msg"][:40]) for r in told])
    finally:
        for s in nodes.values():
            await asyncio.to_thread(s.stop)
        await sink.stop()
        hook.stop()
        conn = await asyncpg.connect(PG_DSN)
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        await conn.close()


if __name__ == "__main__":
    asyncio.run(main())
