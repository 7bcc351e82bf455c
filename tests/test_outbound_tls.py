"""Outbound TLS on loopback: the class policies, MTA-STS (RFC 8461), DANE (RFC 7672) and TLS-RPT
(RFC 8460), against receiving sinks that present certificates from a test CA, for a wrong name,
an expired one, or no STARTTLS at all; MX, TXT and TLSA records (AD set for DNSSEC-signed
names) come from the test DNS server, MTA-STS policies from a local HTTPS server."""

from __future__ import annotations

import asyncio
import email
import gzip
import hashlib
import json
import shutil
import ssl
import subprocess
from pathlib import Path

import jsonschema
import pytest
from typer.testing import CliRunner

from postlane.cli import app
from postlane.harness.sink import Sink
from tests.conftest import config_text, message, records, send
from tests.support.drip import DripReply
from tests.support.httpsserver import HTTPSServer
from tests.support.pki import TestCA, explicit_version_one, leaf_der, tlsa_sha256
from tests.support.waiting import until

# MX host -> the sink it resolves to
MX = {"good.mx.test": "127.0.0.51", "wrong.mx.test": "127.0.0.52",
      "expired.mx.test": "127.0.0.53", "plain.mx.test": "127.0.0.54", "ta.mx.test": "127.0.0.55",
      "broken.mx.test": "127.0.0.56"}
HTTPS_IP = "127.0.0.60"


class World:
    """The receiving side: sinks on one port at several addresses, DNS, an HTTPS server."""

    def __init__(self, tmp_path: Path, dns_server) -> None:
        self.tmp_path = tmp_path
        self.dns = dns_server
        self.ca = TestCA(tmp_path / "ca")
        self.intermediate = self.ca.intermediate()
        self.certs = {"good.mx.test": self.ca.issue(["good.mx.test"]),
                      "wrong.mx.test": self.ca.issue(["wrong.invalid"]),
                      "expired.mx.test": self.ca.issue(["expired.mx.test"], expired=True),
                      "ta.mx.test": self.intermediate.issue(["ta.mx.test"])}
        self.sinks: dict[str, Sink] = {}
        self.https: HTTPSServer | None = None
        self.port = 0

    async def start(self) -> World:
        for _ in range(20):  # one port free on every address
            try:
                for host, ip in MX.items():
                    ctx = None
                    if host in self.certs:
                        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
                        ctx.load_cert_chain(*self.certs[host])
                    elif host == "broken.mx.test":  # offers STARTTLS, every handshake fails
                        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)  # (it has no certificate)
                    sink = await Sink(host=ip, port=self.port, tls_context=ctx).start()
                    self.port = sink.port
                    self.sinks[host] = sink
                break
            except OSError:
                await self.stop_sinks()
                self.port = 0
        for host, ip in MX.items():
            self.dns.add_a(host, ip)
        self.https = HTTPSServer(self.ca.server_context(
            [f"mta-sts.{d}" for d in ("sts.test", "sts-testing.test", "both.test",
                                      "sts-away.test")] + [HTTPS_IP]), host=HTTPS_IP).start()
        return self

    async def stop_sinks(self) -> None:
        for sink in self.sinks.values():
            await sink.stop()
        self.sinks.clear()

    def config(self, class_tls: str | None = None, extra: str = "") -> str:
        text = config_text(self.tmp_path, self.port, f"""
[dns]
nameserver = "127.0.0.1"
port = {self.dns.port}
dnssec = true
[tlsrpt]
organization = "Insurer Test"
contact = "tls-reports@insurer.test"
{extra}""", routes=False).replace("[relay]\n", f"""[relay]
ca_file = "{self.ca.ca_file}"
mta_sts_port = {self.https.port if self.https else 443}
""")
        if class_tls:
            text = text.replace('[classes.policy-documents]\npool = "critical"',
                                f'[classes.policy-documents]\npool = "critical"\n'
                                f'tls = "{class_tls}"')
        return text

    def mx(self, domain: str, *hosts: str, secure: bool = False) -> None:
        for i, host in enumerate(hosts):
            self.dns.add_mx(domain, 10 + i, host)
        if secure:
            self.dns.set_secure(domain)
            for host in hosts:
                self.dns.set_secure(host)

    def sts(self, domain: str, mode: str, mx: list[str], policy_id: str = "1") -> None:
        self.dns.add_txt(f"_mta-sts.{domain}", f"v=STSv1; id={policy_id};")
        self.dns.add_a(f"mta-sts.{domain}", HTTPS_IP)
        lines = "".join(f"mx: {m}\r\n" for m in mx)
        assert self.https is not None
        self.https.policy(domain, f"version: STSv1\r\nmode: {mode}\r\n{lines}max_age: 86400\r\n")

    def tlsa(self, host: str, usage: int, selector: int, der: bytes, *, port: int) -> None:
        self.dns.add_tlsa(f"_{port}._tcp.{host}", usage, selector, 1, tlsa_sha256(der, selector))

    def arrivals(self) -> int:
        return sum(len(s.arrivals) for s in self.sinks.values())


@pytest.fixture
async def world(tmp_path, dns_server):
    w = await World(tmp_path, dns_server).start()
    yield w
    await w.stop_sinks()
    if w.https is not None:
        w.https.stop()


async def first_outcome(tmp_path: Path, rcpt: str, timeout: float = 30.0) -> dict:
    """The first delivery ("d") or deferral ("t") record of ``rcpt``."""

    def outcome() -> dict | None:
        rows = [r for r in records(tmp_path) if r["rcpt"] == rcpt and r["type"] in "dtb"]
        return rows[0] if rows else None

    return await until(outcome, timeout=timeout, what=f"an outcome for {rcpt}")


async def _deliver(node, rcpt: str, cls: str = "policy-documents") -> None:
    await send(node.listeners[0].port, "s@insurer.test", [rcpt], message(cls=cls))


async def delivered_with(world: World, make_node, rcpt: str) -> dict:
    """Start a node, deliver to ``rcpt`` (an opportunistic class), check it was delivered, and
    return its delivery record."""
    node = await make_node(world.config())
    await _deliver(node, rcpt, cls="marketing")
    row = await first_outcome(world.tmp_path, rcpt)
    assert row["type"] == "d", row
    return row


# -- the class policies ----------------------------------------------------------------------

@pytest.mark.parametrize("class_tls, host, outcome, auth, status", [
    ("opportunistic", "plain.mx.test", "d", "", ""),
    ("opportunistic", "wrong.mx.test", "d", "none", ""),
    ("opportunistic", "broken.mx.test", "d", "", ""),  # the handshake fails: in clear
    ("required", "broken.mx.test", "t", None, "4.7.5"),
    ("verified", "broken.mx.test", "t", None, "4.7.5"),
    ("required", "plain.mx.test", "t", None, "4.7.10"),
    ("required", "wrong.mx.test", "d", "none", ""),
    ("required", "expired.mx.test", "d", "none", ""),
    ("verified", "good.mx.test", "d", "pkix", ""),
    ("verified", "wrong.mx.test", "t", None, "4.7.5"),
    ("verified", "expired.mx.test", "t", None, "4.7.5"),
    ("verified", "plain.mx.test", "t", None, "4.7.10"),
])
async def test_class_policy(world, make_node, tmp_path, class_tls, host, outcome, auth, status):
    world.mx("class.test", host)
    node = await make_node(world.config(class_tls))
    await _deliver(node, "r@class.test")
    row = await first_outcome(tmp_path, "r@class.test")
    assert row["type"] == outcome, row
    if outcome == "d":
        assert row["dlvTlsAuth"] == auth and row["dlvTlsPolicy"] == class_tls
        assert bool(row["dlvTlsProtocol"]) == (auth != "")
    else:
        assert row["dsnStatus"] == status and f"TLS policy {class_tls}" in row["dsnDiag"], row
        assert world.sinks[host].arrivals == [], "never sent in clear or to a bad certificate"


