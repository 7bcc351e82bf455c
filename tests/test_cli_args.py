"""Bad arguments an operator may type: one clear line naming the option, a non-zero exit code,
never a traceback."""

from __future__ import annotations

import socket

import pytest
from typer.testing import CliRunner

from postlane.cli import app
from tests.conftest import config_text

runner = CliRunner()


def _config(tmp_path):
    path = tmp_path / "node.toml"
    path.write_text(config_text(tmp_path, 2600))
    return str(path)


def test_serve_refuses_an_unknown_log_level(tmp_path):
    result = runner.invoke(app, ["serve", "-c", _config(tmp_path), "--log-level", "bogus"])
    assert isinstance(result.exception, SystemExit), result.exception
    assert result.exit_code == 2 and "--log-level" in result.output, result.output


@pytest.mark.parametrize("nameserver", ["300.1.1.1", "localhost", "127.0.0.1:99999",
                                        "127.0.0.1:x", "[::1]:0"])
def test_dns_check_refuses_a_bad_nameserver(tmp_path, nameserver):
    result = runner.invoke(app, ["dns", "check", "-c", _config(tmp_path),
                                 "--nameserver", nameserver])
    assert isinstance(result.exception, SystemExit), result.exception
    assert result.exit_code == 2 and "--nameserver" in result.output, result.output


def test_sink_says_why_it_cannot_listen():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = runner.invoke(app, ["sink", "--port", str(port)])
    assert isinstance(result.exception, SystemExit), result.exception
    assert result.exit_code == 1, result.output
    assert f"cannot listen on 127.0.0.1:{port}: Address already in use" in result.output
    result = runner.invoke(app, ["sink", "--host", "300.1.1.1", "--port", "0"])
    assert isinstance(result.exception, SystemExit), result.exception
    assert result.exit_code == 1 and "cannot listen on 300.1.1.1:0" in result.output


@pytest.mark.parametrize("cmd", [["suppress", "export"], ["rules", "review"],
                                 ["dmarc", "import", "/dev/null"], ["reputation", "show"],
                                 ["reputation", "import", "snds", "/dev/null"]])
def test_every_command_reports_a_bad_config_the_same_way(tmp_path, cmd):
    """``suppress``, ``rules`` and ``dmarc`` printed the exception (``FILE: 1 error(s)``)
    instead of the ``FILE: configuration is not valid:`` block of every other command."""
    bad = tmp_path / "bad.toml"
    bad.write_text("[node]\nbogus = 1\n")
    result = runner.invoke(app, [*cmd, "-c", str(bad)])
    assert result.exit_code == 2, result.output
    assert result.output.splitlines()[:2] == [f"{bad}: configuration is not valid:",
                                              "  node.bogus: unknown field"], result.output


@pytest.mark.parametrize("content", [None, "not a certificate\n"])
def test_tls_check_refuses_a_ca_file_it_cannot_load(tmp_path, content):
    ca = tmp_path / "ca.pem"
    if content is not None:
        ca.write_text(content)
    result = runner.invoke(app, ["tls", "check", "-c", _config(tmp_path), "--ca-file", str(ca)])
    assert isinstance(result.exception, SystemExit), result.exception
    assert result.exit_code == 2 and f"--ca-file: cannot load {ca}" in result.output, \
        result.output


def test_demo_refuses_a_campaign_of_no_messages(tmp_path):
    """`postlane demo --marketing -5` went on to run the case study with a negative campaign."""
    result = runner.invoke(app, ["demo", "--workdir", str(tmp_path / "d"), "--marketing", "-5"])
    assert isinstance(result.exception, SystemExit), result.exception
    assert result.exit_code == 2 and "--marketing" in result.output, result.output
    assert not (tmp_path / "d").exists()


async def test_audit_export_never_overwrites_evidence_and_says_why_it_cannot_write(tmp_path):
    """An export is evidence: a second export into the same folder must not replace the first
    (it did, silently), and a folder it cannot write is one line, not a traceback."""
    from postlane.node import Node
    from postlane.startup import load_config

    config = _config(tmp_path)
    node = Node(load_config(config))
    await node.start()  # the audit store exists
    await node.stop()
    first = runner.invoke(app, ["audit", "export", "-c", config, "--out", str(tmp_path / "ev")])
    assert first.exit_code == 0, first.output
    manifest = (tmp_path / "ev" / "manifest.json").read_bytes()
    for out in (tmp_path / "ev", tmp_path / "node.toml", "/proc/postlane-evidence"):
        result = runner.invoke(app, ["audit", "export", "-c", config, "--out", str(out)])
        assert result.exit_code == 1, (out, result.output, result.exception)
        assert isinstance(result.exception, SystemExit), (out, result.exception)
        assert len(result.output.strip().splitlines()) == 1, result.output
        assert str(out) in result.output, result.output
    assert (tmp_path / "ev" / "manifest.json").read_bytes() == manifest


