"""Prometheus metrics: counters and the latency histogram are updated per accounting record;
gauges (queues, connections, SLA, alerts) are computed when scraped.

In a cluster the queue, SLA, drain and alert gauges are the cluster's (the same on every node:
aggregate them with max(), never sum()); what is the node's own carries ``node`` in its name
(``postlane_node_held_recipients``, ``postlane_node_drain_rate``), besides the counters and the
histogram, which count this node's events and add up across nodes."""

from __future__ import annotations

import math
import time
from bisect import bisect_left
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, disable_created_metrics, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from ..accounting.records import Record
from ..spool.writer import COMMIT_BUCKETS

if TYPE_CHECKING:
    from .monitor import Monitor

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1200, 1800,
                   3600, 7200, 21600, 86400)
"""Seconds; dense below the 2-minute SLA, then the 10/30-minute marks of the case study."""

disable_created_metrics()  # no *_created series: promtool and most dashboards do not want them

_OUTCOMES = {"r": "received", "d": "delivered", "t": "deferred", "rb": "remote_bounce",
             "rd": "remote_delivered", "f": "complaint", "s": "suppressed", "u": "unknown"}
_BOUNCES = {"message-expired": "expired", "purged": "purged"}
"""The outcome of a "b" record by its bounce category (otherwise "bounced")."""


class Metrics:
    def __init__(self, monitor: Monitor) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.records = RecordFigures()
        """The counters and the latency histogram that records update."""
        self.registry.register(self.records)
        self._collector = _StateCollector(monitor)
        self.registry.register(self._collector)

    def on_record(self, rec: Record) -> None:
        self.records.on_record(rec)

    def render(self, cluster: dict | None = None) -> bytes:
        """The text format; ``cluster``: the cluster's figures (``ClusterMonitor.current``)."""
        self._collector.cluster = cluster
        return generate_latest(self.registry)


_BOUNDS = (*(float(b) for b in LATENCY_BUCKETS), math.inf)
_LE = tuple(floatToGoString(b) for b in _BOUNDS)


class RecordFigures(Collector):
    """``postlane_recipients``, ``postlane_delivery_latency_seconds`` and
    ``postlane_deferrals``: kept as plain numbers per label set and made into metric families
    when scraped. The series and values are what prometheus_client's ``Counter`` and
    ``Histogram`` give (floats added in the same order), without their per-record checks and
    locks (a "d" record cost 4.7 µs there, 1 µs here): records and scrapes both run on the
    event loop."""

    def __init__(self) -> None:
        self.recipients: dict[tuple[str, str, str, str], float] = {}
        """(class, pool, source IP, outcome) -> recipients"""
        self.latency: dict[tuple[str, str], list[float]] = {}
        """(class, pool) -> a count per bucket of ``_BOUNDS``, then the sum of the latencies"""
        self.deferrals: dict[tuple[str, str], float] = {}
        """(pool, bounce category) -> deferred recipients"""

    def on_record(self, rec: Record) -> None:
        kind = rec.type
        if kind == "d":
            outcome = "delivered"
        elif kind == "b":
            outcome = _BOUNCES.get(rec.bounce_cat, "bounced")
        elif kind == "rd" and rec.dsn_action == "delayed":
            outcome = "remote_delayed"  # the receiving side's delay DSN, not a delivery
        elif kind in _OUTCOMES:
            outcome = _OUTCOMES[kind]
        else:
            return  # an operator's action ("o") is no recipient's outcome
        key = (rec.cls, rec.vmta_pool, rec.dlv_source_ip, outcome)
        counts = self.recipients
        counts[key] = counts.get(key, 0.0) + 1.0
        if kind == "d":
            hkey = (rec.cls, rec.vmta_pool)
            hist = self.latency.get(hkey)
            if hist is None:
                hist = self.latency[hkey] = [0.0] * (len(_BOUNDS) + 1)
            seconds = rec.time_logged - rec.time_queued
            hist[-1] += seconds
            if seconds == seconds:  # NaN: in the sum only, as prometheus_client does
                hist[bisect_left(_BOUNDS, seconds)] += 1.0
        elif kind == "t":
            dkey = (rec.vmta_pool, rec.bounce_cat or "other")
            self.deferrals[dkey] = self.deferrals.get(dkey, 0.0) + 1.0

    def collect(self) -> Iterator[Metric]:
        recipients = CounterMetricFamily(
            "postlane_recipients", "Recipient events by outcome (received, delivered, deferred,"
            " bounced, expired, purged, ...)", labels=["class", "pool", "source_ip", "outcome"])
        for key, n in self.recipients.items():
            recipients.add_metric(key, n)
        yield recipients
        latency = HistogramMetricFamily(
            "postlane_delivery_latency_seconds", "Injection to remote 250, per recipient",
            labels=["class", "pool"])
        for hkey, hist in self.latency.items():
            buckets, total = [], 0.0
            for le, n in zip(_LE, hist, strict=False):  # the last of hist: the sum
                total += n
                buckets.append((le, total))
            latency.add_metric(hkey, buckets, hist[-1])
        yield latency
        deferrals = CounterMetricFamily(
            "postlane_deferrals", "Deferred recipients by the reply's bounce category",
            labels=["pool", "category"])
        for dkey, n in self.deferrals.items():
            deferrals.add_metric(dkey, n)
        yield deferrals


