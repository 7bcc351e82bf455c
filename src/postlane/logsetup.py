"""The node's log format: one JSON object per line (also used by its intake workers, which do
not import the whole node)."""

from __future__ import annotations

import json
import logging
import os
import sys

__all__ = ["setup_logging"]

_SYSLOG_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3,
                    logging.CRITICAL: 2}


def _stderr_is_journal() -> bool:
    """Whether systemd connected stderr to the journal ($JOURNAL_STREAM names its device and
    inode): then each line starts with its syslog priority, which journald takes as the
    entry's PRIORITY (``journalctl -p warning`` works) and strips from the message."""
    device, _, inode = os.environ.get("JOURNAL_STREAM", "").partition(":")
    try:
        st = os.fstat(sys.stderr.fileno())
        return (st.st_dev, st.st_ino) == (int(device), int(inode))
    except (ValueError, OSError):
        return False


def setup_logging(level: str = "INFO", node: str = "") -> None:
    """One JSON object per log line, so that log shippers need no parsing rules. ``node``:
    the node's name, on every line (``"node"``), so that the logs of a cluster's nodes can be
    read merged and each line still says which node it comes from."""
    prefix = _stderr_is_journal()

    class JSONFormatter(logging.Formatter):
        _skip = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}

        def format(self, record: logging.LogRecord) -> str:
            out = {"ts": round(record.created, 3), "level": record.levelname,
                   "logger": record.name, "msg": record.getMessage()}
            if node:
                out["node"] = node
            out.update({k: v for k, v in vars(record).items() if k not in self._skip})
            if record.exc_info:
                out["exc"] = self.formatException(record.exc_info)
            line = json.dumps(out, default=str)
            return f"<{_SYSLOG_PRIORITY.get(record.levelno, 6)}>{line}" if prefix else line

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JSONFormatter())
    logging.basicConfig(level=level, handlers=[handler], force=True)
