"""A pool's domain identity: the envelope sender domain its mail uses and DMARC alignment.

Marketing gets its own domain identity (the case study's "separate domain"), so that its
reputation and bounces never mix with those of transactional mail.
"""

from __future__ import annotations

from functools import cache

from publicsuffixlist import PublicSuffixList

from ..config.model import PoolConfig


@cache
def _psl() -> PublicSuffixList:
    # Loaded on first use (~0.1 s) from the list the package ships: no network at run time.
    return PublicSuffixList()


def org_domain(domain: str) -> str:
    """The organisational domain (RFC 7489 §3.2), e.g. ``insurer.co.uk`` for
    ``news.insurer.co.uk``; a public suffix itself is its own organisational domain."""
    return _psl().privatesuffix(domain) or domain


def aligned(from_domain: str, signing_domain: str, mode: str) -> bool:
    """DMARC identifier alignment: the same domain (strict) or organisational domain (relaxed)."""
    if from_domain == signing_domain:
        return True
    return mode == "relaxed" and org_domain(from_domain) == org_domain(signing_domain)


def envelope_sender(pool: PoolConfig, mail_from: str) -> str:
    """The envelope sender as sent: the pool's Return-Path domain replaces the sender's, so
    bounces reach the pool's own domain; the null sender stays null."""
    if not pool.return_path_domain or not mail_from:
        return mail_from
    local = mail_from.rpartition("@")[0] if "@" in mail_from else mail_from
    return f"{local}@{pool.return_path_domain}"
