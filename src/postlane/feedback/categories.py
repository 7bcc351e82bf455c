"""Bounce categories (PowerMTA's names) for SMTP replies and DSN diagnostics.

The rules are data (``data/bounce-rules.toml``) so operators can teach the node a provider's
wording without a release; the evaluation order is described in that file.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path

__all__ = ["ADDRESS_FAILURES", "CATEGORIES", "Classifier", "RulesError", "default_classifier",
           "load_classifier"]

CATEGORIES: frozenset[str] = frozenset({
    "bad-mailbox", "bad-domain", "inactive-mailbox", "quota-issues", "policy-related",
    "spam-related", "content-related", "routing-errors", "protocol-errors", "relaying-issues",
    "bad-connection", "no-answer-from-host", "message-expired", "invalid-sender", "virus-related",
    "bad-configuration", "other",
})
#: Categories whose permanent failure is about the address itself, not its domain: evidence
#: for suppressing it. A domain-level failure (bad-domain: no such domain, no MX) never is: a
#: resolver that fails for a moment must not stop a customer's mail for good.
ADDRESS_FAILURES: frozenset[str] = frozenset({"bad-mailbox", "inactive-mailbox"})

_STATUS = re.compile(r"\b([245])\.(\d{1,3})\.(\d{1,3})\b")


class RulesError(Exception):
    """A rules file that cannot be used (bad TOML, unknown category, bad regex)."""


@dataclass
class Classifier:
    status: dict[str, str] = field(default_factory=dict)  # "X.1.1" -> category
    subject: dict[str, str] = field(default_factory=dict)  # "1" -> category
    text_first: set[str] = field(default_factory=set)
    patterns: list[tuple[re.Pattern[str], str]] = field(default_factory=list)
    for_codes: list[tuple[re.Pattern[str], str, frozenset[str]]] = field(default_factory=list)
    """Patterns (with ``codes``) that outrank the status table for those codes only: a
    provider's wording that contradicts its code (Microsoft 365's "5.4.1 Recipient address
    rejected: Access denied" is no such user, not no answer from host)."""

    def classify(self, status: str, text: str = "") -> str:
        """Category of a reply: ``status`` is the enhanced code if known ("" otherwise; then
        one found in ``text`` is used), ``text`` the reply or diagnostic."""
        if not status or status.endswith(".0.0"):
            found = _STATUS.search(text)
            if found:
                status = found.group(0)
        key = ""
        parts = status.split(".")
        if len(parts) == 3:
            key = f"X.{parts[1]}.{parts[2]}"
        for regex, category, codes in self.for_codes:
            if key in codes and regex.search(text):
                return category
        if key in self.status and key not in self.text_first:
            return self.status[key]
        for regex, category in self.patterns:
            if regex.search(text):
                return category
        if key in self.status:
            return self.status[key]
        if len(parts) == 3 and parts[1] in self.subject:
            return self.subject[parts[1]]
        return "other"

    def extend(self, other: Classifier) -> Classifier:
        """A classifier whose statuses override and whose patterns precede this one's."""
        return Classifier(status={**self.status, **other.status},
                          subject={**self.subject, **other.subject},
                          text_first=(self.text_first | other.text_first),
                          patterns=other.patterns + self.patterns,
                          for_codes=other.for_codes + self.for_codes)


def _category(value: object, where: str) -> str:
    if value not in CATEGORIES:
        raise RulesError(f"{where}: unknown category {value!r}"
                         f" (one of: {', '.join(sorted(CATEGORIES))})")
    return str(value)


def parse_rules(text: str, source: str) -> Classifier:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise RulesError(f"{source}: not valid TOML: {exc}") from None
    status = {str(k): _category(v, f"{source}: status.{k}")
              for k, v in data.get("status", {}).items()}
    subject = {str(k): _category(v, f"{source}: subject.{k}")
               for k, v in data.get("subject", {}).items()}
    patterns = []
    for_codes = []
    for i, item in enumerate(data.get("pattern", [])):
        where = f"{source}: pattern[{i}]"
        if not isinstance(item, dict) or "regex" not in item:
            raise RulesError(f"{where}: needs regex and category")
        try:
            regex = re.compile(str(item["regex"]), re.IGNORECASE)
        except re.error as exc:
            raise RulesError(f"{where}.regex: {exc}") from None
        category = _category(item.get("category"), f"{where}.category")
        if "codes" in item:
            codes = item["codes"]
            if not isinstance(codes, list) or not all(
                    isinstance(c, str) and re.fullmatch(r"X\.\d{1,3}\.\d{1,3}", c) for c in codes):
                raise RulesError(f"{where}.codes: a list of codes such as \"X.4.1\"")
            for_codes.append((regex, category, frozenset(codes)))
        else:
            patterns.append((regex, category))
    return Classifier(status=status, subject=subject,
                      text_first=set(data.get("text_first", [])), patterns=patterns,
                      for_codes=for_codes)


@lru_cache(maxsize=1)
def default_classifier() -> Classifier:
    text = resources.files("postlane").joinpath("data/bounce-rules.toml").read_text("utf-8")
    return parse_rules(text, "bounce-rules.toml")


def load_classifier(path: str | Path | None) -> Classifier:
    """The built-in rules, extended by an operator's file if one is configured."""
    base = default_classifier()
    if not path:
        return base
    try:
        text = Path(path).read_text("utf-8")
    except OSError as exc:
        raise RulesError(f"{path}: cannot read: {exc.strerror}") from None
    return base.extend(parse_rules(text, str(path)))
