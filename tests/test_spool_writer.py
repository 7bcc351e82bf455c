"""One group-commit writer for both spools and one rule when a commit fails (spool/writer.py):
an acknowledgement is answered only after its commit, a failing enqueue is refused (the edge
answers 451), and an outcome is never dropped - it is retried until the database takes it.

Failures are injected with real parts, no mock of a database: a trigger that refuses the write
(both backends) and, on PostgreSQL, the writer's connection terminated by the server in the
middle of its commit."""

from __future__ import annotations

import asyncio
import smtplib
import sqlite3
import time

import asyncpg
import pytest

from postlane.accounting.records import Record
from postlane.spool import PostgresSpool, RecipientUpdate, SpoolUnavailable, SQLiteSpool, State
from tests.conftest import config_text, message, send
from tests.support.pg import PG_DSN, pg_schema  # noqa: F401  (fixture)
from tests.support.waiting import until
from tests.test_store_contract import make_message


class Fault:
    """A trigger that makes every ``op`` on ``table`` fail, until removed."""

    def __init__(self, spool: SQLiteSpool | PostgresSpool) -> None:
        self.spool = spool

    async def install(self, table: str, op: str) -> None:
        if isinstance(self.spool, SQLiteSpool):
            with sqlite3.connect(self.spool.path) as db:
                db.execute(f"CREATE TRIGGER fault BEFORE {op} ON {table}"
                           " BEGIN SELECT RAISE(ABORT, 'injected fault'); END")
            return
        await self._pg(
            "CREATE FUNCTION fault() RETURNS trigger LANGUAGE plpgsql AS"
            " $$ BEGIN RAISE EXCEPTION 'injected fault'; END $$;"
            f" CREATE TRIGGER fault BEFORE {op} ON {table} FOR EACH ROW EXECUTE FUNCTION fault()")

    async def remove(self, table: str) -> None:
        if isinstance(self.spool, SQLiteSpool):
            with sqlite3.connect(self.spool.path) as db:
                db.execute("DROP TRIGGER fault")
            return
        await self._pg(f"DROP TRIGGER fault ON {table}; DROP FUNCTION fault()")

    async def _pg(self, sql: str) -> None:
        conn = await asyncpg.connect(PG_DSN, server_settings={
            "search_path": f'"{self.spool.schema}"'})
        try:
            await conn.execute(sql)
        finally:
            await conn.close()


@pytest.fixture(params=["sqlite", "postgres"])
def open_spool(request, tmp_path):
    """A function opening (again) the same spool; PostgreSQL gets its own schema."""
    if request.param == "sqlite":
        return lambda: SQLiteSpool(tmp_path / "spool")
    schema = request.getfixturevalue("pg_schema")
    return lambda: PostgresSpool(PG_DSN, schema)


def delivered(msg_id: str, idx: int) -> RecipientUpdate:
    return RecipientUpdate(msg_id, idx, State.DELIVERED, 1, 0.0, "250 2.0.0 ok")


def d_record(msg_id: str) -> Record:
    return Record(type="d", time_logged=time.time(), time_queued=time.time(), orig="f@x.test",
                  rcpt="r0@example.com", queue_id=msg_id, cls="marketing", vmta_pool="bulk",
                  dsn_action="delivered", dsn_status="2.0.0")


async def stored_events(spool: SQLiteSpool | PostgresSpool) -> int:
    if isinstance(spool, SQLiteSpool):
        with sqlite3.connect(spool.path) as db:
            return db.execute("SELECT count(*) FROM events WHERE writer = ?",
                              (spool.writer_id,)).fetchone()[0]
    async with spool.acquire() as conn:
        return await conn.fetchval("SELECT count(*) FROM events WHERE writer = $1",
                                   spool.writer_id)


async def test_an_outcome_whose_commit_fails_is_retried_until_it_lands(open_spool):
    spool = open_spool()
    await spool.open()
    fault = Fault(spool)
    try:
        msg, rcpts, body = make_message(1)
        await spool.enqueue(msg, rcpts, body)
        await fault.install("recipients", "UPDATE")
        spool.update([delivered(msg.id, 0)], [d_record(msg.id)])
        # failed, and failed again on retry
        await until(lambda: spool.failed_commits >= 2, timeout=60, what="two failed commits")
        assert await stored_events(spool) == 0
        await fault.remove("recipients")
        await spool.flush()
        assert await stored_events(spool) == 1, "the outcome's record landed with it"
    finally:
        await spool.close()
    again = open_spool()
    await again.open()
    try:
        pending = await again.pending()
        assert [(r.msg.id, r.idx) for r in pending.recipients] == [(msg.id, 1)]
    finally:
        await again.close()


