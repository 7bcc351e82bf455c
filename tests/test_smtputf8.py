"""SMTPUTF8 (RFC 6531/6532) in and out: UTF-8 local parts and U-label domains with the
parameter, 553 5.6.7 without it; delivery looks up the A-label, and to a server without
SMTPUTF8 sends A-labels when the local part is ASCII and bounces (5.6.7, once) when it is not."""

from __future__ import annotations

import pytest

from postlane.harness.sink import Sink
from tests.conftest import OPERATOR, config_text, message, records
from tests.support.rawsmtp import session
from tests.support.waiting import until

ALABEL = "xn--exmple-cua.org"  # exämple.org


async def _submit(port: int, mail_from: str, rcpts: list[str], body: bytes,
                  params: str = " SMTPUTF8") -> list[str]:
    """One transaction on a raw session (MAIL with ``params``); every reply."""
    raw = await session(port)
    replies = [await raw.cmd(f"MAIL FROM:<{mail_from}>{params}".encode() + b"\r\n")]
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


# --- messages that asked for SMTPUTF8 (RFC 6531 3.2) and 8-bit mail (RFC 6152) -----------------

UTF8_HEADERS = ("From: s@example.com\r\nTo: anna@example.com\r\nSubject: Prüfung\r\n\r\n"
                "Grüße\r\n").encode()


def _outcomes(tmp_path, count: int, rcpt: str = "anna@example.com"):
    def found() -> list[dict]:
        rows = [r for r in records(tmp_path) if r["type"] in ("d", "b", "t")
                and r["rcpt"] == rcpt]
        return rows if len(rows) >= count else []
    return found


async def test_utf8_header_that_asked_for_smtputf8_bounces_at_a_server_without_it(
        tmp_path, make_node):
    """ASCII addresses, UTF-8 Subject, given with SMTPUTF8: the spool did not keep the
    parameter, and the relay sent the message as plain 8-bit mail (BODY=8BITMIME) to a server
    that never agreed to UTF-8 headers. RFC 6531 3.2: bounce with 5.6.7 (as Postfix), once;
    the sender's DSN says why."""
    target = await Sink(smtputf8=False).start()
    try:
        node = await make_node(config_text(tmp_path, target.port))
        replies = await _submit(node.listeners[0].port, "s@example.com",
                                ["anna@example.com"], UTF8_HEADERS)
        assert [r[:3] for r in replies] == ["250", "250", "354", "250"]
        [bounce] = await until(_outcomes(tmp_path, 1), what="the outcome")
        assert bounce["type"] == "b" and bounce["dsnStatus"] == "5.6.7"
        assert "SMTPUTF8 is required, but was not offered by host" in bounce["dsnDiag"]
        assert bounce["bounceCat"] == "content-related"
        [dsn] = await target.wait_for(1)  # the DSN to s@example.com: nothing else arrived
        assert dsn.mail_from == "<>" and dsn.rcpts == ["s@example.com"]
        assert b"Status: 5.6.7" in dsn.data and b"Subject: Pr\xc3\xbcfung" in dsn.data
        assert b"Content-Type: message/global-headers" in dsn.data  # RFC 6533 6.3
        assert target.rcpt_attempts.get("anna@example.com", 0) == 0, "never sent"
        assert not [r for r in records(tmp_path) if r["type"] == "t"], "not retried"
    finally:
        await target.stop()


async def test_utf8_header_that_asked_for_smtputf8_goes_with_it_to_a_server_offering_it(
        tmp_path, make_node):
    target = await Sink(smtputf8=True).start()
    try:
        node = await make_node(config_text(tmp_path, target.port))
        await _submit(node.listeners[0].port, "s@example.com", ["anna@example.com"],
                      UTF8_HEADERS)
        [arrival] = await target.wait_for(1)
        assert arrival.smtputf8 and b"Subject: Pr\xc3\xbcfung" in arrival.data
    finally:
        await target.stop()


