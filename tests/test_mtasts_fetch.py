"""Fetching an MTA-STS policy (RFC 8461 3.1, 3.3) against a loopback DNS server and HTTPS
servers with certificates from a test CA: what the TXT record must say, and that a policy
server cannot hold a delivery for longer than the fetch's time limit."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json
import ssl
import tracemalloc

from postlane.relay.mtasts import MTASTS
from postlane.relay.mx import MXResolver
from tests.support.dnsserver import _key
from tests.support.drip import Drip
from tests.support.httpsserver import HTTPSServer
from tests.support.pki import TestCA
from tests.support.waiting import until

POLICY = "version: STSv1\r\nmode: enforce\r\nmx: *.mx.test\r\nmax_age: 86400\r\n"
HTTPS_IP = "127.0.0.60"


def _sts(dns_server, tmp_path, ca: TestCA, port: int, errors: list, **kw) -> MTASTS:
    resolver = MXResolver("127.0.0.1", dns_server.port)
    return MTASTS(resolver, tmp_path / "mta-sts.json", ca_file=str(ca.ca_file), port=port,
                  on_error=lambda *e: errors.append(e), **kw)


async def test_a_dripping_policy_server_is_given_up_on_at_the_time_limit(dns_server,
                                                                          tmp_path):
    """RFC 8461 3.3 asks for a time limit on the fetch. httpx's timeout is per read, so a
    server sending a byte every few seconds held the fetch, and with it every delivery slot
    waiting to plan a connection to that domain, for hours."""
    ca = TestCA(tmp_path / "ca")
    drip = await Drip(ca.server_context(["mta-sts.drip.test"])).start(HTTPS_IP)
    dns_server.add_txt("_mta-sts.drip.test", "v=STSv1; id=1;")
    dns_server.add_a("mta-sts.drip.test", HTTPS_IP)
    errors: list = []
    sts = _sts(dns_server, tmp_path, ca, drip.port, errors, timeout=0.5)
    try:
        assert await sts.policy("drip.test") is None
        assert drip.sent < drip.size, "given up on while the server was still sending"
        assert [e[1] for e in errors] == ["sts-policy-fetch-error"]
    finally:
        drip.stop()


async def test_only_a_record_of_version_stsv1_announces_a_policy(dns_server, tmp_path):
    """RFC 8461 3.1: the record is ``v=STSv1`` then ``;`` and fields; records that do not
    begin so are discarded. ``v=STSv10`` (a future version) was read as STSv1."""
    ca = TestCA(tmp_path / "ca")
    names = ["mta-sts.v1.test", "mta-sts.v10.test", "mta-sts.v1x.test"]
    https = HTTPSServer(ca.server_context(names), host=HTTPS_IP).start()
    errors: list = []
    sts = _sts(dns_server, tmp_path, ca, https.port, errors)
    try:
        for domain, record in (("v1.test", "v=STSv1; id=1;"), ("v10.test", "v=STSv10; id=1;"),
                               ("v1x.test", "v=STSv1x;id=1")):
            dns_server.add_txt(f"_mta-sts.{domain}", record)
            dns_server.add_a(f"mta-sts.{domain}", HTTPS_IP)
            https.policy(domain, POLICY)
        assert (await sts.policy("v1.test")) is not None
        assert await sts.policy("v10.test") is None
        assert await sts.policy("v1x.test") is None
        assert https.fetches == ["mta-sts.v1.test"]
    finally:
        https.stop()


async def test_a_cached_policy_is_refreshed_before_it_expires(dns_server, tmp_path):
    """RFC 8461 10.2: an attacker who blocks the fetch when a cached policy runs out strips
    it; senders should refresh a cached policy before it expires. A policy past half its
    max_age (or a day) is fetched again in the background while it stays in force, and a
    refresh that fails keeps it."""
    ca = TestCA(tmp_path / "ca")
    https = HTTPSServer(ca.server_context(["mta-sts.warm.test"]), host=HTTPS_IP).start()
    dns_server.add_txt("_mta-sts.warm.test", "v=STSv1; id=1;")
    dns_server.add_a("mta-sts.warm.test", HTTPS_IP)
    https.policy("warm.test", POLICY)
    errors: list = []
    sts = _sts(dns_server, tmp_path, ca, https.port, errors)
    try:
        first = await sts.policy("warm.test")
        assert first is not None and https.fetches == ["mta-sts.warm.test"]
        assert await sts.policy("warm.test") is first, "fresh: not fetched again"
        first.fetched -= 43_300  # past half of its max_age (86,400 s)
        assert await sts.policy("warm.test") is first, "in force while it is refreshed"
        await until(lambda: sts._policies["warm.test"] is not first and not sts._fetching,
                    what="the policy fetched again (and the fetch over)")
        refreshed = sts._policies["warm.test"]
        assert len(https.fetches) == 2 and refreshed.fetched > first.fetched + 43_000
        refreshed.fetched -= 43_300
        https.policies.clear()  # the policy server blocked: the refresh fails
        assert await sts.policy("warm.test") is refreshed
        await until(lambda: errors, what="the failed refresh told")
        assert await sts.policy("warm.test") is refreshed, "a failed refresh keeps the policy"
    finally:
        https.stop()


async def test_the_policy_is_fetched_from_the_next_address_when_one_is_down(dns_server,
                                                                           tmp_path):
    """``mta-sts.DOMAIN`` with two addresses, one of them down: the fetch goes on to the next
    address, as any HTTPS client does. Only the first address (in random order) was tried, so
    half the fetches failed and a domain's policy was, as often as not, not learned at all
    (no cached policy: delivered as if the domain had none)."""
    ca = TestCA(tmp_path / "ca")
    https = HTTPSServer(ca.server_context(["mta-sts.two.test"]), host=HTTPS_IP).start()
    dns_server.add_txt("_mta-sts.two.test", "v=STSv1; id=1;")
    dns_server.add_a("mta-sts.two.test", "127.0.0.61")  # nothing listens there
    dns_server.add_a("mta-sts.two.test", HTTPS_IP)
    https.policy("two.test", POLICY)
    errors: list = []
    sts = _sts(dns_server, tmp_path, ca, https.port, errors)
    try:
        for _ in range(8):  # each fetch takes the addresses in a new random order
            assert await sts._get("two.test") == POLICY
        assert errors == []
    finally:
        https.stop()


async def test_policy_file_edge_cases(dns_server, tmp_path):
    """RFC 8461 3.3 and 5.1: a redirect is not followed, a policy over 64 KB is invalid, a
    changed ``id`` fetches the policy again, a failed fetch under a changed ``id`` keeps the
    cached policy, ``mode: none`` withdraws it, CRLF and LF lines read alike."""
    ca = TestCA(tmp_path / "ca")
    names = [f"mta-sts.{d}" for d in ("moved.test", "big.test", "ids.test", "lf.test")]
    https = HTTPSServer(ca.server_context(names), host=HTTPS_IP).start()
    for domain in ("moved.test", "big.test", "ids.test", "lf.test"):
        dns_server.add_txt(f"_mta-sts.{domain}", "v=STSv1; id=1;")
        dns_server.add_a(f"mta-sts.{domain}", HTTPS_IP)
    https.policy("moved.test", POLICY, status=302)
    https.policy("big.test", POLICY + "#" * (64 * 1024))
    https.policy("ids.test", POLICY)
    https.policy("lf.test", POLICY.replace("\r\n", "\n"))
    errors: list = []
    sts = _sts(dns_server, tmp_path, ca, https.port, errors)
    try:
        assert await sts.policy("moved.test") is None
        assert await sts.policy("big.test") is None
        assert [e[1] for e in errors] == ["sts-policy-fetch-error", "sts-policy-invalid"]
        lf = await sts.policy("lf.test")
        assert lf is not None and lf.mode == "enforce" and lf.mx == ["*.mx.test"]
        first = await sts.policy("ids.test")
        assert first is not None and first.id == "1"

        def record_id(value: str) -> None:  # the TXT record replaced, no answer cached
            with dns_server._lock:
                dns_server._records.pop(_key("_mta-sts.ids.test"), None)
            dns_server.add_txt("_mta-sts.ids.test", f"v=STSv1; id={value};")
            sts.resolver = MXResolver("127.0.0.1", dns_server.port)
            sts._failed.clear()

        fetches = len(https.fetches)
        record_id("2")
        https.policy("ids.test", POLICY.replace("enforce", "testing"))
        second = await sts.policy("ids.test")
        assert second is not None and second.id == "2" and second.mode == "testing"
        assert len(https.fetches) == fetches + 1
        record_id("3")
        https.policies.pop("mta-sts.ids.test")  # the fetch fails: the cached policy holds
        assert await sts.policy("ids.test") is second
        record_id("4")
        https.policy("ids.test", "version: STSv1\nmode: none\nmax_age: 86400\n")
        assert await sts.policy("ids.test") is None, "mode none withdraws the policy"
    finally:
        https.stop()


async def test_expired_policies_leave_the_cache(dns_server, tmp_path):
    """A policy past its ``max_age`` is never used again (RFC 8461 5.1), but it stayed in the
    cache, in memory and in the file rewritten whole at every fetch, for ever: the cache of a
    node sending to many domains only grew. Expired policies are dropped when the cache is
    written, and not read back from the file."""
    ca = TestCA(tmp_path / "ca")
    names = ["mta-sts.old.test", "mta-sts.new.test"]
    https = HTTPSServer(ca.server_context(names), host=HTTPS_IP).start()
    for domain in ("old.test", "new.test"):
        dns_server.add_txt(f"_mta-sts.{domain}", "v=STSv1; id=1;")
        dns_server.add_a(f"mta-sts.{domain}", HTTPS_IP)
        https.policy(domain, POLICY)
    errors: list = []
    sts = _sts(dns_server, tmp_path, ca, https.port, errors)
    try:
        old = await sts.policy("old.test")
        assert old is not None
        old.fetched -= 86_401  # its max_age has run out
        assert await sts.policy("new.test") is not None
        cached = json.loads((tmp_path / "mta-sts.json").read_text())
        assert sorted(cached) == ["new.test"]
        assert "old.test" not in sts._policies
    finally:
        https.stop()


class Compressed:
    """An HTTPS policy server that answers with ``Content-Encoding: gzip`` whatever was asked:
    ``policy`` followed by ``padding`` bytes of ``#``, which deflate 1000 to 1."""

    def __init__(self, context: ssl.SSLContext, policy: str, padding: int) -> None:
        self.context = context
        raw = policy.encode() + b"#" * padding
        self.body = gzip.compress(raw, compresslevel=9)
        self.accept_encoding: list[str] = []

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").lower()
            for line in head.split("\r\n"):
                if line.startswith("accept-encoding:"):
                    self.accept_encoding.append(line.partition(":")[2].strip())
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n"
                         b"Content-Encoding: gzip\r\nContent-Length: %d\r\n\r\n"
                         % len(self.body) + self.body)
            await writer.drain()
        writer.close()

    async def start(self) -> Compressed:
        self.server = await asyncio.start_server(self._serve, HTTPS_IP, 0, ssl=self.context)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    def stop(self) -> None:
        self.server.close()