async def test_a_failing_enqueue_is_refused_and_the_outcomes_beside_it_are_kept(open_spool):
    spool = open_spool()
    await spool.open()
    fault = Fault(spool)
    try:
        first, rcpts, body = make_message(1)
        await spool.enqueue(first, rcpts, body)
        await fault.install("messages", "INSERT")
        spool.update([delivered(first.id, 0)], [d_record(first.id)])
        second, rcpts2, body2 = make_message(2)
        with pytest.raises(SpoolUnavailable):  # no acknowledgement without its commit
            await spool.enqueue(second, rcpts2, body2)
        with pytest.raises(SpoolUnavailable):
            await spool.enqueue(second, rcpts2, body2, urgent=True)
        await fault.remove("messages")
        await spool.flush()
        assert await stored_events(spool) == 1
    finally:
        await spool.close()
    again = open_spool()
    await again.open()
    try:
        pending = await again.pending()
        assert [m.id for m in pending.messages] == [first.id], "the refused message is not kept"
        assert [(r.msg.id, r.idx) for r in pending.recipients] == [(first.id, 1)]
    finally:
        await again.close()


async def test_a_connection_terminated_in_the_middle_of_a_commit_loses_no_outcome(
        pg_schema):  # noqa: F811
    """The server ends the writer's connection inside its transaction (once: a sequence is not
    rolled back); the outcome commits on a new connection."""
    spool = PostgresSpool(PG_DSN, pg_schema)
    await spool.open()
    try:
        msg, rcpts, body = make_message(1)
        await spool.enqueue(msg, rcpts, body)
        async with spool.acquire() as conn:
            await conn.execute(
                "CREATE SEQUENCE fault_seq; CREATE FUNCTION fault() RETURNS trigger"
                " LANGUAGE plpgsql AS $$ BEGIN IF nextval('fault_seq') = 1 THEN"
                " PERFORM pg_terminate_backend(pg_backend_pid()); END IF; RETURN NEW; END $$;"
                " CREATE TRIGGER fault BEFORE UPDATE ON recipients FOR EACH ROW"
                " EXECUTE FUNCTION fault()")
        spool.update([delivered(msg.id, 0)], [d_record(msg.id)])
        await until(lambda: spool.failed_commits >= 1, timeout=60, what="a failed commit")
        await spool.flush()
        async with spool.acquire() as conn:
            state = await conn.fetchval("SELECT state FROM recipients WHERE msg_id = $1"
                                        " AND idx = 0", msg.id)
        assert state == "delivered"
        assert await stored_events(spool) == 1
    finally:
        await spool.close()


async def test_the_edge_answers_451_while_the_spool_cannot_commit_and_250_after(
        tmp_path, sink, make_node):
    node = await make_node(config_text(tmp_path, sink.port))
    fault = Fault(node.spool)
    port = node.listeners[0].port
    await fault.install("messages", "INSERT")
    with pytest.raises(smtplib.SMTPDataError) as refused:
        await send(port, "sender@insurer.test", ["a@example.com"], message("refused"))
    assert refused.value.smtp_code == 451
    await fault.remove("messages")
    await send(port, "sender@insurer.test", ["a@example.com"], message("accepted"))
    await sink.wait_for(1, timeout=30)
    assert [b"Subject: accepted" in a.data for a in sink.arrivals] == [True]


async def test_a_wait_behind_outcomes_that_cannot_commit_is_answered_not_left_hanging(
        open_spool):
    """More outcomes wait than one commit takes (a full disk with a queue draining into it):
    each failed commit puts them first again, so a flush or an enqueue behind them was never
    reached - a drain (SIGTERM) hung until the disk had room. Now every wait queued at a
    failed commit is answered with SpoolUnavailable; the outcomes are kept and land later."""
    spool = open_spool()
    await spool.open()
    fault = Fault(spool)
    try:
        msg, rcpts, body = make_message(1)
        await spool.enqueue(msg, rcpts, body)
        await fault.install("events", "INSERT")
        for _ in range(2500):  # more than BATCH_MAX
            spool.record([d_record(msg.id)])
        with pytest.raises(SpoolUnavailable):
            await asyncio.wait_for(spool.flush(), 60)
        second, rcpts2, body2 = make_message(2)
        with pytest.raises(SpoolUnavailable):
            await asyncio.wait_for(spool.enqueue(second, rcpts2, body2), 60)
        await fault.remove("events")
        await asyncio.wait_for(_flushed(spool), 60)
        assert await stored_events(spool) == 2500
    finally:
        await spool.close()


async def _flushed(spool: SQLiteSpool | PostgresSpool) -> None:
    """Flush once the spool commits again (a flush queued during a failure is refused)."""
    while True:
        try:
            await spool.flush()
            return
        except SpoolUnavailable:
            continue
