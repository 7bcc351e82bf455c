"""Crash-safety harness: SIGKILL a node at random moments during a campaign, restart it, and
check that every message acknowledged with 250 was delivered and that its evidence is complete.

Three kinds of process, as in production: the node (``postlane serve``, killed and restarted),
a sink in its own process (never killed, it records each arrival to a file and fsyncs it before
its 250), and the submitting client in this process (it records which sequence numbers got a
250). A message is lost when it was acknowledged and never arrived; a duplicate is a second
arrival of one message, which SMTP allows for messages in flight at the kill (delivered, but the
node died before recording it: its trail must then say "outcome unknown").

The evidence check, once the node has stopped: every message the sink saw has its "r" and its
"d" in the audit store and in the accounting files, each line of the files once; a duplicate
arrival is explained by an unknown attempt (or a second delivery) in the trail; every
acknowledged message is found by its correlation id; ``audit verify`` (chain and completeness)
passes.

With a PostgreSQL DSN (``spool``), two nodes share the queue: each kill but the last hits one
of them at random and restarts it (it finds its own claims, or the other node has taken them
over), the last kills the second for good: the survivor takes over its work and its evidence.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
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
from collections import Counter, defaultdict
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
    evidence_gaps_store: int = 0
    """Messages the sink saw whose "r" or "d" the audit store lacks."""
    evidence_gaps_files: int = 0
    """The same, in the accounting files."""
    file_lines_twice: int = 0
    unexplained_duplicates: int = 0
    """Second arrivals with neither an unknown attempt nor a second delivery in the trail."""
    acknowledged_not_found: int = 0
    verify_ok: bool = True
    problems: list[str] | None = None
    outlived: int = 0
    """Kills after which the victim's SMTP port still took connections 10 s later: an intake
    worker outlived its main process (``workers`` > 1; it must die with it, docs/architecture.md
    *Processes*)."""

    cluster: bool = False

    @property
    def evidence_ok(self) -> bool:
        """Complete, and each line once in the files (in a cluster too: a node's files are
        read up to the position it committed, docs/audit.md)."""
        return self.verify_ok and not (self.evidence_gaps_store or self.evidence_gaps_files
                                       or self.file_lines_twice
                                       or self.unexplained_duplicates
                                       or self.acknowledged_not_found)


PORTS = (20000, 32000)
"""Where the harness picks its ports: below Linux's ephemeral range (32768-60999), which every
``bind(("127.0.0.1", 0))`` of the machine's other programs and tests draws from; a port picked
there was taken by another test's sink between this check and the node's bind (seed 405)."""


def _free_port() -> int:
    """A port free now, outside the ephemeral range; the node's greeting says whether it was
    still ours when the node bound it (``_takes_mail``)."""
    pick = random.SystemRandom()  # not the campaign's generator: the kill points stay the seed's
    for _ in range(200):
        port = pick.randrange(*PORTS)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {PORTS[0]}-{PORTS[1]}")


def _greeting(client: smtplib.SMTP, port: int, hostname: str) -> None:
    """Connect ``client`` and check the greeting is this run's node (its hostname is drawn per
    run): a 250 from another program on the port is no acknowledgement."""
    _, text = client.connect("127.0.0.1", port)
    if not text.decode(errors="replace").startswith(hostname + " "):
        client.close()
        raise smtplib.SMTPConnectError(220, text)


def _takes_mail(port: int, hostname: str, timeout: float = 1.0) -> bool:
    """Whether this run's node greets on ``port`` (something else on it is not the node)."""
    client = smtplib.SMTP(timeout=timeout)
    try:
        _greeting(client, port, hostname)
    except (OSError, smtplib.SMTPException):
        return False
    with contextlib.suppress(Exception):
        client.quit()
    return True


def _config(home: Path, listen: int, sink: int, spool: str, name: str, schema: str,
            workers: str = "1", hostname: str = "killtest.local") -> str:
    return f"""
default_class = "bulk"
[node]
workers = {workers if workers.isdigit() else '"' + workers + '"'}
name = "{name}"
hostname = "{hostname}"
spool = "{spool}"
drain_timeout = 2
[cluster]
schema_name = "{schema}"
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
directory = "{home}/acct"
formats = ["csv", "jsonl"]
[api]
enabled = false  # not needed here, and port 8025 may be another node's on this machine
"""


