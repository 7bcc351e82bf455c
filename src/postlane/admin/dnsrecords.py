"""The DNS records a node needs, derived from its config, and a check of what is published.

Mailbox providers judge a sender first by DNS: forward and reverse names of every source IP
that agree with its EHLO name, SPF that permits every pool IP for the envelope domains, DKIM
keys, a DMARC policy whose reports come back to us, and MX (with MTA-STS and TLS-RPT) for the
domains this node receives bounces, reports and complaints for. ``expected`` lists them;
``checklist`` prints them as zone-file lines; ``check`` asks a resolver and says, per record,
what is missing or wrong. SPF is evaluated with pyspf (the reference implementation), so a
record that permits an IP through ``include:``, ``a`` or ``mx`` counts as it would at Gmail.
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field

import dns.exception
import dns.resolver
import dns.reversename

from ..config import Config
from ..policy.dkim import dns_record, read_key, record_name
from ..relay.mtasts import record_id

__all__ = ["Expected", "Result", "check", "checklist", "expected", "make_resolver",
           "mta_sts_policy"]


@dataclass(frozen=True)
class Expected:
    name: str
    rtype: str
    value: str
    """What to publish (zone-file form)."""
    kind: str
    """How it is checked: a, ptr, spf, dkim, dmarc, mx, mta-sts, tlsrpt."""
    note: str = ""
    ips: tuple[tuple[str, str], ...] = ()
    """For SPF: the (IP, EHLO name) pairs it must permit."""
    want: tuple[str, ...] = ()
    """What the answer must contain (addresses, names, rua addresses, a DKIM public key)."""


@dataclass
class Result:
    record: Expected
    status: str
    """ok, MISSING, WRONG or ERROR (the resolver failed: try again)."""
    detail: str = ""


@dataclass
class _Plan:
    cfg: Config
    out: list[Expected] = field(default_factory=list)

    def add(self, *args: object, **kwargs: object) -> None:
        self.out.append(Expected(*args, **kwargs))  # type: ignore[arg-type]


def _rtype(address: str) -> str:
    return "AAAA" if ipaddress.ip_address(address).version == 6 else "A"


def _spf_value(ips: list[str]) -> str:
    mechs = [f"ip{ipaddress.ip_address(ip).version}:{ip}" for ip in ips]
    return "v=spf1 " + " ".join(mechs) + " -all"


def _mx_address(cfg: Config, ips: list[tuple[str, str, str]]) -> str:
    """Where the MX host name should point: a listener on port 25 bound to one address, else
    the first pool IP."""
    for lc in cfg.listeners.values():
        if lc.port == 25 and not ipaddress.ip_address(lc.address).is_unspecified:
            return lc.address
    return ips[0][1]


def mta_sts_policy(cfg: Config) -> str:
    """The policy file for https://mta-sts.DOMAIN/.well-known/mta-sts.txt (RFC 8461); ``testing``
    until the TLS reports show every sender reaches the node over TLS."""
    return (f"version: STSv1\nmode: testing\nmx: {cfg.node.hostname}\nmax_age: 604800\n")


def expected(cfg: Config, now: float | None = None) -> list[Expected]:
    """Every record the node's config implies, in the order an operator publishes them."""
    now = time.time() if now is None else now
    plan = _Plan(cfg)
    host = cfg.node.hostname
    ips = [(pool, ip.address, ip.ehlo) for pool, pc in cfg.pools.items() for ip in pc.ips]
    if host not in {e for _, _, e in ips}:
        address = _mx_address(cfg, ips)
        plan.add(host, _rtype(address), address, "a", "the node's name (MX target)",
                 want=(address,))
    for pool, address, ehlo in ips:
        plan.add(ehlo, _rtype(address), address, "a", f"EHLO name of {address} ({pool})",
                 want=(address,))
        plan.add(dns.reversename.from_address(address).to_text(omit_final_dot=True), "PTR",
                 f"{ehlo}.", "ptr", "set where the IP is delegated (your provider)",
                 want=(ehlo,))
        plan.add(ehlo, "TXT", '"v=spf1 a -all"', "spf", "SPF of the HELO name",
                 ips=((address, ehlo),))
    envelope: dict[str, list[tuple[str, str]]] = {}
    for pc in cfg.pools.values():
        domain = pc.bounce_domain or pc.return_path_domain
        if domain:
            envelope.setdefault(domain.lower(), []).extend((ip.address, ip.ehlo) for ip in pc.ips)
    for domain, pairs in envelope.items():
        plan.add(domain, "TXT", f'"{_spf_value([a for a, _ in pairs])}"', "spf",
                 "SPF of the envelope sender (Return-Path) domain", ips=tuple(pairs))
    rua = tuple(a.lower() for a in cfg.reputation.dmarc.addresses)
    signing = []
    for key in cfg.dkim.keys:
        if key.retire_after is not None and key.retire_after <= now:
            continue
        if key.domain not in signing:
            signing.append(key.domain)
        text = dns_record(read_key(key.key_file, key.algorithm))
        chunks = " ".join(f'"{text[i:i + 250]}"' for i in range(0, len(text), 250))
        plan.add(record_name(key.selector, key.domain), "TXT", chunks, "dkim",
                 f"DKIM key {key.selector} ({key.algorithm})", want=(text,))
    for domain in signing:
        mailto = ",".join(f"mailto:{a}" for a in rua)
        # adkim as d= is chosen: relaxed alignment signs a subdomain's mail as its parent
        adkim = "s" if cfg.dkim.alignment == "strict" else "r"
        value = ("v=DMARC1; p=none" + (f"; rua={mailto}" if rua else "")
                 + f"; adkim={adkim}; aspf=r")
        plan.add(f"_dmarc.{domain}", "TXT", f'"{value}"', "dmarc",
                 "p=none while the reports are read; then quarantine, then reject"
                 if rua else "no reputation.dmarc.addresses: nobody reads the reports",
                 want=rua)
    receiving = list(dict.fromkeys(
        [d for d in (pc.bounce_domain for pc in cfg.pools.values()) if d]
        + [a.rpartition("@")[2] for a in (*cfg.feedback.fbl_addresses, *rua)]))
    policy_id = hashlib.sha256(mta_sts_policy(cfg).encode()).hexdigest()[:16]
    report_to = f"tls-reports@{signing[0] if signing else host}"
    for domain in receiving:
        plan.add(domain, "MX", f"10 {host}.", "mx", "bounces, reports and complaints come here",
                 want=(host,))
        plan.add(f"_mta-sts.{domain}", "TXT", f'"v=STSv1; id={policy_id}"', "mta-sts",
                 f"and serve the policy at https://mta-sts.{domain}/.well-known/mta-sts.txt")
        plan.add(f"_smtp._tls.{domain}", "TXT", f'"v=TLSRPTv1; rua=mailto:{report_to}"',
                 "tlsrpt", "TLS reports to a mailbox your mail team reads")
    return plan.out


