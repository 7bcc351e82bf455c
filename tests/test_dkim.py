"""DKIM signing: signatures checked by dkimpy's verifier (an implementation that shares no code
with the signer) with keys looked up over real DNS on loopback; alignment, missing keys,
rotation, vanished key files, and a message signed end to end through a node."""

from __future__ import annotations

import asyncio
import email
import os
import signal
import smtplib
from pathlib import Path

import dkim as dkimpy
import dns.exception
import dns.resolver
import pytest

from postlane.accounting.records import Record
from postlane.config.model import parse_instant
from postlane.node import Node
from postlane.policy.dkim import (
    DKIMError,
    Signer,
    dns_record,
    generate_key,
    record_name,
    write_key,
)
from postlane.policy.headers import header_fields, normalize_newlines, split_message
from postlane.policy.intake import Rejection
from postlane.startup import ConfigError, load_config, parse_config
from tests.conftest import config_text, records, send
from tests.support.waiting import until

Q2 = parse_instant("2026-04-01")
Q3 = parse_instant("2026-07-01")  # in the past: dkimpy refuses signatures dated in the future


@pytest.fixture(scope="module")
def keys():
    """One RSA-2048 and one Ed25519 key for the whole module (RSA generation is slow)."""
    return {"rsa-sha256": generate_key("rsa-sha256"), "ed25519-sha256": generate_key(
        "ed25519-sha256")}


def key_entry(tmp_path: Path, keys: dict, domain: str, selector: str,
              algorithm: str = "rsa-sha256", extra: str = "") -> str:
    """Write the module key for ``algorithm`` to a 0600 file; return its [[dkim.keys]] TOML."""
    path = tmp_path / "keys" / f"{domain}.{selector}.{algorithm}.pem"
    if not path.exists():
        write_key(path, keys[algorithm])
    return (f'[[dkim.keys]]\ndomain = "{domain}"\nselector = "{selector}"\n'
            f'algorithm = "{algorithm}"\nkey_file = "{path}"\n{extra}\n')


def publish(dns_server, keys: dict, domain: str, selector: str,
            algorithm: str = "rsa-sha256") -> None:
    dns_server.add_txt(record_name(selector, domain), dns_record(keys[algorithm]))


def dnsfunc(server):
    """dkimpy's DNS hook, answered by the loopback DNS server through dnspython."""
    def get_txt(name, timeout=5):
        resolver = dns.resolver.Resolver(configure=False)
        resolver.nameservers = ["127.0.0.1"]
        resolver.port = server.port
        resolver.lifetime = timeout
        try:
            answer = resolver.resolve(name.decode() if isinstance(name, bytes) else name, "TXT")
        except dns.exception.DNSException:
            return None
        return b"".join(answer[0].strings)
    return get_txt


def verify(message: bytes, server) -> list[bool]:
    """dkimpy's verdict on every DKIM-Signature of the message, top first."""
    count = sum(1 for line in message.split(b"\r\n") if line.lower().startswith(
        b"dkim-signature:"))
    assert count, "message is not signed"
    return [_valid(message, i, server) for i in range(count)]


def _valid(message: bytes, idx: int, server) -> bool:
    try:
        return dkimpy.DKIM(message).verify(idx=idx, dnsfunc=dnsfunc(server))
    except dkimpy.DKIMException:
        return False


def make_signer(tmp_path, dkim_toml: str, *, clock=None, replace=None) -> tuple[Signer, list]:
    text = config_text(tmp_path, 2500, dkim_toml)
    for old, new in (replace or {}).items():
        text = text.replace(old, new)
    records: list[Record] = []
    signer = Signer(parse_config(text), records.append, **({"clock": clock} if clock else {}))
    return signer, records


async def sign_message(signer: Signer, data: bytes, cls: str = "policy-documents",
                       pool: str = "critical") -> bytes:
    data = normalize_newlines(data)
    head, body = split_message(data)
    sig, note = await signer.sign(header_fields(head), body, qid="Q1", cls=cls, pool=pool,
                                  mail_from="s@insurer.test", rcpts=["a@example.com"])
    assert bool(sig) != bool(note), "an unsigned message always has its reason noted"
    return sig + data


