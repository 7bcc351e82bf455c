"""The shared spool of a cluster: PostgreSQL through asyncpg, with group commit and leases.

Same contract as the SQLite spool (``base.Spool``), plus what several nodes need to share one
queue: ``claim`` hands a node the most urgent ready recipients of a pool under a lease
(``SELECT ... FOR UPDATE SKIP LOCKED``, so two nodes never take the same row), ``heartbeat``
extends a node's leases, ``release`` gives them back. A dead node stops renewing: once its
database ``session`` has closed and its heartbeat is a few seconds old, ``reap`` gives its work
back (or its leases run out), and the others claim its recipients.

Why one writer task: enqueues that arrive while a commit is in flight are gathered into the next
transaction, so many acknowledgements share one WAL flush (PostgreSQL's ``synchronous_commit``
makes each COMMIT durable). Urgent (transactional) writes are taken before bulk ones.

Lease times use the database's clock (``clock_timestamp()``), so node clocks never decide who owns
a row; retry times (``next_attempt``) come from the node that deferred the recipient.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from ..accounting.records import Record, pack
from ..monitor.health import Health
from .base import (
    FINAL_STATES,
    Attempt,
    GroupCommitWrites,
    Message,
    Pending,
    Recipient,
    SpoolUnavailable,
    State,
    message_row,
    new_writer_id,
)
from .cache import BodyCache
from .outbox import writer_lock_key

log = logging.getLogger("postlane.spool")

BATCH_MAX = 2000
UNREACHABLE = (OSError, TimeoutError, asyncpg.InterfaceError, asyncpg.PostgresConnectionError,
               asyncpg.exceptions.OperatorInterventionError)
"""What a database that is away (down, restarting, cut off, failing over) raises."""
CONNECT_TIMEOUT = 5.0
"""Seconds to reach the database before a write fails: an SMTP client waiting for its 250
during a failover gets a 451 soon, not after asyncpg's default minute."""
OUTCOME_DELAY = 0.02
"""Seconds outcome writes wait for company when nobody waits on them: a commit costs about five
round trips. Measured: 2,000 messages through one node took 23.5 s committing each outcome at
once, 19.2 s with this delay (under cProfile, on the shared 2-core machine: indicative only)."""
_NOW = "extract(epoch from clock_timestamp())::float8"
_OPEN = "('queued', 'deferred', 'inflight', 'held')"
"""Not final: a message keeps its row while one of its recipients is in one of these."""

