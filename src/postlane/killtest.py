"""Crash-safety harness: SIGKILL a node at random moments during a campaign, restart it, and
check that every message acknowledged with 250 was delivered.

Three kinds of process, as in production: the node (``postlane serve``, killed and restarted),
a sink in its own process (never killed, it records arrivals to a file), and the submitting
client in this process (it records which sequence numbers got a 250). A message is lost when it
was acknowledged and never arrived; a duplicate is a second arrival of one message, which SMTP
allows for messages in flight at the kill (delivered, but the node died before recording it).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import smtplib
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

SEQ_HEADER = b"X-Kill-Seq: "


@dataclass
class Result:
    kills: int
    submitted: int
    acknowledged: int
    delivered: int
    duplicates: int
    lost: int
    unacknowledged_delivered: int
    seconds: float


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _config(workdir: Path, listen: int, sink: int) -> str:
    return f"""
default_class = "bulk"
[node]
name = "killtest"
hostname = "killtest.local"
spool = "{workdir}/spool"
drain_timeout = 2
[listeners.in]
address = "127.0.0.1"
port = {listen}
relay_from = ["127.0.0.0/8"]
[listeners.in.limits]
messages_per_minute = 0
[security]
min_free_space = 0
[pools.bulk]
ips = [{{ address = "127.0.0.1", ehlo = "killtest.local", max_smtp_out = 4 }}]
[classes.bulk]
pool = "bulk"
retry = ["1s"]
expiry = "1h"
[relay]
smtp_port = {sink}
idle_timeout = 0.2
[routes]
"example.com" = "127.0.0.1:{sink}"
[accounting]
directory = "{workdir}/acct"
[api]
enabled = false  # not needed here, and port 8025 may be another node's on this machine
"""


class _NodeProcess:
    def __init__(self, config: Path, port: int, log: Path) -> None:
        self.config, self.port, self.log = config, port, log
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "postlane.cli", "serve", "-c", str(self.config),
                 "--log-level", "WARNING"], stdout=log, stderr=log)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection(
                    ("127.0.0.1", self.port), timeout=1):
                return
            if self.proc.poll() is not None:
                raise RuntimeError(f"node exited with {self.proc.returncode}; see {self.log}")
            time.sleep(0.05)
        raise RuntimeError("node did not start listening")

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()


def _submit(port: int, seqs: list[int], acked: set[int], lock: threading.Lock,
            stop: threading.Event) -> None:
    """Submit each message until it gets a 250 (a retry after a kill may duplicate it)."""
    client: smtplib.SMTP | None = None
    for seq in seqs:
        data = (b"From: killtest@example.com\r\nTo: r@example.com\r\nSubject: killtest\r\n"
                + SEQ_HEADER + str(seq).encode() + b"\r\n\r\nmessage " + str(seq).encode()
                + b"\r\n")
        while not stop.is_set():
            try:
                if client is None:
                    client = smtplib.SMTP("127.0.0.1", port, timeout=30)
                client.sendmail("killtest@example.com", [f"r{seq}@example.com"], data)
            except (OSError, smtplib.SMTPException):
                if client is not None:
                    with contextlib.suppress(Exception):
                        client.close()
                client = None
                time.sleep(0.1)
                continue
            with lock:
                acked.add(seq)
            break
    if client is not None:
        with contextlib.suppress(Exception):
            client.quit()


def _arrivals(path: Path) -> Counter[int]:
    counts: Counter[int] = Counter()
    if path.exists():
        for line in path.read_text().split():
            counts[int(line)] += 1
    return counts


def run(workdir: Path, messages: int = 300, kills: int = 3, clients: int = 2,
        seed: int | None = None, settle: float = 120.0) -> Result:
    """Run the campaign with ``kills`` SIGKILLs spread over it; see ``Result``."""
    rng = random.Random(seed)
    workdir.mkdir(parents=True, exist_ok=True)
    arrivals = workdir / "arrivals.txt"
    arrivals.unlink(missing_ok=True)
    sink_port, listen = _free_port(), _free_port()
    sink = subprocess.Popen([sys.executable, "-m", "postlane.killtest", "sink", str(sink_port),
                             str(arrivals)], stdout=subprocess.DEVNULL)
    config = workdir / "killtest.toml"
    config.write_text(_config(workdir, listen, sink_port))
    node = _NodeProcess(config, listen, workdir / "node.log")
    started = time.monotonic()
    acked: set[int] = set()
    lock = threading.Lock()
    stop = threading.Event()
    done = 0
    try:
        node.start()
        seqs = list(range(messages))
        threads = [threading.Thread(target=_submit, args=(listen, seqs[i::clients], acked, lock,
                                                          stop), daemon=True)
                   for i in range(clients)]
        for t in threads:
            t.start()
        # kill points spread over the campaign (delivery runs alongside intake)
        for point in sorted(rng.sample(range(1, messages), min(kills, messages - 1))):
            while any(t.is_alive() for t in threads):
                with lock:
                    if len(acked) >= point:
                        break
                time.sleep(0.005)
            time.sleep(rng.uniform(0.0, 0.2))
            node.kill()
            done += 1
            time.sleep(rng.uniform(0.0, 0.3))
            node.start()
        for t in threads:
            t.join(settle)
        deadline = time.monotonic() + settle
        while time.monotonic() < deadline and not acked <= set(_arrivals(arrivals)):
            time.sleep(0.2)
    finally:
        stop.set()
        node.stop()
        sink.terminate()
        sink.wait(10)
    counts = _arrivals(arrivals)
    delivered = acked & set(counts)
    return Result(kills=done, submitted=messages, acknowledged=len(acked),
                  delivered=len(delivered), duplicates=sum(c - 1 for c in counts.values()),
                  lost=len(acked - delivered),
                  unacknowledged_delivered=len(set(counts) - acked),
                  seconds=round(time.monotonic() - started, 1))


def _sink_main(port: int, out: Path) -> None:
    """The sink process: record each arrival's sequence number before answering 250."""
    from .sink import Sink

    class RecordingSink(Sink):
        async def handle_DATA(self, server, session, envelope) -> str:
            data = envelope.original_content or b""
            start = data.find(SEQ_HEADER)
            seq = data[start + len(SEQ_HEADER): data.find(b"\r\n", start)] if start >= 0 else b""
            with open(out, "ab") as fh:
                fh.write(seq + b"\n")
            return "250 2.0.0 Ok"

    async def main() -> None:
        sink = await RecordingSink(port=port, keep_data=False).start()
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        await stop.wait()
        await sink.stop()

    asyncio.run(main())


def command(workdir: Path, messages: int, kills: int, seed: int | None) -> int:
    """Run and print the result as one JSON line; exit status 1 when anything was lost."""
    result = run(workdir, messages=messages, kills=kills,
                 seed=seed if seed is not None else os.getpid())
    print(json.dumps(asdict(result)))
    return 1 if result.lost else 0


if __name__ == "__main__" and sys.argv[1:2] == ["sink"]:
    _sink_main(int(sys.argv[2]), Path(sys.argv[3]))