async def test_a_compressed_policy_is_inflated_no_further_than_the_size_limit(dns_server,
                                                                            tmp_path):
    """RFC 8461 3.3 caps a policy at 64 KB; httpx asked for gzip and inflated each chunk
    whole before the cap was checked, so 50 KB of gzip from a hostile policy host (50 MB
    inflated) took tens of MB of memory per fetch, and as much again for each domain fetched
    at the same time. The fetch now asks for ``identity`` and inflates a compressed answer
    (sent anyway) only up to the cap; a small compressed policy still reads."""
    ca = TestCA(tmp_path / "ca")
    ctx = ca.server_context(["mta-sts.bomb.test", "mta-sts.small.test"])
    bomb = await Compressed(ctx, POLICY, 50 * 1024 * 1024).start()
    small = await Compressed(ctx, POLICY, 0).start()
    for domain in ("bomb.test", "small.test"):
        dns_server.add_txt(f"_mta-sts.{domain}", "v=STSv1; id=1;")
        dns_server.add_a(f"mta-sts.{domain}", HTTPS_IP)
    errors: list = []
    try:
        sts = _sts(dns_server, tmp_path, ca, bomb.port, errors)
        tracemalloc.start()
        try:
            assert await sts.policy("bomb.test") is None
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert [e[1] for e in errors] == ["sts-policy-invalid"], errors
        assert peak < 8 * 1024 * 1024, f"{peak / 1e6:.0f} MB to refuse a 64 KB policy"
        assert bomb.accept_encoding == ["identity"]
        sts = _sts(dns_server, tmp_path, ca, small.port, errors)
        policy = await sts.policy("small.test")
        assert policy is not None and policy.mode == "enforce" and policy.mx == ["*.mx.test"]
    finally:
        bomb.stop()
        small.stop()


