"""Prometheus metrics: counters and the latency histogram are updated per accounting record;
gauges (queues, connections, SLA, alerts) are computed when scraped."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from ..accounting.records import Record

if TYPE_CHECKING:
    from .monitor import Monitor

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1200, 1800,
                   3600, 7200, 21600, 86400)
"""Seconds; dense below the 2-minute SLA, then the 10/30-minute marks of the case study."""

disable_created_metrics()  # no *_created series: promtool and most dashboards do not want them

_OUTCOMES = {"r": "received", "d": "delivered", "t": "deferred", "rb": "remote_bounce",
             "f": "complaint", "s": "suppressed"}


class Metrics:
    def __init__(self, monitor: Monitor) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.recipients = Counter(
            "postlane_recipients", "Recipient events by outcome (received, delivered, deferred,"
            " bounced, expired, purged, ...)", ["class", "pool", "source_ip", "outcome"],
            registry=self.registry)
        self.latency = Histogram(
            "postlane_delivery_latency_seconds", "Injection to remote 250, per recipient",
            ["class", "pool"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.deferrals = Counter(
            "postlane_deferrals", "Deferred recipients by the reply's bounce category",
            ["pool", "category"], registry=self.registry)
        self.registry.register(_StateCollector(monitor))
        self._counters: dict[tuple[str, str, str, str], object] = {}
        self._histograms: dict[tuple[str, str], object] = {}

    def on_record(self, rec: Record) -> None:
        kind = rec.type
        if kind == "b":
            outcome = {"message-expired": "expired", "purged": "purged"}.get(rec.bounce_cat,
                                                                              "bounced")
        else:
            outcome = _OUTCOMES[kind]
        key = (rec.cls, rec.vmta_pool, rec.dlv_source_ip, outcome)
        counter = self._counters.get(key)
        if counter is None:
            counter = self._counters[key] = self.recipients.labels(*key)
        counter.inc()
        if kind == "t":
            self.deferrals.labels(rec.vmta_pool, rec.bounce_cat or "other").inc()
        elif kind == "d":
            hkey = (rec.cls, rec.vmta_pool)
            hist = self._histograms.get(hkey)
            if hist is None:
                hist = self._histograms[hkey] = self.latency.labels(*hkey)
            hist.observe(rec.time_logged - rec.time_queued)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _StateCollector(Collector):
    def __init__(self, monitor: Monitor) -> None:
        self.monitor = monitor

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        mon = self.monitor
        now = time.time()
        status = mon.node.status()
        classes = mon.class_states(now)
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
        # "percentile", not "quantile": that label belongs to summaries (promtool refuses it
        # on a gauge)
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
        yield from _domains(status["lanes"], mon.config.monitor.metrics_top_domains)
        drain = GaugeMetricFamily("postlane_pool_drain_rate", "Final outcomes per second",
                                  labels=["pool"])
        paused = GaugeMetricFamily("postlane_pool_paused", "1 if the whole pool is paused",
                                   labels=["pool"])
        conns = GaugeMetricFamily("postlane_connections", "Outbound connections in use",
                                  labels=["pool", "source_ip"])
        cap = GaugeMetricFamily("postlane_connections_max", "max_smtp_out of the source IP",
                                labels=["pool", "source_ip"])
        for pool in status["pools"]:
            drain.add_metric([pool["pool"]], mon.tracker.drain_rate(pool["pool"], now))
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
        alerts = GaugeMetricFamily("postlane_alert_active", "1 while an alert is active",
                                   labels=["rule", "class"])
        for alert in mon.alerts.active.values():
            alerts.add_metric([alert.rule, alert.cls], 1)
        yield alerts
        yield GaugeMetricFamily("postlane_uptime_seconds", "Seconds since the node started",
                                value=status["uptime_s"])


def _domains(lanes: list[dict], top: int) -> Iterator[Metric]:
    """Queue depth and oldest age per recipient domain (all pools): the ``top`` deepest by
    name, the others summed as "other", so the number of series stays bounded."""
    depth: dict[str, int] = {}
    oldest: dict[str, float] = {}
    for lane in lanes:
        if lane["depth"]:
            depth[lane["domain"]] = depth.get(lane["domain"], 0) + lane["depth"]
            oldest[lane["domain"]] = max(oldest.get(lane["domain"], 0.0), lane["oldest_age_s"])
    ranked = sorted(depth, key=lambda d: (-depth[d], d))
    shown = ranked[:top]
    rest = ranked[top:]
    gauge_depth = GaugeMetricFamily("postlane_domain_queue_depth",
                                    "Recipients not yet final per destination domain (the"
                                    " deepest; the rest as domain=\"other\")", labels=["domain"])
    gauge_oldest = GaugeMetricFamily("postlane_domain_oldest_age_seconds",
                                     "Age of the oldest message queued per destination domain",
                                     labels=["domain"])
    for domain in shown:
        gauge_depth.add_metric([domain], depth[domain])
        gauge_oldest.add_metric([domain], oldest[domain])
    if rest:
        gauge_depth.add_metric(["other"], sum(depth[d] for d in rest))
        gauge_oldest.add_metric(["other"], max(oldest[d] for d in rest))
    yield from (gauge_depth, gauge_oldest)
