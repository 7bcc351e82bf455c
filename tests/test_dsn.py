from __future__ import annotations

import email
from email.message import Message
from email.policy import SMTP
from email.utils import parsedate_to_datetime

import pytest

from postlane.feedback.dsn import FailedRecipient, build_bounce, should_bounce

NOW = 1_800_000_000.0
ORIGINAL = (
    b"From: Alice <alice@bank.example>\n"
    b"To: bob@example.net, carol@example.net\n"
    b"Subject: Your statement\n"
    b"Message-ID: <stmt-1@bank.example>\n"
    b"\n"
    b"Dear customer,\n"
    b"SECRET-BODY-LINE \xc3\xa9\n"
)


def recipients() -> list[FailedRecipient]:
    return [
        FailedRecipient(
            address="bob@example.net",
            action="failed",
            status="5.1.1",
            diagnostic="550 5.1.1 <bob@example.net>: no such user",
            remote_mta="mx1.example.net",
            orcpt="rfc822;bob@example.net",
            last_attempt=NOW - 10,
        ),
        FailedRecipient(
            address="carol@example.net",
            action="failed",
            status="4.4.7",
            diagnostic="451-4.7.1 greylisted\r\n451 4.7.1 try again later",
            remote_mta="mx2.example.net",
        ),
    ]


def bounce(**kw: object) -> Message:
    args: dict[str, object] = dict(
        reporting_mta="mta1.postlane.example",
        sender="<alice@bank.example>",
        recipients=recipients(),
        original=ORIGINAL,
        arrival_date=NOW - 3600,
        envid="ENV-42",
        queue_id="Q0001",
        now=NOW,
    )
    args.update(kw)
    raw = build_bounce(**args)  # type: ignore[arg-type]
    assert b"\n" not in raw.replace(b"\r\n", b""), "bare LF in output"
    return email.message_from_bytes(raw, policy=SMTP)


def test_bounce_structure_and_delivery_status() -> None:
    msg = bounce()
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    assert msg["From"] == "Mail Delivery System <MAILER-DAEMON@mta1.postlane.example>"
    assert msg["To"] == "alice@bank.example"
    assert msg["Subject"] == "Undelivered Mail Returned to Sender"
    assert msg["Auto-Submitted"] == "auto-replied"
    assert msg["Message-ID"].endswith("@mta1.postlane.example>")
    assert parsedate_to_datetime(msg["Date"]).timestamp() == NOW

    human, status, original = msg.get_payload()
    assert human.get_content_type() == "text/plain"
    text = human.get_content()
    assert "<bob@example.net>: host mx1.example.net said: 550 5.1.1" in text
    assert "451 4.7.1 try again later" in text

    assert status.get_content_type() == "message/delivery-status"
    per_message, bob, carol = status.get_payload()
    assert per_message["Reporting-MTA"] == "dns; mta1.postlane.example"
    assert per_message["Original-Envelope-Id"] == "ENV-42"
    assert per_message["X-Postlane-Queue-ID"] == "Q0001"
    assert parsedate_to_datetime(per_message["Arrival-Date"]).timestamp() == NOW - 3600

    assert bob["Original-Recipient"] == "rfc822;bob@example.net"
    assert bob["Final-Recipient"] == "rfc822; bob@example.net"
    assert bob["Action"] == "failed"
    assert bob["Status"] == "5.1.1"
    assert bob["Remote-MTA"] == "dns; mx1.example.net"
    assert bob["Diagnostic-Code"] == "smtp; 550 5.1.1 <bob@example.net>: no such user"
    assert parsedate_to_datetime(bob["Last-Attempt-Date"]).timestamp() == NOW - 10

    assert carol["Original-Recipient"] is None
    assert carol["Final-Recipient"] == "rfc822; carol@example.net"
    assert carol["Status"] == "4.4.7"
    assert carol["Diagnostic-Code"] == ("smtp; 451-4.7.1 greylisted 451 4.7.1 try again later")
    assert carol["Last-Attempt-Date"] is None

    # RET=HDRS (default): headers only, never the body.
    assert original.get_content_type() == "text/rfc822-headers"
    headers = original.get_payload(decode=True)
    assert b"Message-ID: <stmt-1@bank.example>\r\n" in headers
    assert b"Subject: Your statement" in headers
    assert b"SECRET-BODY-LINE" not in headers


def test_ret_full_includes_original_verbatim() -> None:
    raw = build_bounce(
        reporting_mta="mta1.postlane.example",
        sender="alice@bank.example",
        recipients=recipients(),
        original=ORIGINAL,
        arrival_date=NOW,
        ret="FULL",
        now=NOW,
    )
    assert ORIGINAL.replace(b"\n", b"\r\n") in raw
    msg = email.message_from_bytes(raw, policy=SMTP)
    part = msg.get_payload()[2]
    assert part.get_content_type() == "message/rfc822"
    inner = part.get_payload()[0]
    assert inner["Message-ID"] == "<stmt-1@bank.example>"
    assert b"SECRET-BODY-LINE \xc3\xa9" in inner.get_payload(decode=True)
    assert msg.get_payload()[1].get_payload()[0]["Original-Envelope-Id"] is None