async def test_required_without_starttls_says_why(world, make_node, tmp_path):
    world.mx("plain.test", "plain.mx.test")
    node = await make_node(world.config("required"))
    await _deliver(node, "r@plain.test")
    row = await first_outcome(tmp_path, "r@plain.test")
    assert row["dsnDiag"] == ("smtp;451 4.7.10 TLS policy required: plain.mx.test does not"
                              " offer STARTTLS")
    await _deliver(node, "r2@plain.test", cls="marketing")  # opportunistic class: sent
    assert (await first_outcome(tmp_path, "r2@plain.test"))["type"] == "d"


async def test_destination_rule_tls_raises_the_class_policy(world, make_node, tmp_path):
    world.mx("partner.test", "wrong.mx.test")
    node = await make_node(world.config(extra="""
[destinations.partner]
domains = ["partner.test"]
tls = "verified"
"""))
    await _deliver(node, "r@partner.test", cls="marketing")
    row = await first_outcome(tmp_path, "r@partner.test")
    assert row["type"] == "t" and row["dsnStatus"] == "4.7.5"


# -- the next MX under a TLS policy --------------------------------------------------------------

@pytest.mark.parametrize("class_tls, first", [("verified", "wrong.mx.test"),
                                              ("verified", "plain.mx.test"),
                                              ("required", "broken.mx.test"),
                                              ("required", "plain.mx.test")])
async def test_host_failing_the_policy_is_skipped_for_the_next_mx(world, make_node, tmp_path,
                                                                  class_tls, first):
    """An MX the policy refuses (no STARTTLS, a bad certificate, a failed handshake) is passed
    over for the next MX in the same attempt, never tried again in clear; the record names the
    host that took the mail and how it was protected."""
    world.mx("fallback.test", first, "good.mx.test")
    node = await make_node(world.config(class_tls))
    await _deliver(node, "r@fallback.test")
    row = await first_outcome(tmp_path, "r@fallback.test")
    assert row["type"] == "d", row
    assert row["dlvDestinationIp"] == MX["good.mx.test"] and row["dlvTlsPolicy"] == class_tls
    assert row["dlvTlsAuth"] == ("pkix" if class_tls == "verified" else "none")
    assert world.sinks[first].arrivals == []


async def test_every_mx_failing_the_policy_defers_and_sends_nothing(world, make_node,
                                                                     tmp_path):
    world.mx("fallback.test", "plain.mx.test", "broken.mx.test")
    node = await make_node(world.config("required"))
    await _deliver(node, "r@fallback.test")
    row = await first_outcome(tmp_path, "r@fallback.test")
    assert row["type"] == "t" and row["dsnStatus"] == "4.7.5", row  # the last host's reason
    assert row["dlvDestinationIp"] == MX["broken.mx.test"], "the evidence: the last host tried"
    assert row["dlvTlsPolicy"] == "required" and row["dlvTlsProtocol"] == ""
    await asyncio.sleep(0.5)  # a bound after the deferral record: nothing arrives later
    assert world.arrivals() == 0
    assert world.sinks["plain.mx.test"].connections >= 1, "MX 10 was tried first"


async def test_mta_sts_enforce_falls_over_only_to_policy_mx(world, make_node, tmp_path):
    """Under MTA-STS enforce the next MX is tried only if the policy names it: MX 10 has an
    expired certificate, MX 20 is not in the policy (never connected to), MX 30 takes it."""
    world.mx("sts.test", "expired.mx.test", "ta.mx.test", "good.mx.test")
    world.sts("sts.test", "enforce", ["expired.mx.test", "good.mx.test"])
    row = await delivered_with(world, make_node, "r@sts.test")
    assert row["dlvDestinationIp"] == MX["good.mx.test"]
    assert row["dlvTlsPolicy"] == "mta-sts-enforce" and row["dlvTlsAuth"] == "pkix"
    assert world.sinks["ta.mx.test"].connections == 0
    assert world.sinks["expired.mx.test"].arrivals == []


# -- MTA-STS -----------------------------------------------------------------------------------

async def test_mta_sts_enforce_delivers_to_a_matching_mx_with_a_valid_certificate(
        world, make_node, tmp_path):
    world.mx("sts.test", "good.mx.test")
    world.sts("sts.test", "enforce", ["*.mx.test"])
    row = await delivered_with(world, make_node, "r@sts.test")  # an opportunistic class
    assert row["dlvTlsPolicy"] == "mta-sts-enforce" and row["dlvTlsAuth"] == "pkix"


@pytest.mark.parametrize("host, policy_mx", [("good.mx.test", ["mx.elsewhere.test"]),
                                             ("expired.mx.test", ["*.mx.test"]),
                                             ("plain.mx.test", ["*.mx.test"]),
                                             ("broken.mx.test", ["*.mx.test"])],
                         ids=["MX not in policy", "expired certificate", "no STARTTLS",
                              "failed handshake"])
async def test_mta_sts_enforce_defers_and_sends_nothing(world, make_node, tmp_path, host,
                                                        policy_mx):
    world.mx("sts.test", host)
    world.sts("sts.test", "enforce", policy_mx)
    node = await make_node(world.config())
    await _deliver(node, "r@sts.test", cls="marketing")
    row = await first_outcome(tmp_path, "r@sts.test")
    assert row["type"] == "t" and row["dsnStatus"].startswith("4.7."), row
    await asyncio.sleep(0.5)  # a bound after the deferral record: no sink receives it later
    assert world.arrivals() == 0


async def test_mta_sts_field_names_are_case_sensitive(world, make_node, tmp_path):
    """RFC 8461 3.2's ABNF names the fields with RFC 7405 ``%s`` (case-sensitive):
    ``sts-policy-mode-field = %s"mode"``; ``MODE`` is an extension field, to be ignored. Keys
    were lower-cased, so a ``MODE: testing`` line before ``mode: enforce`` was taken as the
    mode (the first of a field counts) and enforcement was lost, and a file of ``Version:``,
    ``Mode:``, ``MX:`` keys was taken as a policy no other sender reads: mail deferred here
    that others deliver, and the domain's TLS-RPT never heard of ``sts-policy-invalid``."""
    assert world.https is not None
    policies = {"sts.test": "MODE: testing\r\nversion: STSv1\r\nmode: enforce\r\n"
                            "mx: *.mx.test\r\nmax_age: 86400\r\n",
                "sts-testing.test": "Version: STSv1\r\nMode: enforce\r\n"
                                    "MX: mx.elsewhere.test\r\nMax_Age: 86400\r\n"}
    for domain, text in policies.items():
        world.mx(domain, "good.mx.test")
        world.dns.add_txt(f"_mta-sts.{domain}", "v=STSv1; id=1;")
        world.dns.add_a(f"mta-sts.{domain}", HTTPS_IP)
        world.https.policy(domain, text)
    node = await make_node(world.config())
    await _deliver(node, "r@sts.test", cls="marketing")
    row = await first_outcome(tmp_path, "r@sts.test")
    assert row["type"] == "d", row
    assert row["dlvTlsPolicy"] == "mta-sts-enforce" and row["dlvTlsAuth"] == "pkix", row
    await _deliver(node, "r@sts-testing.test", cls="marketing")
    row = await first_outcome(tmp_path, "r@sts-testing.test")
    assert row["type"] == "d" and not row["dlvTlsPolicy"].startswith("mta-sts"), row


