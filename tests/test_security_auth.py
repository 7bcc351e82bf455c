"""Submission security: AUTH only over TLS, per-user classes and sender domains, no open relay,
no secret in any log."""

from __future__ import annotations

import asyncio
import base64
import logging
import re
import smtplib
import ssl

import pytest

from postlane.cli.edge import selfsigned
from postlane.policy.users import User, hash_password, save_user, verify_password
from postlane.startup import ConfigError, parse_config
from tests.conftest import config_text, message, records
from tests.support.rawsmtp import RawSMTP, session
from tests.support.waiting import until

PASSWORD = "correct horse battery staple"


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tls")
    cert, key = selfsigned("localhost")
    (folder / "cert.pem").write_bytes(cert)
    (folder / "key.pem").write_bytes(key)
    return folder / "cert.pem", folder / "key.pem"


@pytest.fixture(scope="module")
def users_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("users") / "users.toml"
    hashed = hash_password(PASSWORD)
    save_user(path, User("alice", hashed, ["policy-documents", "marketing"], "policy-documents",
                         ["insurer.test"]))
    save_user(path, User("bob", hashed, ["marketing"], None, ["insurer.test"]))
    return path


def secure_config(tmp_path, sink_port, tls_files, users_file, *, tls="starttls",
                  require_auth=False, relay_from='["10.0.0.0/8"]', extra="") -> str:
    cert, key = tls_files
    return config_text(tmp_path, sink_port, f"""
[security]
users_file = "{users_file}"
[listeners.sub]
address = "127.0.0.1"
port = 0
tls = "{tls}"
tls_cert = "{cert}"
tls_key = "{key}"
require_auth = {str(require_auth).lower()}
relay_from = {relay_from}
{extra}
""")


def _client_ctx() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def _submit(port: int, *, tls: str, user: str | None, password: str = PASSWORD,
            mail_from: str = "notices@insurer.test", data: bytes | None = None) -> dict:
    if tls == "implicit":
        client: smtplib.SMTP = smtplib.SMTP_SSL("127.0.0.1", port, timeout=30,
                                                context=_client_ctx())
    else:
        client = smtplib.SMTP("127.0.0.1", port, timeout=30)
    with client:
        client.ehlo("client.test")
        if tls == "starttls":
            client.starttls(context=_client_ctx())
            client.ehlo("client.test")
        if user is not None:
            client.login(user, password)
        return client.sendmail(mail_from, ["a@example.com"], data or message("secure"))


async def submit(port: int, **kwargs) -> dict:
    return await asyncio.to_thread(_submit, port, **kwargs)



def test_password_hash_is_salted_and_verifies():
    a, b = hash_password("pw-123456"), hash_password("pw-123456")
    assert a != b and a.startswith("scrypt$")
    assert verify_password("pw-123456", a) and not verify_password("pw-1234567", a)
    assert not verify_password("pw-123456", "scrypt$garbage")


async def test_no_auth_from_a_foreign_ip_is_not_relayed(tmp_path, sink, make_node, tls_files,
                                                        users_file):
    node = await make_node(secure_config(tmp_path, sink.port, tls_files, users_file,
                                         relay_from="[]"))
    with pytest.raises(smtplib.SMTPRecipientsRefused) as err:
        await submit(node.listeners[1].port, tls="starttls", user=None)
    code, text = err.value.recipients["a@example.com"]
    assert code == 550 and text.startswith(b"5.7.1")


async def test_auth_is_not_offered_or_accepted_without_tls(tmp_path, sink, make_node, tls_files,
                                                           users_file):
    node = await make_node(secure_config(tmp_path, sink.port, tls_files, users_file,
                                         relay_from="[]"))

    def plain_session() -> tuple[str, int, bytes, int]:
        with smtplib.SMTP("127.0.0.1", node.listeners[1].port, timeout=30) as c:
            c.ehlo("client.test")
            blob = base64.b64encode(f"\0alice\0{PASSWORD}".encode()).decode()
            code, text = c.docmd("AUTH", f"PLAIN {blob}")
            rcode = c.docmd("MAIL", "FROM:<notices@insurer.test>")[0]
            rcpt = c.docmd("RCPT", "TO:<a@example.com>")[0]
            return c.ehlo_resp.decode(), code, text, rcpt or rcode

    ehlo, code, text, rcpt = await asyncio.to_thread(plain_session)
    assert "AUTH" not in ehlo and "STARTTLS" in ehlo
    assert code == 538 and text.startswith(b"5.7.11")
    assert rcpt == 550
    assert not sink.arrivals


