"""Time-in-queue tracking, fed by the accounting record stream.

Every event the node logs passes through ``Tracker.on_record``, so the monitor sees exactly what
the audit trail says, whichever component produced it, and needs no hooks in the hot paths.
Classes with an SLA keep their outstanding messages in injection order (which, with one SLA per
class, is deadline order): that is what the breach predictor walks.

On one node the tracker counts the queue from the records (the node owns its whole queue). In a
cluster a node's records describe only its own intake and deliveries, so its tracker counts no
queue; the cluster's queue is read from the shared spool (``monitor/cluster.py``), which fills a
tracker of its own with it and with the latency slices every node's spool writes with its
outcomes (``outcome_slices``).
"""

from __future__ import annotations

import math
from bisect import bisect_left, bisect_right
from collections import OrderedDict
from collections.abc import Container, Iterable
from dataclasses import dataclass, field

from ..accounting.records import Record
from ..config import Config
from ..spool import Recipient
from .latency import Series, bucket_of

RECENT_MESSAGES = 10_000
"""Finished messages kept for lookups by queue id or correlation id."""
RECENT_RECIPIENTS = 50_000
"""... and at most this many of their recipients (~0.4 KB each): a message may have 1,000
(``max_recipients``), and 10,000 such messages held 10 million outcomes (gigabytes)."""


@dataclass(slots=True)
class ClassState:
    name: str
    pool: str
    priority: int
    sla: float | None
    retry: list[float]
    latency: Series = field(default_factory=Series)
    depth: int = 0
    """Recipients received and not yet final (never negative)."""
    outstanding: OrderedDict[str, list[float]] = field(default_factory=OrderedDict)
    """SLA classes only: queue id -> [queued_at, recipients left, not before (retry time)]."""
    received: int = 0
    """Recipients this node's intake accepted."""
    failed: int = 0
    """Final failures (``b`` records: bounced, expired) this tracker saw."""
    oldest_at: float | None = None
    """Cluster figures: injection time of the oldest queued message (None: none queued)."""
    breached: int | None = None
    """Cluster figures: queued recipients past their deadline (None: count ``outstanding``)."""


class Completions:
    """Times of a pool's final outcomes over the last ``window`` seconds, sorted (a node's
    records come in order; other nodes' slices may come a little late and are put in place)."""

    __slots__ = ("window", "_times", "_added")

    def __init__(self, window: float) -> None:
        self.window = window
        self._times: list[float] = []
        self._added = 0

    def add(self, t: float, n: int = 1) -> None:
        times = self._times
        if not times or t >= times[-1]:
            times.extend([t] * n) if n > 1 else times.append(t)
        else:
            i = bisect_right(times, t)
            times[i:i] = [t] * n
        self._added += n
        if self._added >= 4096:  # trim now and then: amortised O(1)
            self._added = 0
            del times[:bisect_left(times, times[-1] - self.window)]

    def since(self, t: float) -> int:
        return len(self._times) - bisect_left(self._times, t)


@dataclass(slots=True)
class PoolState:
    name: str
    done: Completions
    """Final outcomes (delivered, bounced, expired, purged)."""
    latency: Series = field(default_factory=Series)
    last_done: float = 0.0
    busy_since: float | None = None
    """Start of the current busy period (work ready or in flight); None while idle. Rates are
    measured over busy time only: a quiet hour says nothing about how fast a burst drains."""