async def test_mta_sts_policy_survives_a_restart(world, make_node, tmp_path):
    world.mx("sts-away.test", "good.mx.test")
    world.sts("sts-away.test", "enforce", ["mx.elsewhere.test"])
    node = await make_node(world.config())
    await _deliver(node, "r@sts-away.test", cls="marketing")
    assert (await first_outcome(tmp_path, "r@sts-away.test"))["type"] == "t"
    await node.stop()
    assert world.https is not None
    world.https.policies.clear()  # the policy server is away (or blocked by an attacker)
    fetches = len(world.https.fetches)
    node = await make_node(world.config())
    await _deliver(node, "r2@sts-away.test", cls="marketing")
    assert (await first_outcome(tmp_path, "r2@sts-away.test"))["type"] == "t"
    assert len(world.https.fetches) == fetches, "the cached policy was used, not fetched"
    assert world.arrivals() == 0
    assert json.loads((tmp_path / "spool" / "mta-sts.json").read_text())["sts-away.test"]


async def test_mta_sts_testing_delivers_and_reports_the_failure(world, make_node, tmp_path):
    world.mx("sts-testing.test", "wrong.mx.test")
    world.sts("sts-testing.test", "testing", ["*.mx.test"])
    node = await make_node(world.config())
    await _deliver(node, "r@sts-testing.test", cls="marketing")
    row = await first_outcome(tmp_path, "r@sts-testing.test")
    assert row["type"] == "d" and row["dlvTlsPolicy"] == "mta-sts-testing"
    assert row["dlvTlsAuth"] == "none", "encrypted, the certificate did not check out"
    node.tls_reports.flush()
    report = node.tls_reports.report(records(tmp_path)[0]["timeLogged"][:10],
                                     "sts-testing.test")
    validate(report)
    [policy] = report["policies"]
    assert policy["policy"]["policy-type"] == "sts"
    assert policy["policy"]["mx-host"] == ["*.mx.test"]
    assert policy["summary"]["total-failure-session-count"] == 1
    [detail] = policy["failure-details"]
    assert detail["result-type"] == "certificate-host-mismatch"
    assert detail["receiving-mx-hostname"] == "wrong.mx.test"
    assert detail["receiving-ip"] == MX["wrong.mx.test"]


async def test_mta_sts_testing_over_a_failed_handshake_delivers_in_clear(world, make_node,
                                                                         tmp_path):
    """Testing mode delivers as the class policy alone would: opportunistic, so a server
    whose STARTTLS handshake fails gets the message in clear, on a new connection."""
    world.mx("sts-testing.test", "broken.mx.test")
    world.sts("sts-testing.test", "testing", ["*.mx.test"])
    node = await make_node(world.config())
    await _deliver(node, "r@sts-testing.test", cls="marketing")
    row = await first_outcome(tmp_path, "r@sts-testing.test")
    assert row["type"] == "d" and row["dlvTlsPolicy"] == "mta-sts-testing", row
    assert row["dlvTlsAuth"] == "" and row["dlvTlsProtocol"] == ""


async def _sent_as_without_policy(node, tmp_path) -> None:
    """A mail to r@sts.test delivered as if the domain had no policy (opportunistic TLS), and
    the day's TLS report for sts.test says sts-policy-invalid (RFC 8461 5)."""
    await _deliver(node, "r@sts.test", cls="marketing")
    row = await first_outcome(tmp_path, "r@sts.test")
    assert row["type"] == "d" and row["dlvTlsPolicy"] == "opportunistic", row
    node.tls_reports.flush()
    report = node.tls_reports.report(row["timeLogged"][:10], "sts.test")
    assert report is not None
    validate(report)
    results = [d["result-type"] for p in report["policies"] for d in p.get("failure-details", [])]
    assert results == ["sts-policy-invalid"]



@pytest.mark.parametrize("max_age", ["\u00b2", "\u0661\u0662", "86400x", "+86400", ""],
                         ids=["superscript two", "Arabic-Indic digits", "trailing junk",
                              "sign", "empty"])
async def test_a_policy_with_a_bad_max_age_is_invalid(world, make_node, tmp_path, max_age):
    """RFC 8461 3.2: ``max_age`` is 1*10 ASCII DIGIT. A policy with anything else is
    sts-policy-invalid and the domain is sent to as if it had no policy (RFC 8461 5). A
    superscript digit passed ``str.isdigit`` and made ``int()`` raise inside the fetch."""
    world.mx("sts.test", "good.mx.test")
    world.sts("sts.test", "enforce", ["mx.elsewhere.test"])  # would defer, if it applied
    assert world.https is not None
    world.https.policy("sts.test", "version: STSv1\r\nmode: enforce\r\nmx: mx.elsewhere.test"
                                   f"\r\nmax_age: {max_age}\r\n")
    await _sent_as_without_policy(await make_node(world.config()), tmp_path)


@pytest.mark.parametrize("term", ["\r", "\x0b", "\x85", "\u2028"],
                         ids=["CR alone", "vertical tab", "NEL", "line separator"])
async def test_a_policy_line_ends_only_at_lf_or_crlf(world, make_node, tmp_path, term):
    """RFC 8461 3.2: a policy line ends with LF or CRLF (``sts-policy-term``). Lines were
    split with ``str.splitlines``, which also ends them at CR alone, VT, FF, NEL, U+2028 and
    more: this file, an ``enforce`` policy to a reader that splits so, has no ``mode`` line
    to one that follows the RFC, and is sts-policy-invalid (the domain is sent to as if it
    had no policy)."""
    world.mx("sts.test", "good.mx.test")
    world.sts("sts.test", "enforce", ["mx.elsewhere.test"])
    assert world.https is not None
    world.https.policy("sts.test", f"version: STSv1{term}mode: enforce\r\n"
                                   "mx: mx.elsewhere.test\r\nmax_age: 86400\r\n")
    await _sent_as_without_policy(await make_node(world.config()), tmp_path)


async def test_a_policy_file_beginning_with_a_bom_is_read(world, make_node, tmp_path):
    """A policy file saved by a Windows editor begins with a UTF-8 byte order mark: its first
    line read as a "\\ufeffversion" field, the policy was sts-policy-invalid and the domain
    sent to as if it had none (here: to MX 10, which the policy does not name). A leading BOM
    is now skipped; one anywhere else still makes the policy invalid."""
    world.mx("sts.test", "wrong.mx.test", "good.mx.test")
    world.sts("sts.test", "enforce", ["good.mx.test"])
    assert world.https is not None
    world.https.policy("sts.test", "\ufeffversion: STSv1\r\nmode: enforce\r\n"
                                   "mx: good.mx.test\r\nmax_age: 86400\r\n")
    world.mx("sts-testing.test", "wrong.mx.test")
    world.sts("sts-testing.test", "enforce", ["mx.elsewhere.test"])  # would defer, if read
    world.https.policy("sts-testing.test", "\ufeff\ufeffversion: STSv1\r\nmode: enforce\r\n"
                                           "mx: mx.elsewhere.test\r\nmax_age: 86400\r\n")
    node = await make_node(world.config())
    await _deliver(node, "r@sts.test", cls="marketing")
    row = await first_outcome(tmp_path, "r@sts.test")
    assert row["type"] == "d" and row["dlvTlsPolicy"] == "mta-sts-enforce", row
    assert row["dlvDestinationIp"] == MX["good.mx.test"], row
    await _deliver(node, "r@sts-testing.test", cls="marketing")
    row = await first_outcome(tmp_path, "r@sts-testing.test")
    assert row["type"] == "d" and row["dlvTlsPolicy"] == "opportunistic", row


