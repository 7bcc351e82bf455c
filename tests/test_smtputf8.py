"""SMTPUTF8 (RFC 6531/6532) in and out: UTF-8 local parts and U-label domains with the
parameter, 553 5.6.7 without it; delivery looks up the A-label, and to a server without
SMTPUTF8 sends A-labels when the local part is ASCII and bounces (5.6.7, once) when it is not."""

from __future__ import annotations

import pytest

from postlane.harness.sink import Sink
from tests.conftest import config_text, message, records
from tests.support.rawsmtp import session
from tests.support.waiting import until

ALABEL = "xn--exmple-cua.org"  # exämple.org


async def _submit(port: int, mail_from: str, rcpts: list[str], body: bytes) -> list[str]:
    raw = await session(port)
    replies = [await raw.cmd(f"MAIL FROM:<{mail_from}> SMTPUTF8".encode() + b"\r\n")]
    for rcpt in rcpts:
        replies.append(await raw.cmd(f"RCPT TO:<{rcpt}>".encode() + b"\r\n"))
    replies.append(await raw.cmd("DATA"))
    raw.send(body + b".\r\n")
    replies.append(await raw.reply())
    await raw.close()
    return replies


async def test_utf8_addresses_need_the_smtputf8_parameter(tmp_path, sink, make_node):
    node = await make_node(config_text(tmp_path, sink.port))
    raw = await session(node.listeners[0].port)
    utf8 = "MAIL FROM:<prüfer@exämple.org>".encode()
    assert (await raw.cmd(utf8 + b"\r\n")).startswith("553 5.6.7")
    assert (await raw.cmd(utf8 + b" SMTPUTF8\r\n")).startswith("250")
    assert (await raw.cmd("RCPT TO:<empfänger@exämple.org>".encode() + b"\r\n")).startswith(
        "250")
    assert (await raw.cmd("RSET")).startswith("250")
    assert (await raw.cmd("MAIL FROM:<s@insurer.test>")).startswith("250")
    assert (await raw.cmd("RCPT TO:<empfänger@example.com>".encode() + b"\r\n")).startswith(
        "553 5.6.7"), "no SMTPUTF8 in this transaction"
    assert (await raw.cmd("RSET")).startswith("250")
    assert (await raw.cmd("MAIL FROM:<a@b.example")).startswith("501 5.1.7"), "unbalanced"
    assert (await raw.cmd("MAIL FROM:<a@exa\u2028mple.org> SMTPUTF8".encode() + b"\r\n")
            ).startswith("501 5.1.7"), "not a valid U-label"
    assert (await raw.cmd(f"MAIL FROM:<a@xn--zz{'z' * 4}.org>")).startswith("501 5.1.7")
    await raw.close()


@pytest.fixture
async def utf8_route(tmp_path, dns_server, make_node):
    """A node resolving exämple.org's MX (by its A-label) to a sink on 127.0.0.1; the sink
    offers SMTPUTF8 or not, as the test asks."""
    sinks: list[Sink] = []

    async def start(smtputf8: bool):
        target = await Sink(smtputf8=smtputf8).start()
        sinks.append(target)
        dns_server.add_mx(ALABEL, 10, f"mx.{ALABEL}")
        dns_server.add_a(f"mx.{ALABEL}", "127.0.0.1")
        node = await make_node(config_text(tmp_path, target.port, f"""
[dns]
nameserver = "127.0.0.1"
port = {dns_server.port}
""", routes=False))
        return node, target

    yield start
    for s in sinks:
        await s.stop()


async def test_delivered_with_smtputf8_to_a_server_that_offers_it(utf8_route, dns_server,
                                                                  tmp_path):
    node, target = await utf8_route(True)
    body = "From: prüfer@exämple.org\r\nSubject: Prüfung\r\n\r\nGrüße\r\n".encode()
    replies = await _submit(node.listeners[0].port, "prüfer@exämple.org",
                            ["jürgen@exämple.org"], body)
    assert [r[:3] for r in replies] == ["250", "250", "354", "250"]
    [arrival] = await target.wait_for(1)
    assert arrival.smtputf8 and arrival.rcpts == ["jürgen@exämple.org"]
    assert arrival.mail_from == "prüfer@exämple.org"
    assert (ALABEL, "MX") in dns_server.queries
    assert not any(name.startswith("exä") for name, _ in dns_server.queries)


async def test_ascii_local_parts_go_as_a_labels_to_a_server_without_smtputf8(utf8_route,
                                                                             tmp_path):
    node, target = await utf8_route(False)
    replies = await _submit(node.listeners[0].port, "s@insurer.test",
                            ["anna@exämple.org", "jürgen@exämple.org"], message())
    assert [r[:3] for r in replies] == ["250", "250", "250", "354", "250"]
    [arrival] = await target.wait_for(1)
    assert arrival.rcpts == [f"anna@{ALABEL}"] and not arrival.smtputf8

    def outcomes() -> list[dict]:
        rows = [r for r in records(tmp_path) if r["type"] in ("d", "b", "t")]
        return rows if len(rows) >= 2 else []

    rows = await until(outcomes, what="an outcome record for both recipients")
    by_rcpt = {r["rcpt"]: r for r in rows}
    assert by_rcpt["anna@exämple.org"]["type"] == "d"
    bounce = by_rcpt["jürgen@exämple.org"]
    assert bounce["type"] == "b" and bounce["dsnStatus"] == "5.6.7"
    assert not [r for r in rows if r["type"] == "t"], "a bounce, not a retry loop"
    assert target.rcpt_attempts.get("jürgen@exämple.org", 0) == 0


async def test_unicode_line_separators_and_c1_controls_are_refused(tmp_path, sink, make_node):
    """U+0085, U+2028 and U+2029 are line breaks to Python's email package: a sender holding
    one was accepted, and the bounce of its undeliverable message was lost (build_bounce raised
    "Header values may not contain linefeed or carriage return characters")."""
    node = await make_node(config_text(tmp_path, sink.port))
    raw = await session(node.listeners[0].port)
    for char in ("\u2028", "\u2029", "\x85", "\x9b"):
        assert (await raw.cmd(f"MAIL FROM:<a{char}b@exämple.org> SMTPUTF8".encode() + b"\r\n")
                ).startswith("501 5.1.7"), repr(char)
    assert (await raw.cmd("MAIL FROM:<prüfer@exämple.org> SMTPUTF8".encode() + b"\r\n")
            ).startswith("250")
    assert (await raw.cmd("RCPT TO:<x\u2028y@example.com>".encode() + b"\r\n")).startswith(
        "501 5.1.3")
    assert (await raw.cmd("RCPT TO:<x\u00a0y@example.com>".encode() + b"\r\n")).startswith(
        "250"), "other non-ASCII stays allowed"
    await raw.close()
