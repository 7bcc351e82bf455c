"""Node CPU per DKIM signature by way of handing it off: inline, ThreadPoolExecutor,
ProcessPoolExecutor and the signing process (policy/signing.py), on one 10 KB message with
RSA-2048 and 8 concurrent signers. Usage: ``.venv/bin/python benchmarks/dkim_handoff.py``.

"Node CPU" is this process's CPU time (children excluded): what the event loop's core pays.
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import time
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor

import uvloop
from cryptography.hazmat.primitives import serialization

from postlane.config.model import DKIMConfig, DKIMKeyConfig
from postlane.policy.dkim import generate_key, sign
from postlane.policy.headers import header_fields, split_message
from postlane.policy.signing import SigningProcess

N = 2000
CONCURRENCY = 8
CONFIG = DKIMConfig()
KEY_CONFIG = DKIMKeyConfig(domain="news.example", selector="s", key_file="-",
                           algorithm="rsa-sha256")
KEY = generate_key("rsa-sha256")
DER = KEY.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                        serialization.NoEncryption())
HEAD, BODY = split_message(
    b"From: News <news@news.example>\r\nTo: reader@example.com\r\nSubject: November\r\n"
    b"Date: Fri, 27 Nov 2026 10:00:00 +0000\r\nMessage-ID: <1@news.example>\r\n"
    b"MIME-Version: 1.0\r\nContent-Type: text/plain\r\n\r\n"
    + b"Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod.\r\n" * 140)
FIELDS = header_fields(HEAD)
_child_key: list = []


def _child_init() -> None:
    _child_key.append(serialization.load_der_private_key(DER, password=None))


def _child_sign(now: float) -> bytes:
    return sign(FIELDS, BODY, "news.example", [(KEY_CONFIG, _child_key[0])], now, CONFIG)


def _inline(now: float) -> bytes:
    return sign(FIELDS, BODY, "news.example", [(KEY_CONFIG, KEY)], now, CONFIG)


async def _measure(name: str, one) -> None:
    work = iter(range(N))

    async def signer() -> None:
        for _ in work:
            await one()

    await one()  # warm up (starts processes)
    cpu, wall = time.process_time(), time.perf_counter()
    await asyncio.gather(*(signer() for _ in range(CONCURRENCY)))
    print(f"{name:<22} node CPU {(time.process_time() - cpu) / N * 1e6:6.0f} µs/signature,"
          f" {N / (time.perf_counter() - wall):6.0f} signatures/s")


async def main() -> None:
    loop = asyncio.get_running_loop()

    async def inline() -> None:
        _inline(time.time())
    await _measure("inline (event loop)", inline)
    pools: list[tuple[str, Executor, object]] = [
        ("ThreadPoolExecutor(1)", ThreadPoolExecutor(1), _inline),
        ("ProcessPoolExecutor(1)", ProcessPoolExecutor(1, mp.get_context("fork"), _child_init),
         _child_sign)]
    for name, pool, fn in pools:
        async def handoff(pool=pool, fn=fn) -> None:
            await loop.run_in_executor(pool, fn, time.time())
        await _measure(name, handoff)
        pool.shutdown()
    process = SigningProcess("bench", CONFIG)

    async def own() -> None:
        await process.sign(FIELDS, BODY, "news.example", [(1, KEY_CONFIG, DER)], time.time())
    await _measure("signing process", own)
    process.close()


if __name__ == "__main__":
    uvloop.run(main())
