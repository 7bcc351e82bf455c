#!/usr/bin/env python3
"""Measure the spool backends and cluster mode (figures for docs/performance.md ("PostgreSQL spool and cluster mode")).

Three measurements:

``store``  the spool alone: N messages enqueued by C concurrent producers (acknowledgement rate,
           group commit), then on PostgreSQL the claim/deliver cycle (claim a batch under a lease,
           mark delivered, finish) until the queue is empty.
``node``   whole nodes (``postlane serve`` subprocesses) on SQLite or on PostgreSQL (1 or 2
           nodes), a recording sink on loopback, a marketing campaign submitted as fast as the
           nodes accept it while transactional messages arrive at a steady rate; prints
           throughput and per-class latency (acceptance -> arrival at the sink).
``figures`` the cluster monitor's queries on a queue of N recipients (policy notices and a
           campaign): what one evaluation a second costs the database. Figures for
           docs/monitoring.md ("Cluster figures").
``takeover`` two nodes on PostgreSQL, policy notices submitted to node 1 at a steady rate;
           node 1 gets SIGKILL while it holds claimed recipients, K times (a fresh schema each
           time): how long until node 2 picks them up (its "node … is dead" line) and until the
           last of them arrived at the sink. Figures for docs/cluster.md ("Takeover").

Whole-node figures (SQLite vs PostgreSQL, one or two nodes) now come from ``postlane bench
--spool postgresql://… [--nodes 2]``; ``node`` stays for its ``--kill-after`` run (SIGKILL of a
node under load) and to compare with figures recorded before.

Each run prints one JSON object as its last line. Examples::

    .venv/bin/python scripts/pgbench_spool.py store --messages 5000 --producers 64
    .venv/bin/python scripts/pgbench_spool.py node --store pg --nodes 2 --marketing 3000
    .venv/bin/python scripts/pgbench_spool.py figures --messages 200000
    .venv/bin/python scripts/pgbench_spool.py takeover --kills 10
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import secrets
import signal
import smtplib
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import asyncpg

from postlane.harness.sink import Sink
from postlane.spool import Message, PostgresSpool, Recipient, RecipientUpdate, SQLiteSpool, State

DSN = os.environ.get("POSTLANE_BENCH_PG", "postgresql://postgres@127.0.0.1:5432/test")
BODY = b"Subject: bench\r\nFrom: a@insurer.test\r\n\r\n" + (b"x" * 76 + b"\r\n") * 26


# -- store ---------------------------------------------------------------------------------------

def _message(n: int, priority: int = 3, cls: str = "marketing",
             pool: str = "bulk") -> tuple[Message, list[Recipient]]:
    now = time.time()
    msg = Message(id=f"B{n:08d}", cls=cls, pool=pool, mail_from="a@insurer.test",
                  queued_at=now, deadline=now + 3600, expire_at=now + 86400, priority=priority,
                  size=len(BODY))
    msg.remaining = 1
    return msg, [Recipient(msg=msg, idx=0, address=f"r{n}@example.com", domain="example.com")]


async def _hold(spool: PostgresSpool, count: int) -> None:
    """``count`` urgent recipients deferred and leased by another node: every claim's index scan
    passes them (what a destination that is down does to a queue)."""
    for start in range(0, count, 1000):
        await asyncio.gather(*(spool.enqueue(*_message(10**7 + n, priority=0), BODY)
                               for n in range(start, min(count, start + 1000))))
    got = await spool.claim("other-node", "bulk", count, 3600)
    spool.update([RecipientUpdate(r.msg.id, r.idx, State.DEFERRED, 1, time.time() + 3600,
                                  "451 later") for r in got])
    await spool.flush()


async def bench_store(messages: int, producers: int, batch: int, held: int) -> dict:
    out: dict = {"messages": messages, "producers": producers, "body_bytes": len(BODY),
                 "held_by_another_node": held}
    schema = f"pl_bench_{secrets.token_hex(3)}"
    with tempfile.TemporaryDirectory() as tmp:
        for name, spool in (("sqlite", SQLiteSpool(tmp)), ("postgres", PostgresSpool(DSN, schema))):
            await spool.open()
            queue = iter(range(messages))

            async def produce(spool=spool, queue=queue) -> None:
                for n in queue:
                    msg, rcpts = _message(n)
                    await spool.enqueue(msg, rcpts, BODY)

            started = time.perf_counter()
            await asyncio.gather(*(produce() for _ in range(producers)))
            took = time.perf_counter() - started
            out[name] = {"enqueue_msgs_s": round(messages / took),
                         "commits": spool.stats.commits, "msgs_per_commit": round(
                             messages / max(1, spool.stats.commits), 1)}
            if isinstance(spool, PostgresSpool):
                await _hold(spool, held)
                started = time.perf_counter()
                done = 0
                while True:
                    got = await spool.claim("bench", "bulk", batch, 60)
                    if not got:
                        break
                    spool.update([RecipientUpdate(r.msg.id, r.idx, State.DELIVERED, 1, 0.0,
                                                  "250 ok") for r in got])
                    for r in got:
                        spool.finish(r.msg.id)
                    done += len(got)
                await spool.flush()
                took = time.perf_counter() - started
                out[name].update({"claim_batch": batch,
                                  "claim_deliver_finish_rcpts_s": round(done / took)})
            await spool.close()
    conn = await asyncpg.connect(DSN)
    await conn.execute(f'DROP SCHEMA "{schema}" CASCADE')
    await conn.close()
    return out


# -- node ----------------------------------------------------------------------------------------

CONFIG = """
default_class = "marketing"
[node]
name = "{name}"
hostname = "{name}.bench"
spool = "{spool}"
drain_timeout = 10
[listeners.in]
address = "127.0.0.1"
port = {listen}
[pools.critical]
pausable = false
ips = [{{ address = "127.0.0.10", ehlo = "tx1.bench", max_smtp_out = 10 }},
       {{ address = "127.0.0.11", ehlo = "tx2.bench", max_smtp_out = 10 }}]
