"""Where a message waits: the durable spool (SQLite embedded; PostgreSQL for clusters)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from ..config.locations import is_dsn
from ..health import Health
from .base import (
    FINAL_STATES,
    Attempt,
    Message,
    Pending,
    Recipient,
    RecipientUpdate,
    Spool,
    SpoolUnavailable,
    State,
)
from .postgres import PostgresSpool
from .sqlite import SpoolInUse, SQLiteSpool

if TYPE_CHECKING:
    from ..config import Config

__all__ = ["FINAL_STATES", "Attempt", "Message", "Pending", "PostgresSpool", "Recipient",
           "RecipientUpdate", "SQLiteSpool", "Spool", "SpoolInUse", "SpoolUnavailable", "State",
           "is_dsn", "local_dir", "make_spool"]


def local_dir(config: Config) -> Path:
    """Where this node keeps its own files (audit store, suppression list, keys): the SQLite
    spool's folder or, in cluster mode, ``state/`` beside the node's accounting folder."""
    if is_dsn(config.node.spool):
        return Path(config.accounting.directory).parent / "state"
    return Path(config.node.spool)


def make_spool(location: str, schema: str = "postlane",
               node: str = "", health: Health | None = None) -> SQLiteSpool | PostgresSpool:
    """The spool ``node.spool`` names: a PostgreSQL DSN, or else a SQLite directory;
    ``node`` names its event writer, ``health`` is where its outages are told."""
    if is_dsn(location):
        return PostgresSpool(location, schema, node, health)
    return SQLiteSpool(location, node, health)
