"""MXResolver against a real authoritative DNS server on loopback."""

from __future__ import annotations

import asyncio

import pytest

from postlane.relay.mx import Destination, DNSNullMX, DNSPermError, DNSTempError, MXResolver
from tests.support.dnsserver import DNSServer
from tests.support.fixtures_dns import dns_server  # noqa: F401  (pytest fixture)


def resolver_for(server: DNSServer, timeout: float = 2.0) -> MXResolver:
    return MXResolver(nameserver=server.host, port=server.port, timeout=timeout)


def mx_queries(server: DNSServer, name: str) -> list[tuple[str, str]]:
    return [q for q in server.queries if q == (name, "MX")]


async def test_preference_order_and_all_addresses(dns_server: DNSServer) -> None:  # noqa: F811
    dns_server.add_mx("example.test", 20, "backup.example.test")
    dns_server.add_mx("example.test", 10, "mx1.example.test")
    dns_server.add_a("mx1.example.test", "127.0.0.10")
    dns_server.add_a("mx1.example.test", "127.0.0.11")
    dns_server.add_a("mx1.example.test", "::1")
    dns_server.add_a("backup.example.test", "127.0.0.20")

    dests = await resolver_for(dns_server).destinations("Example.TEST.", port=2525)

    # mx1's two IPv4 addresses come in random order (test_addresses_of_one_host_are_shuffled)
    assert sorted(dests[:2], key=lambda d: d.ip) == [
        Destination("mx1.example.test", "127.0.0.10", 2525, 10),
        Destination("mx1.example.test", "127.0.0.11", 2525, 10),
    ]
    assert dests[2:] == [
        Destination("mx1.example.test", "::1", 2525, 10),
        Destination("backup.example.test", "127.0.0.20", 2525, 20),
    ]


async def test_equal_preference_hosts_all_appear(dns_server: DNSServer) -> None:  # noqa: F811
    names = [f"mx{i}.eq.test" for i in range(4)]
    for i, name in enumerate(names):
        dns_server.add_mx("eq.test", 10, name)
        dns_server.add_a(name, f"127.0.1.{i}")
    dns_server.add_mx("eq.test", 50, "last.eq.test")
    dns_server.add_a("last.eq.test", "127.0.1.99")
    resolver = resolver_for(dns_server)

    for _ in range(3):
        dests = await resolver.destinations("eq.test")
        assert sorted(d.host for d in dests[:4]) == sorted(names)
        assert {d.preference for d in dests[:4]} == {10}
        assert dests[4] == Destination("last.eq.test", "127.0.1.99", 25, 50)


async def test_implicit_mx_from_a_record(dns_server: DNSServer) -> None:  # noqa: F811
    dns_server.add_a("nomx.test", "127.0.0.5")

    dests = await resolver_for(dns_server).destinations("nomx.test")

    assert dests == [Destination("nomx.test", "127.0.0.5", 25, 0)]
    assert ("nomx.test", "MX") in dns_server.queries


async def test_nxdomain_is_permanent(dns_server: DNSServer) -> None:  # noqa: F811
    with pytest.raises(DNSPermError):
        await resolver_for(dns_server).destinations("missing.test")


async def test_servfail_is_temporary(dns_server: DNSServer) -> None:  # noqa: F811
    dns_server.set_rcode("broken.test", "SERVFAIL")
    with pytest.raises(DNSTempError):
        await resolver_for(dns_server).destinations("broken.test")


async def test_null_mx_is_permanent(dns_server: DNSServer) -> None:  # noqa: F811
    dns_server.add_mx("nomail.test", 0, ".")
    dns_server.add_a("nomail.test", "127.0.0.5")
    with pytest.raises(DNSPermError, match="null MX"):
        await resolver_for(dns_server).destinations("nomail.test")


async def test_timeout_is_temporary(dns_server: DNSServer) -> None:  # noqa: F811
    dns_server.set_timeout("slow.test")
    with pytest.raises(DNSTempError):
        await resolver_for(dns_server, timeout=0.3).destinations("slow.test")


async def test_answers_are_cached(dns_server: DNSServer) -> None:  # noqa: F811
    dns_server.add_mx("cached.test", 10, "mx.cached.test", ttl=300)
    dns_server.add_a("mx.cached.test", "127.0.0.7", ttl=300)
    resolver = resolver_for(dns_server)

    first = await resolver.destinations("cached.test")
    sent = len(dns_server.queries)
    second = await resolver.destinations("CACHED.test")

    assert first == second
    assert len(dns_server.queries) == sent


