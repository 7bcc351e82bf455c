"""The shared spool of a cluster: PostgreSQL through asyncpg, with group commit and leases.

Same contract as the SQLite spool (``base.Spool``), plus what several nodes need to share one
queue, each in its own module and mixed into ``PostgresSpool``: ``leases.py`` (``claim`` hands a
node the most urgent ready recipients of a pool under a lease, ``release`` gives them back),
``membership.py`` (a node's ``session`` and ``heartbeat``; once a dead node's session has closed
and its heartbeat is a few seconds old, ``reap`` gives its work back and the others claim it),
``tokens.py`` (shared rate buckets); ``pgschema.py`` holds the migrations, ``pgsql.py`` what
they all share (reaching the database, its clock, columns and rows).

Why one writer task: enqueues that arrive while a commit is in flight are gathered into the next
transaction, so many acknowledgements share one WAL flush (PostgreSQL's ``synchronous_commit``
makes each COMMIT durable). Urgent (transactional) writes are taken before bulk ones.

Lease times use the database's clock (``clock_timestamp()``), so node clocks never decide who owns
a row; retry times (``next_attempt``) come from the node that deferred the recipient.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import ClassVar

import asyncpg

from ..accounting.records import Record, pack, unpack
from ..address import address_key
from ..health import Health
from .base import (
    FINAL_STATES,
    Message,
    Pending,
    Recipient,
    RecipientUpdate,
    State,
    message_row,
    new_writer_id,
    update_rows,
)
from .cache import BodyCache
from .leases import Leases
from .membership import SESSION_SETTINGS, Membership, NodeConflict, NodeInfo
from .outbox import writer_lock_key
from .pgschema import MIGRATIONS, SCHEMA_VERSION, migrate
from .pgsql import (
    CONNECT_TIMEOUT,
    LOAD_COLS,
    MSG_COLS,
    NOW,
    OPEN,
    RCPT_COLS,
    UNREACHABLE,
    message_of,
    recipient_of,
    redact,
)
from .requests import RetryRequests
from .suppressions import SharedFeedback, SuppressionChange
from .tokens import Tokens
from .writer import (
    Batch,
    CommitStats,
    Enqueue,
    Finish,
    GroupCommitWrites,
    Op,
    Operate,
    WriteQueue,
    settle,
)

__all__ = ["CONNECT_TIMEOUT", "MIGRATIONS", "SCHEMA_VERSION", "SESSION_SETTINGS", "UNREACHABLE",
           "NodeConflict", "NodeInfo", "PostgresSpool", "SuppressionChange", "redact"]
"""``PostgresSpool`` and, for its users, the names of its parts they need."""

log = logging.getLogger("postlane.spool")

OUTCOME_DELAY = 0.02
"""Seconds outcome writes wait for company when nobody waits on them: a commit costs about five
round trips. Measured: 2,000 messages through one node took 23.5 s committing each outcome at
once, 19.2 s with this delay (under cProfile, on the shared 2-core machine: indicative only)."""


FINAL_VALUES = frozenset(s.value for s in FINAL_STATES)
"""``FINAL_STATES`` as stored (the first item of ``base.update_rows``)."""


_UPPER = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
_NOT_LITERAL = frozenset("ik;`")
"""ASCII characters of an ``address_key`` that a stored address may spell with a non-ASCII
one: İ (i + U+0307), the Kelvin sign, the Greek question mark and varia (the only code points
whose NFC-lower-cased form holds ASCII; a test checks)."""


def _address_like(key: str) -> tuple[str, str]:
    """The domain and a LIKE pattern that every stored spelling of the mailbox ``key``
    (``address_key``) matches once its ASCII letters are lower-cased (``translate``, the same
    under any ``LC_CTYPE``; ``lower()`` folds ASCII only under ``C``): the key's local part with
    each character a stored spelling may write otherwise (non-ASCII, ``_NOT_LITERAL``) as
    ``%``. A narrowing, not the comparison: the caller compares keys."""
    local, at, domain = key.rpartition("@")
    if not at:  # ``postmaster``: its own "domain" (``intake.domain_of``)
        local = domain
    out: list[str] = []
    for ch in local:
        if not ch.isascii() or ch in _NOT_LITERAL:
            if not out or out[-1] != "%":
                out.append("%")
        else:
            out.append("\\" + ch if ch in "%_\\" else ch)
    return domain, "".join(out) + ("@%" if at else "")


def _key_of(address: str) -> str | None:
    """``address_key`` of a stored address; None for one it cannot take."""
    try:
        return address_key(address)
    except Exception:  # noqa: BLE001 - a stored text the key cannot take matches nothing
        return None


class PostgresSpool(GroupCommitWrites, Leases, Membership, RetryRequests, SharedFeedback,
                     Tokens):
    """Spool in PostgreSQL schema ``schema`` of the database at ``dsn``."""

    HEALTH_KEY: ClassVar[str] = "database"

    def __init__(self, dsn: str, schema: str = "postlane", node: str = "",
                 health: Health | None = None) -> None:
        self.dsn = dsn
        self.schema = schema
        self.node = node
        self.writer_id = new_writer_id(node)
        self.events_written = 0
        """The number of this writer's last committed event."""
        self.work_channel = f"{schema}_work"
        self.pause_channel = f"{schema}_pause"
        self.retry_channel = f"{schema}_retry"
        self.app_name = f"postlane/{schema}"
        """``application_name`` of this spool's connections, as pg_stat_activity shows them."""
        self._pool: asyncpg.Pool | None = None
        self._life: asyncpg.Connection | None = None
        self._writer: asyncio.Task | None = None
        self._writes = WriteQueue()
        self._wake = asyncio.Event()
        self._stopping = False
        self._cache = BodyCache()
        self._live: dict[str, Message] = {}
        """Messages with recipients this node holds (claimed or loaded by ``pending``)."""
        self._live_bodies: dict[str, bytes] = {}
        self.stats = CommitStats()
        self.health = health if health is not None else Health()
        """Where the database going away and coming back is told (the node's)."""
        self.down = False
        self.on_reachability: Callable[[bool], None] | None = None
        """Called when the database goes away (False) and when it answers again (True)."""
        self._slices: Callable[[Sequence[Record]], list[tuple]] | None = None
        self._part = 0
        """The ``part`` of the last slices written (``write_slices``)."""

    def notify_reachability(self, fn: Callable[[bool], None]) -> None:
        """Call ``fn`` when the database goes away (False) and answers again (True): the
        claimer, built after the spool (it needs it), registers at its start."""
        self.on_reachability = fn

    def write_slices(self, fn: Callable[[Sequence[Record]], list[tuple]]) -> None:
        """Write, in each commit, the ``monitor_slices`` rows ``fn`` makes of its events
        (class, second, finals, buckets, counts: the cluster monitor's). In the transaction
        that records the outcomes, so the cluster's totals count an outcome exactly when it is
        committed: a node killed after its commit has it counted, one killed before has it
        delivered again by another node, which counts it then (they were published from
        memory once a second, and a SIGKILL lost the last second or two for good)."""
        self._slices = fn

    # -- lifecycle ------------------------------------------------------------------------------

    async def open(self) -> None:
        """Connect and bring the schema up to date (one node at a time, under an advisory lock)."""
        try:
            conn = await asyncpg.connect(self.dsn, timeout=CONNECT_TIMEOUT)
        except (TimeoutError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError,
                ValueError) as exc:
            raise ConnectionError(f"cannot open the PostgreSQL spool at {redact(self.dsn)}:"
                                  f" {exc}") from None
        try:
            await migrate(conn, self.schema)
        finally:
            await conn.close()
        # min_size 0: asyncpg keeps no connection floor, which it would try to restore with a
        # traceback a second while the database is away (used connections stay pooled anyway)
        self._pool = await asyncpg.create_pool(
            self.dsn, min_size=0, max_size=4, timeout=CONNECT_TIMEOUT,
            server_settings={"search_path": f'"{self.schema}"', "application_name": self.app_name})
        # held for this spool's life: while it is, no other node's recorder feeds our events
        # (taken before the writer is listed, so nobody can take it first)
        self._life = await asyncpg.connect(self.dsn, timeout=CONNECT_TIMEOUT, server_settings={
            "application_name": self.app_name, "search_path": f'"{self.schema}"'})
        await self._life.execute("SELECT pg_advisory_lock(hashtextextended($1, 0))",
                                 writer_lock_key(self.schema, self.writer_id))
        await self._life.execute(f"INSERT INTO writers VALUES ($1, $2, {NOW}, 0)",
                                 self.writer_id, self.node)
        self._stopping = False
        self._writer = asyncio.get_running_loop().create_task(self._run())

    async def close(self) -> None:
        self._stopping = True
        self._wake.set()
        if self._writer is not None:
            await self._writer
            self._writer = None
        if self._life is not None:
            with contextlib.suppress(OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
                await self._life.execute(
                    "DELETE FROM writers w WHERE writer = $1 AND NOT EXISTS"
                    " (SELECT 1 FROM events e WHERE e.writer = $1)", self.writer_id)
                await self._life.close()
            self._life = None
        if self._pool is not None:
            await self._pool.close()
            self._pool = None

    @contextlib.asynccontextmanager
    async def acquire(self) -> AsyncIterator[asyncpg.Connection]:
        """A pooled connection. Every use tells ``health`` whether the database answered, so
        an outage is logged once when the first call fails and once when one works again."""
        assert self._pool is not None, "spool is not open"
        try:
            async with self._pool.acquire() as conn:
                yield conn
        except UNREACHABLE as exc:
            self.unreachable(exc)
            raise
        self.reachable()

    # -- writes ---------------------------------------------------------------------------------

    def _submit(self, op: Op, urgent: bool) -> None:
        self._writes.put(op, urgent)
        self._wake.set()

    async def enqueue(self, msg: Message, rcpts: list[Recipient], body: bytes,
                      urgent: bool = False, events: Sequence[Record] = (),
                      finals: Sequence[RecipientUpdate] = ()) -> None:
        """Return once the message, its recipients and ``events`` are committed."""
        fut = asyncio.get_running_loop().create_future()
        row = message_row(msg)
        rrows = [(msg.id, r.idx, r.address, r.domain, r.orcpt, r.notify, r.state.value,
                  r.attempts, r.next_attempt, r.last_reply, msg.pool, msg.priority, msg.deadline,
                  msg.cls) for r in rcpts]
        self._submit(Enqueue(row, (msg.id, body), rrows, events, fut,
                             update_rows(list(finals))), urgent)
        await fut
        self._cache.put(msg.id, body)

    def finish(self, msg_id: str) -> None:
        """This node is done with a message; it is deleted once no node has work left on it."""
        self.finish_shared(msg_id)
        self._live.pop(msg_id, None)
        self._live_bodies.pop(msg_id, None)
        self._cache.pop(msg_id)

    def finish_shared(self, msg_id: str) -> None:
        """The message is deleted once no node has work left on it (this node's own copy of
        it, if it holds other recipients of it, is left alone)."""
        self._submit(Finish(msg_id), False)

    async def _run(self) -> None:
        """The writer task: commit what is queued, a batch at a time (``writer.py`` says what
        a failed commit does)."""
        assert self._pool is not None
        writes = self._writes
        while True:
            if not writes:
                if self._stopping:
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            if not writes.waiters and not self._stopping:
                await asyncio.sleep(OUTCOME_DELAY)
            ops = writes.take()
            batch = Batch.of(ops)
            error: BaseException | None = None
            started = time.perf_counter()
            try:
                async with self.acquire() as conn:
                    await self._commit(conn, batch)
                self.stats.committed(time.perf_counter() - started, len(ops))
            except Exception as exc:  # a failed commit must fail every waiter, not hang them
                error = exc
                if not self.down:  # an outage is told once by ``unreachable``
                    log.error("spool commit of %d operations failed: %s: %s", len(ops),
                              type(exc).__name__, exc)
            settle(batch.waiters, error)
            delay = writes.committed(ops, error, self._stopping)
            settle(writes.refused, error)
            writes.refused = []
            if delay is None:
                return
            if delay:  # the database is away (failover?): back off, then retry
                await asyncio.sleep(delay)

    def unreachable(self, exc: BaseException) -> None:
        """A statement failed: the database is away (logged once, until ``reachable``)."""
        if self.down:
            return
        self.down = True
        self.health.begin(self.HEALTH_KEY, "database", "PostgreSQL spool unreachable",
                          cause=f"{type(exc).__name__}: {exc}", level=logging.ERROR,
                          effect="intake answers 451 4.3.0; no new delivery starts, and the"
                                 " outcomes of those under way are kept until it is back")
        if self.on_reachability is not None:
            self.on_reachability(False)

    def reachable(self) -> None:
        """A statement succeeded: ends an outage begun by ``unreachable``."""
        if not self.down:
            return
        self.down = False
        self.health.end(self.HEALTH_KEY)
        if self.on_reachability is not None:
            self.on_reachability(True)

    async def _commit(self, conn: asyncpg.Connection, batch: Batch) -> None:
        msgs, upds, marks, pauses = batch.messages, batch.updates, batch.marks, batch.pauses
        fins = list(batch.finished)
        # a DSN's reported recipients, final in its commit: their message goes with them when
        # nothing of it is left open (a Finish after it was a commit of its own, and a node
        # killed between left the message in the shared spool, which no other node sweeps)
        fins.extend({u[4] for op in batch.ops if isinstance(op, Enqueue) for u in op.updates
                     if u[0] in FINAL_VALUES})
        events = list(batch.events)  # an operator's action adds the records of what it moved
        first = self.events_written + 1
        async with conn.transaction():
            if msgs:
                await conn.executemany(
                    f"INSERT INTO messages ({MSG_COLS}) VALUES"
                    f" ({', '.join(f'${i}' for i in range(1, 18))})", msgs)
                await conn.executemany("INSERT INTO bodies (id, data) VALUES ($1, $2)",
                                       batch.bodies)
                await conn.executemany(
                    f"INSERT INTO recipients ({RCPT_COLS}, pool, priority, deadline, cls)"
                    f" VALUES ({', '.join(f'${i}' for i in range(1, 15))})",
                    batch.recipients)
                await conn.execute("SELECT pg_notify($1, $2)", self.work_channel,
                                   ",".join(sorted({m[2] for m in msgs})))
            if upds:
                # a final state is never overwritten: a node that lost its lease to a stall
                # must not revive a recipient another node has delivered meanwhile
                await conn.executemany(
                    "UPDATE recipients SET state=$1, attempts=$2, next_attempt=$3, last_reply=$4,"
                    " attempt_started=NULL, attempt_info=NULL"
                    f" WHERE msg_id=$5 AND idx=$6 AND state IN {OPEN}", upds)
            if marks:
                await conn.executemany(
                    "UPDATE recipients SET attempt_started=$1, attempt_info=$2"
                    " WHERE msg_id=$3 AND idx=$4", marks)
            if batch.pends:
                await conn.executemany("UPDATE recipients SET pending=$1 WHERE msg_id=$2"
                                       " AND idx=$3", batch.pends)
            for op in batch.operations:
                op.moved[:] = await self._operate(conn, op.recipients, op.state, op.states)
                events.extend(op.records(op.moved))
                if op.state in FINAL_STATES:
                    fins.extend({r.msg.id for r in op.moved})
            if events:
                writer = self.writer_id
                await conn.copy_records_to_table(
                    "events", records=[(writer, n, pack(rec))
                                       for n, rec in enumerate(events, first)])
                slices = self._slices(events) if self._slices is not None else None
                if slices:  # each commit's its own ``part`` of its seconds (the wall-clock ms)
                    self._part = part = max(self._part + 1, int(time.time() * 1000))
                    await conn.executemany(
                        "INSERT INTO monitor_slices (node, cls, at, part, finals, buckets,"
                        " counts) VALUES ($1, $2, $3, $4, $5, $6, $7)",
                        [(self.node, cls, at, part, finals, buckets, counts)
                         for cls, at, finals, buckets, counts in slices])
            for writer, n in batch.trims.items():
                await conn.execute("DELETE FROM events WHERE writer=$1 AND n<=$2", writer, n)
                await conn.execute("DELETE FROM writers WHERE writer=$1 AND writer<>$2 AND NOT"
                                   " EXISTS (SELECT 1 FROM events WHERE writer=$1)",
                                   writer, self.writer_id)
            if fins:
                # Lock the message rows first: a second statement then sees recipients finished
                # concurrently on other nodes, so the last node to finish deletes the message.
                await conn.execute("SELECT id FROM messages WHERE id = ANY($1::text[])"
                                   " ORDER BY id FOR UPDATE", fins)
                await conn.execute(
                    "DELETE FROM messages m WHERE m.id = ANY($1::text[]) AND NOT EXISTS"
                    f" (SELECT 1 FROM recipients r WHERE r.msg_id = m.id AND r.state IN {OPEN})",
                    fins)
            for pool, domain, paused in pauses:
                if paused:
                    await conn.execute("INSERT INTO paused VALUES ($1, $2) ON CONFLICT DO NOTHING",
                                       pool, domain)
                else:
                    await conn.execute("DELETE FROM paused WHERE pool=$1 AND domain=$2",
                                       pool, domain)
            if pauses:
                await conn.execute("SELECT pg_notify($1, '')", self.pause_channel)
        self.events_written += len(events)

    async def _operate(self, conn: asyncpg.Connection, rcpts: list[Recipient], state: State,
                       states: Sequence[State]) -> list[Recipient]:
        rows = await conn.fetch(
            "UPDATE recipients r SET state = $1, lease_owner = NULL, lease_until = NULL,"
            " pending = '',"
            " next_attempt = CASE WHEN $1 = 'held' THEN r.next_attempt ELSE 0 END"
            " FROM unnest($2::text[], $3::int[]) AS k (msg_id, idx)"
            " WHERE r.msg_id = k.msg_id AND r.idx = k.idx AND r.state = ANY($4::text[])"
            " AND (r.lease_owner IS NULL OR r.lease_owner = $5) RETURNING r.msg_id, r.idx, r.pool",
            state.value, [r.msg.id for r in rcpts], [r.idx for r in rcpts],
            [s.value for s in states], self.node)
        if state is State.QUEUED and rows:  # claimable again: the claimers look at once
            await conn.execute("SELECT pg_notify($1, $2)", self.work_channel,
                               ",".join(sorted({r["pool"] for r in rows})))
        got = {(r["msg_id"], r["idx"]) for r in rows}
        return [r for r in rcpts if (r.msg.id, r.idx) in got]

    # -- reads ----------------------------------------------------------------------------------

    def body(self, msg_id: str) -> bytes:
        """The bytes of a message this node holds (claimed ones are always in memory)."""
        body = self._live_bodies.get(msg_id)
        if body is None:
            body = self._cache.get(msg_id)
        if body is None:
            raise KeyError(msg_id)
        return body

    async def _load(self, conn: asyncpg.Connection, rows: list) -> list[Recipient]:
        """Recipients from rows, sharing one Message per message (loaded with its body once)."""
        missing = list({r["msg_id"] for r in rows} - self._live.keys())
        if missing:
            # bodies this node accepted itself are still in its cache: do not fetch them again
            cached = {m: b for m in missing if (b := self._cache.get(m)) is not None}
            uncached = [m for m in missing if m not in cached]
            cols = ", ".join("m." + c.strip() for c in MSG_COLS.split(","))
            rows_m = []
            if cached:
                rows_m += await conn.fetch(f"SELECT {cols}, NULL::bytea AS data FROM messages m"
                                           " WHERE m.id = ANY($1::text[])", list(cached))
            if uncached:
                rows_m += await conn.fetch(f"SELECT {cols}, b.data FROM messages m JOIN bodies b"
                                           " ON b.id = m.id WHERE m.id = ANY($1::text[])",
                                           uncached)
            for m in rows_m:
                self._live[m["id"]] = message_of(m)
                body = m["data"]
                self._live_bodies[m["id"]] = cached[m["id"]] if body is None else bytes(body)
        out = []
        for row in rows:
            msg = self._live.get(row["msg_id"])
            if msg is None:
                continue
            msg.remaining += 1
            out.append(recipient_of(row, msg))
        return out

    # -- an operator's actions across the cluster ----------------------------------------------

    async def unowned(self, states: Sequence[State], pool: str | None = None,
                      domain: str | None = None, cls: str | None = None,
                      bodies: bool = False, others: bool = False) -> list[Recipient]:
        """Recipients in ``states`` that no node holds (held ones; queued or deferred ones not
        claimed yet), narrowed by pool, domain and class, with their messages (not kept in this
        node's memory; with ``bodies`` their bodies go to the cache, for a DSN). ``others``:
        those other nodes have claimed instead, to count them."""
        cols = ", ".join("m." + c.strip() for c in MSG_COLS.split(","))
        args: list = [[s.value for s in states], pool, domain, cls]
        owner = "r.lease_owner IS NULL"
        if others:
            owner, args = "r.lease_owner <> $5", [*args, self.node]
        async with self.acquire() as conn:
            rows = await conn.fetch(
                f"SELECT r.{LOAD_COLS.replace(', ', ', r.')}, {cols}"
                + (", b.data" if bodies else "") + " FROM recipients r"
                " JOIN messages m ON m.id = r.msg_id"
                + (" JOIN bodies b ON b.id = r.msg_id" if bodies else "")
                + f" WHERE r.state = ANY($1::text[]) AND {owner}"
                " AND ($2::text IS NULL OR r.pool = $2) AND ($3::text IS NULL OR r.domain = $3)"
                " AND ($4::text IS NULL OR r.cls = $4) ORDER BY m.queued_at, r.msg_id, r.idx",
                *args)
        return self._grouped(rows, bodies)

    def _grouped(self, rows: Sequence[asyncpg.Record], bodies: bool = False) -> list[Recipient]:
        """Recipients of rows joined with their messages, one ``Message`` per queue id counting
        them (``bodies``: each message's body, in the row's ``data``, to the cache)."""
        msgs: dict[str, Message] = {}
        out = []
        for row in rows:
            msg = msgs.get(row["msg_id"])
            if msg is None:
                msg = msgs[row["msg_id"]] = message_of(row)
                if bodies:
                    self._cache.put(msg.id, bytes(row["data"]))
            msg.remaining += 1
            out.append(recipient_of(row, msg))
        return out

    async def not_held_here(self, queue_ids: Sequence[str] = (),
                            correlation_id: str | None = None,
                            recipient: str | None = None) -> list[Recipient]:
        """The recipients not yet final of the messages named (by queue id, correlation id or
        recipient address) that this node does not hold: unclaimed, on hold, or claimed by
        another node (in flight there shows as queued). A look-up on any node must find a
        message wherever it waits in the cluster, not say it was never queued."""
        if not queue_ids and not correlation_id and not recipient:
            return []
        cols = ", ".join("m." + c.strip() for c in MSG_COLS.split(","))
        key = address_key(recipient) if recipient else None
        domain, pattern = _address_like(key) if key else (None, None)
        async with self.acquire() as conn:
            rows = await conn.fetch(
                f"SELECT r.{LOAD_COLS.replace(', ', ', r.')}, {cols} FROM recipients r"
                f" JOIN messages m ON m.id = r.msg_id WHERE r.state IN {OPEN}"
                " AND r.lease_owner IS DISTINCT FROM $1"
                " AND (cardinality($2::text[]) = 0 OR r.msg_id = ANY($2::text[]))"
                " AND ($3::text IS NULL OR m.correlation_id = $3)"
                " AND ($4::text IS NULL OR (r.domain = $4 AND"
                f" translate(r.address, '{_UPPER}', '{_UPPER.lower()}') LIKE $5))"
                " ORDER BY m.queued_at, r.msg_id, r.idx",
                self.node, list(queue_ids), correlation_id or None, domain, pattern)
        if key is not None:  # the exact comparison, of which the SQL was a narrowing
            rows = [row for row in rows if _key_of(row["address"]) == key]
        return self._grouped(rows)

    async def open_not_held_here(self, pool: str | None = None, domain: str | None = None,
                                 cls: str | None = None, state: State | None = None
                                 ) -> AsyncIterator[Recipient]:
        """Every recipient not yet final that this node does not hold (unclaimed, on hold, or
        another node's; in flight there shows as queued), oldest message first, read through a
        cursor: ``queue list`` on any node lists the cluster's queue without holding all of it
        in memory."""
        states = {None: OPEN, State.QUEUED: "('queued', 'inflight')",
                  State.DEFERRED: "('deferred')", State.HELD: "('held')"}[state]
        cols = ", ".join("m." + c.strip() for c in MSG_COLS.split(","))
        async with self.acquire() as conn, conn.transaction(readonly=True):
            msg: Message | None = None
            async for row in conn.cursor(
                    f"SELECT r.{LOAD_COLS.replace(', ', ', r.')}, {cols} FROM recipients r"
                    f" JOIN messages m ON m.id = r.msg_id WHERE r.state IN {states}"
                    " AND r.lease_owner IS DISTINCT FROM $1"
                    " AND ($2::text IS NULL OR r.pool = $2) AND ($3::text IS NULL OR r.domain = $3)"
                    " AND ($4::text IS NULL OR r.cls = $4) ORDER BY m.queued_at, r.msg_id, r.idx",
                    self.node, pool, domain, cls, prefetch=500):
                if msg is None or msg.id != row["msg_id"]:
                    msg = message_of(row)
                msg.remaining += 1
                yield recipient_of(row, msg)

    async def load_body(self, msg_id: str) -> bytes:
        """A message's bytes: in memory if this node holds it, else from the shared spool
        (``queue show`` of one no node holds)."""
        with contextlib.suppress(KeyError):
            return self.body(msg_id)
        async with self.acquire() as conn:
            data = await conn.fetchval("SELECT data FROM bodies WHERE id = $1", msg_id)
        if data is None:
            raise KeyError(msg_id)
        return bytes(data)

    async def domains(self, pool: str | None) -> set[str]:
        """The destination domains with mail not yet final (of ``pool``), on any node."""
        async with self.acquire() as conn:
            rows = await conn.fetch(f"SELECT DISTINCT domain FROM recipients WHERE state IN"
                                    f" {OPEN} AND ($1::text IS NULL OR pool = $1)", pool)
        return {r["domain"] for r in rows}

    async def open_count(self, pool: str, domain: str | None = None) -> int:
        """Recipients of ``pool`` (to ``domain``) not yet final, on any node or none: what
        a pause or resume holds or lets go in the whole cluster."""
        async with self.acquire() as conn:
            return await conn.fetchval(
                f"SELECT count(*) FROM recipients WHERE state IN {OPEN} AND pool = $1"
                " AND ($2::text IS NULL OR domain = $2)", pool, domain)

    async def operate(self, rcpts: list[Recipient], state: State, states: Sequence[State],
                      records: Callable[[list[Recipient]], Sequence[Record]]
                      ) -> list[Recipient]:
        """Move the recipients still in ``states`` that no other node holds to ``state`` (an
        operator's hold, release, retry or delete across the cluster) with ``records`` of the
        ones moved, in one transaction; returns those (another node may have claimed some
        meanwhile). Leases are cleared: a held recipient is nobody's, a released one is
        claimed afresh, by any node."""
        moved: list[Recipient] = []
        fut = asyncio.get_running_loop().create_future()
        self._submit(Operate(rcpts, state, states, records, moved, fut), True)
        await fut
        return moved

    async def pending(self) -> Pending:
        """Every recipient still to deliver, for a node that owns the whole queue alone."""
        await self.sweep()
        final = [s.value for s in FINAL_STATES]
        async with self.acquire() as conn:
            rows = await conn.fetch(
                f"SELECT r.{LOAD_COLS.replace(', ', ', r.')} FROM recipients r"
                " JOIN messages m ON m.id = r.msg_id WHERE r.state <> ALL($1::text[])"
                " ORDER BY m.queued_at, r.msg_id, r.idx", final)
            rcpts = await self._load(conn, rows)
        msgs = list({id(r.msg): r.msg for r in rcpts}.values())
        return Pending(messages=msgs, recipients=rcpts)

    async def sweep(self) -> int:
        """Delete messages whose recipients are all final (left by a crash before cleanup)."""
        async with self.acquire() as conn:
            status = await conn.execute(
                "DELETE FROM messages m WHERE NOT EXISTS (SELECT 1 FROM recipients r"
                f" WHERE r.msg_id = m.id AND r.state IN {OPEN})")
        return int(status.split()[-1])

    async def paused(self) -> set[tuple[str, str]]:
        async with self.acquire() as conn:
            return {(r["pool"], r["domain"]) for r in await conn.fetch("SELECT * FROM paused")}

    async def has_event(self, data: bytes) -> bool:
        async with self.acquire() as conn:
            return await conn.fetchval("SELECT 1 FROM events WHERE data = $1 LIMIT 1",
                                       data) is not None

    async def events_naming(self, text: str) -> list[Record]:
        """Every node's outbox: a killed node's records wait here until another node's
        recorder adopts them."""
        async with self.acquire() as conn:
            return [Record(*unpack(bytes(r["data"]))) for r in await conn.fetch(
                "SELECT data FROM events WHERE position($1::bytea in data) > 0",
                text.encode())]

    # -- cluster: leases and nodes --------------------------------------------------------------