class Tracker:
    def __init__(self, config: Config, counts_queue: bool = True, lag: float = 0.0) -> None:
        self.config = config
        self.counts_queue = counts_queue
        """Whether records count the queue (depth, outstanding): only where one node owns the
        whole queue. A cluster node keeps its latency, intake and deliveries."""
        self.lag = lag
        """Seconds by which completions reach this tracker late (cluster figures: the nodes
        write their slices as they commit, and the evaluating node reads them once a
        second); rates are measured up to ``now - lag``, or the wait would look like a stall."""
        self.classes = {
            name: ClassState(name, c.pool, c.priority, c.sla, list(c.retry))
            for name, c in config.classes.items()}
        window = config.monitor.rate_window
        self.pools = {name: PoolState(name, Completions(window)) for name in config.pools}
        self.recent: OrderedDict[str, tuple] = OrderedDict()
        self.recent_recipients = 0
        """The recipients' outcomes held in ``recent``."""
        self._by_correlation: dict[str, list[str]] = {}

    # -- feeding --------------------------------------------------------------------------------

    def seed(self, recipients: list[Recipient], now: float) -> None:
        """Count recipients resumed from the spool at start (they log no new "r" record)."""
        for rcpt in sorted(recipients, key=lambda r: r.msg.queued_at):
            state = self.classes.get(rcpt.msg.cls)
            if state is not None:
                self._received(state, rcpt.msg.id, rcpt.msg.queued_at, now)

    def seed_counts(self, depths: dict[str, int], outstanding: list[tuple], now: float) -> None:
        """Count a queue resumed from the spool from its counts (``SQLiteSpool.resume``): per
        class, and one (class, queue id, injection time, recipients) per message of an SLA
        class, oldest first. What ``seed`` does without loading every recipient."""
        for name, n in depths.items():
            state = self.classes.get(name)
            if state is None or not n:
                continue
            state.depth += n
            pool = self.pools.get(state.pool)
            if pool is not None and pool.busy_since is None:
                pool.busy_since = now
        for name, queue_id, queued_at, n in outstanding:
            state = self.classes.get(name)
            if state is not None and state.sla is not None:
                state.outstanding[queue_id] = [queued_at, n, 0.0]

    def on_record(self, rec: Record) -> None:
        """The accounting listener: O(1) per record (see docs/performance.md ("Monitoring"))."""
        kind = rec.type
        state = self.classes.get(rec.cls)
        if state is None:
            return
        if kind == "d" or kind == "b":  # final; the branches are exclusive, the common first
            pool = self.pools.get(state.pool)
            t = rec.time_logged
            latency = t - rec.time_queued
            bucket = None
            if kind == "d":
                bucket = bucket_of(latency)
                state.latency.count(t, bucket)
                if pool is not None:
                    pool.latency.count(t, bucket)
            else:
                state.failed += 1
            if pool is not None:
                pool.done.add(t)
                pool.last_done = t
            if self.counts_queue:
                if state.depth > 0:
                    state.depth -= 1
                entry = state.outstanding.get(rec.queue_id)
                if entry is not None:
                    entry[1] -= 1
                    if entry[1] <= 0:
                        del state.outstanding[rec.queue_id]
            self._remember(rec)
        elif kind == "r":
            state.received += 1
            if self.counts_queue:
                self._received(state, rec.queue_id, rec.time_queued, rec.time_logged)
        elif kind == "t":
            entry = state.outstanding.get(rec.queue_id)
            if entry is not None:
                step = state.retry[min(max(rec.attempt, 1) - 1, len(state.retry) - 1)]
                entry[2] = max(entry[2], rec.time_logged + step * 1.1)  # 1.1: the retry jitter

    def _received(self, state: ClassState, queue_id: str, queued_at: float, now: float) -> None:
        state.depth += 1
        pool = self.pools.get(state.pool)
        if pool is not None and pool.busy_since is None:
            pool.busy_since = now
        if state.sla is not None:
            entry = state.outstanding.get(queue_id)
            if entry is None:
                state.outstanding[queue_id] = [queued_at, 1, 0.0]
            else:
                entry[1] += 1

    def absorb(self, cls: str, second: int, finals: int, buckets: list[int],
               counts: list[int]) -> None:
        """A node's slice (``outcome_slices``), into the cluster's figures."""
        state = self.classes.get(cls)
        if state is None:
            return
        hist = dict(zip(buckets, counts, strict=True))
        at = second + 0.5
        if hist:
            state.latency.merge(at, hist)
        pool = self.pools.get(state.pool)
        if pool is not None:
            if hist:
                pool.latency.merge(at, hist)
            if finals:
                pool.done.add(at, finals)
                pool.last_done = max(pool.last_done, at)

    def _remember(self, rec: Record) -> None:
        """Keep a finished recipient for lookups (tuples: this runs for every final record)."""
        entry = self.recent.get(rec.queue_id)
        if entry is None:
            entry = self.recent[rec.queue_id] = (rec.cls, rec.vmta_pool, rec.correlation_id,
                                                 rec.message_id, rec.time_queued, [])
            if rec.correlation_id:
                self._by_correlation.setdefault(rec.correlation_id, []).append(rec.queue_id)
        entry[5].append((rec.rcpt, rec.type, rec.bounce_cat, rec.attempt, rec.time_logged,
                         rec.dsn_status, rec.dsn_diag, rec.dlv_source_ip))
        self.recent_recipients += 1
        while len(self.recent) > 1 and (len(self.recent) > RECENT_MESSAGES
                                        or self.recent_recipients > RECENT_RECIPIENTS):
            self._forget_oldest()

    def _forget_oldest(self) -> None:
        old_id, old = self.recent.popitem(last=False)
        self.recent_recipients -= len(old[5])
        ids = self._by_correlation.get(old[2])
        if ids is not None:
            ids.remove(old_id)
            if not ids:
                del self._by_correlation[old[2]]

    # -- reading --------------------------------------------------------------------------------

    def finished(self, queue_id: str | None = None, correlation_id: str | None = None,
                 recipient: str | None = None) -> list[dict]:
        """Recently finished messages by queue id, correlation id or recipient address (a scan
        of the recent messages)."""
        if queue_id is not None:
            ids = [queue_id] if queue_id in self.recent else []
        elif recipient is not None:
            ids = [qid for qid, entry in self.recent.items()
                   if any(r[0].lower() == recipient for r in entry[5])]
        else:
            ids = self._by_correlation.get(correlation_id or "", [])
        out = []
        for qid in ids:
            cls, pool, corr, message_id, queued_at, rcpts = self.recent[qid]
            out.append({
                "queue_id": qid, "class": cls, "pool": pool, "correlation_id": corr,
                "message_id": message_id, "queued_at": queued_at,
                "recipients": [{"address": r[0], "state": _final_state(r[1], r[2]),
                                "attempts": r[3], "at": r[4], "dsn_status": r[5],
                                "reply": r[6], "source_ip": r[7]} for r in rcpts]})
        return out

    def oldest_age(self, name: str, now: float) -> float | None:
        """Age of the oldest outstanding message of an SLA class (None: not tracked)."""
        state = self.classes[name]
        if not self.counts_queue:  # cluster figures, read from the spool
            return 0.0 if state.oldest_at is None else max(0.0, now - state.oldest_at)
        if state.sla is None:
            return None
        for entry in state.outstanding.values():
            return max(0.0, now - entry[0])
        return 0.0

    def mark_idle(self, pool: str) -> None:
        """The scheduler has nothing ready or in flight for ``pool`` (deferred mail waiting for
        its retry time does not make a pool busy)."""
        self.pools[pool].busy_since = None

    def drain_rate(self, pool: str, now: float) -> float:
        """Final outcomes per second over the rate window (what the pool did)."""
        window = self.config.monitor.rate_window
        done = self.pools[pool].done
        now -= self.lag
        return (done.since(now - window) - done.since(now)) / window

    def service_rate(self, pool: str, now: float) -> float:
        """What the pool can do now: final outcomes per second of busy time within the rate
        window, capped by the stall - when work is waiting and nothing finished for an unusual
        s seconds, the pool drains at most 1/s (this makes a sudden stall visible at once)."""
        state = self.pools[pool]
        if state.busy_since is None:
            return math.inf
        now -= self.lag
        start = max(now - self.config.monitor.rate_window, state.busy_since)
        stall = now - max(state.last_done, state.busy_since)
        done = state.done.since(start) - state.done.since(now)
        rate = done / (now - start) if done and now > start else math.inf
        if stall > 3.0 / rate:  # a gap 3x the mean is unusual (5 % for Poisson completions)
            rate = min(rate, 1.0 / stall)
        return rate

    def predict_breach(self, name: str, now: float, horizon: float) -> float | None:
        """Seconds until the first outstanding message of class ``name`` is estimated to breach
        its SLA (negative: already past its deadline); None if none within ``horizon``.

        A message's estimated delivery time is now + (recipients ahead of it in its pool, by
        class priority then injection order, plus itself) / drain rate, and not before its next
        retry; it breaches if that is later than its injection time + SLA.
        """
        state = self.classes[name]
        if state.sla is None or not state.outstanding:
            return None
        rate = self.service_rate(state.pool, now)
        ahead = sum(c.depth for c in self.classes.values()
                    if c.pool == state.pool and c.priority < state.priority)
        position: float = ahead  # a count, summed with `left` from the list[float] entries
        for queued_at, left, not_before in state.outstanding.values():
            deadline = queued_at + state.sla
            if deadline - now > horizon:
                return None
            position += left
            eta = now + position / rate
            if max(eta, not_before) > deadline:
                return deadline - now
        return None


