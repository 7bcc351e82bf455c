"""Complaint rates per pool and per destination domain, with an alert above a threshold.

Gmail and Yahoo require bulk senders to stay under 0.3 % of complaints; the default alert is at
0.1 % so that there is time to act. The rate is complaints / deliveries since the node started
(the monitor turns the counters into time series; ``rates()`` is what it reads). In a cluster
it counts every live node's (``SharedRates``): a complaint for mail one node delivered may reach
another, and a pool's reputation is the cluster's.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from collections.abc import Iterable
from typing import TYPE_CHECKING

from ..spool.pgsql import UNREACHABLE

if TYPE_CHECKING:
    from ..config.model import FeedbackConfig
    from ..spool import PostgresSpool

__all__ = ["ComplaintRates", "SharedRates"]

log = logging.getLogger("postlane.feedback")


class ComplaintRates:
    def __init__(self, alert_rate: float, min_delivered: int) -> None:
        self.alert_rate = alert_rate
        self.min_delivered = min_delivered
        self.delivered: Counter[tuple[str, str]] = Counter()
        self.complaints: Counter[tuple[str, str]] = Counter()
        """This node's counts."""
        self.others_delivered: Counter[tuple[str, str]] = Counter()
        self.others_complaints: Counter[tuple[str, str]] = Counter()
        """The other live nodes' counts, in a cluster (``merge``)."""
        self.alerting: set[tuple[str, str]] = set()
        self._changed: set[tuple[str, str]] = set()

    @classmethod
    def for_config(cls, feedback: FeedbackConfig) -> ComplaintRates:
        """The rates ``[feedback]`` asks for (its alert threshold and minimum volume)."""
        return cls(feedback.complaint_alert_rate, feedback.complaint_min_delivered)

    def on_delivered(self, pool: str, domain: str) -> None:
        for key in ((pool, domain), (pool, "*")):
            self.delivered[key] += 1
            self._changed.add(key)

    def on_complaint(self, pool: str, domain: str) -> None:
        for key in ((pool, domain), (pool, "*")):
            self.complaints[key] += 1
            self._changed.add(key)
            self._check(key)

    def sent(self, pool: str, domain: str = "*") -> int:
        """Deliveries counted (the cluster's, in a cluster)."""
        return self.delivered[(pool, domain)] + self.others_delivered[(pool, domain)]

    def complained(self, pool: str, domain: str = "*") -> int:
        return self.complaints[(pool, domain)] + self.others_complaints[(pool, domain)]

    def rate(self, pool: str, domain: str = "*") -> float:
        sent = self.sent(pool, domain)
        return self.complained(pool, domain) / sent if sent else 0.0

    def _check(self, key: tuple[str, str]) -> None:
        rate = self.rate(*key)
        over = self.sent(*key) >= self.min_delivered and rate > self.alert_rate
        if over and key not in self.alerting:
            self.alerting.add(key)
            log.warning("complaint rate above threshold", extra={
                "pool": key[0], "domain": key[1], "rate": round(rate, 5),
                "threshold": self.alert_rate, "complaints": self.complained(*key),
                "delivered": self.sent(*key)})
        elif not over:
            self.alerting.discard(key)

    def changed(self) -> list[tuple[str, str, int, int]]:
        """This node's counts (pool, domain, delivered, complaints) changed since the last
        call, for the cluster's table."""
        keys, self._changed = self._changed, set()
        return [(p, d, self.delivered[(p, d)], self.complaints[(p, d)]) for p, d in sorted(keys)]

    def mark_changed(self, keys: Iterable[tuple[str, str]]) -> None:
        self._changed.update(keys)

    def merge(self, others: Iterable[tuple[str, str, int, int]]) -> None:
        """Take the other live nodes' counts (pool, domain, delivered, complaints), summed."""
        old = set(self.others_delivered) | set(self.others_complaints)
        self.others_delivered, self.others_complaints = Counter(), Counter()
        for pool, domain, delivered, complaints in others:
            self.others_delivered[(pool, domain)] = delivered
            self.others_complaints[(pool, domain)] = complaints
        for key in old | set(self.others_delivered) | set(self.others_complaints):
            if self.complained(*key) or key in self.alerting:
                self._check(key)

    def rates(self) -> list[dict]:
        """One row per pool ("*" domain: the whole pool) and per pool/domain with deliveries or
        complaints, for /metrics and the status page."""
        keys = sorted(set(self.delivered) | set(self.complaints) | set(self.others_delivered)
                      | set(self.others_complaints))
        return [{"pool": p, "domain": d, "delivered": self.sent(p, d),
                 "complaints": self.complained(p, d), "rate": round(self.rate(p, d), 6),
                 "alert": (p, d) in self.alerting} for p, d in keys]


class SharedRates:
    """Complaint rates of the whole cluster: each node writes its own counts (since its start)
    and adds the other live nodes' to what it reports, every ``RATES_TICK`` seconds."""

    RATES_TICK = 2.0

    def __init__(self, spool: PostgresSpool, rates: ComplaintRates, node: str,
                 dead_after: float) -> None:
        self.spool = spool
        self.rates = rates
        self.node = node
        self.dead_after = dead_after
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        """Count from nothing, as one node does at its start (a previous life's row goes)."""
        await self.spool.clear_complaint_counts(self.node)
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        """Stop; the counts stay (the others drop them once this node is dead)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def sync(self) -> None:
        """Write this node's changed counts, read the others'."""
        counts = self.rates.changed()
        try:
            await self.spool.put_complaint_counts(self.node, counts)
        except BaseException:
            self.rates.mark_changed((p, d) for p, d, _, _ in counts)  # written next time
            raise
        self.rates.merge(await self.spool.other_complaint_counts(self.node, self.dead_after))

    async def _run(self) -> None:
        failing = False
        while True:
            await asyncio.sleep(self.RATES_TICK)
            try:
                await self.sync()
            except Exception as exc:  # told once per outage; the node's own counts go on
                if not failing:
                    failing = True
                    log.warning("complaint counts not shared with the cluster (%s: %s)",
                                type(exc).__name__, exc,
                                exc_info=not isinstance(exc, (*UNREACHABLE, RuntimeError)))
                continue
            failing = False