async def test_a_policy_of_max_age_0_is_not_fetched_at_every_delivery(world, make_node,
                                                                      tmp_path):
    """RFC 8461 3.2 allows ``max_age: 0``: such a policy expired as it was fetched, so every
    delivery to the domain fetched it again (a busy sender hammering the policy host, and
    each delivery waiting for the fetch). It is now kept in force for 5 minutes at least
    (RFC 8461 3.3 lets a sender rate-limit its fetches); a changed ``id`` still fetches it at
    once (test_mtasts_fetch)."""
    world.mx("sts.test", "good.mx.test")
    world.sts("sts.test", "enforce", ["good.mx.test"])
    assert world.https is not None
    world.https.policy("sts.test", "version: STSv1\r\nmode: enforce\r\nmx: good.mx.test\r\n"
                                   "max_age: 0\r\n")
    node = await make_node(world.config())
    for rcpt in ("r1@sts.test", "r2@sts.test", "r3@sts.test"):
        await _deliver(node, rcpt, cls="marketing")
        row = await first_outcome(tmp_path, rcpt)
        assert row["type"] == "d" and row["dlvTlsPolicy"] == "mta-sts-enforce", row
    assert world.https.fetches.count("mta-sts.sts.test") == 1, world.https.fetches


# -- DANE ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("usage, selector, auth", [(3, 1, "dane-ee"), (3, 0, "dane-ee"),
                                                   (2, 0, "dane-ta"), (2, 1, "dane-ta")])
async def test_dane_match_delivers_with_dane_evidence(world, make_node, tmp_path, usage,
                                                      selector, auth):
    host = "good.mx.test" if usage == 3 else "ta.mx.test"
    world.mx("dane.test", host, secure=True)
    der = (leaf_der(world.certs[host][0]) if usage == 3 else world.intermediate.der)
    world.tlsa(host, usage, selector, der, port=world.port)
    row = await delivered_with(world, make_node, "r@dane.test")
    assert row["dlvTlsPolicy"] == "dane" and row["dlvTlsAuth"] == auth


async def test_tlsa_mismatch_defers(world, make_node, tmp_path):
    world.mx("dane.test", "good.mx.test", secure=True)
    world.tlsa("good.mx.test", 3, 1, leaf_der(world.certs["wrong.mx.test"][0]), port=world.port)
    node = await make_node(world.config())
    await _deliver(node, "r@dane.test", cls="marketing")
    row = await first_outcome(tmp_path, "r@dane.test")
    assert row["type"] == "t" and "TLS policy dane" in row["dsnDiag"], row
    assert world.arrivals() == 0
    node.tls_reports.flush()
    report = node.tls_reports.report(row["timeLogged"][:10], "dane.test")
    validate(report)
    assert report["policies"][0]["policy"]["policy-type"] == "tlsa"
    assert report["policies"][0]["failure-details"][0]["result-type"] == "tlsa-invalid"


@pytest.mark.parametrize("usage, selector, mtype", [
    (1, 1, 1),  # PKIX-EE: not for SMTP (RFC 7672 3.1.3)
    (4, 1, 1),  # an unknown usage
    (3, 7, 1),  # an unknown selector
    (3, 1, 9),  # an unknown matching type
])
async def test_only_unusable_tlsa_records_make_tls_mandatory_not_a_deferral(
        world, make_node, tmp_path, usage, selector, mtype):
    """RFC 7672 2.2: a secure TLSA RRset of only unusable records makes TLS mandatory,
    without authentication: delivered over unauthenticated TLS, never in clear."""
    data = "ab" * 32
    world.mx("dane.test", "wrong.mx.test", secure=True)
    world.dns.add_tlsa(f"_{world.port}._tcp.wrong.mx.test", usage, selector, mtype, data)
    world.mx("dane-plain.test", "plain.mx.test", secure=True)
    world.dns.add_tlsa(f"_{world.port}._tcp.plain.mx.test", usage, selector, mtype, data)
    node = await make_node(world.config())
    await _deliver(node, "r@dane.test", cls="marketing")
    row = await first_outcome(tmp_path, "r@dane.test")
    assert row["type"] == "d", row
    assert row["dlvTlsPolicy"] == "dane" and row["dlvTlsAuth"] == "none", row
    assert row["dlvTlsProtocol"], row
    await _deliver(node, "r@dane-plain.test", cls="marketing")
    row = await first_outcome(tmp_path, "r@dane-plain.test")
    assert row["type"] == "t" and row["dsnStatus"] == "4.7.10", row
    assert len(world.sinks["plain.mx.test"].arrivals) == 0


async def test_a_malformed_tlsa_record_is_ignored_and_the_others_used(world, make_node,
                                                                      tmp_path):
    """RFC 7672 2.2: a malformed TLSA record (a SHA-256 digest of 20 bytes, not 32) is
    unusable and ignored; the RRset's other records apply. dnspython refused the whole answer
    (its resolver waited for one it could parse and timed out): the host's TLSA lookup
    "failed", the only MX was unusable and the message deferred. Now it goes with DANE-EE;
    a host whose RRset holds only malformed records gets TLS without authentication, never
    clear text; and without the AD bit the records are ignored, as before."""
    bad = bytes([3, 1, 1]) + b"\x5a" * 20
    world.mx("dane.test", "good.mx.test", secure=True)
    world.dns.add_raw(f"_{world.port}._tcp.good.mx.test", "TLSA", bad)
    world.tlsa("good.mx.test", 3, 1, leaf_der(world.certs["good.mx.test"][0]), port=world.port)
    world.mx("dane-bad.test", "wrong.mx.test", secure=True)
    world.dns.add_raw(f"_{world.port}._tcp.wrong.mx.test", "TLSA", bad)
    world.dns.add_raw(f"_{world.port}._tcp.wrong.mx.test", "TLSA", b"\x03")  # too short
    world.mx("dane-plain.test", "plain.mx.test", secure=True)
    world.dns.add_raw(f"_{world.port}._tcp.plain.mx.test", "TLSA", bad)
    world.mx("unsigned.test", "expired.mx.test")  # no AD bit: no DANE
    world.dns.add_raw(f"_{world.port}._tcp.expired.mx.test", "TLSA", bad)
    node = await make_node(world.config())
    for rcpt in ("r@dane.test", "r@dane-bad.test", "r@dane-plain.test", "r@unsigned.test"):
        await _deliver(node, rcpt, cls="marketing")
    row = await first_outcome(tmp_path, "r@dane.test")
    assert row["type"] == "d" and row["dlvTlsAuth"] == "dane-ee", row
    row = await first_outcome(tmp_path, "r@dane-bad.test")
    assert row["type"] == "d" and row["dlvTlsPolicy"] == "dane", row
    assert row["dlvTlsAuth"] == "none" and row["dlvTlsProtocol"], row
    row = await first_outcome(tmp_path, "r@dane-plain.test")
    assert row["type"] == "t" and row["dsnStatus"] == "4.7.10", row
    assert len(world.sinks["plain.mx.test"].arrivals) == 0
    row = await first_outcome(tmp_path, "r@unsigned.test")
    assert row["type"] == "d" and row["dlvTlsPolicy"] == "opportunistic", row
    node.tls_reports.flush()
    report = node.tls_reports.report(row["timeLogged"][:10], "dane.test")
    results = [d["result-type"] for p in report["policies"] for d in p.get("failure-details", [])]
    assert results == [], results


