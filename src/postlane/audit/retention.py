"""Retention on any audit backend: pseudonymise, then delete to a tombstone, per class, never
laundering a row whose own hash does not check (``RetentionMixin``)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from .chain import (
    EXTRA_COLUMNS,
    INTACT,
    PSEUDONYMISED,
    PURGED,
    RECORD_COLUMNS,
    chain_hash,
    pseudonymise_row,
    row_cdigest,
    verify_tuple,
)
from .queries import rcpt_key
from .store import KEY_COLUMNS, Retention

__all__ = ["RetentionMixin"]

#: What a purged row keeps besides its chain columns (nothing personal; enough for statistics).
_KEPT_AFTER_PURGE = frozenset({"type", "time_logged", "time_queued", "queue_id", "cls",
                               "vmta_pool", "ev_writer", "ev_n"})
_PURGE_BATCH = 5000


class RetentionMixin:
    """Retention on any backend, which supplies ``_candidates`` (rows of a class queued before
    a cutoff, in some states, after a seq), ``_write_changes`` and ``_log_purge``."""

    def purge(self, policies: Mapping[str, Retention], key: bytes | None,
              now: float) -> dict[str, dict[str, int]]:
        """Apply retention: pseudonymise, then delete (to a tombstone), per class. A row whose
        own hash does not check is left alone and counted, so purging never launders a tamper."""
        report: dict[str, dict[str, int]] = {}
        for cls, policy in policies.items():
            counts = {"pseudonymised": 0, "purged": 0, "skipped_tampered": 0}
            if policy.pseudonymise is not None:
                if key is None:
                    raise ValueError("pseudonymisation needs a key")
                cutoff = now - policy.pseudonymise
                counts["pseudonymised"], bad = self._rewrite(
                    cls, cutoff, (INTACT,), lambda row: pseudonymise_row(row, key))
                counts["skipped_tampered"] += bad
                self._log_purge(now, cls, "pseudonymise", cutoff, counts["pseudonymised"])
            if policy.delete is not None:
                cutoff = now - policy.delete
                counts["purged"], bad = self._rewrite(cls, cutoff, (INTACT, PSEUDONYMISED),
                                                      _tombstone)
                counts["skipped_tampered"] += bad
                self._log_purge(now, cls, "delete", cutoff, counts["purged"])
            report[cls] = counts
        return report

    def _rewrite(self, cls: str, cutoff: float, states: tuple[int, ...],
                 change: Callable[[dict], dict]) -> tuple[int, int]:
        done = bad = 0
        last = 0
        while True:
            rows = self._candidates(cls, cutoff, states, last, _PURGE_BATCH)
            if not rows:
                return done, bad
            last = rows[-1]["seq"]
            updates = []
            for row in rows:
                cdigest, complaint = row_cdigest(verify_tuple(row))
                if complaint or chain_hash(bytes(row["prev"]), cdigest) != bytes(row["hash"]):
                    bad += 1
                    continue
                row["cdigest"] = cdigest
                new = change(row)
                if "rcpt" in new:  # the look-up key goes with the address it was made from
                    new["rcpt_key"] = rcpt_key(new["rcpt"])
                updates.append((row["seq"], new))
            if updates:
                done += self._write_changes(updates, states)

    def _candidates(self, cls: str, cutoff: float, states: tuple[int, ...], after: int,
                    limit: int) -> list[dict]:
        raise NotImplementedError

    def _write_changes(self, updates: list[tuple[int, dict]], states: tuple[int, ...]) -> int:
        """Apply ``updates`` (seq, new values) to rows still in ``states``; returns how many."""
        raise NotImplementedError

    def _log_purge(self, now: float, cls: str, action: str, cutoff: float, rows: int) -> None:
        raise NotImplementedError


def _tombstone(row: dict) -> dict:
    new: dict[str, Any] = {c: None for c in RECORD_COLUMNS + EXTRA_COLUMNS + KEY_COLUMNS
                           if c not in _KEPT_AFTER_PURGE}
    new.update(state=PURGED, cdigest=row["cdigest"], nonce=None, pdigest=None)
    return new
