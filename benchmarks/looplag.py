"""How long a node's event loop stalls during a /metrics scrape, a message lookup, and a
``postlane suppress import`` of a large list while hard bounces arrive (issue 21, item 7).

It runs a node in this process with its own probe (the same as ``monitor/loopwatch.py``, kept
here so that the script also runs against a checkout without the watchdog): a timer due every
10 ms whose lateness is the lag, and the longest run-queue wait of the process's threads over
the same tick, so that "blocked" is the lag the node caused itself, not the CPU other
processes took.

Usage (each checkout with its own venv; compare side by side in one run):
``nice -n 19 CHECKOUT/.venv/bin/python benchmarks/looplag.py [--queued 200000] [--rows 300000]``
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from postlane.node import Node
from postlane.spool import Message, Recipient
from postlane.spool.sqlite import SQLiteSpool

try:
    from postlane.harness.sink import Sink
    from postlane.startup import parse_config
except ImportError:  # a checkout from before issue 21's layering (the "before" side)
    from postlane.sink import Sink  # type: ignore[no-redef]

    from postlane.config.load import parse_config  # type: ignore[no-redef]


class Probe:
    def __init__(self, interval: float = 0.01) -> None:
        self.interval = interval
        self.max_lag = self.max_blocked = 0.0
        self.lags: list[float] = []

    def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.fds: dict[str, int] = {}
        self.waited = self._ns()
        self.due = self.loop.time() + self.interval
        self.handle = self.loop.call_at(self.due, self._tick)

    def _ns(self) -> dict[str, int]:
        """Per thread, its run-queue wait so far (as monitor/loopwatch.py)."""
        out = {}
        for tid in os.listdir("/proc/self/task"):
            try:
                fd = self.fds.get(tid)
                if fd is None:
                    fd = self.fds[tid] = os.open(f"/proc/self/task/{tid}/schedstat", os.O_RDONLY)
                out[tid] = int(os.pread(fd, 64, 0).split()[1])
            except OSError:
                continue
        return out

    def _tick(self) -> None:
        now = self.loop.time()
        lag = max(0.0, now - self.due)
        waited = self._ns()
        starved = max((n - self.waited.get(t, 0) for t, n in waited.items()), default=0) / 1e9
        self.waited = waited
        self.max_lag = max(self.max_lag, lag)
        self.max_blocked = max(self.max_blocked, lag - starved)
        self.lags.append(lag)
        self.due = now + self.interval
        self.handle = self.loop.call_at(self.due, self._tick)

    def reset(self) -> None:
        self.max_lag = self.max_blocked = 0.0
        self.lags = []

    def figures(self) -> dict:
        lags = sorted(self.lags) or [0.0]
        return {"max_lag_ms": round(self.max_lag * 1000, 1),
                "max_blocked_ms": round(self.max_blocked * 1000, 1),
                "p99_lag_ms": round(lags[int(len(lags) * 0.99)] * 1000, 1),
                "ticks": len(self.lags)}


def config(home: Path, sink_port: int) -> str:
    return f"""
