"""One internationalised mailbox, two spellings: ``jörg@exämple.com`` (U-labels) and
``jörg@xn--exmple-cua.com`` (A-labels) name the same domain (RFC 5890 2.3.2.1), so the edge,
the suppression list and the audit trail must treat them as one address."""

from __future__ import annotations

import asyncio
import json
import smtplib

import pytest
from typer.testing import CliRunner

from postlane.cli import app
from postlane.harness.sink import Sink
from tests.conftest import OPERATOR, config_text, records, send
from tests.support.rawsmtp import session
from tests.support.waiting import until

ULABEL = "exämple.com"
ALABEL = "xn--exmple-cua.com"


async def _routed_to(tmp_path, make_node, target: Sink):
    """The feedback node with mail to the A-label domain routed to ``target``: the node and its
    SMTP port."""
    from tests.test_feedback_node import _config
    node = await make_node(_config(tmp_path, target.port).replace(
        "[routes]\n", f'[routes]\n"{ALABEL}" = "127.0.0.1:{target.port}"\n'))
    return node, node.listeners[0].port


CAMPAIGN = b"From: news@insurer.test\r\nSubject: news\r\nX-Postlane-Class: marketing\r\n\r\nx\r\n"
"""A campaign message, classed by its header."""


async def _held_for_joerg(tmp_path, sink, make_node):
    """A node with the bulk pool paused and one campaign message queued for jörg@exämple.com:
    the ``postlane`` CLI against it, and the message's queue id."""
    from postlane.policy.intake import RcptIn
    from tests.conftest import OPERATOR, message
    from tests.test_cli_ops import run_cli

    node = await make_node(config_text(tmp_path, sink.port))
    await node.operations.pause("bulk", who=OPERATOR)
    qid = await node.intake.submit("news@example.com", [RcptIn(f"jörg@{ULABEL}")],
                                   message("offer", cls="marketing"))

    def cli(*args: str):
        return run_cli(*args, "--url", f"http://127.0.0.1:{node.api.port}",
                       "--token-file", str(tmp_path / "api-token"))
    return cli, qid


async def _utf8_node(tmp_path, make_node):
    target = await Sink(smtputf8=True).start()
    node = await make_node(config_text(tmp_path, target.port,
                                       f'"{ALABEL}" = "127.0.0.1:{target.port}"\n'))
    return node, target


async def _all_refused(node, target: Sink, rcpts: list[str]) -> None:
    """Each of ``rcpts`` (spellings of suppressed mailboxes), sent alone, is refused with 550
    and nothing reaches ``target``."""
    for rcpt in rcpts:
        try:
            refused = await asyncio.to_thread(_sendmail, node.listeners[0].port, [rcpt])
        except smtplib.SMTPRecipientsRefused as exc:
            refused = exc.recipients
        assert refused and refused[rcpt][0] == 550, (rcpt, refused)
    assert not target.arrivals


def _sendmail(port: int, rcpts: list[str]) -> dict:
    body = ("From: s@insurer.test\r\nTo: jörg@exämple.com\r\nSubject: Grüße\r\n\r\n"
            "Hallo\r\n").encode()
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        client.ehlo("client.test")
        return client.sendmail("s@insurer.test", rcpts, body, ["SMTPUTF8"])


async def test_one_mailbox_in_u_labels_and_a_labels_is_one_recipient(tmp_path, make_node):
    """The duplicate check compared domains lower-cased only: the mailbox named both ways in
    one transaction was queued twice and its owner got two copies."""
    await _one_copy(tmp_path, make_node, f"jörg@{ULABEL}",
                    [f"jörg@{ALABEL}", "jörg@EXÄMPLE.com"])


async def _one_copy(tmp_path, make_node, first: str, again: list[str]) -> None:
    """``first``, then ``again`` (other spellings of it) in one transaction: each of those is
    answered as a duplicate, and ``first`` gets one copy, addressed as the client gave it."""
    node, target = await _utf8_node(tmp_path, make_node)
    try:
        raw = await session(node.listeners[0].port)
        assert (await raw.cmd(b"MAIL FROM:<s@insurer.test> SMTPUTF8\r\n")).startswith("250")
        assert (await raw.cmd(f"RCPT TO:<{first}>".encode() + b"\r\n")).startswith("250")
        for other in again:
            dup = await raw.cmd(f"RCPT TO:<{other}>".encode() + b"\r\n")
            assert dup.startswith("250") and "duplicate" in dup, dup
        assert (await raw.cmd("DATA")).startswith("354")
        raw.send(b"Subject: x\r\n\r\nx\r\n.\r\n")
        assert (await raw.reply()).startswith("250")
        await raw.close()
        [arrival] = await target.wait_for(1)
        assert arrival.rcpts == [first]
        await asyncio.sleep(0.5)
        assert len(target.arrivals) == 1
    finally:
        await target.stop()