MESSAGES = {
    "plain": b"From: Notices <notices@insurer.test>\r\nTo: a@example.com\r\nSubject: hi\r\n"
             b"Date: Fri, 27 Nov 2026 18:00:00 +0000\r\nMessage-ID: <1@insurer.test>\r\n\r\n"
             b"Hello.\r\n",
    "8bit": "From: notices@insurer.test\r\nTo: a@example.com\r\nSubject: Police\r\n"
            "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n"
            "Content-Transfer-Encoding: 8bit\r\n\r\nSehr geehrte Frau Müller, Ihre Police "
            "für 2027 — 120 €.\r\n".encode(),
    "long-lines": b"From: notices@insurer.test\r\nTo: a@example.com\r\nSubject: long\r\n\r\n"
                  + (b"x" * 1500 + b"  \t trailing \t \r\n") * 3 + b"\r\n\r\n\r\n",
    "folded": b"From: Notices\r\n <notices@insurer.test>\r\nTo: a@example.com,\r\n\t"
              b"b@example.com\r\nSubject: a very\r\n   long    subject\r\n"
              b"List-Unsubscribe: <https://insurer.test/u/1>\r\n"
              b"List-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n\r\nBody\r\n",
    "empty-body": b"From: notices@insurer.test\r\nTo: a@example.com\r\nSubject: empty\r\n\r\n",
    "no-final-crlf": b"From: notices@insurer.test\r\nSubject: x\r\n\r\nlast line   ",
}


@pytest.mark.parametrize("canon", ["relaxed/relaxed", "simple/simple"])
@pytest.mark.parametrize("kind", sorted(MESSAGES))
async def test_dual_signatures_verify_with_dkimpy(tmp_path, keys, dns_server, kind, canon):
    signer, _ = make_signer(
        tmp_path, f'[dkim]\ncanonicalization = "{canon}"\n'
        + key_entry(tmp_path, keys, "insurer.test", "r1")
        + key_entry(tmp_path, keys, "insurer.test", "e1", "ed25519-sha256"))
    publish(dns_server, keys, "insurer.test", "r1")
    publish(dns_server, keys, "insurer.test", "e1", "ed25519-sha256")
    signed = await sign_message(signer, MESSAGES[kind])
    if not signed.endswith(b"\r\n"):
        signed += b"\r\n"  # as it arrives: the relay client ends DATA with CRLF
    assert verify(signed, dns_server) == [True, True]
    sigs = [v for k, v in email.message_from_bytes(signed).items() if k == "DKIM-Signature"]
    assert "a=rsa-sha256" in sigs[0] and "a=ed25519-sha256" in sigs[1]
    assert all(" l=" not in s and ";l=" not in s for s in sigs)
    signer.close()


async def test_tampering_breaks_the_signature_and_unsigned_headers_do_not(
        tmp_path, keys, dns_server):
    signer, _ = make_signer(tmp_path, "[dkim]\n" + key_entry(tmp_path, keys, "insurer.test", "r1"))
    publish(dns_server, keys, "insurer.test", "r1")
    signed = await sign_message(signer, MESSAGES["folded"])
    assert verify(signed, dns_server) == [True]
    assert verify(signed.replace(b"Body\r\n", b"B0dy\r\n"), dns_server) == [False]
    assert verify(signed.replace(b"long    subject", b"short subject"), dns_server) == [False]
    # From is over-signed: a second From added after signing breaks it
    head, _, body = signed.partition(b"\r\n\r\n")
    assert verify(head + b"\r\nFrom: evil@attacker.test\r\n\r\n" + body, dns_server) == [False]
    # a header outside h= may change (trace headers are added in transit)
    assert verify(b"Received: from relay\r\n" + signed, dns_server) == [True]
    h = email.message_from_bytes(signed)["DKIM-Signature"]
    tags = "".join(h.split())
    # the fields whose later addition changes meaning are over-signed, present or not
    assert ("h=from:from:sender:reply-to:to:to:cc:subject:subject:date:list-unsubscribe:"
            "list-unsubscribe:list-unsubscribe-post:list-unsubscribe-post;") in tags
    signer.close()


