"""PostgreSQL for tests: one throwaway schema per test in the local server's ``test`` database.

Tests that need it skip with the reason when 127.0.0.1:5432 is unreachable; ``make test`` starts
the local cluster first when it is installed, so on a machine with PostgreSQL they always run.
"""

from __future__ import annotations

import os
import secrets
import socket
from collections.abc import AsyncIterator

import asyncpg
import pytest

PG_DSN = os.environ.get("POSTLANE_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")


def pg_reachable() -> bool:
    try:
        with socket.create_connection(("127.0.0.1", 5432), timeout=1):
            return True
    except OSError:
        return False


@pytest.fixture
async def pg_schema() -> AsyncIterator[str]:
    """A fresh schema name (created by the spool on open), dropped after the test."""
    if not pg_reachable():
        pytest.skip("PostgreSQL is not reachable on 127.0.0.1:5432 (make test starts it)")
    name = f"pl_test_{secrets.token_hex(4)}"
    yield name
    conn = await asyncpg.connect(PG_DSN)
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')
    finally:
        await conn.close()


@pytest.fixture
async def two_spools(pg_schema: str) -> AsyncIterator[tuple]:
    """Two open spools on one schema: two nodes sharing the queue."""
    from postlane.spool import PostgresSpool

    a, b = PostgresSpool(PG_DSN, pg_schema), PostgresSpool(PG_DSN, pg_schema)
    await a.open()
    await b.open()
    yield a, b
    await a.close()
    await b.close()
