"""CPU per delivered message on two of the event loop's per-record paths: the attempt journal's
write before the final dot, and a "d" record built (``base_record`` + ``fill_conn``, as
``Scheduler.delivered`` does) and told to the node's observers (``Node.emit``).

    .venv/bin/python benchmarks/record_path.py                      # this checkout: one JSON line
    .venv/bin/python benchmarks/record_path.py --a ../other-checkout --rounds 3

With ``--a`` it runs A B B A rounds, each side in a process of its own with that checkout's
``src`` first on ``PYTHONPATH`` (the other side: this script's checkout), and prints each side's
medians and the B/A ratios. Figures are ``time.process_time()`` (user + system CPU) per
attempt or record, the median of ``--repeat`` passes of ``--n`` each; the journal writes one
attempt per call, as a delivery to one recipient does. Records carry times that move forward
from pass to pass (the tracker's windows expect the clock's order).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from monitor_overhead import CONFIG  # the same node as that sibling script measures

CONN = {"source_ip": "127.0.0.30", "dest_ip": "127.0.0.5", "tls": "TLSv1.3",
        "cipher": "TLS_AES_256_GCM_SHA384", "tls_auth": "none", "tls_policy": "opportunistic",
        "vmta": "bulk.test", "mx": "mx.example.com"}
"""What the relay's connection says about itself (the ``conn`` of ``delivered``)."""

FIGURES = ("journal_us_per_attempt", "build_us_per_record", "emit_us_per_record")


def journal(n: int, repeat: int) -> float:
    from postlane.spool.attempts import AttemptJournal
    from postlane.spool.base import Attempt

    info = json.dumps({"source_ip": "127.0.0.30", "ehlo": "bulk.test", "mx": "mx.example.com",
                       "dest_ip": "127.0.0.5", "tls": "TLSv1.3"}, separators=(",", ":"))
    now = time.time()
    batches = [[Attempt(f"Q{i:010d}", 0, now + i * 0.001, info, 1)] for i in range(n)]
    times = []
    for _ in range(repeat):
        with tempfile.TemporaryDirectory() as d:
            jnl = AttemptJournal(Path(d))
            jnl.open()
            t = time.process_time()
            for batch in batches:
                jnl.write(batch)
            times.append(time.process_time() - t)
            jnl.close()
    return statistics.median(times) / n * 1e6


async def records(n: int, repeat: int) -> tuple[float, float]:
    from postlane.node import Node
    from postlane.scheduler.outcomes import base_record, fill_conn
    from postlane.spool import Message, Recipient
    from postlane.startup import parse_config

    logging.disable(logging.WARNING)
    with tempfile.TemporaryDirectory() as d:
        node = Node(parse_config(CONFIG.format(d=d)))
        t0 = time.time()
        rcpts = [Recipient(msg=Message(id=f"Q{i:010d}", cls="marketing", pool="bulk",
                                       mail_from="s@insurer.test", queued_at=t0 + i * 0.001,
                                       deadline=0.0, expire_at=0.0, priority=3, size=2000),
                           idx=0, address=f"r{i}@example.com", domain="example.com")
                 for i in range(n)]
        build, emit = [], []
        for p in range(repeat):
            offset = 0.05 + p * n * 0.001
            t = time.process_time()
            batch = []
            for i, rcpt in enumerate(rcpts):
                rec = base_record("d", rcpt, t0 + i * 0.001 + offset)
                rec.dsn_action, rec.dsn_status, rec.dsn_diag = ("relayed", "2.0.0",
                                                                "smtp;250 2.0.0 ok")
                fill_conn(rec, CONN)
                batch.append(rec)
            build.append(time.process_time() - t)
            t = time.process_time()
            for rec in batch:
                node.emit(rec)
            emit.append(time.process_time() - t)
        await node.monitor.alerts.close(timeout=0)
    return statistics.median(build) / n * 1e6, statistics.median(emit) / n * 1e6


def measure(n: int, repeat: int) -> dict:
    import postlane

    out: dict = {"src": str(Path(postlane.__file__).parent)}
    out["journal_us_per_attempt"] = round(journal(n, repeat), 3)
    build, emit = asyncio.run(records(n, repeat))
    out["build_us_per_record"], out["emit_us_per_record"] = round(build, 3), round(emit, 3)
    return out


def side(checkout: Path, n: int, repeat: int) -> dict:
    env = dict(os.environ, PYTHONPATH=str(checkout / "src"))
    proc = subprocess.run([sys.executable, __file__, "--measure", "--n", str(n),
                           "--repeat", str(repeat)], env=env, capture_output=True, text=True,
                          check=False)
    if proc.returncode != 0:
        sys.exit(f"measuring {checkout} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=100_000, help="attempts, and records, per pass")
    ap.add_argument("--repeat", type=int, default=5, help="passes (the median is taken)")
    ap.add_argument("--a", type=Path, help="the checkout to compare against (A B B A)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.measure or args.a is None:
        print(json.dumps(measure(args.n, args.repeat)))
        return
    here = Path(__file__).resolve().parent.parent
    runs: dict[str, list[dict]] = {"A": [], "B": []}
    for _ in range(args.rounds):
        for name in ("A", "B", "B", "A"):
            result = side(args.a.resolve() if name == "A" else here, args.n, args.repeat)
            runs[name].append(result)
            print(json.dumps({"side": name, **result}), file=sys.stderr)
    med = {name: {f: round(statistics.median(r[f] for r in results), 3) for f in FIGURES}
           for name, results in runs.items()}
    print(json.dumps({"A": str(args.a), "B": str(here), "median": med,
                      "ratio_b_over_a": {f: round(med["B"][f] / med["A"][f], 3)
                                         for f in FIGURES}}))


if __name__ == "__main__":
    main()