async def test_missing_key_refused_for_sla_classes_unsigned_for_best_effort(tmp_path, keys):
    signer, _ = make_signer(tmp_path, "[dkim]\n" + key_entry(tmp_path, keys, "insurer.test", "r1"))
    other = MESSAGES["plain"].replace(b"notices@insurer.test", b"x@elsewhere.test")
    with pytest.raises(Rejection) as err:
        await sign_message(signer, other)
    assert err.value.code == 550 and err.value.text.startswith("5.7.1")
    assert "no DKIM key for From domain elsewhere.test" in err.value.text
    unsigned = await sign_message(signer, other, cls="marketing", pool="bulk")
    assert unsigned == normalize_newlines(other)
    assert (signer.stats.refused, signer.stats.unsigned) == (1, 1)
    signer.close()
    strict, _ = make_signer(tmp_path, '[dkim]\nclass_on_missing_key = { marketing = "refuse" }\n'
                            + key_entry(tmp_path, keys, "insurer.test", "r1"))
    with pytest.raises(Rejection):
        await sign_message(strict, other, cls="marketing", pool="bulk")
    with pytest.raises(Rejection, match="more than one From"):
        await sign_message(strict, b"From: a@insurer.test\r\n" + MESSAGES["plain"])
    strict.close()


async def test_alignment_strict_refuses_subdomain_relaxed_signs_org_domain(
        tmp_path, keys, dns_server):
    sub = MESSAGES["plain"].replace(b"notices@insurer.test", b"notices@mail.insurer.test")
    key = key_entry(tmp_path, keys, "insurer.test", "r1")
    strict, _ = make_signer(tmp_path, "[dkim]\n" + key)
    with pytest.raises(Rejection, match="no DKIM key for From domain mail.insurer.test"):
        await sign_message(strict, sub)
    strict.close()
    relaxed, _ = make_signer(tmp_path, '[dkim]\nalignment = "relaxed"\n' + key)
    publish(dns_server, keys, "insurer.test", "r1")
    signed = await sign_message(relaxed, sub)
    assert "d=insurer.test;" in email.message_from_bytes(signed)["DKIM-Signature"]
    assert verify(signed, dns_server) == [True]
    relaxed.close()


async def test_pool_signing_domain_is_its_separate_identity(tmp_path, keys, dns_server):
    pool_fields = {"[pools.bulk]\n": '[pools.bulk]\nsigning_domain = "news-insurer.test"\n'
                                     'return_path_domain = "bounces.news-insurer.test"\n'}
    signer, _ = make_signer(tmp_path, "[dkim]\n"
                            + key_entry(tmp_path, keys, "insurer.test", "r1")
                            + key_entry(tmp_path, keys, "news-insurer.test", "n1"),
                            replace=pool_fields)
    publish(dns_server, keys, "news-insurer.test", "n1")
    news = MESSAGES["plain"].replace(b"notices@insurer.test", b"offers@news-insurer.test")
    signed = await sign_message(signer, news, cls="marketing", pool="bulk")
    assert "d=news-insurer.test;" in email.message_from_bytes(signed)["DKIM-Signature"]
    assert verify(signed, dns_server) == [True]
    with pytest.raises(Rejection) as err:  # the transactional domain cannot ride the bulk pool
        await sign_message(signer, MESSAGES["plain"], cls="marketing", pool="bulk")
    assert err.value.code == 550
    assert "not aligned (strict) with the signing domain news-insurer.test of pool bulk" \
        in err.value.text
    signer.close()


async def test_rotation_switches_selector_at_not_before(tmp_path, keys, dns_server):
    now = [Q2 + 86400]
    dkim_toml = ("[dkim]\n"
                 + key_entry(tmp_path, keys, "insurer.test", "2026q2",
                             extra="not_before = 2026-04-01\nretire_after = 2026-07-12")
                 + key_entry(tmp_path, keys, "insurer.test", "2026q3",
                             extra="not_before = 2026-07-01T00:00:00Z"))
    signer, _ = make_signer(tmp_path, dkim_toml, clock=lambda: now[0])
    publish(dns_server, keys, "insurer.test", "2026q2")
    publish(dns_server, keys, "insurer.test", "2026q3")

    def selector(msg: bytes) -> str:
        return "".join(email.message_from_bytes(msg)["DKIM-Signature"].split()).split(
            "s=")[1].split(";")[0]

    assert selector(await sign_message(signer, MESSAGES["plain"])) == "2026q2"
    now[0] = Q3 - 1
    assert selector(await sign_message(signer, MESSAGES["plain"])) == "2026q2"
    now[0] = Q3
    signed = await sign_message(signer, MESSAGES["plain"])
    assert selector(signed) == "2026q3"
    assert verify(signed, dns_server) == [True]
    signer.close()