class _StateCollector(Collector):
    def __init__(self, monitor: Monitor) -> None:
        self.monitor = monitor
        self.cluster: dict | None = None

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        mon = self.monitor
        now = time.time()
        status = mon.status()
        clustered = mon.cluster is not None
        if clustered:
            figures = self.cluster or {}
            classes = figures.get("classes", [])
            drains = {name: p.get("drain_rate", 0.0)
                      for name, p in figures.get("pools", {}).items()}
            active = figures.get("alerts", {}).get("active", [])
            alert_labels = [(a["rule"], a["class"]) for a in active]
        else:
            classes = mon.class_states(now)
            drains = {p: mon.tracker.drain_rate(p, now) for p in mon.tracker.pools}
            alert_labels = [(a.rule, a.cls) for a in mon.alerts.active.values()]
        yield from _class_metrics(classes)
        top = mon.config.monitor.metrics_top_domains
        if clustered:  # the cluster's queue per domain, not the lanes of what this node holds
            yield from _domain_metrics(self.cluster.get("domains", []) if self.cluster else [])
        else:
            yield from _domain_metrics(top_domains(*_lane_domains(status["lanes"]), top))
        drain = GaugeMetricFamily("postlane_pool_drain_rate", "Final outcomes per second",
                                  labels=["pool"])
        paused = GaugeMetricFamily("postlane_pool_paused", "1 if the whole pool is paused",
                                   labels=["pool"])
        conns = GaugeMetricFamily("postlane_connections", "Outbound connections in use",
                                  labels=["pool", "source_ip"])
        cap = GaugeMetricFamily("postlane_connections_max", "max_smtp_out of the source IP",
                                labels=["pool", "source_ip"])
        for pool in status["pools"]:
            drain.add_metric([pool["pool"]], drains.get(pool["pool"], 0.0))
            paused.add_metric([pool["pool"]], int(pool["paused"]))
            for ip in pool["ips"]:
                conns.add_metric([pool["pool"], ip["address"]], ip["in_use"])
                cap.add_metric([pool["pool"], ip["address"]], ip["max_smtp_out"])
        yield from (drain, paused, conns, cap)
        lanes_paused = GaugeMetricFamily("postlane_lanes_paused", "Paused lanes per pool",
                                         labels=["pool"])
        counts: dict[str, int] = {}
        for lane in status["lanes"]:
            counts[lane["pool"]] = counts.get(lane["pool"], 0) + int(lane["paused"])
        for pool, n in counts.items():
            lanes_paused.add_metric([pool], n)
        yield lanes_paused
        smtp = GaugeMetricFamily("postlane_smtp_connections", "Inbound SMTP connections open"
                                 " (every intake worker's)", labels=["listener"])
        for listener in status["listeners"]:
            smtp.add_metric([listener["name"]], listener["connections"])
        yield smtp
        alerts = GaugeMetricFamily("postlane_alert_active", "1 while an alert is active",
                                   labels=["rule", "class"])
        for labels in alert_labels:
            alerts.add_metric(list(labels), 1)
        yield alerts
        if clustered:
            yield from self._cluster_metrics(now)
        yield from _health_metrics(mon)
        yield from _commit_metrics(mon)
        yield GaugeMetricFamily("postlane_uptime_seconds", "Seconds since the node started",
                                value=status["uptime_s"])

    def _cluster_metrics(self, now: float) -> Iterator[Metric]:
        mon = self.monitor
        assert mon.cluster is not None
        figures = self.cluster
        held = GaugeMetricFamily("postlane_node_held_recipients", "Recipients this node holds"
                                 " (claimed, not yet final: ready, in flight or waiting for a"
                                 " retry)",
                                 labels=["class", "pool"])
        for item in mon.node_states(now):
            held.add_metric([item["class"], item["pool"]], item["held"])
        own = GaugeMetricFamily("postlane_node_drain_rate", "Final outcomes per second of this"
                                " node's deliveries", labels=["pool"])
        for pool in mon.tracker.pools:
            own.add_metric([pool], mon.tracker.drain_rate(pool, now))
        yield from (held, own)
        yield GaugeMetricFamily("postlane_cluster_evaluator", "1 on the node that evaluates the"
                                " cluster's figures and alerts", value=int(mon.cluster.leader))
        if figures is None:
            return
        yield GaugeMetricFamily("postlane_cluster_figures_age_seconds", "Age of the cluster's"
                                " figures", value=figures["age_s"])
        nodes = GaugeMetricFamily("postlane_cluster_nodes", "Nodes of the cluster by state",
                                  labels=["state"])
        by_state: dict[str, int] = dict.fromkeys(("alive", "draining", "suspect", "dead"), 0)
        for node in figures["nodes"]:
            by_state[node["state"]] += 1
        for state, n in by_state.items():
            nodes.add_metric([state], n)
        unowned = GaugeMetricFamily("postlane_cluster_unowned_recipients", "Recipients held by"
                                    " suspect or dead nodes, not yet taken over",
                                    labels=["pool"])
        for name, pool in figures["pools"].items():
            unowned.add_metric([name], pool["unowned"])
        yield from (nodes, unowned)