async def test_wrong_password_is_refused_and_never_logged(tmp_path, sink, make_node, tls_files,
                                                          users_file, caplog):
    caplog.set_level(logging.DEBUG)
    node = await make_node(secure_config(tmp_path, sink.port, tls_files, users_file,
                                         relay_from="[]"))
    wrong = "not-the-password-4711"
    with pytest.raises(smtplib.SMTPAuthenticationError) as err:
        await submit(node.listeners[1].port, tls="starttls", user="alice", password=wrong)
    assert err.value.smtp_code == 535
    await submit(node.listeners[1].port, tls="starttls", user="alice")  # and a good one
    await sink.wait_for(1)
    secrets = [wrong, PASSWORD]
    forms = {s for p in secrets for s in (p, base64.b64encode(p.encode()).decode(),
                                          base64.b64encode(f"\0alice\0{p}".encode()).decode())}
    text = caplog.text + "".join(str(r.__dict__) for r in caplog.records)
    assert not [f for f in forms if f in text]
    assert "AUTH PLAIN failed" in caplog.text  # the failure itself is logged, without secrets


async def test_user_relays_with_default_class_and_is_accounted(tmp_path, sink, make_node,
                                                               tls_files, users_file, caplog):
    node = await make_node(secure_config(tmp_path, sink.port, tls_files, users_file,
                                         relay_from="[]"))
    with caplog.at_level(logging.WARNING):
        await submit(node.listeners[1].port, tls="starttls", user="alice")
    assert "login_data" not in caplog.text, "aiosmtpd's own deprecation, once per login"
    [arrival] = await sink.wait_for(1)
    assert arrival.peer == "127.0.0.20", "alice's default class is policy-documents"
    await node.stop()
    [received] = [r for r in records(tmp_path) if r["type"] == "r"]
    assert received["authUser"] == "alice"


async def test_forged_sender_domain_and_disallowed_class_are_refused(tmp_path, sink, make_node,
                                                                     tls_files, users_file):
    node = await make_node(secure_config(tmp_path, sink.port, tls_files, users_file,
                                         relay_from="[]"))
    port = node.listeners[1].port
    with pytest.raises(smtplib.SMTPSenderRefused) as err:
        await submit(port, tls="starttls", user="alice", mail_from="ceo@bank.example")
    assert err.value.smtp_code == 550 and err.value.smtp_error.startswith(b"5.7.1")
    with pytest.raises(smtplib.SMTPDataError) as err2:
        await submit(port, tls="starttls", user="bob",
                     data=message("x", cls="policy-documents"))
    assert err2.value.smtp_code == 550 and b"may not send class" in err2.value.smtp_error
    with pytest.raises(smtplib.SMTPDataError):  # bob has no default; the node's is marketing,
        await submit(port, tls="starttls", user="bob", data=message("x", cls="no-such"))
    await submit(port, tls="starttls", user="bob")  # marketing (node default) is allowed
    [arrival] = await sink.wait_for(1)
    assert arrival.peer == "127.0.0.30"


async def test_implicit_tls_listener(tmp_path, sink, make_node, tls_files, users_file):
    node = await make_node(secure_config(tmp_path, sink.port, tls_files, users_file,
                                         tls="implicit", relay_from="[]"))
    await submit(node.listeners[1].port, tls="implicit", user="alice")
    [arrival] = await sink.wait_for(1)
    assert arrival.rcpts == ["a@example.com"]


async def test_require_auth_ignores_relay_from(tmp_path, sink, make_node, tls_files, users_file):
    node = await make_node(secure_config(tmp_path, sink.port, tls_files, users_file,
                                         require_auth=True, relay_from='["127.0.0.0/8"]'))
    with pytest.raises(smtplib.SMTPSenderRefused) as err:
        await submit(node.listeners[1].port, tls="starttls", user=None)
    assert err.value.smtp_code == 530
    await submit(node.listeners[1].port, tls="starttls", user="alice")
    await sink.wait_for(1)


def test_security_config_errors(tmp_path, tls_files, users_file):
    with pytest.raises(ConfigError) as err:
        parse_config(config_text(tmp_path, 2525, """
[listeners.sub]
tls = "starttls"
tls_cert = "/etc/ssl/certs/nope.pem"
require_auth = true
"""))
    text = "\n".join(err.value.errors)
    assert "listeners.sub.tls_cert/tls_key: give both the certificate and the key file" in text
    assert "listeners.sub.require_auth: needs security.users_file" in text
    bad_users = tmp_path / "users.toml"
    bad_users.write_text('[users.eve]\npassword = "plain"\n')
    with pytest.raises(ConfigError) as err2:
        parse_config(config_text(tmp_path, 2525, f'[security]\nusers_file = "{bad_users}"\n'))
    assert "never store a plain password" in "\n".join(err2.value.errors)
    bad_users.write_text('[users.mal]\npassword = "scrypt$x"\nclasses = ["nope"]\n')
    with pytest.raises(ConfigError) as err2:
        parse_config(config_text(tmp_path, 2525, f'[security]\nusers_file = "{bad_users}"\n'))
    assert "user 'mal': no class named 'nope'" in "\n".join(err2.value.errors)
    with pytest.raises(ConfigError) as err3:
        parse_config(config_text(tmp_path, 2525, '[listeners.x]\ntls = "none"\n'
                                                 'require_auth = true\n'))
    assert "listeners.x.require_auth: needs TLS" in "\n".join(err3.value.errors)


