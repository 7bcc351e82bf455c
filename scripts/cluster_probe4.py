"""Probe 4: /metrics, /api/v1/status and /api/v1/sla of three nodes at rest, compared line by
line: what differs, and is it labelled as the node's own?"""

from __future__ import annotations

import asyncio
import re
import secrets
import sys
import tempfile
from pathlib import Path

import asyncpg
import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from postlane.harness.sink import Sink  # noqa: E402
from tests.support.pg import PG_DSN  # noqa: E402
from tests.test_cluster import Served, cluster_text, send_many  # noqa: E402


def say(*args: object) -> None:
    print(*args, flush=True)


async def main() -> None:
    tmp = Path(tempfile.mkdtemp(prefix="probe4-"))
    schema = f"pl_probe_{secrets.token_hex(3)}"
    sink = await Sink().start()
    sink.rcpt_replies = {f"d{i}@example.com": ["451 4.7.1 greylisted"] for i in range(3)}
    names = ("node-a", "node-b", "node-c")
    nodes = {n: Served(tmp, n, cluster_text(tmp, sink.port, schema, n).replace(
        'retry = ["1s", "2s"]', 'retry = ["1h"]')) for n in names}
    try:
        ports = {n: await s.port() for n, s in nodes.items()}
        a = nodes["node-a"]
        token = a.token_file.read_text().strip()
        for i, n in enumerate(names):
            await asyncio.to_thread(send_many, ports[n], [f"x{i}{j}" for j in range(5)])
            await asyncio.to_thread(send_many, ports[n], [f"d{i}"])
            await asyncio.to_thread(send_many, ports[n], [f"p{i}{j}" for j in range(3)],
                                    "policy-documents")
        await asyncio.sleep(3)
        async with httpx.AsyncClient() as cl:
            r = await cl.post(f"http://127.0.0.1:{a.api_port}/api/v1/pools/bulk/pause",
                              headers={"Authorization": f"Bearer {token}"})
            say("pause", r.json())
        await asyncio.to_thread(send_many, ports["node-b"], [f"q{j}" for j in range(4)])
        await asyncio.sleep(5)
        metrics = {n: await s.api("/metrics") for n, s in nodes.items()}
        lines = {n: {ln.rsplit(" ", 1)[0]: ln.rsplit(" ", 1)[1] for ln in m.splitlines()
                     if ln and not ln.startswith("#")} for n, m in metrics.items()}
        types = dict(re.findall(r"^# TYPE (\S+) (\S+)$", metrics["node-a"], re.M))
        keys = sorted(set().union(*lines.values()))
        differ: dict[str, list] = {}
        for k in keys:
            vals = [lines[n].get(k) for n in names]
            if len(set(vals)) > 1:
                base = k.split("{")[0]
                fam = re.sub(r"_(bucket|sum|count|total|created)$", "", base)
                differ.setdefault(f"{base} ({types.get(base, types.get(fam, '?'))})", []).append(
                    (k, vals))
        for metric, rows in differ.items():
            say(metric, len(rows), "series differ, e.g.", rows[:2])
        for n, s in nodes.items():
            st = await s.api("/api/v1/status")
            say(n, "status queued", st["queued"], "pools", [(p.get("pool"), p.get("paused"))
                                                          for p in st["pools"]],
                "cluster pools", st["cluster"]["pools"])
            sla = await s.api("/api/v1/sla")
            say(n, "sla classes", [(c["class"], c["depth"], c["oldest_age_s"], c["drain_rate"])
                                   for c in sla["classes"]])
    finally:
        for s in nodes.values():
            await asyncio.to_thread(s.stop)
        await sink.stop()
        conn = await asyncpg.connect(PG_DSN)
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        await conn.close()


if __name__ == "__main__":
    asyncio.run(main())
