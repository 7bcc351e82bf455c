"""The audit trail inside a node: periodic retention and webhooks.

Records reach the store through the recorder (``audit.recorder``); this service keeps a
connection of its own for what is not an append.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import stat
import time
from collections.abc import Sequence
from pathlib import Path

import psycopg
from psycopg import sql

from ..accounting.records import Record
from ..config import Config
from ..spool import is_dsn
from ..spool.postgres import CONNECT_TIMEOUT, redact
from .backend import audit_location, open_audit_store
from .postgres import commit_channel
from .seal import load_private, seal_days
from .store import AuditStore, Query, Retention
from .webhooks import WebhookSender

__all__ = ["AuditService", "load_key", "retention_policies"]

log = logging.getLogger("postlane.audit")


def load_key(path: str) -> bytes:
    """The pseudonymisation key; refused if others can read it (it would let them re-link
    pseudonyms to addresses)."""
    st = os.stat(path)
    if stat.S_IMODE(st.st_mode) & 0o077:
        raise PermissionError(f"{path}: pseudonymisation key must not be readable by group or"
                              f" others (chmod 600)")
    key = Path(path).read_bytes().strip()
    if len(key) < 16:
        raise ValueError(f"{path}: pseudonymisation key is shorter than 16 bytes")
    return key


def retention_policies(config: Config) -> dict[str, Retention]:
    """Per class, with "*" applied to every class that has no entry of its own."""
    rules = config.audit.retention
    out: dict[str, Retention] = {}
    for name in config.classes:
        rule = rules.get(name) or rules.get("*")
        if rule is not None and (rule.pseudonymise is not None or rule.delete is not None):
            out[name] = Retention(rule.pseudonymise, rule.delete)
    return out


class AuditService:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.location = audit_location(config)
        """A SQLite file or a PostgreSQL DSN (``backend.audit_location``)."""
        self.path = None if is_dsn(self.location) else Path(self.location)
        """The SQLite file, if the store is one."""
        self._loop: asyncio.AbstractEventLoop | None = None
        self._store: AuditStore | None = None
        self._lock = asyncio.Lock()
        opener = lambda: open_audit_store(config)  # noqa: E731  (the webhooks' reads)
        self.webhooks = [WebhookSender(opener, hook, config.node.name)
                         for hook in config.audit.webhooks]
        self._tasks: list[asyncio.Task] = []

    def stored(self) -> None:
        """Records reached the store (the recorder says so): wake the webhooks."""
        for sender in self.webhooks:
            sender.wake.set()

    async def _call(self, fn):
        """``fn(store)`` in a thread, one at a time, on this service's own connection."""
        async with self._lock:
            if self._store is None:
                self._store = await asyncio.to_thread(open_audit_store, self.config)
            return await asyncio.to_thread(fn, self._store)

    async def received(self, queue_id: str) -> dict | None:
        """The "r" record of a message (its pool, class and sender): a report that comes back
        for it names only its queue id."""
        rows = await self._call(lambda store: store.find(Query(queue_id=queue_id)))
        return next((r for r in rows if r["type"] == "r"), None)

    async def sent_as(self, message_id: str, rcpts: Sequence[str]) -> list[dict]:
        """The "r" records of the messages whose Message-ID is ``message_id`` (a complaint
        whose FBL stripped our return path names its message by that alone): those to
        ``rcpts`` (indexed: a message to many has records by the thousand), else all."""

        def sent(query: Query, store: AuditStore) -> list[dict]:
            return [r for r in store.find(query)
                    if r["type"] == "r" and r["message_id"] == message_id]

        def find(store: AuditStore) -> list[dict]:
            return [row for r in rcpts
                    for row in sent(Query(message_id=message_id, rcpt=r), store)] or \
                sent(Query(message_id=message_id), store)

        return await self._call(find)

    async def records(self, queue_id: str) -> list[dict]:
        """Every record of a message, in chain order."""
        return await self._call(lambda store: store.find(Query(queue_id=queue_id)))

    async def holds(self, rec: Record) -> bool:
        """Whether the store has ``rec``: a record of its type and action, by the same
        operator, logged at the same instant (a record written again after a crash, whose
        first copy the spool has let go already)."""
        until = math.nextafter(rec.time_logged, math.inf)
        rows = await self._call(lambda store: list(store.rows_between(rec.time_logged, until)))
        return any(r["type"] == rec.type and r["dsn_action"] == rec.dsn_action
                   and r["operator"] == rec.operator for r in rows)

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        await self._call(lambda store: None)  # creates the store before the recorder opens it
        for sender in self.webhooks:
            self._tasks.append(self._loop.create_task(sender.run()))
        if self.webhooks and is_dsn(self.location):
            self._tasks.append(self._loop.create_task(self._listen()))
        if self.config.audit.seal_key:
            seal_key = load_private(self.config.audit.seal_key)  # refused at start if unreadable
            self._tasks.append(self._loop.create_task(self._seal_loop(seal_key)))
        policies = retention_policies(self.config)
        if policies:
            key_file = self.config.audit.pseudonymisation_key
            pseudo_key = load_key(key_file) if key_file else None
            self._tasks.append(self._loop.create_task(self._purge_loop(policies, pseudo_key)))

    async def _listen(self) -> None:
        """Wake the webhook senders on every commit to the shared store, whichever node made
        it (NOTIFY in the append's transaction): without this, events written by other nodes
        waited for the sender's next poll (5 s). Reconnects with backoff; the poll covers
        the gaps."""
        channel = commit_channel(self.config.cluster.schema_name)
        delay = 1.0
        while True:
            try:
                conn = await psycopg.AsyncConnection.connect(  # libpq's timeout: whole seconds
                    self.location, autocommit=True, connect_timeout=int(CONNECT_TIMEOUT),
                    application_name=f"postlane-audit-listen/{self.config.node.name}")
                async with conn:
                    await conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))
                    delay = 1.0
                    self.stored()  # whatever was committed while not listening
                    async for _ in conn.notifies():
                        self.stored()
            except psycopg.Error as exc:
                log.warning("cannot listen for audit commits at %s: %s; polling meanwhile",
                            redact(self.location), type(exc).__name__)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 30.0)

    async def _seal_loop(self, key) -> None:
        """Seal the days that have closed; a TSA or a store that is away is tried again at the
        next round (on PostgreSQL another node may seal first: the seal is stored once)."""
        audit = self.config.audit
        while True:
            try:
                made = await self._call(lambda store: seal_days(
                    store, key, time.time(), tsa_url=audit.tsa_url,
                    tsa_timeout=audit.tsa_timeout))
                for seal in made:
                    log.info("audit day sealed", extra={"day": seal.day, "last_seq":
                                                        seal.last_seq, "tsa": bool(seal.tsa)})
            except Exception as exc:  # noqa: BLE001 - told, and tried again next round
                log.warning("sealing the audit days failed: %s: %s; trying again in %.0fs",
                            type(exc).__name__, exc, audit.seal_interval)
            await asyncio.sleep(audit.seal_interval)

    async def _purge_loop(self, policies: dict[str, Retention], key: bytes | None) -> None:
        while True:
            try:
                report = await self._call(lambda store: store.purge(policies, key, time.time()))
                log.info("audit retention applied", extra={"report": report})
            except Exception:
                log.exception("audit retention failed")
            await asyncio.sleep(self.config.audit.purge_interval)

    async def stop(self) -> None:
        """Stop webhooks (their cursors are durable) and close the connection."""
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks.clear()
        async with self._lock:
            if self._store is not None:
                await asyncio.to_thread(self._store.close)
                self._store = None
        self._loop = None
