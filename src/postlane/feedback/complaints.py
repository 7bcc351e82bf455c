"""Complaint rates per pool and per destination domain, with an alert above a threshold.

Gmail and Yahoo require bulk senders to stay under 0.3 % of complaints; the default alert is at
0.1 % so that there is time to act. The rate is complaints / deliveries since the node started
(the monitor turns the counters into time series; ``rates()`` is what it reads).
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..config.model import FeedbackConfig

__all__ = ["ComplaintRates"]

log = logging.getLogger("postlane.feedback")


class ComplaintRates:
    def __init__(self, alert_rate: float, min_delivered: int) -> None:
        self.alert_rate = alert_rate
        self.min_delivered = min_delivered
        self.delivered: Counter[tuple[str, str]] = Counter()
        self.complaints: Counter[tuple[str, str]] = Counter()
        self.alerting: set[tuple[str, str]] = set()

    @classmethod
    def for_config(cls, feedback: FeedbackConfig) -> ComplaintRates:
        """The rates ``[feedback]`` asks for (its alert threshold and minimum volume)."""
        return cls(feedback.complaint_alert_rate, feedback.complaint_min_delivered)

    def on_delivered(self, pool: str, domain: str) -> None:
        self.delivered[(pool, domain)] += 1
        self.delivered[(pool, "*")] += 1

    def on_complaint(self, pool: str, domain: str) -> None:
        for key in ((pool, domain), (pool, "*")):
            self.complaints[key] += 1
            self._check(key)

    def rate(self, pool: str, domain: str = "*") -> float:
        sent = self.delivered[(pool, domain)]
        return self.complaints[(pool, domain)] / sent if sent else 0.0

    def _check(self, key: tuple[str, str]) -> None:
        rate = self.rate(*key)
        over = self.delivered[key] >= self.min_delivered and rate > self.alert_rate
        if over and key not in self.alerting:
            self.alerting.add(key)
            log.warning("complaint rate above threshold", extra={
                "pool": key[0], "domain": key[1], "rate": round(rate, 5),
                "threshold": self.alert_rate, "complaints": self.complaints[key],
                "delivered": self.delivered[key]})
        elif not over:
            self.alerting.discard(key)

    def rates(self) -> list[dict]:
        """One row per pool ("*" domain: the whole pool) and per pool/domain with deliveries or
        complaints, for /metrics and the status page."""
        keys = sorted(set(self.delivered) | set(self.complaints))
        return [{"pool": p, "domain": d, "delivered": self.delivered[(p, d)],
                 "complaints": self.complaints[(p, d)], "rate": round(self.rate(p, d), 6),
                 "alert": (p, d) in self.alerting} for p, d in keys]
