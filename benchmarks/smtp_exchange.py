"""CPU per message of the node's event loop thread for plain SMTP on both sides.

A node runs in this process (uvloop, as ``postlane run``), with a real SQLite spool in a
temporary directory; a plain client (waits for every reply, no PIPELINING, QUIT and reconnect
every ``--reconnect`` messages) submits ``--messages`` messages over loopback from a child
process, and the relay delivers them to an aiosmtpd sink (``harness/sink.py``, without
PIPELINING) in another child process. Only the node is measured: CPU seconds of its event loop
thread (``time.thread_time`` read on the loop) and of the whole process (``process_time``),
from the first submission until the sink has every message, divided by the messages. A warm-up
round goes first (connections, caches, the spool's first pages).

Usage (each checkout with its own venv, alternating A B B A):
``nice -n 19 CHECKOUT/.venv/bin/python benchmarks/smtp_exchange.py [--messages 3000]
[--connections 4] [--reconnect 100] [--kb 10] [--rounds 3] [--profile out.prof]``
Prints one JSON line: per round, µs of loop-thread and process CPU per message, and medians.
``--profile`` writes a cProfile of the loop thread over the measured rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

LINE = b"Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor.\r\n"


def config(home: Path, sink_port: int) -> str:
    """looplag.py's node (a sibling script), its relay closing idle connections after 1 s."""
    from looplag import config as looplag_config

    return looplag_config(home, sink_port).replace("[relay]\n", "[relay]\nidle_timeout = 1.0\n")


def _run_sink(conn) -> None:  # type: ignore[no-untyped-def]
    """A sink without PIPELINING; sends its port, then the count of arrivals as it grows."""
    import uvloop

    from postlane.harness.sink import Sink

    async def main() -> None:
        sink = Sink(keep_data=False, pipelining=False)
        await sink.start()
        conn.send(sink.port)
        told = 0
        while True:
            await asyncio.sleep(0.02)
            if len(sink.arrivals) != told:
                told = len(sink.arrivals)
                conn.send(told)

    uvloop.run(main())


