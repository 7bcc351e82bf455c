"""One truth for a cluster's queue, SLA and alerts, evaluated once for the whole cluster.

Each node's records describe only its own intake and deliveries, so no node can count the shared
queue from them (counting +1 on intake and -1 on delivery gave one node +259 and another -259).
Instead:

* every node writes the slices of its final outcomes - per class and second, the outcomes and
  the deliveries' latency buckets - to ``monitor_slices`` in the spool commit that records them
  (``PostgresSpool.write_slices``: one more statement in a commit with final outcomes), so a
  slice exists exactly when its outcomes do, whatever happens to the node after;
* one node, the holder of the monitor's advisory lock, evaluates: it counts the queue in the
  spool itself (an index-only count per class, the deferred and the leased recipients from
  their own indexes, one indexed walk per SLA class over the messages due within the alert
  horizon), takes the slices no evaluation counted yet (marking them counted), merges them
  into one set of latency windows and drain rates, adds them to the cluster's lifetime
  totals in ``monitor_totals`` (so a total never goes back when another node evaluates), runs
  the SLA rules, keeps the alerts in the ``alerts`` table (so the
  next evaluator adopts them: nothing fires twice, nothing stays stuck) and writes the figures
  to ``monitor_state``; only then does it tell the alert's notifiers, and once every notifier
  took an event it marks the alert's row ``notified`` (so an evaluator that dies before its
  page got through leaves the event to the next one: told at least once);
* the other nodes read that row: ``status``, the API, the dashboard and /metrics show the same
  figures on every node. When the evaluator dies its session closes, its lock with it, and the
  next node to try (every node tries once a ``monitor.evaluate_every``) takes over.
"""

from __future__ import annotations

import collections
import json
import logging
import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import asyncpg

from ..spool import PostgresSpool
from ..spool.membership import NODE_COLS
from ..spool.postgres import CONNECT_TIMEOUT, SESSION_SETTINGS, UNREACHABLE, NodeInfo
from .alerts import Alert
from .membership import summarize
from .metrics import top_domains
from .tracker import Tracker, outcome_slices

if TYPE_CHECKING:
    from .monitor import Monitor

log = logging.getLogger("postlane.monitor")

SPAN = 900
"""Seconds of slices kept (the 15-minute latency window); a new evaluator reads them all."""
OUTSTANDING_MAX = 10_000
"""Messages per SLA class the breach estimate walks (those due first, within its horizon)."""
PRUNE_EVERY = 60.0
HISTORY = 200
"""Resolved alerts kept in the table and shown."""

