"""The store contract: every spool (SQLite embedded, PostgreSQL for clusters) passes the same tests.

A node relies on exactly this: enqueue is durable on return, concurrent enqueues share commits,
state changes and cleanup survive a reopen, pause state is stored, a newer schema is refused.
"""

from __future__ import annotations

import asyncio
import time

import asyncpg
import pytest

from postlane.accounting.records import Record, pack
from postlane.spool import (
    Message,
    PostgresSpool,
    Recipient,
    RecipientUpdate,
    SQLiteSpool,
    State,
    make_spool,
)
from tests.support.pg import PG_DSN, pg_schema  # noqa: F401  (fixture)


@pytest.fixture(params=["sqlite", "postgres"])
def store_factory(request, tmp_path):
    """A function opening (again) the same store; PostgreSQL gets its own schema."""
    if request.param == "sqlite":
        return lambda: SQLiteSpool(tmp_path / "spool")
    schema = request.getfixturevalue("pg_schema")
    return lambda: PostgresSpool(PG_DSN, schema)


@pytest.fixture
async def store(store_factory):
    spool = store_factory()
    await spool.open()
    yield spool
    await spool.close()


def make_message(n: int, rcpts: int = 2, priority: int = 3, pool: str = "bulk",
                 ) -> tuple[Message, list[Recipient], bytes]:
    now = time.time()
    msg = Message(id=f"M{n:06d}", cls="marketing", pool=pool, mail_from="from@insurer.test",
                  queued_at=now + n * 1e-6, deadline=now + 3600, expire_at=now + 86400,
                  priority=priority, size=10, envid=f"env{n}", correlation_id=f"corr{n}",
                  message_id=f"<{n}@test>", listener="in", client="127.0.0.1")
    rs = [Recipient(msg=msg, idx=i, address=f"r{i}@example.com", domain="example.com",
                    notify="FAILURE") for i in range(rcpts)]
    msg.remaining = rcpts
    return msg, rs, f"Subject: {n}\r\n\r\nbody {n}\r\n".encode()


async def test_enqueued_message_survives_reopen(store_factory, store):
    msg, rcpts, body = make_message(1)
    await store.enqueue(msg, rcpts, body)
    assert store.body(msg.id) == body
    await store.close()
    again = store_factory()
    await again.open()
    try:
        pending = await again.pending()
        assert [m.id for m in pending.messages] == [msg.id]
        got = pending.messages[0]
        assert (got.envid, got.correlation_id, got.message_id, got.priority, got.pool) == (
            "env1", "corr1", "<1@test>", 3, "bulk")
        assert got.remaining == 2
        assert [(r.idx, r.address, r.notify, r.state) for r in pending.recipients] == [
            (0, "r0@example.com", "FAILURE", State.QUEUED),
            (1, "r1@example.com", "FAILURE", State.QUEUED)]
        assert again.body(msg.id) == body
    finally:
        await again.close()


async def test_the_smtputf8_flag_survives_reopen(store_factory, store):
    """Whether the client asked for SMTPUTF8 decides where the message may go (RFC 6531 3.2):
    it was not stored, and a restart (or another node) sent it as plain 8-bit mail."""
    msg, rcpts, body = make_message(1)
    plain, prcpts, pbody = make_message(2)
    msg.smtputf8 = True
    await store.enqueue(msg, rcpts, body)
    await store.enqueue(plain, prcpts, pbody)
    await store.close()
    again = store_factory()
    await again.open()
    try:
        pending = await again.pending()
        assert {m.id: m.smtputf8 for m in pending.messages} == {msg.id: True, plain.id: False}
        if isinstance(again, SQLiteSpool):  # the paged reads (ROW) carry it too
            rows = await again.scan()
            assert {row[0]: bool(row[26]) for row in rows} == {msg.id: True, plain.id: False}
    finally:
        await again.close()