[pools.bulk]
ips = [{{ address = "127.0.0.30", ehlo = "b1.bench", max_smtp_out = 6 }},
       {{ address = "127.0.0.31", ehlo = "b2.bench", max_smtp_out = 6 }},
       {{ address = "127.0.0.32", ehlo = "b3.bench", max_smtp_out = 6 }},
       {{ address = "127.0.0.33", ehlo = "b4.bench", max_smtp_out = 6 }}]
[classes.policy-documents]
pool = "critical"
priority = 0
sla = "2m"
[classes.marketing]
pool = "bulk"
priority = 3
[relay]
smtp_port = {port}
[routes]
"example.com" = "127.0.0.1:{port}"
[accounting]
directory = "{acct}"
[api]
enabled = false
[cluster]
schema_name = "{schema}"
lease = "10s"
"""


class Served:
    def __init__(self, workdir: Path, name: str, spool: str, schema: str, sink_port: int) -> None:
        with socket.socket() as probe:  # a free port (INFO logs, which name it, cost CPU)
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        cfg = workdir / f"{name}.toml"
        cfg.write_text(CONFIG.format(name=name, spool=spool, schema=schema, port=sink_port,
                                     listen=self.port, acct=workdir / f"acct-{name}"))
        self.proc = subprocess.Popen([sys.executable, "-m", "postlane.cli", "serve", "-c",
                                      str(cfg), "--log-level", "WARNING"],
                                     stdout=subprocess.DEVNULL, stderr=open(  # noqa: SIM115
                                         workdir / f"{name}.log", "wb"))
        self.rss_peak_mb = 0.0
        deadline = time.monotonic() + 30
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port)):
                break
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError(f"{name} did not start: see {workdir / name}.log")
            time.sleep(0.1)

    def sample_rss(self) -> None:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    self.rss_peak_mb = max(self.rss_peak_mb, int(line.split()[1]) / 1024)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(60)


def _submit(port: int, count: int, start: int, cls: str, acked: list[str],
            rate: float = 0.0, stop: threading.Event | None = None) -> None:
    """Submit over one session; ``acked`` gets the subject of every message answered 250."""
    with contextlib.suppress(smtplib.SMTPException, OSError), \
            smtplib.SMTP("127.0.0.1", port, timeout=60) as client:
        for i in range(count):
            if stop is not None and stop.is_set():
                return
            subject = f"Subject: {cls} {start + i}"
            data = (f"{subject}\r\nFrom: a@insurer.test\r\nX-Postlane-Class: "
                    f"{cls}\r\n\r\n").encode() + (b"x" * 76 + b"\r\n") * 26
            client.sendmail("a@insurer.test", [f"r{start + i}@example.com"], data)
            acked.append(subject)
            if rate:
                time.sleep(1 / rate)


def _pct(values: list[float]) -> dict:
    if not values:
        return {}
    values = sorted(values)
    pick = lambda q: values[min(len(values) - 1, int(q * len(values)))]  # noqa: E731
    return {"p50": round(statistics.median(values), 3), "p95": round(pick(0.95), 3),
            "p99": round(pick(0.99), 3), "max": round(values[-1], 3)}


def _subject(data: bytes) -> str:
    head = data.split(b"\r\n\r\n", 1)[0].decode()
    return next(x for x in head.split("\r\n") if x.startswith("Subject:"))


async def bench_node(store: str, nodes: int, marketing: int, rate: float, sessions: int,
                     kill_after: int = 0) -> dict:
    """With ``kill_after``, node 1 gets SIGKILL once that many messages arrived (transactional
    mail goes to the last node, which survives)."""
    schema = f"pl_bench_{secrets.token_hex(3)}"
    sink = await Sink(keep_data=True).start()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        served = [Served(work, f"bench-{i + 1}", DSN if store == "pg" else str(work / "spool"),
                         schema, sink.port) for i in range(nodes)]
        acked_m: list[str] = []
        acked_t: list[str] = []
        killed_at = 0
        stop = threading.Event()
        started = time.time()
        per = marketing // sessions
        threads = [threading.Thread(target=_submit, args=(
            served[i % nodes].port, per, i * per, "marketing", acked_m)) for i in range(sessions)]
        trickle = threading.Thread(target=_submit, args=(
            served[-1].port, 10**9, 0, "policy-documents", acked_t, rate, stop))
        for t in [*threads, trickle]:
            t.start()
        def kill_when_due() -> None:
            nonlocal killed_at
            if kill_after and not killed_at and len(sink.arrivals) >= kill_after:
                served[0].proc.kill()
                killed_at = len(sink.arrivals)

        while any(t.is_alive() for t in threads):
            kill_when_due()
            for s in served:
                s.sample_rss()
            await asyncio.sleep(0.05)
        intake_took = time.time() - started
        stop.set()
        trickle.join()
        wanted = set(acked_m) | set(acked_t)
        seen: set[str] = set()
        parsed = 0
        deadline = time.monotonic() + 600
        while not wanted <= seen and time.monotonic() < deadline:
            kill_when_due()
            seen.update(_subject(a.data) for a in sink.arrivals[parsed:])
            parsed = len(sink.arrivals)
            await asyncio.sleep(0.1)
        took = max(a.time for a in sink.arrivals) - started
        for s in served:
            s.sample_rss()
            s.stop()
    await sink.stop()
    latency: dict[str, list[float]] = {"marketing": [], "policy-documents": []}
    seen = set()
    for a in sink.arrivals:
        head = a.data.split(b"\r\n\r\n", 1)[0].decode()
        subject = _subject(a.data)
        queued = float(next(x for x in head.split("\r\n")
                            if x.startswith("X-Postlane-Queued:")).split()[1].rstrip(";"))
        latency[subject.split()[1]].append(a.time - queued)
        seen.add(subject)
    if store == "pg":
        conn = await asyncpg.connect(DSN)
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        await conn.close()
    out = {"store": store, "nodes": nodes, "marketing": len(acked_m),
           "transactional": len(acked_t), "throughput_msgs_s": round(len(seen) / took, 1),
           "intake_msgs_s": round(len(acked_m) / intake_took, 1),
           "latency_s": {k: _pct(v) for k, v in latency.items()},
           "lost": len(wanted - seen), "duplicates": len(sink.arrivals) - len(seen),
           "rss_mb_peak": [round(s.rss_peak_mb, 1) for s in served]}
    if kill_after:
        out["killed_node_1_after_arrivals"] = killed_at
    return out


async def bench_figures(messages: int, policy_share: float) -> dict:
    """Enqueue ``messages`` (a ``policy_share`` of policy notices with a 2-minute SLA), then
    time the evaluator's queries (median of 20)."""
    from postlane.monitor.cluster import _COUNT, _DEFERRED, _LEASED, _OUTSTANDING, OUTSTANDING_MAX

    schema = f"pl_bench_{secrets.token_hex(3)}"
    spool = PostgresSpool(DSN, schema)
    await spool.open()
    policy = int(messages * policy_share)
    for start in range(0, messages, 2000):
        batch = []
        for n in range(start, min(messages, start + 2000)):
            msg, rcpts = (_message(n, 0, "policy-documents", "critical") if n < policy
                          else _message(n))
            if n < policy:
                msg.deadline = msg.queued_at + 120
            batch.append(spool.enqueue(msg, rcpts, BODY))
        await asyncio.gather(*batch)
    await spool.claim("node-1", "bulk", 80, 60)  # what two nodes hold
    await spool.claim("node-2", "critical", 40, 60)
    queries = {"count": _COUNT, "deferred": _DEFERRED, "leased": _LEASED,
               "outstanding": _OUTSTANDING}
    timings: dict[str, list[float]] = {name: [] for name in queries}
    conn = await asyncpg.connect(DSN, server_settings={
        "search_path": schema, "max_parallel_workers_per_gather": "0"})
    await conn.execute("ANALYZE recipients")
    for _ in range(20):
        now = time.time()
        for name, sql in queries.items():
            started = time.perf_counter()
            async with conn.transaction():
                await conn.execute("SET LOCAL enable_seqscan = off")
                if name == "outstanding":
                    await conn.fetch(sql, "policy-documents", now + 150, OUTSTANDING_MAX)
                elif name == "leased":
                    await conn.fetch(sql)
                else:
                    await conn.fetch(sql, now)
            timings[name].append(time.perf_counter() - started)
    await conn.execute(f'DROP SCHEMA "{schema}" CASCADE')
    await conn.close()
    await spool.close()
    total = [sum(vals) * 1000 for vals in zip(*timings.values(), strict=True)]
    return {"recipients": messages, "policy_notices": policy,
            **{f"{k}_ms": _pct([v * 1000 for v in vals]) for k, vals in timings.items()},
            "evaluation_ms": _pct(total)}