async def test_password_guessing_is_cut_off_per_client(tmp_path, sink, make_node, tls_files,
                                                       users_file):
    node = await make_node(secure_config(tmp_path, sink.port, tls_files, users_file,
                                         extra="[listeners.sub.limits]\nmax_bad_commands = 50"
                                         ).replace("[security]\n", "[security]\n"
                                                   "auth_failures_per_minute = 2\n"))

    def guesses() -> list[int]:
        codes = []
        with smtplib.SMTP("127.0.0.1", node.listeners[1].port, timeout=30) as c:
            c.ehlo("client.test")
            c.starttls(context=_client_ctx())
            c.ehlo("client.test")
            for i in range(4):
                blob = base64.b64encode(f"\0alice\0guess-{i}".encode()).decode()
                codes.append(c.docmd("AUTH", f"PLAIN {blob}")[0])
            blob = base64.b64encode(f"\0alice\0{PASSWORD}".encode()).decode()
            codes.append(c.docmd("AUTH", f"PLAIN {blob}")[0])  # even the right one, for now
        return codes

    assert await asyncio.to_thread(guesses) == [535, 535, 454, 454, 454]


async def test_messages_per_minute_counts_per_auth_user(tmp_path, sink, make_node, tls_files,
                                                        users_file):
    node = await make_node(secure_config(tmp_path, sink.port, tls_files, users_file,
                                         relay_from="[]",
                                         extra="[listeners.sub.limits]\nmessages_per_minute = 1"))
    port = node.listeners[1].port
    await submit(port, tls="starttls", user="alice")
    with pytest.raises(smtplib.SMTPSenderRefused) as err:  # a new connection, the same user
        await submit(port, tls="starttls", user="alice")
    assert err.value.smtp_code == 450 and err.value.smtp_error.startswith(b"4.7.1")
    await submit(port, tls="starttls", user="bob")  # another user has their own allowance
    await sink.wait_for(2)


async def test_failed_tls_handshakes_leave_the_listener_serving(tmp_path, sink, make_node,
                                                                tls_files, users_file):
    node = await make_node(secure_config(tmp_path, sink.port, tls_files, users_file,
                                         relay_from="[]"))
    starttls = node.listeners[1]
    raw = await session(starttls.port)
    assert (await raw.cmd("STARTTLS")).startswith("220")
    raw.send(b"this is not a TLS ClientHello\r\n" * 4)
    assert await raw.closed()
    implicit = await make_node(secure_config(tmp_path / "b", sink.port, tls_files, users_file,
                                             tls="implicit", relay_from="[]"))
    plain = await RawSMTP.connect(implicit.listeners[1].port)
    plain.send(b"EHLO plaintext.test\r\n")
    assert await plain.closed()
    await until(lambda: starttls.handler.guard.connections.total == 0
                and implicit.listeners[1].handler.guard.connections.total == 0,
                what="both listeners let go of the failed connections")
    assert starttls.handler.guard.connections.total == 0
    assert implicit.listeners[1].handler.guard.connections.total == 0
    await submit(starttls.port, tls="starttls", user="alice")
    await submit(implicit.listeners[1].port, tls="implicit", user="alice")
    await sink.wait_for(2)


async def test_auth_login_mechanism(tmp_path, sink, make_node, tls_files, users_file):
    node = await make_node(secure_config(tmp_path, sink.port, tls_files, users_file,
                                         relay_from="[]"))

    def login(password: str) -> int:
        with smtplib.SMTP("127.0.0.1", node.listeners[1].port, timeout=30) as c:
            c.ehlo("client.test")
            c.starttls(context=_client_ctx())
            c.ehlo("client.test")
            assert c.esmtp_features["auth"].split() == ["LOGIN", "PLAIN"]
            c.user, c.password = "alice", password
            try:
                return c.auth("LOGIN", c.auth_login)[0]
            except smtplib.SMTPAuthenticationError as exc:
                return exc.smtp_code

    assert await asyncio.to_thread(login, PASSWORD) == 235
    assert await asyncio.to_thread(login, "wrong-password") == 535


