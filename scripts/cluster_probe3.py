"""Probe 3: kill -9 of a node with deliveries on the wire; the trail, SLA report and status
from every node."""

from __future__ import annotations

import asyncio
import json
import secrets
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import asyncpg

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from postlane.harness.sink import Sink  # noqa: E402
from tests.support.pg import PG_DSN  # noqa: E402
from tests.test_cluster import Served, cluster_text, send_many, subjects_of  # noqa: E402


def say(*args: object) -> None:
    print(*args, flush=True)


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "postlane.cli", *args], capture_output=True,
                          text=True, timeout=120)


async def main() -> None:
    tmp = Path(tempfile.mkdtemp(prefix="probe3-"))
    schema = f"pl_probe_{secrets.token_hex(3)}"
    sink = await Sink().start()
    sink.delay = 2.0  # long transactions: some on the wire at the kill
    names = ("node-a", "node-b", "node-c")
    nodes = {n: Served(tmp, n, cluster_text(tmp, sink.port, schema, n, max_out=2))
             for n in names}
    start = time.time() - 60
    try:
        ports = {n: await s.port() for n, s in nodes.items()}
        a = nodes["node-a"]
        await asyncio.to_thread(send_many, ports["node-b"], [f"k{i:02d}" for i in range(12)],
                                "policy-documents")
        await asyncio.sleep(1.0)
        st = await a.api("/api/v1/status")
        say("a holds", st["queued"], "in flight lanes", [(ln["domain"], ln.get("inflight"))
                                                         for ln in st["lanes"]])
        a.proc.kill()
        a.proc.wait(10)
        killed = time.monotonic()
        await sink.wait_for(12, timeout=120)
        say("12 arrived", round(time.monotonic() - killed, 1), "s after the kill")
        await asyncio.sleep(8)
        got = subjects_of(sink.arrivals)
        say("arrivals", len(got), "distinct", len(set(got)),
            "twice", sorted({s for s in got if got.count(s) > 1}))
        for n in ("node-b", "node-c"):
            st = await nodes[n].api("/api/v1/status")
            say(n, "nodes", [(x["name"], x["state"], x.get("claimed")) for x in
                             st["cluster"]["nodes"]])
        out = cli("audit", "verify", "-c", str(tmp / "node-b.toml"))
        say("verify b:", out.returncode, out.stdout.strip()[-400:], out.stderr[-400:])
        out = cli("audit", "verify", "-c", str(tmp / "node-a.toml"))
        say("verify a (dead node's config):", out.returncode, out.stdout.strip()[-300:],
            out.stderr[-300:])
        end = time.time() + 60
        fmt = "%Y-%m-%dT%H:%M:%S"
        t0, t1 = (time.strftime(fmt, time.gmtime(t)) + "Z" for t in (start, end))
        reports = {}
        for n in names:
            out = cli("audit", "sla", "-c", str(tmp / f"{n}.toml"), "--from", t0, "--to", t1,
                      "--format", "json")
            reports[n] = out.stdout if out.returncode == 0 else out.stderr[-400:]
        say("sla reports equal on all three configs:", len(set(reports.values())) == 1)
        rep = json.loads(reports["node-b"])
        say(json.dumps(rep, indent=1)[:3000])
        for q in ("k00", "k01", "k02", "k03"):
            out = cli("audit", "show", "-c", str(tmp / "node-c.toml"), "--recipient",
                      f"{q}@example.com")
            say(out.stdout[-1200:])
        out = cli("status", "--url", f"http://127.0.0.1:{nodes['node-c'].api_port}",
                  "--token-file", str(a.token_file))
        say("status c:\n", out.stdout[-3000:], out.stderr[-300:])
        out = cli("queues", "--url", f"http://127.0.0.1:{nodes['node-b'].api_port}",
                  "--token-file", str(a.token_file))
        say("queues b:\n", out.stdout[-3000:], out.stderr[-300:])
    finally:
        for s in nodes.values():
            await asyncio.to_thread(s.stop)
        await sink.stop()
        conn = await asyncpg.connect(PG_DSN)
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        await conn.close()


if __name__ == "__main__":
    asyncio.run(main())
