"""Audit store benchmark: fill a store through the real writer, then time evidence look-ups.

    .venv/bin/python scripts/audit_bench.py --records 1000000 --db /tmp/audit-1m.sqlite

Prints one JSON object: writer throughput (records/s, and CPU microseconds per record, which is
what audit writing takes away from the rest of the node) and look-up latencies.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import time
from pathlib import Path

from postlane.audit.evidence import render_text, trails
from postlane.audit.sqlite import SQLiteAuditStore
from postlane.audit.store import Query
from postlane.audit.writer import AuditWriter
from postlane.accounting.records import Record

CHUNK = 50_000


def records(start: int, count: int, t0: float) -> list[Record]:
    """A realistic mix: per recipient an "r", a "d", and for one in ten a "t" before it."""
    out: list[Record] = []
    i = start
    while len(out) < count:
        cls = "policy-documents" if i % 5 == 0 else "marketing"
        pool = "trans-critical-pool" if cls == "policy-documents" else "admin-pool"
        queued = t0 + i * 0.01
        base = dict(time_queued=queued, orig="notices@insurer.example", rcpt=f"c{i}@example.net",
                    queue_id=f"Q{i:012d}", cls=cls, vmta_pool=pool, correlation_id=f"corr-{i}",
                    job_id=f"corr-{i}", message_id=f"<m{i}@insurer.example>", dlv_size=4096,
                    listener="in", src_mta="app1 (10.0.0.5)")
        out.append(Record(type="r", time_logged=queued, **base))
        attempt = 1
        if i % 10 == 0:
            out.append(Record(type="t", time_logged=queued + 1, attempt=1, dsn_action="delayed",
                              dsn_status="4.2.1", dsn_diag="smtp;450 4.2.1 try later",
                              dsn_mta="dns;mx.example.net (127.0.0.5)", dlv_source_ip="127.0.0.10",
                              dlv_destination_ip="127.0.0.5", total_seconds_queued=1.0, **base))
            attempt = 2
        out.append(Record(type="d", time_logged=queued + 2, attempt=attempt, dsn_action="relayed",
                          dsn_status="2.0.0", dsn_diag="smtp;250 2.0.0 Ok: queued as 4Zx9",
                          dsn_mta="dns;mx.example.net (127.0.0.5)", dlv_source_ip="127.0.0.10",
                          dlv_destination_ip="127.0.0.5", dlv_tls_protocol="TLSv1.3",
                          dlv_tls_cipher="TLS_AES_256_GCM_SHA384", vmta="tx1.insurer.example",
                          total_seconds_queued=2.0, **base))
        i += 1
    return out  # may overshoot by a record or two: messages are not cut in half


def populate(path: Path, total: int) -> dict:
    writer = AuditWriter(path, lambda cls: 120.0 if cls == "policy-documents" else None)
    writer.start()
    t0 = time.time() - 30 * 86400
    written, wall, cpu, messages = 0, 0.0, 0.0, 0
    while written < total:
        batch = records(messages, min(CHUNK, total - written), t0)
        messages += sum(1 for r in batch if r.type == "r")
        start_wall, start_cpu = time.perf_counter(), time.process_time()
        for rec in batch:
            writer.add(rec)
        writer.flush()
        wall += time.perf_counter() - start_wall
        cpu += time.process_time() - start_cpu
        written += len(batch)
    writer.close()
    return {"records": written, "messages": messages, "write_s": round(wall, 2),
            "records_per_s": round(written / wall), "cpu_us_per_record": round(cpu / written * 1e6,
                                                                                 1)}


def lookups(path: Path, messages: int, n: int = 200) -> dict:
    store = SQLiteAuditStore(path, readonly=True)
    rng = random.Random(1)
    out: dict[str, dict] = {}
    keys = {"correlation_id": lambda i: Query(correlation_id=f"corr-{i}"),
            "message_id": lambda i: Query(message_id=f"<m{i}@insurer.example>"),
            "recipient": lambda i: Query(rcpt=f"c{i}@example.net")}
    for name, make in keys.items():
        times = []
        for _ in range(n):
            i = rng.randrange(messages)
            start = time.perf_counter()
            text = render_text(trails(store.find(make(i))), time.time())
            times.append((time.perf_counter() - start) * 1000)
            assert f"corr-{i}" in text
        times.sort()
        out[name] = {"p50_ms": round(statistics.median(times), 3),
                     "p99_ms": round(times[int(0.99 * len(times)) - 1], 3),
                     "max_ms": round(times[-1], 3)}
    store.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--db", type=Path, default=Path("audit-bench.sqlite"))
    parser.add_argument("--keep", action="store_true", help="reuse an existing store")
    args = parser.parse_args()
    result: dict = {}
    if not (args.keep and args.db.exists()):
        for suffix in ("", "-wal", "-shm"):
            Path(f"{args.db}{suffix}").unlink(missing_ok=True)
        result["write"] = populate(args.db, args.records)
    store = SQLiteAuditStore(args.db, readonly=True)
    messages = store.db.execute("SELECT count(*) FROM audit_records WHERE type = 'r'").fetchone()[0]
    start = time.perf_counter()
    verified = store.verify()
    result["verify"] = {"ok": verified.ok, "records": verified.checked,
                        "seconds": round(time.perf_counter() - start, 2)}
    store.close()
    result["lookup"] = lookups(args.db, messages)
    result["db_mb"] = round(os.path.getsize(args.db) / 2**20, 1)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
