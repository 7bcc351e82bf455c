"""``postlane dkim``: keygen, rotate, status and check (against the loopback DNS server)."""

from __future__ import annotations

import stat

from typer.testing import CliRunner

from postlane.cli import app
from postlane.policy.dkim import dns_record, generate_key, read_key, write_key
from tests.conftest import config_text

runner = CliRunner()


def _config(tmp_path, keys_toml: str, dns_port: int = 53) -> str:
    path = tmp_path / "node.toml"
    path.write_text(config_text(tmp_path, 2500, f"[dns]\nnameserver = \"127.0.0.1\"\n"
                                                f"port = {dns_port}\ntimeout = 2\n"
                                                f"[dkim]\n{keys_toml}"))
    return str(path)


def _key(tmp_path, selector: str, extra: str = "", algorithm: str = "ed25519-sha256"):
    key = generate_key(algorithm, 1024)
    path = tmp_path / "keys" / f"insurer.test.{selector}.pem"
    write_key(path, key)
    return key, (f'[[dkim.keys]]\ndomain = "insurer.test"\nselector = "{selector}"\n'
                 f'algorithm = "{algorithm}"\nkey_file = "{path}"\n{extra}\n')


def test_keygen_writes_a_0600_key_and_prints_its_record(tmp_path):
    path = tmp_path / "k" / "insurer.test.2026q4.pem"
    result = runner.invoke(app, ["dkim", "keygen", "Insurer.Test", "--selector", "2026q4",
                                 "--key-file", str(path)])
    assert result.exit_code == 0, result.output
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    key = read_key(path, "rsa-sha256")
    assert key.key_size == 2048
    assert "2026q4._domainkey.insurer.test. IN TXT" in result.output
    # p= is SubjectPublicKeyInfo (MIIBIj... for RSA-2048), split into <= 255-byte strings
    assert '"v=DKIM1; k=rsa; p=MIIBIjAN' in result.output
    assert 'selector = "2026q4"' in result.output
    again = runner.invoke(app, ["dkim", "keygen", "insurer.test", "-s", "2026q4",
                                "--key-file", str(path)])
    assert again.exit_code == 1 and "already exists" in again.output
    ed = runner.invoke(app, ["dkim", "keygen", "insurer.test", "-s", "e1", "--algorithm",
                             "ed25519", "--key-file", str(tmp_path / "e1.pem")])
    assert ed.exit_code == 0 and "k=ed25519; p=" in ed.output


def test_check_compares_the_published_record_with_the_key(tmp_path, dns_server):
    good, entry_good = _key(tmp_path, "good")
    _, entry_bad = _key(tmp_path, "bad")
    _, entry_missing = _key(tmp_path, "missing")
    dns_server.add_txt("good._domainkey.insurer.test", dns_record(good))
    dns_server.add_txt("bad._domainkey.insurer.test", dns_record(generate_key("ed25519-sha256")))
    cfg = _config(tmp_path, entry_good + entry_bad + entry_missing, dns_server.port)
    ok = runner.invoke(app, ["dkim", "check", "insurer.test", "-c", cfg, "--selector", "good"])
    assert ok.exit_code == 0, ok.output
    assert "good._domainkey.insurer.test: ok" in ok.output
    result = runner.invoke(app, ["dkim", "check", "insurer.test", "-c", cfg])
    assert result.exit_code == 1
    assert "bad._domainkey.insurer.test: MISMATCH" in result.output
    assert "missing._domainkey.insurer.test: MISSING" in result.output


def test_status_shows_states_and_the_next_rotation(tmp_path):
    _, old = _key(tmp_path, "2026q2", "not_before = 2026-04-01\nretire_after = 2026-07-12")
    _, cur = _key(tmp_path, "2026q3", "not_before = 2026-07-01")
    _, nxt = _key(tmp_path, "2026q4", "not_before = 2026-10-01")
    cfg = _config(tmp_path, old + cur + nxt)
    result = runner.invoke(app, ["dkim", "status", "-c", cfg, "--now", "2026-07-05"])
    assert result.exit_code == 0, result.output
    lines = {line.split()[1]: line for line in result.output.splitlines()
             if line.startswith("insurer.test")}
    assert "superseded (keep the DNS record published)" in lines["2026q2"]
    assert lines["2026q3"].endswith("active")
    assert "pending" in lines["2026q4"]
    assert "next rotation insurer.test ed25519-sha256: scheduled 2026-10-01 00:00 to 2026q4" \
        in result.output
    late = runner.invoke(app, ["dkim", "status", "-c", cfg, "--now", "2027-03-01"])
    assert "retired" in late.output
    assert "due 2026-12-31 00:00 (OVERDUE" in late.output  # 91 days after 2026-10-01


def test_rotate_prepares_the_next_selector(tmp_path):
    _, cur = _key(tmp_path, "2026q4", "not_before = 2026-10-01")
    cfg = _config(tmp_path, cur)
    result = runner.invoke(app, ["dkim", "rotate", "insurer.test", "-c", cfg,
                                 "--at", "2027-01-01"])
    assert result.exit_code == 0, result.output
    new = tmp_path / "keys" / "insurer.test.2027q1.pem"
    assert stat.S_IMODE(new.stat().st_mode) == 0o600
    read_key(new, "ed25519-sha256")
    assert "2027q1._domainkey.insurer.test. IN TXT" in result.output
    assert "not_before = 2027-01-01T00:00:00Z" in result.output
    # the test config's longest class expiry is 1 h; plus a day's margin
    assert "retire_after = 2027-01-02T01:00:00Z" in result.output
    again = runner.invoke(app, ["dkim", "rotate", "insurer.test", "-c", cfg, "--at",
                                "2027-01-01"])
    assert again.exit_code == 1


def test_config_check_reports_a_missing_key_file(tmp_path):
    cfg = _config(tmp_path, '[[dkim.keys]]\ndomain = "insurer.test"\nselector = "s"\n'
                            f'key_file = "{tmp_path}/nope.pem"\n')
    result = runner.invoke(app, ["config", "check", cfg])
    assert result.exit_code == 2
    assert f"dkim.keys[0].key_file: key file {tmp_path}/nope.pem does not exist" in result.output