class _NodeProcess:
    def __init__(self, config: Path, port: int, log: Path, hostname: str) -> None:
        self.config, self.port, self.log, self.hostname = config, port, log, hostname
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "postlane.cli", "serve", "-c", str(self.config),
                 "--log-level", "WARNING"], stdout=log, stderr=log)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if _takes_mail(self.port, self.hostname):  # this node, not whatever took the port
                return
            if self.proc.poll() is not None:
                raise RuntimeError(f"node exited with {self.proc.returncode}; see {self.log}")
            time.sleep(0.05)
        raise RuntimeError("node did not start listening")

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def released(self, within: float = 10.0) -> bool:
        """Whether the node's SMTP port refuses connections within ``within`` seconds of its
        death: nothing of it (no intake worker) still holds the listening socket. A listener
        whose greeting is not this node's is another program that took the free port."""
        deadline = time.monotonic() + within
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as conn:
                    greeting = conn.recv(512)  # a worker that accepts greets; one hung: no
            except TimeoutError:
                greeting = b""
            except OSError:
                return True
            if greeting and not greeting.startswith(f"220 {self.hostname} ".encode()):
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.kill()


def _submit(ports: list[int], seqs: list[int], acked: set[int], lock: threading.Lock,
            stop: threading.Event, hostname: str) -> None:
    """Submit each message until it gets a 250 (a retry after a kill may duplicate it); a node
    that does not answer is left for the next one (a cluster's survivor), and so is a port
    whose greeting is not the node's ``hostname``."""
    client: smtplib.SMTP | None = None
    turn = 0
    for seq in seqs:
        data = (b"From: killtest@example.com\r\nTo: r@example.com\r\nSubject: killtest\r\n"
                + b"X-Correlation-ID: kill-" + str(seq).encode() + b"\r\n"
                + SEQ_HEADER + str(seq).encode() + b"\r\n\r\nmessage " + str(seq).encode()
                + b"\r\n")
        while not stop.is_set():
            try:
                if client is None:
                    client = smtplib.SMTP(timeout=30)
                    _greeting(client, ports[turn % len(ports)], hostname)
                client.sendmail("killtest@example.com", [f"r{seq}@example.com"], data)
            except (OSError, smtplib.SMTPException):
                if client is not None:
                    with contextlib.suppress(Exception):
                        client.close()
                client = None
                turn += 1
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
        seed: int | None = None, settle: float = 120.0, spool: str | None = None,
        workers: str = "1") -> Result:
    """Run the campaign with ``kills`` SIGKILLs spread over it (with ``spool`` a PostgreSQL
    DSN: two nodes, the last kill's victim not restarted); see ``Result``."""
    rng = random.Random(seed)
    workdir.mkdir(parents=True, exist_ok=True)
    arrivals = workdir / "arrivals.txt"
    arrivals.unlink(missing_ok=True)
    sink_port = _free_port()
    sink = subprocess.Popen([sys.executable, "-m", "postlane.harness.killtest", "sink",
                             str(sink_port), str(arrivals)], stdout=subprocess.PIPE)
    assert sink.stdout is not None
    if sink.stdout.readline() != b"listening\n":  # it bound the port (not another program)
        sink.wait(10)
        raise RuntimeError(f"the sink could not listen on port {sink_port}")
    schema = f"killtest_{os.getpid()}_{rng.randrange(1 << 30)}" if spool else "postlane"
    names = ["node-a", "node-b"] if spool else ["killtest"]
    hostname = f"killtest-{os.urandom(4).hex()}.local"  # the greeting that tells our nodes
    nodes, configs = [], []
    for name in names:
        home = workdir / name if spool else workdir
        home.mkdir(parents=True, exist_ok=True)
        port = _free_port()
        config = home / "killtest.toml"
        config.write_text(_config(home, port, sink_port, spool or f"{home}/spool", name, schema,
                                  workers, hostname))
        configs.append(config)
        nodes.append(_NodeProcess(config, port, home / "node.log", hostname))
    started = time.monotonic()
    acked: set[int] = set()
    lock = threading.Lock()
    stop = threading.Event()
    done = outlived = 0
    try:
        for node in nodes:
            node.start()
        ports = [n.port for n in nodes]
        seqs = list(range(messages))
        threads = [threading.Thread(target=_submit, args=(ports[i % len(ports):]
                                                          + ports[:i % len(ports)],
                                                          seqs[i::clients], acked, lock, stop,
                                                          hostname),
                                    daemon=True) for i in range(clients)]
        for t in threads:
            t.start()
        points = sorted(rng.sample(range(1, messages), min(kills, messages - 1)))
        for n, point in enumerate(points):  # spread over the campaign (delivery runs alongside)
            last = n == len(points) - 1
            while any(t.is_alive() for t in threads):
                with lock:
                    if len(acked) >= point:
                        break
                time.sleep(0.005)
            time.sleep(rng.uniform(0.0, 0.2))
            victim = nodes[-1] if not spool or last else rng.choice(nodes)
            victim.kill()
            done += 1
            if not victim.released():
                outlived += 1
            if not (spool and last):  # a cluster's last victim stays dead: taken over
                time.sleep(rng.uniform(0.0, 0.3))
                victim.start()
        for t in threads:
            t.join(settle)
        deadline = time.monotonic() + settle
        while time.monotonic() < deadline and not (acked <= set(_arrivals(arrivals))
                                                   and _drained(configs[0])
                                                   and _filed(configs[0])):
            time.sleep(0.2)  # delivered, nothing left queued (a dead node's taken over), and
            # its evidence filed (a dead node's events are adopted dead_after after it died)
    finally:
        stop.set()
        for node in nodes:
            node.stop()
        sink.terminate()
        sink.wait(10)
    counts = _arrivals(arrivals)
    delivered = acked & set(counts)
    result = Result(kills=done, submitted=messages, acknowledged=len(acked),
                    delivered=len(delivered), duplicates=sum(c - 1 for c in counts.values()),
                    lost=len(acked - delivered), unacknowledged_delivered=len(set(counts) - acked),
                    seconds=round(time.monotonic() - started, 1), cluster=bool(spool),
                    outlived=outlived)
    try:
        _evidence(result, configs, acked, counts)
    finally:
        if spool:
            _drop_schema(spool, schema)
    return result