async def test_a_suppressed_u_label_address_stops_its_a_label_spelling(tmp_path, make_node):
    """``Jörg@Exämple.com`` on the list, mail to ``jörg@xn--exmple-cua.com`` (what a client
    without SMTPUTF8 support converts the domain to): the list compared lower-cased text only,
    so the suppressed mailbox got the mail. Either spelling on the list stops both."""
    from tests.test_api import api_client
    node, target = await _utf8_node(tmp_path, make_node)
    try:
        async with api_client(node, tmp_path) as api:
            resp = await api.post("/api/v1/suppressions", json={
                "address": "Jörg@Exämple.com", "scope": "all", "reason": "asked"})
            assert resp.status_code == 201, resp.text
            resp = await api.post("/api/v1/suppressions", json={
                "address": f"anna@{ALABEL}", "scope": "all", "reason": "asked"})
            assert resp.status_code == 201, resp.text
        await _all_refused(node, target, [f"jörg@{ALABEL}", f"JÖRG@{ULABEL}", f"anna@{ULABEL}"])
    finally:
        await target.stop()


async def _audit_shown(tmp_path, make_node, sent_to: str, spellings: list[str]
                       ) -> dict[str, str]:
    """Mail to ``sent_to`` delivered, the node stopped: what ``postlane audit show
    --recipient`` prints for each of ``spellings`` (each found: exit 0)."""
    node, target = await _utf8_node(tmp_path, make_node)
    try:
        await asyncio.to_thread(_sendmail, node.listeners[0].port, [sent_to])
        await target.wait_for(1)
        await until(lambda: [r for r in records(tmp_path) if r["type"] == "d"],
                    what="the delivery")
        await node.stop()
    finally:
        await target.stop()
    shown = {}
    for spelling in spellings:
        res = CliRunner().invoke(app, ["audit", "show", "--db", str(node.audit.path),
                                       "--recipient", spelling])
        assert res.exit_code == 0, (spelling, res.output)
        shown[spelling] = res.output
    return shown


async def test_audit_show_finds_a_utf8_recipient_by_either_spelling(tmp_path, make_node):
    """``postlane audit show --recipient`` compared the text as stored (SQLite's NOCASE folds
    ASCII only): the trail of ``jörg@exämple.com`` was not found by its A-label spelling, nor
    by ``Jörg@EXÄMPLE.com``."""
    shown = await _audit_shown(tmp_path, make_node, f"jörg@{ULABEL}", [
        f"jörg@{ULABEL}", f"jörg@{ALABEL}", f"Jörg@{ALABEL.upper()}", "Jörg@EXÄMPLE.com"])
    for output in shown.values():
        assert f"jörg@{ULABEL}" in output


async def test_api_message_to_one_mailbox_in_both_spellings_is_one_recipient(tmp_path,
                                                                             make_node):
    """The HTTP API took ``to`` and ``cc`` (and ``bcc``) as they came: a mailbox named in
    U-labels and in A-labels, or twice, was queued as two recipients and got two copies (the
    SMTP door delivers a duplicate RCPT once)."""
    from tests.test_api import api_client
    node, target = await _utf8_node(tmp_path, make_node)
    try:
        async with api_client(node, tmp_path) as api:
            resp = await api.post("/api/v1/messages", json={
                "from": "s@insurer.test", "to": [f"jörg@{ULABEL}"],
                "cc": [f"jörg@{ALABEL}"], "bcc": [f"jörg@{ULABEL.upper()}"],
                "subject": "Grüße", "text": "Hallo"})
            assert resp.status_code == 202, resp.text
            assert resp.json()["recipients"] == 1
        [arrival] = await target.wait_for(1)
        assert arrival.rcpts == [f"jörg@{ULABEL}"]
        await asyncio.sleep(0.5)
        assert len(target.arrivals) == 1
    finally:
        await target.stop()


def test_an_entry_written_before_in_u_labels_still_matches_and_is_listed(tmp_path):
    """The list keeps domains in A-labels now; an entry written before, with the domain as it
    was given (U-labels), still stops the mailbox in either spelling, ``suppress list --like``
    finds entries of a domain by either spelling, and ``remove`` takes both."""
    from postlane.feedback.suppression import SuppressionList

    store = SuppressionList(tmp_path / "s.sqlite3")
    try:
        store.write(lambda conn: conn.execute(
            "INSERT INTO suppression VALUES (?, 'all', 'old', 'operator', 1.0, 0)",
            (f"jörg@{ULABEL}",)))
        store.add(f"Anna@{ULABEL.upper()}", "marketing")
        assert [e.address for e in store.list(like=f"*@{ALABEL}")] == [
            f"anna@{ALABEL}", f"jörg@{ULABEL}"]
        assert [e.address for e in store.list(like=f"*@{ULABEL}")] == [
            f"anna@{ALABEL}", f"jörg@{ULABEL}"]
        for spelling in (f"jörg@{ALABEL}", f"Jörg@{ULABEL}"):
            assert store.check_one(spelling).reason == "old", spelling
            assert list(store.check([spelling])) == [spelling]
        assert store.check_one(f"anna@{ULABEL}").scope == "marketing"
        assert store.remove(f"jörg@{ALABEL}") == 1
        assert store.check_one(f"jörg@{ULABEL}") is None
    finally:
        store.close()


