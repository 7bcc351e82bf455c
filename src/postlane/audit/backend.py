"""Which audit store a node, the CLI and the webhooks use: the one place that names a backend.

One DSN in the config is enough for a cluster: with ``node.spool`` a PostgreSQL DSN, the audit
store lives in the same database and schema (``cluster.schema_name``) as the shared spool, so
every node appends to one chain. ``audit.path`` overrides: a SQLite file (each node its own
store, as before) or another PostgreSQL DSN.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from ..spool import is_dsn, local_dir
from .sqlite import SQLiteAuditStore
from .store import AuditStore

if TYPE_CHECKING:
    from ..config import Config

__all__ = ["audit_location", "open_audit_store", "open_store_at"]


def audit_location(config: Config) -> str:
    """``audit.path`` if set (a file or a DSN); else the spool's database in cluster mode; else
    ``audit.sqlite`` in the node's own folder."""
    if config.audit.path:
        return config.audit.path
    if is_dsn(config.node.spool):
        return config.node.spool
    return str(local_dir(config) / "audit.sqlite")


def open_store_at(location: str | Path, schema: str = "postlane", *,
                  readonly: bool = False) -> AuditStore:
    """The store at ``location``: a PostgreSQL DSN (tables in ``schema``) or a SQLite file.
    Raises ``StoreMissing`` (read-only, nothing there) or ``ConnectionError``."""
    if is_dsn(str(location)):
        from .postgres import PostgresAuditStore  # psycopg only where it is used

        return PostgresAuditStore(str(location), schema, readonly=readonly)
    return SQLiteAuditStore(location, readonly=readonly)


def open_audit_store(config: Config, *, readonly: bool = False) -> AuditStore:
    """The audit store ``config`` names (see ``audit_location``)."""
    return open_store_at(audit_location(config), config.cluster.schema_name, readonly=readonly)
