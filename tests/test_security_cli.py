"""``postlane users`` and ``postlane tls``: files written safely, bad input refused clearly."""

from __future__ import annotations

import ssl

from typer.testing import CliRunner

from postlane.cli import app
from postlane.policy.users import Users

runner = CliRunner()


def test_users_add_list_and_check(tmp_path):
    users, pw = tmp_path / "users.toml", tmp_path / "pw"
    pw.write_text("s3cret-password\n")
    result = runner.invoke(app, ["users", "add", "claims-app", "-f", str(users),
                                 "--password-file", str(pw), "--class", "claims",
                                 "--default-class", "claims", "--sender-domain", "Insurer.Test"])
    assert result.exit_code == 0, result.output
    assert users.stat().st_mode & 0o777 == 0o600
    assert "s3cret-password" not in users.read_text()
    listed = runner.invoke(app, ["users", "list", "-f", str(users)])
    assert "claims-app: classes=claims default=claims sender_domains=insurer.test" in listed.output
    user = Users(users).check("claims-app", b"s3cret-password")
    assert user is not None and user.may_send_from("x@insurer.test")
    assert not user.may_send_from("x@bank.test") and not user.may_use("marketing")
    assert Users(users).check("claims-app", b"wrong-password") is None


def test_users_add_refuses_bad_input(tmp_path):
    users, pw = tmp_path / "users.toml", tmp_path / "pw"
    pw.write_text("short\n")
    base = ["users", "add", "-f", str(users), "--password-file", str(pw)]
    assert runner.invoke(app, [*base, "ok-name"]).exit_code == 2  # too short
    pw.write_text("long-enough-password\n")
    assert runner.invoke(app, [*base, "bad name\n"]).exit_code == 2
    assert runner.invoke(app, [*base, "u", "--class", "a", "--default-class", "b"]).exit_code == 2
    missing = runner.invoke(app, ["users", "add", "u", "-f", str(users),
                                  "--password-file", str(tmp_path / "nope")])
    assert missing.exit_code == 2 and "cannot read" in missing.output
    assert not users.exists()


def test_tls_selfsigned_makes_a_usable_pair(tmp_path):
    result = runner.invoke(app, ["tls", "selfsigned", "--out", str(tmp_path / "tls"),
                                 "--hostname", "mta.test"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "tls" / "key.pem").stat().st_mode & 0o777 == 0o600
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(tmp_path / "tls" / "cert.pem", tmp_path / "tls" / "key.pem")
    (tmp_path / "file").write_text("")
    bad = runner.invoke(app, ["tls", "selfsigned", "--out", str(tmp_path / "file" / "x")])
    assert bad.exit_code == 2 and "cannot write" in bad.output
