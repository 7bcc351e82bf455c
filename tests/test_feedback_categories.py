"""Bounce categories from real SMTP replies (as published by the providers or seen in the
../shared/testdata corpus) and the operator's rules extension."""

from __future__ import annotations

import pytest

from postlane.feedback.categories import CATEGORIES, RulesError, load_classifier

REAL = [
    ("5.1.1", "550-5.1.1 The email account that you tried to reach does not exist. Please try"
              " double-checking the recipient's email address for typos", "bad-mailbox"),
    ("", "550 Requested action not taken: mailbox unavailable (Recipient address rejected:"
         " User unknown in local recipient table)", "bad-mailbox"),
    ("5.1.2", "550 5.1.2 Host unknown (Name server: example.invalid: host not found)",
     "bad-domain"),
    ("5.2.1", "550 5.2.1 The email account that you tried to reach is disabled.",
     "inactive-mailbox"),
    ("5.2.2", "552-5.2.2 The email account that you tried to reach is over quota.",
     "quota-issues"),
    ("4.2.2", "452 4.2.2 The email account that you tried to reach is over quota.",
     "quota-issues"),
    ("5.7.1", "550 5.7.1 [192.0.2.1] Our system has detected that this message is likely"
              " unsolicited mail. To reduce the amount of spam sent to Gmail, this message has"
              " been blocked.", "spam-related"),
    ("5.7.1", "550 5.7.1 Service unavailable, Client host [192.0.2.1] blocked using"
              " Spamhaus.", "spam-related"),
    ("5.7.26", "550-5.7.26 This mail is unauthenticated, which poses a security risk to the"
               " sender and Gmail users, and has been blocked.", "policy-related"),
    ("4.7.0", "421-4.7.0 [192.0.2.1] Our system has detected an unusual rate of unsolicited"
              " mail originating from your IP address.", "spam-related"),
    ("4.7.28", "421 4.7.28 Gmail has detected an unusual rate of mail", "spam-related"),
    ("5.7.1", "554 5.7.1 The message was rejected because it contains prohibited virus or spam"
              " content", "virus-related"),
    ("5.6.0", "552 5.6.0 Headers too large (32768 max)", "content-related"),
    ("5.3.4", "552 5.3.4 Message size exceeds fixed limit", "content-related"),
    ("4.4.7", "Delivery time expired", "message-expired"),
    ("5.4.6", "554 5.4.6 Hop count exceeded - possible mail loop", "routing-errors"),
    ("5.7.1", "550 5.7.1 Unable to relay for kijitora@example.net", "relaying-issues"),
    ("5.5.1", "503 5.5.1 Error: send HELO/EHLO first", "protocol-errors"),
    ("4.4.1", "421 4.4.1 Connection timed out", "no-answer-from-host"),
    # Microsoft 365 Directory-Based Edge Blocking: no such recipient in the tenant
    ("5.4.1", "550 5.4.1 [kijitora@example.org]: Recipient address rejected: Access denied"
              " [NEKOCHAN.cat-neko22.prod.protection.outlook.com]", "bad-mailbox"),
    ("4.4.2", "421 4.4.2 Connection dropped", "bad-connection"),
    ("5.1.8", "553 5.1.8 <sender@nxdomain.example>... Domain of sender address does not exist",
     "invalid-sender"),
    ("5.3.5", "554 5.3.5 Local configuration error", "bad-configuration"),
    ("5.7.1", "554 5.7.1 Message rejected under policy of the recipient domain",
     "policy-related"),
    ("5.3.2", "452 5.3.2 Service not available, closing transmission channel", "other"),
    # OpenSMTPD's DSN for a recipient domain without DNS ("Domain does not exist", no
    # Diagnostic-Code): a domain-level failure, which never suppresses; it was a bad mailbox
    # (the bare "does not exist" of the mailbox pattern), so the address was suppressed
    ("5.0.0", "Domain does not exist", "bad-domain"),
    ("", "kijitora@neko.example.jp: Domain does not exist", "bad-domain"),
    ("5.0.0", "Host does not exist", "bad-domain"),
    ("5.0.0", "The mailbox does not exist", "bad-mailbox"),
    # Exim's DSN when it gave up on a recipient after its retry rules: not a connection
    # failure ("timeout" came first)
    ("5.0.0", "retry timeout exceeded", "message-expired"),
    ("", "connect to mx.example.com[192.0.2.1]:25: Connection timed out", "bad-connection"),
]


@pytest.mark.parametrize(("status", "text", "category"), REAL)
def test_real_replies(status: str, text: str, category: str) -> None:
    assert load_classifier(None).classify(status, text) == category


def test_every_category_is_reachable_from_real_replies() -> None:
    assert {c for _, _, c in REAL} == CATEGORIES


def test_operator_rules_come_first_and_bad_rules_are_named(tmp_path) -> None:
    rules = tmp_path / "rules.toml"
    rules.write_text('[status]\n"X.7.26" = "invalid-sender"\n'
                     '[[pattern]]\nregex = "nyaan"\ncategory = "bad-configuration"\n')
    clf = load_classifier(rules)
    assert clf.classify("5.7.26", "unauthenticated") == "invalid-sender"
    assert clf.classify("", "550 nyaan blocked as spam") == "bad-configuration"
    assert clf.classify("5.1.1", "user unknown") == "bad-mailbox"  # built-ins still apply
    rules.write_text('[[pattern]]\nregex = "("\ncategory = "other"\n')
    with pytest.raises(RulesError, match=r"pattern\[0\]\.regex"):
        load_classifier(rules)
    rules.write_text('[status]\n"X.1.1" = "no-such-category"\n')
    with pytest.raises(RulesError, match="unknown category 'no-such-category'"):
        load_classifier(rules)


def test_a_pattern_for_codes_outranks_their_status_only(tmp_path) -> None:
    rules = tmp_path / "rules.toml"
    rules.write_text('[[pattern]]\nregex = "nyaan"\ncategory = "quota-issues"\n'
                     'codes = ["X.4.4"]\n')
    clf = load_classifier(rules)
    assert clf.classify("5.4.4", "550 5.4.4 nyaan") == "quota-issues"
    assert clf.classify("5.4.4", "550 5.4.4 unable to route") == "routing-errors"
    assert clf.classify("5.7.1", "550 5.7.1 nyaan") != "quota-issues"
    rules.write_text('[[pattern]]\nregex = "x"\ncategory = "other"\ncodes = "X.4.1"\n')
    with pytest.raises(RulesError, match=r"pattern\[0\]\.codes"):
        load_classifier(rules)
