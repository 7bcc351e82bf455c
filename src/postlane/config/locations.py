"""What a location in the config names (no pydantic: the spool and the child processes use it)."""

from __future__ import annotations


def is_dsn(location: str) -> bool:
    """Whether ``node.spool`` names a PostgreSQL database (cluster mode) rather than a folder."""
    return location.startswith(("postgresql://", "postgres://"))
