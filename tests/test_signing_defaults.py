"""DKIM defaults an administrator would tighten (issue 19, defects 7 and 8), through SMTP and the
`postlane dkim` commands: fields added in transit break the signature, a missing Date is added,
repeated single fields are refused for classes with an SLA, weak RSA keys need --force, and a
dual-signing domain rotates each of its keys."""

from __future__ import annotations

import email
import json
import smtplib
import stat

import pytest

from tests.conftest import config_text, send
from tests.test_cli_ops import run_cli
from tests.test_dkim import key_entry, keys, publish, verify  # noqa: F401  (keys: fixture)


def _message(cls: str, extra: str = "", date: bool = False) -> bytes:
    head = ("From: Notices <notices@insurer.test>\r\nTo: anna@example.com\r\n"
            f"Subject: Your policy\r\nX-Postlane-Class: {cls}\r\n" + extra)
    if date:
        head += "Date: Fri, 27 Nov 2026 18:00:00 +0000\r\n"
    return (head + "\r\nDear Anna,\r\nyour documents.\r\n").encode()


def _insert(data: bytes, field: bytes) -> bytes:
    """The message with one more header field, as a forwarder or an attacker adds it."""
    head, _, body = data.partition(b"\r\n\r\n")
    return head + b"\r\n" + field + b"\r\n\r\n" + body


async def test_fields_added_in_transit_break_the_signature_and_a_date_is_added(
        tmp_path, keys, sink, make_node, dns_server):  # noqa: F811
    text = config_text(tmp_path, sink.port, "[dkim]\n"
                       + key_entry(tmp_path, keys, "insurer.test", "r1"))
    publish(dns_server, keys, "insurer.test", "r1")
    node = await make_node(text)
    port = node.listeners[0].port
    await send(port, "notices@insurer.test", ["anna@example.com"], _message("policy-documents"))
    [arrival] = await sink.wait_for(1)
    data = arrival.data
    assert verify(data, dns_server) == [True]
    assert data.count(b"\r\nDate: ") == 1, "a missing Date is added before signing"
    tags = dict(tag.strip().split("=", 1) for tag in email.message_from_bytes(data)[
        "DKIM-Signature"].split(";") if "=" in tag)
    h = "".join(tags["h"].split())
    for name in ("from", "to", "cc", "reply-to", "subject", "date", "sender",
                 "list-unsubscribe", "list-unsubscribe-post"):
        assert h.split(":").count(name) == data.lower().count(f"\r\n{name}:".encode()) + 1, name
    for added in (b"Reply-To: attacker@evil.test", b"Cc: attacker@evil.test",
                  b"Subject: Please pay to IBAN XX00", b"Sender: attacker@evil.test",
                  b"Date: Sat, 28 Nov 2026 09:00:00 +0000"):
        assert verify(_insert(data, added), dns_server) == [False], added
    assert verify(_insert(data, b"X-Mailing-List: relayed"), dns_server) == [True]


async def test_repeated_single_fields_are_refused_for_classes_with_an_sla(
        tmp_path, sink, make_node):
    node = await make_node(config_text(tmp_path, sink.port))
    port = node.listeners[0].port
    twice = "Subject: Second subject\r\n"
    with pytest.raises(smtplib.SMTPDataError) as refused:
        await send(port, "notices@insurer.test", ["anna@example.com"],
                   _message("policy-documents", twice, date=True))
    assert refused.value.smtp_code == 550
    assert refused.value.smtp_error == (b"5.6.0 message has 2 subject header fields; RFC 5322"
                                        b" section 3.6 allows one")
    # best-effort mail is sent as it came (the sender's own business)
    assert await send(port, "news@insurer.test", ["anna@example.com"],
                      _message("marketing", twice, date=True)) == {}
    [arrival] = await sink.wait_for(1)
    assert arrival.data.count(b"Subject: ") == 2 and arrival.data.count(b"\r\nDate: ") == 1


async def test_keygen_refuses_weak_rsa_without_force_and_keeps_keys_private(tmp_path):
    key = tmp_path / "keys" / "insurer.test.weak.pem"
    code, out, err = await run_cli("dkim", "keygen", "insurer.test", "-s", "weak", "--bits",
                                   "1024", "--key-file", str(key))
    assert code == 2 and "1024-bit RSA key is weak" in err and "--force" in err
    assert not key.exists()
    code, out, err = await run_cli("dkim", "keygen", "insurer.test", "-s", "weak", "--bits",
                                   "1024", "--force", "--key-file", str(key))
    assert code == 0, err
    assert "1024-bit RSA key is weak" in err
    assert stat.S_IMODE(key.parent.stat().st_mode) == 0o700


async def test_rotate_a_dual_signing_domain_rotates_each_algorithm(tmp_path, keys):  # noqa: F811
    dkim = ("[dkim]\n" + key_entry(tmp_path, keys, "insurer.test", "2026q4", extra=(
        "not_before = 2026-10-01")) + key_entry(tmp_path, keys, "insurer.test", "2026q4e",
                                                "ed25519-sha256", "not_before = 2026-10-01"))
    cfg = tmp_path / "node.toml"
    cfg.write_text(config_text(tmp_path, 2500, dkim))
    code, out, err = await run_cli("dkim", "rotate", "insurer.test", "-c", str(cfg), "--at",
                                   "2027-01-01")
    assert code == 0, err
    assert "== rsa-sha256: 2026q4 -> 2027q1" in out
    assert "== ed25519-sha256: 2026q4e -> 2027q1e" in out
    assert "2027q1._domainkey.insurer.test. IN TXT" in out and "k=rsa;" in out
    assert "2027q1e._domainkey.insurer.test. IN TXT" in out and "k=ed25519;" in out
    keydir = tmp_path / "keys"
    assert (keydir / "insurer.test.2027q1.pem").exists()
    assert (keydir / "insurer.test.2027q1e.pem").exists()
    # one algorithm on its own, and a selector only with it
    code, out, err = await run_cli("dkim", "rotate", "insurer.test", "-c", str(cfg),
                                   "--selector", "x1")
    assert code == 2 and "add --algorithm" in err
    code, out, err = await run_cli("dkim", "rotate", "insurer.test", "-c", str(cfg),
                                   "--algorithm", "rsa", "--selector", "x1")
    assert code == 0 and "== rsa-sha256: 2026q4 -> x1" in out and "ed25519" not in out

    # status prints the records to publish and to keep until retire_after
    cfg.write_text(config_text(tmp_path, 2500, dkim.replace(
        "not_before = 2026-10-01\n", "not_before = 2026-10-01\nretire_after = 2027-01-03\n")
        + f'[[dkim.keys]]\ndomain = "insurer.test"\nselector = "2027q1"\n'
          f'key_file = "{keydir / "insurer.test.2027q1.pem"}"\nnot_before = 2027-01-01\n'))
    code, out, err = await run_cli("dkim", "status", "-c", str(cfg), "--now", "2026-12-01")
    assert code == 0, err
    assert "publish: 2027q1._domainkey.insurer.test. IN TXT" in out
    assert "keep until 2027-01-03 00:00 UTC: 2026q4._domainkey.insurer.test. IN TXT" in out
    code, out, err = await run_cli("dkim", "status", "-c", str(cfg), "--now", "2027-01-05",
                                   "--json")
    data = json.loads(out)
    actions = {k["selector"]: k["dns"] for k in data["keys"]}
    assert actions == {"2026q4": "remove", "2026q4e": "remove", "2027q1": "keep"}
