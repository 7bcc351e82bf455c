"""``postlane upgrade [--check]``: where each store's schema stands against this release.

Every store migrates itself when a node opens it (one transaction; PostgreSQL under an advisory
lock, so nodes of a cluster take turns). ``--check`` says beforehand what that will do, without
changing anything: which stores have migrations pending, and which are newer than this release
(a downgrade, which the node refuses: restore the backup taken before the upgrade instead).
Without ``--check`` the SQLite stores are migrated at once, with the node stopped.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .. import schema
from ..audit import sqlite as audit_sqlite
from ..audit.backend import audit_location
from ..config import Config
from ..feedback import suppression
from ..reputation import store as reputation_store
from ..spool import is_dsn, local_dir
from ..spool import postgres as spool_postgres
from ..spool import sqlite as spool_sqlite
from ..spool.hold import locked

__all__ = ["StoreState", "UnreadableStore", "apply", "states"]


class UnreadableStore(Exception):
    """A store SQLite cannot read (not a database, cut short): the message names its file."""


@dataclass
class StoreState:
    store: str
    location: str
    current: int | None
    """None: not created yet (the node creates it at the latest version)."""
    latest: int

    @property
    def status(self) -> str:
        if self.current is None:
            return "absent"
        if self.current > self.latest:
            return "newer"
        return "pending" if self.current < self.latest else "ok"


def _spool_version(conn: sqlite3.Connection) -> int:
    if not schema.columns(conn, "messages"):
        return 0
    row = conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
    return int(row[0]) if row else 1


def _sqlite(path: Path, read: Callable[[sqlite3.Connection], int]) -> int | None:
    if not path.is_file():
        return None
    conn = sqlite3.connect(path, timeout=30)  # reads only; the node may be running
    try:
        return read(conn) or None
    finally:
        conn.close()


def _postgres(dsn: str, schema_name: str, table: str) -> int | None:
    import psycopg

    with psycopg.connect(dsn, autocommit=True, connect_timeout=10) as conn:
        found = conn.execute("SELECT to_regclass(%s)", (f'"{schema_name}".{table}',)).fetchone()
        if found is None:  # a SELECT without FROM always yields one row
            raise RuntimeError("PostgreSQL returned no row for SELECT to_regclass(...)")
        if found[0] is None:
            return None
        latest = conn.execute(f'SELECT max(version) FROM "{schema_name}".{table}').fetchone()
        if latest is None:  # an aggregate always yields one row
            raise RuntimeError(f"PostgreSQL returned no row for max(version) of {table}")
        return latest[0]


def states(cfg: Config) -> list[StoreState]:
    """Each store the config uses, with its version on disk and this release's."""
    out: list[StoreState] = []
    pg_schema = cfg.cluster.schema_name

    def add(name: str, location: str, table: str, latest: int,
            read: Callable[[sqlite3.Connection], int]) -> None:
        if is_dsn(location):
            current = _postgres(location, pg_schema, table)
            location = f"PostgreSQL schema {pg_schema}"
        else:
            try:
                current = _sqlite(Path(location), read)
            except sqlite3.DatabaseError as exc:  # which of the stores, not only what
                raise UnreadableStore(f"{name} {location}: {exc}") from None
        out.append(StoreState(name, location, current, latest))

    state = local_dir(cfg)
    spool = cfg.node.spool if is_dsn(cfg.node.spool) else str(state / "spool.sqlite")
    add("spool", spool, "schema_migrations", spool_postgres.SCHEMA_VERSION if is_dsn(spool)
        else spool_sqlite.SCHEMA_VERSION, _spool_version)
    if cfg.audit.enabled:
        location = audit_location(cfg)
        from ..audit import postgres as audit_postgres

        add("audit store", location, "audit_migrations",
            audit_postgres.SCHEMA_VERSION if is_dsn(location)
            else audit_sqlite.MIGRATIONS[-1][0],
            lambda c: schema.version(c, "audit_migrations", audit_sqlite.baseline))
    add("suppression list", cfg.feedback.suppression_db or str(state / "suppression.sqlite3"),
        "suppression_migrations", suppression.MIGRATIONS[-1][0],
        lambda c: schema.version(c, "suppression_migrations", suppression.baseline))
    add("reputation store", cfg.reputation.store or (
        cfg.node.spool if is_dsn(cfg.node.spool) else str(state / "reputation.sqlite3")),
        "reputation_migrations", reputation_store.MIGRATIONS[-1][0],
        lambda c: schema.version(c, "reputation_migrations", lambda _: 0))
    return out


def apply(cfg: Config) -> list[StoreState]:
    """Migrate the SQLite stores that have migrations pending (the node stopped); returns what
    was migrated. PostgreSQL stores are migrated by the first node that starts."""
    from ..feedback.suppression import SuppressionList
    from ..reputation.store import ReputationStore

    pending = [st for st in states(cfg)
               if st.status == "pending" and not st.location.startswith("PostgreSQL")]
    if pending and locked(Path(cfg.accounting.directory)):  # a running recorder's lock
        raise RuntimeError("a node is running on these stores (its recorder holds"
                           f" {cfg.accounting.directory}): stop it first, or let it migrate"
                           " them at its next start")
    done = []
    for st in pending:
        if st.store == "spool":
            conn = sqlite3.connect(st.location, isolation_level=None)
            try:
                spool_sqlite.migrate(conn, Path(st.location))
            finally:
                conn.close()
        elif st.store == "audit store":
            audit_sqlite.SQLiteAuditStore(st.location).close()
        elif st.store == "suppression list":
            SuppressionList(st.location).close()
        else:
            ReputationStore(st.location).close()
        done.append(st)
    return done
