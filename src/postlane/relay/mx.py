"""MX resolution for outbound delivery (RFC 5321 5.1), on dnspython's asyncio resolver.

Errors are split into DNSTempError (retry later) and DNSPermError (bounce) because that is the
only distinction the scheduler acts on. Answers are cached per domain for their TTL and
concurrent lookups of one domain share a single query, since a burst to one domain at
~1,000 messages/s must not become a burst of identical DNS queries.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import random
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any

import dns.asyncresolver
import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.nameserver
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rdtypes.ANY.TXT
import dns.resolver
import dns.wire

log = logging.getLogger("postlane.relay")

__all__ = ["DNSNullMX", "DNSPermError", "DNSTempError", "Destination", "MXResolver", "txt_strings"]

NEGATIVE_TTL = 300.0
"""How long ``records`` remembers that a name has no records of a type (RFC 2308's usual SOA
minimum)."""


class DNSTempError(Exception):
    """SERVFAIL, timeout, no answer from any nameserver: retry later."""


class DNSPermError(Exception):
    """NXDOMAIN, null MX (RFC 7505 "0 ."), or no A/AAAA for any MX: bounce."""


class DNSNullMX(DNSPermError):
    """The domain publishes a null MX (RFC 7505 "0 ."): it accepts no mail; bounced with
    556 5.1.10 without connecting anywhere."""


@dataclass(frozen=True, slots=True)
class Destination:
    """One address to try, in order, for a domain."""

    host: str
    ip: str
    port: int
    preference: int
    secure: bool = False
    """The MX answer and the host's addresses came with the AD bit (``dns.dnssec``), or the
    host is an authenticated CNAME into an unsigned zone: DANE applies to this host (RFC
    7672 2.2)."""
    expanded: str = ""
    """The name at the end of the CNAME chain ``host``'s addresses were reached through,
    when that chain was authenticated (``secure``); "" without one. Its TLSA records are
    asked for before the host's own (RFC 7672 2.2.3)."""


# A cached answer: (preference, host, addresses, secure, expanded) per MX host, sorted by
# preference (``Destination``).
_Hosts = list[tuple[int, str, list[str], bool, str]]


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _key(name: str) -> str:
    return name.strip().rstrip(".").lower()