MIGRATIONS: list[tuple[int, str]] = [
    (1, """
CREATE TABLE messages (
    id TEXT PRIMARY KEY, cls TEXT NOT NULL, pool TEXT NOT NULL, mail_from TEXT NOT NULL,
    queued_at DOUBLE PRECISION NOT NULL, deadline DOUBLE PRECISION NOT NULL,
    expire_at DOUBLE PRECISION NOT NULL, priority INTEGER NOT NULL, size INTEGER NOT NULL,
    envid TEXT, ret TEXT, correlation_id TEXT, message_id TEXT, listener TEXT, auth_user TEXT,
    client TEXT);
CREATE TABLE bodies (
    id TEXT PRIMARY KEY REFERENCES messages (id) ON DELETE CASCADE, data BYTEA NOT NULL);
CREATE TABLE recipients (
    msg_id TEXT NOT NULL REFERENCES messages (id) ON DELETE CASCADE, idx INTEGER NOT NULL,
    address TEXT NOT NULL, domain TEXT NOT NULL, orcpt TEXT, notify TEXT, state TEXT NOT NULL,
    attempts INTEGER NOT NULL, next_attempt DOUBLE PRECISION NOT NULL, last_reply TEXT,
    pool TEXT NOT NULL, priority INTEGER NOT NULL, deadline DOUBLE PRECISION NOT NULL,
    lease_owner TEXT, lease_until DOUBLE PRECISION,
    PRIMARY KEY (msg_id, idx));
CREATE INDEX recipients_queued ON recipients (pool, priority, deadline) WHERE state = 'queued';
CREATE INDEX recipients_due ON recipients (pool, next_attempt) WHERE state = 'deferred';
CREATE INDEX recipients_leased ON recipients (lease_owner) WHERE lease_owner IS NOT NULL;
CREATE TABLE paused (pool TEXT NOT NULL, domain TEXT NOT NULL, PRIMARY KEY (pool, domain));
CREATE TABLE nodes (
    name TEXT PRIMARY KEY, hostname TEXT NOT NULL, pid INTEGER NOT NULL,
    started_at DOUBLE PRECISION NOT NULL, heartbeat DOUBLE PRECISION NOT NULL,
    draining BOOLEAN NOT NULL DEFAULT false);
"""),
    (2, """
CREATE TABLE rate_buckets (
    key TEXT PRIMARY KEY, tokens DOUBLE PRECISION NOT NULL, updated DOUBLE PRECISION NOT NULL,
    granted DOUBLE PRECISION NOT NULL);
"""),
    (3, """
ALTER TABLE recipients ADD COLUMN cls TEXT;
UPDATE recipients r SET cls = m.cls FROM messages m WHERE m.id = r.msg_id;
CREATE INDEX recipients_open ON recipients (cls, deadline) WHERE state IN ('queued', 'deferred');
CREATE TABLE monitor_slices (
    node TEXT NOT NULL, cls TEXT NOT NULL, at BIGINT NOT NULL, finals INTEGER NOT NULL,
    buckets INTEGER[] NOT NULL, counts INTEGER[] NOT NULL, PRIMARY KEY (at, node, cls));
CREATE TABLE monitor_state (
    id INTEGER PRIMARY KEY, leader TEXT NOT NULL, at DOUBLE PRECISION NOT NULL,
    figures JSONB NOT NULL);
CREATE TABLE alerts (
    id TEXT NOT NULL, fired_at DOUBLE PRECISION NOT NULL, rule TEXT NOT NULL, cls TEXT NOT NULL,
    pool TEXT NOT NULL, message TEXT NOT NULL, value DOUBLE PRECISION NOT NULL,
    threshold DOUBLE PRECISION NOT NULL, last_seen DOUBLE PRECISION NOT NULL,
    resolved_at DOUBLE PRECISION, PRIMARY KEY (id, fired_at));
"""),
    (4, """
ALTER TABLE recipients ADD COLUMN attempt_started DOUBLE PRECISION,
    ADD COLUMN attempt_info TEXT;
CREATE TABLE events (writer TEXT NOT NULL, n BIGINT NOT NULL, data BYTEA NOT NULL,
    PRIMARY KEY (writer, n));
CREATE TABLE writers (writer TEXT PRIMARY KEY, node TEXT NOT NULL,
    started DOUBLE PRECISION NOT NULL, filed BIGINT NOT NULL DEFAULT 0);
"""),
]
"""Versioned schema: append ``(n + 1, sql)``; never edit an applied entry."""

SCHEMA_VERSION = MIGRATIONS[-1][0]

_MSG_COLS = ("id, cls, pool, mail_from, queued_at, deadline, expire_at, priority, size, envid,"
             " ret, correlation_id, message_id, listener, auth_user, client")
_RCPT_COLS = ("msg_id, idx, address, domain, orcpt, notify, state, attempts, next_attempt,"
              " last_reply")
_LOAD_COLS = _RCPT_COLS + ", attempt_started, attempt_info"
"""What a node reads back of a recipient: with the mark of an attempt never settled."""


def redact(dsn: str) -> str:
    """The DSN without its password, for messages and logs."""
    parts = urlsplit(dsn)
    if parts.password is None:
        return dsn
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