async def test_complaint_rates_count_one_domain_whichever_spelling_mail_went_to(tmp_path,
                                                                              make_node):
    """The rates were kept per domain as the recipient spelled it: mail to ``exämple.com`` and
    to ``xn--exmple-cua.com`` made two rows, each with part of the deliveries, so one
    complaint in two deliveries read as 100 % for the A-label row (an alert) and 0 % for the
    other. Both are one domain, counted in A-labels."""
    from tests.test_feedback_node import _arf
    target = await Sink(smtputf8=True).start()
    try:
        node, port = await _routed_to(tmp_path, make_node, target)
        await send(port, "news@insurer.test", [f"anna@{ULABEL}", f"bob@{ALABEL}"], CAMPAIGN,
                   ["SMTPUTF8"])
        arrivals = await target.wait_for(2)
        await until(lambda: node.feedback.rates.sent("bulk") >= 2, what="both deliveries")
        [bob] = [a for a in arrivals if a.rcpts == [f"bob@{ALABEL}"]]
        assert await send(port, "", ["fbl@mta.test"], _arf(bob.mail_from, "<m@x>")) == {}
        await until(lambda: node.feedback.rates.complained("bulk"), what="the complaint")
        rows = {r["domain"]: r for r in node.feedback.rates.rates() if r["pool"] == "bulk"}
        assert set(rows) == {"*", ALABEL}, rows
        assert (rows[ALABEL]["delivered"], rows[ALABEL]["complaints"]) == (2, 1)
    finally:
        await target.stop()


def test_audit_show_finds_a_pseudonymised_utf8_recipient_by_either_spelling(audit_backend,
                                                                            tmp_path):
    """Retention replaces a recipient with a keyed hash of the address as stored, and ``audit
    show -c`` looked up the hash of the spelling it was given only: records of
    ``jörg@exämple.com`` once pseudonymised were not found as ``jörg@xn--exmple-cua.com``."""
    import os
    from datetime import UTC, datetime

    from postlane.accounting.records import Record

    day = datetime(2026, 11, 19, 10, tzinfo=UTC).timestamp()
    store = audit_backend.open()
    try:
        for i, kind in enumerate(("r", "d")):
            store.append([(Record(type=kind, time_logged=day + i, time_queued=day,
                                  orig="s@x.test", rcpt=f"jörg@{ULABEL}", queue_id="Q1",
                                  cls="policy", vmta_pool="pool"), 120.0, "w1", i + 1)])
    finally:
        store.close()
    key = tmp_path / "audit.key"
    key.write_bytes(os.urandom(32))
    key.chmod(0o600)
    cfg = tmp_path / "node.toml"
    cfg.write_text(config_text(tmp_path, 2525, f"""
[classes.policy]
pool = "critical"
{audit_backend.toml()}pseudonymisation_key = "{key}"
"""))
    runner = CliRunner()
    show = ["audit", "show", "-c", str(cfg), "--recipient"]
    for spelling in (f"jörg@{ULABEL}", f"jörg@{ALABEL}"):  # stored as given, either backend
        res = runner.invoke(app, [*show, spelling])
        assert res.exit_code == 0 and f"jörg@{ULABEL}" in res.output, (spelling, res.output)
    with open(cfg, "a") as fh:
        fh.write('[audit.retention.policy]\npseudonymise = "1d"\n')
    res = runner.invoke(app, ["audit", "purge", "-c", str(cfg)])
    assert res.exit_code == 0 and "policy: pseudonymised 2" in res.output, res.output
    for spelling in (f"jörg@{ULABEL}", f"jörg@{ALABEL}", f"Jörg@{ALABEL}"):
        res = runner.invoke(app, [*show, spelling])
        assert res.exit_code == 0 and "recipient pseud-" in res.output, (spelling, res.output)