async def test_concurrent_lookups_share_one_query(dns_server: DNSServer) -> None:  # noqa: F811
    dns_server.add_mx("burst.test", 10, "mx.burst.test")
    dns_server.add_a("mx.burst.test", "127.0.0.8")
    resolver = resolver_for(dns_server)

    results = await asyncio.gather(*(resolver.destinations("burst.test") for _ in range(20)))

    assert all(r == results[0] for r in results)
    assert len(mx_queries(dns_server, "burst.test")) == 1


async def test_unresolvable_mx_hosts_are_skipped(dns_server: DNSServer) -> None:  # noqa: F811
    dns_server.add_mx("partial.test", 5, "gone.partial.test")
    dns_server.add_mx("partial.test", 10, "ok.partial.test")
    dns_server.add_a("ok.partial.test", "127.0.0.9")

    dests = await resolver_for(dns_server).destinations("partial.test")

    assert [d.ip for d in dests] == ["127.0.0.9"]


async def test_all_mx_hosts_failing(dns_server: DNSServer) -> None:  # noqa: F811
    dns_server.add_mx("perm.test", 10, "gone.perm.test")
    dns_server.add_mx("temp.test", 10, "gone.temp.test")
    dns_server.add_mx("temp.test", 20, "flaky.temp.test")
    dns_server.set_rcode("flaky.temp.test", "SERVFAIL")
    resolver = resolver_for(dns_server)

    with pytest.raises(DNSPermError):
        await resolver.destinations("perm.test")
    with pytest.raises(DNSTempError):
        await resolver.destinations("temp.test")


async def test_resolve_host_and_ip_literal(dns_server: DNSServer) -> None:  # noqa: F811
    dns_server.add_a("smarthost.test", "127.0.0.30")
    resolver = resolver_for(dns_server)

    assert await resolver.resolve_host("smarthost.test", 587) == [
        Destination("smarthost.test", "127.0.0.30", 587, 0)
    ]
    before = len(dns_server.queries)
    assert await resolver.resolve_host("127.0.0.31") == [
        Destination("127.0.0.31", "127.0.0.31", 25, 0)
    ]
    assert len(dns_server.queries) == before


async def test_txt_joins_long_records(dns_server: DNSServer) -> None:  # noqa: F811
    key = "v=DKIM1; k=rsa; p=" + "A" * 3000  # over the UDP payload: TC, then TCP
    dns_server.add_txt("sel._domainkey.txt.test", key)
    resolver = resolver_for(dns_server)

    assert await resolver.txt("sel._domainkey.txt.test") == [key]
    assert await resolver.txt("nothing.txt.test") == []


async def test_mx_pointing_at_a_cname_is_followed(dns_server: DNSServer) -> None:  # noqa: F811
    """RFC 2181 10.3 forbids it, RFC 5321 5.1 asks for leniency: the CNAME's target's address
    is used, under the MX name (what TLS checks the certificate against)."""
    dns_server.add_mx("alias.test", 10, "mx.alias.test")
    dns_server.add_cname("mx.alias.test", "real.hosting.test")
    dns_server.add_a("real.hosting.test", "127.0.0.41")

    dests = await resolver_for(dns_server).destinations("alias.test")

    assert dests == [Destination("mx.alias.test", "127.0.0.41", 25, 10)]


@pytest.mark.parametrize("signed, secure, expanded", [
    (["customer.test", "alias.test", "hosting.test"], True, "real.hosting.test"),
    # the target's zone unsigned: no AD on the addresses, but the alias is signed, so the
    # host is in a signed zone and DANE applies at its own name (RFC 7672 2.2.2)
    (["customer.test", "alias.test"], True, ""),
    (["customer.test", "hosting.test"], False, ""),  # the alias's zone unsigned
    (["alias.test"], False, ""),  # the MX answer unsigned
])
async def test_a_secure_cname_chain_names_its_target(dns_server: DNSServer,  # noqa: F811
                                                     signed: list[str], secure: bool,
                                                     expanded: str) -> None:
    """RFC 7672 2.2.3: the target of an authenticated CNAME chain is where the host's TLSA
    records are looked up first; an unauthenticated chain names none, and DANE applies to
    the host when its own CNAME record is authenticated (2.2.2)."""
    dns_server.add_mx("customer.test", 10, "mx.alias.test")
    dns_server.add_cname("mx.alias.test", "real.hosting.test")
    dns_server.add_a("real.hosting.test", "127.0.0.41")
    for zone in signed:
        dns_server.set_secure(zone)
    resolver = MXResolver(nameserver=dns_server.host, port=dns_server.port, timeout=2.0,
                          dnssec=True)

    dests = await resolver.destinations("customer.test")

    assert dests == [Destination("mx.alias.test", "127.0.0.41", 25, 10, secure, expanded)]