_CLAIM = f"""WITH c AS (
    SELECT r.msg_id, r.idx FROM recipients r
    WHERE r.pool = $1 AND r.state = '{{state}}' AND r.next_attempt <= $2
      AND (r.lease_owner IS NULL OR ($7 AND r.lease_until < {_NOW} AND r.lease_owner <> $5))
      AND r.domain <> ALL($3::text[])
      AND NOT EXISTS (SELECT 1 FROM paused p WHERE p.pool = r.pool
                      AND p.domain IN ('*', r.domain))
    ORDER BY {{order}} LIMIT $4
    FOR UPDATE OF r SKIP LOCKED)
UPDATE recipients r SET lease_owner = $5, lease_until = {_NOW} + $6
FROM c WHERE r.msg_id = c.msg_id AND r.idx = c.idx
RETURNING r.{_LOAD_COLS.replace(', ', ', r.')}"""
"""Lease the most urgent claimable rows of one state; {state} and {order} are filled in."""


class NodeConflict(RuntimeError):
    """Another live node already uses this node name."""


SESSION_SETTINGS = {"tcp_keepalives_idle": "2", "tcp_keepalives_interval": "1",
                    "tcp_keepalives_count": "2"}
"""Of a node's session connection: the server probes it after 2 s of silence, so a node whose
machine vanished (no FIN or RST) loses its session, and its name lock, within about 4 s."""


@dataclass(slots=True)
class NodeInfo:
    name: str
    hostname: str
    pid: int
    started_at: float
    heartbeat: float
    draining: bool
    session: bool
    """Whether its session connection is open (it holds its name lock)."""