async def test_a_dsn_naming_our_recipient_in_a_labels_delayed_does_not_bounce_it(tmp_path,
                                                                                  make_node):
    """``anna@exämple.com`` goes as ``anna@xn--exmple-cua.com`` to a server without SMTPUTF8,
    and its DSN names that spelling. A DSN back at her VERP address saying she is delayed and
    another address failed: the report's block for her was matched by lower-cased text, not
    found, and the one failure named (someone else's) was taken as hers: a hard bounce and a
    suppression."""
    import time

    from postlane.feedback.dsn import FailedRecipient, build_bounce
    target = await Sink(smtputf8=False).start()
    try:
        node, port = await _routed_to(tmp_path, make_node, target)
        await send(port, "news@insurer.test", [f"anna@{ULABEL}"], CAMPAIGN, ["SMTPUTF8"])
        [arrival] = await target.wait_for(1)
        assert arrival.rcpts == [f"anna@{ALABEL}"]
        dsn = build_bounce(reporting_mta="mx.example.com", sender=arrival.mail_from,
                           recipients=[
                               FailedRecipient(f"Anna@{ALABEL}", "delayed", "4.2.2",
                                               "452 4.2.2 mailbox full", "mx.example.com"),
                               FailedRecipient("other@example.org", "failed", "5.1.1",
                                               "550 5.1.1 no such user", "mx.example.org")],
                           original=arrival.data, arrival_date=time.time(), ret="HDRS")
        assert await send(port, "", [arrival.mail_from], dsn) == {}
        assert not node.feedback.suppression.check([f"anna@{ULABEL}"])
        await node.stop()
        reports = [(r["type"], r["rcpt"], r["dsnAction"], r["dsnStatus"])
                   for r in records(tmp_path) if r["type"] in ("rb", "rd")]
        assert reports == [("rd", f"anna@{ULABEL}", "delayed", "4.2.2")]
    finally:
        await target.stop()


async def test_queue_tools_take_a_domain_in_u_labels(tmp_path, sink, make_node):
    """Lanes are kept in A-labels and ``pause`` takes either spelling, but the queue's
    selector compared the domain lower-cased only: ``queue list --domain exämple.com`` said
    "no lane to 'exämple.com' in any pool" and ``purge bulk exämple.com`` purged nothing
    while the lane held mail."""
    cli, qid = await _held_for_joerg(tmp_path, sink, make_node)

    for domain in (ULABEL, ULABEL.upper(), ALABEL):
        code, out, err = await cli("queue", "list", "--json", "--domain", domain)
        assert code == 0, (domain, err)
        assert [m["queue_id"] for m in json.loads(out)["messages"]] == [qid], domain
    code, out, err = await cli("purge", "bulk", ULABEL, "--yes")
    assert code == 0, err
    code, out, err = await cli("queue", "list", "--json", "--domain", ALABEL)
    assert json.loads(out)["total_messages"] == 0, out


async def test_a_utf8_orcpt_goes_as_ascii_to_a_server_without_smtputf8(tmp_path, make_node):
    """A client's SMTPUTF8 transaction may give ORCPT in UTF-8 (RFC 6533). ``anna@exämple.com``
    has an ASCII local part, so her mail goes without SMTPUTF8 (domain in A-labels) to a server
    that does not offer it; the ORCPT went on as given, 8-bit in the RCPT command, and a
    server that checks xtext (Postfix: ``501 5.5.4 Bad ORCPT parameter syntax``) refused the
    recipient: a bounce. Now it goes as ASCII: rfc822 xtext with each UTF-8 octet as ``+XX``
    (as Postfix sends it), a ``utf-8`` address with ``\\x{HEX}`` (RFC 6533 utf-8-addr-xtext)."""
    target = await Sink(smtputf8=False, dsn=True).start()
    try:
        node = await make_node(config_text(tmp_path, target.port,
                                           f'"{ALABEL}" = "127.0.0.1:{target.port}"\n'))
        raw = await session(node.listeners[0].port)
        assert (await raw.cmd(b"MAIL FROM:<s@example.com> SMTPUTF8\r\n")).startswith("250")
        for rcpt, orcpt in ((f"anna@{ULABEL}", f"rfc822;anna@{ULABEL}"),
                            (f"bob@{ULABEL}", f"utf-8;bob@{ULABEL}")):
            line = f"RCPT TO:<{rcpt}> NOTIFY=FAILURE ORCPT={orcpt}\r\n".encode()
            assert (await raw.cmd(line)).startswith("250")
        assert (await raw.cmd("DATA")).startswith("354")
        raw.send(b"Subject: x\r\n\r\nx\r\n.\r\n")
        assert (await raw.reply()).startswith("250")
        await raw.close()
        [arrival] = await target.wait_for(1)
        assert arrival.rcpts == [f"anna@{ALABEL}", f"bob@{ALABEL}"] and not arrival.smtputf8
        assert arrival.orcpt == {f"anna@{ALABEL}": "rfc822;anna@ex+C3+A4mple.com",
                                 f"bob@{ALABEL}": "utf-8;bob@ex\\x{E4}mple.com"}
    finally:
        await target.stop()


async def test_api_messages_by_recipient_finds_either_spelling(tmp_path, sink, make_node):
    """``GET /messages?recipient=`` compared the address lower-cased as stored: mail queued
    for ``jörg@exämple.com`` was not found as ``jörg@xn--exmple-cua.com`` (nor as
    ``Jörg@EXÄMPLE.com``), queued or finished."""
    from postlane.policy.intake import RcptIn
    from tests.conftest import OPERATOR, message
    from tests.test_api import api_client

    node = await make_node(config_text(tmp_path, sink.port))
    await node.operations.pause("bulk", who=OPERATOR)
    qid = await node.intake.submit("news@example.com", [RcptIn(f"jörg@{ULABEL}")],
                                   message("offer", cls="marketing"))
    async with api_client(node, tmp_path) as api:
        for spelling in (f"jörg@{ULABEL}", f"jörg@{ALABEL}", "Jörg@EXÄMPLE.com"):
            resp = await api.get("/api/v1/messages", params={"recipient": spelling})
            assert resp.status_code == 200, resp.text
            assert [m["queue_id"] for m in resp.json()["messages"]] == [qid], spelling