def test_rotation_window_shorter_than_message_lifetime_is_a_config_error(tmp_path, keys):
    text = config_text(tmp_path, 2500, "[dkim]\n"
                       + key_entry(tmp_path, keys, "insurer.test", "a",
                                   extra="not_before = 2026-10-01\nretire_after = 2027-01-01")
                       + key_entry(tmp_path, keys, "insurer.test", "b",
                                   extra="not_before = 2027-01-01\npools = ['nope']"))
    with pytest.raises(ConfigError) as err:
        parse_config(text.replace("pools = ['nope']", ""))
    assert any("dkim.keys[0].retire_after" in e and "2027-01-01 01:00" in e
               for e in err.value.errors), err.value.errors
    with pytest.raises(ConfigError) as err:
        parse_config(text)
    assert "dkim.keys[1].pools: no pool named 'nope'" in err.value.errors


def test_missing_or_open_key_file_stops_the_node_and_config_check(tmp_path, keys):
    entry = key_entry(tmp_path, keys, "insurer.test", "r1")
    path = tmp_path / "keys" / "insurer.test.r1.rsa-sha256.pem"
    cfg_file = tmp_path / "node.toml"
    cfg_file.write_text(config_text(tmp_path, 2500, "[dkim]\n" + entry))
    assert load_config(cfg_file).dkim.keys[0].key_file == str(path)
    os.chmod(path, 0o644)
    with pytest.raises(ConfigError) as err:
        load_config(cfg_file)
    assert err.value.errors == [f"dkim.keys[0].key_file: key file {path} is readable by"
                                f" group/others (mode 0644); run: chmod 600 {path}"]
    path.unlink()
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(cfg_file)
    with pytest.raises(DKIMError, match=r"cannot start: dkim.keys\[0\] \(insurer.test r1\): key"
                                        r" file .* does not exist"):
        Node(parse_config(cfg_file.read_text()))


async def test_key_file_vanishing_at_run_time_gives_451_and_a_record(tmp_path, keys, caplog):
    signer, records = make_signer(tmp_path, "[dkim]\nkey_check_interval = 0\n"
                                  + key_entry(tmp_path, keys, "insurer.test", "r1"))
    path = tmp_path / "keys" / "insurer.test.r1.rsa-sha256.pem"
    assert await sign_message(signer, MESSAGES["plain"]) != MESSAGES["plain"]
    moved = path.with_suffix(".away")
    path.rename(moved)
    for _ in range(3):
        with pytest.raises(Rejection) as err:
            await sign_message(signer, MESSAGES["plain"])
    assert err.value.reply.startswith("451 4.3.0 DKIM key r1._domainkey.insurer.test is"
                                      " unavailable")
    rec = records[0]
    assert (rec.type, rec.dsn_status, rec.rcpt, rec.queue_id) == ("t", "4.3.0", "a@example.com",
                                                                 "Q1")
    moved.rename(path)  # restored: signing resumes without a restart
    assert (await sign_message(signer, MESSAGES["plain"])).startswith(b"DKIM-Signature:")
    signer.close()
    # the log tells it once when the key went missing, once when it came back
    told = [r for r in caplog.records if getattr(r, "degraded", None) == "dkim_key"]
    assert [r.event for r in told] == ["start", "end"]
    assert "451" in told[0].effect and "insurer.test" in told[0].effect
    assert told[1].refusals == 3


