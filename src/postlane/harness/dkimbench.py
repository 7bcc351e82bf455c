"""``postlane dkim bench``: how fast DKIM signing is - signatures per second per algorithm and
thread count, canonicalization against dkimpy's, and the node's ``Signer`` with a campaign queued
(transactional latency meanwhile). A harness: only the command imports it."""

from __future__ import annotations

import asyncio
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from ..config.model import DKIMConfig, DKIMKeyConfig
from ..policy.dkim import (
    PrivateKey,
    Signer,
    canonical_body,
    canonical_header,
    generate_key,
    sign,
    write_key,
)
from ..policy.headers import header_fields, split_message
from ..startup import parse_config

__all__ = ["run_dkim_bench"]


def _bench_message(size: int) -> bytes:
    line = "Dear customer, your policy document for the coming year is attached below. Ok.\r\n"
    head = ("From: Insurer <notices@insurer.test>\r\nTo: customer@example.com\r\n"
            "Subject: Your policy document\r\nDate: Fri, 27 Nov 2026 18:00:00 +0000\r\n"
            "Message-ID: <bench@insurer.test>\r\nMIME-Version: 1.0\r\n"
            "Content-Type: text/plain; charset=utf-8\r\n\r\n")
    return (head + line * max(1, (size - len(head)) // len(line))).encode()


def run_dkim_bench(size: int, seconds: float, campaign: int,
                   echo: Callable[[str], object] = print) -> None:
    """Signatures per second (RSA-2048, Ed25519; 1 and 2 threads) and canonicalization cost
    against dkimpy's, on one message of ``size`` bytes, then the ``Signer`` under a campaign
    (``postlane dkim bench``; docs/performance.md). Each measurement runs ``seconds``."""
    import dkim as dkimpy
    from dkim.canonicalization import CanonicalizationPolicy

    data = _bench_message(size)
    head, body = split_message(data)
    fields = header_fields(head)
    cfg = DKIMConfig()

    def rate(fn: Callable[[], object], threads: int) -> float:
        def run() -> int:
            n, end = 0, time.perf_counter() + seconds
            while time.perf_counter() < end:
                fn()
                n += 1
            return n
        start = time.perf_counter()
        with ThreadPoolExecutor(threads) as pool:
            total = sum(pool.map(lambda _: run(), range(threads)))
        return total / (time.perf_counter() - start)

    echo(f"message: {len(data)} bytes")
    for algorithm in ("rsa-sha256", "ed25519-sha256"):
        key = generate_key(algorithm, 2048)
        pair = (DKIMKeyConfig(domain="insurer.test", selector="bench", algorithm=algorithm,
                              key_file="-"), key)
        def one(p: tuple[DKIMKeyConfig, PrivateKey] = pair) -> bytes:
            return sign(fields, body, "insurer.test", [p], 0, cfg)

        for threads in (1, 2):
            r = rate(one, threads)
            echo(f"{algorithm:<15} {threads} thread(s): {r:8.0f} signatures/s")
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    digest_input = b"x" * 600  # about what a signed header block hashes
    r = rate(lambda: rsa_key.sign(digest_input, padding.PKCS1v15(), hashes.SHA256()), 1)
    echo(f"for reference: OpenSSL RSA-2048 operation alone: {r:8.0f} signatures/s")
    pem = rsa_key.private_bytes(serialization.Encoding.PEM,
                                serialization.PrivateFormat.TraditionalOpenSSL,
                                serialization.NoEncryption())
    r = rate(lambda: dkimpy.sign(data, b"bench", b"insurer.test", pem), 1)
    echo(f"for reference: dkimpy.sign (pure-Python RSA):  {r:8.0f} signatures/s")
    policy = CanonicalizationPolicy.from_c_value(b"relaxed/relaxed")

    def ours() -> None:
        canonical_body(body, True)
        for _, raw in fields:
            canonical_header(raw, True)

    def theirs() -> None:
        hdrs, b = dkimpy.rfc822_parse(data)
        policy.canonicalize_body(b)
        policy.canonicalize_headers(hdrs)

    for name, fn in (("postlane", ours), ("dkimpy", theirs)):
        echo(f"canonicalization {name:<8}: {1e6 / rate(fn, 1):8.1f} µs/message")
    asyncio.run(_bench_signer(fields, body, campaign, echo))


async def _bench_signer(fields: list[tuple[str, bytes]], body: bytes, campaign: int,
                        echo: Callable[[str], object]) -> None:
    """Through ``Signer`` as intake uses it: campaign signatures queued all at once, and the
    latency of transactional signatures submitted meanwhile (their own signing process)."""
    with tempfile.TemporaryDirectory() as tmp:
        key_file = Path(tmp) / "bench.pem"
        write_key(key_file, generate_key("rsa-sha256"))
        cfg = parse_config(f"""
[pools.tx]
ips = [{{ address = "127.0.0.1", ehlo = "tx.test" }}]
[pools.bulk]
ips = [{{ address = "127.0.0.2", ehlo = "bulk.test" }}]
[classes.transactional]
pool = "tx"
sla = "2m"
[classes.campaign]
pool = "bulk"
[[dkim.keys]]
domain = "insurer.test"
selector = "bench"
key_file = "{key_file}"
""")
        signer = Signer(cfg, lambda record: None)

        async def one(cls: str, pool: str) -> float:
            start = time.perf_counter()
            await signer.sign(fields, body, qid="", cls=cls, pool=pool, mail_from="", rcpts=[])
            return time.perf_counter() - start

        start = time.perf_counter()
        bulk = asyncio.gather(*(one("campaign", "bulk") for _ in range(campaign)))
        latencies = []
        while not bulk.done():
            latencies.append(await one("transactional", "tx"))
            await asyncio.sleep(0.01)
        await bulk
        elapsed = time.perf_counter() - start
        await signer.stop()
    latencies.sort()
    echo(f"Signer, rsa-sha256: {campaign} campaign signatures queued at once:"
               f" {campaign / elapsed:.0f} signatures/s; meanwhile {len(latencies)} transactional"
               f" signatures: p50 {latencies[len(latencies) // 2] * 1000:.1f} ms,"
               f" p99 {latencies[int(len(latencies) * 0.99)] * 1000:.1f} ms,"
               f" max {latencies[-1] * 1000:.1f} ms (the first waits while the loop writes"
               f" all {campaign} requests to the bulk signing processes)")
