"""The per-record counters and latency histogram of /metrics (``RecordFigures``) give the
series and values that prometheus_client's own ``Counter`` and ``Histogram`` gave for the same
records (the figures were kept in those until they cost too much per record)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from postlane.accounting.records import Record
from postlane.monitor.metrics import LATENCY_BUCKETS, RecordFigures

_OUTCOMES = {"r": "received", "d": "delivered", "t": "deferred", "rb": "remote_bounce",
             "f": "complaint", "s": "suppressed", "u": "unknown"}


class _Reference:
    """What Metrics did per record before (prometheus_client's Counter and Histogram)."""

    def __init__(self) -> None:
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

    def on_record(self, rec: Record) -> None:
        kind = rec.type
        if kind == "b":
            outcome = {"message-expired": "expired", "purged": "purged"}.get(rec.bounce_cat,
                                                                              "bounced")
        elif kind in _OUTCOMES:
            outcome = _OUTCOMES[kind]
        else:
            return
        self.recipients.labels(rec.cls, rec.vmta_pool, rec.dlv_source_ip, outcome).inc()
        if kind == "t":
            self.deferrals.labels(rec.vmta_pool, rec.bounce_cat or "other").inc()
        elif kind == "d":
            self.latency.labels(rec.cls, rec.vmta_pool).observe(rec.time_logged - rec.time_queued)


def _records() -> list[Record]:
    out = []
    latencies = [0.0, 0.01, 0.05, 0.0500001, 0.3, 1, 1.7, 2.5, 59.9, 600, 86400, 86400.5, 1e6]
    for i, latency in enumerate(latencies * 3):
        cls, pool = (("policy-documents", "critical") if i % 3 else ("marketing", "bulk"))
        ip = "127.0.0.20" if i % 2 else "127.0.0.21"
        common = dict(time_queued=1_800_000_000.0, orig="s@insurer.test",
                      rcpt=f"r{i}@example.com", queue_id=f"Q{i}", cls=cls, vmta_pool=pool,
                      dlv_source_ip=ip)
        out.append(Record(type="r", time_logged=1_800_000_000.0, **common))
        out.append(Record(type="d", time_logged=1_800_000_000.0 + latency, **common))
        out.append(Record(type="t", time_logged=1_800_000_000.0 + latency,
                          bounce_cat=("", "quota-issues", "policy-related")[i % 3], **common))
        kind, cat = [("b", "bad-mailbox"), ("b", "message-expired"), ("b", "purged"),
                     ("rb", "bad-mailbox"), ("f", ""), ("s", ""), ("u", ""), ("o", "")][i % 8]
        out.append(Record(type=kind, time_logged=1_800_000_000.0 + latency, bounce_cat=cat,
                          **common))
    out.append(Record(type="d", time_logged=5.0, time_queued=0.0, orig="", rcpt="x@example.com",
                      queue_id="Q", cls="marketing", vmta_pool="bulk"))  # no source IP
    return out


def test_the_figures_are_prometheus_clients_own():
    reference, figures = _Reference(), RecordFigures()
    registry = CollectorRegistry(auto_describe=True)
    registry.register(figures)
    assert generate_latest(registry) == generate_latest(reference.registry)  # before any record
    for rec in _records():
        reference.on_record(rec)
        figures.on_record(rec)
    text = generate_latest(registry)
    assert text == generate_latest(reference.registry)
    assert b'le="+Inf"' in text and b'outcome="remote_bounce"' in text
    assert b'postlane_deferrals_total{category="other",pool="bulk"}' in text