_ENDED = (asyncpg.exceptions.AdminShutdownError, asyncpg.exceptions.ConnectionDoesNotExistError)
"""What the evaluator's connection raises once another node ended it (``_unseat_stalled``)."""
_OPEN = "state IN ('queued', 'deferred')"
_NOW = "extract(epoch from clock_timestamp())::float8"
_COUNT = f"""SELECT cls, count(*) AS n, min(deadline) AS first_deadline,
    count(*) FILTER (WHERE deadline <= $1) AS past_deadline
FROM recipients WHERE {_OPEN} GROUP BY cls"""
"""The queue per class: an index-only scan of recipients_open, O(queued). Measured on 200,000
queued recipients (scripts/pgbench_spool.py figures): 31 ms this way, 113 ms as the planner's
own choice (a parallel sequential scan in three processes), hence ``enable_seqscan = off`` for
this statement and no parallel workers on the evaluator's connection."""
_DEFERRED = """SELECT pool, count(*) AS n, count(*) FILTER (WHERE next_attempt <= $1) AS due
FROM recipients WHERE state = 'deferred' GROUP BY pool"""
"""Waiting for a retry, and due, per pool (index recipients_due)."""
_LEASED = f"""SELECT pool, lease_owner, coalesce(lease_until >= {_NOW}, false) AS held,
    count(*) AS n, count(*) FILTER (WHERE state = 'deferred') AS deferred,
    min(lease_until) AS lease_until
FROM recipients WHERE lease_owner IS NOT NULL AND {_OPEN} GROUP BY pool, lease_owner, held"""
"""What the nodes hold (index recipients_leased: bounded by nodes x claim targets, plus the
deferred recipients they keep)."""
_OUTSTANDING = f"""SELECT msg_id, min(deadline) AS deadline, count(*) AS left,
    max(next_attempt) AS not_before
FROM recipients WHERE cls = $1 AND {_OPEN} AND deadline <= $2
GROUP BY msg_id ORDER BY 2 LIMIT $3"""
"""The messages of one class due within the horizon, in deadline order (index recipients_open)."""
_DOMAINS = """SELECT domain, cls, state, state = 'held' AS on_hold, count(*) AS n,
    min(deadline) AS first_deadline, count(*) FILTER (WHERE deadline <= $1) AS past_deadline
FROM recipients WHERE state IN ('queued', 'deferred', 'held') GROUP BY domain, cls, state"""
"""The queue per destination domain (and lane: with the class's pool), and the mail on hold
(``queue hold``) per class, which a node's lanes and a single node's depth count too (a scan
of the open recipients: 36 ms on 200,000 of them)."""
_FRESH = """UPDATE monitor_slices SET counted = true WHERE NOT counted
RETURNING cls, at, finals, buckets, counts"""
"""The slices no evaluation counted yet, marked counted: read once, in the transaction that
adds them to the totals and stores the figures, by the lock holder (index
monitor_slices_uncounted: the commits of the last second or so). A slice committed late, its
second long over, is taken like any other."""
_TOTALS = """WITH added AS (
    INSERT INTO monitor_totals (cls, delivered, failed)
    SELECT * FROM unnest($1::text[], $2::bigint[], $3::bigint[])
    ON CONFLICT (cls) DO UPDATE SET delivered = monitor_totals.delivered + excluded.delivered,
        failed = monitor_totals.failed + excluded.failed
    RETURNING cls, delivered, failed)
SELECT cls, delivered, failed FROM added
UNION ALL SELECT cls, delivered, failed FROM monitor_totals
WHERE cls NOT IN (SELECT cls FROM added)"""
"""The cluster's lifetime totals per class - deliveries, and final failures (a slice's
``finals`` less its deliveries: bounced or expired) - plus what the fresh slices (``_FRESH``)
add, in the same transaction (so a takeover neither loses nor repeats one); then every
class's totals."""
_KEPT = """WITH kept AS (
    SELECT cls, at, finals, buckets, counts FROM monitor_slices WHERE at >= $1 AND counted),
hist AS (
    SELECT cls, at, b, sum(c)::int AS c FROM kept, unnest(buckets, counts) AS u (b, c)
    GROUP BY cls, at, b)
SELECT f.cls, f.at, f.finals, coalesce(h.buckets, '{}') AS buckets,
    coalesce(h.counts, '{}') AS counts
FROM (SELECT cls, at, sum(finals)::int AS finals FROM kept GROUP BY cls, at) AS f
LEFT JOIN (SELECT cls, at, array_agg(b ORDER BY b) AS buckets, array_agg(c ORDER BY b) AS counts
           FROM hist GROUP BY cls, at) AS h USING (cls, at)"""
"""The counted slices of the last 15 minutes, one row per class and second (a node writes a
row per commit): what a new evaluator's latency windows and rates start from. The uncounted
ones reach it through ``_FRESH``."""


@dataclass(slots=True)
class Queue:
    """The shared queue as one evaluation read it."""

    classes: list  # _COUNT rows
    deferred: dict[str, tuple[int, int]]  # pool -> (deferred, due)
    leased: list  # _LEASED rows
    outstanding: dict[str, list]  # SLA class -> _OUTSTANDING rows
    domains: list  # _DOMAINS rows