async def test_the_tlsa_lookups_of_the_mx_hosts_are_asked_together(world, make_node, tmp_path):
    """The TLSA records of a destination's MX hosts were looked up one after the other, each
    waiting for its answer: a domain whose MX hosts' TLSA lookups go unanswered held the
    delivery slot for ``dns.timeout`` per host at every attempt (a hostile one with dozens of
    MX hosts, minutes). They are now asked together. The test DNS server answers none until
    all three are asked: one at a time, the first two time out (counted as ``dnssec-invalid``)
    and the message goes to MX 30; together, all answer and MX 10 takes it."""
    hosts = ["good.mx.test", "wrong.mx.test", "expired.mx.test"]
    world.mx("dane.test", *hosts, secure=True)
    for host in hosts:  # DANE-EE: each host's own key, whatever its certificate's name or date
        world.tlsa(host, 3, 1, leaf_der(world.certs[host][0]), port=world.port)
    world.dns.hold_until_all_asked([f"_{world.port}._tcp.{h}" for h in hosts])
    node = await make_node(world.config())
    await _deliver(node, "r@dane.test", cls="marketing")
    row = await first_outcome(tmp_path, "r@dane.test", timeout=60)
    assert row["type"] == "d" and row["dlvTlsAuth"] == "dane-ee", row
    assert len(world.sinks["good.mx.test"].arrivals) == 1
    node.tls_reports.flush()
    report = node.tls_reports.report(row["timeLogged"][:10], "dane.test")
    results = [d["result-type"] for p in report["policies"] for d in p.get("failure-details", [])]
    assert results == [], results


async def test_tlsa_without_the_ad_bit_is_ignored(world, make_node, tmp_path):
    world.mx("dane.test", "good.mx.test")  # not signed: no AD, so no DANE
    world.tlsa("good.mx.test", 3, 1, leaf_der(world.certs["wrong.mx.test"][0]), port=world.port)
    assert (await delivered_with(world, make_node, "r@dane.test"))["dlvTlsPolicy"] == \
        "opportunistic"


async def test_dane_takes_precedence_over_mta_sts(world, make_node, tmp_path):
    world.mx("both.test", "good.mx.test", secure=True)
    world.sts("both.test", "enforce", ["mx.elsewhere.test"])  # would refuse the MX
    world.tlsa("good.mx.test", 3, 1, leaf_der(world.certs["good.mx.test"][0]), port=world.port)
    assert (await delivered_with(world, make_node, "r@both.test"))["dlvTlsPolicy"] == "dane"
    assert world.https is not None and "mta-sts.both.test" not in world.https.fetches



async def _dane_host(world: World, host: str, ip: str, cert: Path, key: Path,
                     spki: bytes) -> None:
    """A sink at ``ip`` serving ``cert``, the MX of dane.test (signed), with a ``3 1 1`` TLSA
    record of ``spki`` as the certificate carries it."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    world.sinks[host] = await Sink(host=ip, port=world.port, tls_context=ctx).start()
    world.dns.add_a(host, ip)
    world.mx("dane.test", host, secure=True)
    world.dns.add_tlsa(f"_{world.port}._tcp.{host}", 3, 1, 1, hashlib.sha256(spki).hexdigest())


async def test_dane_ee_takes_a_certificate_our_parser_refuses(world, make_node, tmp_path):
    """RFC 6698 2.1.1: selector 1 is the SubjectPublicKeyInfo as the certificate carries it;
    DANE-EE checks nothing else (RFC 7672 3.1.1). It was taken from ``cryptography``'s parse
    of the whole certificate: one that OpenSSL served but ``cryptography`` refused raised out
    of the TLS policy and killed the lane's delivery worker, the message left without an
    outcome."""
    cert, key, spki = explicit_version_one(tmp_path / "odd", "odd.mx.test")
    await _dane_host(world, "odd.mx.test", "127.0.0.57", cert, key, spki)
    row = await delivered_with(world, make_node, "r@dane.test")
    assert row["dlvTlsPolicy"] == "dane" and row["dlvTlsAuth"] == "dane-ee"


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
async def test_dane_ee_matches_an_rsa_pss_key_as_published(world, make_node, tmp_path):
    """An RSA-PSS key's SubjectPublicKeyInfo names id-RSASSA-PSS; ``cryptography`` re-encodes
    the key as rsaEncryption, so the ``3 1 1`` record an operator makes with ``openssl x509
    -pubkey`` never matched and the host's mail was deferred for ever (tlsa-invalid)."""
    folder = tmp_path / "pss"
    folder.mkdir()
    cert, key = folder / "pss.crt", folder / "pss.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa-pss", "-pkeyopt",
                    "rsa_keygen_bits:2048", "-nodes", "-days", "30", "-subj", "/CN=pss.mx.test",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    pem = subprocess.run(["openssl", "x509", "-in", str(cert), "-noout", "-pubkey"],
                         check=True, capture_output=True).stdout
    spki = subprocess.run(["openssl", "pkey", "-pubin", "-outform", "DER"], input=pem,
                          check=True, capture_output=True).stdout
    await _dane_host(world, "pss.mx.test", "127.0.0.58", cert, key, spki)
    row = await delivered_with(world, make_node, "r@dane.test")
    assert row["dlvTlsPolicy"] == "dane" and row["dlvTlsAuth"] == "dane-ee"


ALIAS, TARGET = "mx.example", "mail.provider.example"
"""An MX host that is a CNAME to its provider's host (RFC 7672 2.2.3)."""


async def _provider_host(world: World, cert_name: str, *, alias_signed: bool = True,
                         target_signed: bool = True) -> tuple[bytes, list[str | None]]:
    """cname.test's MX is ALIAS, a CNAME to TARGET: a sink at 127.0.0.61 whose certificate,
    for ``cert_name`` only, the test CA's intermediate signed. (The DER of that certificate,
    the SNI names its handshakes were sent.)"""
    cert, key = world.intermediate.issue([cert_name], file_name="provider")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    sni: list[str | None] = []
    ctx.sni_callback = lambda _sock, name, _ctx: sni.append(name)
    world.sinks[TARGET] = await Sink(host="127.0.0.61", port=world.port,
                                     tls_context=ctx).start()
    world.dns.add_mx("cname.test", 10, ALIAS)
    world.dns.add_cname(ALIAS, TARGET)
    world.dns.add_a(TARGET, "127.0.0.61")
    world.dns.set_secure("cname.test")
    if alias_signed:
        world.dns.set_secure(ALIAS)
    if target_signed:
        world.dns.set_secure("provider.example")
    return leaf_der(cert), sni


@pytest.mark.parametrize("usage, cert_name, alias_tlsa, auth", [
    (3, TARGET, False, "dane-ee"),
    (3, TARGET, True, "dane-ee"),
    (2, TARGET, False, "dane-ta"),  # the expanded name is a reference identifier (3.2.2)
    (2, ALIAS, True, "dane-ta"),  # and so is the MX host's own name
])
async def test_tlsa_of_a_secure_cname_target_is_used(world, make_node, tmp_path, usage,
                                                     cert_name, alias_tlsa, auth):
    """RFC 7672 2.2.3: an MX host whose addresses are reached through a secure CNAME chain
    has its TLSA records looked up at the chain's target first. They were looked up only at
    the MX host's name: where a provider's customer publishes none there, the mail went
    without DANE (opportunistic); where a record there did not match, it was deferred. Now
    the target's records apply and the MX host's name is not asked once the target has
    some; SNI names the target (RFC 7672 8.1)."""
    der, sni = await _provider_host(world, cert_name)
    world.tlsa(TARGET, usage, 0, der if usage == 3 else world.intermediate.der,
               port=world.port)
    if alias_tlsa:  # a record the server does not match
        world.tlsa(ALIAS, 3, 1, leaf_der(world.certs["wrong.mx.test"][0]), port=world.port)
    row = await delivered_with(world, make_node, "r@cname.test")
    assert row["dlvTlsPolicy"] == "dane" and row["dlvTlsAuth"] == auth, row
    assert len(world.sinks[TARGET].arrivals) == 1
    assert sni == [TARGET]


