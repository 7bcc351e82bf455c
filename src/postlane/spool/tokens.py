"""Shared rate limits: token buckets in the cluster's database."""

from __future__ import annotations

from contextlib import AbstractAsyncContextManager
from typing import TYPE_CHECKING

import asyncpg

from .pgsql import NOW

__all__ = ["Tokens"]


class Tokens:
    """Token buckets shared by a cluster's nodes (a mixin of ``PostgresSpool``, which
    supplies ``acquire``): a rate per IP or destination that holds across nodes."""

    if TYPE_CHECKING:  # supplied by PostgresSpool
        def acquire(self) -> AbstractAsyncContextManager[asyncpg.Connection]: ...

    async def take_tokens(self, key: str, rate: float, burst: float, want: float) -> float:
        """Take up to ``want`` tokens from the shared bucket ``key`` (refilled at ``rate`` per
        second, holding at most ``burst``); returns how many were granted. One statement, so
        nodes taking at once serialize on the row and never grant more than the bucket holds."""
        avail = f"least($3::float8, b.tokens + $2::float8 * greatest(0, {NOW} - b.updated))"
        async with self.acquire() as conn:
            return await conn.fetchval(
                f"""INSERT INTO rate_buckets AS b (key, tokens, updated, granted)
                VALUES ($1, $3::float8 - least($4::float8, $3::float8), {NOW},
                        least($4::float8, $3::float8))
                ON CONFLICT (key) DO UPDATE SET
                    granted = least($4::float8, greatest(0, {avail})),
                    tokens = {avail} - least($4::float8, greatest(0, {avail})),
                    updated = {NOW}
                RETURNING granted""", key, rate, burst, want)