async def test_utf8_header_without_smtputf8_goes_as_8bit_mail(tmp_path, make_node):
    """The client did not ask for SMTPUTF8: Postfix's behaviour, sent as it is to a server
    with 8BITMIME (many old clients write raw UTF-8 subjects)."""
    target = await Sink(smtputf8=False).start()
    try:
        node = await make_node(config_text(tmp_path, target.port))
        replies = await _submit(node.listeners[0].port, "s@example.com",
                                ["anna@example.com"], UTF8_HEADERS, " BODY=8BITMIME")
        assert [r[:3] for r in replies] == ["250", "250", "354", "250"]
        [arrival] = await target.wait_for(1)
        assert not arrival.smtputf8 and b"Subject: Pr\xc3\xbcfung" in arrival.data
    finally:
        await target.stop()


async def test_asked_for_smtputf8_but_all_ascii_is_sent_without_it(tmp_path, make_node):
    """SMTPUTF8 given, nothing in the envelope or header needs it (an 8-bit body only):
    delivered to a server without SMTPUTF8, as RFC 6531 3.2 allows."""
    target = await Sink(smtputf8=False).start()
    try:
        node = await make_node(config_text(tmp_path, target.port))
        body = "From: s@example.com\r\nSubject: plain\r\n\r\nGrüße\r\n".encode()
        await _submit(node.listeners[0].port, "s@example.com", ["anna@example.com"], body)
        [arrival] = await target.wait_for(1)
        assert not arrival.smtputf8 and arrival.rcpts == ["anna@example.com"]
    finally:
        await target.stop()


async def test_eight_bit_mail_to_a_seven_bit_server_bounces_unconverted(tmp_path, make_node):
    """8-bit body, next hop without 8BITMIME: RFC 6152 3 forbids sending it as it is; a
    conversion to quoted-printable after signing would break its DKIM signature, so it bounces
    with 5.6.3 (docs/security.md); the DSN goes out."""
    target = await Sink(smtputf8=False, eightbitmime=False).start()
    try:
        node = await make_node(config_text(tmp_path, target.port))
        body = "From: s@example.com\r\nSubject: plain\r\n\r\nGrüße\r\n".encode()
        await _submit(node.listeners[0].port, "s@example.com", ["anna@example.com"], body,
                      " BODY=8BITMIME")
        [bounce] = await until(_outcomes(tmp_path, 1), what="the outcome")
        assert bounce["type"] == "b" and bounce["dsnStatus"] == "5.6.3"
        assert target.rcpt_attempts.get("anna@example.com", 0) == 0
        [dsn] = await target.wait_for(1)  # the DSN holds the headers only (RET=HDRS): 7-bit
        assert dsn.rcpts == ["s@example.com"] and b"Status: 5.6.3" in dsn.data
    finally:
        await target.stop()


async def test_spool_keeps_the_smtputf8_flag_across_a_restart(tmp_path, make_node):
    """Queued while the next hop is down, then delivered by a new node from the spool: the
    flag came back from the spool (it was lost: the message went as plain 8-bit mail)."""
    target = Sink(smtputf8=False)
    await target.start()
    port = target.port
    await target.stop()  # nothing listens: the first attempt defers
    node = await make_node(config_text(tmp_path, port))
    await _submit(node.listeners[0].port, "s@example.com", ["anna@example.com"], UTF8_HEADERS)
    await until(lambda: [r for r in records(tmp_path) if r["type"] == "t"],
                what="a deferral")
    await node.stop()
    target = await Sink(smtputf8=False, port=port).start()
    try:
        node = await make_node(config_text(tmp_path, port))
        await node.operations.retry("bulk", who=OPERATOR)
        rows = await until(lambda: [r for r in records(tmp_path) if r["type"] == "b"],
                           what="the bounce")
        assert rows[0]["dsnStatus"] == "5.6.7"
    finally:
        await target.stop()