def _evidence(result: Result, configs: list[Path], acked: set[int],
              counts: Counter[int]) -> None:
    """Fill in the evidence figures of ``result`` from the store and the files."""
    from ..audit.backend import open_audit_store
    from ..audit.evidence import trails
    from ..audit.store import Query
    from ..spool.outbox import cluster_position, open_outbox
    from ..startup import load_config

    config = load_config(configs[0])
    problems: list[str] = []
    store = open_audit_store(config, readonly=True)
    try:
        for seq in sorted(set(counts) | acked):
            found = trails(store.find(Query(correlation_id=f"kill-{seq}")))
            types = Counter(r["type"] for t in found for r in t.rows)
            if seq in acked and not found:
                result.acknowledged_not_found += 1
                problems.append(f"acknowledged message kill-{seq}: not found in the store")
            if seq in counts and not (types["r"] and types["d"]):
                result.evidence_gaps_store += 1
                problems.append(f"kill-{seq} arrived {counts[seq]}x; the store has {dict(types)}")
            if counts[seq] > 1 and types["u"] + types["d"] < counts[seq]:
                result.unexplained_duplicates += 1
                problems.append(f"kill-{seq} arrived {counts[seq]}x; the trail shows"
                                f" {types['d']} deliveries and {types['u']} unknown attempts")
        chain = store.verify()
        outbox = open_outbox(config.node.spool, config.cluster.schema_name, "")
        try:
            complete = store.completeness(outbox)
        finally:
            outbox.close()
        result.verify_ok = chain.ok and complete.ok
        if not chain.ok:
            problems.append(f"audit verify: {chain.problem}")
        problems.extend(f"audit verify: {p}" for p in complete.problems)
    finally:
        store.close()
    lines: Counter[tuple] = Counter()
    by_seq: dict[int, Counter[str]] = defaultdict(Counter)
    for cfg in configs:
        node_config = load_config(cfg)
        directory = Path(node_config.accounting.directory)
        published = cluster_position(node_config.node.spool,
                                     node_config.cluster.schema_name, node_config.node.name)
        for path in sorted(directory.glob("*.csv")):
            for row in csv.DictReader(_committed(directory, path, published).splitlines()):
                lines[tuple(row.values())] += 1
                corr = row.get("header_X-Correlation-ID", "")
                if corr.startswith("kill-"):
                    by_seq[int(corr[5:])][row["type"]] += 1
    result.file_lines_twice = sum(n - 1 for n in lines.values() if n > 1)
    for seq in counts:
        if not (by_seq[seq]["r"] and by_seq[seq]["d"]):
            result.evidence_gaps_files += 1
            problems.append(f"kill-{seq}: the accounting files have {dict(by_seq[seq])}")
    result.problems = problems[:20]