class ClusterMonitor:
    """This node's part in the cluster's figures: have its spool write its slices with its
    outcomes, and evaluate when it holds the lock."""

    def __init__(self, monitor: Monitor, spool: PostgresSpool) -> None:
        self.monitor = monitor
        self.spool = spool
        self.config = monitor.config
        self.name = self.config.node.name
        self.leader = False
        self.tracker = self._tracker()
        self.figures: dict | None = None
        """The last figures: computed here while leader, else read from ``monitor_state``."""
        self._fetched = -math.inf
        self._conn: asyncpg.Connection | None = None
        self._pruned = 0.0
        self._warm_at = 0.0
        """Until then a new evaluator leaves the alerts as it found them: its windows and rates
        are still filling (completions reach it ``tracker.lag`` late)."""
        self._lock = f"hashtext('postlane-monitor/{spool.schema}'), 0"
        self._unseat_refused = False
        classes = self.config.classes
        spool.write_slices(lambda events: outcome_slices(events, classes))

    def _tracker(self) -> Tracker:
        # slices reach the evaluator up to a second after theirs ends, plus a tick
        return Tracker(self.config, counts_queue=False,
                       lag=1.0 + 2 * self.config.monitor.evaluate_every)

    # -- every node -----------------------------------------------------------------------------

    async def tick(self, now: float) -> None:
        """Evaluate if this node is (or becomes) leader (its slices are written by the spool,
        with its outcomes)."""
        try:
            if self._conn is None or self._conn.is_closed():
                await self.close(stopping=False)  # with the connection went the lock
                self._conn = await asyncpg.connect(
                    self.spool.dsn, timeout=CONNECT_TIMEOUT, server_settings={
                        "search_path": f'"{self.spool.schema}"',
                        "application_name": self.spool.app_name,
                        "max_parallel_workers_per_gather": "0", **SESSION_SETTINGS})
            if not self.leader:
                if not await self._conn.fetchval(f"SELECT pg_try_advisory_lock({self._lock})"):
                    await self._unseat_stalled(now)
                    return
                await self._adopt(now)
            await self._evaluate(now)
        except UNREACHABLE as exc:
            if self.leader and isinstance(exc, _ENDED):  # another node ended it: we stalled
                await self.close(stopping=False)  # (an outage is told by the spool's own)
                return
            self.spool.unreachable(exc)  # told once by the spool; the lock went with the session
            await self.close(stopping=False)
        except Exception:  # a bug: logged by the monitor loop; the next tick starts afresh
            await self.close(stopping=False)
            raise

    async def _unseat_stalled(self, now: float) -> None:
        """The lock holder stalled with its session open (a frozen process whose kernel still
        answers keeps its connection, hence the lock, for ever): once the figures are
        ``cluster.lease`` old and the evaluator they name has not heartbeat for as long (the
        database's clock), end its monitor connection, as its work is taken over then. The
        lock goes with the connection; the next node to try evaluates, and the stalled one,
        when it wakes, finds its connection gone and steps down (it cannot store or tell
        anything more)."""
        assert self._conn is not None
        lease = self.config.cluster.lease
        try:
            ended = await self._conn.fetchval(
                "SELECT count(pg_terminate_backend(l.pid)) FROM pg_locks l"
                " WHERE l.locktype = 'advisory' AND l.granted AND l.pid <> pg_backend_pid()"
                " AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())"
                f" AND l.objsubid = 2 AND l.objid = 0 AND l.classid::bigint ="
                f" hashtext('postlane-monitor/{self.spool.schema}')::bigint & 4294967295"
                " AND EXISTS (SELECT 1 FROM monitor_state s LEFT JOIN nodes n ON n.name = s.leader"
                f" WHERE s.id = 1 AND s.at < $1 AND coalesce(n.heartbeat < {_NOW} - $2, true))",
                now - lease, lease)
        except asyncpg.exceptions.InsufficientPrivilegeError as exc:  # nodes on other roles
            if not self._unseat_refused:
                self._unseat_refused = True
                log.error("the cluster's evaluator stalled and cannot be replaced: %s (give"
                          " the nodes one role, or pg_signal_backend)", exc)
            return
        self._unseat_refused = False
        if ended:
            log.warning("the cluster's evaluator stalled (no figures and no heartbeat for"
                        " %.0f s): its monitor connection is ended, another node evaluates",
                        lease, extra={"stalled_node": await self._conn.fetchval(
                            "SELECT leader FROM monitor_state WHERE id = 1")})

    async def current(self) -> dict | None:
        """The cluster's figures, with ``age_s``: this node's own while it evaluates, else the
        evaluator's last (read at most once per ``evaluate_every``; also by a node that has
        just taken the evaluation over and has none of its own yet). None before the first."""
        if (not self.leader or self.figures is None) and time.monotonic() - self._fetched >= \
                self.config.monitor.evaluate_every:
            self._fetched = time.monotonic()
            try:
                async with self.spool.acquire() as conn:
                    raw = await conn.fetchval("SELECT figures FROM monitor_state WHERE id = 1")
                if raw is not None and (not self.leader or self.figures is None):
                    self.figures = json.loads(raw)  # (an evaluation may have ended meanwhile)
            except UNREACHABLE:
                pass  # told once by the spool; the last figures say how old they are
        if self.figures is None:
            return None
        age = max(0.0, time.time() - self.figures["at"])
        stale = age > max(5.0, 5 * self.config.monitor.evaluate_every)
        return {**self.figures, "age_s": round(age, 1), "stale": stale}

    async def close(self, stopping: bool = True) -> None:
        """Leave the evaluation (``stopping``: the node stops; else it lost its session)."""
        if self.leader and not stopping:
            log.warning("lost the cluster monitor's lock: another node evaluates meanwhile")
        self._step_down()
        if self._conn is not None:
            self._conn.terminate()
            self._conn = None

    def _step_down(self) -> None:
        if self.leader:
            self.leader = False
            self.monitor.alerts.active.clear()  # the next evaluator has them in the table
            self.monitor.alerts.history.clear()

    # -- the evaluating node --------------------------------------------------------------------

    async def _adopt(self, now: float) -> None:
        """Lock taken: start from the stored alerts and the last 15 minutes of slices (those
        counted; the others are the first evaluation's fresh ones)."""
        assert self._conn is not None
        self.leader = True
        self.tracker = self._tracker()
        for row in await self._conn.fetch(_KEPT, int(now) - SPAN):
            self.tracker.absorb(row["cls"], row["at"], row["finals"], row["buckets"],
                                row["counts"])
        alerts = self.monitor.alerts
        alerts.active.clear()
        alerts.history.clear()
        for row in await self._conn.fetch("SELECT * FROM alerts WHERE resolved_at IS NULL"):
            alert = _alert(row)
            alerts.active[alert.id] = alert
        for row in reversed(await self._conn.fetch(
                "SELECT * FROM alerts WHERE resolved_at IS NOT NULL"
                " ORDER BY resolved_at DESC LIMIT $1", HISTORY)):
            alerts.history.append(_alert(row))
        alerts.told = self._told
        alerts.resend()  # what the last evaluator stored but did not get through
        raw = await self._conn.fetchval("SELECT figures FROM monitor_state WHERE id = 1")
        if raw is not None:  # how long each pool has been busy: the rates' time base
            for name, pool in json.loads(raw)["pools"].items():
                if name in self.tracker.pools:
                    self.tracker.pools[name].busy_since = pool.get("busy_since")
        self._warm_at = now + self.tracker.lag + 2 * self.config.monitor.evaluate_every
        log.info("evaluating the cluster's SLA rules and alerts on this node",
                 extra={"active_alerts": len(alerts.active)})

    async def _evaluate(self, now: float) -> None:
        conn = self._conn
        assert conn is not None
        queue = await self._read_queue(conn, now)
        infos = [NodeInfo(**dict(r)) for r in await conn.fetch(
            f"SELECT {NODE_COLS}, {self.spool.session_open('name')} AS session FROM nodes"
            " ORDER BY name")]
        db_now = await conn.fetchval(f"SELECT {_NOW}")
        alerts = self.monitor.alerts
        async with conn.transaction():
            # the fresh slices, counted in the transaction that stores the figures: once, by
            # the lock holder (if it fails they stay fresh, and this node steps down: the next
            # evaluator's tracker starts afresh, so none is merged twice)
            added: dict[str, list[int]] = {}
            for row in await conn.fetch(_FRESH):
                self.tracker.absorb(row["cls"], row["at"], row["finals"], row["buckets"],
                                    row["counts"])
                delivered = sum(row["counts"])
                sums = added.setdefault(row["cls"], [0, 0])
                sums[0] += delivered
                sums[1] += row["finals"] - delivered
            self._load(queue, now)
            events = []
            if now >= self._warm_at:
                # the SLA rules on the cluster's figures, and the other sources (the
                # reputation service's, from the shared reputation store: the same view on
                # every node)
                events = alerts.update(self.monitor.conditions(now, self.tracker)
                                       + [c for source in self.monitor.sources
                                          for c in source(now)], now)
            figures = self._figures(queue, infos, now, db_now)
            stored = [_row(a) for a in alerts.active.values()]
            stored += [_row(a) for event, a in events if event == "resolved"]
            totals = {r["cls"]: r for r in await conn.fetch(
                _TOTALS, list(added), [t[0] for t in added.values()],
                [t[1] for t in added.values()])}
            for item in figures["classes"]:
                total = totals.get(item["class"])
                item["delivered_total"] = total["delivered"] if total else 0
                item["failed_total"] = total["failed"] if total else 0
            await conn.executemany(
                "INSERT INTO alerts (id, fired_at, rule, cls, pool, message, value, threshold,"
                " last_seen, resolved_at, notified)"
                " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)"
                " ON CONFLICT (id, fired_at) DO UPDATE SET message = excluded.message,"
                " value = excluded.value, last_seen = excluded.last_seen,"
                " resolved_at = excluded.resolved_at, notified = ARRAY(SELECT DISTINCT e FROM"
                " unnest(coalesce(alerts.notified, '{}') || excluded.notified) AS e)", stored)
            await conn.execute(
                "INSERT INTO monitor_state VALUES (1, $1, $2, $3) ON CONFLICT (id) DO UPDATE"
                " SET leader = $1, at = $2, figures = $3", self.name, now, json.dumps(figures))
            if now - self._pruned >= PRUNE_EVERY:
                self._pruned = now
                await conn.execute("DELETE FROM monitor_slices WHERE at < $1 AND counted",
                                   int(now) - SPAN)
                await conn.execute(
                    "DELETE FROM alerts WHERE resolved_at IS NOT NULL AND resolved_at <"
                    " (SELECT coalesce(min(resolved_at), 0) FROM (SELECT resolved_at FROM"
                    " alerts WHERE resolved_at IS NOT NULL ORDER BY resolved_at DESC"
                    " LIMIT $1) AS kept)", HISTORY)
        for event, alert in events:  # stored by the lock holder: told once for the cluster
            alerts.emit(event, alert)
        self.figures = figures

    async def _told(self, event: str, alert: Alert) -> None:
        """Every notifier took ``event``: the next evaluator must not tell it again."""
        async with self.spool.acquire() as conn:
            await conn.execute(
                "UPDATE alerts SET notified = array_append(coalesce(notified, '{}'), $3)"
                " WHERE id = $1 AND fired_at = $2 AND NOT $3 = ANY(coalesce(notified, '{}'))",
                alert.id, alert.fired_at, event)

    async def _read_queue(self, conn: asyncpg.Connection, now: float) -> Queue:
        async with conn.transaction():
            await conn.execute("SET LOCAL enable_seqscan = off")  # see _COUNT
            classes = await conn.fetch(_COUNT, now)
        deferred = {r["pool"]: (r["n"], r["due"]) for r in await conn.fetch(_DEFERRED, now)}
        leased = await conn.fetch(_LEASED)
        evaluate = self.config.monitor.evaluate_every
        outstanding = {}
        for name, rule in self.monitor.rules.items():  # the horizon of class_states' estimate
            outstanding[name] = await conn.fetch(
                _OUTSTANDING, name, now + 2 * rule.lead_time + 2 * evaluate, OUTSTANDING_MAX)
        return Queue(classes, deferred, leased, outstanding, await conn.fetch(_DOMAINS, now))

    def _load(self, queue: Queue, now: float) -> None:
        """The queue as the spool has it, into the cluster tracker."""
        tracker = self.tracker
        for cls_state in tracker.classes.values():
            cls_state.depth, cls_state.oldest_at, cls_state.breached = 0, None, 0
        for row in queue.classes:
            state = tracker.classes.get(row["cls"])
            if state is None:
                continue
            cls = self.config.classes[state.name]
            state.depth = row["n"]
            state.oldest_at = row["first_deadline"] - (cls.sla if cls.sla is not None
                                                       else cls.expiry)
            if state.sla is not None:
                state.breached = row["past_deadline"]
        for row in queue.domains:  # on hold: not final, so in the depth as on one node
            state = tracker.classes.get(row["cls"])
            if state is None or not row["on_hold"]:
                continue
            cls = self.config.classes[state.name]
            oldest_at = row["first_deadline"] - (cls.sla if cls.sla is not None else cls.expiry)
            state.depth += row["n"]
            state.oldest_at = min(oldest_at, state.oldest_at or oldest_at)
            if state.sla is not None:
                state.breached = (state.breached or 0) + row["past_deadline"]
        on_hold = self._on_hold(queue)
        for name, rows in queue.outstanding.items():
            state = tracker.classes[name]
            assert state.sla is not None
            state.outstanding = collections.OrderedDict(
                (r["msg_id"], [r["deadline"] - state.sla, r["left"], r["not_before"]])
                for r in rows)
        for name, pool in tracker.pools.items():
            deferred, due = queue.deferred.get(name, (0, 0))
            depth = sum(c.depth for c in tracker.classes.values() if c.pool == name)
            # nothing ready: queued, or deferred and due (on hold is neither)
            if depth - on_hold[name] - deferred + due <= 0:
                pool.busy_since = None
            elif pool.busy_since is None:
                pool.busy_since = now

    def _figures(self, queue: Queue, infos: list[NodeInfo], now: float, db_now: float) -> dict:
        depth: collections.Counter[str] = collections.Counter()
        for cls_state in self.tracker.classes.values():
            depth[cls_state.pool] += cls_state.depth
        summary = []
        on_hold = self._on_hold(queue)
        unleased = {pool: [depth[pool] - on_hold[pool] - queue.deferred.get(pool, (0, 0))[0],
                           queue.deferred.get(pool, (0, 0))[0]] for pool in self.config.pools}
        for g in queue.leased:
            for i, (state, n) in enumerate((("queued", g["n"] - g["deferred"]),
                                            ("deferred", g["deferred"]))):
                if n:
                    summary.append({"pool": g["pool"], "state": state, "n": n,
                                    "lease_owner": g["lease_owner"], "held": g["held"],
                                    "lease_until": g["lease_until"]})
                    if g["pool"] in unleased:
                        unleased[g["pool"]][i] -= n
        for pool, counts in unleased.items():
            for state, n in zip(("queued", "deferred"), counts, strict=True):
                if n > 0:
                    summary.append({"pool": pool, "state": state, "n": n, "lease_owner": None,
                                    "held": False, "lease_until": None})
        status = summarize(infos, summary, db_now, self.config.cluster)
        pools = {name: {"queued": 0, "deferred": 0, "claimed": 0, "unowned": 0,
                        **status["pools"].get(name, {}), "on_hold": on_hold[name],
                        "drain_rate": round(self.tracker.drain_rate(name, now), 3),
                        "busy_since": self.tracker.pools[name].busy_since}
                 for name in self.config.pools}
        alerts = self.monitor.alerts
        return {"leader": self.name, "at": now,
                "classes": self.monitor.class_states(now, self.tracker),
                "pools": pools, "nodes": status["nodes"], "domains": self._domains(queue, now),
                "lanes": self._lanes(queue, now),
                "alerts": {"active": [a.as_dict() for a in alerts.active.values()],
                           "resolved": [a.as_dict() for a in reversed(alerts.history)]}}

    def _on_hold(self, queue: Queue) -> collections.Counter[str]:
        """Recipients on hold per pool: nobody's, claimed by no node until released."""
        out: collections.Counter[str] = collections.Counter()
        for row in queue.domains:
            if row["on_hold"] and row["cls"] in self.config.classes:
                out[self.config.classes[row["cls"]].pool] += row["n"]
        return out

    def _domains(self, queue: Queue, now: float) -> list[dict]:
        """The deepest destination domains of the whole queue, for /metrics on every node."""
        depth: collections.Counter[str] = collections.Counter()
        oldest: dict[str, float] = {}
        for row in queue.domains:
            cls = self.config.classes.get(row["cls"])
            if cls is None:
                continue
            age = now - (row["first_deadline"] - (cls.sla if cls.sla is not None else cls.expiry))
            depth[row["domain"]] += row["n"]
            oldest[row["domain"]] = round(max(oldest.get(row["domain"], 0.0), age), 3)
        return top_domains(depth, oldest, self.config.monitor.metrics_top_domains)


    def _lanes(self, queue: Queue, now: float) -> list[dict]:
        """The deepest lanes (pool, destination domain) of the whole queue - queued, deferred,
        on hold, oldest age - for ``postlane queues`` and the status on every node (a node's
        own lanes hold only what it claimed). At most ``monitor.metrics_top_domains``."""
        lanes: dict[tuple[str, str], dict] = {}
        for row in queue.domains:
            cls = self.config.classes.get(row["cls"])
            if cls is None:
                continue
            lane = lanes.setdefault((cls.pool, row["domain"]), {
                "pool": cls.pool, "domain": row["domain"], "depth": 0, "queued": 0,
                "deferred": 0, "on_hold": 0, "oldest_age_s": 0.0})
            lane["depth"] += row["n"]
            lane["on_hold" if row["on_hold"] else row["state"]] += row["n"]
            age = now - (row["first_deadline"] - (cls.sla if cls.sla is not None else cls.expiry))
            lane["oldest_age_s"] = round(max(lane["oldest_age_s"], age), 3)
        ranked = sorted(lanes.values(), key=lambda x: (-x["depth"], x["pool"], x["domain"]))
        return ranked[:self.config.monitor.metrics_top_domains]


def _alert(row: asyncpg.Record) -> Alert:
    alert = Alert(row["id"], row["rule"], row["cls"], row["pool"], row["message"], row["value"],
                  row["threshold"], row["fired_at"], row["last_seen"], row["resolved_at"])
    # NULL: stored by a Postlane that told each event as it stored it
    alert.notified = list(row["notified"]) if row["notified"] is not None else [
        e for e in ("fired", "resolved") if e == "fired" or alert.resolved_at is not None]
    return alert


def _row(alert: Alert) -> tuple:
    return (alert.id, alert.fired_at, alert.rule, alert.cls, alert.pool, alert.message,
            alert.value, alert.threshold, alert.last_seen, alert.resolved_at,
            list(alert.notified))
