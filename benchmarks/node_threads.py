"""Run one ``postlane bench`` of a checkout and split the node's CPU per message by thread.

The bench's ``node_cpu_ms_per_msg`` adds up the whole node; on a loaded machine it moves by a
quarter between identical runs, mostly through the spool writer thread (smaller group commits
under load cost more per message). The event loop thread's CPU per message moves less, and it
is where intake, scheduling and delivery run, so this is the figure to compare code changes by.

Usage: ``python benchmarks/node_threads.py CHECKOUT OUT -- --marketing 20000`` (runs
``CHECKOUT/.venv/bin/postlane bench --json ...`` under ``nice``; OUT.json gets its JSON line).
Prints one JSON line: ``loop_ms`` (the event loop thread), ``threads_ms`` (the node's other
threads: the spool writer), ``children_ms`` (its child processes: recorder, signers), each in
ms of CPU per delivered message, read from /proc every 0.5 s (the last reading before the node
stops).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

TICK = os.sysconf("SC_CLK_TCK")


def _children(pid: int) -> list[int]:
    try:
        return [int(x) for x in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def _ticks(stat_path: str) -> int:
    fields = Path(stat_path).read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


def main() -> None:
    checkout, out = Path(sys.argv[1]), sys.argv[2]
    args = [a for a in sys.argv[3:] if a != "--"]
    with open(out + ".json", "w") as stdout, open(out + ".err", "w") as stderr:
        proc = subprocess.Popen(["nice", "-n", "19", str(checkout / ".venv/bin/postlane"),
                                 "bench", "--json", *args], cwd=checkout, stdout=stdout,
                                stderr=stderr)
        node, seen = None, {}
        while proc.poll() is None:
            time.sleep(0.5)
            if node is None:  # the sink starts first, then the node
                spawned = [k for k in _children(proc.pid) if b"resource_tracker"
                           not in Path(f"/proc/{k}/cmdline").read_bytes()]
                node = max(spawned) if len(spawned) >= 2 else None
                continue
            try:
                for tid in os.listdir(f"/proc/{node}/task"):
                    key = "loop" if int(tid) == node else f"thread-{tid}"
                    seen[key] = max(seen.get(key, 0), _ticks(f"/proc/{node}/task/{tid}/stat"))
                for child in _children(node):
                    key = f"child-{child}"
                    seen[key] = max(seen.get(key, 0), _ticks(f"/proc/{child}/stat"))
            except (OSError, IndexError, ValueError):
                pass  # a thread or child ended between listing and reading
    lines = [line for line in Path(out + ".json").read_text().splitlines()
             if line.startswith("{")]
    if not lines:
        sys.exit(f"bench failed: see {out}.err")
    result = json.loads(lines[-1])
    n = max(1, result["marketing"] + result["transactional"])

    def per_msg(prefix: str) -> float:
        return round(1000 * sum(v for k, v in seen.items() if k.startswith(prefix)) / TICK / n, 3)

    print(json.dumps({"checkout": str(checkout), "throughput_msgs_s": result["throughput_msgs_s"],
                      "node_cpu_ms_per_msg": result["node_cpu_ms_per_msg"],
                      "loop_ms": per_msg("loop"), "threads_ms": per_msg("thread-"),
                      "children_ms": per_msg("child-"), "load": os.getloadavg()[0]}))


if __name__ == "__main__":
    main()