class MXResolver:
    """Resolves a domain to the ordered addresses to deliver to."""

    def __init__(
        self,
        nameserver: str | None = None,
        port: int = 53,
        timeout: float = 5.0,
        min_ttl: float = 5.0,
        max_ttl: float = 3600.0,
        dnssec: bool = False,
        cache_sweep: int = 4096,
    ) -> None:
        """``cache_sweep``: answers cached before the expired ones are dropped (then twice as
        many as were kept)."""
        if nameserver is None:
            resolver = dns.asyncresolver.Resolver()
        else:
            resolver = dns.asyncresolver.Resolver(configure=False)
            resolver.nameservers = [nameserver]
            resolver.port = port
        self.dnssec = dnssec
        if dnssec:  # ask the validating resolver to say which answers it authenticated
            resolver.flags = dns.flags.RD | dns.flags.AD  # RFC 6840 5.7
            resolver.use_edns(0, 0, 1232)
        # timeout bounds a whole lookup; each try gets at most that too.
        resolver.lifetime = timeout
        resolver.timeout = min(resolver.timeout, timeout)
        self._resolver = resolver
        self._min_ttl = min_ttl
        self._max_ttl = max_ttl
        # key -> (expiry on the monotonic clock, the answer or the permanent error to re-raise)
        self._cache: dict[str, tuple[float, Any]] = {}
        self._cache_sweep = self._sweep_at = cache_sweep
        self._inflight: dict[str, asyncio.Future[tuple[Any, float]]] = {}

    async def destinations(self, domain: str, port: int = 25) -> list[Destination]:
        """Addresses for ``domain`` in delivery order; equal preferences, and each host's
        addresses, are shuffled per call so load spreads across them for the whole cache
        lifetime."""
        hosts = await self._cached("mx:" + _key(domain), lambda: self._lookup_mx(domain))
        return _flatten(hosts, port)

    async def resolve_host(self, host: str, port: int = 25) -> list[Destination]:
        """Addresses of a route given as a host name; an IP literal is returned as is."""
        host = host.strip()
        if _is_ip(host.strip("[]")):
            ip = host.strip("[]")
            return [Destination(ip, ip, port, 0)]
        hosts = await self._cached("host:" + _key(host), lambda: self._lookup_host(host))
        return _flatten(hosts, port)

    async def records(self, name: str, rdtype: str) -> tuple[list[dns.rdata.Rdata], bool]:
        """(records, authenticated) of one name and type, cached for their TTL; ([], False)
        when there are none. ``authenticated``: the AD bit, trusted only with ``dns.dnssec``.
        Raises DNSTempError (SERVFAIL, which a validating resolver also gives for bogus
        data, or a timeout)."""
        return await self._cached(f"rr:{rdtype}:{_key(name)}",
                                  lambda: self._lookup_records(name, rdtype))

    async def _lookup_records(self, name: str, rdtype: str
                              ) -> tuple[tuple[list[dns.rdata.Rdata], bool], float]:
        try:
            answer = await self._query(_absolute(name), rdtype)
        except DNSPermError:  # NXDOMAIN
            answer = None
        if answer is None:  # most domains publish no MTA-STS, TLSA or TLS-RPT record: ask
            return ([], False), NEGATIVE_TTL  # again in 5 minutes, not at every connection
        ttl = float(answer.rrset.ttl) if answer.rrset is not None else self._min_ttl
        return (list(answer), self._secure(answer)), ttl

    async def raw_records(self, name: str, rdtype: str) -> tuple[list[bytes], bool]:
        """(the rdata of each record, unparsed; authenticated) of one name and type, cached
        for their TTL, as ``records``. For TLSA: dnspython refuses a whole answer in which
        one record is malformed (a SHA-256 digest of 20 bytes), and its resolver, waiting
        for a reply it can parse, timed out, so one bad record of a DANE host's RRset made
        the host unusable; RFC 7672 2.2 wants that record ignored as unusable and the others
        used. Asked over TCP (no truncation to handle) and read leniently."""
        return await self._cached(f"raw:{rdtype}:{_key(name)}",
                                  lambda: self._lookup_raw(name, rdtype))

    async def _lookup_raw(self, name: str, rdtype: str
                          ) -> tuple[tuple[list[bytes], bool], float]:
        qname = _absolute(name)
        query = dns.message.make_query(qname, rdtype, use_edns=0, payload=1232,
                                       flags=self._resolver.flags or dns.flags.RD)
        try:
            async with asyncio.timeout(self._resolver.lifetime):
                response = await self._exchange_tcp(query, rdtype, qname)
        except TimeoutError:
            raise DNSTempError(f"{rdtype} {qname}: timed out") from None
        rcode = response.rcode()
        if rcode not in (dns.rcode.NOERROR, dns.rcode.NXDOMAIN) or \
                not isinstance(response, dns.message.QueryMessage):
            raise DNSTempError(f"{rdtype} {qname}: {dns.rcode.to_text(rcode)}")
        try:
            chain = response.resolve_chaining()
        except dns.exception.DNSException as e:
            raise DNSTempError(f"{rdtype} {qname}: {e}") from e
        rdatas = _raw_answers(response.wire or b"", chain.canonical_name,
                              dns.rdatatype.from_text(rdtype))
        if not rdatas:
            return ([], False), NEGATIVE_TTL
        secure = self.dnssec and bool(response.flags & dns.flags.AD)
        return (rdatas, secure), float(chain.minimum_ttl)

    async def _exchange_tcp(self, query: dns.message.Message, rdtype: str,
                            qname: dns.name.Name) -> dns.message.Message:
        """The response to ``query`` from the first nameserver that gives one (its records
        parsed leniently: a malformed one is left out, the raw answer is in ``.wire``). By
        hand because ``dns.asyncquery.tcp`` and ``receive_tcp`` (dnspython 2.x) take no
        ``continue_on_error``: they raise on the very answer this lookup is for."""
        wire = query.to_wire()
        errors: list[str] = []
        nameservers = list(self._resolver.nameservers)
        for i, ns in enumerate(nameservers):
            if isinstance(ns, str):
                host, port = ns, self._resolver.nameserver_ports.get(ns, self._resolver.port)
            elif isinstance(ns, dns.nameserver.Do53Nameserver):
                host, port = ns.address, ns.port
            else:  # DNS over HTTPS, TLS, QUIC: not for this lookup
                continue
            try:
                reader, writer = await asyncio.open_connection(host, port)
                try:
                    writer.write(len(wire).to_bytes(2, "big") + wire)
                    size = int.from_bytes(await reader.readexactly(2), "big")
                    response = dns.message.from_wire(await reader.readexactly(size),
                                                     continue_on_error=True)
                finally:
                    writer.close()
            except (OSError, asyncio.IncompleteReadError, dns.exception.DNSException) as e:
                errors.append(f"{host}: {e or type(e).__name__}")
                continue
            if not query.is_response(response):
                errors.append(f"{host}: not a response to the query")
                continue
            if response.rcode() in (dns.rcode.NOERROR, dns.rcode.NXDOMAIN) or \
                    i == len(nameservers) - 1:
                return response  # (a SERVFAIL: the next nameserver is asked, as dnspython does)
            errors.append(f"{host}: {dns.rcode.to_text(response.rcode())}")
        raise DNSTempError(f"{rdtype} {qname}: {'; '.join(errors) or 'no nameserver'}")

    def _secure(self, answer: dns.resolver.Answer) -> bool:
        return self.dnssec and bool(answer.response.flags & dns.flags.AD)

    async def txt(self, name: str) -> list[str]:
        """TXT strings joined per record; [] when the name or its TXT records do not exist,
        which is what a DKIM key check wants to know."""
        try:
            answer = await self._resolver.resolve(_absolute(name), "TXT", search=False)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return []
        except dns.exception.DNSException as e:
            raise DNSTempError(f"TXT {name}: {e}") from e
        return [text.decode("utf-8", "replace") for text in txt_strings(answer)]

    async def _cached(self, key: str, lookup: Callable[[], Awaitable[tuple[Any, float]]]) -> Any:
        entry = self._cache.get(key)
        if entry is not None:
            expiry, value = entry
            if expiry > time.monotonic():
                if isinstance(value, DNSPermError):
                    raise value
                return value
            del self._cache[key]
        future = self._inflight.get(key)
        if future is None:
            future = asyncio.ensure_future(lookup())
            self._inflight[key] = future
            future.add_done_callback(lambda f: self._store(key, f))
        # shield: one caller being cancelled must not cancel the others' shared lookup.
        hosts, _ttl = await asyncio.shield(future)
        return hosts

    def _store(self, key: str, future: asyncio.Future[tuple[Any, float]]) -> None:
        self._inflight.pop(key, None)
        if future.cancelled():
            return
        if len(self._cache) >= self._sweep_at:
            self._sweep()
        error = future.exception()
        if isinstance(error, DNSPermError):
            # Negative answers are cached briefly so a bad domain is not re-queried per message.
            self._cache[key] = (time.monotonic() + self._min_ttl, error)
        elif error is None:
            hosts, ttl = future.result()
            ttl = min(max(ttl, self._min_ttl), self._max_ttl)
            self._cache[key] = (time.monotonic() + ttl, hosts)

    def _sweep(self) -> None:
        """Drop the expired answers. An entry went only when its name was asked again, so the
        cache held an answer (MX, addresses, TLSA, MTA-STS and TLS-RPT records) for every
        domain a node had ever sent to. Amortised O(1) per answer stored."""
        now = time.monotonic()
        self._cache = {k: v for k, v in self._cache.items() if v[0] > now}
        self._sweep_at = max(self._cache_sweep, 2 * len(self._cache))

    async def _query(self, name: dns.name.Name, rdtype: str) -> dns.resolver.Answer | None:
        """One query; None for NoAnswer, DNSPermError for NXDOMAIN, DNSTempError otherwise."""
        try:
            return await self._resolver.resolve(name, rdtype, search=False)
        except dns.resolver.NoAnswer:
            return None
        except dns.resolver.NXDOMAIN as e:
            raise DNSPermError(f"{name.to_text(omit_final_dot=True)}: no such domain") from e
        except dns.exception.Timeout as e:
            raise DNSTempError(f"{rdtype} {name}: timed out") from e
        except dns.resolver.NoNameservers as e:
            raise DNSTempError(f"{rdtype} {name}: no nameserver answered") from e
        except dns.exception.DNSException as e:
            raise DNSTempError(f"{rdtype} {name}: {e}") from e

    async def _addresses(self, name: dns.name.Name, signed_mx: bool = True
                         ) -> tuple[list[str], float, bool, str]:
        """A then AAAA addresses of ``name``, their smallest TTL, whether DANE applies to it
        (every answer authenticated, or ``name`` an authenticated CNAME into an unsigned zone:
        ``_secure_alias``), and the name a CNAME chain led to when the whole chain was
        authenticated ("": none, or not: RFC 7672 2.2.2 has an unauthenticated target's TLSA
        records ignored); a failure of one family is tolerated when the other answers.
        ``signed_mx``: the MX answer naming it was authenticated (else DANE cannot apply and
        the alias is not asked about)."""
        results = await asyncio.gather(
            self._query(name, "A"), self._query(name, "AAAA"), return_exceptions=True
        )
        ips: list[str] = []
        ttl = self._max_ttl
        secure = True
        canonical: dns.name.Name | None = None
        errors: list[BaseException] = []
        for result in results:
            if isinstance(result, BaseException):
                if not isinstance(result, DNSTempError | DNSPermError):
                    raise result
                errors.append(result)
            elif result is not None:
                ips.extend(rdata.to_text() for rdata in result)
                ttl = min(ttl, result.rrset.ttl if result.rrset is not None else ttl)
                secure = secure and self._secure(result)
                canonical = canonical or result.canonical_name
        if ips:
            expanded = ""
            if canonical is not None and canonical != name:
                if secure:
                    expanded = canonical.to_text(omit_final_dot=True).lower()
                elif self.dnssec and signed_mx:
                    secure = await self._secure_alias(name)
            return ips, ttl, secure, expanded
        for error in errors:
            if isinstance(error, DNSTempError):
                raise error
        if errors:
            raise errors[0]
        raise DNSPermError(f"{name.to_text(omit_final_dot=True)}: no A/AAAA record")

    async def _secure_alias(self, name: dns.name.Name) -> bool:
        """Whether ``name``'s own CNAME record is authenticated, when the chain it starts
        ends in an unsigned zone (its address answer without AD). Then the host is in a
        signed zone and DANE applies at its own name, not at the chain's target (RFC 7672
        2.2.2; as its author puts it, a host is in a signed zone when its addresses "result
        from a CNAME chain whose first link is DNSSEC signed"). Asked
        as a query for the CNAME type, which the resolver answers from the alias's zone
        alone. A failed lookup raises DNSTempError: an attacker who blocks it must not turn
        DANE off for the host."""
        try:
            answer = await self._query(name, "CNAME")
        except DNSPermError:
            return False
        return answer is not None and self._secure(answer)

    async def _exchange(self, exchange: dns.name.Name, signed_mx: bool = True
                        ) -> tuple[list[str], float, bool, str]:
        """The addresses of one MX host. An exchange written as an IP address ("10 192.0.2.1.")
        breaks RFC 5321 5.1 but is seen in the wild: as Postfix does, the address is used (no
        A query for a name that has none; not DANE-secure, there is no TLSA name for it)."""
        text = exchange.to_text(omit_final_dot=True).strip("[]")
        if _is_ip(text):
            log.warning("MX record names an IP address, not a host: %s", text)
            return [text], self._max_ttl, False, ""
        return await self._addresses(exchange, signed_mx)

    async def _lookup_host(self, host: str) -> tuple[_Hosts, float]:
        name = _absolute(host)
        ips, ttl, secure, expanded = await self._addresses(name)
        return [(0, name.to_text(omit_final_dot=True).lower(), ips, secure, expanded)], ttl

    async def _lookup_mx(self, domain: str) -> tuple[_Hosts, float]:
        name = _absolute(domain)
        answer = await self._query(name, "MX")
        if answer is None:
            # RFC 5321 5.1: no MX means the domain itself is the implicit MX.
            return await self._lookup_host(domain)
        records = sorted(
            ((rd.preference, rd.exchange) for rd in answer),
            key=lambda r: r[0],
        )
        ttl = float(answer.rrset.ttl) if answer.rrset is not None else self._min_ttl
        mx_secure = self._secure(answer)
        real = [(pref, exchange) for pref, exchange in records if exchange != dns.name.root]
        if not real:
            raise DNSNullMX(f"{domain}: null MX, domain accepts no mail (RFC 7505)")
        results = await asyncio.gather(
            *(self._exchange(exchange, mx_secure) for _, exchange in real),
            return_exceptions=True
        )
        hosts: _Hosts = []
        errors: list[BaseException] = []
        for (pref, exchange), result in zip(real, results, strict=True):
            if isinstance(result, BaseException):
                if not isinstance(result, DNSTempError | DNSPermError):
                    raise result
                errors.append(result)
                continue
            ips, host_ttl, secure, expanded = result
            ttl = min(ttl, host_ttl)
            secure = mx_secure and secure
            hosts.append((pref, exchange.to_text(omit_final_dot=True).strip("[]").lower(), ips,
                          secure, expanded if secure else ""))
        if hosts:
            return hosts, ttl
        if any(isinstance(e, DNSTempError) for e in errors):
            raise DNSTempError(f"{domain}: no MX host resolved: {_join(errors)}")
        raise DNSPermError(f"{domain}: no MX host has an address: {_join(errors)}")


