"""The PostgreSQL spool's versioned schema (``MIGRATIONS``) and how a node applies it."""

from __future__ import annotations

import logging

import asyncpg

from ..schema import NewerSchema

__all__ = ["MIGRATIONS", "SCHEMA_VERSION", "migrate"]

log = logging.getLogger("postlane.spool")

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
    (5, """
ALTER TABLE nodes ADD COLUMN feedback_key TEXT NOT NULL DEFAULT '';
"""),
    (6, """
CREATE TABLE suppression_changes (
    seq BIGSERIAL PRIMARY KEY, origin TEXT NOT NULL, origin_n BIGINT NOT NULL, op TEXT NOT NULL,
    address TEXT NOT NULL, scope TEXT NOT NULL, reason TEXT NOT NULL, source TEXT NOT NULL,
    created DOUBLE PRECISION NOT NULL, expires DOUBLE PRECISION NOT NULL,
    at DOUBLE PRECISION NOT NULL, UNIQUE (origin, origin_n));
CREATE TABLE suppressions (
    address TEXT NOT NULL, scope TEXT NOT NULL, reason TEXT NOT NULL, source TEXT NOT NULL,
    created DOUBLE PRECISION NOT NULL, expires DOUBLE PRECISION NOT NULL, seq BIGINT NOT NULL,
    PRIMARY KEY (address, scope));
CREATE TABLE suppression_log (
    id INTEGER PRIMARY KEY CHECK (id = 1), cluster TEXT NOT NULL, trimmed BIGINT NOT NULL);
INSERT INTO suppression_log VALUES (1, md5(random()::text || clock_timestamp()::text), 0);
CREATE TABLE complaint_counts (
    node TEXT NOT NULL, pool TEXT NOT NULL, domain TEXT NOT NULL, delivered BIGINT NOT NULL,
    complaints BIGINT NOT NULL, PRIMARY KEY (node, pool, domain));
"""),
    (7, """
CREATE TABLE retry_requests (
    id BIGSERIAL PRIMARY KEY, selector JSONB NOT NULL, lift BOOLEAN NOT NULL,
    node TEXT NOT NULL, operator TEXT NOT NULL, via TEXT NOT NULL,
    at DOUBLE PRECISION NOT NULL);
"""),
    (8, """
ALTER TABLE messages ADD COLUMN smtputf8 BOOLEAN NOT NULL DEFAULT false;
"""),
    (9, """
ALTER TABLE alerts ADD COLUMN notified TEXT[];
"""),
    (10, """
ALTER TABLE monitor_slices ADD COLUMN counted BOOLEAN NOT NULL DEFAULT false;
CREATE INDEX monitor_slices_uncounted ON monitor_slices (at) WHERE NOT counted;
CREATE TABLE monitor_totals (cls TEXT PRIMARY KEY, delivered BIGINT NOT NULL);
"""),
    (11, """
ALTER TABLE monitor_slices ADD COLUMN part BIGINT NOT NULL DEFAULT 0;
ALTER TABLE monitor_slices DROP CONSTRAINT monitor_slices_pkey,
    ADD PRIMARY KEY (at, node, cls, part);
ALTER TABLE monitor_totals ADD COLUMN failed BIGINT NOT NULL DEFAULT 0;
INSERT INTO monitor_totals (cls, delivered, failed)
    SELECT cls, 0, sum(finals - (SELECT coalesce(sum(n), 0) FROM unnest(counts) AS n))
    FROM monitor_slices WHERE counted GROUP BY cls
    ON CONFLICT (cls) DO UPDATE SET failed = excluded.failed;
"""),
    (12, """
ALTER TABLE recipients ADD COLUMN pending TEXT NOT NULL DEFAULT '';
"""),
]
"""Versioned schema: append ``(n + 1, sql)``; never edit an applied entry."""

SCHEMA_VERSION = MIGRATIONS[-1][0]


async def migrate(conn: asyncpg.Connection, schema: str) -> None:
    """Create schema ``schema`` or bring it up to date, one node at a time (under an
    advisory lock), in one transaction."""
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))",
                           f"postlane:{schema}")
        await conn.execute(f'CREATE SCHEMA IF NOT EXISTS "{schema}"')
        await conn.execute(f'SET LOCAL search_path TO "{schema}"')
        await conn.execute("CREATE TABLE IF NOT EXISTS schema_migrations ("
                           " version INTEGER PRIMARY KEY,"
                           " applied_at TIMESTAMPTZ NOT NULL DEFAULT now())")
        current = await conn.fetchval(
            "SELECT coalesce(max(version), 0) FROM schema_migrations")
        if current > SCHEMA_VERSION:
            raise NewerSchema(f"PostgreSQL schema {schema!r} is at version"
                               f" {current}, newer than this Postlane ({SCHEMA_VERSION})")
        for version, sql in MIGRATIONS:
            if version > current:
                await conn.execute(sql)
                await conn.execute("INSERT INTO schema_migrations (version) VALUES ($1)",
                                   version)
                log.info("applied schema migration", extra={"version": version})
