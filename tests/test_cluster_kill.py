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
import smtplib
import threading
import time

import psycopg

from postlane.feedback.dsn import FailedRecipient, build_bounce
from tests.conftest import message, send
from tests.support.pg import PG_DSN, pg_schema  # noqa: F401  (fixture)
from tests.support.waiting import until
from tests.test_cluster import Served
from tests.test_cluster_feedback import FEEDBACK
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


def _verp(text: str) -> str:
    """The bulk pool sends with VERP return paths (a remote bounce comes back to the nodes)."""
    return text.replace("[pools.bulk]\n", '[pools.bulk]\nbounce_domain = "bounces.mta.test"\n')


def _feedback_nodes(tmp_path, sink_port: int, schema: str) -> tuple[Served, Served]:
    """Two nodes of one cluster, each with its own suppression list file (one key: the
    nodes share their ``state`` folder here)."""
    return tuple(_node(tmp_path, sink_port, schema, name, edit=_verp,  # type: ignore[return-value]
                       extra=FEEDBACK.format(db=tmp_path / f"{name}-suppression.sqlite3"))
                 for name in ("node-a", "node-b"))


async def test_a_remote_bounce_sent_again_after_a_kill_is_one_rb_record(tmp_path, sink,
                                                                       pg_schema):  # noqa: F811
    """The receiving side bounces a delivered message to its VERP address at node-a, which is
    SIGKILLed the moment the "rb" record is committed, before its 250: the reporting MTA sends
    the report again, to node-b (the bounce domain's other MX). Each node remembered the
    reports it had recorded since its own start only, so node-b wrote a second "rb": two
    remote bounces of one recipient in the trail, the pool's bounce counts and the
    exports."""
    a, b = _feedback_nodes(tmp_path, sink.port, pg_schema)
    try:
        port_a, port_b = await a.port(), await b.port()
        await send(port_a, "news@insurer.test", ["v1@example.com"],
                   message("campaign", cls="marketing"))
        [arrival] = await sink.wait_for(1)
        dsn = build_bounce(reporting_mta="mx.example.com", sender=arrival.mail_from,
                           recipients=[FailedRecipient(
                               "v1@example.com", "failed", "5.1.1",
                               "550 5.1.1 <v1@example.com>: no such user (rb-marker)",
                               "mx.example.com")],
                           original=arrival.data, arrival_date=time.time(), ret="HDRS")
        watcher = _kill_when(pg_schema, a.proc.pid, "SELECT (SELECT count(*) FROM events WHERE"
                             " position('rb-marker'::bytea in data) > 0)"
                             " + (SELECT count(*) FROM audit_records WHERE type = 'rb')")
        with contextlib.suppress(smtplib.SMTPException, OSError):
            await send(port_a, "", [arrival.mail_from], dsn)
        await _killed_at(a, watcher)
        assert await send(port_b, "", [arrival.mail_from], dsn) == {}
        await until(lambda: _drained(pg_schema), timeout=60, step=0.1,
                    what="node-a's records adopted by node-b")
    finally:
        for node in (a, b):
            await asyncio.to_thread(node.stop, signal.SIGKILL)
    rb = await _rows(pg_schema, "SELECT rcpt, dsn_status FROM audit_records WHERE type = 'rb'")
    assert [tuple(r) for r in rb] == [("v1@example.com", "5.1.1")], rb
