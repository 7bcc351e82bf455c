"""Each record once across a cluster's accounting files when a node dies for good.

A node's recorder makes its files durable (fsync) and then tells the cluster how far they got
(``writers.filed``); a node killed for good has its events adopted by another node's recorder,
which goes on from that published point. Killed between the two, the dead node's files had a
batch the cluster did not know of, and the adopter wrote it again: the same deliveries in two
nodes' files, counted twice by anyone summing them."""

from __future__ import annotations

import asyncio
import csv
import os
import signal
from collections import Counter
from pathlib import Path

import asyncpg
import pytest

from postlane.harness.killtest import _committed
from postlane.spool.outbox import cluster_position
from tests.conftest import message, send
from tests.support.pg import PG_DSN, pg_schema  # noqa: F401  (fixture)
from tests.support.waiting import until
from tests.test_cluster_truth import _node
from tests.test_crash_hunt import _recorder_pid
from tests.test_evidence import cli


def _lines(directory: Path, schema: str, node: str) -> Counter[tuple]:
    """The CSV lines of a node's files, each file up to what its recorder committed (the way
    ``postlane killtest`` and an auditor read a dead node's files)."""
    lines: Counter[tuple] = Counter()
    published = cluster_position(PG_DSN, schema, node)
    for path in sorted(directory.glob("acct-*.csv")):
        for row in csv.DictReader(_committed(directory, path, published).splitlines()):
            lines[tuple(row.values())] += 1
    return lines


@pytest.mark.parametrize("before", [0, 3], ids=["first-batch", "after-a-committed-one"])
async def test_a_node_killed_as_its_files_take_a_batch_leaves_each_record_once(
        tmp_path, sink, pg_schema, before):  # noqa: F811
    """node-a's recorder is held right where its files have a batch and the cluster has not
    been told (its update of ``writers.filed`` waits on a row lock the test holds); node-a
    and its recorder are SIGKILLed there, for good. node-b adopts node-a's events: every
    record of node-a's mail is once in the two nodes' files, and ``audit verify --files``
    finds each node's files complete and without a line twice. With ``before``, node-a's
    files committed a message's records first: node-b's files start after them."""
    a = _node(tmp_path, sink.port, pg_schema, "node-a")
    b = None
    conn = await asyncpg.connect(PG_DSN, server_settings={"search_path": f'"{pg_schema}"'})
    try:
        port = await a.port()
        writer = await conn.fetchval("SELECT writer FROM writers WHERE node = 'node-a'")
        if before:  # node-b's files have records from before node-a's first ones
            b = _node(tmp_path, sink.port, pg_schema, "node-b")
            own = [f"b{i}@example.com" for i in range(2)]
            assert await send(await b.port(), "sender@insurer.test", own, message("b")) == {}
            await sink.wait_for(1, timeout=30)
            await asyncio.to_thread(b.stop)  # node-a delivers its own mail
            b = None
            early = [f"early{i}@example.com" for i in range(before)]
            assert await send(port, "sender@insurer.test", early, message("early")) == {}

            async def committed() -> bool:
                return await conn.fetchval("SELECT filed FROM writers WHERE writer = $1",
                                           writer) >= 2 * before

            await until(committed, timeout=30, what="node-a's first records committed")
        lock = conn.transaction()
        await lock.start()
        await conn.execute("SELECT 1 FROM writers WHERE writer = $1 FOR UPDATE", writer)
        rcpts = [f"once{i}@example.com" for i in range(5)]
        assert await send(port, "sender@insurer.test", rcpts, message("once")) == {}
        await sink.wait_for(1 + 2 * bool(before), timeout=30)

        async def held() -> bool:  # the recorder waits on the row: its files have the batch
            async with asyncpg.create_pool(PG_DSN, min_size=1, max_size=1) as pool:
                if await pool.fetchval(f'SELECT count(*) FROM "{pg_schema}".events WHERE'
                                       " writer = $1", writer) < 10:
                    return False  # the deliveries' events too
                return bool(await pool.fetchval(
                    "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                    " AND application_name LIKE 'postlane-recorder/%' AND query LIKE"
                    " '%writers%'"))

        await until(held, timeout=30, what="node-a's recorder held at its publish")
        child = _recorder_pid(a.proc.pid)
        assert child is not None
        a.proc.send_signal(signal.SIGKILL)
        a.proc.wait(10)
        os.kill(child, signal.SIGKILL)
        # its UPDATE, already sent, would still run once the lock goes: killed before it
        # was sent (or the machine gone with its connection), nothing of it reaches the table
        await conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE"
                           " application_name LIKE 'postlane-recorder/%' AND datname ="
                           " current_database() AND wait_event_type = 'Lock'")
        await lock.rollback()
        if b is None:
            b = _node(tmp_path, sink.port, pg_schema, "node-b")
            await b.port()

        async def adopted() -> bool:  # node-b's recorder filed what node-a left in the outbox
            left = await conn.fetchval("SELECT count(*) FROM events WHERE writer = $1", writer)
            return left == 0

        await until(adopted, timeout=60, what="node-a's events filed by node-b")
        await asyncio.to_thread(b.stop)
        lines = Counter()
        for node in ("node-a", "node-b"):
            lines += await asyncio.to_thread(_lines, tmp_path / f"acct-{node}", pg_schema, node)
        ours = Counter({k: n for k, n in lines.items()
                        if any(v.endswith("@example.com") for v in k)})
        twice = {k: n for k, n in ours.items() if n > 1}
        assert not twice, f"{len(twice)} lines in both nodes' files: {list(twice)[:3]}"
        # an "r" and a "d" per recipient, each once
        assert len(ours) == 2 * (5 + before + 2 * bool(before)), ours
        for node in ("node-a", "node-b"):
            res = await asyncio.to_thread(cli, "verify", "-c", str(tmp_path / f"{node}.toml"),
                                          "--files")
            assert res.exit_code == 0, (node, res.output)
    finally:
        await conn.close()
        a.stop(signal.SIGKILL)
        if b is not None:
            b.stop(signal.SIGKILL)