def _lane_domains(lanes: list[dict]) -> tuple[dict[str, int], dict[str, float]]:
    """Depth and oldest age per recipient domain, over all pools' lanes."""
    depth: dict[str, int] = {}
    oldest: dict[str, float] = {}
    for lane in lanes:
        if lane["depth"]:
            depth[lane["domain"]] = depth.get(lane["domain"], 0) + lane["depth"]
            oldest[lane["domain"]] = max(oldest.get(lane["domain"], 0.0), lane["oldest_age_s"])
    return depth, oldest


def top_domains(depth: dict[str, int], oldest: dict[str, float], top: int) -> list[dict]:
    """The ``top`` deepest domains (by name on a tie), the others summed as "other", so the
    number of series stays bounded. Also what a cluster's evaluator publishes."""
    ranked = sorted(depth, key=lambda d: (-depth[d], d))
    out = [{"domain": d, "depth": depth[d], "oldest_age_s": oldest[d]} for d in ranked[:top]]
    rest = ranked[top:]
    if rest:
        out.append({"domain": "other", "depth": sum(depth[d] for d in rest),
                    "oldest_age_s": max(oldest[d] for d in rest)})
    return out


def _domain_metrics(domains: list[dict]) -> Iterator[Metric]:
    """Queue depth and oldest age per recipient domain (``top_domains``)."""
    gauge_depth = GaugeMetricFamily("postlane_domain_queue_depth",
                                    "Recipients not yet final per destination domain (the"
                                    " deepest; the rest as domain=\"other\")", labels=["domain"])
    gauge_oldest = GaugeMetricFamily("postlane_domain_oldest_age_seconds",
                                     "Age of the oldest message queued per destination domain",
                                     labels=["domain"])
    for item in domains:
        gauge_depth.add_metric([item["domain"]], item["depth"])
        gauge_oldest.add_metric([item["domain"]], item["oldest_age_s"])
    yield from (gauge_depth, gauge_oldest)