def checklist(cfg: Config, now: float | None = None) -> str:
    """The records as zone-file lines with a comment each, and the MTA-STS policy file."""
    records = expected(cfg, now)
    width = max(len(r.name) for r in records) + 1
    lines = [f"; DNS records for the Postlane node {cfg.node.hostname}"]
    if any(ipaddress.ip_address(a).is_loopback for _, pc in cfg.pools.items()
           for a in (ip.address for ip in pc.ips)):
        lines.append("; WARNING: the pools use loopback addresses (placeholders): put the"
                     " machine's public IPs in the config first")
    for rec in records:
        line = f"{rec.name + '.':<{width}} IN {rec.rtype:<4} {rec.value}"
        lines.append(line + (f"   ; {rec.note}" if rec.note else ""))
    if any(r.kind == "mta-sts" for r in records):
        lines.append("; MTA-STS policy file (https://mta-sts.DOMAIN/.well-known/mta-sts.txt):")
        lines += [f";   {line}" for line in mta_sts_policy(cfg).splitlines()]
    return "\n".join(lines)


def _address(text: str, port: int) -> tuple[str, int]:
    """``IP``, ``IPv4:PORT`` or ``[IPv6]:PORT``; ValueError for anything else."""
    host, port_text = text, ""
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else rest
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    try:
        ipaddress.ip_address(host)
        port = int(port_text) if port_text else port
    except ValueError:
        raise ValueError(f"{text!r} is not IP or IP:PORT") from None
    if not 0 < port < 65536:
        raise ValueError(f"{text!r}: the port must be 1 to 65535")
    return host, port


def make_resolver(cfg: Config, nameserver: str | None = None) -> dns.resolver.Resolver:
    """A resolver for ``nameserver`` (``IP`` or ``IP:PORT``; ValueError if it is neither),
    else the config's ``[dns]``, else the system's."""
    port = cfg.dns.port
    if nameserver:
        nameserver, port = _address(nameserver, port)
    else:
        nameserver = cfg.dns.nameserver
    resolver = dns.resolver.Resolver(configure=nameserver is None)
    if nameserver is not None:
        resolver.nameservers = [nameserver]
        resolver.port = port
    resolver.lifetime = cfg.dns.timeout
    return resolver


def tags(text: str) -> dict[str, str]:
    """``k=v; k=v`` records (DKIM, DMARC, MTA-STS, TLS-RPT) as a dict, values unspaced."""
    out = {}
    for part in text.split(";"):
        name, sep, value = part.partition("=")
        if sep:
            out[name.strip().lower()] = "".join(value.split())
    return out


def _answers(resolver: dns.resolver.Resolver, name: str, rtype: str) -> list[str]:
    try:
        answer = resolver.resolve(name, rtype, search=False)
    except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
        return []
    if rtype == "TXT":
        return [b"".join(r.strings).decode("utf-8", "replace") for r in answer]
    if rtype == "MX":
        return [r.exchange.to_text(omit_final_dot=True).lower() for r in answer]
    if rtype == "PTR":
        return [r.target.to_text(omit_final_dot=True).lower() for r in answer]
    return [r.to_text() for r in answer]


