"""The node's monitor: latency per class and pool, SLA rules, alerts, and an hour of history.

It listens to the accounting stream (``Tracker``), evaluates the rules every ``evaluate_every``
seconds on the event loop, and keeps samples for the dashboard's charts.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..accounting.records import Record
from ..policy.intake import RcptIn
from .alerts import AlertManager, Condition, log_notifier, mail_notifier, webhook_notifier
from .latency import QUANTILES, WINDOWS
from .metrics import Metrics
from .tracker import Tracker

if TYPE_CHECKING:
    from ..node import Node

log = logging.getLogger("postlane.monitor")

HISTORY_SECONDS = 3600.0


@dataclass(slots=True, frozen=True)
class Rules:
    """The effective rules of one SLA class (config values or their SLA-derived defaults)."""

    sla: float
    p95: float
    window: float
    lead_time: float


class Monitor:
    def __init__(self, node: Node) -> None:
        self.node = node
        self.config = node.config
        mon = self.config.monitor
        self.tracker = Tracker(self.config)
        self.rules: dict[str, Rules] = {}
        for name, cls in self.config.classes.items():
            if cls.sla is not None:
                rule = mon.sla.get(name)
                self.rules[name] = Rules(
                    sla=cls.sla,
                    p95=rule.p95 if rule and rule.p95 is not None else cls.sla / 3,
                    window=rule.window if rule else 300.0,
                    lead_time=rule.lead_time if rule and rule.lead_time is not None
                    else cls.sla / 2)
        notifiers = [log_notifier]
        if mon.webhook_url:
            notifiers.append(webhook_notifier(mon.webhook_url, self.config.node.name,
                                              mon.webhook_retries, mon.webhook_backoff,
                                              mon.webhook_timeout))
        if mon.ops_address:
            notifiers.append(mail_notifier(self._submit_alert_mail, self.config.node.name,
                                           mon.ops_from, mon.ops_address))
        journal = Path(self.config.accounting.directory) / "alerts.jsonl"
        self.alerts = AlertManager(notifiers, mon.resolve_after, journal)
        self.metrics = Metrics(self)
        self.sources: list[Callable[[float], list[Condition]]] = []
        """More alert conditions (the reputation service's), evaluated with the SLA rules."""
        self.history: deque[dict] = deque(maxlen=int(HISTORY_SECONDS / mon.sample_every) + 1)
        self._pool_oldest: dict[str, float] = {}
        self._task: asyncio.Task | None = None

    def on_record(self, rec: Record) -> None:
        """Accounting listener (registered by the node)."""
        self.tracker.on_record(rec)
        self.metrics.on_record(rec)

    async def start(self) -> None:
        now = time.time()
        self.tracker.seed(list(self.node.scheduler.recipients()), now)
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.alerts.close()

    async def _loop(self) -> None:
        mon = self.config.monitor
        next_sample = 0.0
        while True:
            now = time.time()
            try:
                self.evaluate(now)
                if now >= next_sample:
                    self.sample(now)
                    next_sample = now + mon.sample_every
            except Exception:  # the monitor must never take the node down
                log.exception("monitor evaluation failed")
            await asyncio.sleep(mon.evaluate_every)

    async def _submit_alert_mail(self, data: bytes) -> str:
        classes = self.config.classes
        top = min(classes, key=lambda n: (classes[n].priority, n))
        mon = self.config.monitor
        return await self.node.intake.submit(
            mon.ops_from, [RcptIn(mon.ops_address or "", "NEVER")], data, listener="monitor",
            src_type="monitor", forced_class=top)

    # -- rules ----------------------------------------------------------------------------------

    def conditions(self, now: float) -> list[Condition]:
        out: list[Condition] = []
        for name, rule in self.rules.items():
            state = self.tracker.classes[name]
            q = state.latency.quantiles(now, rule.window, (0.95,))
            if q is not None and q[0.95] > rule.p95:
                out.append(Condition(
                    "latency-threshold", name, state.pool, q[0.95], rule.p95,
                    f"{name}: p95 delivery latency {_dur(q[0.95])} over the last"
                    f" {_dur(rule.window)} exceeds {_dur(rule.p95)} (SLA {_dur(rule.sla)})"))
            # + two ticks: the check runs every evaluate_every (and the loop may be late), yet
            # the alert must come at least lead_time ahead
            breach = self.tracker.predict_breach(
                name, now, rule.lead_time + 2 * self.config.monitor.evaluate_every)
            if breach is not None:
                text = (f"{name}: messages past their {_dur(rule.sla)} SLA" if breach <= 0 else
                        f"{name}: first SLA breach expected in {_dur(breach)}"
                        f" (lead time {_dur(rule.lead_time)})")
                rate = self.tracker.service_rate(state.pool, now)
                out.append(Condition("predicted-breach", name, state.pool, breach,
                                     rule.lead_time, text + f"; {state.depth} queued, draining"
                                     f" {rate:.2f}/s"))
        return out

    def evaluate(self, now: float) -> None:
        busy = {lane.pool for lane in self.node.scheduler.lanes.values()
                if lane.heap or lane.inflight}
        for pool, state in self.tracker.pools.items():
            if pool not in busy and state.busy_since is not None:
                self.tracker.mark_idle(pool)
        self.alerts.update(self.conditions(now) + [c for source in self.sources
                                                   for c in source(now)], now)

    # -- views ----------------------------------------------------------------------------------

    def pool_oldest(self, now: float) -> dict[str, float]:
        """Oldest queued age per pool from the scheduler's lanes; walking every lane's heap is
        O(queued), so the result is reused for one sample interval."""
        if self._pool_oldest.get("_at", 0.0) + self.config.monitor.sample_every <= now:
            out: dict[str, float] = {"_at": now}
            for (pool, _), age in self.node.scheduler.oldest(now).items():
                out[pool] = max(out.get(pool, 0.0), age)
            self._pool_oldest = out
        return self._pool_oldest

    def class_states(self, now: float) -> list[dict]:
        """Per class: SLA, latency percentiles per window, depth, oldest age, drain, breach
        estimate and rules; what /api/v1/sla, /metrics and the dashboard show."""
        out = []
        for name, state in self.tracker.classes.items():
            oldest = self.tracker.oldest_age(name, now)
            if oldest is None:
                oldest = self.pool_oldest(now).get(state.pool, 0.0)
            rule = self.rules.get(name)
            latency = {}
            for label, seconds in WINDOWS.items():
                q = state.latency.quantiles(now, seconds)
                latency[label] = None if q is None else {
                    f"p{round(k * 100)}": round(v, 4) for k, v in q.items()}
            breach = (self.tracker.predict_breach(name, now, rule.lead_time * 2)
                      if rule else None)
            out.append({
                "class": name, "pool": state.pool, "priority": state.priority,
                "sla_s": state.sla, "depth": state.depth, "oldest_age_s": round(oldest, 3),
                "drain_rate": round(self.tracker.drain_rate(state.pool, now), 3),
                "latency_s": latency, "delivered_total": state.latency.total,
                "breach_in_s": None if breach is None else round(breach, 3),
                "breached": self._breached(name, now),
                "rules": None if rule is None else {
                    "p95_s": rule.p95, "window_s": rule.window, "lead_time_s": rule.lead_time},
            })
        return out

    def _breached(self, name: str, now: float) -> int:
        """Outstanding recipients already past their deadline."""
        state = self.tracker.classes[name]
        if state.sla is None:
            return 0
        count = 0
        for queued_at, left, _ in state.outstanding.values():
            if queued_at + state.sla > now:
                break
            count += int(left)
        return count

    def sample(self, now: float) -> None:
        point: dict = {"t": round(now, 1), "classes": {}}
        for item in self.class_states(now):
            one_min = item["latency_s"]["1m"] or {}
            point["classes"][item["class"]] = {
                "depth": item["depth"], "oldest_age_s": item["oldest_age_s"],
                **{f"p{round(q * 100)}": one_min.get(f"p{round(q * 100)}") for q in QUANTILES}}
        self.history.append(point)


def _dur(seconds: float) -> str:
    seconds = abs(seconds)
    if seconds < 120:
        return f"{seconds:.1f}s"
    if seconds < 7200:
        return f"{seconds / 60:.1f}min"
    return f"{seconds / 3600:.1f}h"
