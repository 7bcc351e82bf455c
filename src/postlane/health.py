"""Degraded states of a node, told once: when one starts, while it lasts, when it ends.

During an outage an operator needs its story, not a line (or a traceback) per refused message:
each state - low disk, the database unreachable, a DKIM key missing, a destination down - is
logged once when it starts, with its cause and what the node now does (what intake answers),
counted while it lasts (``postlane_degraded`` and ``postlane_degraded_events_total``), and logged
once when it ends, with its duration and how many refusals or deferrals it caused.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from dataclasses import dataclass

log = logging.getLogger("postlane.health")


@dataclass(slots=True)
class Degradation:
    key: str
    """What is degraded: ``database``, ``disk``, ``dkim-key:sel._domainkey.example.com``,
    ``destination:bulk/example.com`` ..."""
    kind: str
    """The metric label: database, spool, disk, audit, dkim_key, destination."""
    what: str
    cause: str
    effect: str
    unit: str | None
    """What ``count`` counts while it lasts (refusals, deferrals), if anything."""
    since: float
    started: float
    count: int = 0

    def as_dict(self) -> dict:
        return {"key": self.key, "kind": self.kind, "what": self.what, "cause": self.cause,
                "effect": self.effect, "since": round(self.since, 3),
                "duration_s": round(time.monotonic() - self.started, 1),
                **({self.unit: self.count} if self.unit else {})}


class Health:
    """The node's degraded states. Thread-safe: the audit writer reports from its thread."""

    def __init__(self) -> None:
        self.active: dict[str, Degradation] = {}
        self.events: Counter[str] = Counter()
        """Per kind: refusals or deferrals counted while degraded (a Prometheus counter)."""
        self._lock = threading.Lock()

    def begin(self, key: str, kind: str, what: str, cause: str, effect: str,
              unit: str | None = "refusals", level: int = logging.WARNING) -> None:
        """Enter a degraded state (logged); nothing happens while ``key`` is already active."""
        with self._lock:
            if key in self.active:
                return
            self.active[key] = Degradation(key, kind, what, cause, effect, unit, time.time(),
                                           time.monotonic())
        log.log(level, f"{what}: {effect} ({cause})",
                extra={"degraded": kind, "key": key, "event": "start", "cause": cause,
                       "effect": effect})

    def count(self, key: str, n: int = 1) -> None:
        """One more refusal (or deferral) because of ``key``, if it is active."""
        with self._lock:
            state = self.active.get(key)
            if state is not None:
                state.count += n
                self.events[state.kind] += n

    def end(self, key: str) -> None:
        """Leave a degraded state (logged with its duration); nothing if ``key`` is not active."""
        if key not in self.active:  # the common case: a dict look-up, no lock
            return
        with self._lock:
            state = self.active.pop(key, None)
        if state is None:
            return
        duration = time.monotonic() - state.started
        counted = {state.unit: state.count} if state.unit else {}
        tail = f", {state.count} {state.unit}" if state.unit else ""
        log.warning(f"{state.what}: over after {duration:.1f}s{tail}",
                    extra={"degraded": state.kind, "key": key, "event": "end",
                           "duration_s": round(duration, 1), **counted})

    def counts(self) -> tuple[Counter[str], Counter[str]]:
        """Per kind: states active now, and refusals or deferrals counted so far."""
        with self._lock:
            return Counter(state.kind for state in self.active.values()), Counter(self.events)

    def states(self) -> list[dict]:
        """The active states, for the status API."""
        with self._lock:
            return [state.as_dict() for state in self.active.values()]