async def test_queue_list_by_recipient_finds_either_spelling(tmp_path, sink, make_node):
    """``queue list --recipient`` (and hold, retry, delete by recipient) compared the text
    lower-cased: mail queued for ``jörg@exämple.com`` was not found as
    ``jörg@xn--exmple-cua.com``."""
    cli, qid = await _held_for_joerg(tmp_path, sink, make_node)

    for pattern in (f"jörg@{ULABEL}", f"jörg@{ALABEL}", "JÖRG@EXÄMPLE.COM", f"*@{ALABEL}",
                    "j*@xn--exmple-cua.*"):
        code, out, err = await cli("queue", "list", "--json", "--recipient", pattern)
        assert code == 0, (pattern, err)
        assert [m["queue_id"] for m in json.loads(out)["messages"]] == [qid], pattern


# -- one local part, two Unicode forms (RFC 6530 10.1, RFC 6532 3.1: NFC) -----------------------

NFC = "j\u00f6rg"
"""``jörg`` with a precomposed ö."""
NFD = "jo\u0308rg"
"""``jörg`` as ``o`` and a combining diaeresis: what a client that decomposes sends."""


async def test_one_local_part_in_nfc_and_nfd_is_one_recipient(tmp_path, make_node):
    """``jörg`` precomposed and decomposed is one mailbox (canonically equivalent, RFC 6530
    10.1): the duplicate check compared code points, so both were queued and the mailbox got
    two copies. The next hop gets the first spelling as the client gave it."""
    await _one_copy(tmp_path, make_node, f"{NFD}@{ULABEL}", [f"{NFC}@{ALABEL}"])


async def test_a_suppression_in_one_unicode_form_stops_the_other(tmp_path, make_node):
    """An entry written with a decomposed ö did not stop mail to the precomposed spelling
    (and the other way round), and adding both made two entries for one mailbox."""
    from tests.test_api import api_client
    node, target = await _utf8_node(tmp_path, make_node)
    try:
        async with api_client(node, tmp_path) as api:
            for local in (NFD, NFC):
                resp = await api.post("/api/v1/suppressions", json={
                    "address": f"{local}@{ULABEL}", "scope": "all", "reason": "asked"})
                assert resp.status_code == 201, resp.text
            resp = await api.post("/api/v1/suppressions", json={
                "address": f"ma\u0308x@{ULABEL}", "scope": "all", "reason": "asked"})
            assert resp.status_code == 201, resp.text
            listed = (await api.get("/api/v1/suppressions")).json()
            addresses = [e["address"] for e in listed["entries"]]
            assert addresses == [f"{NFC}@{ALABEL}", f"m\u00e4x@{ALABEL}"], listed
        await _all_refused(node, target, [f"{NFC}@{ULABEL}", f"{NFD}@{ALABEL}",
                                          f"m\u00e4x@{ULABEL}", f"MA\u0308X@{ULABEL}"])
    finally:
        await target.stop()


async def test_audit_and_api_look_ups_find_either_unicode_form(tmp_path, make_node):
    """Mail to the decomposed ``jörg`` was not found by the precomposed spelling (what most
    keyboards type): ``audit show`` and ``GET /messages``."""
    from tests.test_api import api_client
    node, target = await _utf8_node(tmp_path, make_node)
    try:
        await asyncio.to_thread(_sendmail, node.listeners[0].port, [f"{NFD}@{ULABEL}"])
        await target.wait_for(1)
        await until(lambda: [r for r in records(tmp_path) if r["type"] == "d"],
                    what="the delivery")
        async with api_client(node, tmp_path) as api:
            resp = await api.get("/api/v1/messages", params={"recipient": f"{NFC}@{ULABEL}"})
            assert resp.status_code == 200 and len(resp.json()["messages"]) == 1, resp.text
        await node.stop()
    finally:
        await target.stop()
    runner = CliRunner()
    for spelling in (f"{NFC}@{ULABEL}", f"J\u00d6RG@{ALABEL}"):
        res = runner.invoke(app, ["audit", "show", "--db", str(node.audit.path),
                                  "--recipient", spelling])
        assert res.exit_code == 0, (spelling, res.output)
        assert f"{NFD}@{ULABEL}" in res.output, spelling