async def test_mx_naming_an_ip_address_is_used_as_one(dns_server: DNSServer) -> None:  # noqa: F811
    """An MX exchange written as an address ("10 127.0.0.42.") is invalid but seen in the
    wild; Postfix warns and connects to the address. Here too, without an A query for it."""
    dns_server.add_mx("literal.test", 10, "127.0.0.42")
    dns_server.add_mx("literal.test", 20, "backup.literal.test")
    dns_server.add_a("backup.literal.test", "127.0.0.43")

    dests = await resolver_for(dns_server).destinations("literal.test")

    assert [(d.host, d.ip, d.preference) for d in dests] == [
        ("127.0.0.42", "127.0.0.42", 10), ("backup.literal.test", "127.0.0.43", 20)]
    assert not any(q[0].startswith("127.0.0.42") for q in dns_server.queries)


async def test_no_implicit_mx_when_mx_records_exist(dns_server: DNSServer) -> None:  # noqa: F811
    """RFC 5321 5.1: the domain's own A is the implicit MX only when it has no MX records; MX
    hosts without addresses make the domain undeliverable, not its A."""
    dns_server.add_mx("hasmx.test", 10, "gone.hasmx.test")
    dns_server.add_a("hasmx.test", "127.0.0.44")

    with pytest.raises(DNSPermError):
        await resolver_for(dns_server).destinations("hasmx.test")


async def test_null_mx_is_its_own_error(dns_server: DNSServer) -> None:  # noqa: F811
    """RFC 7505: the relay bounces a null MX with 556 5.1.10, distinct from NXDOMAIN."""
    dns_server.add_mx("nullmx.test", 0, ".")
    resolver = resolver_for(dns_server)
    with pytest.raises(DNSNullMX):
        await resolver.destinations("nullmx.test")
    with pytest.raises(DNSNullMX):  # cached: the same error again
        await resolver.destinations("nullmx.test")


async def test_addresses_of_one_host_are_shuffled_per_call(dns_server: DNSServer) -> None:  # noqa: F811
    """RFC 5321 5.1: destinations of equal preference are randomised. A host's addresses are
    too (Postfix's smtp_randomize_addresses), IPv4 before IPv6 as before: with the answer
    cached for its TTL, a fixed order would send every connection to the first address."""
    for i in range(4):
        dns_server.add_a("mx.spread.test", f"127.0.2.{i}")
    dns_server.add_a("mx.spread.test", "::1")
    dns_server.add_mx("spread.test", 10, "mx.spread.test")
    resolver = resolver_for(dns_server)

    firsts = set()
    for _ in range(40):
        dests = await resolver.destinations("spread.test")
        assert sorted(d.ip for d in dests[:4]) == [f"127.0.2.{i}" for i in range(4)]
        assert dests[4].ip == "::1"
        firsts.add(dests[0].ip)
    assert len(firsts) > 1


async def test_expired_answers_do_not_pile_up(dns_server: DNSServer) -> None:  # noqa: F811
    """Answers were dropped only when their name was asked again: one cached answer (or
    more) per domain ever sent to, for the life of the node."""
    resolver = MXResolver(nameserver=dns_server.host, port=dns_server.port, timeout=2.0,
                          min_ttl=0.0, max_ttl=0.0, cache_sweep=50)
    for i in range(300):
        with pytest.raises(DNSPermError):
            await resolver.destinations(f"gone{i}.test")
    assert len(resolver._cache) <= 50


async def test_a_failed_lookup_of_a_signed_alias_leaves_the_host_unusable(
        dns_server: DNSServer) -> None:  # noqa: F811
    """The CNAME of an MX host into an unsigned zone is asked for to learn whether DANE
    applies (RFC 7672 2.2.2); when that lookup fails the host is not taken as without DANE
    (an attacker who blocks it would turn DANE off): it is skipped, the next MX is used."""
    dns_server.add_mx("customer.test", 10, "mx.alias.test")
    dns_server.add_mx("customer.test", 20, "backup.customer.test")
    dns_server.add_cname("mx.alias.test", "real.hosting.test")
    dns_server.add_a("real.hosting.test", "127.0.0.41")
    dns_server.add_a("backup.customer.test", "127.0.0.42")
    for zone in ("customer.test", "alias.test"):
        dns_server.set_secure(zone)
    dns_server.set_rcode("mx.alias.test", "SERVFAIL", "CNAME")
    resolver = MXResolver(nameserver=dns_server.host, port=dns_server.port, timeout=2.0,
                          dnssec=True)

    dests = await resolver.destinations("customer.test")

    assert [d.host for d in dests] == ["backup.customer.test"]