async def _a_dsn(tmp_path, keys, sink, make_node, dns_server, node_fields: str):
    """The DSN a node whose ``[node]`` starts ``node_fields`` (strict alignment, a key for
    insurer.test only) sends for a hard bounce, and the node."""
    text = config_text(tmp_path, sink.port, "[dkim]\n"
                       + key_entry(tmp_path, keys, "insurer.test", "r1"))
    text = text.replace('hostname = "mta.test"', node_fields)
    text = text.replace("[routes]\n", f'[routes]\n"insurer.test" = "127.0.0.1:{sink.port}"\n')
    sink.rcpt_replies = {"hard@example.com": ["550 5.1.1 no such user"]}
    publish(dns_server, keys, "insurer.test", "r1")
    node = await make_node(text)
    data = MESSAGES["plain"].replace(b"Subject:", b"X-Postlane-Class: policy-documents\r\n"
                                                  b"Subject:", 1)
    await send(node.listeners[0].port, "notices@insurer.test", ["hard@example.com"], data)
    [bounce] = await sink.wait_for(1)
    assert bounce.rcpts == ["notices@insurer.test"]
    return bounce, node


async def test_a_dsn_is_signed_by_the_organisations_key_when_the_hostname_has_none(
        tmp_path, keys, sink, make_node, dns_server):
    """Strict alignment, a key for insurer.test only, the node called mta.insurer.test: its
    DSNs (From MAILER-DAEMON@mta.insurer.test) went out unsigned, with a warning each; they
    are signed d=insurer.test now (a DKIM pass, aligned relaxed)."""
    bounce, node = await _a_dsn(tmp_path, keys, sink, make_node, dns_server,
                                'hostname = "mta.insurer.test"')
    head = email.message_from_bytes(bounce.data)
    assert head["From"].endswith("@mta.insurer.test>") and "d=insurer.test" in head[
        "DKIM-Signature"]
    assert _valid(bounce.data, 0, dns_server)  # the top one (the original's is quoted below)
    assert node.status()["dkim"]["unsigned"] == 0
    await node.stop()


async def test_a_dsn_comes_from_the_configured_postmaster_signed_aligned(
        tmp_path, keys, sink, make_node, dns_server):
    """A node named outside its sending domain (the README's mta.example for insurer.example)
    sent its DSNs from MAILER-DAEMON@mta.example, unsigned with a warning each; with
    ``node.postmaster`` set (``postlane init`` sets it) they come from that address, signed
    with its domain's key: aligned strict."""
    bounce, node = await _a_dsn(tmp_path, keys, sink, make_node, dns_server,
                                'hostname = "mta.test"\npostmaster = "postmaster@insurer.test"')
    head = email.message_from_bytes(bounce.data)
    assert head["From"] == "Mail Delivery System <postmaster@insurer.test>"
    assert "d=insurer.test" in head["DKIM-Signature"] and _valid(bounce.data, 0, dns_server)
    assert node.status()["dkim"]["unsigned"] == 0
    await node.stop()


async def test_signed_end_to_end_over_smtp(tmp_path, keys, sink, make_node, dns_server):
    text = config_text(tmp_path, sink.port, "[dkim]\n"
                       + key_entry(tmp_path, keys, "insurer.test", "r1")
                       + key_entry(tmp_path, keys, "insurer.test", "e1", "ed25519-sha256"))
    text = text.replace("[pools.critical]\n",
                        '[pools.critical]\nreturn_path_domain = "bounce.insurer.test"\n')
    text = text.replace("[routes]\n",
                        f'[routes]\n"bounce.insurer.test" = "127.0.0.1:{sink.port}"\n')
    sink.rcpt_replies = {"hard@example.com": ["550 5.1.1 no such user"]}
    publish(dns_server, keys, "insurer.test", "r1")
    publish(dns_server, keys, "insurer.test", "e1", "ed25519-sha256")
    node = await make_node(text)
    port = node.listeners[0].port
    data = MESSAGES["8bit"].replace(b"Subject: Police\r\n",
                                    b"Subject: Police\r\nX-Postlane-Class: policy-documents\r\n")
    await send(port, "notices@insurer.test", ["a@example.com", "hard@example.com"], data)
    arrivals = {a.rcpts[0]: a for a in await sink.wait_for(2)}
    arrival = arrivals["a@example.com"]
    assert verify(arrival.data, dns_server) == [True, True]
    assert arrival.mail_from == "notices@bounce.insurer.test"
    # the node's own DSN (From MAILER-DAEMON@mta.test, no key) goes out unsigned, not refused,
    # to the pool's Return-Path domain
    bounce = email.message_from_bytes(arrivals["notices@bounce.insurer.test"].data)
    assert bounce.get_content_type() == "multipart/report" and not bounce["DKIM-Signature"]
    with pytest.raises(smtplib.SMTPDataError) as err:
        await send(port, "x@elsewhere.test", ["a@example.com"],
                   data.replace(b"notices@insurer.test", b"x@elsewhere.test"))
    assert err.value.smtp_code == 550 and b"5.7.1 no DKIM key" in err.value.smtp_error
    assert node.status()["dkim"] == {"signed": 1, "unsigned": 1, "refused": 1, "deferred": 0}
    await node.stop()
    received = [r for r in records(tmp_path) if r["type"] == "r"]
    assert {r["rcpt"]: r["dsnDiag"] for r in received} == {
        "a@example.com": "", "hard@example.com": "",
        "notices@bounce.insurer.test": "dkim=none (no DKIM key for From domain mta.test)"}
    assert {r["orig"] for r in received} == {"notices@insurer.test", ""}  # as received