async def test_tlsa_of_a_cname_is_looked_up_at_the_mx_name_when_the_target_has_none(
        world, make_node, tmp_path):
    """RFC 7672 2.2.3: no TLSA records at the CNAME's target (NXDOMAIN, secure): those of
    the MX host's own name apply, and SNI names it."""
    der, sni = await _provider_host(world, TARGET)
    world.tlsa(ALIAS, 3, 1, der, port=world.port)
    row = await delivered_with(world, make_node, "r@cname.test")
    assert row["dlvTlsPolicy"] == "dane" and row["dlvTlsAuth"] == "dane-ee", row
    assert sni == [ALIAS]


@pytest.mark.parametrize("alias_signed, target_signed", [(False, True), (True, False)])
async def test_tlsa_of_an_insecure_cname_target_is_not_used(world, make_node, tmp_path,
                                                            alias_signed, target_signed):
    """A CNAME chain with an unsigned link: the host's addresses come without AD, so the
    target's TLSA records are not used (RFC 7672 2.2.2); an unsigned alias is not in a
    signed zone, so DANE does not apply at all, and a signed alias with no records of its
    own has none to apply (the next test has some)."""
    der, sni = await _provider_host(world, TARGET, alias_signed=alias_signed,
                                    target_signed=target_signed)
    world.tlsa(TARGET, 3, 1, der, port=world.port)
    row = await delivered_with(world, make_node, "r@cname.test")
    assert row["dlvTlsPolicy"] == "opportunistic" and row["dlvTlsAuth"] == "none", row
    assert sni == [ALIAS]

@pytest.mark.parametrize("matching", [True, False])
async def test_tlsa_of_a_secure_cname_to_an_unsigned_zone_is_used_at_the_mx_name(
        world, make_node, tmp_path, matching):
    """RFC 7672 2.2.2: an MX host that is a signed CNAME into an unsigned zone (a customer's
    signed ``mx.example`` pointing at a provider that does not sign) is in a signed zone,
    so DANE applies to it at its own name: only the target's records, which cannot be
    authenticated, are out. The host's address answer has no AD, and neither name's records
    were used: a record at the MX name that the server does not match let the mail go
    unauthenticated. Now it is DANE-EE (SNI names the MX host) or, not matching, deferred."""
    der, sni = await _provider_host(world, TARGET, target_signed=False)
    world.tlsa(ALIAS, 3, 1, der if matching else leaf_der(world.certs["wrong.mx.test"][0]),
               port=world.port)
    node = await make_node(world.config())
    await _deliver(node, "r@cname.test", cls="marketing")
    row = await first_outcome(tmp_path, "r@cname.test")
    if matching:
        assert row["type"] == "d", row
        assert row["dlvTlsPolicy"] == "dane" and row["dlvTlsAuth"] == "dane-ee", row
        assert sni == [ALIAS]
    else:
        assert row["type"] == "t" and "TLS policy dane" in row["dsnDiag"], row
        assert world.sinks[TARGET].arrivals == []


# -- TLS-RPT -------------------------------------------------------------------------------------

# RFC 8460 section 4.4 as a JSON Schema: the fields, their types, the required ones, the
# policy types and the result types of section 4.3.2 (with the IANA registry's additions).
TLSRPT_SCHEMA = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "required": ["organization-name", "date-range", "contact-info", "report-id", "policies"],
    "properties": {
        "organization-name": {"type": "string", "minLength": 1},
        "date-range": {
            "type": "object", "required": ["start-datetime", "end-datetime"],
            "properties": {"start-datetime": {"type": "string", "format": "date-time"},
                           "end-datetime": {"type": "string", "format": "date-time"}}},
        "contact-info": {"type": "string", "minLength": 1},
        "report-id": {"type": "string", "minLength": 1},
        "policies": {"type": "array", "minItems": 1, "items": {
            "type": "object", "required": ["policy", "summary"],
            "properties": {
                "policy": {
                    "type": "object", "required": ["policy-type", "policy-domain"],
                    "properties": {
                        "policy-type": {"enum": ["tlsa", "sts", "no-policy-found"]},
                        "policy-string": {"type": "array", "items": {"type": "string"}},
                        "policy-domain": {"type": "string", "minLength": 1},
                        "mx-host": {"type": "array", "items": {"type": "string"}}},
                    "additionalProperties": False},
                "summary": {
                    "type": "object",
                    "required": ["total-successful-session-count",
                                 "total-failure-session-count"],
                    "properties": {
                        "total-successful-session-count": {"type": "integer", "minimum": 0},
                        "total-failure-session-count": {"type": "integer", "minimum": 0}},
                    "additionalProperties": False},
                "failure-details": {"type": "array", "items": {
                    "type": "object", "required": ["result-type", "failed-session-count"],
                    "properties": {
                        "result-type": {"enum": [
                            "starttls-not-supported", "certificate-host-mismatch",
                            "certificate-expired", "certificate-not-trusted",
                            "validation-failure", "tlsa-invalid", "dnssec-invalid",
                            "dane-required", "sts-policy-fetch-error", "sts-policy-invalid",
                            "sts-webpki-invalid"]},
                        "sending-mta-ip": {"type": "string", "anyOf": [
                            {"format": "ipv4"}, {"format": "ipv6"}]},
                        "receiving-mx-hostname": {"type": "string"},
                        "receiving-mx-helo": {"type": "string"},
                        "receiving-ip": {"type": "string", "anyOf": [
                            {"format": "ipv4"}, {"format": "ipv6"}]},
                        "failed-session-count": {"type": "integer", "minimum": 1},
                        "additional-information": {"type": "string"},
                        "failure-reason-code": {"type": "string"}},
                    "additionalProperties": False}}},
            "additionalProperties": False}}},
    "additionalProperties": False}


def validate(report: dict | None) -> None:
    assert report is not None
    jsonschema.validate(report, TLSRPT_SCHEMA, format_checker=jsonschema.FormatChecker())


async def test_daily_report_by_mail_and_https(world, make_node, tmp_path):
    world.mx("sts-testing.test", "wrong.mx.test")
    world.sts("sts-testing.test", "testing", ["*.mx.test"])
    world.mx("reports.test", "plain.mx.test")
    assert world.https is not None
    world.dns.add_txt("_smtp._tls.sts-testing.test",
                      f"v=TLSRPTv1; rua=mailto:tlsrpt@reports.test,"
                      f"https://{HTTPS_IP}:{world.https.port}/tlsrpt")
    world.mx("quiet.test", "good.mx.test")  # no _smtp._tls record: no report
    node = await make_node(world.config())
    await _deliver(node, "a@sts-testing.test", cls="marketing")
    await _deliver(node, "b@quiet.test", cls="marketing")
    for rcpt in ("a@sts-testing.test", "b@quiet.test"):
        assert (await first_outcome(tmp_path, rcpt))["type"] == "d"
    sent = await node.tls_reports.send_due(before="9999-12-31")  # as after midnight
    assert sent == 2
    [posted] = world.https.posted
    assert posted.content_type == "application/tlsrpt+gzip"
    validate(json.loads(gzip.decompress(posted.body)))
    sink = world.sinks["plain.mx.test"]
    [arrival] = await sink.wait_for(1)
    assert arrival.rcpts == ["tlsrpt@reports.test"]
    mail = email.message_from_bytes(arrival.data)
    assert mail.get_content_type() == "multipart/report"
    assert mail.get_param("report-type") == "tlsrpt"
    assert mail["TLS-Report-Domain"] == "sts-testing.test"
    assert mail["Subject"].startswith("Report Domain: sts-testing.test Submitter: mta.test")
    [part] = [p for p in mail.walk() if p.get_content_type() == "application/tlsrpt+gzip"]
    assert part.get_filename().endswith(".json.gz") and "!sts-testing.test!" in \
        part.get_filename()
    report = json.loads(gzip.decompress(part.get_payload(decode=True)))
    validate(report)
    assert report["organization-name"] == "Insurer Test"
    assert report["policies"][0]["summary"] == {"total-successful-session-count": 0,
                                                "total-failure-session-count": 1}
    assert await node.tls_reports.send_due(before="9999-12-31") == 0, "sent once"