def txt_strings(records: Iterable[dns.rdata.Rdata]) -> list[bytes]:
    """Each TXT record's character-strings joined into one (a record longer than 255 bytes is
    published as several strings and read as their concatenation: RFC 7208 3.3, RFC 8461 3.1);
    records of another type are skipped."""
    return [b"".join(r.strings) for r in records if isinstance(r, dns.rdtypes.ANY.TXT.TXT)]


def _raw_answers(wire: bytes, owner: dns.name.Name, rdtype: int) -> list[bytes]:
    """The rdata, as bytes, of the answer section's records of ``owner`` and ``rdtype``."""
    parser = dns.wire.Parser(wire)
    try:
        _id, _flags, qdcount, ancount, _ns, _ar = parser.get_struct("!HHHHHH")
        for _ in range(qdcount):
            parser.get_name(decompress=True)
            parser.get_struct("!HH")
        out = []
        for _ in range(ancount):
            name = parser.get_name(decompress=True)
            rtype, rclass, _ttl, rdlen = parser.get_struct("!HHIH")
            data = parser.get_bytes(rdlen)
            if name == owner and rtype == rdtype and rclass == dns.rdataclass.IN:
                out.append(data)
    except dns.exception.DNSException:
        return []  # (``from_wire`` read it: not reached for a response it accepted)
    return out