@pytest.mark.parametrize("canon", ["relaxed/relaxed", "simple/simple"])
async def test_a_large_message_arrives_byte_exact_and_signed(tmp_path, keys, sink, make_node,
                                                             dns_server, canon):
    """3 MB, more than the blocks the node streams to the signer and to the next hop in, with
    bare LFs and lines starting with dots (the first body line, lines of dots alone, dots
    right after bare LFs, which the client stuffs): the body arrives as intake normalised it,
    and the signature over it verifies."""
    text = config_text(tmp_path, sink.port, f'[dkim]\ncanonicalization = "{canon}"\n'
                       + key_entry(tmp_path, keys, "insurer.test", "r1"))
    text = text.replace("max_message_size = 100000", "max_message_size = 8000000")
    publish(dns_server, keys, "insurer.test", "r1")
    node = await make_node(text)
    lines = [b"." * (i % 4) + b"line %d " % i + b"x" * (i % 90) for i in range(60_000)]
    body = b".first\r\n" + b"".join(
        line + (b"\n" if i % 3 == 0 else b"\r\n") for i, line in enumerate(lines)) + b".\n..\r\n"
    head = (b"From: notices@insurer.test\r\nTo: a@example.com\r\nSubject: big\r\n"
            b"X-Postlane-Class: policy-documents\r\n\r\n")
    assert len(body) > 3_000_000 and b"\n." in body
    await send(node.listeners[0].port, "notices@insurer.test", ["a@example.com"], head + body)
    [arrival] = await sink.wait_for(1)
    assert arrival.data.endswith(b"\r\n\r\n" + normalize_newlines(body))
    assert arrival.data.count(b"\r\n\r\n.first\r\n") == 1
    assert verify(arrival.data, dns_server) == [True]
    await node.stop()


async def test_transactional_signing_never_waits_for_campaign_signing(tmp_path, keys):
    signer, _ = make_signer(tmp_path, "[dkim]\n" + key_entry(tmp_path, keys, "insurer.test", "r1"))
    await signer.start()
    bulk = [p._proc for p in signer._processes[False]]
    for proc in bulk:
        os.kill(proc.pid, signal.SIGSTOP)  # the campaign's signing processes are stuck
    try:
        campaign = asyncio.ensure_future(sign_message(signer, MESSAGES["plain"],
                                                      cls="marketing", pool="bulk"))
        notice = await asyncio.wait_for(sign_message(signer, MESSAGES["plain"]), 30)
        assert notice.startswith(b"DKIM-Signature:") and not campaign.done()
    finally:
        for proc in bulk:
            os.kill(proc.pid, signal.SIGCONT)
    assert (await campaign).startswith(b"DKIM-Signature:")
    signer.close()