class PostgresSpool(GroupCommitWrites):
    """Spool in PostgreSQL schema ``schema`` of the database at ``dsn``."""

    HEALTH_KEY = "database"

    def __init__(self, dsn: str, schema: str = "postlane", node: str = "") -> None:
        self.dsn = dsn
        self.schema = schema
        self.node = node
        self.writer_id = new_writer_id(node)
        self.events_written = 0
        """The number of this writer's last committed event."""
        self.work_channel = f"{schema}_work"
        self.pause_channel = f"{schema}_pause"
        self.app_name = f"postlane/{schema}"
        """``application_name`` of this spool's connections, as pg_stat_activity shows them."""
        self._pool: asyncpg.Pool | None = None
        self._life: asyncpg.Connection | None = None
        self._writer: asyncio.Task | None = None
        self._urgent: collections.deque = collections.deque()
        self._bulk: collections.deque = collections.deque()
        self._wake = asyncio.Event()
        self._stopping = False
        self._waiters = 0
        """Queued writes somebody awaits (acknowledgements, pause, flush): commit those at once."""
        self._cache = BodyCache()
        self._live: dict[str, Message] = {}
        """Messages with recipients this node holds (claimed or loaded by ``pending``)."""
        self._live_bodies: dict[str, bytes] = {}
        self.commits = 0
        self.writes = 0
        self.health = Health()
        """Where the database going away and coming back is told (the node's)."""
        self.down = False
        self.on_reachability: Callable[[bool], None] | None = None
        """Called when the database goes away (False) and when it answers again (True)."""

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
            async with conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))",
                                   f"postlane:{self.schema}")
                await conn.execute(f'CREATE SCHEMA IF NOT EXISTS "{self.schema}"')
                await conn.execute(f'SET LOCAL search_path TO "{self.schema}"')
                await conn.execute("CREATE TABLE IF NOT EXISTS schema_migrations ("
                                   " version INTEGER PRIMARY KEY,"
                                   " applied_at TIMESTAMPTZ NOT NULL DEFAULT now())")
                current = await conn.fetchval(
                    "SELECT coalesce(max(version), 0) FROM schema_migrations")
                if current > SCHEMA_VERSION:
                    raise RuntimeError(f"PostgreSQL schema {self.schema!r} is at version"
                                       f" {current}, newer than this Postlane ({SCHEMA_VERSION})")
                for version, sql in MIGRATIONS:
                    if version > current:
                        await conn.execute(sql)
                        await conn.execute("INSERT INTO schema_migrations (version) VALUES ($1)",
                                           version)
                        log.info("applied schema migration", extra={"version": version})

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
        await self._life.execute(f"INSERT INTO writers VALUES ($1, $2, {_NOW}, 0)",
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

    def _submit(self, op: tuple, urgent: bool) -> None:
        (self._urgent if urgent else self._bulk).append(op)
        if isinstance(op[-1], asyncio.Future):
            self._waiters += 1
        self._wake.set()

    async def enqueue(self, msg: Message, rcpts: list[Recipient], body: bytes,
                      urgent: bool = False, events: Sequence[Record] = ()) -> None:
        """Return once the message, its recipients and ``events`` are committed."""
        fut = asyncio.get_running_loop().create_future()
        row = message_row(msg)
        rrows = [(msg.id, r.idx, r.address, r.domain, r.orcpt, r.notify, r.state.value,
                  r.attempts, r.next_attempt, r.last_reply, msg.pool, msg.priority, msg.deadline,
                  msg.cls) for r in rcpts]
        self._submit(("enq", row, (msg.id, body), rrows, events, fut), urgent)
        await fut
        self._cache.put(msg.id, body)

    def finish(self, msg_id: str) -> None:
        """This node is done with a message; it is deleted once no node has work left on it."""
        self._submit(("fin", msg_id), False)
        self._live.pop(msg_id, None)
        self._live_bodies.pop(msg_id, None)
        self._cache.pop(msg_id)

    async def _run(self) -> None:
        assert self._pool is not None
        failures = 0
        while True:
            if failures:  # the database is away (failover?): back off, then retry
                await asyncio.sleep(min(5.0, 0.1 * 2 ** failures))
            if not self._urgent and not self._bulk:
                if self._stopping:
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            if not self._waiters and not self._stopping:
                await asyncio.sleep(OUTCOME_DELAY)
            batch = []
            while self._urgent and len(batch) < BATCH_MAX:
                batch.append(self._urgent.popleft())
            while self._bulk and len(batch) < BATCH_MAX:
                batch.append(self._bulk.popleft())
            error: BaseException | None = None
            try:
                async with self.acquire() as conn:
                    await self._commit(conn, batch)
                self.commits += 1
                self.writes += len(batch)
                failures = 0
            except Exception as exc:  # a failed commit must fail every waiter, not hang them
                error = exc
                failures += 1
                self._retry([op for op in batch if op[0] in ("upd", "fin", "ev", "trim")], exc)
            for op in batch:
                fut = op[-1]
                if isinstance(fut, asyncio.Future):
                    self._waiters -= 1
                if isinstance(fut, asyncio.Future) and not fut.done():
                    if error is None:
                        fut.set_result(None)
                    else:
                        fut.set_exception(SpoolUnavailable(f"spool commit failed: {error}"))

    def _retry(self, ops: list[tuple], exc: Exception) -> None:
        """Keep outcomes that failed to commit until the database is back: a lost outcome
        means a second delivery. Acknowledgements are not retried: their waiters fail (the SMTP
        client gets a 451 and sends again)."""
        if self._stopping:
            if ops:
                log.error("spool commit failed while closing: %d outcome writes lost (those"
                          " recipients will be delivered again): %s", len(ops), exc)
            return
        self._bulk.extendleft(reversed(ops))

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

    async def _commit(self, conn: asyncpg.Connection, batch: list[tuple]) -> None:
        msgs, bodies, rcpts, upds, fins, pauses, events, marks = [], [], [], [], [], [], [], []
        operates: list[tuple] = []
        trims: dict[str, int] = {}
        for op in batch:
            kind = op[0]
            if kind == "enq":
                msgs.append(op[1])
                bodies.append(op[2])
                rcpts.extend(op[3])
                events.extend(op[4])
            elif kind == "upd":
                upds.extend(op[1])
                events.extend(op[2])
            elif kind == "ev":
                events.extend(op[1])
            elif kind == "mark":
                marks.extend(op[1])
            elif kind == "trim":
                for writer, n in op[1].items():
                    trims[writer] = max(n, trims.get(writer, 0))
            elif kind == "fin":
                fins.append(op[1])
            elif kind == "pause":
                pauses.append(op[1:4])
                events.extend(op[4])
            elif kind == "operate":
                operates.append(op[1:6])
        first = self.events_written + 1
        async with conn.transaction():
            if msgs:
                await conn.executemany(
                    f"INSERT INTO messages ({_MSG_COLS}) VALUES"
                    f" ({', '.join(f'${i}' for i in range(1, 17))})", msgs)
                await conn.executemany("INSERT INTO bodies (id, data) VALUES ($1, $2)", bodies)
                await conn.executemany(
                    f"INSERT INTO recipients ({_RCPT_COLS}, pool, priority, deadline, cls)"
                    f" VALUES ({', '.join(f'${i}' for i in range(1, 15))})", rcpts)
                await conn.execute("SELECT pg_notify($1, $2)", self.work_channel,
                                   ",".join(sorted({m[2] for m in msgs})))
            if upds:
                # a final state is never overwritten: a node that lost its lease to a stall
                # must not revive a recipient another node has delivered meanwhile
                await conn.executemany(
                    "UPDATE recipients SET state=$1, attempts=$2, next_attempt=$3, last_reply=$4,"
                    " attempt_started=NULL, attempt_info=NULL"
                    f" WHERE msg_id=$5 AND idx=$6 AND state IN {_OPEN}", upds)
            if marks:
                await conn.executemany(
                    "UPDATE recipients SET attempt_started=$1, attempt_info=$2"
                    " WHERE msg_id=$3 AND idx=$4", marks)
            for moving, state, states, records, moved in operates:
                moved[:] = await self._operate(conn, moving, state, states)
                events.extend(records(moved))
                if state in FINAL_STATES:
                    fins.extend({r.msg.id for r in moved})
            if events:
                writer = self.writer_id
                await conn.copy_records_to_table(
                    "events", records=[(writer, n, pack(rec))
                                       for n, rec in enumerate(events, first)])
            for writer, n in trims.items():
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
                    f" (SELECT 1 FROM recipients r WHERE r.msg_id = m.id AND r.state IN {_OPEN})",
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
            cols = ", ".join("m." + c.strip() for c in _MSG_COLS.split(","))
            rows_m = []
            if cached:
                rows_m += await conn.fetch(f"SELECT {cols}, NULL::bytea AS data FROM messages m"
                                           " WHERE m.id = ANY($1::text[])", list(cached))
            if uncached:
                rows_m += await conn.fetch(f"SELECT {cols}, b.data FROM messages m JOIN bodies b"
                                           " ON b.id = m.id WHERE m.id = ANY($1::text[])",
                                           uncached)
            for m in rows_m:
                self._live[m["id"]] = _message(m)
                body = m["data"]
                self._live_bodies[m["id"]] = cached[m["id"]] if body is None else bytes(body)
        out = []
        for row in rows:
            msg = self._live.get(row["msg_id"])
            if msg is None:
                continue
            msg.remaining += 1
            out.append(_recipient(row, msg))
        return out

    # -- an operator's actions across the cluster ----------------------------------------------

    async def unowned(self, states: Sequence[State], pool: str | None = None,
                      domain: str | None = None, cls: str | None = None,
                      bodies: bool = False, others: bool = False) -> list[Recipient]:
        """Recipients in ``states`` that no node holds (held ones; queued or deferred ones not
        claimed yet), narrowed by pool, domain and class, with their messages (not kept in this
        node's memory; with ``bodies`` their bodies go to the cache, for a DSN). ``others``:
        those other nodes have claimed instead, to count them."""
        cols = ", ".join("m." + c.strip() for c in _MSG_COLS.split(","))
        args: list = [[s.value for s in states], pool, domain, cls]
        owner = "r.lease_owner IS NULL"
        if others:
            owner, args = "r.lease_owner <> $5", [*args, self.node]
        async with self.acquire() as conn:
            rows = await conn.fetch(
                f"SELECT r.{_LOAD_COLS.replace(', ', ', r.')}, {cols}"
                + (", b.data" if bodies else "") + " FROM recipients r"
                " JOIN messages m ON m.id = r.msg_id"
                + (" JOIN bodies b ON b.id = r.msg_id" if bodies else "")
                + f" WHERE r.state = ANY($1::text[]) AND {owner}"
                " AND ($2::text IS NULL OR r.pool = $2) AND ($3::text IS NULL OR r.domain = $3)"
                " AND ($4::text IS NULL OR r.cls = $4) ORDER BY m.queued_at, r.msg_id, r.idx",
                *args)
        msgs: dict[str, Message] = {}
        out = []
        for row in rows:
            msg = msgs.get(row["msg_id"])
            if msg is None:
                msg = msgs[row["msg_id"]] = _message(row)
                if bodies:
                    self._cache.put(msg.id, bytes(row["data"]))
            msg.remaining += 1
            out.append(_recipient(row, msg))
        return out

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
                                    f" {_OPEN} AND ($1::text IS NULL OR pool = $1)", pool)
        return {r["domain"] for r in rows}

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
        self._submit(("operate", rcpts, state, states, records, moved, fut), True)
        await fut
        return moved

    async def pending(self) -> Pending:
        """Every recipient still to deliver, for a node that owns the whole queue alone."""
        await self.sweep()
        final = [s.value for s in FINAL_STATES]
        async with self.acquire() as conn:
            rows = await conn.fetch(
                f"SELECT r.{_LOAD_COLS.replace(', ', ', r.')} FROM recipients r"
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
                f" WHERE r.msg_id = m.id AND r.state IN {_OPEN})")
        return int(status.split()[-1])

    async def paused(self) -> set[tuple[str, str]]:
        async with self.acquire() as conn:
            return {(r["pool"], r["domain"]) for r in await conn.fetch("SELECT * FROM paused")}

    # -- cluster: leases and nodes --------------------------------------------------------------

    async def claim(self, owner: str, pool: str, limit: int, lease: float,
                    skip_domains: list[str] | None = None,
                    takeover: bool = True) -> list[Recipient]:
        """Lease up to ``limit`` ready recipients of ``pool``: due retries first, then new mail
        by (priority, deadline), skipping rows other nodes hold or are claiming right now, and
        rows ``owner`` itself holds (in its memory already, even if a stall let the lease lapse).
        With ``takeover`` false, rows whose lease lapsed are left to their owner too."""
        now_node = time.time()
        args = (pool, now_node, skip_domains or [], limit, owner, lease, takeover)
        async with self.acquire() as conn, conn.transaction():
            # retries that fell due first (their own index, ordered by due time), then new mail
            # by (priority, deadline): recipients deferred far ahead are in neither scan
            rows = await conn.fetch(_CLAIM.format(state="deferred", order="next_attempt"), *args)
            if len(rows) < limit:
                rows += await conn.fetch(_CLAIM.format(state="queued", order="priority, deadline"),
                                         *args[:3], limit - len(rows), *args[4:])
            return await self._load(conn, rows)

    async def release(self, owner: str) -> int:
        """Give back every lease ``owner`` holds, so other nodes take the work at once."""
        async with self.acquire() as conn:
            status = await conn.execute(
                "UPDATE recipients SET lease_owner = NULL, lease_until = NULL"
                " WHERE lease_owner = $1", owner)
            await conn.execute("SELECT pg_notify($1, '')", self.work_channel)
        return int(status.split()[-1])

    def _name_lock(self, name_sql: str) -> str:
        """The advisory lock (two int4 keys) a node's session holds on its name."""
        return f"hashtext('postlane/{self.schema}'), hashtext({name_sql})"

    def session_open(self, name_sql: str) -> str:
        """SQL: whether some session holds the name lock of ``name_sql``."""
        return ("EXISTS (SELECT 1 FROM pg_locks l WHERE l.locktype = 'advisory' AND l.granted"
                " AND l.database = (SELECT oid FROM pg_database"
                " WHERE datname = current_database()) AND l.objsubid = 2"
                f" AND l.classid::bigint = hashtext('postlane/{self.schema}')::bigint & 4294967295"
                f" AND l.objid::bigint = hashtext({name_sql})::bigint & 4294967295)")

    async def session(self, name: str, callback: Callable[[str, str], None]
                      ) -> asyncpg.Connection:
        """Open node ``name``'s session: one connection that holds the name's advisory lock
        (other nodes see the node die when it closes) and LISTENs on the work and pause
        channels (``callback(channel, payload)``); the caller closes it. Refused while another
        session holds the name: that node is alive."""
        conn = await asyncpg.connect(self.dsn, timeout=CONNECT_TIMEOUT, server_settings={
            "application_name": self.app_name, **SESSION_SETTINGS})
        try:
            if not await conn.fetchval(
                    f"SELECT pg_try_advisory_lock({self._name_lock('$1::text')})", name):
                raise NodeConflict(f"node name {name!r} is already live in cluster schema"
                                   f" {self.schema!r} (its database session is open)")
            for channel in (self.work_channel, self.pause_channel):
                await conn.add_listener(channel,
                                        lambda _c, _pid, ch, payload: callback(ch, payload))
        except BaseException:
            await conn.close()
            raise
        return conn

    async def register(self, name: str, hostname: str, pid: int) -> None:
        """Join the cluster as ``name`` (after opening its ``session``): a previous life of
        this node that died holding leases gives them back, since nobody works on them."""
        async with self.acquire() as conn, conn.transaction():
            await conn.execute(
                f"INSERT INTO nodes VALUES ($1, $2, $3, {_NOW}, {_NOW}, false)"
                " ON CONFLICT (name) DO UPDATE SET hostname = $2, pid = $3,"
                f" started_at = {_NOW}, heartbeat = {_NOW}, draining = false", name, hostname, pid)
            await conn.execute("UPDATE recipients SET lease_owner = NULL, lease_until = NULL"
                               " WHERE lease_owner = $1", name)

    async def heartbeat(self, name: str, lease: float | None = None
                        ) -> tuple[bool, float] | None:
        """Record that ``name`` is alive and, with ``lease``, renew its leases (one
        transaction). Returns whether an operator asked it to drain, and how long ago (by the
        database's clock) its previous heartbeat was; None if it is not registered (any more)."""
        async with self.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(
                f"WITH prev AS (SELECT heartbeat FROM nodes WHERE name = $1 FOR UPDATE)"
                f" UPDATE nodes n SET heartbeat = {_NOW} FROM prev WHERE n.name = $1"
                f" RETURNING n.draining, {_NOW} - prev.heartbeat AS gap", name)
            if row is not None and lease is not None:
                await conn.execute(
                    f"UPDATE recipients SET lease_until = {_NOW} + $2"
                    " WHERE lease_owner = $1 AND state IN ('queued', 'deferred')", name, lease)
        return None if row is None else (row["draining"], row["gap"])

    async def reap(self, me: str, dead_after: float, lease: float) -> dict[str, int]:
        """Give back the work of dead nodes - their session is gone and their heartbeat older
        than ``dead_after``, or their heartbeat is older than ``lease`` - so that the claims
        take it at once; returns recipients released per node. The node row is locked first:
        a node renewing its heartbeat meanwhile is skipped (alive), never half taken over."""
        async with self.acquire() as conn, conn.transaction():
            dead = await conn.fetch(
                f"SELECT name FROM nodes n WHERE name <> $1 AND heartbeat < {_NOW} - $2"
                f" AND (heartbeat < {_NOW} - $3 OR NOT {self.session_open('n.name')})"
                " AND EXISTS (SELECT 1 FROM recipients r WHERE r.lease_owner = n.name)"
                " FOR UPDATE SKIP LOCKED", me, dead_after, lease)
            if not dead:
                return {}
            rows = await conn.fetch(
                "UPDATE recipients r SET lease_owner = NULL, lease_until = NULL"
                " FROM unnest($1::text[]) AS d (name) WHERE r.lease_owner = d.name"
                " RETURNING d.name", [r["name"] for r in dead])
            await conn.execute("SELECT pg_notify($1, '')", self.work_channel)
        return dict(collections.Counter(r["name"] for r in rows))

    async def owned(self, name: str) -> set[tuple[str, int]]:
        """The open recipients leased to ``name``."""
        async with self.acquire() as conn:
            rows = await conn.fetch("SELECT msg_id, idx FROM recipients WHERE lease_owner = $1"
                                    " AND state IN ('queued', 'deferred')", name)
        return {(r["msg_id"], r["idx"]) for r in rows}

    async def deregister(self, name: str) -> None:
        async with self.acquire() as conn:
            await conn.execute("DELETE FROM nodes WHERE name = $1", name)

    async def request_drain(self, name: str) -> bool:
        """Ask node ``name`` to stop claiming, finish its work and exit."""
        async with self.acquire() as conn:
            status = await conn.execute("UPDATE nodes SET draining = true WHERE name = $1", name)
        return status.endswith(" 1")

    async def nodes(self) -> list[NodeInfo]:
        async with self.acquire() as conn:
            rows = await conn.fetch(f"SELECT *, {self.session_open('name')} AS session"
                                    " FROM nodes ORDER BY name")
        return [NodeInfo(**dict(r)) for r in rows]

    async def take_tokens(self, key: str, rate: float, burst: float, want: float) -> float:
        """Take up to ``want`` tokens from the shared bucket ``key`` (refilled at ``rate`` per
        second, holding at most ``burst``); returns how many were granted. One statement, so
        nodes taking at once serialize on the row and never grant more than the bucket holds."""
        avail = f"least($3::float8, b.tokens + $2::float8 * greatest(0, {_NOW} - b.updated))"
        async with self.acquire() as conn:
            return await conn.fetchval(
                f"""INSERT INTO rate_buckets AS b (key, tokens, updated, granted)
                VALUES ($1, $3::float8 - least($4::float8, $3::float8), {_NOW},
                        least($4::float8, $3::float8))
                ON CONFLICT (key) DO UPDATE SET
                    granted = least($4::float8, greatest(0, {avail})),
                    tokens = {avail} - least($4::float8, greatest(0, {avail})),
                    updated = {_NOW}
                RETURNING granted""", key, rate, burst, want)

    async def queue_summary(self) -> list[dict]:
        """Open recipients counted by pool, state, lease owner and whether the lease is current,
        with the earliest lease end of each group."""
        async with self.acquire() as conn:
            rows = await conn.fetch(
                "SELECT pool, state, lease_owner,"
                f" coalesce(lease_until >= {_NOW}, false) AS held, count(*) AS n,"
                " min(lease_until) AS lease_until"
                " FROM recipients WHERE state IN ('queued', 'deferred')"
                " GROUP BY pool, state, lease_owner, held ORDER BY pool")
        return [dict(r) for r in rows]

    async def now(self) -> float:
        """The database's clock, which all lease and heartbeat times are measured by."""
        async with self.acquire() as conn:
            return await conn.fetchval(f"SELECT {_NOW}")


def _message(m: Mapping) -> Message:
    return Message(
        id=m["id"], cls=m["cls"], pool=m["pool"], mail_from=m["mail_from"],
        queued_at=m["queued_at"], deadline=m["deadline"], expire_at=m["expire_at"],
        priority=m["priority"], size=m["size"], envid=m["envid"] or "", ret=m["ret"] or "",
        correlation_id=m["correlation_id"] or "", message_id=m["message_id"] or "",
        listener=m["listener"] or "", auth_user=m["auth_user"] or "", client=m["client"] or "")


def _recipient(row: Mapping, msg: Message) -> Recipient:
    state = State(row["state"])
    return Recipient(
        msg=msg, idx=row["idx"], address=row["address"], domain=row["domain"],
        orcpt=row["orcpt"] or "", notify=row["notify"] or "",
        state=State.QUEUED if state is State.INFLIGHT else state, attempts=row["attempts"],
        next_attempt=row["next_attempt"], last_reply=row["last_reply"] or "",
        open_attempt=None if row["attempt_started"] is None else Attempt(
            row["msg_id"], row["idx"], row["attempt_started"], row["attempt_info"] or ""))