def _absolute(name: str) -> dns.name.Name:
    try:
        return dns.name.from_text(name.strip())
    except dns.exception.DNSException as e:
        raise DNSPermError(f"{name!r}: invalid domain name: {e}") from e


def _join(errors: list[BaseException]) -> str:
    return "; ".join(str(e) for e in errors)


def _flatten(hosts: _Hosts, port: int) -> list[Destination]:
    ordered: _Hosts = []
    i = 0
    while i < len(hosts):
        j = i
        while j < len(hosts) and hosts[j][0] == hosts[i][0]:
            j += 1
        group = hosts[i:j]
        if len(group) > 1:
            random.shuffle(group)
        ordered.extend(group)
        i = j
    return [Destination(host, ip, port, pref, secure, expanded)
            for pref, host, ips, secure, expanded in ordered for ip in _shuffled(ips)]


def _shuffled(ips: list[str]) -> list[str]:
    """A host's addresses in random order, IPv4 before IPv6 (Postfix's smtp_randomize_addresses:
    the cached answer's order would otherwise send every connection to its first address)."""
    if len(ips) < 2:
        return ips
    v4 = [ip for ip in ips if ":" not in ip]
    v6 = [ip for ip in ips if ":" in ip]
    random.shuffle(v4)
    random.shuffle(v6)
    return v4 + v6