async def test_a_dead_signing_process_defers_and_is_replaced(tmp_path, keys, dns_server):
    signer, records = make_signer(
        tmp_path, "[dkim]\n" + key_entry(tmp_path, keys, "insurer.test", "r1"))
    publish(dns_server, keys, "insurer.test", "r1")
    await signer.start()
    [process] = signer._processes[True]
    child = process._proc
    os.kill(child.pid, signal.SIGSTOP)
    pending = asyncio.ensure_future(sign_message(signer, MESSAGES["plain"]))
    await until(process.backlog, what="the request in flight")
    os.kill(child.pid, signal.SIGKILL)
    with pytest.raises(Rejection) as refused:  # in flight: 451, the client sends it again
        await asyncio.wait_for(pending, 30)
    assert refused.value.code == 451 and "try again later" in refused.value.text
    signed = await asyncio.wait_for(sign_message(signer, MESSAGES["plain"]), 30)
    assert verify(signed, dns_server) == [True]  # a new process, which was given the key again
    assert process._proc.pid != child.pid
    signer.close()


async def test_utf8_from_domain_signs_with_its_a_label(tmp_path, keys, dns_server):
    signer, _ = make_signer(tmp_path, "[dkim]\n" + key_entry(tmp_path, keys, "bücher.test", "r1"))
    publish(dns_server, keys, "xn--bcher-kva.test", "r1")
    data = "From: Bücher <post@bücher.test>\r\nSubject: x\r\n\r\nHallo\r\n".encode()
    signed = await sign_message(signer, data)
    assert "d=xn--bcher-kva.test;" in signed.decode()
    assert verify(signed, dns_server) == [True]
    with pytest.raises(Rejection, match="exactly one From address with a valid domain"):
        await sign_message(signer, b"From: undisclosed\r\nSubject: x\r\n\r\nHi\r\n")
    signer.close()


async def test_a_reload_takes_the_keys_and_leaves_the_other_dkim_settings_to_a_restart(
        tmp_path, keys, sink, dns_server, caplog):
    """The reload says '[dkim] changed; those take effect at the next restart' for anything but
    the keys. Alignment switched from strict to relaxed at once all the same (a From on a
    subdomain was signed as the parent domain), while the signing processes kept signing with
    the canonicalization of the start."""
    from postlane.admin.service import Notifier, reload

    publish(dns_server, keys, "insurer.test", "r1")
    key = key_entry(tmp_path, keys, "insurer.test", "r1")
    config = tmp_path / "node.toml"
    config.write_text(config_text(tmp_path, sink.port, "[dkim]\n" + key))
    node = Node(load_config(config))
    await node.start()
    try:
        port = node.listeners[0].port
        notice = MESSAGES["plain"].replace(b"Subject: hi\r\n",
                                           b"Subject: hi\r\nX-Postlane-Class: policy-documents\r\n")
        sub = notice.replace(b"notices@insurer.test", b"notices@mail.insurer.test")
        config.write_text(config_text(tmp_path, sink.port, '[dkim]\nalignment = "relaxed"\n'
                                      'canonicalization = "simple/simple"\n' + key))
        assert await reload(node, config, Notifier({}))
        assert "dkim changed; those take effect at the next restart" in caplog.text
        with pytest.raises(smtplib.SMTPDataError) as refused:  # still strict, as told
            await send(port, "notices@mail.insurer.test", ["a@example.com"], sub)
        assert b"no DKIM key for From domain mail.insurer.test" in refused.value.smtp_error
        assert node.config.dkim.alignment == "strict"
        await send(port, "notices@insurer.test", ["a@example.com"], notice)
        [arrival] = await sink.wait_for(1)
        assert "c=relaxed/relaxed;" in arrival.data.decode()
        assert verify(arrival.data, dns_server) == [True]
    finally:
        await node.stop()


def test_signed_headers_must_include_from_and_be_field_names(tmp_path, keys):
    """RFC 6376 section 5.4: From MUST be signed, and verifiers that follow section 6.1.1 (here
    mailauth: 'neutral, From field not signed') ignore a signature without it, so DMARC fails.
    ``headers = ["subject", "date"]`` was accepted and signed every message that way; a name
    with a colon or a space made an h= tag no verifier can read."""
    key = key_entry(tmp_path, keys, "insurer.test", "r1")
    with pytest.raises(ConfigError) as err:
        parse_config(config_text(tmp_path, 2500, '[dkim]\nheaders = ["subject", "date"]\n'
                                 + key))
    assert any(e.startswith("dkim.headers:") and "from" in e for e in err.value.errors), \
        err.value.errors
    with pytest.raises(ConfigError) as err:
        parse_config(config_text(tmp_path, 2500, '[dkim]\noversign = ["from", "reply to:"]\n'
                                 + key))
    assert any(e.startswith("dkim.oversign") and "reply to:" in e for e in err.value.errors), \
        err.value.errors
    parse_config(config_text(tmp_path, 2500, '[dkim]\nheaders = [" From ", "Subject"]\n' + key))


