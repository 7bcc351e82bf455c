"""Kill points the killtest and ``test_crash_repair.py`` do not reach: a node SIGKILLed in the
middle of an operator's action on many messages (the moment its first change is on disk), and
what it has done and recorded after its restart."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import threading
import time
from collections import Counter
from pathlib import Path

import httpx

from tests.conftest import message, records, send
from tests.support.waiting import until
from tests.test_crash_repair import _APINode
from tests.test_evidence import cli

MESSAGES, PER_MESSAGE = 3, 1000
"""3,000 recipients: more than one commit of the spool's writer takes (``BATCH_MAX``)."""


def _queued(tmp_path: Path) -> int:
    db = sqlite3.connect(tmp_path / "spool" / "spool.sqlite")
    try:
        return db.execute("SELECT count(*) FROM recipients WHERE state = 'queued'").fetchone()[0]
    finally:
        db.close()


def _kill_at_first_change(tmp_path: Path, pid: int, total: int) -> threading.Thread:
    """A thread that SIGKILLs ``pid`` the moment the spool on disk has fewer than ``total``
    queued recipients (the action's first commit), reading the database as another process
    would; gives up after 60 s."""

    def watch() -> None:
        db = sqlite3.connect(tmp_path / "spool" / "spool.sqlite", isolation_level=None)
        try:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                (n,) = db.execute(
                    "SELECT count(*) FROM recipients WHERE state = 'queued'").fetchone()
                if n < total:
                    os.kill(pid, signal.SIGKILL)
                    return
                time.sleep(0.0005)
        finally:
            db.close()

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


async def _killed_in_the_middle(tmp_path: Path, action: str) -> None:
    """3,000 recipients of the paused pool, ``action`` (purge of the lane, or delete of
    every message) asked over the API and the node SIGKILLed as soon as the first of its
    changes is on disk: the action is all done or not at all, never a part, and each
    recipient's record says which after the restart."""
    total = MESSAGES * PER_MESSAGE
    async with _APINode(tmp_path) as node:
        client = node.client
        assert (await client.post("/pools/bulk/pause", json={})).status_code == 200
        for i in range(MESSAGES):
            rcpts = [f"m{i}-{j}@example.com" for j in range(PER_MESSAGE)]
            assert await send(node.port, "s@insurer.test", rcpts, message(f"m{i}")) == {}
        await until(lambda: _queued(tmp_path) == total, what="all queued on disk")
        watcher = _kill_at_first_change(tmp_path, node.proc.pid, total)
        try:
            if action == "purge":
                answer = await client.post("/pools/bulk/lanes/example.com/purge", json={})
            else:
                answer = await client.post("/queue/delete", json={"all": True})
            assert answer.status_code == 200, answer.text  # answered before the kill
        except httpx.HTTPError:
            pass  # killed before the answer
        await asyncio.to_thread(watcher.join, 60)
        await asyncio.to_thread(node.proc.wait)
        left = _queued(tmp_path)
        assert left in (0, total), f"{action} killed half-way: {total - left} of {total} done"
        await node.restart()
        await until(lambda: sum(r["type"] in "rb" for r in records(tmp_path))
                    == total + (total - left), what="the records filed")
    rows = records(tmp_path)
    finals = Counter(r["rcpt"] for r in rows if r["type"] == "b")
    assert len(finals) == total - left and set(finals.values()) <= {1}
    res = await asyncio.to_thread(cli, "verify", "-c", str(node.cfg), "--files")
    assert res.exit_code == 0, res.output


async def test_a_lane_purge_killed_in_the_middle_is_all_or_nothing(tmp_path):
    """A purge of 3,000 recipients was one spool write per recipient, in commits of 2,000:
    a node killed between them had purged a part of the lane (with their records), the rest
    queued, while the operator had no answer either way."""
    await _killed_in_the_middle(tmp_path, "purge")


async def test_a_delete_of_many_messages_killed_in_the_middle_is_all_or_nothing(tmp_path):
    await _killed_in_the_middle(tmp_path, "delete")