def _class_metrics(classes: list[dict]) -> Iterator[Metric]:
    depth = GaugeMetricFamily("postlane_queue_depth", "Recipients not yet final",
                              labels=["class", "pool"])
    oldest = GaugeMetricFamily("postlane_queue_oldest_age_seconds",
                               "Age of the oldest queued message", labels=["class", "pool"])
    sla = GaugeMetricFamily("postlane_sla_seconds", "Delivery SLA of the class",
                            labels=["class"])
    breached = GaugeMetricFamily("postlane_sla_breached_recipients",
                                 "Queued recipients already past their SLA deadline",
                                 labels=["class"])
    predicted = GaugeMetricFamily("postlane_sla_predicted_breach_seconds",
                                  "Estimated seconds until the first SLA breach (absent: none"
                                  " expected within twice the lead time)", labels=["class"])
    # "percentile", not "quantile": that label belongs to summaries (promtool refuses it on a
    # gauge)
    quant = GaugeMetricFamily("postlane_delivery_latency_window_seconds",
                              "Delivery latency percentile over a sliding window",
                              labels=["class", "window", "percentile"])
    for item in classes:
        name, pool = item["class"], item["pool"]
        depth.add_metric([name, pool], item["depth"])
        oldest.add_metric([name, pool], item["oldest_age_s"])
        if item["sla_s"] is not None:
            sla.add_metric([name], item["sla_s"])
            breached.add_metric([name], item["breached"])
            if item["breach_in_s"] is not None:
                predicted.add_metric([name], item["breach_in_s"])
        for window, qs in item["latency_s"].items():
            for q, value in (qs or {}).items():
                quant.add_metric([name, window, q], value)
    yield from (depth, oldest, sla, breached, predicted, quant)


def _health_metrics(mon: Monitor) -> Iterator[Metric]:
    kinds, counted = mon.health.counts()
    active = GaugeMetricFamily("postlane_degraded", "Degraded states now (low disk, database"
                               " unreachable, DKIM key missing, destinations down ...)",
                               labels=["state"])
    for kind, n in kinds.items():
        active.add_metric([kind], n)
    events = CounterMetricFamily("postlane_degraded_events", "Refusals and deferrals caused by"
                                 " a degraded state", labels=["state"])
    for kind, n in counted.items():
        events.add_metric([kind], n)
    yield from (active, events)


def _commit_metrics(mon: Monitor) -> Iterator[Metric]:
    stats = mon.commits
    buckets, total = [], 0
    for bound, n in zip(COMMIT_BUCKETS, stats.buckets, strict=True):
        total += n
        buckets.append((str(bound), total))
    buckets.append(("+Inf", stats.commits))
    yield HistogramMetricFamily("postlane_spool_commit_seconds", "Spool commits by duration: a"
                                " 250 waits for the commit under way and its own",
                                buckets=buckets, sum_value=stats.seconds)
    yield CounterMetricFamily("postlane_spool_operations", "Write operations committed (a"
                              " message, a batch of outcomes, events, a trim ...)",
                              value=stats.writes)