async def test_oversigned_names_are_signed_even_when_headers_leaves_them_out(
        tmp_path, keys, dns_server):
    """OpenDKIM's OversignHeaders, which docs/dkim.md follows: a name in ``oversign`` is signed
    once more than present whatever ``headers`` says. With ``headers`` shortened, Reply-To
    was left out of h=, and a Reply-To added in transit kept the signature valid."""
    signer, _ = make_signer(tmp_path, '[dkim]\nheaders = ["from", "subject", "date"]\n'
                            + key_entry(tmp_path, keys, "insurer.test", "r1"))
    publish(dns_server, keys, "insurer.test", "r1")
    signed = await sign_message(signer, MESSAGES["plain"])
    assert verify(signed, dns_server) == [True]
    h = "".join(email.message_from_bytes(signed)["DKIM-Signature"].split()).split("h=")[1]
    assert h.split(";")[0].split(":") == ["from", "from", "subject", "subject", "date", "date",
                                          "to", "to", "cc", "reply-to", "sender",
                                          "list-unsubscribe", "list-unsubscribe-post"]
    head, _, body = signed.partition(b"\r\n\r\n")
    assert verify(head + b"\r\nReply-To: attacker@evil.test\r\n\r\n" + body, dns_server) == [
        False]
    signer.close()


@pytest.mark.parametrize("head", [b"Subject: s\r\nno colon here\r\n",
                                  b" X-Folded: first line\r\nSubject: s\r\n",
                                  b"Fr om: b@attacker.test\r\nSubject: s\r\n"],
                         ids=["no colon", "first line folded", "space in name"])
async def test_a_header_line_that_is_no_field_is_refused_not_signed(tmp_path, keys, dns_server,
                                                                     head):
    """A line in the header block that is not a field: intake read on past it and signed the
    From below it, while a verifier stops (dkimpy: "Unexpected characters in RFC822 header")
    or takes the body to start there (the email package, so no From at all): a signature
    nobody could verify, over a From that readers do not agree is one. Refused, as a second
    From is."""
    signer, _ = make_signer(tmp_path, "[dkim]\n" + key_entry(tmp_path, keys, "insurer.test", "r1"))
    data = head + b"From: notices@insurer.test\r\nTo: a@example.com\r\n\r\nBody\r\n"
    with pytest.raises(Rejection) as err:
        await sign_message(signer, data)
    assert (err.value.code, err.value.text[:5]) == (550, "5.6.0")
    assert "not a header field" in err.value.text
    publish(dns_server, keys, "insurer.test", "r1")
    ok = await sign_message(signer, b"From : notices@insurer.test\r\nTo: a@example.com\r\n\r\nB")
    assert ok.startswith(b"DKIM-Signature:")  # RFC 5322 4.5 obsolete white space: a field
    signer.close()


async def test_smtputf8_message_is_signed_and_arrives_verifiable(tmp_path, keys, sink, make_node,
                                                                 dns_server):
    """A message with UTF-8 header fields (SMTPUTF8) is signed once at intake and sent as it
    is (with SMTPUTF8 to a server offering it): nothing converts it after signing."""
    text = config_text(tmp_path, sink.port, "[dkim]\n"
                       + key_entry(tmp_path, keys, "insurer.test", "r1"))
    publish(dns_server, keys, "insurer.test", "r1")
    node = await make_node(text)
    data = ("From: Prüfer <notices@insurer.test>\r\nTo: a@example.com\r\nSubject: Prüfung\r\n"
            "\r\nGrüße\r\n").encode()
    await send(node.listeners[0].port, "notices@insurer.test", ["a@example.com"], data,
               ["SMTPUTF8"])
    [arrival] = await sink.wait_for(1)
    assert arrival.smtputf8 and b"Subject: Pr\xc3\xbcfung\r\n" in arrival.data
    assert verify(arrival.data, dns_server) == [True]
