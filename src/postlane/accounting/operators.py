"""Who ordered an operator action, and how its records say so: the part of operator actions the
parts that write those records (scheduler, spool, operations) share, below all of them."""

from __future__ import annotations

import os
import pwd
import time
from dataclasses import dataclass

from .records import Record

DONE = {"pause": "paused", "resume": "resumed", "retry": "retried now", "purge": "purged",
        "delete": "deleted", "hold": "held", "release": "released", "suppress": "suppressed",
        "unsuppress": "unsuppressed", "suppress-import": "imported into the suppression list",
        "drain": "asked to drain", "forget": "removed from the cluster's nodes"}
"""Each action (``dsnAction`` of its ``o`` records) and how the records word it."""


@dataclass(frozen=True, slots=True)
class Operator:
    """Who ordered an action, and how it came (``via``: "api" or "cli")."""

    name: str
    via: str = "api"

    @classmethod
    def local(cls) -> Operator:
        """The user running this command (who ran sudo, when it runs as root through sudo)."""
        name = pwd.getpwuid(os.getuid()).pw_name
        sudo = os.environ.get("SUDO_USER", "")
        if os.getuid() == 0 and sudo and sudo != "root":
            name = f"{sudo} (sudo)"
        return cls(name, "cli")


def stamp(rec: Record, action: str, who: Operator, what: str = "", note: str = "") -> Record:
    """Make ``rec`` the record of ``who``'s ``action``: ``operator`` set, how it came as
    ``srcType`` (every record of an action, the final ``b`` of a purge or delete too: an auditor
    sees the channel on each) and ``dsnDiag`` "[what ]<done> by operator <name>[note]"; an
    ``o`` record also gets the action as ``dsnAction``."""
    rec.operator, rec.src_type = who.name, who.via
    rec.dsn_diag = f"{what + ' ' if what else ''}{DONE[action]} by operator {who.name}{note}"
    if rec.type == "o":
        rec.dsn_action = action
    return rec


def action_record(action: str, who: Operator, *, pool: str = "", target: str = "",
                  what: str = "", note: str = "") -> Record:
    """The ``o`` record of an action on a pool or lane (``target`` "" for the whole pool,
    ``*@DOMAIN`` for its lane to DOMAIN) or on the suppression list (``target``: the address)."""
    now = time.time()
    return stamp(Record("o", now, now, "", target, "", "", pool), action, who, what, note)
