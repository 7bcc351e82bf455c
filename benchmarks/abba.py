"""Run one ``postlane bench`` load against two checkouts in ABBA order and print the ratios.

Absolute rates move by 2.5x between machines of one kind, so only figures measured side by side
in one run mean anything (docs/performance.md). Each checkout needs its own ``.venv`` (an
editable install); an older commit can be checked out with ``git worktree add DIR REV``.

Usage: ``.venv/bin/python benchmarks/abba.py --a ../base --b . [--rounds 1] -- --marketing 20000``
(every argument after ``--`` goes to ``postlane bench``; ``--json`` is added). One round is
A B B A; the summary gives, for each side, the median of its runs and B/A ratios of the medians.

``--same-load`` runs B's ``postlane bench`` for both sides, A's node through ``--node-from A``:
one load generator, one sink and one way of measuring for both commits (needed when A's bench
lacks options, e.g. the plain-client ones). ``--compare REV`` (instead of ``--a``) makes a
worktree of REV with its own ``.venv`` beside B (``../compare-REV``) and uses it as A.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

FIGURES = ("throughput_msgs_s", "node_cpu_ms_per_msg", "node_cpu_ms_per_msg_running",
           "node_startup_cpu_s", "node_system_ms_per_msg",
           "main_cpu_ms_per_msg", "harness_cpu_ms_per_msg", "rss_mb_peak", "rss_mb_peak_all",
           "rss_mb_all_max")


def _load_average() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


def run(checkout: Path, bench_args: list[str], node_from: Path | None = None) -> dict:
    """One bench run of a checkout (``node_from``: its node from that checkout instead); the
    JSON line it printed, with the load average around it."""
    before = _load_average()
    extra = ["--node-from", str(node_from)] if node_from is not None else []
    proc = subprocess.run([str(checkout / ".venv/bin/postlane"), "bench", "--json", *bench_args,
                           *extra], cwd=checkout, capture_output=True, text=True, check=False)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        sys.exit(f"bench failed in {checkout}:\n{proc.stderr[-2000:]}")
    result = json.loads(lines[-1])
    result["load_before"], result["load_after"] = before, _load_average()
    return result


def summary(runs: dict[str, list[dict]]) -> dict:
    """Medians per side, the transactional p99 (worst class) and the B/A ratios."""
    out: dict = {}
    for side, results in runs.items():
        med = {f: statistics.median(r.get(f, 0) for r in results) for f in FIGURES}
        med["transactional_p99_s"] = statistics.median(
            max(v["p99"] for k, v in r["latency_s"].items() if k != "marketing")
            for r in results)
        med["lost"] = sum(r["lost"] for r in results)
        med["runs"] = [{f: r.get(f) for f in (*FIGURES, "load_before", "load_after")}
                       for r in results]
        out[side] = med
    a, b = out["A"], out["B"]
    out["ratio_B_over_A"] = {f: round(b[f] / a[f], 3) if a[f] else None
                             for f in (*FIGURES, "transactional_p99_s")}
    return out


def checkout_of(rev: str, beside: Path) -> Path:
    """A worktree of ``rev`` with its own ``.venv`` (made once, then reused)."""
    target = beside.resolve().parent / f"compare-{rev}"
    if not target.exists():
        subprocess.run(["git", "-C", str(beside), "worktree", "add", "--detach", str(target),
                        rev], check=True)
    if not (target / ".venv/bin/postlane").exists():
        subprocess.run([sys.executable, "-m", "venv", str(target / ".venv")], check=True)
        subprocess.run([str(target / ".venv/bin/pip"), "install", "-q", "-e", str(target)],
                       check=True)
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--a", type=Path, help="checkout A (the baseline)")
    parser.add_argument("--compare", metavar="REV", help="A: a worktree of this commit")
    parser.add_argument("--b", type=Path, required=True, help="checkout B (the change)")
    parser.add_argument("--rounds", type=int, default=1, help="ABBA rounds")
    parser.add_argument("--same-load", action="store_true",
                        help="B's load generator and sink for both sides (A's node via"
                             " --node-from)")
    parser.add_argument("--a-args", default="", help="bench arguments for A only, e.g."
                        " --a-args='--workers 1' (--a and --b may then be one checkout)")
    parser.add_argument("--b-args", default="", help="bench arguments for B only")
    args, bench_args = parser.parse_known_args()
    bench_args = [a for a in bench_args if a != "--"]
    if (args.a is None) == (args.compare is None):
        parser.error("give --a DIR or --compare REV")
    a_dir = args.a if args.a is not None else checkout_of(args.compare, args.b)
    runs: dict[str, list[dict]] = {"A": [], "B": []}
    for _ in range(args.rounds):
        for side in "ABBA":
            checkout = (a_dir if side == "A" else args.b).resolve()
            started = time.time()
            side_args = [*bench_args, *(args.a_args if side == "A" else args.b_args).split()]
            if args.same_load:
                result = run(args.b.resolve(), side_args,
                             checkout if side == "A" else None)
            else:
                result = run(checkout, side_args)
            runs[side].append(result)
            print(json.dumps({"side": side, "checkout": str(checkout),
                              "seconds": round(time.time() - started),
                              **{f: result.get(f) for f in (*FIGURES, "lost", "load_before")},
                              "latency_s": result["latency_s"],
                              "accept_s": result.get("accept_s")}), flush=True)
    print(json.dumps({"bench_args": bench_args, "a_args": args.a_args, "b_args": args.b_args,
                      "host_cpus": os.cpu_count(),
                      "same_load": args.same_load, "a": str(a_dir.resolve()),
                      "b": str(args.b.resolve()),
                      **summary(runs)}, indent=1))


if __name__ == "__main__":
    main()
