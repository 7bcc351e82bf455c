"""The SLA report: compliance per class over the messages that could be delivered, and the real
cause of each breach and non-delivery.

A recipient the destination refused for good (no such user, no such domain) or that an operator
purged is not deliverable: it is counted and listed apart, not as a breach. For a breach, the
time it waited is split among what the records show held it: deferrals by the destination, an
operator's pause of its pool or lane or hold of the message (their chained "o" records), and
our own queue (backlog, suspended destination, backoff); the largest share names the cause.
"""

from __future__ import annotations

import csv
import io
import math
import time
from collections.abc import Sequence
from typing import Any

from ..accounting.records import format_time
from .evidence import AUTHENTICATED, Trail, trails, visible
from .store import AuditStore, Query

__all__ = ["CAUSES", "explain", "render_sla", "render_sla_csv", "sla_report"]

CAUSES = {
    "remote-permanent": "permanent failure at the destination",
    "operator-purge": "purged by an operator",
    "suppressed": "stopped by the suppression list while queued",
    "expiry": "expired",
    "remote-deferral": "deferred by the destination",
    "our-pause": "paused or held by an operator",
    "our-backoff": "waited in our queue (backlog, suspended destination or backoff)",
}
"""Cause keys of the report and their wording."""

Pauses = Sequence[tuple[float, float, str]]


def _paused(start: float, end: float, spans: list[tuple[float, float]]) -> float:
    """Seconds of [start, end) covered by the (merged) pause spans."""
    covered, reach = 0.0, start
    for p_start, p_end in spans:
        lo, hi = max(p_start, reach), min(p_end, end)
        if hi > lo:
            covered += hi - lo
            reach = hi
    return covered


def _holds(trail: Trail, end: float) -> list[tuple[float, float, str]]:
    """(start, end, operator) of each time an operator held this recipient: from the hold to
    its release, or to ``end``."""
    spans: list[tuple[float, float, str]] = []
    held: dict | None = None
    for row in trail.rows:
        if row["type"] == "o" and row["dsn_action"] == "hold" and held is None:
            held = row
        elif row["type"] == "o" and row["dsn_action"] == "release" and held is not None:
            spans.append((held["time_logged"], row["time_logged"], held["operator"]))
            held = None
    if held is not None:
        spans.append((held["time_logged"], end, held["operator"]))
    return spans


def waits(trail: Trail, pauses: Pauses, now: float) -> dict[str, float]:
    """Seconds the recipient waited, by cause: before its first attempt (our queue), after each
    deferral (the destination), and within either, while its pool or lane was paused or an
    operator held it."""
    domain = trail.rcpt.rpartition("@")[2].lower()
    final = trail.final
    end = final["time_logged"] if final else now
    spans = sorted([(s, e) for s, e, d in pauses if d in ("*", domain)]
                   + [(s, e) for s, e, _ in _holds(trail, end)])
    out = dict.fromkeys(("remote-deferral", "our-pause", "our-backoff"), 0.0)
    cursor, cause = trail.first["time_queued"], "our-backoff"
    for row in [*(r for r in trail.rows if r["type"] in ("d", "t", "b")), None]:
        until = end if row is None else min(row["time_logged"], end)
        if until > cursor:
            paused = _paused(cursor, until, spans)
            out["our-pause"] += paused
            out[cause] += until - cursor - paused
            cursor = until
        if row is not None and row["type"] == "t":
            cause = "remote-deferral"
    return {k: round(v, 3) for k, v in out.items()}


def _deferrals(trail: Trail) -> str:
    deferrals = [r for r in trail.rows if r["type"] == "t"]
    if not deferrals:
        return ""
    return f"{len(deferrals)} deferral(s), last reply: {deferrals[-1]['dsn_diag']}"


def explain(trail: Trail, pauses: Pauses, now: float) -> tuple[str, str, dict[str, float]]:
    """(cause key, the evidence in words, seconds waited by cause) for a recipient that was
    not delivered within its SLA."""
    held = waits(trail, pauses, now)
    shares = ", ".join(f"{CAUSES[k]} {v:.1f}s" for k, v in held.items() if v >= 0.05)
    deferrals = _deferrals(trail)
    final = trail.final
    excluded = trail.not_deliverable
    if excluded is not None:
        assert final is not None
        queued = final["time_logged"] - trail.first["time_queued"]
        before = f"; before: {deferrals}" if deferrals else ""
        return excluded, (f"{final['dsn_diag']} at {format_time(final['time_logged'])}, "
                          f"{queued:.1f}s after queueing{before}"), held
    if final is not None and final["bounce_cat"] == "message-expired":
        return "expiry", (f"{final['dsn_diag']}; waited: {shares or '-'}"
                          + (f"; {deferrals}" if deferrals else "")), held
    cause = max(held, key=held.__getitem__)
    detail = f"waited: {shares or '-'}" + (f"; {deferrals}" if deferrals else "")
    if cause == "our-pause":
        domain = trail.rcpt.rpartition("@")[2].lower()
        windows = [f"{'pool' if d == '*' else 'lane to ' + d} paused {format_time(s)} to "
                   f"{format_time(e)}" for s, e, d in pauses if d in ("*", domain)]
        if windows:
            detail += f"; pool {trail.first['vmta_pool']}: " + ", ".join(windows)
        end = final["time_logged"] if final else now
        detail += "".join(f"; held by operator {who} {format_time(s)} to {format_time(e)}"
                          for s, e, who in _holds(trail, end))
    return cause, detail, held


