"""Suppression list speed at scale (figures go to docs/performance.md, not a test).

Run: ``.venv/bin/python -m tests.support.suppression_bench [--entries 1000000]``
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from pathlib import Path

from postlane.feedback.suppression import Entry, SuppressionList


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--entries", type=int, default=1_000_000)
    ap.add_argument("--lookups", type=int, default=20_000)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        store = SuppressionList(Path(tmp) / "s.sqlite3")
        now = time.time()
        started = time.perf_counter()
        batch = []
        for i in range(args.entries):
            batch.append(Entry(f"user{i}@domain{i % 5000}.example", "all" if i % 4 == 0
                               else "marketing", "bench", "import", now))
            if len(batch) == 50_000:
                store.add_many(batch)
                batch = []
        store.add_many(batch)
        load_s = time.perf_counter() - started
        rng = random.Random(7)
        single = []
        for _ in range(args.lookups):
            i = rng.randrange(args.entries * 2)  # half of them are not on the list
            t = time.perf_counter()
            store.check_one(f"user{i}@domain{i % 5000}.example")
            single.append(time.perf_counter() - t)
        per_msg = []
        for _ in range(args.lookups // 100):
            rcpts = [f"user{j}@domain{j % 5000}.example"
                     for j in (rng.randrange(args.entries * 2) for _ in range(100))]
            t = time.perf_counter()
            store.check(rcpts, ("all", "best-effort"))
            per_msg.append(time.perf_counter() - t)
        t = time.perf_counter()
        with open(Path(tmp) / "out.csv", "w", newline="") as out:
            exported = store.export_csv(out)
        export_s = time.perf_counter() - t
        size_mb = (Path(tmp) / "s.sqlite3").stat().st_size / 1e6
        single.sort()
        print(json.dumps({
            "entries": store.count(), "load_s": round(load_s, 2),
            "load_per_s": round(args.entries / load_s),
            "check_1_rcpt_us": {"p50": round(statistics.median(single) * 1e6, 1),
                                "p99": round(single[int(len(single) * 0.99)] * 1e6, 1)},
            "check_100_rcpts_ms_p50": round(statistics.median(per_msg) * 1e3, 3),
            "export_csv_s": round(export_s, 2), "exported": exported,
            "db_mb": round(size_mb, 1)}))
        store.close()


if __name__ == "__main__":
    main()
