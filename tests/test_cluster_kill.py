"""Kill points of a cluster: two ``postlane serve`` processes on one PostgreSQL schema, one of
them SIGKILLed the moment a change it makes is committed (a thread watches the shared spool
from outside, as ``tests/test_crash_hunt.py`` does the SQLite one), and what the cluster has
done, sent and recorded once the other node has taken its work over."""

from __future__ import annotations

import asyncio
import contextlib
import email
import os
import signal
import threading
import time

import psycopg

from tests.conftest import message, send
from tests.support.pg import PG_DSN, pg_schema  # noqa: F401  (fixture)
from tests.support.waiting import until
from tests.test_cluster import Served
from tests.test_cluster_truth import _node, _rows, ops_cli


def _kill_when(schema: str, pid: int, sql: str) -> threading.Thread:
    """A thread that SIGKILLs ``pid`` the moment ``sql`` (a count, on the shared schema, read
    as another process would) is non-zero; gives up after 60 s."""

    def watch() -> None:
        with psycopg.connect(PG_DSN, autocommit=True,
                             options=f"-c search_path={schema}") as conn:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                with contextlib.suppress(psycopg.errors.UndefinedTable):  # not made yet
                    if conn.execute(sql).fetchone()[0]:
                        os.kill(pid, signal.SIGKILL)
                        return
                time.sleep(0.0002)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def _dsns(arrivals: list) -> list[str]:
    """The queue id of each DSN (from the null sender) the sink took, once per arrival."""
    return [email.message_from_bytes(a.data)["X-Postlane-Queued"].split("id=")[1]
            for a in arrivals if a.mail_from in ("", "<>")]


async def _drained(schema: str) -> bool:
    """No message left in the shared spool, and no node's records left in its outbox (the
    surviving node's recorder has adopted the killed one's)."""
    rows = await _rows(schema, "SELECT (SELECT count(*) FROM messages)"
                       " + (SELECT count(*) FROM events) AS n")
    return rows[0]["n"] == 0


async def _killed_at(node: Served, watcher: threading.Thread) -> None:
    await asyncio.to_thread(watcher.join, 60)
    await asyncio.to_thread(node.proc.wait, 30)


async def test_a_node_killed_as_a_deletes_dsn_commits_sends_one_dsn(tmp_path, sink,
                                                                    pg_schema):  # noqa: F811
    """``postlane queue delete --dsn`` on node-a, SIGKILLed the moment the DSN is committed.
    The deleted recipient's final state and "b" record were written in a commit after the
    DSN's: killed between, node-b took the recipient over, delivered it (here: refused, 550)
    and sent the sender a second DSN. The DSN and the final state are one transaction now:
    one DSN, the recipient never delivered, its "b" once."""
    sink.rcpt_replies["gone@example.com"] = ["550 5.1.1 no such user"]
    a, b = (_node(tmp_path, sink.port, pg_schema, name) for name in ("node-a", "node-b"))
    try:
        port = await a.port()
        await b.port()
        paused = await asyncio.to_thread(ops_cli, a, "pause", "bulk")
        assert paused.returncode == 0, paused.stderr
        await send(port, "notices@example.com", ["gone@example.com"], message("m"))
        [row] = await _rows(pg_schema, "SELECT id FROM messages")
        watcher = _kill_when(pg_schema, a.proc.pid,
                             "SELECT count(*) FROM messages WHERE listener = 'dsn'")
        await asyncio.to_thread(ops_cli, a, "queue", "delete", row["id"], "--dsn", "--yes")
        await _killed_at(a, watcher)
        resumed = await asyncio.to_thread(ops_cli, b, "resume", "bulk")
        assert resumed.returncode == 0, resumed.stderr
        await sink.wait_for(1, timeout=60)
        await until(lambda: _drained(pg_schema), timeout=60, step=0.1,
                    what="node-b took over and delivered what was left")
    finally:
        for node in (a, b):
            await asyncio.to_thread(node.stop, signal.SIGKILL)
    dsns = _dsns(sink.arrivals)
    assert len(dsns) == 1, f"{len(dsns)} DSNs sent: {dsns}"
    assert sink.rcpt_attempts["gone@example.com"] == 0, "a deleted recipient was delivered"
    trail = [r["type"] for r in await _rows(
        pg_schema, "SELECT type FROM audit_records WHERE rcpt = 'gone@example.com'"
        " ORDER BY seq")]
    assert sorted(trail) == ["b", "r"], trail
