"""``postlane bench``: the case study as a number (docs/design.md, section 8).

Three processes, as in production: the node (its own event loop and core), a recording sink
standing in for the recipients' providers, and this process submitting a marketing campaign as
fast as the node accepts it while transactional messages trickle in at a fixed rate. Latency is
measured from the start of each submission to its arrival at the sink.

With ``--spool postgresql://… --nodes N`` it starts N node processes sharing one schema (a
cluster on one machine), each with its own listener and its own pool IPs, and spreads both the
campaign's connections and the transactional submissions over them; the sink tells from each
arrival's source IP which node delivered it.
"""

from __future__ import annotations

import asyncio
import collections
import ipaddress
import itertools
import json
import multiprocessing as mp
import os
import queue
import shutil
import socket
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from ..config import Config
from ..relay.client import SMTPConnection, SMTPError
from ..startup import load_config
from .procstats import (
    TreeSampler,
    children_cpu_seconds,
    cpu_seconds,
    descendants,
    rss_peak_mb,
    tree_cpu_seconds,
    tree_rss_peak_mb,
    tree_system_seconds,
)

if TYPE_CHECKING:
    from multiprocessing.synchronize import Event

TRANSACTIONAL_DEFAULT = ("policy-documents", "claims", "payment-receipts")
EXAMPLE = Path(__file__).resolve().parents[1] / "data" / "insurance.toml"
"""The case study config (examples/insurance.toml in the repository, shipped in the package)."""
TAG = b"X-Bench-Id"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


MARKETING_FROM = "newsletter@insurer-news.example"
TRANSACTIONAL_FROM = "notices@insurer.example"


