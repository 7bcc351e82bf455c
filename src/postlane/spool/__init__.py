"""Where a message waits: the durable spool (SQLite embedded; PostgreSQL for clusters)."""

from .base import FINAL_STATES, Message, Pending, Recipient, RecipientUpdate, Spool, State
from .postgres import PostgresSpool
from .sqlite import SQLiteSpool

__all__ = ["FINAL_STATES", "Message", "Pending", "PostgresSpool", "Recipient", "RecipientUpdate",
           "SQLiteSpool", "Spool", "State", "is_dsn", "make_spool"]


def is_dsn(location: str) -> bool:
    """Whether ``node.spool`` names a PostgreSQL database (cluster mode) rather than a folder."""
    return location.startswith(("postgresql://", "postgres://"))


def make_spool(location: str, schema: str = "postlane") -> SQLiteSpool | PostgresSpool:
    """The spool ``node.spool`` names: a PostgreSQL DSN, or else a SQLite directory."""
    if is_dsn(location):
        return PostgresSpool(location, schema)
    return SQLiteSpool(location)
