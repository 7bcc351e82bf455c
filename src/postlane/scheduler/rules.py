"""Destination rules (ISP shaping): which rule a lane follows, matched on the recipient domain or,
once resolved, on its MX hosts."""

from __future__ import annotations

import fnmatch

from ..config.destinations import DEFAULTS_FILE, default_rules
from ..config.model import DestinationRule

__all__ = ["DEFAULTS_FILE", "RuleBook", "default_rules"]


class RuleBook:
    """Operator rules first, then the shipped defaults; exact domains before patterns."""

    def __init__(self, rules: dict[str, DestinationRule]) -> None:
        self.rules = rules
        self._exact: dict[str, str] = {}
        self._patterns: list[tuple[str, str]] = []
        for name, rule in rules.items():
            for domain in rule.domains:
                domain = domain.lower()
                if any(ch in domain for ch in "*?["):
                    self._patterns.append((domain, name))
                else:
                    self._exact.setdefault(domain, name)
        self._patterns.sort(key=lambda item: (item[0] == "*", -len(item[0])))
        self._mx = [(pat.lower(), name) for name, rule in rules.items() for pat in rule.mx]

    def for_domain(self, domain: str) -> str | None:
        domain = domain.lower()
        name = self._exact.get(domain)
        if name is not None:
            return name
        for pattern, pname in self._patterns:
            if fnmatch.fnmatchcase(domain, pattern):
                return pname
        return None

    def for_mx(self, hosts: list[str]) -> str | None:
        for host in hosts:
            host = host.lower().rstrip(".")
            for pattern, name in self._mx:
                if fnmatch.fnmatchcase(host, pattern):
                    return name
        return None
