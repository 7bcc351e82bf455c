"""What the dashboard shows beside the SLA view, from the accounting stream: outcome totals per
hour, per source IP counts, and the top deferral and bounce reasons per pool and domain (as
PowerMTA's monitor does), over the last 24 hours.

Memory is bounded: 24 hourly buckets, each with at most ``MAX_REASONS`` distinct reasons (a
reason is the reply with addresses and ids taken out, so one refusal of many recipients is
one key).
"""

from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass, field

from ..accounting.records import Record
from ..scheduler.control import reason_key

__all__ = ["Activity"]

HOURS = 24
MAX_REASONS = 2000


_BOUNCES = {"message-expired": "expired", "purged": "purged"}


def outcome(rec: Record) -> str | None:
    """delivered, deferred, bounced, expired or purged; None for other record types."""
    kind = rec.type
    if kind == "d":
        return "delivered"
    if kind == "t":
        return "deferred"
    if kind == "b":
        return _BOUNCES.get(rec.bounce_cat, "bounced")
    return None


@dataclass(slots=True)
class _Hour:
    start: float
    totals: Counter = field(default_factory=Counter)
    ips: Counter = field(default_factory=Counter)
    """(pool, source IP, outcome) -> count"""
    reasons: Counter = field(default_factory=Counter)
    """(outcome, pool, domain, reason, category) -> count"""


class Activity:
    def __init__(self) -> None:
        self.hours: deque[_Hour] = deque(maxlen=HOURS)

    def on_record(self, rec: Record) -> None:
        """Accounting listener (registered by the node)."""
        kind = outcome(rec)
        if kind is None:
            return
        start = rec.time_logged // 3600 * 3600
        hours = self.hours
        if hours and hours[-1].start == start:  # nearly always: the hour under way
            hour = hours[-1]
        else:
            if not hours or hours[-1].start < start:
                hours.append(_Hour(start))
            hour = next((h for h in reversed(hours) if h.start <= start), hours[0])
        hour.totals[kind] += 1
        if rec.dlv_source_ip:
            hour.ips[(rec.vmta_pool, rec.dlv_source_ip, kind)] += 1
        if kind in ("deferred", "bounced"):
            key = (kind, rec.vmta_pool, rec.rcpt.rpartition("@")[2].lower(),
                   reason_key(rec.dsn_diag.removeprefix("smtp;")), rec.bounce_cat)
            if key in hour.reasons or len(hour.reasons) < MAX_REASONS:
                hour.reasons[key] += 1

    def view(self, now: float, top: int = 20) -> dict:
        """Hourly totals (oldest first), per-IP counts and the top reasons of the last 24 h."""
        recent = [h for h in self.hours if h.start > now - HOURS * 3600]
        ips: Counter = Counter()
        reasons: Counter = Counter()
        for hour in recent:
            ips.update(hour.ips)
            reasons.update(hour.reasons)
        per_ip: dict[tuple[str, str], dict] = {}
        for (pool, ip, kind), n in ips.items():
            per_ip.setdefault((pool, ip), {"pool": pool, "source_ip": ip})[kind] = n
        return {
            "hours": [{"hour": h.start, **{k: h.totals.get(k, 0) for k in (
                "delivered", "deferred", "bounced", "expired", "purged")}} for h in recent],
            "ips": list(per_ip.values()),
            "reasons": [{"outcome": k[0], "pool": k[1], "domain": k[2], "reason": k[3],
                         "category": k[4], "count": n} for k, n in reasons.most_common(top)],
        }
