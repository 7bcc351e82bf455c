"""The reputation view's gauges for /metrics: DMARC pass ratios per domain and pool, Gmail
Postmaster spam ratio and reputations, SNDS filter results and complaint ratios, the imports'
ages and the stale rules (the view itself is ``service.py``'s)."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .alignment import GROUPS
from .service import LEVELS, ReputationService

__all__ = ["ReputationCollector"]

_FILTERS = {"GREEN": 0, "YELLOW": 1, "RED": 2}


class ReputationCollector(Collector):
    """The gauges of the reputation view, for /metrics."""

    def __init__(self, service: ReputationService) -> None:
        self.service = service

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        view = self.service.view
        if not view:
            return
        dmarc = view["dmarc"]
        domain_pass = GaugeMetricFamily("postlane_dmarc_pass_ratio", "Share of reported"
                                        " messages passing DMARC (SPF or DKIM aligned), per"
                                        " header From domain", labels=["domain"])
        groups = GaugeMetricFamily("postlane_dmarc_messages", "Reported messages per sender"
                                   " group (pools, forwarders, authorised, unknown)",
                                   labels=["domain", "group"])
        for dom in dmarc["domains"]:
            if dom["pass_rate"] is not None:
                domain_pass.add_metric([dom["domain"]], dom["pass_rate"])
            for group in GROUPS:
                groups.add_metric([dom["domain"], group], dom["groups"][group]["messages"])
        pool_pass = GaugeMetricFamily("postlane_dmarc_pool_pass_ratio", "Share of a pool's"
                                      " reported messages passing DMARC", labels=["pool"])
        pool_dkim = GaugeMetricFamily("postlane_dmarc_pool_dkim_aligned_ratio", "Share of a"
                                      " pool's reported messages with aligned DKIM",
                                      labels=["pool"])
        for pool in dmarc["pools"]:
            if pool["pass_rate"] is not None:
                pool_pass.add_metric([pool["pool"]], pool["pass_rate"])
                pool_dkim.add_metric([pool["pool"]], pool["dkim_rate"])
        yield from (domain_pass, groups, pool_pass, pool_dkim)
        spam = GaugeMetricFamily("postlane_gmail_spam_ratio", "Gmail user-reported spam ratio"
                                 " (latest day)", labels=["domain"])
        dom_rep = GaugeMetricFamily("postlane_gmail_domain_reputation", "Gmail domain"
                                    " reputation: 0 bad, 1 low, 2 medium, 3 high",
                                    labels=["domain"])
        ip_rep = GaugeMetricFamily("postlane_gmail_ip_reputation", "Gmail IP reputation: 0 bad,"
                                   " 1 low, 2 medium, 3 high", labels=["pool", "ip"])
        snds = GaugeMetricFamily("postlane_snds_filter", "SNDS filter result: 0 green,"
                                 " 1 yellow, 2 red", labels=["pool", "ip"])
        complaints = GaugeMetricFamily("postlane_snds_complaint_ratio", "SNDS complaint rate",
                                       labels=["pool", "ip"])
        seen = set()
        for pool in view["pools"]:
            g = pool["gmail"]
            if g and g["domain"] not in seen:
                seen.add(g["domain"])
                if g["spam_ratio"] is not None:
                    spam.add_metric([g["domain"]], g["spam_ratio"])
                if g["domain_reputation"] in LEVELS:
                    dom_rep.add_metric([g["domain"]], LEVELS[g["domain_reputation"]])
            for ip in pool["ips"]:
                if ip["gmail_reputation"] in LEVELS:
                    ip_rep.add_metric([pool["pool"], ip["address"]],
                                      LEVELS[ip["gmail_reputation"]])
                if ip["snds"]:
                    snds.add_metric([pool["pool"], ip["address"]],
                                    _FILTERS[ip["snds"]["filter"]])
                    complaints.add_metric([pool["pool"], ip["address"]],
                                          ip["snds"]["complaint_ratio"])
        yield from (spam, dom_rep, ip_rep, snds, complaints)
        age = GaugeMetricFamily("postlane_reputation_import_age_seconds", "Seconds since the"
                                " last successful import", labels=["source"])
        for source, state in view["imports"].items():
            if state["age_s"] is not None:
                age.add_metric([source], state["age_s"])
        yield age
        yield GaugeMetricFamily("postlane_rules_stale", "Destination rules not reviewed within"
                                " reputation.review_after", value=len(view["stale_rules"]))