async def test_updates_and_finish_are_durable(store_factory, store):
    a, ra, ba = make_message(1)
    b, rb, bb = make_message(2)
    await store.enqueue(a, ra, ba)
    await store.enqueue(b, rb, bb)
    store.update([RecipientUpdate(a.id, 0, State.DELIVERED, 1, 0.0, "250 ok")])
    store.update([RecipientUpdate(a.id, 1, State.DEFERRED, 1, 123.0, "451 later")])
    store.update([RecipientUpdate(b.id, 0, State.DELIVERED, 1, 0.0, "250 ok"),
                  RecipientUpdate(b.id, 1, State.BOUNCED, 1, 0.0, "550 no")])
    store.finish(b.id)
    await store.flush()
    await store.close()
    again = store_factory()
    await again.open()
    try:
        pending = await again.pending()
        assert [m.id for m in pending.messages] == [a.id]
        [r] = pending.recipients
        assert (r.idx, r.state, r.attempts, r.next_attempt, r.last_reply) == (
            1, State.DEFERRED, 1, 123.0, "451 later")
        with pytest.raises(KeyError):
            again.body(b.id)
    finally:
        await again.close()


async def test_message_with_all_recipients_final_is_cleaned_up_on_pending(store_factory, store):
    msg, rcpts, body = make_message(1, rcpts=1)
    await store.enqueue(msg, rcpts, body)
    store.update([RecipientUpdate(msg.id, 0, State.DELIVERED, 1, 0.0, "250 ok")])
    await store.flush()  # crashed before finish()
    pending = await store.pending()
    assert pending.messages == [] and pending.recipients == []


async def test_concurrent_enqueues_share_commits(store):
    before = store.stats.commits
    msgs = [make_message(i, rcpts=1) for i in range(200)]
    await asyncio.gather(*(store.enqueue(m, r, b) for m, r, b in msgs))
    assert len((await store.pending()).messages) == 200
    assert store.stats.commits - before < 200, "group commit: fewer transactions than messages"


async def test_urgent_and_bulk_both_land(store):
    bulk = [make_message(i, rcpts=1) for i in range(50)]
    urgent = make_message(99, rcpts=1, priority=0, pool="critical")
    await asyncio.gather(*(store.enqueue(m, r, b) for m, r, b in bulk),
                         store.enqueue(*urgent, urgent=True))
    pending = await store.pending()
    assert {m.id for m in pending.messages} == {m.id for m, _, _ in bulk} | {urgent[0].id}


async def test_pause_state_is_stored(store_factory, store):
    await store.set_paused("bulk", "*", True)
    await store.set_paused("bulk", "example.com", True)
    await store.set_paused("bulk", "*", False)
    await store.set_paused("other", "*", False)  # resuming what is not paused is harmless
    assert await store.paused() == {("bulk", "example.com")}
    await store.close()
    again = store_factory()
    await again.open()
    try:
        assert await again.paused() == {("bulk", "example.com")}
    finally:
        await again.close()


async def test_an_event_is_found_by_its_bytes_while_the_outbox_has_it(store):
    """``has_event``: a record written again after a crash is looked for in the outbox."""
    rec = Record("o", 1.5, 1.5, "", "a@example.com", "", "", "", dsn_action="suppress")
    assert not await store.has_event(pack(rec))
    store.record([rec])
    await store.flush()
    assert await store.has_event(pack(rec))
    other = Record("o", 1.5, 1.5, "", "b@example.com", "", "", "", dsn_action="suppress")
    assert not await store.has_event(pack(other))


async def test_reopen_keeps_data_and_refuses_a_newer_schema(store_factory, store):
    msg, rcpts, body = make_message(1)
    await store.enqueue(msg, rcpts, body)
    await store.close()
    again = store_factory()
    await again.open()  # migrations are idempotent
    assert len((await again.pending()).messages) == 1
    await again.close()
    await _bump_schema(again)
    newer = store_factory()
    with pytest.raises(RuntimeError, match="newer than this Postlane"):
        await newer.open()


async def _bump_schema(spool) -> None:
    if isinstance(spool, SQLiteSpool):
        import sqlite3
        conn = sqlite3.connect(spool.path)
        conn.execute("UPDATE meta SET value='999' WHERE key='schema_version'")
        conn.commit()
        conn.close()
        return
    conn = await asyncpg.connect(PG_DSN)
    try:
        await conn.execute(f'INSERT INTO "{spool.schema}".schema_migrations (version)'
                           " VALUES (999)")
    finally:
        await conn.close()


def test_spool_location_selects_the_backend(tmp_path):
    assert isinstance(make_spool(str(tmp_path)), SQLiteSpool)
    pg = make_spool("postgresql://postgres@127.0.0.1/test", "mine")
    assert isinstance(pg, PostgresSpool) and pg.schema == "mine"
