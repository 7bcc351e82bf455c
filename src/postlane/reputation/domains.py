"""Which DMARC policy domains are ours: a report about any other is dropped unread.

Anyone can mail the ``rua`` address, so one forged report naming someone else's domain was
stored and raised ``dmarc-unknown-senders`` for it. The node knows its own domains from its
config: those it signs for, sends as, and receives reports at. A policy domain is ours when its
organisational domain (RFC 7489 §3.2, the public suffix list) is one of theirs: relaxed
alignment, so a report for ``insurer.example`` is ours when we sign for
``mail.insurer.example``, and a report for ``news.insurer.example`` too (the DMARC record of the
organisation covers its subdomains; a subdomain may publish its own).
"""

from __future__ import annotations

from ..address import domain_key
from ..config import Config
from ..policy.identity import org_domain

__all__ = ["OurDomains", "configured_domains"]


def configured_domains(config: Config) -> set[str]:
    """The domains the config names as the node's own: the DKIM keys' ``d=`` (retired keys too:
    reports arrive for days after), the pools' signing, Return-Path and bounce domains, the
    classification rules' From and envelope sender domains, the domain of the node's own mail
    (``node.postmaster``, ``node.hostname``), the ``rua`` addresses' domains, and
    ``reputation.dmarc.domains``."""
    names = [key.domain for key in config.dkim.keys]
    for pool in config.pools.values():
        names += [pool.signing_domain or "", pool.return_path_domain or "",
                  pool.bounce_domain or ""]
    for rule in config.classification.rules:
        names += [rule.from_domain or "", rule.sender_domain or ""]
    names += [config.node.hostname, (config.node.postmaster or "").rpartition("@")[2]]
    names += [a.rpartition("@")[2] for a in config.reputation.dmarc.addresses]
    names += config.reputation.dmarc.domains
    return {domain_key(n.strip().rstrip(".")) for n in names if n.strip().rstrip(".")}


class OurDomains:
    """``domain in ours``: the organisational domain of ``domain`` is that of a configured one."""

    def __init__(self, config: Config) -> None:
        self.orgs = frozenset(org_domain(d) for d in configured_domains(config))

    def __contains__(self, domain: object) -> bool:
        if not isinstance(domain, str):
            return False
        name = domain_key(domain.strip().rstrip("."))
        return bool(name) and org_domain(name) in self.orgs