def test_all_delayed_subject_and_postmaster() -> None:
    delayed = [FailedRecipient("bob@example.net", "delayed", "4.2.1", "452 4.2.1 mailbox full")]
    msg = bounce(recipients=delayed, postmaster="postmaster@bank.example")
    assert msg["Subject"] == "Delayed Mail (still being retried)"
    assert msg["From"] == "Mail Delivery System <postmaster@bank.example>"
    assert msg.get_payload()[1].get_payload()[1]["Action"] == "delayed"
    assert "WARNING ONLY" in msg.get_payload()[0].get_content()


def test_non_ascii_diagnostic_stays_ascii_in_status_part() -> None:
    rcpt = FailedRecipient("bob@example.net", "failed", "5.2.2", "552 boîte pleine")
    status = bounce(recipients=[rcpt]).get_payload()[1].get_payload()[1]
    assert status["Diagnostic-Code"] == "smtp; 552 bo\\x{EE}te pleine"


def test_header_injection_is_neutralised() -> None:
    rcpt = FailedRecipient("bob@example.net", "failed", "5.0.0", "550 no\r\nBcc: evil@x")
    status = bounce(recipients=[rcpt]).get_payload()[1].get_payload()[1]
    assert status["Bcc"] is None
    assert status["Diagnostic-Code"] == "smtp; 550 no Bcc: evil@x"


