"""Which TLS a delivery connection needs, and making it so.

For each MX host of a destination, in precedence order:

1. **DANE** (RFC 7672), when the resolver is trusted for DNSSEC (``dns.dnssec``), the MX answer
   and the host's addresses were authenticated and its TLSA RRset is: TLS is mandatory and the
   certificate must match a usable TLSA record. DANE takes precedence over MTA-STS. A host
   whose addresses were reached through an authenticated CNAME chain has its TLSA records
   looked up at the chain's target first, then at its own name (RFC 7672 2.2.3); one that is
   an authenticated CNAME into an unsigned zone only at its own name (RFC 7672 2.2.2).
2. **MTA-STS** (RFC 8461): ``enforce`` uses only the MXes the policy names, each with a
   certificate valid for its name (PKIX); ``testing`` checks the same, reports what fails and
   delivers anyway.
3. The **class policy** (``classes.X.tls``, default ``relay.tls``; a pool applies the strictest
   of its classes) and the **destination rule**'s ``tls``, whichever is stricter:
   ``opportunistic``, ``required`` (no STARTTLS: defer, never clear text) or ``verified``
   (PKIX for the MX name, ``relay.ca_file`` or the system's CAs).

A class policy stricter than what DANE or MTA-STS asks still holds. Every session's outcome is
counted for TLS-RPT (``tlsrpt.py``); every connection carries, as evidence for its accounting
records, how the server was authenticated (``tls_auth``) and the policy it was made under
(``tls_policy``). Routes (smarthosts, sinks) are not MXes: only the class and rule policies
apply to them.

A mailed TLS-RPT report (``tlsrpt.is_report``) is planned with ``relaxed``: RFC 8460 3 wants it
delivered despite the TLS failures it may be about, and not counted. The scheduler sends it
alone on such a connection (scheduler/delivery.py), so no other mail gets the relaxed policy.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

from ..config import Config
from ..spool import local_dir
from . import dane
from .client import (
    Reply,
    SMTPConnection,
    SMTPError,
    Timeouts,
    unverified_context,
    verifying_context,
)
from .mtasts import MTASTS, STSPolicy
from .mx import Destination, DNSTempError, MXResolver
from .route import Route, Source
from .tlsrpt import NO_POLICY, PolicyRef, TLSReports

log = logging.getLogger("postlane.relay")

__all__ = ["HostPlan", "NoUsableMX", "TLSPolicy"]

LEVELS = ("disabled", "opportunistic", "required", "verified")


def stricter(a: str, b: str | None) -> str:
    return a if b is None or LEVELS.index(a) >= LEVELS.index(b) else b


class NoUsableMX(Exception):
    """The policy leaves no MX to try (MTA-STS enforce names none of them, every DANE host's
    TLSA lookup failed): the destination is deferred with ``reply``."""

    def __init__(self, reply: Reply) -> None:
        super().__init__(str(reply))
        self.reply = reply


@dataclass(slots=True)
class HostPlan:
    """How to connect to one address of a destination."""

    domain: str
    dest: Destination
    level: str  # disabled | opportunistic | required | verified | dane
    policy: str  # evidence: opportunistic, required, verified, mta-sts-*, dane
    report: PolicyRef | None = NO_POLICY
    """What TLS-RPT counts the session under; None: not counted (a route is not the domain's
    MX, so the domain's report is not about it)."""
    tlsa: list[dane.TLSA] = field(default_factory=list)
    names: tuple[str, ...] = ()
    """DANE: the names a DANE-TA certificate may be for, the TLSA records' base domain first
    and the MX host name (RFC 7672 3.2.2); () is the MX host name alone."""
    testing: STSPolicy | None = None
    """MTA-STS testing: check the certificate as ``enforce`` would, report, deliver anyway."""
    relaxed: bool = False
    """A mailed TLS-RPT report (RFC 8460 3): TLS as ``level`` asks when it can be had, else
    unauthenticated TLS, else clear text; never counted (``TLSPolicy.relaxed``)."""


class TLSPolicy:
    def __init__(self, config: Config, resolver: MXResolver,
                 reports: TLSReports | None = None) -> None:
        self.config = config
        self.resolver = resolver
        self.reports = reports
        rc = config.relay
        self.sts = (MTASTS(resolver, local_dir(config) / "mta-sts.json", ca_file=rc.ca_file,
                           port=rc.mta_sts_port,
                           on_error=reports.fetch_error if reports is not None else None)
                    if rc.mta_sts else None)
        self.dane = rc.dane and config.dns.dnssec
        self._verify = verifying_context(rc.ca_file)
        self._plain = unverified_context()
        self.pool_level: dict[str, str] = {}
        for cls in config.classes.values():
            level = cls.tls or rc.tls
            self.pool_level[cls.pool] = stricter(level, self.pool_level.get(cls.pool))

    def base(self, lane: Route) -> str:
        """The class (pool) policy and the destination rule's, whichever is stricter."""
        level = self.pool_level.get(lane.pool, self.config.relay.tls)
        return stricter(level, lane.rule.tls if lane.rule is not None else None)

    async def plan(self, lane: Route, dests: list[Destination], routed: bool,
                   source_ip: str, relaxed: bool = False) -> list[HostPlan]:
        """The addresses to try, in order, each with how to connect (raises NoUsableMX).
        ``relaxed``: for a mailed TLS-RPT report (``relaxed``)."""
        base, domain = self.base(lane), lane.domain
        if base == "disabled" or routed:
            return [HostPlan(domain, d, base, base, None if routed else NO_POLICY)
                    for d in dests]
        if relaxed:
            return await self.relaxed(lane, dests, source_ip)
        tlsa, bases = await self._tlsa(domain, dests, source_ip) if self.dane else ({}, {})
        # DANE applies per host: MTA-STS holds for every host without TLSA records (its
        # lookup not failed), so it is looked up unless DANE covers every host
        sts_hosts = any(not tlsa.get(d.host) and not (d.host in tlsa and tlsa[d.host] is None)
                        for d in dests)
        sts = await self.sts.policy(domain) if self.sts is not None and sts_hosts else None
        plans = []
        for d in dests:
            records = tlsa.get(d.host)
            if records is None and d.host in tlsa:
                continue  # its TLSA lookup failed: unusable (RFC 7672 2.2)
            if records:
                ref = PolicyRef("tlsa", tuple(str(r) for r in records), (d.host,))
                if any(r.usable for r in records):
                    plans.append(HostPlan(domain, d, "dane", "dane", ref, records,
                                          _names(d.host, bases)))
                else:  # only unusable records: TLS still mandatory (RFC 7672 2.2)
                    plans.append(HostPlan(domain, d, stricter(base, "required"), "dane", ref))
            elif sts is not None and sts.mode == "enforce":
                if sts.matches(d.host):
                    plans.append(HostPlan(domain, d, "verified", "mta-sts-enforce", _sts_ref(sts)))
            elif sts is not None:
                policy = "mta-sts-testing" if base == "opportunistic" else base
                plans.append(HostPlan(domain, d, base, policy, _sts_ref(sts), testing=sts))
            else:
                plans.append(HostPlan(domain, d, base, base))
        if not plans:
            if sts is not None:
                why = f"MTA-STS policy of {lane.domain} names none of its MX hosts"
                self._session(lane.domain, _sts_ref(sts), "", source_ip, "",
                              "validation-failure", why)
            else:
                why = f"the TLSA lookups of every MX host of {lane.domain} failed"
            raise NoUsableMX(Reply(451, f"4.7.5 {why}", "4.7.5"))
        return plans

    async def relaxed(self, lane: Route, dests: list[Destination],
                      source_ip: str) -> list[HostPlan]:
        """The plans of a mailed TLS-RPT report (RFC 8460 3: reports are delivered despite any
        TLS failure, and their delivery is not counted): every MX host, in MX order, with
        the TLS it would get when that works - DANE where TLSA records apply, PKIX where
        MTA-STS (any mode) or the class or rule policy (``verified``) asks - and, when it does
        not, unauthenticated TLS, then clear text (``connect``). Evidence: policy ``tlsrpt``
        and the authentication actually had. Routes never get here (``plan``)."""
        base, domain = self.base(lane), lane.domain
        tlsa, bases = await self._tlsa(domain, dests, source_ip, count=False) \
            if self.dane else ({}, {})
        sts_hosts = any(not tlsa.get(d.host) for d in dests)
        sts = await self.sts.policy(domain) if self.sts is not None and sts_hosts else None
        plans = []
        for d in dests:
            records = [r for r in tlsa.get(d.host) or [] if r.usable]
            if records:
                plans.append(HostPlan(domain, d, "dane", "tlsrpt", None, records,
                                      _names(d.host, bases), relaxed=True))
                continue
            level = "verified" if sts is not None or base == "verified" else "opportunistic"
            plans.append(HostPlan(domain, d, level, "tlsrpt", None, relaxed=True))
        return plans

    async def _tlsa(self, domain: str, dests: list[Destination], source_ip: str,
                    count: bool = True
                    ) -> tuple[dict[str, list[dane.TLSA] | None], dict[str, str]]:
        """(host -> its authenticated TLSA records ([]: none), or None when the lookup
        failed; host -> the name they were found at when not the host's own); hosts whose
        MX or address answers were not authenticated are not looked up. The hosts are asked
        together: one after the other, a domain whose TLSA lookups go unanswered held the
        delivery slot for ``dns.timeout`` per MX host at every attempt."""
        hosts: dict[str, Destination] = {}
        for d in dests:
            if d.secure:
                hosts.setdefault(d.host, d)
        names = list(hosts)
        answers = await asyncio.gather(*(self._host_tlsa(hosts[h]) for h in names),
                                       return_exceptions=True)
        out: dict[str, list[dane.TLSA] | None] = {}
        bases: dict[str, str] = {}
        for host, answer in zip(names, answers, strict=True):
            if isinstance(answer, DNSTempError):
                log.warning("TLSA lookup failed: %s", answer, extra={"host": host})
                out[host] = None
                if count:
                    self._session(domain, PolicyRef("tlsa", (), (host,)), host, source_ip, "",
                                  "dnssec-invalid", str(answer)[:200])
            elif isinstance(answer, BaseException):
                raise answer
            else:
                out[host], base = answer
                if base != host:
                    bases[host] = base
        return out, bases

    async def _host_tlsa(self, d: Destination) -> tuple[list[dane.TLSA], str]:
        """(the authenticated TLSA records of one host, the name they are at). A host reached
        through an authenticated CNAME chain (``Destination.expanded``) has them looked up at
        the chain's target first, then, when there are none there (or none authenticated),
        at its own name (RFC 7672 2.2.3); a failed lookup at the target is not passed over
        (DNSTempError): an attacker who blocks it must not choose the records that apply."""
        for name in (d.expanded, d.host) if d.expanded else (d.host,):
            records, secure = await self.resolver.raw_records(dane.tlsa_name(name, d.port),
                                                              "TLSA")
            if records and secure:
                return dane.parse(records), name
        return [], d.host

    async def connect(self, plan: HostPlan, slot: Source,
                      timeouts: Timeouts) -> SMTPConnection:
        """Open the connection ``plan`` asks for; a TLS failure the policy does not allow
        raises SMTPError with a 451 4.7.x reply saying why (a deferral, never clear text)."""
        if plan.relaxed:
            return await self._connect_relaxed(plan, slot, timeouts)
        d = plan.dest
        verify = plan.level == "verified" or plan.testing is not None
        tls = plan.level if plan.level in ("disabled", "opportunistic") and not verify \
            else "required"
        try:
            conn = await self._open(plan, slot, timeouts, verify, tls)
        except SMTPError as exc:
            if not exc.tls_failure:
                raise
            self._count(plan, slot, exc.tls_failure, exc.message)
            if plan.testing is None:
                if not _plain_allowed(plan, exc):
                    raise _refusal(plan, exc) from None
                return _evidence(await self._open(plan, slot, timeouts, False, "disabled"),
                                 plan, "")
            try:  # MTA-STS testing: reported; deliver as the class policy alone would
                conn = await self._open(plan, slot, timeouts, False, plan.level)
            except SMTPError as again:
                if not (again.tls_failure and _plain_allowed(plan, again)):
                    raise _refusal(plan, again) from None
                conn = await self._open(plan, slot, timeouts, False, "disabled")
            return _evidence(conn, plan, "none" if conn.tls_version else "")
        auth = "pkix" if verify else "none" if conn.tls_version else ""
        if plan.level == "dane":
            auth = dane.match(plan.tlsa, conn.peer_chain(), plan.names or (d.host,)) or ""
            if not auth:
                conn.close()
                why = f"the certificate of {d.host} matches none of its TLSA records"
                self._count(plan, slot, "tlsa-invalid", why)
                raise _refusal(plan, SMTPError("starttls", why, tls_failure="tlsa-invalid"))
        failure, why = "", ""
        if plan.testing is not None and not plan.testing.matches(d.host):
            failure, why = "validation-failure", f"{d.host} is not an MX of the MTA-STS policy"
        elif not conn.tls_version:
            failure, why = "starttls-not-supported", f"{d.host} did not offer STARTTLS"
        self._count(plan, slot, failure, why)
        return _evidence(conn, plan, auth)

    async def _connect_relaxed(self, plan: HostPlan, slot: Source,
                               timeouts: Timeouts) -> SMTPConnection:
        """A report's connection (``relaxed``): STARTTLS when offered, checked as the plan's
        level asks; a certificate that fails the check is taken unchecked on a new connection,
        a failed handshake is followed by clear text on a new connection (as the opportunistic
        policy does). Nothing is counted for TLS-RPT."""
        verify = plan.level == "verified"
        conn: SMTPConnection | None = None
        try:
            conn = await self._open(plan, slot, timeouts, verify, "opportunistic")
        except SMTPError as exc:
            if not _handshake_failed(exc):
                raise
            log.info("TLS report to %s: %s; without authentication", plan.dest.host,
                     exc.message)
        if conn is None and verify:
            verify = False
            try:
                conn = await self._open(plan, slot, timeouts, False, "opportunistic")
            except SMTPError as exc:
                if not _handshake_failed(exc):
                    raise
        if conn is None:
            conn = await self._open(plan, slot, timeouts, False, "disabled")
            return _evidence(conn, plan, "")
        auth = ""
        if conn.tls_version:
            auth = "pkix" if verify else "none"
            if plan.level == "dane":
                auth = dane.match(plan.tlsa, conn.peer_chain(),
                                  plan.names or (plan.dest.host,)) or "none"
        return _evidence(conn, plan, auth)

    async def _open(self, plan: HostPlan, slot: Source, timeouts: Timeouts, verify: bool,
                    tls: str) -> SMTPConnection:
        d = plan.dest
        # DANE: SNI names the TLSA records' base domain (RFC 7672 8.1), a CNAME's target when
        # they were found there, so a server choosing its certificate by SNI shows that one
        sni = plan.names[0] if plan.level == "dane" and plan.names else None
        return await SMTPConnection.open(
            d.ip, d.port, server_name=d.host, source_ip=slot.address, ehlo_name=slot.ehlo,
            tls=tls, timeouts=timeouts, ssl_context=self._verify if verify else self._plain,
            sni=sni)

    def _count(self, plan: HostPlan, slot: Source, failure: str, why: str) -> None:
        if plan.report is not None:
            self._session(plan.domain, plan.report, plan.dest.host, slot.address,
                          plan.dest.ip, failure, why)

    def _session(self, domain: str, ref: PolicyRef, mx: str, source_ip: str, dest_ip: str,
                 failure: str, why: str) -> None:
        if self.reports is not None:
            self.reports.session(domain, ref, mx, source_ip, dest_ip, failure, why)


def _evidence(conn: SMTPConnection, plan: HostPlan, auth: str) -> SMTPConnection:
    conn.tls_auth, conn.tls_policy = auth, plan.policy
    return conn


def _plain_allowed(plan: HostPlan, exc: SMTPError) -> bool:
    """Whether a failed STARTTLS handshake may be retried in clear text on a new connection:
    only under the opportunistic policy (RFC 7435 3: an attacker could strip the STARTTLS
    anyway; Postfix's "may" does the same), never after a 421 (the server is closing)."""
    return plan.level == "opportunistic" and exc.stage == "starttls" and exc.reply is None


def _handshake_failed(exc: SMTPError) -> bool:
    """STARTTLS was offered and its handshake (or the certificate's check) failed; not a 421."""
    return bool(exc.tls_failure) and exc.stage == "starttls" and exc.reply is None


def _refusal(plan: HostPlan, exc: SMTPError) -> SMTPError:
    """The deferral of a connection the policy does not allow: 4.7.10 (encryption needed)
    without STARTTLS, 4.7.5 (cryptographic failure) for a certificate."""
    if plan.level == "opportunistic" and plan.testing is None:
        return exc
    status = "4.7.10" if exc.tls_failure == "starttls-not-supported" else "4.7.5"
    exc.reply = Reply(451, f"{status} TLS policy {plan.policy}: {exc.message}", status)
    return exc


def _names(host: str, bases: dict[str, str]) -> tuple[str, ...]:
    """The DANE reference identifiers of ``host`` (``HostPlan.names``)."""
    return (bases[host], host) if host in bases else (host,)


def _sts_ref(policy: STSPolicy) -> PolicyRef:
    return PolicyRef("sts", tuple(policy.lines), tuple(policy.mx))