@pytest.mark.parametrize("cmd", [
    ["api", "token", "add", "alice"], ["api", "token", "revoke", "alice"],
    ["suppress", "add", "x@example.com"], ["suppress", "remove", "x@example.com"],
    ["dkim", "keygen", "example.com", "--selector", "s1", "--key-file", "{node}/keys/k.pem"],
    ["users", "add", "billing", "--class", "claims", "--file", "{node}/users.toml"]])
def test_root_is_told_to_act_as_the_nodes_user_in_its_folders(tmp_path, cmd):
    """Under systemd the node runs as its own user and its files are 0600: a file root writes
    into the node's folders is one the node cannot read (a token added as root was refused, a
    rotated DKIM key unreadable). Run as root in a folder another user owns, the commands that
    write there refuse in one line, naming the user to run them as; nothing is written."""
    import os

    if os.geteuid() != 0:
        pytest.skip("the check is about root")
    node = tmp_path / "node"
    node.mkdir(mode=0o700)
    config = node / "node.toml"
    config.write_text(config_text(node, 2600).replace(str(tmp_path / "node" / "api-token"),
                                                      str(node / "api-token")))
    (node / "api-token").write_text("x" * 43 + "\n")
    (node / "keys").mkdir()
    for path in (node, node / "keys", node / "api-token"):
        os.chown(path, 65534, 65534)  # nobody: the node's user
    before = sorted(p.name for p in node.rglob("*"))
    args = [a.format(node=node) for a in cmd]
    if args[0] in ("api", "suppress"):
        args += ["-c", str(config)]
    result = runner.invoke(app, args, input="secret-password\nsecret-password\n")
    assert result.exit_code == 1, (result.output, result.exception)
    assert isinstance(result.exception, SystemExit), result.exception
    assert "sudo -u nobody postlane" in result.output, result.output
    assert sorted(p.name for p in node.rglob("*")) == before


def test_a_url_without_a_token_and_an_empty_queue_id_are_named(tmp_path):
    """`--url` alone said "say where the node is" (it was given: the token is what is missing);
    `queue show ''` answered "postlane:  (HTTP 307)"."""
    env = {"POSTLANE_TOKEN_FILE": None, "POSTLANE_CONFIG": None}
    result = runner.invoke(app, ["status", "--url", "http://127.0.0.1:9"], env=env)
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit)
    assert "--url needs --token-file" in result.output, result.output
    token = tmp_path / "token"
    token.write_text("x\n")
    result = runner.invoke(app, ["queue", "show", "", "--url", "http://127.0.0.1:9",
                                 "--token-file", str(token)], env=env)
    assert result.exit_code == 1 and "give a queue id" in result.output, result.output


@pytest.mark.parametrize("cmd", [
    ["audit", "verify", "--export", "{tmp}/no-such-export"],
    ["audit", "show", "--db", "{tmp}/node.toml", "--correlation-id", "x"],
    ["audit", "verify", "--db", "{tmp}/node.toml"],
    ["suppress", "export", "/proc/postlane-list.csv", "--db", "{tmp}/list.sqlite3"]])
def test_files_that_are_not_there_or_not_stores_are_one_line(tmp_path, cmd):
    """These printed a traceback (FileNotFoundError, sqlite3.DatabaseError)."""
    _config(tmp_path)
    result = runner.invoke(app, [a.format(tmp=tmp_path) for a in cmd])
    assert result.exit_code in (1, 2), (result.output, result.exception)
    assert isinstance(result.exception, SystemExit), result.exception
    assert len(result.output.strip().splitlines()) == 1, result.output


@pytest.mark.parametrize("cmd", [
    ["dkim", "keygen", "a.example", "-s", "s1", "--key-file", "/proc/postlane-x/k.pem"],
    ["api", "token", "add", "bob", "--tokens-file", "/proc/postlane-x/tokens.json"],
    ["suppress", "add", "a@b.example", "--db", "/proc/postlane-x/list.sqlite3"],
    ["suppress", "list", "--db", "{tmp}"]])
def test_an_error_no_command_foresaw_is_one_line_not_a_traceback(tmp_path, cmd):
    """The `postlane` command turns an error a command did not catch into one line naming the
    file and the reason, exit 1 (these printed a traceback); POSTLANE_DEBUG=1 shows it."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    args = [str(Path(sys.executable).parent / "postlane"), *(a.format(tmp=tmp_path) for a in cmd)]
    env = {k: v for k, v in os.environ.items() if k != "POSTLANE_DEBUG"}
    done = subprocess.run(args, capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1, \
        done.stderr
    assert done.stderr.startswith("postlane: "), done.stderr
    debug = subprocess.run(args, capture_output=True, text=True, timeout=60,
                           env={**env, "POSTLANE_DEBUG": "1"})
    assert debug.returncode == 1 and "Traceback" in debug.stderr
