"""The audit store backends for the contract suite: open a store, and tamper with it in SQL.

``audit_backend`` (a fixture of every test module, through conftest) runs a test once on a
SQLite file and once on a PostgreSQL schema of its own (skipped with the reason when PostgreSQL
is not reachable). Tampering goes straight to the
database, as an attacker with write access would, never through the store.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import psycopg
import pytest
from psycopg.rows import dict_row

from postlane.audit.backend import open_store_at
from postlane.audit.store import AuditStore
from tests.support.pg import PG_DSN


class AuditBackend:
    name: str
    location: str
    schema = "postlane"

    def open(self, *, readonly: bool = False) -> AuditStore:
        return open_store_at(self.location, self.schema, readonly=readonly)

    def cli(self) -> list[str]:
        """The CLI options naming this store."""
        return ["--db", self.location, "--schema", self.schema]

    def toml(self) -> str:
        """Config lines pointing a node's audit store here; ``[audit]`` is left open, so more
        of its keys may follow."""
        return f'[cluster]\nschema_name = "{self.schema}"\n[audit]\npath = "{self.location}"\n'

    def sql(self, *statements: tuple) -> None:
        """Run (sql, params) statements in one transaction; ``?`` marks parameters."""
        raise NotImplementedError

    def row(self, seq: int) -> dict:
        raise NotImplementedError

    def insert(self, row: dict) -> None:
        self.sql((f"INSERT INTO audit_records ({', '.join(row)}) VALUES "
                  f"({', '.join('?' * len(row))})", list(row.values())))


class SQLiteBackend(AuditBackend):
    name = "sqlite"

    def __init__(self, path: Path) -> None:
        self.location = str(path)

    def sql(self, *statements: tuple) -> None:
        db = sqlite3.connect(self.location)
        for stmt in statements:
            db.execute(*stmt)
        db.commit()
        db.close()

    def row(self, seq: int) -> dict:
        db = sqlite3.connect(self.location)
        db.row_factory = sqlite3.Row
        row = dict(db.execute("SELECT * FROM audit_records WHERE seq = ?", (seq,)).fetchone())
        db.close()
        return row


class PostgresBackend(AuditBackend):
    name = "postgres"

    def __init__(self, dsn: str, schema: str) -> None:
        self.location = dsn
        self.schema = schema

    def _connect(self) -> psycopg.Connection:
        conn = psycopg.connect(self.location)
        conn.execute(f'SET search_path TO "{self.schema}"')
        return conn

    def sql(self, *statements: tuple) -> None:
        with self._connect() as conn:  # commits on a clean exit
            for stmt in statements:
                conn.execute(stmt[0].replace("?", "%s"), *stmt[1:])

    def row(self, seq: int) -> dict:
        with self._connect() as conn, conn.cursor(row_factory=dict_row) as cur:
            return cur.execute("SELECT * FROM audit_records WHERE seq = %s", (seq,)).fetchone()


@pytest.fixture(params=["sqlite", "postgres"])
def audit_backend(request, tmp_path) -> AuditBackend:
    if request.param == "sqlite":
        return SQLiteBackend(tmp_path / "audit.sqlite")
    return PostgresBackend(PG_DSN, request.getfixturevalue("pg_schema"))