default_class = "marketing"
[node]
name = "looplag"
hostname = "mta.test"
spool = "{home}/spool"
[listeners.in]
address = "127.0.0.1"
port = 0
relay_from = ["127.0.0.0/8"]
[pools.critical]
pausable = false
ips = [{{ address = "127.0.0.20", ehlo = "tx.test", max_smtp_out = 8 }}]
[pools.bulk]
ips = [{{ address = "127.0.0.30", ehlo = "bulk.test", max_smtp_out = 8 }}]
[classes.policy-documents]
pool = "critical"
priority = 0
sla = "2m"
[classes.marketing]
pool = "bulk"
priority = 3
[relay]
smtp_port = {sink_port}
[accounting]
directory = "{home}/acct"
[api]
port = 0
token_file = "{home}/api-token"
[routes]
"*" = "127.0.0.1:{sink_port}"
"""


async def prefill(home: Path, queued: int, domains: int) -> None:
    """``queued`` recipients of paused marketing mail, written straight into the spool."""
    spool = SQLiteSpool(home / "spool")
    await spool.open()
    now = time.time()
    body = b"From: a@insurer.test\r\nSubject: x\r\n\r\n" + b"x" * 1000 + b"\r\n"
    batch = []
    for i in range(queued):
        msg = Message(id=f"pre{i:08d}", cls="marketing", pool="bulk",
                      mail_from="news@insurer.test", queued_at=now - i * 0.001,
                      deadline=now + 86400, expire_at=now + 86400, priority=3,
                      size=len(body), remaining=1)
        rcpt = Recipient(msg, 0, f"user{i}@d{i % domains}.example", f"d{i % domains}.example")
        batch.append(spool.enqueue(msg, [rcpt], body))
        if len(batch) == 2000:
            await asyncio.gather(*batch)
            batch = []
    await asyncio.gather(*batch)
    await spool.set_paused("bulk", "*", True)
    await spool.close()


def _send(port: int, count: int, start: int, until=None) -> None:
    """``count`` hard-bouncing policy notices (or, with ``until``, as many as it takes)."""
    import smtplib
    with smtplib.SMTP("127.0.0.1", port, timeout=60) as client:
        for i in range(start, start + count):
            if until is not None and until.is_set():
                return
            data = (f"From: n@insurer.test\r\nTo: gone{i}@example.com\r\nSubject: p{i}\r\n"
                    "X-Postlane-Class: policy-documents\r\n\r\nDear customer\r\n").encode()
            client.sendmail("n@insurer.test", [f"gone{i}@example.com"], data)


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--queued", type=int, default=200_000)
    ap.add_argument("--domains", type=int, default=1000)
    ap.add_argument("--rows", type=int, default=300_000)
    ap.add_argument("--bounces", type=int, default=100)
    ap.add_argument("--scrapes", type=int, default=5)
    args = ap.parse_args()
    home = Path(tempfile.mkdtemp(prefix="looplag-"))
    out: dict = {"checkout": str(Path(sys.modules["postlane"].__file__).parents[2]),
                 "queued": args.queued, "rows": args.rows}
    try:
        sink = Sink(keep_data=False)
        await sink.start()
        for i in range(args.bounces * 4):
            sink.rcpt_replies[f"gone{i}@example.com"] = ["550 5.1.1 user unknown"]
        t0 = time.monotonic()
        await prefill(home, args.queued, args.domains)
        out["prefill_s"] = round(time.monotonic() - t0, 1)
        node = Node(parse_config(config(home, sink.port)))
        await node.start()
        probe = Probe()
        probe.start()
        token = (home / "api-token").read_text().strip()
        base = f"http://127.0.0.1:{node.api.port}"
        headers = {"Authorization": f"Bearer {token}"}
        await asyncio.sleep(1)

        async def measure(name: str, fn) -> None:
            probe.reset()
            started = time.monotonic()
            await fn()
            await asyncio.sleep(0.05)  # the tick after the last block
            out[name] = {**probe.figures(), "took_s": round(time.monotonic() - started, 2)}

        async def scrapes() -> None:
            for _ in range(args.scrapes):
                r = await asyncio.to_thread(httpx.get, base + "/metrics", headers=headers,
                                            timeout=60)
                r.raise_for_status()

        await measure("scrape", scrapes)

        async def lookups() -> None:
            for i in range(args.scrapes):
                for path in (f"/api/v1/messages/pre{i * 997:08d}",
                             f"/api/v1/queue/messages/pre{i * 997:08d}"):
                    r = await asyncio.to_thread(httpx.get, base + path, headers=headers,
                                                timeout=60)
                    r.raise_for_status()

        await measure("lookup", lookups)
        port = node.listeners[0].port

        async def bounces_only() -> None:
            await asyncio.to_thread(_send, port, args.bounces, 0)
            await asyncio.sleep(2)

        await measure("bounces", bounces_only)
        csv_path = home / "list.csv"
        with csv_path.open("w") as fh:
            for i in range(args.rows):
                fh.write(f"imported{i}@example.net,marketing,import\n")
        db = home / "spool" / "suppression.sqlite3"
        postlane = Path(sys.executable).parent / "postlane"

        async def cli_import() -> None:
            proc = await asyncio.create_subprocess_exec(
                str(postlane), "suppress", "import", "--db", str(db), str(csv_path),
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            import threading
            done = threading.Event()
            sender = asyncio.create_task(asyncio.to_thread(_send, port, args.bounces * 3,
                                                           args.bounces, done))
            await proc.wait()
            done.set()  # bounces arrived during the whole import
            await sender
            await asyncio.sleep(2)

        await measure("cli_import", cli_import)

        async def api_import() -> None:
            data = "".join(f"api{i}@example.org,marketing\n" for i in range(args.rows // 3))
            r = await asyncio.to_thread(httpx.post, base + "/api/v1/suppressions/import",
                                        headers=headers, content=data, timeout=120)
            r.raise_for_status()

        await measure("api_import", api_import)

        async def api_list() -> None:
            for _ in range(3):
                r = await asyncio.to_thread(httpx.get, base + "/api/v1/suppressions?limit=10",
                                            headers=headers, timeout=60)
                r.raise_for_status()

        await measure("api_suppression_list", api_list)
        out["suppressed"] = node.feedback.suppression.count()
        probe.handle.cancel()
        with contextlib.suppress(Exception):
            await node.stop()
        await sink.stop()
    finally:
        shutil.rmtree(home, ignore_errors=True)
    print(json.dumps(out))


if __name__ == "__main__":
    asyncio.run(main())