async def bench_takeover(kills: int, rate: float, delay: float, warmup: float) -> dict:
    rounds = []
    for _ in range(kills):
        schema = f"pl_bench_{secrets.token_hex(3)}"
        sink = await Sink(keep_data=False, delay=delay).start()
        conn = await asyncpg.connect(DSN)
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp)
            served = [Served(work, f"bench-{i + 1}", DSN, schema, sink.port) for i in range(2)]
            stop = threading.Event()
            feeder = threading.Thread(target=_submit, args=(
                served[0].port, 10**9, 0, "policy-documents", [], rate, stop))
            feeder.start()
            await asyncio.sleep(warmup)
            served[0].proc.kill()
            killed = time.time()
            stop.set()
            held = {r["address"] for r in await conn.fetch(
                f'SELECT address FROM "{schema}".recipients WHERE lease_owner = $1'
                " AND state IN ('queued', 'deferred')", "bench-1")}
            arrived: dict[str, float] = {}
            deadline = time.monotonic() + 120
            while not held <= arrived.keys() and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
                arrived = {r: a.time for a in sink.arrivals if a.time > killed for r in a.rcpts}
            picked = None
            for line in (work / "bench-2.log").read_text().splitlines():
                with contextlib.suppress(ValueError):
                    record = json.loads(line)
                    if record.get("dead_node") == "bench-1" and picked is None:
                        picked = record["ts"] - killed
            served[0].proc.wait(10)
            await asyncio.to_thread(served[1].stop)  # the sink runs on this loop
            feeder.join()
        await sink.stop()
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        await conn.close()
        rounds.append({"held": len(held), "lost": len(held - arrived.keys()),
                       "picked_up_s": None if picked is None else round(picked, 2),
                       "delivered_s": round(max((arrived[r] for r in held if r in arrived),
                                                default=0.0) - killed, 2)})
        print(json.dumps(rounds[-1]), file=sys.stderr)

    def spread(key: str) -> dict:
        values = sorted(r[key] for r in rounds if r[key] is not None)
        return {"min": values[0], "median": round(statistics.median(values), 2),
                "max": values[-1]} if values else {}

    return {"kills": kills, "rate": rate, "sink_delay_s": delay,
            "picked_up_s": spread("picked_up_s"), "delivered_s": spread("delivered_s"),
            "lost": sum(r["lost"] for r in rounds), "rounds": rounds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)
    st = sub.add_parser("store", help="enqueue and claim rates of the spool alone")
    st.add_argument("--messages", type=int, default=5000)
    st.add_argument("--producers", type=int, default=64)
    st.add_argument("--batch", type=int, default=100, help="recipients per claim")
    st.add_argument("--held", type=int, default=0,
                    help="urgent recipients another node holds deferred (claims scan past them)")
    nd = sub.add_parser("node", help="whole nodes with a sink: throughput and latency")
    nd.add_argument("--store", choices=["sqlite", "pg"], default="pg")
    nd.add_argument("--nodes", type=int, default=1)
    nd.add_argument("--marketing", type=int, default=3000)
    nd.add_argument("--transactional-rate", type=float, default=5.0)
    nd.add_argument("--sessions", type=int, default=8, help="parallel SMTP submission sessions")
    nd.add_argument("--kill-after", type=int, default=0,
                    help="SIGKILL node 1 once this many messages arrived (needs --nodes 2+)")
    fg = sub.add_parser("figures", help="the cluster monitor's queries on a large queue")
    fg.add_argument("--messages", type=int, default=200_000)
    fg.add_argument("--policy-share", type=float, default=0.05)
    tk = sub.add_parser("takeover", help="SIGKILL of a node holding work: time to takeover")
    tk.add_argument("--kills", type=int, default=10)
    tk.add_argument("--rate", type=float, default=30.0, help="policy notices per second")
    tk.add_argument("--sink-delay", type=float, default=0.2, help="seconds per message")
    tk.add_argument("--warmup", type=float, default=4.0, help="seconds before the kill")
    args = parser.parse_args()
    if args.what == "figures":
        result = asyncio.run(bench_figures(args.messages, args.policy_share))
    elif args.what == "takeover":
        result = asyncio.run(bench_takeover(args.kills, args.rate, args.sink_delay,
                                            args.warmup))
    elif args.what == "store":
        result = asyncio.run(bench_store(args.messages, args.producers, args.batch,
                                         args.held))
    else:
        if args.store == "sqlite" and args.nodes != 1:
            parser.error("SQLite is one node's spool: --nodes 1")
        if args.kill_after and args.nodes < 2:
            parser.error("--kill-after needs a node that survives: --nodes 2")
        result = asyncio.run(bench_node(args.store, args.nodes, args.marketing,
                                        args.transactional_rate, args.sessions, args.kill_after))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