def bench_config(base: Config, *, workdir: Path, sink_port: int, fifo: bool,
                 dkim: str = "none", audit: bool = True, spool: str | None = None,
                 sink_tls: str = "none") -> tuple[Config, int]:
    """The base config pointed at the sink, with a fresh spool; ``fifo`` puts every class in one
    shared pool served in arrival order (what the case study's ESP had); ``dkim`` (rsa, ed25519)
    signs every message with a key made for the run. ``sink_tls``: "none" (the sink offers no
    STARTTLS, so every class sends opportunistically, in clear), "starttls" (the classes' own
    policies, against the sink's self-signed certificate) or "verified" (every class checks the
    sink's certificate, which the node trusts through ``relay.ca_file``)."""
    cfg = base.model_copy(deep=True)
    cfg.audit.enabled = audit
    for cls in cfg.classes.values():
        if sink_tls != "starttls":
            cls.tls = None
    if sink_tls == "none":
        cfg.relay.tls = "opportunistic"
    elif sink_tls == "verified":
        cfg.relay.tls = "verified"
    if sink_tls == "verified":
        cfg.relay.ca_file = str(workdir / "sink-cert.pem")
    if dkim != "none":
        from ..config.model import DKIMKeyConfig
        from ..policy.dkim import generate_key, write_key

        algorithm: Literal["rsa-sha256", "ed25519-sha256"] = (
            "rsa-sha256" if dkim == "rsa" else "ed25519-sha256")
        workdir.mkdir(parents=True, exist_ok=True)
        cfg.dkim.keys = []
        for domain in ("insurer.example", "insurer-news.example"):
            path = workdir / f"{domain}.{dkim}.key"
            write_key(path, generate_key(algorithm))
            cfg.dkim.keys.append(DKIMKeyConfig(domain=domain, selector="bench",
                                               algorithm=algorithm, key_file=str(path)))
    port = _free_port()
    first = next(iter(cfg.listeners.values())).model_copy()
    first.port, first.address, first.default_class = port, "127.0.0.1", None
    cfg.listeners = {"bench": first}
    cfg.node.spool = spool or str(workdir / "spool")
    if spool:  # a PostgreSQL DSN: a fresh schema per run, so runs never see each other's mail
        cfg.cluster.schema_name = f"bench_{os.getpid()}_{int(time.time())}"
    cfg.accounting.directory = str(workdir / "accounting")
    cfg.routes = {"*": f"127.0.0.1:{sink_port}"}
    cfg.api.port = 0  # never collide with a node already running on this machine
    cfg.api.token_file = str(workdir / "api-token")
    cfg.relay.idle_timeout = 1.0
    if fifo:
        ips = [ip for pool in cfg.pools.values() for ip in pool.ips]
        total = 20  # like Postfix's default of 20 concurrent deliveries per transport
        per_ip = max(1, total // len(ips))
        shared = next(iter(cfg.pools.values())).model_copy(deep=True)
        shared.ips = [ip.model_copy(update={"max_smtp_out": per_ip}) for ip in ips]
        shared.pausable = True
        cfg.pools = {"shared-pool": shared}
        for cls in cfg.classes.values():
            cls.pool = "shared-pool"
        cfg.scheduler = "fifo"
    return cfg, port


class BenchSetupError(ValueError):
    """The requested run cannot be set up (the CLI reports it as a bad argument)."""


def node_configs(cfg: Config, nodes: int, workdir: Path) -> list[tuple[Config, int]]:
    """``nodes`` nodes of one cluster made from a bench config: the same schema, each with its
    own name, listener port, files and pool IPs. IPs belong to machines, so node k's are the
    base IPs shifted by k × stride (at least 20: 127.0.0.10… → 127.0.0.30… → …), on loopback."""
    addrs = [ipaddress.ip_address(ip.address) for pool in cfg.pools.values() for ip in pool.ips]
    if not all(a.version == 4 and a.is_loopback for a in addrs):
        raise BenchSetupError("--nodes needs pool IPs on loopback (127.0.0.0/8): each node "
                              "gets its own copy of them, shifted")
    stride = max(20, int(max(addrs)) - int(min(addrs)) + 1) if addrs else 20
    out = []
    for k in range(nodes):
        node = cfg.model_copy(deep=True)
        home = workdir / f"node-{k + 1}"
        node.node.name = f"bench-{k + 1}"
        port = _free_port()
        next(iter(node.listeners.values())).port = port
        node.accounting.directory = str(home / "accounting")  # also locates its state/ folder
        node.api.token_file = str(home / "api-token")
        if node.audit.path:
            node.audit.path = str(home / "audit.sqlite")
        if node.feedback.suppression_db:
            node.feedback.suppression_db = str(home / "suppression.sqlite3")
        for pool in node.pools.values():
            for ip in pool.ips:
                shifted = ipaddress.ip_address(ip.address) + k * stride
                if not shifted.is_loopback:
                    raise BenchSetupError(f"node {k + 1}: {shifted} is not on loopback; use "
                                          "fewer nodes or lower pool IPs")
                ip.address = str(shifted)
        out.append((node, port))
    return out


def _body(kb: float) -> bytes:
    line = b"Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor.\r\n"
    return line * max(1, int(kb * 1024) // len(line))


def _message(tag: str, cls: str, rcpt: str, body: bytes, sender: str) -> bytes:
    return (f"From: {sender}\r\nTo: {rcpt}\r\nSubject: {cls} {tag}\r\n"
            f"X-Postlane-Class: {cls}\r\n{TAG.decode()}: {tag}\r\n"
            f"X-Correlation-ID: {tag}\r\nMIME-Version: 1.0\r\n"
            f"Content-Type: text/plain; charset=us-ascii\r\n\r\n").encode() + body


# -- child processes ----------------------------------------------------------------------------

def _run_node(cfg: Config) -> None:
    from ..admin.service import run
    from ..logsetup import setup_logging

    setup_logging("WARNING")
    run(cfg)


def sink_certificate(workdir: Path) -> tuple[str, str]:
    """A self-signed certificate for the sink's address (127.0.0.1, the route's host name): its
    own trust anchor, so ``relay.ca_file`` pointed at it makes the sink verifiable."""
    from ..edge.tls import selfsigned
    from ..secretfile import create_secret

    cert, key = workdir / "sink-cert.pem", workdir / "sink-key.pem"
    cert_pem, key_pem = selfsigned("127.0.0.1")
    cert.write_bytes(cert_pem)
    create_secret(key, key_pem)
    return str(cert), str(key)


def _run_sink(port: int, delay: float, out: mp.Queue, ready: Event,
              tls: tuple[str, str] | None = None, pipelining: bool = True) -> None:
    import ssl

    from .sink import Sink

    async def main() -> None:
        context = None
        if tls is not None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(*tls)
        sink = Sink(port=port, delay=delay, keep_data=False, tag_header=TAG,
                    tls_context=context, pipelining=pipelining)
        await sink.start()
        ready.set()
        sent = 0
        while True:
            await asyncio.sleep(0.05)
            new = sink.arrivals[sent:]
            if new:
                out.put((sink.connections, [(a.tag, a.time, a.peer) for a in new]))
                sent += len(new)
                if sent > 100_000:  # keep the sink's memory flat on long runs
                    del sink.arrivals[:sent]
                    sent = 0

    try:
        import uvloop
        uvloop.run(main())
    except ImportError:  # pragma: no cover
        asyncio.run(main())


# -- the load -----------------------------------------------------------------------------------

@dataclass
class Progress:
    marketing_total: int
    marketing_accepted: int = 0
    transactional_sent: int = 0
    delivered: int = 0
    started: float = field(default_factory=time.time)
    latencies: dict[str, list[float]] = field(default_factory=dict)
    sources: dict[str, set[str]] = field(default_factory=dict)
    phase: str = "starting"
    queued_behind: int = 0


@dataclass
class BenchOptions:
    marketing: int = 20000
    transactional_rate: float = 10.0
    sink_delay_ms: float = 0.0
    message_kb: float = 10.0
    baseline: str = "lanes"
    dkim: str = "none"
    audit: bool = True
    spool: str | None = None
    nodes: int | None = None
    """Node processes on the ``spool`` DSN (None: one node, and no per-node keys in the JSON)."""
    config: Path | None = None
    connections: int = 16
    timeout: float = 3600.0
    transactional_classes: tuple[str, ...] = TRANSACTIONAL_DEFAULT
    marketing_class: str = "marketing"
    sink_tls: str = "none"
    """none, starttls or verified: see ``bench_config``."""
    workers: str = "1"
    """The node's ``[node] workers``: SMTP intake processes ("auto" = one per core)."""
    pipelining: bool = True
    """The load generator pipelines MAIL, RCPT and DATA (False: waits for every reply, the way
    most applications' SMTP libraries talk)."""
    reconnect_every: int = 0
    """Each submitting connection QUITs and reconnects after this many messages (0: never)."""
    domains: int = 20
    """Recipient domains of the campaign (lanes of the marketing pool)."""
    sink_pipelining: bool = True
    """The sink advertises PIPELINING (False: the node's relay waits for every reply)."""
    queued_behind: int = 0
    """Before the load: pause the marketing pool and queue this many campaign messages behind
    it, then measure RSS and the time of /metrics and /api/v1/status (``queued_behind`` in the
    JSON); the load then runs beside that queue."""
    seed_queue: bool = False
    """Write the ``queued_behind`` messages straight into the node's spool before it starts
    (``SQLiteSpool.enqueue``, no "r" records), paused: the node resumes them as after a
    restart. Minutes instead of an hour for a million."""
    transactional_seconds: float = 0.0
    """The transactional stream runs at least this long (with no campaign: how long it runs)."""
    node_from: Path | None = None
    """Run the node under test from another checkout (its ``.venv``), configured by that
    checkout's own ``bench_config``; the load, the sink and the measurements stay this
    checkout's, so two commits are compared under one load generator (benchmarks/abba.py)."""


class _Submitter:
    """A small pool of persistent SMTP connections to the node; ``pipelining`` False: wait for
    every reply (a plain client); ``reconnect_every`` N: QUIT and reconnect after N messages."""

    def __init__(self, port: int, pipelining: bool = True, reconnect_every: int = 0) -> None:
        self.port = port
        self.pipelining = pipelining
        self.reconnect_every = reconnect_every
        self.idle: list[SMTPConnection] = []
        self.connects = 0

    async def send(self, mail_from: str, rcpt: str, data: bytes) -> bool:
        conn = self.idle.pop() if self.idle else None
        for _ in range(3):
            try:
                if conn is None or not conn.usable:
                    conn = await SMTPConnection.open("127.0.0.1", self.port,
                                                     server_name="localhost", source_ip=None,
                                                     ehlo_name="bench.local", tls="disabled")
                    self.connects += 1
                    if not self.pipelining:
                        conn.extensions.pop("PIPELINING", None)
                tx = await conn.send(mail_from, [(rcpt, "")], data)
                ok = tx.data_reply is not None and tx.data_reply.is_ok
                if self.reconnect_every and conn.messages_sent >= self.reconnect_every:
                    await conn.quit()
                else:
                    self.idle.append(conn)
                return ok
            except (SMTPError, OSError):
                conn = None
                await asyncio.sleep(0.05)
        return False

    async def close(self) -> None:
        for conn in self.idle:
            await conn.quit()


@dataclass
class Admin:
    """Where the bench reaches a node's HTTP API (to pause the marketing pool and time the
    monitoring endpoints)."""

    port: int
    token_file: Path

    def call(self, method: str, path: str) -> tuple[float, bytes]:
        """One request; (seconds it took, body)."""
        import urllib.request

        token = self.token_file.read_text().strip()
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", method=method,
                                     headers={"Authorization": f"Bearer {token}"},
                                     data=b"" if method == "POST" else None)
        t0 = time.perf_counter()
        with urllib.request.urlopen(req, timeout=60) as resp:
            body = resp.read()
        return time.perf_counter() - t0, body

    def timings(self, path: str, n: int = 7) -> dict[str, float]:
        """Milliseconds of ``n`` requests, one after the other: median and max."""
        times = sorted(self.call("GET", path)[0] * 1000 for _ in range(n))
        return {"p50_ms": round(statistics.median(times), 2), "max_ms": round(times[-1], 2)}


async def _load(opts: BenchOptions, ports: list[int], arrivals: mp.Queue, progress: Progress,
                on_tick: Callable[[Progress], None] | None,
                owners: dict[str, str] | None = None, admin: Admin | None = None,
                sampler: TreeSampler | None = None, marketing_pool: str = "") -> dict:
    """Submit the load to the nodes listening on ``ports`` (marketing connection i and
    transactional message n go to node i, n mod len(ports)) and measure it at the sink;
    ``owners`` maps a source IP to its node's name for the per-node counts."""
    body = _body(opts.message_kb)
    submitted: dict[str, tuple[str, float]] = {}  # tag -> (class, submit time), acknowledged only
    counter = itertools.count()
    marketing_done_at = 0.0
    lost_at_intake = 0
    connects = 0

    async def marketing_worker(port: int, prefix: str = "m", total: int = opts.marketing,
                               numbers: Iterator[int] = counter) -> None:
        nonlocal lost_at_intake, connects
        sub = _Submitter(port, opts.pipelining, opts.reconnect_every)
        while True:
            n = next(numbers)
            if n >= total:
                break
            tag = f"{prefix}{n}"
            rcpt = f"reader{n}@news{n % opts.domains}.example"
            t0 = time.time()
            if await sub.send(MARKETING_FROM, rcpt,
                              _message(tag, opts.marketing_class, rcpt, body, MARKETING_FROM)):
                if prefix == "m":
                    submitted[tag] = (opts.marketing_class, t0)
                    progress.marketing_accepted += 1
                else:
                    progress.queued_behind += 1
            else:
                lost_at_intake += 1
        await sub.close()
        connects += sub.connects

    behind: dict | None = None
    if opts.queued_behind:
        if admin is None or sampler is None:
            raise BenchSetupError("--queued-behind needs the node's API (one node)")
        progress.phase = "queueing"
        behind = {"queued": opts.queued_behind, "pool": marketing_pool,
                  "via": "spool" if opts.seed_queue else "smtp"}
        if opts.seed_queue:  # written before the node started (``_seed_spool``)
            progress.queued_behind = opts.queued_behind
        else:
            behind["rss_mb_all_empty"] = sampler.now_mb()
            behind["metrics_empty"] = await asyncio.to_thread(admin.timings, "/metrics")
            behind["status_empty"] = await asyncio.to_thread(admin.timings, "/api/v1/status")
            await asyncio.to_thread(admin.call, "POST", f"/api/v1/pools/{marketing_pool}/pause")
            t0 = time.time()
            numbers = itertools.count()
            fillers = [asyncio.create_task(marketing_worker(ports[0], "q", opts.queued_behind,
                                                            numbers))
                       for _ in range(opts.connections)]
            while not all(w.done() for w in fillers):
                await asyncio.sleep(0.5)
                if on_tick:
                    on_tick(progress)
            await asyncio.gather(*fillers)
            behind["inject_s"] = round(time.time() - t0, 1)
            behind["inject_msgs_s"] = round(progress.queued_behind / max(1e-9, time.time() - t0),
                                            1)
        behind["accepted"] = progress.queued_behind
        await asyncio.sleep(2.0)  # let the node settle (collections, the monitor's tick)
        behind["rss_mb_all_queued"] = sampler.now_mb()
        behind["metrics"] = await asyncio.to_thread(admin.timings, "/metrics")
        behind["status"] = await asyncio.to_thread(admin.timings, "/api/v1/status")
        status = json.loads((await asyncio.to_thread(admin.call, "GET", "/api/v1/status"))[1])
        behind["node_queued"] = status.get("queued")
    first_submit = time.time()

    stop_tx = asyncio.Event()

    async def transactional() -> None:
        subs = [_Submitter(port) for port in ports]
        classes = itertools.cycle(opts.transactional_classes)
        n = 0
        interval = 1.0 / opts.transactional_rate if opts.transactional_rate > 0 else 0
        next_at = time.monotonic()
        pending: set[asyncio.Task] = set()

        async def one(tag: str, cls: str, sub: _Submitter) -> None:
            rcpt = f"customer{tag}@customers.example"
            t0 = time.time()
            if await sub.send(TRANSACTIONAL_FROM, rcpt,
                              _message(tag, cls, rcpt, body, TRANSACTIONAL_FROM)):
                submitted[tag] = (cls, t0)
                accepted_in.setdefault(cls, []).append(time.time() - t0)
                progress.transactional_sent += 1

        while interval and not (stop_tx.is_set() and time.monotonic() >= tx_until):
            n += 1
            task = asyncio.create_task(one(f"t{n}", next(classes), subs[n % len(subs)]))
            pending.add(task)
            task.add_done_callback(pending.discard)
            next_at += interval
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
        if pending:
            await asyncio.wait(pending)
        for sub in subs:
            await sub.close()

    arrived: dict[str, tuple[float, str]] = {}
    accepted_in: dict[str, list[float]] = {}
    """Per transactional class: submission to the 250 (the rest of latency_s is the queue
    and the delivery)."""
    duplicates = 0
    connections = 0

    def collect() -> None:
        nonlocal duplicates, connections
        while True:
            try:
                connections, batch = arrivals.get_nowait()
            except queue.Empty:
                return
            for tag, at, peer in batch:
                if tag in arrived:
                    duplicates += 1
                else:
                    arrived[tag] = (at, peer)
            progress.delivered = len(arrived)

    progress.phase = "campaign"
    tx_until = time.monotonic() + opts.transactional_seconds
    tx_task = asyncio.create_task(transactional())
    workers = [asyncio.create_task(marketing_worker(ports[i % len(ports)]))
               for i in range(opts.connections)]
    deadline = time.monotonic() + opts.timeout
    while not all(w.done() for w in workers):
        await asyncio.sleep(0.1)
        collect()
        if on_tick:
            on_tick(progress)
    marketing_done_at = time.time()
    progress.phase = "delivering"
    # transactional mail keeps arriving while the campaign is being delivered
    while time.monotonic() < deadline:
        collect()
        if on_tick:
            on_tick(progress)
        marketing_left = sum(1 for tag, (cls, _) in list(submitted.items())
                             if cls == opts.marketing_class and tag not in arrived)
        if marketing_left == 0 and time.monotonic() >= tx_until:
            break
        await asyncio.sleep(0.2)
    stop_tx.set()
    await tx_task
    progress.phase = "draining"
    while time.monotonic() < deadline and any(t not in arrived for t in submitted):
        await asyncio.sleep(0.1)
        collect()
        if on_tick:
            on_tick(progress)
    await asyncio.sleep(0.5)
    collect()
    progress.phase = "done"

    latencies: dict[str, list[float]] = {}
    sources: dict[str, set[str]] = {}
    for tag, (cls, t0) in submitted.items():
        if tag in arrived:
            at, peer = arrived[tag]
            latencies.setdefault(cls, []).append(at - t0)
            sources.setdefault(cls, set()).add(peer)
    progress.latencies, progress.sources = latencies, sources
    last = max((at for at, _ in arrived.values()), default=time.time())
    marketing_n = progress.marketing_accepted
    out: dict[str, Any] = {  # the JSON report
        "marketing": marketing_n,
        "transactional": progress.transactional_sent,
        "throughput_msgs_s": round(len(arrived) / max(1e-9, last - first_submit), 1),
        "intake_msgs_s": round(marketing_n / max(1e-9, marketing_done_at - first_submit), 1),
        "latency_s": {cls: _percentiles(v) for cls, v in sorted(latencies.items())},
        "accept_s": {cls: _percentiles(v) for cls, v in sorted(accepted_in.items())},
        "lost": sum(1 for t in submitted if t not in arrived),
        "duplicates": duplicates,
        "sink_connections": connections,
        "refused_at_intake": lost_at_intake,
        "client_connects": connects,
        "sources": {cls: sorted(v) for cls, v in sorted(sources.items())},
        "duration_s": round(last - first_submit, 1),
    }
    if behind is not None:
        if admin is not None:  # the queue is still there, behind its paused pool
            behind["metrics_after"] = await asyncio.to_thread(admin.timings, "/metrics")
            behind["status_after"] = await asyncio.to_thread(admin.timings, "/api/v1/status")
        out["queued_behind"] = behind
    if owners is not None:
        per_node = collections.Counter(owners.get(peer, "unknown") for _, peer in arrived.values())
        out["per_node"] = {name: {"delivered": per_node.get(name, 0)}
                           for name in dict.fromkeys(owners.values())}
        if per_node.get("unknown"):
            out["per_node"]["unknown"] = {"delivered": per_node["unknown"]}
    return out


def _commit_figures(exposition: bytes) -> dict:
    """The node's spool commits from its /metrics: how many, operations per commit, mean
    duration, and the bucket bounds holding the median and the 99th percentile."""
    from prometheus_client.parser import text_string_to_metric_families

    buckets: list[tuple[float, float]] = []
    count = total = ops = 0.0
    for family in text_string_to_metric_families(exposition.decode()):
        for sample in family.samples:
            if sample.name == "postlane_spool_commit_seconds_bucket":
                buckets.append((float(sample.labels["le"]), sample.value))
            elif sample.name == "postlane_spool_commit_seconds_count":
                count = sample.value
            elif sample.name == "postlane_spool_commit_seconds_sum":
                total = sample.value
            elif sample.name == "postlane_spool_operations_total":
                ops = sample.value

    def bound(q: float) -> float | None:
        return next((round(1000 * le, 1) for le, n in sorted(buckets) if n >= q * count), None)

    within_10ms = next((n for le, n in sorted(buckets) if le >= 0.01), count)
    return {"commits": int(count), "ops_per_commit": round(ops / max(1.0, count), 1),
            "mean_ms": round(1000 * total / max(1.0, count), 2),
            "p50_le_ms": bound(0.5), "p99_le_ms": bound(0.99), "p999_le_ms": bound(0.999),
            "over_10ms": int(count - within_10ms)}


def _percentiles(values: list[float]) -> dict[str, float]:
    values = sorted(values)
    if not values:
        return {}

    def pct(p: float) -> float:
        return round(values[min(len(values) - 1, int(p * len(values)))], 4)

    return {"n": len(values), "p50": round(statistics.median(values), 4), "p95": pct(0.95),
            "p99": pct(0.99), "max": round(values[-1], 4)}


def run_bench(opts: BenchOptions, on_tick: Callable[[Progress], None] | None = None,
              workdir: Path | None = None) -> dict:
    """Run the whole benchmark and return the result dict (also the demo's engine)."""
    if opts.nodes is not None and not opts.spool:
        raise BenchSetupError("--nodes needs --spool postgresql://…: the nodes share one queue")
    base = load_config(opts.config) if opts.config else load_config(EXAMPLE)
    own_dir = workdir is None
    if workdir is None:
        workdir = Path(tempfile.mkdtemp(prefix="postlane-bench-"))
    else:
        shutil.rmtree(workdir, ignore_errors=True)  # every run starts from an empty spool
        workdir.mkdir(parents=True)
    ctx = mp.get_context("spawn")
    arrivals: mp.Queue = ctx.Queue()
    ready = ctx.Event()
    sink_port = _free_port()
    cfg, port = bench_config(base, workdir=workdir, sink_port=sink_port,
                             fifo=opts.baseline == "fifo", dkim=opts.dkim, audit=opts.audit,
                             spool=opts.spool, sink_tls=opts.sink_tls)
    cfg.node.workers = "auto" if opts.workers == "auto" else int(opts.workers)
    sink_tls = sink_certificate(workdir) if opts.sink_tls != "none" else None
    try:
        configs = [(cfg, port)] if opts.nodes is None else node_configs(cfg, opts.nodes, workdir)
    except BenchSetupError:
        if own_dir:
            shutil.rmtree(workdir, ignore_errors=True)
        raise
    owners = None if opts.nodes is None else {
        ip.address: c.node.name for c, _ in configs for pool in c.pools.values() for ip in pool.ips}
    cfg.api.port = _free_port()
    seeded: dict = {}
    if opts.seed_queue and opts.queued_behind:
        if opts.spool or opts.node_from is not None:
            raise BenchSetupError("--seed-queue writes this checkout's SQLite spool")
        t0 = time.time()
        asyncio.run(_seed_spool(cfg, opts))
        seeded = {"seed_s": round(time.time() - t0, 1)}
    admin = Admin(cfg.api.port, Path(cfg.api.token_file)) if opts.nodes is None else None
    sink = ctx.Process(target=_run_sink, args=(sink_port, opts.sink_delay_ms / 1000, arrivals,
                                               ready, sink_tls, opts.sink_pipelining),
                       daemon=True)
    sink.start()
    if sink.pid is None:  # start() sets it; without it there is no CPU time to read
        raise BenchSetupError("the sink process did not start")
    sink_pid = sink.pid
    ready.wait(30)
    nodes: list = []
    progress = Progress(marketing_total=opts.marketing)
    sampler: TreeSampler | None = None
    try:
        for node_cfg, _ in configs:
            if opts.node_from is not None:
                nodes.append(_ExternalNode(opts, workdir, sink_port, port, cfg.api.port))
            else:
                nodes.append(ctx.Process(target=_run_node, args=(node_cfg,), daemon=True))
                nodes[-1].start()
        for node, (_, node_port) in zip(nodes, configs, strict=True):
            _wait_port(node_port, node)
        # what start-up took (imports, opening the spool, the recorder's own start), which the
        # per-message figures below include; read once every listener answers
        startup_cpu = sum(tree_cpu_seconds(node.pid) for node in nodes)
        sampler = TreeSampler([node.pid for node in nodes])
        ports = [node_port for _, node_port in configs]
        pool = cfg.classes[opts.marketing_class].pool
        load = _load(opts, ports, arrivals, progress, on_tick, owners, admin, sampler, pool)
        try:
            import uvloop
            result = uvloop.run(load)
        except ImportError:  # pragma: no cover
            result = asyncio.run(load)
        if seeded:
            result["queued_behind"].update(seeded)
        if admin is not None:
            try:
                result["spool_commits"] = _commit_figures(admin.call("GET", "/metrics")[1])
            except OSError as exc:  # a figure, not the run: say why it is missing
                result["spool_commits"] = {"error": f"/metrics: {exc}"}
        result["rss_mb_peak"] = max(rss_peak_mb(node.pid) for node in nodes)
        result["rss_mb_peak_all"] = max(tree_rss_peak_mb(node.pid) for node in nodes)
        result["rss_mb_all_max"] = sampler.stop()
        result["node_cpu_s"] = round(sum(cpu_seconds(node.pid) for node in nodes), 2)
        result["signer_cpu_s"] = round(sum(children_cpu_seconds(node.pid) for node in nodes), 2)
        result["node_cpu_s_all"] = round(sum(tree_cpu_seconds(node.pid) for node in nodes), 2)
        result["node_system_s_all"] = round(sum(tree_system_seconds(node.pid) for node in nodes),
                                            2)
        result["node_processes"] = sum(1 + len(descendants(node.pid)) for node in nodes)
        result["sink_cpu_s"] = cpu_seconds(sink_pid)
        result["load_cpu_s"] = cpu_seconds(os.getpid())
        delivered = result["marketing"] + result["transactional"]
        if opts.queued_behind:  # the queue was taken in too: its intake is part of the work
            delivered += result["queued_behind"]["accepted"]
        result["node_cpu_ms_per_msg"] = round(
            1000 * result["node_cpu_s_all"] / max(1, delivered), 3)
        result["node_startup_cpu_s"] = round(startup_cpu, 2)
        result["node_cpu_ms_per_msg_running"] = round(
            1000 * (result["node_cpu_s_all"] - startup_cpu) / max(1, delivered), 3)
        result["node_system_ms_per_msg"] = round(
            1000 * result["node_system_s_all"] / max(1, delivered), 3)
        # the load generator and the sink share the cores: what they take bounds the node's share
        result["harness_cpu_ms_per_msg"] = round(
            1000 * (result["sink_cpu_s"] + result["load_cpu_s"]) / max(1, delivered), 3)
        # the main process alone: what stays serial however many intake workers run
        result["main_cpu_ms_per_msg"] = round(1000 * result["node_cpu_s"] / max(1, delivered), 3)
        if opts.nodes is not None:
            result["nodes"] = opts.nodes
            for node, (node_cfg, _) in zip(nodes, configs, strict=True):
                entry = result["per_node"].setdefault(node_cfg.node.name, {"delivered": 0})
                entry["rss_mb_peak"] = rss_peak_mb(node.pid)
                entry["cpu_s"] = round(cpu_seconds(node.pid) + children_cpu_seconds(node.pid), 2)
    finally:
        if sampler is not None:
            sampler.stop()
        for node in nodes:
            if node.pid:
                os.kill(node.pid, 15)
        for node in nodes:
            node.join(60)
        sink.terminate()
        sink.join(10)
        if own_dir:
            shutil.rmtree(workdir, ignore_errors=True)
        if opts.spool:
            asyncio.run(_drop_schema(opts.spool, cfg.cluster.schema_name))
    result["baseline"] = opts.baseline
    result["dkim"] = opts.dkim
    result["audit"] = opts.audit
    result["sink_tls"] = opts.sink_tls
    result["workers"] = opts.workers
    result["spool"] = "postgresql" if opts.spool else "sqlite"
    result["sink_delay_ms"] = opts.sink_delay_ms
    result["message_kb"] = opts.message_kb
    result["client"] = {"pipelining": opts.pipelining, "reconnect_every": opts.reconnect_every,
                        "connections": opts.connections, "domains": opts.domains}
    result["sink_pipelining"] = opts.sink_pipelining
    if opts.node_from is not None:
        result["node_from"] = str(opts.node_from)
    result["_progress"] = progress
    return result


async def _seed_spool(cfg: Config, opts: BenchOptions) -> None:
    """``--seed-queue``: the campaign queued behind its paused pool, written with the spool's
    own ``enqueue`` (group commit), as a node would find it after a restart."""
    from ..spool import Message, Recipient, SQLiteSpool

    cls = cfg.classes[opts.marketing_class]
    spool = SQLiteSpool(cfg.node.spool, "bench-seed")
    await spool.open()
    try:
        body = _body(opts.message_kb)
        now = time.time()
        waiting = []
        for n in range(opts.queued_behind):
            rcpt = f"reader{n}@news{n % opts.domains}.example"
            data = _message(f"q{n}", opts.marketing_class, rcpt, body, MARKETING_FROM)
            msg = Message(id=f"Q{n:019X}", cls=opts.marketing_class, pool=cls.pool,
                          mail_from=MARKETING_FROM, queued_at=now,
                          deadline=now + (cls.sla if cls.sla is not None else cls.expiry),
                          expire_at=now + cls.expiry, priority=cls.priority, size=len(data))
            waiting.append(spool.enqueue(msg, [Recipient(msg, 0, rcpt, rcpt.split("@")[1])],
                                         data))
            if len(waiting) >= 4000:
                await asyncio.gather(*waiting)
                waiting = []
        await asyncio.gather(*waiting)
        await spool.set_paused(cls.pool, "*", True)
    finally:
        await spool.close()


_EXTERNAL = """
import inspect, json, sys
from pathlib import Path
try:
    from postlane.harness import bench
    from postlane.startup import load_config
except ImportError:  # a checkout from before the cli/ and harness/ packages (issue 21)
    from postlane import bench
    from postlane.config import load_config
a = json.loads(sys.argv[1])
base = load_config(Path(a["config"]) if a["config"] else bench.EXAMPLE)
kw = dict(workdir=Path(a["workdir"]), sink_port=a["sink_port"], fifo=a["fifo"], dkim=a["dkim"],
          audit=a["audit"])
if "sink_tls" in inspect.signature(bench.bench_config).parameters:
    kw["sink_tls"] = a["sink_tls"]
cfg, _ = bench.bench_config(base, **kw)
next(iter(cfg.listeners.values())).port = a["port"]
cfg.api.port = a["api_port"]
bench._run_node(cfg)
"""


class _ExternalNode:
    """The node under test run from another checkout's ``.venv`` (``--node-from``), with the
    listener and API ports this bench chose; the interface of ``mp.Process`` the bench uses."""

    def __init__(self, opts: BenchOptions, workdir: Path, sink_port: int, port: int,
                 api_port: int) -> None:
        import subprocess

        python = Path(opts.node_from or ".") / ".venv" / "bin" / "python"
        if not python.exists():
            raise BenchSetupError(f"{python} does not exist (--node-from needs a checkout with"
                                  " its own .venv)")
        args = {"config": str(opts.config) if opts.config else "", "workdir": str(workdir),
                "sink_port": sink_port, "fifo": opts.baseline == "fifo", "dkim": opts.dkim,
                "audit": opts.audit, "sink_tls": opts.sink_tls, "port": port,
                "api_port": api_port}
        self.proc = subprocess.Popen([str(python), "-c", _EXTERNAL, json.dumps(args)],
                                     cwd=opts.node_from)
        self.pid = self.proc.pid

    def is_alive(self) -> bool:
        return self.proc.poll() is None

    def join(self, timeout: float | None = None) -> None:
        import subprocess

        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


async def _drop_schema(dsn: str, schema: str) -> None:
    """A bench run on PostgreSQL leaves nothing behind."""
    import asyncpg

    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    finally:
        await conn.close()


def _wait_port(port: int, proc: mp.Process, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc.is_alive():
            raise RuntimeError("the node exited during start-up")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError("the node did not start listening")


def result_json(result: dict) -> str:
    return json.dumps({k: v for k, v in result.items() if not k.startswith("_")},
                      separators=(",", ":"))

