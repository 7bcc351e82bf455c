"""Time ``/metrics`` rendering and ``node.status()`` in process with N campaign messages queued
behind a paused pool (written into the spool first, as ``postlane bench --seed-queue`` does),
without the HTTP stack or the load generator: what the node itself spends per scrape.

Usage: ``.venv/bin/python benchmarks/deep_queue.py 1000000 [--domains 20] [--profile]
[--workdir /tmp/deep]``
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import time
from pathlib import Path

from postlane.harness import bench
from postlane.node import Node
from postlane.startup import load_config


def timings(fn, n: int = 20) -> str:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000)
    return f"p50 {statistics.median(times):.2f} ms, max {max(times):.2f} ms"


async def measure(cfg, profile: bool = False) -> None:
    node = Node(cfg)
    t0 = time.time()
    await node.start()
    print(f"node.start(): {time.time() - t0:.1f} s, queued {node.scheduler.queued()}")
    await asyncio.sleep(3)  # the lanes read their heads
    print("metrics.render():", timings(node.monitor.metrics.render))
    print("node.status():", timings(node.status))
    if profile:
        import cProfile
        import pstats

        prof = cProfile.Profile()
        prof.runcall(timings, node.monitor.metrics.render)
        pstats.Stats(prof).sort_stats("cumulative").print_stats(25)
    print("recipients in memory:", len(node.scheduler.pager.known)
          if node.scheduler.pager else "all")
    await node.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("queued", type=int)
    parser.add_argument("--domains", type=int, default=20, help="campaign domains (lanes)")
    parser.add_argument("--profile", action="store_true",
                        help="print cProfile's top functions of 20 renders")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/postlane-deep-queue"))
    args = parser.parse_args()
    shutil.rmtree(args.workdir, ignore_errors=True)
    args.workdir.mkdir(parents=True)
    cfg, _ = bench.bench_config(load_config(bench.EXAMPLE), workdir=args.workdir, sink_port=1,
                                fifo=False)
    t0 = time.time()
    if args.queued:
        asyncio.run(bench._seed_spool(cfg, bench.BenchOptions(queued_behind=args.queued,
                                                              message_kb=2.5,
                                                              domains=args.domains)))
    print(f"seeded {args.queued} in {time.time() - t0:.0f} s")
    try:
        asyncio.run(measure(cfg, args.profile))
    finally:
        shutil.rmtree(args.workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