@pytest.mark.parametrize(
    "kw",
    [
        {"sender": "<>"},
        {"recipients": []},
        {"ret": "BODY"},
        {"recipients": [FailedRecipient("b@example.net", "bounced", "5.1.1")]},
        {"recipients": [FailedRecipient("b@example.net", "failed", "550")]},
    ],
)
def test_invalid_arguments(kw: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        bounce(**kw)


@pytest.mark.parametrize(
    ("sender", "expected"),
    [
        ("", False),
        ("<>", False),
        (" <> ", False),
        ("MAILER-DAEMON@mx.example.net", False),
        ("<mailer-daemon@mx.example.net>", False),
        ("MAILER-DAEMON", False),
        ("alice@bank.example", True),
        ("<bounces+123@bank.example>", True),
        ("postmaster@bank.example", True),
    ],
)
def test_should_bounce(sender: str, expected: bool) -> None:
    assert should_bounce(sender) is expected


def test_original_recipient_is_the_orcpt_decoded_from_xtext() -> None:
    """RFC 3461 4.2: ORCPT is xtext (``+`` is ``+2B``); the DSN field carries the address
    itself, as Postfix and Sendmail write it, and Postlane's parser reads it back."""
    r = FailedRecipient(address="bob+tag@example.net", action="failed", status="5.1.1",
                        orcpt="rfc822;Bob+2Btag+3Dx@example.net")
    _, status, _ = bounce(recipients=[r]).get_payload()
    assert status.get_payload()[1]["Original-Recipient"] == "rfc822;Bob+tag=x@example.net"
    r.orcpt = "utf-8;j\\x{F6}rg@example.net"  # RFC 6533 utf-8-addr-xtext: already DSN form
    _, status, _ = bounce(recipients=[r]).get_payload()
    assert status.get_payload()[1]["Original-Recipient"] == "utf-8;j\\x{F6}rg@example.net"


def test_original_envelope_id_is_the_envid_decoded_from_xtext() -> None:
    """RFC 3461 4.4: ENVID is xtext too; the DSN shows the sender's identifier itself."""
    per_message = bounce(envid="ORDER+2B42+3Dx").get_payload()[1].get_payload()[0]
    assert per_message["Original-Envelope-Id"] == "ORDER+42=x"


def test_xtext_of_utf8_octets_decodes_to_the_characters() -> None:
    """xtext encodes octets, and clients encode a UTF-8 ORCPT and ENVID octet by octet
    (nodemailer: ``ORCPT=rfc822;+C3+BCnal@example.com`` for ``ünal@example.com``). Each octet
    became a character of its own: the report said ``\\x{C3}\\x{BC}nal`` ("Ã¼nal") where RFC
    6533 means code points, and the address the sender gave could not be matched."""
    r = FailedRecipient(address="ünal@example.com", action="failed", status="5.1.1",
                        orcpt="rfc822;+C3+BCnal@example.com")
    msg = bounce(recipients=[r], envid="+C3+AFd-1")
    per_message, status = msg.get_payload()[1].get_payload()
    assert status["Original-Recipient"] == "utf-8; \\x{FC}nal@example.com"
    assert status["Final-Recipient"] == "utf-8; \\x{FC}nal@example.com"
    assert per_message["Original-Envelope-Id"] == "\\x{EF}d-1"
    r.orcpt = "rfc822;caf+E9@example.com"  # not UTF-8: one octet, one character, as before
    status = bounce(recipients=[r]).get_payload()[1].get_payload()[1]
    assert status["Original-Recipient"] == "utf-8; caf\\x{E9}@example.com"


def test_xtext_that_decodes_to_a_line_break_or_control_is_escaped() -> None:
    """An ORCPT of ``a+0D+0ABcc:+20x@y`` is valid xtext; it was one-lined before it was decoded,
    so the decoded CR LF reached the email package, which refused the field: the DSN could not
    be built and the sender never learnt of the bounce. A control character in ENVID or a remote
    reply (NUL, ESC) went into the report as it was."""
    rcpt = FailedRecipient("bob@example.net", "failed", "5.1.1", "550 no\x1b[2J\x00 such user",
                           orcpt="rfc822;bob+0D+0ABcc:+20evil@example.net")
    msg = bounce(recipients=[rcpt], envid="E+00+1B[2J+0D+0AX-Env:+20y")
    per_message, status = msg.get_payload()[1].get_payload()
    assert status["Bcc"] is None and per_message["X-Env"] is None
    assert status["Original-Recipient"] == "rfc822;bob\\x{D}\\x{A}Bcc: evil@example.net"
    assert status["Diagnostic-Code"] == "smtp; 550 no\\x{1B}[2J\\x{0} such user"
    assert per_message["Original-Envelope-Id"] == "E\\x{0}\\x{1B}[2J\\x{D}\\x{A}X-Env: y"


ENCODED_CRLF = "=?utf-8?q?=0D=0AAction:_delivered=0D=0AStatus:_2.0.0?="
"""An RFC 2047 encoded word of CR LF ``Action: delivered`` CR LF ``Status: 2.0.0``: valid text
in a quoted local part (RFC 5321 4.1.2), so the edge accepts it in an address."""


def test_an_encoded_word_in_an_address_is_not_decoded_into_the_report() -> None:
    """The email package decodes encoded words when a field is set (even inside a quoted local
    part) and wrote the decoded line break out: a recipient ``"=?…?="@x`` forged ``Action`` and
    ``Status`` fields in the machine-readable report, and a sender of that form made the DSN
    impossible to build (``address parts cannot contain CR or LF``): the bounce was lost."""
    address = f'"{ENCODED_CRLF}"@example.net'
    rcpt = FailedRecipient(address, "failed", "5.1.1", "550 no such user")
    msg = bounce(sender=address, recipients=[rcpt])
    assert msg["To"] is not None and "\r" not in str(msg["To"])
    status = msg.get_payload()[1].get_payload()[1]
    assert status.get_all("Action") == ["failed"] and status.get_all("Status") == ["5.1.1"]
    assert status["Final-Recipient"].startswith('rfc822; "=\\x{3F}utf-8')


def test_the_returned_message_keeps_its_header_fields_as_they_were() -> None:
    """RET=FULL re-wrote the original's fields longer than the line limit, decoding their
    encoded words: a long Subject of encoded CR LF became fields of their own in the copy."""
    original = (b"From: a@bank.example\r\nSubject: " + (ENCODED_CRLF.encode() + b" ") * 30
                + b"\r\n\r\nbody\r\n")
    raw = build_bounce(reporting_mta="mta.test", sender="back@example.net",
                       recipients=recipients(), original=original, arrival_date=NOW, ret="FULL",
                       now=NOW)
    assert b"\r\nAction: delivered" not in raw and b"\r\nStatus: 2.0.0" not in raw
    assert b"Subject: " + ENCODED_CRLF.encode() in raw


@pytest.mark.parametrize(("ret", "ctype"), [("HDRS", "message/global-headers"),
                                            ("FULL", "message/global")])
def test_utf8_headers_are_returned_as_message_global(ret: str, ctype: str) -> None:
    """RFC 6533 6.3: an original with UTF-8 header fields (an SMTPUTF8 message) is returned as
    message/global(-headers), not as text/rfc822-headers or message/rfc822 (both ASCII-header
    types); its bytes kept, and our own bounce parser finds it again."""
    from postlane.feedback.arf import returned_message

    original = ("From: prüfer@example.org\r\nSubject: Prüfung\r\n"
                "Message-ID: <u@example.org>\r\n\r\nGrüße\r\n").encode()
    raw = build_bounce(reporting_mta="mta.test", sender="s@example.com",
                       recipients=[FailedRecipient("a@example.net", "failed", "5.6.7")],
                       original=original, arrival_date=NOW, ret=ret, now=NOW)
    assert f"Content-Type: {ctype}\r\nContent-Transfer-Encoding: 8bit".encode() in raw
    assert b"Subject: Pr\xc3\xbcfung\r\n" in raw
    assert (b"Gr\xc3\xbc\xc3\x9fe" in raw) == (ret == "FULL")
    back = returned_message(email.message_from_bytes(raw))
    assert back is not None and back["Message-ID"] == "<u@example.org>"
