"""Where a message waits: the durable spool (SQLite embedded; PostgreSQL for clusters)."""

from .base import FINAL_STATES, Message, Pending, Recipient, RecipientUpdate, Spool, State
from .sqlite import SQLiteSpool

__all__ = ["FINAL_STATES", "Message", "Pending", "Recipient", "RecipientUpdate", "SQLiteSpool",
           "Spool", "State"]