async def test_received_names_the_protocol(tmp_path, sink, make_node, tls_files, users_file):
    """The Received field's "with" says what the client did (RFC 3848, RFC 6531): an auditor
    reading a header can tell a message came over TLS, from a logged-in user."""
    node = await make_node(secure_config(tmp_path, sink.port, tls_files, users_file,
                                         relay_from='["127.0.0.0/8"]'))
    port = node.listeners[1].port
    await submit(port, tls="starttls", user="alice")
    await submit(port, tls="starttls", user=None)
    await submit(port, tls="none", user=None)

    def helo_and_utf8() -> None:
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as c:
            c.helo("client.test")
            c.sendmail("notices@insurer.test", ["a@example.com"], message("helo"))
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as c:
            c.ehlo("client.test")
            c.sendmail("notices@insurer.test", ["ü@example.com"], message("utf8"),
                       mail_options=["SMTPUTF8"])

    await asyncio.to_thread(helo_and_utf8)
    arrivals = await sink.wait_for(5)
    withs = sorted(re.search(rb"\(Postlane\) with (\S+) id", a.data)[1].decode()
                   for a in arrivals)
    assert withs == ["ESMTP", "ESMTPS", "ESMTPSA", "SMTP", "UTF8SMTP"]


async def test_a_long_auth_line_is_checked_not_refused_as_too_long(tmp_path, sink, make_node,
                                                                    tls_files, users_file):
    """AUTH's line may be longer than 512 octets (RFC 4954 4: up to 12,288): a long password
    is checked (535), not answered "line too long"."""
    node = await make_node(secure_config(tmp_path, sink.port, tls_files, users_file,
                                         relay_from="[]"))

    def long_auth() -> tuple[int, bytes]:
        with smtplib.SMTP("127.0.0.1", node.listeners[1].port, timeout=30) as c:
            c.ehlo("client.test")
            c.starttls(context=_client_ctx())
            c.ehlo("client.test")
            blob = base64.b64encode(b"\0alice\0" + b"p" * 500).decode()
            return c.docmd("AUTH", f"PLAIN {blob}")

    code, text = await asyncio.to_thread(long_auth)
    assert code == 535, text


async def test_help_lists_what_ehlo_offers(tmp_path, sink, make_node, tls_files, users_file):
    """HELP listed AUTH where it is not offered (before TLS) and STARTTLS inside TLS."""
    node = await make_node(secure_config(tmp_path, sink.port, tls_files, users_file))

    def helps() -> tuple[str, str]:
        with smtplib.SMTP("127.0.0.1", node.listeners[1].port, timeout=30) as c:
            c.ehlo("client.test")
            before = c.docmd("HELP")[1].decode()
            c.starttls(context=_client_ctx())
            c.ehlo("client.test")
            return before, c.docmd("HELP")[1].decode()

    before, inside = await asyncio.to_thread(helps)
    assert "STARTTLS" in before.split() and "AUTH" not in before.split()
    assert "STARTTLS" not in inside.split() and "AUTH" in inside.split()


async def test_auth_plain_refuses_another_authorization_identity(tmp_path, sink, make_node,
                                                                 tls_files, users_file):
    """RFC 4616 2: a user may not act as another (aiosmtpd ignored the authorization identity:
    "mallory\\0alice\\0pw" logged in as alice); the user's own name there is fine."""
    node = await make_node(secure_config(tmp_path, sink.port, tls_files, users_file))

    def auth(authzid: str) -> int:
        with smtplib.SMTP("127.0.0.1", node.listeners[1].port, timeout=30) as c:
            c.ehlo("client.test")
            c.starttls(context=_client_ctx())
            c.ehlo("client.test")
            blob = base64.b64encode(f"{authzid}\0alice\0{PASSWORD}".encode()).decode()
            return c.docmd("AUTH", f"PLAIN {blob}")[0]

    assert await asyncio.to_thread(auth, "mallory") == 535
    assert await asyncio.to_thread(auth, "alice") == 235
    assert await asyncio.to_thread(auth, "") == 235


async def test_a_clients_bad_commands_and_aborted_auth_log_no_warning(tmp_path, sink, make_node,
                                                                       tls_files, users_file,
                                                                       caplog):
    """aiosmtpd logs a WARNING for each unknown command and each AUTH a client cancels with
    "*": a client's doing, not the operator's, and a way to flood the log a line per command.
    The edge counts them with the other bad commands (and logs the cut-off itself)."""
    node = await make_node(secure_config(tmp_path, sink.port, tls_files, users_file,
                                         relay_from="[]"))

    def session_with_mistakes() -> list[int]:
        with smtplib.SMTP("127.0.0.1", node.listeners[1].port, timeout=30) as c:
            c.ehlo("client.test")
            codes = [c.docmd("XYZZY")[0], c.docmd("FROB", "nicate")[0]]
            c.starttls(context=_client_ctx())
            c.ehlo("client.test")
            codes.append(c.docmd("AUTH", "LOGIN")[0])
            codes.append(c.docmd("*")[0])
            return codes

    with caplog.at_level(logging.INFO):
        assert await asyncio.to_thread(session_with_mistakes) == [500, 500, 334, 501]
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING
                and r.name == "mail.log"], caplog.text