async def test_a_policy_of_max_age_0_is_kept_but_a_new_id_is_fetched_at_once(dns_server,
                                                                             tmp_path):
    """A ``max_age: 0`` policy is kept in force for 5 minutes (not fetched at every delivery,
    test_outbound_tls); a changed ``id`` in the TXT record still fetches the new one at once
    (RFC 8461 3.1: the id is how a domain says its policy changed)."""
    ca = TestCA(tmp_path / "ca")
    https = HTTPSServer(ca.server_context(["mta-sts.zero.test"]), host=HTTPS_IP).start()
    dns_server.add_txt("_mta-sts.zero.test", "v=STSv1; id=1;", ttl=0)
    dns_server.add_a("mta-sts.zero.test", HTTPS_IP)
    https.policy("zero.test", POLICY.replace("86400", "0"))
    resolver = MXResolver("127.0.0.1", dns_server.port, min_ttl=0)
    sts = MTASTS(resolver, tmp_path / "mta-sts.json", ca_file=str(ca.ca_file), port=https.port)
    try:
        first = await sts.policy("zero.test")
        assert first is not None and await sts.policy("zero.test") is first
        assert https.fetches == ["mta-sts.zero.test"]
        dns_server.clear()
        dns_server.add_txt("_mta-sts.zero.test", "v=STSv1; id=2;", ttl=0)
        dns_server.add_a("mta-sts.zero.test", HTTPS_IP)
        https.policy("zero.test", POLICY.replace("86400", "0").replace("enforce", "testing"))
        second = await sts.policy("zero.test")
        assert second is not None and second.id == "2" and second.mode == "testing"
        assert len(https.fetches) == 2
    finally:
        https.stop()
