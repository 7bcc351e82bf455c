"""CPU of the suppression look-up made at every RCPT (``SuppressionList.check_one``):
20,000 checks of fresh addresses that are not on a list of 100,000 entries (the common case),
and the cost of a check of an address that is on it.

Usage: ``.venv/bin/python benchmarks/suppression_check.py`` measures the ``postlane`` this
Python imports. ``--abba A_SRC B_SRC`` runs it against two source trees (``PYTHONPATH``, e.g.
``../base/src src``) in A B B A order (``--rounds``) and prints the medians and B/A ratios.
CPU is ``time.process_time()`` of this process (SQLite runs in it).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def measure(entries: int, checks: int, repeats: int) -> dict[str, float]:
    """Microseconds of CPU per check: absent and present addresses (medians of ``repeats``)."""
    from postlane.feedback.suppression import Entry, SuppressionList

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "s.sqlite3"
        writer = SuppressionList(path)
        now = time.time()
        writer.add_many([Entry(f"user{i}@domain{i % 5000}.example",
                               ("all", "best-effort", "marketing")[i % 3], "bench", "import", now)
                         for i in range(entries)])
        writer.close()
        store = SuppressionList(path)  # opened as the node opens it, the list already long
        store.check(["warm@up.example"])
        # the look-up at RCPT: ``check_one`` since it exists, ``check`` of a list before
        one = getattr(store, "check_one", None) or (lambda address: store.check([address]))
        absent, present = [], []
        for r in range(repeats):
            fresh = [f"fresh{r}-{i}@other{i % 997}.example" for i in range(checks)]
            t = time.process_time()
            for address in fresh:
                one(address)
            absent.append((time.process_time() - t) / checks * 1e6)
            listed = [f"user{(i * 7919 + r) % entries}@domain{(i * 7919 + r) % entries % 5000}"
                      ".example" for i in range(checks)]
            t = time.process_time()
            for address in listed:
                one(address)
            present.append((time.process_time() - t) / checks * 1e6)
        assert not store.check(fresh[:10]) and len(store.check(listed[:10])) == 10
        store.close()
    return {"absent_us": statistics.median(absent), "present_us": statistics.median(present)}


def abba(a: str, b: str, rounds: int, args: list[str]) -> None:
    runs: dict[str, list[dict[str, float]]] = {"A": [], "B": []}
    for _ in range(rounds):
        for side in ("A", "B", "B", "A"):
            env = {**os.environ, "PYTHONPATH": str(Path(a if side == "A" else b).resolve())}
            out = subprocess.run([sys.executable, __file__, *args], env=env, check=True,
                                 capture_output=True, text=True).stdout
            runs[side].append(json.loads(out.splitlines()[-1]))
            print(side, runs[side][-1], flush=True)
    med = {side: {k: statistics.median(r[k] for r in rs) for k in rs[0]}
           for side, rs in runs.items()}
    print(json.dumps({"median": med, "B/A": {k: med["B"][k] / med["A"][k] for k in med["A"]}}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--entries", type=int, default=100_000)
    ap.add_argument("--checks", type=int, default=20_000)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--abba", nargs=2, metavar=("A_SRC", "B_SRC"))
    ap.add_argument("--rounds", type=int, default=1)
    args = ap.parse_args()
    if args.abba:
        abba(*args.abba, args.rounds, ["--entries", str(args.entries), "--checks",
                                       str(args.checks), "--repeats", str(args.repeats)])
        return
    print(json.dumps(measure(args.entries, args.checks, args.repeats)))


if __name__ == "__main__":
    main()