def _percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (no interpolation: every figure is a real message's latency)."""
    if not values:
        return None
    ranked = sorted(values)
    return ranked[max(0, math.ceil(q / 100 * len(ranked)) - 1)]


def sla_report(store: AuditStore, since: float, until: float, cls: str | None = None,
               now: float | None = None) -> dict:
    """Per class: recipients queued in [since, until) (one "message" per recipient, as an SLA
    applies to each delivery); the deliverable ones, the share of them delivered within the
    SLA, latency percentiles; every breach and every non-deliverable recipient with its ids and
    cause."""
    now = time.time() if now is None else now
    classes = [cls] if cls else store.classes()
    report: dict = {"from": format_time(since), "to": format_time(until), "classes": {}}
    for name in classes:
        # Bounces the node generates itself (src_type "dsn") are not the sender's messages.
        items = [t for t in trails(store.find(Query(cls=name, since=since, until=until)))
                 if t.received is not None and t.received["src_type"] != "dsn"]
        if not items:
            continue
        pools = {t.first["vmta_pool"] for t in items}
        pauses = {pool: store.pauses(pool, now) for pool in pools}
        sla = next((t.sla for t in items if t.sla is not None), None)
        latencies = [t.latency for t in items if t.latency is not None]
        deliveries = [t.final for t in items if t.latency is not None]
        encrypted = sum(1 for d in deliveries if d and d["dlv_tls_protocol"])
        authenticated = sum(1 for d in deliveries if d and d["dlv_tls_auth"] in AUTHENTICATED)
        verdicts = [(t, t.sla_met(now)) for t in items]
        open_ = sum(1 for t, met in verdicts if met is None and not t.not_deliverable)
        breaches: list[dict[str, Any]] = []
        excluded: list[dict[str, Any]] = []
        for trail, met in verdicts:
            if met is not False and not (sla is not None and trail.not_deliverable):
                continue
            cause, detail, held = explain(trail, pauses[trail.first["vmta_pool"]], now)
            (excluded if trail.not_deliverable else breaches).append({
                "queue_id": trail.queue_id, "message_id": trail.first["message_id"],
                "correlation_id": trail.first["correlation_id"], "recipient": trail.rcpt,
                "queued": format_time(trail.first["time_queued"]), "outcome": trail.outcome,
                "latency_s": trail.latency, "cause": cause, "detail": detail, "waits_s": held})
        unknown: list[dict[str, Any]] = []
        for trail in items:
            if trail.unknown:
                first = min(r["total_seconds_queued"] for r in trail.unknown)
                unknown.append({
                    "queue_id": trail.queue_id, "message_id": trail.first["message_id"],
                    "correlation_id": trail.first["correlation_id"], "recipient": trail.rcpt,
                    "attempts": [r["attempt"] for r in trail.unknown],
                    "started_after_s": first, "outcome": trail.outcome,
                    "latency_s": trail.latency,
                    "within_sla_if_then": None if sla is None else first <= sla})
        within = sum(1 for _, m in verdicts if m)
        deliverable = within + len(breaches) if sla is not None else None
        report["classes"][name] = {
            "messages": len(items), "delivered": len(latencies), "sla_seconds": sla,
            "deliverable": deliverable, "within_sla": within if sla is not None else None,
            "within_sla_share": round(within / deliverable, 6) if deliverable else None,
            "open": open_ if sla is not None else None,
            "not_deliverable": {key: sum(1 for e in excluded if e["cause"] == key)
                                for key in ("remote-permanent", "operator-purge")},
            "breach_causes": {key: n for key in CAUSES
                              if (n := sum(1 for b in breaches if b["cause"] == key))},
            "latency_s": {f"p{q}": _percentile(latencies, q) for q in (50, 95, 99)},
            "tls": {"encrypted": encrypted, "authenticated": authenticated,
                    "encrypted_share": round(encrypted / len(latencies), 6) if latencies
                    else None,
                    "authenticated_share": round(authenticated / len(latencies), 6)
                    if latencies else None},
            "breaches": breaches, "not_deliverable_recipients": excluded,
            "unknown_attempts": unknown,
        }
    return report


def render_sla(report: dict) -> str:
    lines = [f"SLA report {report['from']} .. {report['to']}"]
    for name, c in report["classes"].items():
        fmt = {k: ("-" if v is None else f"{v:.3f}s") for k, v in c["latency_s"].items()}
        if c["sla_seconds"] is None:
            lines.append(f"{name}: {c['messages']} messages, {c['delivered']} delivered, no SLA;"
                         f" p50 {fmt['p50']} p95 {fmt['p95']} p99 {fmt['p99']}")
            lines += _tls_line(c)
            continue
        share = "-" if c["within_sla_share"] is None else f"{100 * c['within_sla_share']:.2f}%"
        apart = ", ".join(f"{n} {CAUSES[k]}" for k, n in c["not_deliverable"].items() if n)
        lines.append(f"{name} (SLA {c['sla_seconds']:g}s): {c['within_sla']}/{c['deliverable']}"
                     f" deliverable messages within the SLA ({share}); {c['messages']} messages,"
                     f" {c['delivered']} delivered, {c['open']} open"
                     + (f", not deliverable: {apart}" if apart else "")
                     + f"; p50 {fmt['p50']} p95 {fmt['p95']} p99 {fmt['p99']}")
        lines += _tls_line(c)
        for label, key in (("BREACH", "breaches"),
                           ("NOT DELIVERABLE", "not_deliverable_recipients")):
            for b in c[key]:
                lines.append(f"  {label} {b['queue_id']} {b['recipient']} Message-ID "
                             f"{b['message_id'] or '-'} correlation {b['correlation_id'] or '-'}:"
                             f" {b['outcome']}; cause: {CAUSES[b['cause']]}; {b['detail']}")
        for u in c["unknown_attempts"]:
            verdict = ("" if u["within_sla_if_then"] is None else
                       "; within the SLA had it been delivered then" if u["within_sla_if_then"]
                       else "; past the SLA even then")
            tries = ", ".join(map(str, u["attempts"]))
            lines.append(f"  UNKNOWN ATTEMPT {u['queue_id']} {u['recipient']}: attempt(s)"
                         f" {tries} started {u['started_after_s']:.3f}s after queueing, outcome"
                         f" not recorded (node stopped){verdict};"
                         f" then {u['outcome']}")
    if not report["classes"]:
        lines.append("no messages in this period")
    return "\n".join(map(visible, lines)) + "\n"


def _tls_line(c: dict) -> list[str]:
    """How the class's deliveries were protected (docs/tls.md)."""
    tls = c["tls"]
    if not c["delivered"]:
        return []
    return [f"  delivered over TLS: {tls['encrypted']}/{c['delivered']}"
            f" ({100 * tls['encrypted_share']:.2f}%), with the server authenticated (PKIX or"
            f" DANE): {tls['authenticated']}/{c['delivered']}"
            f" ({100 * tls['authenticated_share']:.2f}%)"]


CSV_FIELDS = ("class", "sla_seconds", "messages", "deliverable", "within_sla",
              "within_sla_percent", "delivered", "open", *(f"not_deliverable_{k}" for k in (
                  "remote-permanent", "operator-purge")),
              *(f"breaches_{k}" for k in ("remote-deferral", "our-pause", "our-backoff",
                                          "expiry")), "p50_s", "p95_s", "p99_s",
              "unknown_attempts", "delivered_tls", "delivered_authenticated")


def render_sla_csv(report: dict) -> str:
    """One row per class (RFC 4180); breaches and their evidence are in the text and JSON."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\r\n")
    writer.writerow(CSV_FIELDS)
    for name, c in report["classes"].items():
        share = c["within_sla_share"]
        writer.writerow([
            name, _cell(c["sla_seconds"]), c["messages"], _cell(c["deliverable"]),
            _cell(c["within_sla"]), "" if share is None else f"{100 * share:.4f}",
            c["delivered"], _cell(c["open"]), *c["not_deliverable"].values(),
            *(c["breach_causes"].get(k, 0) for k in ("remote-deferral", "our-pause",
                                                      "our-backoff", "expiry")),
            *(_cell(v) for v in c["latency_s"].values()), len(c["unknown_attempts"]),
            c["tls"]["encrypted"], c["tls"]["authenticated"]])
    return buf.getvalue()


def _cell(value: object) -> object:
    return "" if value is None else value