async def test_queue_list_by_recipient_finds_either_unicode_form(tmp_path, sink, make_node):
    """Mail queued for the precomposed ``jörg`` was not found by the decomposed spelling."""
    cli, qid = await _held_for_joerg(tmp_path, sink, make_node)
    for pattern in (f"{NFD}@{ULABEL}", f"JO\u0308RG@{ALABEL}", f"{NFD}*"):
        code, out, err = await cli("queue", "list", "--json", "--recipient", pattern)
        assert code == 0, (pattern, err)
        assert [m["queue_id"] for m in json.loads(out)["messages"]] == [qid], pattern


# -- upper-case non-ASCII local parts in the audit store -----------------------------------------

UPPER = "J\u00d6RG"
"""``JÖRG``: SQLite's NOCASE (and lower() under a C ctype) folds ASCII only, so ``JÖRG`` is
not ``jörg`` there, though the rest of the product (``address_key``) says it is."""


async def test_audit_show_finds_an_upper_case_utf8_recipient_in_lower_case(tmp_path, make_node):
    """Mail to ``JÖRG@exämple.com`` through SMTP: ``audit show --recipient jörg@exämple.com``
    said "no records found" (the store compared with NOCASE, which folds ASCII only)."""
    shown = await _audit_shown(tmp_path, make_node, f"{UPPER}@{ULABEL}", [
        f"{NFC}@{ULABEL}", f"{NFD}@{ALABEL}", f"J\u00f6rg@{ULABEL}", f"{UPPER}@{ULABEL}"])
    for spelling, output in shown.items():
        assert f"{UPPER}@{ULABEL}" in output and "delivered" in output, spelling


def _joerg_trail(store, rcpt: str, queue_id: str = "Q1") -> None:
    from datetime import UTC, datetime

    from postlane.accounting.records import Record

    day = datetime(2026, 11, 19, 10, tzinfo=UTC).timestamp()
    store.append([(Record(type=kind, time_logged=day + i, time_queued=day, orig="s@x.test",
                          rcpt=rcpt, queue_id=queue_id, cls="policy", vmta_pool="pool"),
                   120.0, f"w-{queue_id}", i + 1) for i, kind in enumerate(("r", "d"))])


def test_audit_show_by_recipient_compares_address_keys_on_either_backend(audit_backend):
    """On both backends, the recipient look-up compares ``address_key``: the upper-case,
    decomposed, A-label spellings of one mailbox find each other, another mailbox is not
    found, and the look-up uses the key's index (no scan of the table)."""
    store = audit_backend.open()
    try:
        _joerg_trail(store, f"{UPPER}@{ULABEL}")
        _joerg_trail(store, f"j\u00f6rgen@{ULABEL}", "Q2")
    finally:
        store.close()
    runner = CliRunner()
    for spelling in (f"{NFC}@{ULABEL}", f"JO\u0308RG@{ALABEL.upper()}", f"{NFD}@{ULABEL}"):
        res = runner.invoke(app, ["audit", "show", *audit_backend.cli(), "--format", "json",
                                  "--recipient", spelling])
        assert res.exit_code == 0, (audit_backend.name, spelling, res.output)
        assert [t["queue_id"] for t in json.loads(res.output)] == ["Q1"], spelling
    res = runner.invoke(app, ["audit", "show", *audit_backend.cli(), "--recipient",
                              f"j\u00f6r@{ULABEL}"])
    assert res.exit_code == 1, res.output