async def test_api_message_with_utf8_addresses_is_written_and_flagged_smtputf8(
        tmp_path, make_node):
    """A structured API message to a UTF-8 address: its To field was an RFC 2047 encoded word
    inside an addr-spec (forbidden, RFC 2047 5) and the message was not marked SMTPUTF8. Now
    the field is UTF-8 (RFC 6532) and the message goes with SMTPUTF8."""
    from tests.test_api import api_client
    target = await Sink(smtputf8=True).start()
    try:
        node = await make_node(config_text(tmp_path, target.port))
        async with api_client(node, tmp_path) as api:
            resp = await api.post("/api/v1/messages", json={
                "from": "s@example.com", "to": ["jürgen@example.com"], "subject": "Grüße",
                "text": "Hallo"})
            assert resp.status_code == 202, resp.text
        [arrival] = await target.wait_for(1)
        assert arrival.smtputf8 and arrival.rcpts == ["jürgen@example.com"]
        assert "To: jürgen@example.com\r\n".encode() in arrival.data
    finally:
        await target.stop()


async def test_api_raw_message_with_a_utf8_header_bounces_at_a_server_without_smtputf8(
        tmp_path, make_node):
    from tests.test_api import api_client
    target = await Sink(smtputf8=False).start()
    try:
        node = await make_node(config_text(tmp_path, target.port))
        async with api_client(node, tmp_path) as api:
            resp = await api.post("/api/v1/messages", json={
                "from": "s@example.com", "to": ["anna@example.com"],
                "raw": UTF8_HEADERS.decode()})
            assert resp.status_code == 202, resp.text
        [bounce] = await until(_outcomes(tmp_path, 1), what="the outcome")
        assert bounce["type"] == "b" and bounce["dsnStatus"] == "5.6.7"
    finally:
        await target.stop()


async def test_intake_workers_carry_the_smtputf8_flag(tmp_path, make_node):
    """With ``workers = 2`` the message crosses from a worker process to the main one (as
    ``Message`` values): the flag must cross with it."""
    target = await Sink(smtputf8=False).start()
    try:
        node = await make_node(config_text(tmp_path, target.port).replace(
            "[node]\n", "[node]\nworkers = 2\n", 1))
        await _submit(node.listeners[0].port, "s@example.com", ["anna@example.com"],
                      UTF8_HEADERS)
        [bounce] = await until(_outcomes(tmp_path, 1), what="the outcome")
        assert bounce["type"] == "b" and bounce["dsnStatus"] == "5.6.7"
    finally:
        await target.stop()


async def test_api_takes_a_u_label_domain_and_delivers_it_with_smtputf8(utf8_route, dns_server,
                                                                       tmp_path):
    """The API refused ``jürgen@exämple.org`` (422, its address pattern was LDH only) though
    the SMTP door takes it with SMTPUTF8; now it is checked as strictly (IDNA 2008), the MX
    of the A-label is looked up and the message goes with SMTPUTF8."""
    from tests.test_api import api_client
    node, target = await utf8_route(True)
    async with api_client(node, tmp_path) as api:
        resp = await api.post("/api/v1/messages", json={
            "from": "s@example.com", "to": ["jürgen@exämple.org"], "subject": "Grüße",
            "text": "Hallo"})
        assert resp.status_code == 202, resp.text
        bad = await api.post("/api/v1/messages", json={
            "from": "s@example.com", "to": ["a@xn--zzzzzz.org"], "text": "x"})
        assert bad.status_code == 422
    [arrival] = await target.wait_for(1)
    assert arrival.smtputf8 and arrival.rcpts == ["jürgen@exämple.org"]
    assert "To: jürgen@exämple.org\r\n".encode() in arrival.data
    assert (ALABEL, "MX") in dns_server.queries


def test_a_u_label_domain_in_upper_case_is_the_same_domain():
    """Domains are case-insensitive: ``a@BÜCHER.example`` got 501 5.1.7 (IDNA 2008 alone
    has no case mapping); UTS #46 maps first, as Postfix does, and IDNA 2008 still refuses
    what it refuses."""
    from postlane.address import PathError, alabel_domain, parse_path

    assert alabel_domain("BÜCHER.example") == alabel_domain("bücher.example") == \
        "xn--bcher-kva.example"
    assert parse_path("<a@BÜCHER.example>", utf8=True) == ("a@BÜCHER.example", "")
    with pytest.raises(PathError):
        alabel_domain("☃.example")
