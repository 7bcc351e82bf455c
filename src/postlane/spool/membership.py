"""Membership of a cluster: nodes, their sessions and heartbeats, and taking over a dead
node's work."""

from __future__ import annotations

import collections
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import asyncpg

from .pgsql import CONNECT_TIMEOUT, NOW

__all__ = ["SESSION_SETTINGS", "Membership", "NodeConflict", "NodeInfo"]


class NodeConflict(RuntimeError):
    """Another live node already uses this node name."""


class NodeNotRunning(RuntimeError):
    """The node is registered but its session is closed: nothing runs there to act."""


class NodeNotForgotten(RuntimeError):
    """The node cannot be removed from the cluster's list: it is alive, or still holds work."""


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


NODE_COLS = "name, hostname, pid, started_at, heartbeat, draining"
"""The ``nodes`` columns a ``NodeInfo`` holds (with ``session``)."""


class Membership:
    """The nodes of a cluster (a mixin of ``PostgresSpool``, which supplies ``acquire``,
    ``dsn``, ``schema``, ``app_name`` and the channels): a node's ``session`` holds an
    advisory lock on its name, ``heartbeat`` says it is alive and renews its leases, and
    ``reap`` gives a dead node's work back."""

    if TYPE_CHECKING:  # supplied by PostgresSpool
        dsn: str
        schema: str
        app_name: str
        work_channel: str
        pause_channel: str
        retry_channel: str

        def acquire(self) -> AbstractAsyncContextManager[asyncpg.Connection]: ...

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
        (other nodes see the node die when it closes) and LISTENs on the work, pause and
        retry channels (``callback(channel, payload)``); the caller closes it. Refused while another
        session holds the name: that node is alive."""
        conn = await asyncpg.connect(self.dsn, timeout=CONNECT_TIMEOUT, server_settings={
            "application_name": self.app_name, **SESSION_SETTINGS})
        try:
            if not await conn.fetchval(
                    f"SELECT pg_try_advisory_lock({self._name_lock('$1::text')})", name):
                raise NodeConflict(f"node name {name!r} is already live in cluster schema"
                                   f" {self.schema!r} (its database session is open)")
            for channel in (self.work_channel, self.pause_channel, self.retry_channel):
                await conn.add_listener(channel,
                                        lambda _c, _pid, ch, payload: callback(ch, payload))
        except BaseException:
            await conn.close()
            raise
        return conn

    async def register(self, name: str, hostname: str, pid: int, feedback_key: str = "") -> None:
        """Join the cluster as ``name`` (after opening its ``session``): a previous life of
        this node that died holding leases gives them back, since nobody works on them.
        ``feedback_key``: the fingerprint of its feedback key (``other_keys``)."""
        async with self.acquire() as conn, conn.transaction():
            await conn.execute(
                f"INSERT INTO nodes VALUES ($1, $2, $3, {NOW}, {NOW}, false, $4)"
                " ON CONFLICT (name) DO UPDATE SET hostname = $2, pid = $3,"
                f" started_at = {NOW}, heartbeat = {NOW}, draining = false, feedback_key = $4",
                name, hostname, pid, feedback_key)
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
                f" UPDATE nodes n SET heartbeat = {NOW} FROM prev WHERE n.name = $1"
                f" RETURNING n.draining, {NOW} - prev.heartbeat AS gap", name)
            if row is not None and lease is not None:
                # SKIP LOCKED: a row locked now is being written by this node's own outcome
                # commit; waiting for it could deadlock with that commit (PostgreSQL then fails
                # one of the two after a second). Its lease, renewed last time, outlives the wait.
                await conn.execute(
                    f"UPDATE recipients SET lease_until = {NOW} + $2 WHERE (msg_id, idx) IN"
                    " (SELECT msg_id, idx FROM recipients WHERE lease_owner = $1"
                    " AND state IN ('queued', 'deferred') FOR UPDATE SKIP LOCKED)", name, lease)
        return None if row is None else (row["draining"], row["gap"])

    async def other_keys(self, me: str, feedback_key: str, dead_after: float) -> list[str]:
        """The live nodes whose feedback key is not ``feedback_key`` (a fingerprint): a VERP
        or unsubscribe link one node makes must be readable by all."""
        async with self.acquire() as conn:
            rows = await conn.fetch(
                "SELECT name FROM nodes WHERE name <> $1 AND feedback_key NOT IN ('', $2)"
                f" AND heartbeat >= {NOW} - $3 ORDER BY name", me, feedback_key, dead_after)
        return [r["name"] for r in rows]

    async def reap(self, me: str, dead_after: float, lease: float) -> dict[str, int]:
        """Give back the work of dead nodes - their session is gone and their heartbeat older
        than ``dead_after``, or their heartbeat is older than ``lease`` - so that the claims
        take it at once; returns recipients released per node. The node row is locked first:
        a node renewing its heartbeat meanwhile is skipped (alive), never half taken over."""
        async with self.acquire() as conn, conn.transaction():
            dead = await conn.fetch(
                f"SELECT name FROM nodes n WHERE name <> $1 AND heartbeat < {NOW} - $2"
                f" AND (heartbeat < {NOW} - $3 OR NOT {self.session_open('n.name')})"
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

    async def forget(self, name: str) -> bool:
        """Remove a dead node's row (``postlane cluster forget``): one that will not come back
        stays listed DEAD, and counted in ``postlane_cluster_nodes{state="dead"}``, for ever.
        False: no such node. ``NodeNotForgotten`` while its session is open (alive or
        stalled: drain it) or while it still holds recipients (the live nodes give them back
        ``dead_after`` after its last heartbeat: try again then)."""
        async with self.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(
                f"SELECT {self.session_open('name')} AS session, (SELECT count(*) FROM"
                " recipients WHERE lease_owner = $1) AS held FROM nodes WHERE name = $1"
                " FOR UPDATE", name)
            if row is None:
                return False
            if row["session"]:
                raise NodeNotForgotten(f"{name} is running (its session is open): drain it"
                                       f" instead (postlane cluster drain {name})")
            if row["held"]:
                raise NodeNotForgotten(f"{name} still holds {row['held']} recipients: the"
                                       " live nodes give them back once it is dead; try again"
                                       " then")
            await conn.execute("DELETE FROM nodes WHERE name = $1", name)
        return True

    async def request_drain(self, name: str) -> bool:
        """Ask node ``name`` to stop claiming, finish its work and exit. False: no such node;
        ``NodeNotRunning`` if its session is closed (killed, crashed): nothing would see the
        request, and the others give its work back anyway. A stalled node (its session open)
        is asked: it sees the request when it wakes."""
        async with self.acquire() as conn:
            row = await conn.fetchrow(
                f"UPDATE nodes SET draining = {self.session_open('name')} WHERE name = $1"
                " RETURNING draining", name)
        if row is None:
            return False
        if not row["draining"]:
            raise NodeNotRunning(f"{name} is not running (its session is closed): nothing to"
                                 " drain; the other nodes give its work back")
        return True

    async def nodes(self) -> list[NodeInfo]:
        async with self.acquire() as conn:
            rows = await conn.fetch(f"SELECT {NODE_COLS}, {self.session_open('name')} AS"
                                    " session FROM nodes ORDER BY name")
        return [NodeInfo(**dict(r)) for r in rows]