async def test_only_a_tlsrpt_record_of_version_1_asks_for_reports(world, make_node, tmp_path):
    """RFC 8460 3: the record is ``v=TLSRPTv1`` then ``;`` and fields; ``v=TLSRPTv10`` (a
    future version, whose ``rua`` may mean something else) was read as version 1."""
    world.mx("sts-testing.test", "wrong.mx.test")
    world.sts("sts-testing.test", "testing", ["*.mx.test"])
    assert world.https is not None
    world.dns.add_txt("_smtp._tls.sts-testing.test",
                      f"v=TLSRPTv10; rua=https://{HTTPS_IP}:{world.https.port}/tlsrpt")
    node = await make_node(world.config())
    await _deliver(node, "a@sts-testing.test", cls="marketing")
    assert (await first_outcome(tmp_path, "a@sts-testing.test"))["type"] == "d"
    assert await node.tls_reports.send_due(before="9999-12-31") == 0
    assert world.https.posted == []

async def test_a_report_endpoint_that_drips_its_answer_does_not_hold_the_reports(
        world, make_node, tmp_path):
    """RFC 8460 5.3.1: a 2xx answer to the POST is success; its body means nothing. The
    report was POSTed with ``client.post``, which reads the whole answer, its timeout per read:
    an endpoint sending a byte now and then held ``send_due`` - and every domain's report after
    it - for as long as it liked, and one sending without end filled the memory."""
    drip = await DripReply(world.ca.server_context(["127.0.0.62"])).start("127.0.0.62")
    try:
        world.mx("sts-testing.test", "wrong.mx.test")
        world.sts("sts-testing.test", "testing", ["*.mx.test"])
        world.dns.add_txt("_smtp._tls.sts-testing.test",
                          f"v=TLSRPTv1; rua=https://127.0.0.62:{drip.port}/tlsrpt")
        node = await make_node(world.config())
        await _deliver(node, "a@sts-testing.test", cls="marketing")
        assert (await first_outcome(tmp_path, "a@sts-testing.test"))["type"] == "d"
        assert await node.tls_reports.send_due(before="9999-12-31") == 1
        assert drip.posts == 1
        assert drip.sent < drip.size, "the answer's body was waited for"
    finally:
        drip.stop()


@pytest.mark.parametrize("case", ["sts-expired", "sts-handshake", "dane-mismatch"])
async def test_a_mailed_report_is_delivered_despite_the_tls_failures_of_its_rua_domain(
        world, make_node, tmp_path, case):
    """RFC 8460 3: reports are delivered despite any TLS failure, and their delivery is not
    counted. The rua domain's MTA-STS is enforce (its MX certificate expired, or its handshake
    failing) or its TLSA records do not match: the report goes with unauthenticated TLS, or in
    clear on a new connection, while an ordinary message to that domain is still deferred."""
    world.mx("quiet.test", "plain.mx.test")  # the reported domain
    if case == "dane-mismatch":
        rua, host, auth, tls = "dane.test", "good.mx.test", "none", True
        world.mx(rua, host, secure=True)
        world.tlsa(host, 3, 1, leaf_der(world.certs["wrong.mx.test"][0]), port=world.port)
    else:
        rua = "sts.test"
        host, auth, tls = (("expired.mx.test", "none", True) if case == "sts-expired"
                           else ("broken.mx.test", "", False))
        world.mx(rua, host)
        world.sts(rua, "enforce", ["*.mx.test"])
    world.dns.add_txt("_smtp._tls.quiet.test", f"v=TLSRPTv1; rua=mailto:tlsrpt@{rua}")
    node = await make_node(world.config())
    await _deliver(node, "a@quiet.test", cls="marketing")
    assert (await first_outcome(tmp_path, "a@quiet.test"))["type"] == "d"
    assert await node.tls_reports.send_due(before="9999-12-31") == 1
    row = await first_outcome(tmp_path, f"tlsrpt@{rua}")
    assert row["type"] == "d", row
    assert row["dlvTlsPolicy"] == "tlsrpt" and row["dlvTlsAuth"] == auth, row
    assert bool(row["dlvTlsProtocol"]) is tls, row
    [arrival] = await world.sinks[host].wait_for(1)
    assert email.message_from_bytes(arrival.data)["TLS-Report-Domain"] == "quiet.test"
    # the report's sessions are not counted: the rua domain has no figures
    node.tls_reports.flush()
    assert node.tls_reports.report(row["timeLogged"][:10], rua) is None
    # an ordinary message to the rua domain is still held to the domain's policy (and counted)
    await _deliver(node, f"o@{rua}", cls="marketing")
    row = await first_outcome(tmp_path, f"o@{rua}")
    assert row["type"] == "t" and row["dsnStatus"].startswith("4.7."), row
    await asyncio.sleep(0.5)
    assert len(world.sinks[host].arrivals) == 1
    node.tls_reports.flush()
    report = node.tls_reports.report(row["timeLogged"][:10], rua)
    validate(report)
    assert report is not None and report["policies"][0]["summary"][
        "total-successful-session-count"] == 0


async def test_a_report_goes_alone_on_its_own_connection(world, make_node, tmp_path):
    """Ordinary mail queued for the rua domain while the report's relaxed connection is open
    (one connection for the pool, so it waits for that one) is never sent on it: the report's
    connection is closed after the report, and the mail is held to the domain's MTA-STS
    enforce policy on a connection of its own (deferred: the certificate has expired)."""
    world.mx("quiet.test", "good.mx.test")
    world.mx("sts.test", "expired.mx.test")
    world.sts("sts.test", "enforce", ["*.mx.test"])
    world.dns.add_txt("_smtp._tls.quiet.test", "v=TLSRPTv1; rua=mailto:tlsrpt@sts.test")
    sink = world.sinks["expired.mx.test"]
    sink.delay = 1.5  # the report's DATA is answered late: the ordinary mail queues meanwhile
    node = await make_node(world.config().replace('ehlo = "bulk.test", max_smtp_out = 4',
                                                  'ehlo = "bulk.test", max_smtp_out = 1'))
    await _deliver(node, "a@quiet.test", cls="marketing")
    assert (await first_outcome(tmp_path, "a@quiet.test"))["type"] == "d"
    assert await node.tls_reports.send_due(before="9999-12-31") == 1
    await until(lambda: sink.connections >= 2, what="the report's unverified connection")
    await asyncio.sleep(0.3)
    for i in range(3):
        await _deliver(node, f"o{i}@sts.test", cls="marketing")
    assert (await first_outcome(tmp_path, "tlsrpt@sts.test"))["type"] == "d"
    for i in range(3):
        assert (await first_outcome(tmp_path, f"o{i}@sts.test"))["type"] == "t"
    await asyncio.sleep(0.5)
    assert [a.rcpts for a in sink.arrivals] == [["tlsrpt@sts.test"]]


# -- evidence ----------------------------------------------------------------------------------

