"""A read-only view of the in-memory queue for the monitor, the API and the node's status: what
is queued where, and how old, without a way to change it (operator actions go through
``operations.py``)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from ..spool import Recipient

if TYPE_CHECKING:
    from .lanes import Lane
    from .scheduler import Scheduler


class QueueView:
    def __init__(self, scheduler: Scheduler) -> None:
        self._sched = scheduler

    def recipients(self) -> Iterator[Recipient]:
        """Every queued, deferred and held (not in-flight) recipient of this node."""
        return self._sched.recipients()

    def message(self, msg_id: str) -> list[Recipient]:
        """The queued, deferred and held recipients of one message (an index, not a walk)."""
        return self._sched.message(msg_id)

    def with_correlation_id(self, correlation_id: str) -> list[str]:
        """The ids of the messages held with this correlation id."""
        return self._sched.with_correlation_id(correlation_id)

    def held_by_class(self) -> dict[str, int]:
        """Per class, the recipients held in memory and not yet final, in flight included (a
        counter: O(classes), not a walk)."""
        return self._sched.held_by_class()

    def oldest(self, now: float) -> dict[tuple[str, str], float]:
        """Per lane, the age of its oldest message not yet final."""
        return self._sched.oldest(now)

    def lanes(self) -> list[Lane]:
        """The lanes (read them, do not change them)."""
        return list(self._sched.lanes.values())

    def busy_pools(self) -> set[str]:
        """Pools with a lane that has recipients ready (in memory or left in the spool) or in
        flight."""
        return {lane.pool for lane in self._sched.lanes.values()
                if lane.heap or lane.spooled or lane.inflight}

    def queued(self) -> int:
        return self._sched.queued()

    @property
    def classify(self) -> Callable[[str, str], str]:
        """Reply -> bounce category, as the scheduler's records name them."""
        return self._sched.classify

    def lane_rows(self, now: float) -> list[dict]:
        """Per lane: depth, ready, deferred, in flight, held, oldest age, connections, paused,
        waiting for rate tokens, seconds of suspension left."""
        oldest = self.oldest(now)
        return [{
            "pool": lane.pool, "domain": lane.domain, "depth": lane.depth(),
            "ready": lane.ready(), "deferred": lane.deferred, "inflight": lane.inflight,
            "held": lane.held, "oldest_age_s": round(oldest.get(lane.key, 0.0), 3),
            "connections": lane.workers,
            "paused": lane.paused, "rate_wait": lane.rate_wait,
            "suspended_s": round(max(0.0, lane.suspended_until - now), 1),
        } for lane in sorted(self._sched.lanes.values(), key=lambda ln: ln.key)]

    def pool_rows(self, pausable: Callable[[str], bool]) -> list[dict]:
        """Per pool: paused, connections in use and the cap, per source IP."""
        sched = self._sched
        return [{
            "pool": name, "pausable": pausable(name),
            "paused": (name, "*") in sched.paused,
            "paused_lanes": sorted(d for p, d in sched.paused if p == name and d != "*"),
            "connections": sum(s.in_use for s in slots),
            "cap": sum(s.max_smtp_out for s in slots),
            "ips": [{"address": s.address, "ehlo": s.ehlo, "in_use": s.in_use,
                     "max_smtp_out": s.max_smtp_out} for s in slots],
        } for name, slots in sched.slots.items()]

    def depth(self, pool: str, domain: str | None) -> int:
        """Recipients of a pool (or of its lane to ``domain``) not yet final."""
        return sum(lane.depth() for lane in self._sched.lanes.values()
                   if lane.pool == pool and domain in (None, lane.domain))