def _committed(directory: Path, path: Path, published: dict | None = None) -> str:
    """A file's committed part: up to the size its position records (the rest, of a node
    killed and never restarted, was written again by the node that took its work over); in a
    cluster, ``published`` is the position the database holds for the node
    (``cluster_position``), used when it is the newer one."""
    from ..accounting.log import read_position

    data = path.read_bytes()
    for name, size in read_position(directory, published=published).get("files", {}).values():
        if Path(name) == path:
            data = data[:size]
    return data.decode()


def _drained(config_path: Path) -> bool:
    """Whether the spool holds no recipient still to deliver."""
    from ..spool.outbox import open_outbox
    from ..startup import load_config

    config = load_config(config_path)
    try:
        outbox = open_outbox(config.node.spool, config.cluster.schema_name, "")
    except Exception:  # noqa: BLE001 - not there yet
        return False
    try:
        return not outbox.open_recipients()
    finally:
        outbox.close()


def _filed(config_path: Path) -> bool:
    """Whether every event in a cluster's outbox is in the audit store and the accounting
    files: those of a node killed for good wait there until the survivor adopts its writer,
    ``cluster.dead_after`` after its last heartbeat (an embedded node files all at its stop)."""
    from ..audit.backend import open_audit_store
    from ..spool.outbox import PostgresOutbox, open_outbox
    from ..startup import load_config

    config = load_config(config_path)
    outbox = open_outbox(config.node.spool, config.cluster.schema_name, "")
    try:
        if not isinstance(outbox, PostgresOutbox):
            return True
        store = open_audit_store(config, readonly=True)
        try:
            stored = store.feed_cursors()
        finally:
            store.close()
        return not any(outbox.read(w, min(stored.get(w, 0), outbox.filed(w)), 1)
                       for w in outbox.all_writers())
    finally:
        outbox.close()


def _drop_schema(dsn: str, schema: str) -> None:
    import psycopg

    with contextlib.suppress(psycopg.Error), psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


def _sink_main(port: int, out: Path) -> None:
    """The sink process: record each arrival's sequence number, on disk, before its 250."""
    from .sink import Sink

    class RecordingSink(Sink):
        async def handle_DATA(self, server, session, envelope) -> str:
            data = envelope.original_content or b""
            start = data.find(SEQ_HEADER)
            seq = data[start + len(SEQ_HEADER): data.find(b"\r\n", start)] if start >= 0 else b""
            with open(out, "ab") as fh:
                fh.write(seq + b"\n")
                fh.flush()
                os.fsync(fh.fileno())
            return "250 2.0.0 Ok"

    async def main() -> None:
        sink = await RecordingSink(port=port, keep_data=False).start()
        sys.stdout.write("listening\n")  # the harness waits for this line
        sys.stdout.flush()
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        await stop.wait()
        await sink.stop()

    asyncio.run(main())


def command(workdir: Path, messages: int, kills: int, seed: int | None,
            spool: str | None = None, workers: str = "1") -> int:
    """Run and print the result as one JSON line; exit status 1 when anything was lost or the
    evidence is incomplete."""
    result = run(workdir, messages=messages, kills=kills,
                 seed=seed if seed is not None else os.getpid(), spool=spool, workers=workers)
    print(json.dumps({**asdict(result), "evidence_ok": result.evidence_ok}))
    return 1 if result.lost or result.outlived or not result.evidence_ok else 0


if __name__ == "__main__" and sys.argv[1:2] == ["sink"]:
    _sink_main(int(sys.argv[2]), Path(sys.argv[3]))