async def test_audit_show_and_sla_tell_how_each_delivery_was_protected(world, make_node,
                                                                       tmp_path):
    world.mx("dane.test", "good.mx.test", secure=True)
    world.tlsa("good.mx.test", 3, 1, leaf_der(world.certs["good.mx.test"][0]), port=world.port)
    world.mx("plain.test", "plain.mx.test")
    node = await make_node(world.config())
    await _deliver(node, "r@dane.test")
    await _deliver(node, "r@plain.test")
    for rcpt in ("r@dane.test", "r@plain.test"):
        assert (await first_outcome(tmp_path, rcpt))["type"] == "d"
    await node.flush_evidence()
    db = str(node.audit.path)
    runner = CliRunner()
    res = await asyncio.to_thread(runner.invoke, app, ["audit", "show", "--db", db,
                                                       "--recipient", "r@dane.test"])
    assert "authenticated (DANE-EE), policy dane" in res.output, res.output
    res = await asyncio.to_thread(runner.invoke, app, ["audit", "show", "--db", db,
                                                       "--recipient", "r@plain.test"])
    assert "no TLS, policy opportunistic" in res.output, res.output
    res = await asyncio.to_thread(runner.invoke, app, [
        "audit", "sla", "--db", db, "--from", "2000-01-01", "--to", "2100-01-01", "--format",
        "json"])
    tls = json.loads(res.output)["classes"]["policy-documents"]["tls"]
    assert tls == {"encrypted": 1, "authenticated": 1, "encrypted_share": 0.5,
                   "authenticated_share": 0.5}


async def test_mta_sts_still_holds_for_an_mx_without_tlsa_records(world, make_node, tmp_path):
    """DANE applies per MX host: a host with TLSA records is held to them, a host without them
    to the domain's MTA-STS policy. MTA-STS was looked up only when no MX host had TLSA
    records, so one DANE MX switched the policy off for the others: here MX 10 (DANE) fails its
    TLSA check, and MX 20, which has no TLSA records and a certificate for another name, got the
    message under ``opportunistic`` although the domain's MTA-STS policy is ``enforce``."""
    world.mx("both.test", "good.mx.test", "wrong.mx.test", secure=True)
    world.sts("both.test", "enforce", ["*.mx.test"])
    world.tlsa("good.mx.test", 3, 1, leaf_der(world.certs["wrong.mx.test"][0]), port=world.port)
    node = await make_node(world.config())
    await _deliver(node, "r@both.test", cls="marketing")
    row = await first_outcome(tmp_path, "r@both.test")
    assert row["type"] == "t" and row["dsnStatus"] == "4.7.5", row
    assert "mta-sts-enforce" in row["dsnDiag"], row
    await asyncio.sleep(0.5)  # a bound after the deferral record: no sink receives it later
    assert world.arrivals() == 0


async def test_failed_tlsa_lookups_are_not_blamed_on_mta_sts(world, make_node, tmp_path):
    """Every MX host's TLSA lookup SERVFAILs: the deferral says so, nothing is sent in clear,
    and the domain's MTA-STS policy (which names the host) is not reported as failing. The
    policy was fetched for such a domain and the deferral read "MTA-STS policy of ... names
    none of its MX hosts", counted as a ``validation-failure`` of the policy."""
    world.mx("both.test", "good.mx.test", secure=True)
    world.sts("both.test", "enforce", ["good.mx.test"])
    world.dns.set_rcode(f"_{world.port}._tcp.good.mx.test", "SERVFAIL")
    node = await make_node(world.config())
    await _deliver(node, "r@both.test", cls="marketing")
    row = await first_outcome(tmp_path, "r@both.test")
    assert row["type"] == "t" and "TLSA lookups" in row["dsnDiag"], row
    node.tls_reports.flush()
    report = node.tls_reports.report(row["timeLogged"][:10], "both.test")
    results = [d["result-type"] for p in report["policies"] for d in p.get("failure-details", [])]
    assert "validation-failure" not in results and "dnssec-invalid" in results, results
    assert world.arrivals() == 0



async def _reporting_node(world, make_node, tmp_path, rua: str):
    """A node that delivered a message to sts-testing.test, whose TLS-RPT record lists
    ``rua`` (reports.test's MX is plain.mx.test)."""
    world.mx("sts-testing.test", "wrong.mx.test")
    world.sts("sts-testing.test", "testing", ["*.mx.test"])
    world.mx("reports.test", "plain.mx.test")
    world.dns.add_txt("_smtp._tls.sts-testing.test", f"v=TLSRPTv1; rua={rua}")
    node = await make_node(world.config())
    await _deliver(node, "a@sts-testing.test", cls="marketing")
    assert (await first_outcome(tmp_path, "a@sts-testing.test"))["type"] == "d"
    return node


@pytest.mark.parametrize("rua", [
    "mailto:tlsrpt@reports.test%0D%0A%20RCPT%20TO:%3Cother@reports.test%3E",  # CR LF
    "mailto:tlsrpt%3E%20NOTIFY=NEVER@reports.test",  # the path closed, a parameter added
    "mailto:",
    "mailto:no-at-sign",
    "mailto:a@reports.test%2Cb@reports.test",
])
async def test_a_malformed_mailto_rua_is_not_queued(world, make_node, tmp_path, caplog, rua):
    """The ``mailto:`` of a ``rua`` is the recipient domain's word, so anyone's: its address
    (percent-decoded) was queued as it was - with CR LF in it, an empty one, one without
    ``@`` - counted as a report sent, then bounced to our own ``mail_from``, its bogus
    recipient on the audit trail. It is now checked as strictly as the SMTP door checks a
    RCPT path: a malformed one is logged and skipped, the record's other targets still get
    the report."""
    node = await _reporting_node(world, make_node, tmp_path, f"{rua},mailto:tlsrpt@reports.test")
    assert await node.tls_reports.send_due(before="9999-12-31") == 1
    assert (await first_outcome(tmp_path, "tlsrpt@reports.test"))["type"] == "d"
    assert [a.rcpts for a in world.sinks["plain.mx.test"].arrivals] == [["tlsrpt@reports.test"]]
    rcpts = {r["rcpt"] for r in records(tmp_path)}
    assert rcpts == {"a@sts-testing.test", "tlsrpt@reports.test"}, rcpts
    assert any("not an address" in r.getMessage() for r in caplog.records), \
        [r.getMessage() for r in caplog.records]


@pytest.mark.parametrize("rua", ["https://[::1", "https://[127.0.0.63]/x", "https://",
                                 "https://127.0.0.63:99999/x"])
async def test_a_malformed_https_rua_does_not_stop_the_reports(world, make_node, tmp_path,
                                                               rua):
    """The scheme of each rua was read with ``urlsplit`` outside the per-target ``try``:
    ``https://[::1`` raised ValueError out of ``send_due``, so the record's other targets got
    nothing, the day was never forgotten, and every later round raised again before the
    domains after it in the loop were reached: one hostile ``_smtp._tls`` record stopped the
    node's reports to every domain."""
    node = await _reporting_node(world, make_node, tmp_path, f"{rua},mailto:tlsrpt@reports.test")
    assert await node.tls_reports.send_due(before="9999-12-31") == 1
    assert (await first_outcome(tmp_path, "tlsrpt@reports.test"))["type"] == "d"
    assert await node.tls_reports.send_due(before="9999-12-31") == 0, "the day forgotten"


async def test_a_rua_list_of_many_targets_is_cut_at_the_limit(world, make_node, tmp_path,
                                                              caplog):
    """RFC 8460 3 sets no limit on ``rua``, and the record is the recipient domain's word: a
    domain listing hundreds of ``mailto:`` targets (anyone's addresses) had the node mail each
    of them a report every day, from its own IPs. The first ``MAX_RUA`` (10) are used, and the
    cut is logged."""
    targets = [f"mailto:t{i}@reports.test" for i in range(30)]
    node = await _reporting_node(world, make_node, tmp_path, ','.join(targets))
    assert await node.tls_reports.send_due(before="9999-12-31") == 10
    arrivals = await world.sinks["plain.mx.test"].wait_for(10)
    assert sorted(r for a in arrivals for r in a.rcpts) == sorted(
        f"t{i}@reports.test" for i in range(10))
    assert any("30 rua targets, only the first 10 used" in r.getMessage() for r in caplog.records)
