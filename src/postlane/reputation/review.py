"""The monthly review of the destination rules: each rule in force, where it comes from, when
it was last reviewed, and what the last 30 days of delivery and reputation data suggest.

The delivery side comes from the audit store (every "d", "t" and "b" record, matched to a rule
by recipient domain or by the MX host in ``dsnMta``); a "t" whose reply matches one of the
rule's ``backoff_on`` fragments counts as throttled. The reputation side comes from the
reputation store: Postmaster Tools for rules covering gmail.com, SNDS (the pools' IPs only) for
those covering outlook.com or hotmail.com.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable
from importlib import resources

from ..config import Config
from ..scheduler.rules import DEFAULTS_FILE, RuleBook, default_rules

__all__ = ["PERIOD", "review", "rule_origins", "stale_rules"]

PERIOD = 30 * 86400.0
_SECTION = re.compile(r"^\[([A-Za-z0-9_.-]+)\]\s*$")


def _shipped_sources() -> dict[str, str]:
    """Each shipped rule's "# Source:" comment (with its continuation lines)."""
    text = resources.files("postlane.data").joinpath(DEFAULTS_FILE).read_text("utf-8")
    out: dict[str, str] = {}
    name, source = None, None
    for line in text.splitlines():
        match = _SECTION.match(line)
        if match:
            name, source = match.group(1), None
        elif name and line.startswith("# Source:"):
            source = line.removeprefix("# Source:").strip()
            out[name] = source
        elif name and source is not None and line.startswith("#"):
            source = f"{source} {line.lstrip('# ').strip()}"
            out[name] = source
        else:
            source = None
    return out


def rule_origins(config: Config, config_file: str = "") -> dict[str, dict]:
    """Per rule in force: ``origin`` (shipped, operator, or operator override of a shipped
    rule), ``file`` and, for shipped rules, the published ``source`` of its numbers."""
    shipped = default_rules() if config.default_destinations else {}
    sources = _shipped_sources()
    own = config_file or "the node's config file"
    out = {}
    for name, rule in config.destinations.items():
        if name in shipped and shipped[name] == rule:
            out[name] = {"origin": "shipped", "file": f"postlane/data/{DEFAULTS_FILE}",
                         "source": sources.get(name, "")}
        else:
            out[name] = {"origin": "operator override" if name in shipped else "operator",
                         "file": own, "source": rule.reason}
    return out


def stale_rules(config: Config, reviews: dict[str, dict], now: float) -> list[dict]:
    """Rules not reviewed within ``reputation.review_after`` (never reviewed: stale)."""
    limit = config.reputation.review_after
    out = []
    for name in sorted(config.destinations):
        last = reviews.get(name, {}).get("reviewed_at")
        if last is None or now - last > limit:
            out.append({"rule": name, "last_reviewed": last,
                        "age_days": None if last is None else round((now - last) / 86400, 1)})
    return out


def _traffic(config: Config, records: Iterable[dict], now: float) -> dict[str, dict]:
    """Per rule: delivered, deferred, throttled and bounced in each half of the period."""
    book = RuleBook(config.destinations)
    half = now - PERIOD / 2
    out: dict[str, dict] = {}
    by_domain: dict[str, str | None] = {}
    for rec in records:
        kind = rec.get("type")
        if kind not in ("d", "t", "b"):
            continue
        domain = str(rec.get("rcpt") or "").rpartition("@")[2].lower()
        if domain not in by_domain:
            by_domain[domain] = book.for_domain(domain)
        name = by_domain[domain]
        if name is None:
            mx = str(rec.get("dsn_mta") or "").removeprefix("dns;").strip()
            name = book.for_mx([mx]) if mx else None
        if name is None:
            continue
        rule = config.destinations[name]
        part = "recent" if float(rec.get("time_logged") or 0) >= half else "earlier"
        acc = out.setdefault(name, {p: {"delivered": 0, "deferred": 0, "throttled": 0,
                                        "bounced": 0} for p in ("earlier", "recent")})[part]
        if kind == "d":
            acc["delivered"] += 1
        elif kind == "b":
            acc["bounced"] += 1
        else:
            acc["deferred"] += 1
            reply = f"{rec.get('dsn_status', '')} {rec.get('dsn_diag', '')}".lower()
            if any(fragment.lower() in reply for fragment in rule.backoff_on):
                acc["throttled"] += 1
    return out