def outcome_slices(records: Iterable[Record], classes: Container[str]
                   ) -> list[tuple[str, int, int, list[int], list[int]]]:
    """The cluster's slices of ``records`` (one spool commit's events): per class and second,
    (class, second, final outcomes, latency buckets, deliveries per bucket), for the final
    outcomes (``d``, ``b``) of ``classes``, as ``Tracker.on_record`` counts them. Written in
    the commit that records the outcomes (``PostgresSpool.write_slices``), so the cluster's
    totals have an outcome exactly when the spool has it."""
    slices: dict[tuple[str, int], list] = {}
    for rec in records:
        kind = rec.type
        if (kind != "d" and kind != "b") or rec.cls not in classes:
            continue
        key = (rec.cls, int(rec.time_logged))
        entry = slices.get(key)
        if entry is None:
            entry = slices[key] = [0, {}]
        entry[0] += 1
        if kind == "d":
            bucket = bucket_of(rec.time_logged - rec.time_queued)
            entry[1][bucket] = entry[1].get(bucket, 0) + 1
    return [(cls, second, finals, list(hist), list(hist.values()))
            for (cls, second), (finals, hist) in slices.items()]


def _final_state(kind: str, bounce_cat: str) -> str:
    if kind == "d":
        return "delivered"
    return {"message-expired": "expired", "purged": "purged"}.get(bounce_cat, "bounced")