@pytest.fixture
def c_ctype_dsn():
    """A database of its own created with ``LC_CTYPE=C`` (PostgreSQL's lower() then folds
    ASCII only), dropped after the test."""
    import secrets

    import psycopg

    from tests.support.pg import PG_DSN, pg_reachable

    if not pg_reachable():
        pytest.skip("PostgreSQL is not reachable on 127.0.0.1:5432 (make test starts it)")
    name = f"pl_ctype_c_{secrets.token_hex(4)}"
    with psycopg.connect(PG_DSN, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name} TEMPLATE template0 ENCODING 'UTF8'"
                     " LC_COLLATE 'C' LC_CTYPE 'C'")
    yield PG_DSN.rsplit("/", 1)[0] + f"/{name}"
    with psycopg.connect(PG_DSN, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def test_postgres_audit_look_up_does_not_depend_on_the_database_ctype(c_ctype_dsn):
    """A cluster's audit store in a database created with ``LC_CTYPE=C``: the look-up
    compared ``lower(rcpt) = lower(?)``, which folds ASCII only there, so the trail of
    ``JÖRG@exämple.com`` was not found as ``jörg@exämple.com``."""
    from postlane.audit.backend import open_store_at

    store = open_store_at(c_ctype_dsn, "postlane")
    try:
        _joerg_trail(store, f"{UPPER}@{ULABEL}")
    finally:
        store.close()
    res = CliRunner().invoke(app, ["audit", "show", "--db", c_ctype_dsn, "--format", "json",
                                   "--recipient", f"{NFC}@{ULABEL}"])
    assert res.exit_code == 0, res.output
    assert [t["queue_id"] for t in json.loads(res.output)] == ["Q1"]


def test_a_store_written_before_the_key_gets_it_for_its_rows(audit_backend):
    """A store of the release before (no ``rcpt_key``): opening it to write (the node, or
    ``postlane upgrade``) fills in the key of the rows it holds, in its migration, so their
    trails are found by key like new ones, and the chain still checks."""
    store = audit_backend.open()
    try:
        _joerg_trail(store, f"{UPPER}@{ULABEL}")
        _joerg_trail(store, "", "Q0")  # a record without a recipient keeps no key
    finally:
        store.close()
    old = {"sqlite": ("CREATE INDEX ax_rcpt ON audit_records (rcpt COLLATE NOCASE)", 5),
           "postgres": ("CREATE INDEX ax_rcpt ON audit_records (lower(rcpt))", 6)}
    index, version = old[audit_backend.name]
    audit_backend.sql(("DROP INDEX ax_rcpt_key",),
                      ("ALTER TABLE audit_records DROP COLUMN rcpt_key",), (index,),
                      ("DELETE FROM audit_migrations WHERE version = ?", (version,)))
    audit_backend.open().close()
    assert audit_backend.row(1)["rcpt_key"] == f"{NFC}@{ALABEL}"
    assert audit_backend.row(3)["rcpt_key"] is None
    res = CliRunner().invoke(app, ["audit", "show", *audit_backend.cli(), "--format", "json",
                                   "--recipient", f"{NFD}@{ALABEL}"])
    assert res.exit_code == 0, res.output
    assert [t["queue_id"] for t in json.loads(res.output)] == ["Q1"]
    res = CliRunner().invoke(app, ["audit", "verify", *audit_backend.cli()])
    assert res.exit_code == 0, res.output


async def test_a_cluster_node_finds_mail_waiting_for_an_upper_case_utf8_recipient(
        tmp_path, sink, c_ctype_dsn):
    """In a cluster whose database was created with ``LC_CTYPE=C``, mail to ``JÖRG@exämple.com``
    waiting unclaimed in the shared spool was not found by ``GET /messages?recipient=
    jörg@exämple.com``: the spool compared ``lower(address)``, which folds ASCII only there."""
    from tests.support.pg import PG_DSN
    from tests.test_api import api_client
    from tests.test_cluster import cluster_text, start_node

    node = await start_node(cluster_text(tmp_path, sink.port, "postlane", "node-a").replace(
        PG_DSN, c_ctype_dsn))
    try:
        await node.operations.pause("bulk", who=OPERATOR)
        await asyncio.to_thread(_sendmail, node.listeners[0].port, [f"{UPPER}@{ULABEL}"])
        async with node.spool.acquire() as conn:
            qid = await conn.fetchval("SELECT msg_id FROM recipients")
        async with api_client(node, tmp_path) as api:
            for spelling in (f"{UPPER}@{ULABEL}", f"{NFC}@{ULABEL}", f"{NFD}@{ALABEL}"):
                resp = await api.get("/api/v1/messages", params={"recipient": spelling})
                assert resp.status_code == 200, resp.text
                assert [m["queue_id"] for m in resp.json()["messages"]] == [qid], spelling
            resp = await api.get("/api/v1/messages", params={"recipient": f"j\u00f6r@{ULABEL}"})
            assert resp.json()["messages"] == []
    finally:
        await node.stop()


def test_the_cluster_spool_narrowing_knows_every_non_ascii_spelling_of_ascii():
    """The shared spool narrows a look-up by recipient with a LIKE pattern in which the ASCII
    characters of the key stand for themselves, except those a stored address may spell with
    a non-ASCII code point (``spool.postgres._NOT_LITERAL``): that list must be complete."""
    import unicodedata

    from postlane.spool.postgres import _NOT_LITERAL, _address_like

    found = {ch for cp in range(0x80, 0x110000) if not 0xD800 <= cp <= 0xDFFF
             for ch in unicodedata.normalize("NFC", chr(cp).lower()) if ch.isascii()}
    assert found == _NOT_LITERAL
    assert _address_like(f"{NFC}_1%@{ALABEL}") == (ALABEL, "j%rg\\_1\\%@%")
    assert _address_like("kim@x.test") == ("x.test", "%m@%")
    assert _address_like("postmaster") == ("postmaster", "postmaster")


def test_postgres_keys_rows_an_older_node_wrote_during_a_rolling_upgrade(pg_schema):
    """In a cluster upgraded node by node, nodes still on the release before append rows
    without ``rcpt_key`` after the migration: their trails were not found by recipient. The
    next node to start (or ``postlane upgrade``) keys them."""
    from postlane.audit.backend import open_store_at
    from tests.support.audit import PostgresBackend
    from tests.support.pg import PG_DSN

    backend = PostgresBackend(PG_DSN, pg_schema)
    store = open_store_at(PG_DSN, pg_schema)
    try:
        _joerg_trail(store, f"{UPPER}@{ULABEL}")
    finally:
        store.close()
    backend.sql(("UPDATE audit_records SET rcpt_key = NULL",))  # as the old release wrote
    open_store_at(PG_DSN, pg_schema).close()
    assert backend.row(2)["rcpt_key"] == f"{NFC}@{ALABEL}"
    res = CliRunner().invoke(app, ["audit", "show", *backend.cli(), "--format", "json",
                                   "--recipient", f"{NFC}@{ULABEL}"])
    assert res.exit_code == 0 and [t["queue_id"] for t in json.loads(res.output)] == ["Q1"]


def test_retention_takes_the_recipient_key_with_the_address(audit_backend):
    """The key is personal data like the address it is made from: pseudonymising replaces it
    with the pseudonym's, deleting clears it, and the chain still checks."""
    import os

    from postlane.audit.store import Retention

    store = audit_backend.open()
    try:
        _joerg_trail(store, f"{UPPER}@{ULABEL}")
        now = 1_900_000_000.0
        store.purge({"policy": Retention(pseudonymise=1)}, os.urandom(32), now)
        row = audit_backend.row(1)
        assert row["rcpt"].startswith("pseud-") and row["rcpt_key"] == row["rcpt"].replace(
            ULABEL, ALABEL)
        store.purge({"policy": Retention(delete=1)}, None, now)
        assert (audit_backend.row(1)["rcpt"], audit_backend.row(1)["rcpt_key"]) == (None, None)
        assert store.verify().ok
    finally:
        store.close()


@pytest.mark.parametrize("named", [f"jörg@{ALABEL}", f"JÖRG@{ULABEL}"])
async def test_a_remote_bounce_naming_another_spelling_leaves_the_trail_complete(
        tmp_path, make_node, named):
    """``jörg@exämple.com`` is delivered, then a remote bounce names her as ``named``:
    ``audit verify`` grouped the records of a queue id by ``lower(rcpt)``, so an "rb" in
    another spelling (A-labels, non-ASCII upper case) stood alone, a stray record of a
    recipient never received, and the trail was called incomplete."""
    import time

    from postlane.feedback.dsn import FailedRecipient, build_bounce
    from tests.test_evidence import cli as audit
    from tests.test_feedback_node import _config
    target = await Sink(smtputf8=True).start()
    try:
        text = _config(tmp_path, target.port).replace(
            "[routes]\n", f'[routes]\n"{ALABEL}" = "127.0.0.1:{target.port}"\n')
        cfg = tmp_path / "node.toml"
        cfg.write_text(text)
        node = await make_node(text)
        port = node.listeners[0].port
        await send(port, "news@insurer.test", [f"jörg@{ULABEL}"], CAMPAIGN, ["SMTPUTF8"])
        [arrival] = await target.wait_for(1)
        await until(lambda: [r["type"] for r in records(tmp_path)] == ["r", "d"],
                    what="the delivery on the record")
        dsn = build_bounce(reporting_mta="mx.example.com", sender=arrival.mail_from,
                           recipients=[FailedRecipient(named, "failed", "5.1.1",
                                                       "550 5.1.1 no such user",
                                                       "mx.example.com")],
                           original=arrival.data, arrival_date=time.time(), ret="HDRS")
        assert await send(port, "", [arrival.mail_from], dsn) == {}
        await node.stop()
    finally:
        await target.stop()
    res = await asyncio.to_thread(audit, "verify", "-c", str(cfg))
    assert res.exit_code == 0 and "INCOMPLETE" not in res.output, res.output


async def test_an_open_recipient_in_non_ascii_upper_case_is_not_called_missing(tmp_path, sink,
                                                                               make_node):
    """``JÖRG@EXÄMPLE.COM`` waits in the queue (its pool paused): ``audit verify -c`` matched
    the store's records by SQL ``lower(rcpt)`` (ASCII only in SQLite: ``jÖrg@exÄmple.com``)
    against the spool's open recipients lower-cased by Python (``jörg@exämple.com``), did not
    find it open, and called its trail incomplete ("no final record")."""
    from postlane.policy.intake import RcptIn
    from tests.conftest import message
    from tests.test_evidence import cli as audit

    text = config_text(tmp_path, sink.port)
    cfg = tmp_path / "node.toml"
    cfg.write_text(text)
    node = await make_node(text)
    await node.operations.pause("bulk", who=OPERATOR)
    await node.intake.submit("news@example.com", [RcptIn(f"JÖRG@{ULABEL.upper()}")],
                             message("offer", cls="marketing"))
    await node.flush_evidence()
    await until(lambda: [r["type"] for r in records(tmp_path) if r["rcpt"]] == ["r"],
                what="the r record")
    res = await asyncio.to_thread(audit, "verify", "-c", str(cfg))
    assert res.exit_code == 0 and "INCOMPLETE" not in res.output, res.output
    await node.stop()
    res = await asyncio.to_thread(audit, "verify", "-c", str(cfg))
    assert res.exit_code == 0 and "INCOMPLETE" not in res.output, res.output