def _share(acc: dict) -> float:
    attempts = acc["delivered"] + acc["deferred"] + acc["bounced"]
    return acc["throttled"] / attempts if attempts else 0.0


def _suggest(rule_domains: list[str], traffic: dict | None, have_records: bool,
             gmail: list[dict], snds: list[dict], warning: float, critical: float) -> list[str]:
    out: list[str] = []
    if not have_records:
        out.append("no delivery data: the audit store is off or empty")
    elif traffic is None:
        out.append("no traffic in the last 30 days: keep the rule only if mail is expected")
    else:
        early, recent = _share(traffic["earlier"]), _share(traffic["recent"])
        total = {k: traffic["earlier"][k] + traffic["recent"][k] for k in traffic["recent"]}
        if recent > 0.01 and recent > 1.5 * early:
            out.append(f"deferrals with throttling replies rising ({early:.1%} -> {recent:.1%}"
                       " of attempts): lower max_connections_per_ip / max_rate_per_ip, and"
                       " check the reputation data")
        elif _share(total) > 0.05:
            out.append(f"{_share(total):.1%} of attempts throttled: the limits are above what"
                       " the provider accepts")
        elif total["throttled"] == 0 and total["delivered"] >= 1000:
            out.append("no throttling in 30 days: the limits hold (raise them carefully if"
                       " queues wait)")
    if "gmail.com" in rule_domains and gmail:
        worst = max((g["spam_ratio"] or 0.0) for g in gmail)
        if worst > warning:
            out.append(f"Gmail user-reported spam ratio reached {worst:.2%} (limit"
                       f" {critical:.2%})")
        bad = sorted({g["domain"] for g in gmail if g["domain_reputation"] in ("LOW", "BAD")})
        if bad:
            out.append(f"Gmail domain reputation LOW/BAD on some days for {', '.join(bad)}")
    if {"outlook.com", "hotmail.com"} & set(rule_domains) and snds:
        red = sum(1 for s in snds if s["filter"] == "RED")
        yellow = sum(1 for s in snds if s["filter"] == "YELLOW")
        if red or yellow:
            out.append(f"SNDS: {red} RED and {yellow} YELLOW IP-days")
    return out


def review(config: Config, reviews: dict[str, dict], records: Iterable[dict] | None,
           gmail: list[dict], snds: list[dict], now: float | None = None,
           config_file: str = "") -> list[dict]:
    """One entry per rule in force (``postlane rules review``). ``records``: the audit
    records of the last 30 days (None: no audit store to read)."""
    now = time.time() if now is None else now
    origins = rule_origins(config, config_file)
    traffic = _traffic(config, records, now) if records is not None else {}
    # an SNDS account may list IPs that are not the pools' (old ones, another department's):
    # their colours say nothing about these rules
    ours = {ip.address for pool in config.pools.values() for ip in pool.ips}
    snds = [row for row in snds if row.get("ip") in ours]
    stale = {s["rule"] for s in stale_rules(config, reviews, now)}
    out = []
    for name in sorted(config.destinations):
        rule = config.destinations[name]
        domains = [d.lower() for d in rule.domains]
        last = reviews.get(name, {})
        suggestions = _suggest(domains, traffic.get(name), records is not None, gmail, snds,
                               config.reputation.spam_ratio_warning,
                               config.reputation.spam_ratio_critical)
        out.append({"rule": name, **origins[name], "domains": domains, "mx": rule.mx,
                    "last_reviewed": last.get("reviewed_at"), "reviewer": last.get("reviewer"),
                    "stale": name in stale, "traffic": traffic.get(name),
                    "suggestions": suggestions})
    return out