def _run_client(port: int, start: int, count: int, connections: int, reconnect: int,
                kb: float) -> None:
    """``count`` messages over ``connections`` plain connections (the bench's ``_Submitter``
    with pipelining off)."""
    import uvloop

    from postlane.relay.client import SMTPConnection

    body = LINE * max(1, int(kb * 1024) // len(LINE))

    async def worker(numbers) -> None:  # type: ignore[no-untyped-def]
        conn = None
        for n in numbers:
            if conn is None or not conn.usable:
                conn = await SMTPConnection.open("127.0.0.1", port, server_name="localhost",
                                                 source_ip=None, ehlo_name="bench.local",
                                                 tls="disabled")
                conn.extensions.pop("PIPELINING", None)
            rcpt = f"reader{n}@news{n % 20}.example"
            data = (f"From: news@insurer-news.example\r\nTo: {rcpt}\r\nSubject: m{n}\r\n"
                    f"Message-ID: <m{n}@bench>\r\n\r\n").encode() + body
            tx = await conn.send("news@insurer-news.example", [(rcpt, "")], data)
            assert tx.data_reply is not None and tx.data_reply.is_ok, tx
            if conn.messages_sent >= reconnect:
                await conn.quit()
                conn = None
        if conn is not None:
            await conn.quit()

    async def main() -> None:
        numbers = iter(range(start, start + count))
        await asyncio.gather(*(worker(numbers) for _ in range(connections)))

    uvloop.run(main())


async def _round(port: int, start: int, args: argparse.Namespace, arrivals) -> None:  # type: ignore[no-untyped-def]
    """Submit a round and wait until the sink has all of it (``--part edge``: until the node
    has acknowledged all of it)."""
    loop = asyncio.get_running_loop()
    done = asyncio.Event()
    want = start + args.messages_this_round
    if args.part == "edge":
        done.set()

    def on_count() -> None:
        while arrivals.poll():
            if arrivals.recv() >= want:
                done.set()

    loop.add_reader(arrivals.fileno(), on_count)
    try:
        client = mp.get_context("spawn").Process(
            target=_run_client, args=(port, start, args.messages_this_round, args.connections,
                                      args.reconnect, args.kb))
        client.start()
        await asyncio.wait_for(done.wait(), 600)
        await loop.run_in_executor(None, client.join)
        if client.exitcode != 0:
            raise SystemExit(f"client failed ({client.exitcode})")
    finally:
        loop.remove_reader(arrivals.fileno())


async def relay_only(args: argparse.Namespace, sink_port: int, out: dict) -> dict:
    """The relay's client alone, in this process: plain transactions (no PIPELINING at the
    sink) on connections of ``--reconnect`` messages, as ``Relay.transact`` sends them."""
    import gc

    from postlane.relay.client import SMTPConnection

    body = LINE * max(1, int(args.kb * 1024) // len(LINE))
    messages = [(f"From: news@insurer-news.example\r\nTo: r{n}@news.example\r\n"
                 f"Subject: m{n}\r\n\r\n").encode() + body for n in range(100)]

    async def worker(count: int) -> None:
        conn = None
        for n in range(count):
            if conn is None:
                conn = await SMTPConnection.open("127.0.0.1", sink_port, server_name="sink",
                                                 source_ip=None, ehlo_name="bulk.test",
                                                 tls="disabled")
            tx = await conn.send("news@insurer-news.example", [(f"r{n}@news.example", "")],
                                 messages[n % 100], crlf=True)
            assert tx.data_reply is not None and tx.data_reply.is_ok, tx
            if conn.messages_sent >= args.reconnect:
                await conn.quit()
                conn = None
        if conn is not None:
            await conn.quit()

    per = max(1, args.warmup // args.connections)
    await asyncio.gather(*(worker(per) for _ in range(args.connections)))
    per = args.messages // args.connections
    for _ in range(args.rounds):
        gc.collect()
        t0, p0 = time.thread_time(), time.process_time()
        await asyncio.gather(*(worker(per) for _ in range(args.connections)))
        t1, p1 = time.thread_time(), time.process_time()
        n = per * args.connections
        out["rounds"].append({"loop_us": round((t1 - t0) / n * 1e6, 1),
                              "process_us": round((p1 - p0) / n * 1e6, 1)})
    out["loop_us_median"] = statistics.median(r["loop_us"] for r in out["rounds"])
    out["process_us_median"] = statistics.median(r["process_us"] for r in out["rounds"])
    return out


async def main(args: argparse.Namespace) -> dict:
    import gc

    from postlane.logsetup import setup_logging
    from postlane.node import Node
    from postlane.startup import parse_config

    setup_logging("WARNING")
    home = Path(tempfile.mkdtemp(prefix="smtp-exchange-"))
    ctx = mp.get_context("spawn")
    ours, theirs = ctx.Pipe()
    sink = ctx.Process(target=_run_sink, args=(theirs,), daemon=True)
    sink.start()
    out: dict = {"checkout": str(Path(sys.modules["postlane"].__file__).parents[2]),
                 "messages": args.messages, "connections": args.connections,
                 "reconnect": args.reconnect, "kb": args.kb, "part": args.part,
                 "rounds": []}
    try:
        sink_port = ours.recv()
        if args.part == "relay":
            return await relay_only(args, sink_port, out)
        if args.part == "edge":  # the campaign's pool paused: the relay never runs
            from postlane.spool.sqlite import SQLiteSpool

            spool = SQLiteSpool(home / "spool")
            await spool.open()
            await spool.set_paused("bulk", "*", True)
            await spool.close()
        node = Node(parse_config(config(home, sink_port)))
        await node.start()
        port = node.listeners[0].port
        sent = 0
        if args.warmup:
            args.messages_this_round = args.warmup
            await _round(port, sent, args, ours)
            sent += args.warmup
        profiler = None
        if args.profile:
            import cProfile
            profiler = cProfile.Profile()
        for _ in range(args.rounds):
            args.messages_this_round = args.messages
            await asyncio.sleep(0.5)
            gc.collect()
            if profiler is not None:
                profiler.enable()
            t0, p0 = time.thread_time(), time.process_time()
            await _round(port, sent, args, ours)
            t1, p1 = time.thread_time(), time.process_time()
            if profiler is not None:
                profiler.disable()
            sent += args.messages
            out["rounds"].append({"loop_us": round((t1 - t0) / args.messages * 1e6, 1),
                                  "process_us": round((p1 - p0) / args.messages * 1e6, 1)})
        if profiler is not None:
            profiler.dump_stats(args.profile)
        out["loop_us_median"] = statistics.median(r["loop_us"] for r in out["rounds"])
        out["process_us_median"] = statistics.median(r["process_us"] for r in out["rounds"])
        await node.stop()
    finally:
        sink.kill()
        shutil.rmtree(home, ignore_errors=True)
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--messages", type=int, default=3000, help="messages per measured round")
    ap.add_argument("--warmup", type=int, default=500)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--connections", type=int, default=4, help="client connections")
    ap.add_argument("--reconnect", type=int, default=100, help="messages per client connection")
    ap.add_argument("--kb", type=float, default=10.0, help="body size")
    ap.add_argument("--profile", default="", help="write a cProfile of the loop thread here")
    ap.add_argument("--part", choices=("both", "edge", "relay"), default="both",
                    help="edge: the relay paused, the node's intake alone; relay: the relay's "
                         "SMTP client alone against the sink")
    import uvloop

    print(json.dumps(uvloop.run(main(ap.parse_args()))))
