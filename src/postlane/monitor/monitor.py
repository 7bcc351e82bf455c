"""The node's monitor: latency per class and pool, SLA rules, alerts, and an hour of history.

It listens to the accounting stream (``Tracker``), evaluates the rules every ``evaluate_every``
seconds on the event loop, and keeps samples for the dashboard's charts. In a cluster the rules
run once for the cluster, on figures read from the shared spool (``cluster.py``); this node's
tracker then describes only its own intake and deliveries.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from prometheus_client.registry import Collector

from ..accounting.records import Record
from ..health import Health
from ..policy.intake import RcptIn
from ..spool import PostgresSpool, local_dir
from .alerts import (
    AlertManager,
    Condition,
    Notifier,
    log_notifier,
    mail_notifier,
    webhook_notifier,
)
from .cluster import ClusterMonitor
from .latency import QUANTILES, WINDOWS
from .loopwatch import LoopWatch
from .metrics import Metrics
from .tracker import ClassState, Tracker

if TYPE_CHECKING:
    from ..config import Config
    from ..scheduler.view import QueueView
    from ..spool import Spool

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
    def __init__(self, config: Config, spool: Spool, queue: QueueView,
                 submit: Callable[..., Awaitable[str]], status: Callable[[], dict],
                 health: Health, *,
                 conditions: Sequence[Callable[[float], list[Condition]]] = (),
                 collectors: Sequence[Collector] = ()) -> None:
        self.config = config
        self.queue = queue
        """The node's queue, read-only."""
        self.submit = submit
        """The intake's ``submit``: alert mail goes out as mail."""
        self.status = status
        """The node's status (lanes, pools, uptime) for /metrics."""
        self.health = health
        self.commits = spool.stats
        """The spool writer's commits (what every 250 waits for), for /metrics."""
        mon = self.config.monitor
        clustered = isinstance(spool, PostgresSpool)
        self.tracker = Tracker(self.config, counts_queue=not clustered)
        """This node's own records (on one node: its whole queue)."""
        self.cluster = ClusterMonitor(self, spool) if isinstance(spool, PostgresSpool) else None
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
        notifiers: list[Notifier] = [log_notifier]
        # in a cluster an alert is the cluster's (told by whichever node evaluates): say so
        cluster = self.config.cluster.schema_name if clustered else None
        if mon.webhook_url:
            notifiers.append(webhook_notifier(mon.webhook_url, self.config.node.name,
                                              mon.webhook_retries, mon.webhook_backoff,
                                              mon.webhook_timeout, cluster))
        if mon.ops_address:
            notifiers.append(mail_notifier(self._submit_alert_mail, self.config.node.name,
                                           mon.ops_from, mon.ops_address, cluster))
        journal = Path(self.config.accounting.directory) / "alerts.jsonl"
        # one node keeps its alerts in a file beside its spool; a cluster in its alerts table
        self.alerts = AlertManager(notifiers, mon.resolve_after, journal,
                                   retry_backoff=mon.webhook_backoff,
                                   state=None if clustered else local_dir(config) / "alerts.json")
        self.metrics = Metrics(self)
        self.loop_watch = LoopWatch(self.metrics.registry)
        """How late the event loop runs (``postlane_event_loop_lag_seconds``)."""
        for collector in collectors:  # after the monitor's own: /metrics keeps its order
            self.metrics.registry.register(collector)
        self.sources: list[Callable[[float], list[Condition]]] = list(conditions)
        """More alert conditions (the reputation service's), evaluated with the SLA rules."""
        self.history: deque[dict] = deque(maxlen=int(HISTORY_SECONDS / mon.sample_every) + 1)
        self._task: asyncio.Task | None = None
        self.seeded = False
        """The node counted its resumed queue into the tracker already (from the spool)."""

    def seed(self, depths: dict[str, int], outstanding: list[tuple], now: float) -> None:
        """Count a queue resumed from the spool by its counts (``SQLiteSpool.resume``), so
        ``start`` does not count it again from the recipients in memory."""
        self.tracker.seed_counts(depths, outstanding, now)
        self.seeded = True

    def on_record(self, rec: Record) -> None:
        """Accounting listener (registered by the node)."""
        self.tracker.on_record(rec)
        self.metrics.records.on_record(rec)

    async def start(self) -> None:
        now = time.time()
        if self.tracker.counts_queue and not self.seeded:
            self.tracker.seed(list(self.queue.recipients()), now)
        if self.cluster is None:  # what the last run decided, and had not told yet
            self.alerts.load(now)
            self.alerts.resend()
        self.loop_watch.start()
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        self.loop_watch.stop()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self.cluster is not None:
            await self.cluster.close()
        await self.alerts.close()

    async def _loop(self) -> None:
        mon = self.config.monitor
        next_sample = 0.0
        while True:
            now = time.time()
            try:
                if self.cluster is not None:
                    await self.cluster.tick(now)
                else:
                    self.evaluate(now)
                if now >= next_sample:
                    next_sample = now + mon.sample_every
                    figures = await self.cluster.current() if self.cluster else None
                    self.sample(now, None if figures is None else figures["classes"])
            except Exception:  # the monitor must never take the node down
                log.exception("monitor evaluation failed")
            await asyncio.sleep(mon.evaluate_every)

    async def _submit_alert_mail(self, data: bytes) -> str:
        classes = self.config.classes
        top = min(classes, key=lambda n: (classes[n].priority, n))
        mon = self.config.monitor
        return await self.submit(
            mon.ops_from, [RcptIn(mon.ops_address or "", "NEVER")], data, listener="monitor",
            src_type="monitor", forced_class=top)

    # -- rules ----------------------------------------------------------------------------------

    def conditions(self, now: float, tracker: Tracker | None = None) -> list[Condition]:
        """The rules that hold now, on ``tracker``'s figures (default: this node's)."""
        tracker = tracker or self.tracker
        out: list[Condition] = []
        for name, rule in self.rules.items():
            state = tracker.classes[name]
            q = state.latency.quantiles(now, rule.window, (0.95,))
            if q is not None and q[0.95] > rule.p95:
                out.append(Condition(
                    "latency-threshold", name, state.pool, q[0.95], rule.p95,
                    f"{name}: p95 delivery latency {_dur(q[0.95])} over the last"
                    f" {_dur(rule.window)} exceeds {_dur(rule.p95)} (SLA {_dur(rule.sla)})"))
            # + two ticks: the check runs every evaluate_every (and the loop may be late), yet
            # the alert must come at least lead_time ahead
            breach = tracker.predict_breach(
                name, now, rule.lead_time + 2 * self.config.monitor.evaluate_every)
            if breach is not None:
                text = (f"{name}: messages past their {_dur(rule.sla)} SLA" if breach <= 0 else
                        f"{name}: first SLA breach expected in {_dur(breach)}"
                        f" (lead time {_dur(rule.lead_time)})")
                rate = tracker.service_rate(state.pool, now)
                out.append(Condition("predicted-breach", name, state.pool, breach,
                                     rule.lead_time, text + f"; {state.depth} queued, draining"
                                     f" {rate:.2f}/s"))
        return out

    def evaluate(self, now: float) -> None:
        busy = self.queue.busy_pools()
        for pool, state in self.tracker.pools.items():
            if pool not in busy and state.busy_since is not None:
                self.tracker.mark_idle(pool)
        conditions = self.conditions(now) + [c for source in self.sources for c in source(now)]
        for event, alert in self.alerts.update(conditions, now):
            self.alerts.emit(event, alert)

    # -- views ----------------------------------------------------------------------------------

    def pool_oldest(self, now: float) -> dict[str, float]:
        """Oldest age per pool from the scheduler's lanes (each lane keeps its own: O(lanes))."""
        out: dict[str, float] = {}
        for (pool, _), age in self.queue.oldest(now).items():
            out[pool] = max(out.get(pool, 0.0), age)
        return out

    def class_states(self, now: float, tracker: Tracker | None = None) -> list[dict]:
        """Per class: SLA, latency percentiles per window, depth, oldest age, drain, breach
        estimate and rules, on ``tracker``'s figures (default: this node's); what
        /api/v1/sla, /metrics and the dashboard show."""
        tracker = tracker or self.tracker
        out = []
        for name, state in tracker.classes.items():
            oldest = tracker.oldest_age(name, now)
            if oldest is None:
                oldest = self.pool_oldest(now).get(state.pool, 0.0)
            rule = self.rules.get(name)
            breach = (tracker.predict_breach(name, now, rule.lead_time * 2)
                      if rule else None)
            out.append({
                "class": name, "pool": state.pool, "priority": state.priority,
                "sla_s": state.sla, "depth": state.depth, "oldest_age_s": round(oldest, 3),
                "drain_rate": round(tracker.drain_rate(state.pool, now), 3),
                "latency_s": _latency(state, now), "delivered_total": state.latency.total,
                "failed_total": state.failed,
                "breach_in_s": None if breach is None else round(breach, 3),
                "breached": _breached(state, now),
                "rules": None if rule is None else {
                    "p95_s": rule.p95, "window_s": rule.window, "lead_time_s": rule.lead_time},
            })
        return out

    def node_states(self, now: float) -> list[dict]:
        """Per class, this cluster node's own part: recipients it holds (claimed and not yet
        final: ready, in flight or waiting for a retry, as its status's ``queued``), accepted
        by its intake, delivered by it, and its own delivery latency. Read per scrape: from
        counters, never a walk of the queue."""
        held = Counter(self.queue.held_by_class())
        return [{"class": name, "pool": state.pool, "held": held[name],
                 "received_total": state.received, "delivered_total": state.latency.total,
                 "failed_total": state.failed,
                 "drain_rate": round(self.tracker.drain_rate(state.pool, now), 3),
                 "latency_s": _latency(state, now)}
                for name, state in self.tracker.classes.items()]

    async def sla(self, now: float) -> dict:
        """What /api/v1/sla serves: the queue's figures per class (in a cluster: the cluster's,
        as the evaluating node last computed them) and, in a cluster, this node's own."""
        if self.cluster is None:
            return {"scope": "node", "classes": self.class_states(now)}
        figures = await self.cluster.current()
        return {"scope": "cluster", "classes": self.every_class(figures),
                "evaluated_by": figures["leader"] if figures else None,
                "age_s": figures["age_s"] if figures else None,
                "stale": figures["stale"] if figures else True,
                "node": {"name": self.config.node.name, "classes": self.node_states(now)}}

    def every_class(self, figures: dict | None) -> list[dict]:
        """The cluster's figures per class, every configured class listed: one nobody has
        evaluated yet (no figures stored: a new cluster, or a node taking the evaluation over
        before its first) has its name, pool, SLA and rules and null figures (``stale`` says
        so), where the list used to be empty and a client iterating it saw no class at all."""
        found = {c["class"]: c for c in figures["classes"]} if figures else {}
        out = []
        for name, cls in self.config.classes.items():
            item = found.get(name)
            if item is None:
                rule = self.rules.get(name)
                item = {"class": name, "pool": cls.pool, "priority": cls.priority,
                        "sla_s": cls.sla, "depth": None, "oldest_age_s": None,
                        "drain_rate": None, "latency_s": dict.fromkeys(WINDOWS),
                        "delivered_total": None, "failed_total": None, "breach_in_s": None,
                        "breached": None, "rules": None if rule is None else {
                            "p95_s": rule.p95, "window_s": rule.window,
                            "lead_time_s": rule.lead_time}}
            out.append(item)
        return out

    async def alert_lists(self) -> dict:
        """Active and recently resolved alerts (in a cluster: the cluster's)."""
        if self.cluster is None:
            return {"active": [a.as_dict() for a in self.alerts.active.values()],
                    "resolved": [a.as_dict() for a in reversed(self.alerts.history)]}
        figures = await self.cluster.current()
        return figures["alerts"] if figures else {"active": [], "resolved": []}

    def sample(self, now: float, classes: list[dict] | None = None) -> None:
        """One point of the dashboard's history (``classes``: the cluster's figures)."""
        point: dict = {"t": round(now, 1), "classes": {}}
        for item in classes if classes is not None else self.class_states(now):
            one_min = item["latency_s"]["1m"] or {}
            point["classes"][item["class"]] = {
                "depth": item["depth"], "oldest_age_s": item["oldest_age_s"],
                **{f"p{round(q * 100)}": one_min.get(f"p{round(q * 100)}") for q in QUANTILES}}
        self.history.append(point)


def _latency(state: ClassState, now: float) -> dict:
    out = {}
    for label, seconds in WINDOWS.items():
        q = state.latency.quantiles(now, seconds)
        out[label] = None if q is None else {
            f"p{round(k * 100)}": round(v, 4) for k, v in q.items()}
    return out


def _breached(state: ClassState, now: float) -> int:
    """Queued recipients of an SLA class already past their deadline."""
    if state.sla is None:
        return 0
    if state.breached is not None:  # counted by the spool (cluster figures)
        return state.breached
    count = 0
    for queued_at, left, _ in state.outstanding.values():
        if queued_at + state.sla > now:
            break
        count += int(left)
    return count


def _dur(seconds: float) -> str:
    seconds = abs(seconds)
    if seconds < 120:
        return f"{seconds:.1f}s"
    if seconds < 7200:
        return f"{seconds / 60:.1f}min"
    return f"{seconds / 3600:.1f}h"