@contextlib.contextmanager
def _default_resolver(resolver: dns.resolver.Resolver) -> Iterator[None]:
    """pyspf resolves through dnspython's default resolver: lend it ours for the check."""
    saved = dns.resolver.default_resolver
    dns.resolver.default_resolver = resolver
    try:
        yield
    finally:
        dns.resolver.default_resolver = saved


def _spf(rec: Expected, lifetime: float) -> tuple[str, str]:
    import spf

    failed = []
    for address, ehlo in rec.ips:
        with warnings.catch_warnings():  # pyspf calls dnspython's deprecated query()
            warnings.simplefilter("ignore", DeprecationWarning)
            result, text = spf.check2(i=address, s=f"postmaster@{rec.name}", h=ehlo,
                                      querytime=lifetime)  # per query, as [dns] timeout
        if result == "temperror":
            if "lifetime expired" in text or "timed out" in text:
                raise dns.exception.Timeout(text)  # the resolver is silent, not the zone wrong
            return "ERROR", text
        if result == "none":
            return "MISSING", "no SPF record"
        if result != "pass":
            failed.append(f"{address}: {result} ({text})")
    return ("WRONG", "; ".join(failed)) if failed else ("ok", f"permits {len(rec.ips)} IP(s)")


def _one(resolver: dns.resolver.Resolver, rec: Expected) -> tuple[str, str]:
    if rec.kind == "spf":
        return _spf(rec, resolver.lifetime)
    found = _answers(resolver, rec.name, rec.rtype)
    if not found:
        return "MISSING", f"no {rec.rtype} record"
    if rec.kind in ("a", "ptr", "mx"):
        missing = [w for w in rec.want if w.lower() not in found]
        return ("WRONG", f"found {', '.join(found)}") if missing else ("ok", ", ".join(found))
    if rec.kind == "mta-sts":  # held to what senders read (RFC 8461 3.1), not ``tags``
        policy_id = record_id(found)
        if policy_id is not None:
            return "ok", f"id={policy_id}"
        if not any(t.lower().startswith("v=stsv1") for t in found):
            return "MISSING", "0 v=STSv1 records"
        return "WRONG", ("senders ignore it: one record, v=STSv1; then id= 1 to 32 letters "
                         "and digits")
    records = [tags(t) for t in found]
    if rec.kind == "dkim":
        want = tags(rec.want[0])
        if any(r.get("p") == want["p"] and r.get("k", "rsa") == want.get("k", "rsa")
               for r in records):
            return "ok", "matches the key file"
        return "WRONG", "published key differs from the key file"
    version = {"dmarc": "DMARC1", "mta-sts": "STSv1", "tlsrpt": "TLSRPTv1"}[rec.kind]
    mine = [r for r in records if r.get("v", "").lower() == version.lower()]
    if len(mine) != 1:
        return ("MISSING" if not mine else "WRONG"), f"{len(mine)} v={version} records"
    record = mine[0]
    if rec.kind == "dmarc":
        if "p" not in record:
            return "WRONG", "no p= tag"
        rua = {u.removeprefix("mailto:").split("!")[0].lower()
               for u in record.get("rua", "").split(",") if u}
        lost = [a for a in rec.want if a not in rua]
        if lost:
            return "WRONG", f"rua does not name {', '.join(lost)}"
        return "ok", f"p={record['p']}"
    need = "rua"  # (tlsrpt: mta-sts returned above)
    return ("ok", f"{need}={record[need]}") if record.get(need) else ("WRONG", f"no {need}=")


def check(cfg: Config, resolver: dns.resolver.Resolver,
          now: float | None = None) -> list[Result]:
    """Look each expected record up; a resolver failure is an ERROR, not a verdict. After
    ``SILENT_LIMIT`` queries in a row the resolver left unanswered (a wrong ``--nameserver``),
    the other records are ERROR without asking: 40 records at ``dns.timeout`` each kept the
    operator waiting minutes for a verdict the first two gave."""
    results = []
    silent = 0
    with _default_resolver(resolver):
        for rec in expected(cfg, now):
            if silent >= SILENT_LIMIT:
                results.append(Result(rec, "ERROR", f"not looked up: the resolver did not answer"
                                      f" the last {SILENT_LIMIT} queries"))
                continue
            try:
                status, detail = _one(resolver, rec)
                silent = 0
            except (dns.exception.DNSException, OSError) as exc:
                status, detail = "ERROR", f"{exc.__class__.__name__}: {exc}"
                silent = silent + 1 if isinstance(exc, dns.exception.Timeout) else 0
            results.append(Result(rec, status, detail))
    return results


SILENT_LIMIT = 2
"""Unanswered queries in a row after which ``check`` stops asking the resolver."""
