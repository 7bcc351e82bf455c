"""What DMARC aggregate reports say about who sends as our domains.

Each reported source is put in one group:

- ``pools``: the source IP is one of our pools' IPs. Our own mail: its DKIM alignment is ours
  to fix.
- ``forwarders``: another IP, SPF not aligned, DKIM aligned. Mail forwarded by the recipient's
  organisation (the signature survives, the IP changes): the case study's corporate forwarding.
- ``authorised``: another IP, SPF aligned. Another system the SPF record lists (an ESP, the
  CRM).
- ``unknown``: another IP, neither aligned. Spoofing, or a forgotten system that sends as the
  domain.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

__all__ = ["GROUPS", "group_of", "summarise"]

GROUPS = ("pools", "forwarders", "authorised", "unknown")


def group_of(source_ip: str, dkim: bool, spf: bool, pool_ips: dict[str, str]) -> str:
    if source_ip in pool_ips:
        return "pools"
    if dkim and not spf:
        return "forwarders"
    return "authorised" if spf else "unknown"


def _rate(part: int, whole: int) -> float | None:
    return round(part / whole, 6) if whole else None


def summarise(rows: Iterable[tuple[str, str, bool, bool, int]], pool_ips: dict[str, str],
              top: int = 5) -> dict:
    """Per header-From domain: messages, DMARC pass rate (DKIM or SPF aligned), DKIM alignment,
    and the four groups with their top sources; per pool and per pool IP: the same rates.
    ``rows`` are ``(header_from, source_ip, dkim_aligned, spf_aligned, messages)``."""
    domains: dict[str, dict] = {}
    sources: dict[str, dict[tuple[str, str], dict]] = defaultdict(dict)
    """Per domain, per (group, source IP): one pass, so hostile reports naming thousands of
    domains cost their rows, not domains x sources."""
    pools: dict[str, dict] = defaultdict(lambda: {"messages": 0, "passed": 0, "dkim": 0})
    ips: dict[str, dict] = defaultdict(lambda: {"messages": 0, "passed": 0, "dkim": 0})
    for domain, ip, dkim, spf, count in rows:
        group = group_of(ip, dkim, spf, pool_ips)
        dom = domains.setdefault(domain, {"domain": domain, "messages": 0, "passed": 0,
                                          "dkim": 0, "groups": {g: 0 for g in GROUPS}})
        dom["messages"] += count
        dom["passed"] += count if dkim or spf else 0
        dom["dkim"] += count if dkim else 0
        dom["groups"][group] += count
        src = sources[domain].setdefault((group, ip), {
            "source_ip": ip, "pool": pool_ips.get(ip), "messages": 0, "dkim_aligned": 0,
            "spf_aligned": 0})
        src["messages"] += count
        src["dkim_aligned"] += count if dkim else 0
        src["spf_aligned"] += count if spf else 0
        if group == "pools":
            for acc in (pools[pool_ips[ip]], ips[ip]):
                acc["messages"] += count
                acc["passed"] += count if dkim or spf else 0
                acc["dkim"] += count if dkim else 0
    out_domains = []
    for name in sorted(domains):
        dom = domains[name]
        by_group: dict[str, list[dict]] = {g: [] for g in GROUPS}
        for (group, _), src in sources[name].items():
            by_group[group].append(src)
        tops = {g: sorted(by_group[g], key=lambda s: (-s["messages"], s["source_ip"]))[:top]
                for g in GROUPS}
        out_domains.append({
            "domain": name, "messages": dom["messages"],
            "pass_rate": _rate(dom["passed"], dom["messages"]),
            "dkim_rate": _rate(dom["dkim"], dom["messages"]),
            "groups": {g: {"messages": dom["groups"][g], "top": tops[g]} for g in GROUPS}})
    return {"domains": out_domains,
            "pools": [{"pool": name, **_rates(p)} for name, p in sorted(pools.items())],
            "ips": {ip: _rates(p) for ip, p in sorted(ips.items())}}


def _rates(acc: dict) -> dict:
    return {"messages": acc["messages"], "pass_rate": _rate(acc["passed"], acc["messages"]),
            "dkim_rate": _rate(acc["dkim"], acc["messages"])}
