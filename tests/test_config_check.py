"""`postlane config check` and `postlane serve` as an operator runs them (issue 19, defect 5):
every mistake reported at once with its field, a hint for a mistyped key, a duplicate listener
port caught before `serve`, and a bind failure that names the listener instead of a traceback."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import sqlite3
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from postlane.startup import ConfigError
from tests.conftest import config_text, message, send
from tests.test_cli_ops import run_cli

POSTLANE = str(Path(sys.executable).parent / "postlane")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def test_config_check_reports_every_mistake_with_hints(tmp_path):
    port = _free_port()
    text = config_text(tmp_path, 2600, f"""
[listeners.second]
address = "127.0.0.1"
port = {port}
""", listener_port=port)
    text = text.replace('priority = 3\n', 'prority = 3\n')               # 1: a typo
    text = text.replace('expiry = "1h"\n', 'expiry = "soon"\n', 1)       # 2: not a duration
    text = text.replace('pool = "bulk"', 'pool = "bulkk"')               # 3: no such pool
    text = text.replace('127.0.0.30', '127.0.0.300')                     # 4: not an IP
    text = text.replace('default_class = "marketing"', 'default_class = "newsletters"')  # 5
    path = tmp_path / "bad.toml"
    path.write_text(text)
    code, out, err = await run_cli("config", "check", str(path))
    assert code == 2 and out == ""
    lines = err.splitlines()
    assert lines[0] == f"{path}: configuration is not valid:"
    problems = [line.strip() for line in lines[1:]]
    assert "classes.marketing.prority: unknown field (did you mean 'priority'?)" in problems
    assert any(p.startswith("classes.policy-documents.expiry: not a duration: 'soon'")
               for p in problems)
    assert any(p.startswith("pools.bulk.ips[0].address: not an IP address") for p in problems)
    assert "default_class: no class named 'newsletters'" in problems
    assert f"listeners.second.port: 127.0.0.1:{port} is already where listener 'in' listens" \
        in problems
    # the broken pool is reported once, not again through the class that names it
    assert any(p.startswith("classes.marketing.pool: no pool named 'bulkk'") for p in problems)
    assert len(problems) == 6, problems


async def test_serve_names_the_listener_it_cannot_bind(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        path = tmp_path / "node.toml"
        path.write_text(config_text(tmp_path, 2600, listener_port=port))
        code, out, err = await run_cli("config", "check", str(path))
        assert code == 0, err
        proc = await asyncio.create_subprocess_exec(
            POSTLANE, "serve", "-c", str(path), stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE, env={**os.environ})
        out, err = await asyncio.wait_for(proc.communicate(), 60)
    text = err.decode()
    assert proc.returncode == 1, text
    assert "Traceback" not in text
    assert (f"cannot start: listener 'in' (listeners.in in the config) cannot listen on"
            f" 127.0.0.1:{port}: Address already in use") in text


async def test_config_check_loads_the_files_serve_would_fail_on(tmp_path):
    """A broken TLS pair, a missing bounce-rules file or audit key, and a spool, accounting or
    token folder that is a file: `config check` names each field (serve used to pass the check and
    then crash with a traceback or an unnamed 'No such file or directory')."""
    (tmp_path / "cert.pem").write_text("not a certificate\n")
    (tmp_path / "key.pem").write_text("not a key\n")
    (tmp_path / "afile").write_text("x")
    text = config_text(tmp_path, 2600, f"""
[tls]
cert_file = "{tmp_path}/cert.pem"
key_file = "{tmp_path}/key.pem"
[feedback]
bounce_rules = "{tmp_path}/no-rules.toml"
[audit]
seal_key = "{tmp_path}/no-seal.key"
""").replace(f'spool = "{tmp_path}/spool"', f'spool = "{tmp_path}/afile/spool"').replace(
        f'directory = "{tmp_path}/acct"', f'directory = "{tmp_path}/afile"').replace(
        f'token_file = "{tmp_path}/api-token"', f'token_file = "{tmp_path}/afile/api-token"')
    path = tmp_path / "node.toml"
    path.write_text(text)
    for cmd in (["config", "check", str(path)], ["serve", "-c", str(path)]):
        code, out, err = await run_cli(*cmd)
        assert code == 2 and "Traceback" not in err, err
        problems = [line.strip() for line in err.splitlines()[1:]]
        assert any(p.startswith("tls.cert_file/key_file: ") and "cert.pem" in p
                   for p in problems), problems
        assert f"feedback.bounce_rules: {tmp_path}/no-rules.toml: cannot read:" \
               " No such file or directory" in problems
        assert f"audit.seal_key: cannot read {tmp_path}/no-seal.key: No such file or" \
               " directory" in problems
        assert f"node.spool: {tmp_path}/afile is not a directory" in problems
        assert f"accounting.directory: {tmp_path}/afile is not a directory" in problems
        assert f"api.token_file: {tmp_path}/afile is not a directory" in problems
        assert len(problems) == 6, problems


async def test_serve_names_the_file_it_cannot_open(tmp_path):
    """A node whose own state is broken (the feedback key is a folder, the spool database is
    one) exits 1 with one line naming it, not a traceback."""
    path = tmp_path / "node.toml"
    path.write_text(config_text(tmp_path, 2600))
    (tmp_path / "spool" / "feedback.key").mkdir(parents=True)
    (tmp_path / "spool" / "spool.sqlite").mkdir()
    for broken in ("feedback.key", "spool.sqlite"):
        proc = await asyncio.create_subprocess_exec(
            POSTLANE, "serve", "-c", str(path), stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE, env={**os.environ})
        _, err = await asyncio.wait_for(proc.communicate(), 60)
        text = err.decode()
        assert proc.returncode == 1 and "Traceback" not in text and "│" not in text, text
        expected = (f"cannot start: {tmp_path}/spool/feedback.key: Is a directory"
                    if broken == "feedback.key" else
                    f"cannot start: SQLite: {tmp_path}/spool/spool.sqlite: unable to open"
                    " database file")
        assert expected in text, text
        (tmp_path / "spool" / broken).rmdir()


async def test_serve_names_the_file_that_is_not_what_it_should_be(tmp_path):
    """A feedback key that is not text or too short, a database that is not one (which of
    the four: SQLite's error does not say), a config file that is not UTF-8: one line naming
    the file, exit 1 (2 for the config), no traceback."""
    path = tmp_path / "node.toml"
    path.write_text(config_text(tmp_path, 2600))
    spool = tmp_path / "spool"
    spool.mkdir()
    garbage = bytes(range(128, 256)) * 64
    cases = [("feedback.key", garbage, 1, f"cannot start: feedback key file {spool}/feedback.key"
              " is not text: a key is at least 32 ASCII characters"),
             ("feedback.key", b"abc\n", 1, f"cannot start: feedback key file {spool}/"
              "feedback.key is too short"),
             ("spool.sqlite", garbage, 1, f"cannot start: SQLite: {spool}/spool.sqlite: file is"
              " not a database"),
             ("audit.sqlite", garbage, 1, f"cannot start: SQLite: {spool}/audit.sqlite: file is"
              " not a database"),
             ("suppression.sqlite3", garbage, 1, f"cannot start: SQLite: {spool}/"
              "suppression.sqlite3: file is not a database"),
             ("../node.toml", path.read_bytes() + b"# \xff\n", 2, f"{path}: configuration is"
              " not valid:\n  not UTF-8 text: byte 0xff on line")]
    for name, content, code, expected in cases:
        before = (spool / name).read_bytes() if (spool / name).exists() else None
        (spool / name).write_bytes(content)
        proc = await asyncio.create_subprocess_exec(
            POSTLANE, "serve", "-c", str(path), stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE, env={**os.environ})
        _, err = await asyncio.wait_for(proc.communicate(), 60)
        text = err.decode()
        assert proc.returncode == code and "Traceback" not in text and "│" not in text, text
        assert expected in text, text
        if before is None:
            (spool / name).unlink()
        else:
            (spool / name).write_bytes(before)


async def test_a_second_node_on_the_same_spool_is_refused_at_start(tmp_path, make_node):
    """``postlane serve`` twice on one config: the second opened the SQLite spool beside the
    first (both would deliver its queue, and write one outbox as two writers) and, once the
    first stopped, said it recovered from an unclean stop. It is refused now, naming the
    running node; once that one has stopped, a node starts on the spool again."""
    path = tmp_path / "node.toml"
    path.write_text(config_text(tmp_path, 2600))
    node = await make_node(path.read_text())

    async def serve() -> tuple[int | None, str]:
        proc = await asyncio.create_subprocess_exec(
            POSTLANE, "serve", "-c", str(path), stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE, env={**os.environ})
        try:
            _, err = await asyncio.wait_for(proc.communicate(), 15)
        except TimeoutError:  # it runs: the spool was free
            proc.terminate()
            _, err = await proc.communicate()
            return None, err.decode()
        return proc.returncode, err.decode()

    code, text = await serve()
    assert code == 1 and "Traceback" not in text, text
    assert (f"cannot start: the spool {tmp_path}/spool is open in another node (pid"
            f" {os.getpid()})") in text, text
    await node.stop()
    code, text = await serve()
    assert code is None and "recovered" not in text and "unclean" not in text, text


async def test_config_check_refuses_zero_class_times_and_says_what_workers_takes(tmp_path):
    """An expiry of 0 bounced every accepted message before its first attempt, a retry of 0
    retried a failing destination in a busy loop, an SLA of 0 breached on every message; and a
    bad ``workers`` gave two lines in pydantic's words (``node.workers.literal['auto']``)."""
    text = config_text(tmp_path, 2600).replace("drain_timeout = 5",
                                               "drain_timeout = 5\nworkers = 0")
    text = text.replace('sla = "2m"', 'sla = 0').replace('expiry = "1h"', 'expiry = "0s"', 1)
    text = text.replace('retry = ["1s", "2s"]', 'retry = ["1s", 0]')
    path = tmp_path / "bad.toml"
    path.write_text(text)
    code, _, err = await run_cli("config", "check", str(path))
    assert code == 2
    problems = [line.strip() for line in err.splitlines()[1:]]
    assert problems == [
        "node.workers: not 'auto' or a number of processes from 1 to 256: 0",
        "classes.policy-documents.sla: must be more than 0s",
        "classes.policy-documents.expiry: must be more than 0s",
        "classes.marketing.retry[1]: must be more than 0s"], problems


async def test_a_field_left_out_is_not_reported_again_through_what_needs_it(tmp_path):
    """docs/configuration.md's own example: a class's bad ``sla`` used to be reported twice,
    the second time as ``monitor.sla.X: class 'X' has no sla to monitor``."""
    text = config_text(tmp_path, 2600, "[monitor.sla.policy-documents]\nlead_time = \"60s\"\n")
    path = tmp_path / "bad.toml"
    path.write_text(text.replace('sla = "2m"', 'sla = "soon"'))
    code, _, err = await run_cli("config", "check", str(path))
    assert code == 2
    assert [line.strip() for line in err.splitlines()[1:]] == [
        "classes.policy-documents.sla: not a duration: 'soon' (use seconds or e.g. '30s', '2m',"
        " '1h', '3d')"]


async def test_the_reference_doc_example_is_what_config_check_prints(tmp_path):
    """docs/configuration.md opens with `postlane config check bad.toml` on the example config
    with two mistakes: its output is exactly that; and every field of the [destinations.NAME]
    table the doc gives exists (``tls`` was missing)."""
    from postlane.config.model import DestinationRule

    repo = Path(__file__).resolve().parents[1]
    doc = (repo / "docs" / "configuration.md").read_text()
    shown = doc[doc.index("$ postlane config check bad.toml\n"):].split("```")[0].splitlines()[1:]
    text = (repo / "examples" / "insurance.toml").read_text()
    text = text.replace('address = "127.0.0.10"', 'address = "999.1.1.1"')
    claims = text.index("[classes.claims]")
    text = text[:claims] + text[claims:].replace('sla = "30m"', 'sla = "soon"', 1)
    (tmp_path / "bad.toml").write_text(text)
    proc = await asyncio.create_subprocess_exec(
        POSTLANE, "config", "check", "bad.toml", cwd=tmp_path,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    _, err = await proc.communicate()
    assert proc.returncode == 2 and err.decode().splitlines() == shown, err.decode()
    section = doc[doc.index("## `[destinations.NAME]`"):doc.index("A rule with the same name")]
    documented = {row.split("`")[1] for row in section.splitlines() if row.startswith("| `")}
    assert documented == {f.alias or n for n, f in DestinationRule.model_fields.items()}


async def test_serve_refuses_pool_ips_this_machine_does_not_have(tmp_path):
    """A pool whose source IP is not on the machine used to start, accept mail and defer all of
    it as 'destination unreachable ... Cannot assign requested address'."""
    path = tmp_path / "node.toml"
    path.write_text(config_text(tmp_path, 2600).replace("127.0.0.30", "192.0.2.30"))
    proc = await asyncio.create_subprocess_exec(
        POSTLANE, "serve", "-c", str(path), stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, env={**os.environ})
    try:
        _, err = await asyncio.wait_for(proc.communicate(), 60)
    finally:
        if proc.returncode is None:  # it started after all: stop it
            proc.terminate()
            await proc.wait()
    text = err.decode()
    assert proc.returncode == 1 and "Traceback" not in text, text
    assert ("cannot start: pools.bulk.ips[0].address: 192.0.2.30 is not an address of this"
            " machine: Cannot assign requested address") in text, text


async def test_a_bad_webhook_url_is_named_not_printed(tmp_path):
    """Webhook URLs carry their secret in the path (a chat hook's token): a mistyped one is
    reported by its field, like reputation.snds.url, never echoed to a terminal or a CI log."""
    path = tmp_path / "bad.toml"
    path.write_text(config_text(tmp_path, 2600, '[monitor]\nwebhook_url = '
                                                '"hooks.example/services/T0/B0/s3cretTOKEN"\n'))
    code, _, err = await run_cli("config", "check", str(path))
    assert code == 2 and "s3cretTOKEN" not in err, err
    assert "monitor.webhook_url: not an http(s) URL" in err


async def test_a_value_of_the_wrong_type_is_an_error_not_a_guess(tmp_path):
    """TOML has types: ``pausable = "no"`` and ``port = "2525"`` used to pass (pydantic's lax
    mode reads "no" as false and "2525" as a number), ``max_smtp_out = 4.0`` too."""
    text = config_text(tmp_path, 2600).replace("pausable = false", 'pausable = "no"')
    text = text.replace("max_message_size = 100000", 'max_message_size = 100000\nmax_recipients'
                                                      ' = "50"')
    text = text.replace("max_smtp_out = 4 }", "max_smtp_out = 4.0 }", 1)
    path = tmp_path / "bad.toml"
    path.write_text(text)
    code, _, err = await run_cli("config", "check", str(path))
    assert code == 2
    assert [line.strip() for line in err.splitlines()[1:]] == [
        "listeners.in.max_recipients: Input should be a valid integer",
        "pools.critical.ips[0].max_smtp_out: Input should be a valid integer",
        "pools.critical.pausable: Input should be a valid boolean"], err


async def test_a_name_that_does_not_fit_is_explained_in_words(tmp_path):
    """Pattern mismatches were pydantic's regex ('String should match pattern
    '^[A-Za-z0-9][A-Za-z0-9_.-]*$''), and a bad table name ended in '.[key]'."""
    text = config_text(tmp_path, 2600, '[[audit.webhooks]]\nurl = "ftp://hooks.example/s3cret"\n'
                                       '[cluster]\nschema_name = "Bad-Name"\n')
    text = text.replace("[classes.marketing]", '[classes."mark eting"]').replace(
        'hostname = "mta.test"', 'hostname = "mta_test"').replace(
        'default_class = "marketing"', "")
    path = tmp_path / "bad.toml"
    path.write_text(text)
    code, _, err = await run_cli("config", "check", str(path))
    assert code == 2 and "s3cret" not in err and "should match pattern" not in err, err
    assert [line.strip() for line in err.splitlines()[1:]] == [
        "node.hostname: not a host name (letters, digits, '.' and '-')",
        "classes.mark eting: not a name (letters, digits, '.', '_' and '-', starting with a"
        " letter or digit)",
        "audit.webhooks[0].url: not an http(s):// URL",
        "cluster.schema_name: not a schema name (lower case letters, digits and '_', at most 40,"
        " not starting with a digit)"], err


def test_files_that_exist_need_no_writable_folder(tmp_path, monkeypatch):
    """Under deploy/systemd/postlane.service (ProtectSystem=strict) /etc/postlane is read-only
    to ExecStartPre's `config check`: the token file init wrote there is fine as it is. Only a
    file still to be made needs a folder it can be made in."""
    from postlane.startup import load_config

    ro = tmp_path / "etc"
    ro.mkdir()
    (ro / "api-token").write_text("x" * 40 + "\n")
    real = os.access
    monkeypatch.setattr("postlane.startup.os.access",
                        lambda p, mode: False if Path(p) == ro else real(p, mode))
    path = ro / "node.toml"
    path.write_text(config_text(tmp_path, 2600).replace(f'token_file = "{tmp_path}/api-token"',
                                                        'token_file = "api-token"'))
    load_config(path)  # no error
    (ro / "api-token").unlink()
    try:
        load_config(path)
    except ConfigError as exc:
        assert exc.errors == [f"api.token_file: {ro} is not writable"]
    else:
        raise AssertionError("a token file that cannot be made passed")


def test_no_listener_may_take_the_name_of_the_tls_reports(tmp_path):
    """Mail the node queues for TLS-RPT is marked by its listener name, ``tlsrpt``, and sent
    under a relaxed TLS policy (docs/tls.md): a listener of that name would relax its mail."""
    from postlane.startup import load_config

    path = tmp_path / "node.toml"
    path.write_text(config_text(tmp_path, 25999).replace("[listeners.in]", "[listeners.tlsrpt]"))
    try:
        load_config(path)
    except ConfigError as exc:
        assert "listeners.tlsrpt: the name is the node's own, for its TLS reports" in \
            exc.errors, exc.errors
    else:
        raise AssertionError("a listener named tlsrpt was taken")



async def test_ipv4_and_ipv6_on_one_port(tmp_path, make_node):
    """A public MX listens on both families: ``0.0.0.0`` and ``::`` on port 25 (a listener on
    ``::`` is IPv6 only). ``config check`` called that a clash ("0.0.0.0:25 is already where
    listener ... listens"), so a node could listen on one family only. Two sockets of one
    family on one port are still refused, and so is the API's ``::``, which takes IPv4 too."""
    port = _free_port()
    six = f'[listeners.six]\naddress = "::"\nport = {port}\nrelay_from = []\n'

    def text(extra: str = "", api: str = "") -> str:
        body = config_text(tmp_path, 2600, extra, listener_port=port).replace(
            f'address = "127.0.0.1"\nport = {port}', f'address = "0.0.0.0"\nport = {port}')
        return body.replace("[api]\nport = 0", f"[api]\n{api}port = 0" if not api else
                            f"[api]\n{api}")

    path = tmp_path / "node.toml"
    path.write_text(text(six))
    code, _, err = await run_cli("config", "check", str(path))
    assert code == 0, err
    node = await make_node(path.read_text())
    for host in ("127.0.0.1", "::1"):
        reader, writer = await asyncio.open_connection(host, port)
        assert (await reader.readline()).startswith(b"220")
        writer.close()
    assert await send(port, "s@insurer.test", ["a@example.com"], message()) == {}
    await node.stop()
    for clash in ("::1", "::"):
        path.write_text(text(six + f'[listeners.six2]\naddress = "{clash}"\nport = {port}\n'))
        code, _, err = await run_cli("config", "check", str(path))
        assert code == 2
        assert f"listeners.six2.port: {clash}:{port} is already where listener 'six'" in err, err
    path.write_text(text(api=f'address = "::"\nport = {port}\n'))
    code, _, err = await run_cli("config", "check", str(path))
    assert code == 2 and f"api.port: :::{port} is already where listener 'in' listens" in err, err


async def test_zero_rotation_and_sizes_are_named_at_check_not_a_valueerror_at_start(tmp_path):
    """``accounting.rotate = 0`` passed `config check` and `serve` then died with "cannot start:
    ValueError: rotate_seconds and rotate_bytes must be positive", naming no field."""
    text = config_text(tmp_path, 2600).replace("max_message_size = 100000", "max_message_size = 0")
    text = text.replace('formats = ["csv", "jsonl"]',
                        'formats = ["csv"]\nrotate = 0\nrotate_size = "0MB"')
    path = tmp_path / "bad.toml"
    path.write_text(text)
    for args in (("config", "check", str(path)), ("serve", "-c", str(path))):
        code, out, err = await run_cli(*args)
        assert code == 2 and "Traceback" not in out + err, (args, out, err)
        assert [line.strip() for line in err.splitlines()[1:]] == [
            "listeners.in.max_message_size: must be more than 0 bytes",
            "accounting.rotate: must be more than 0s",
            "accounting.rotate_size: must be more than 0 bytes"], err


async def test_numbers_too_large_to_mean_anything_are_refused(tmp_path):
    """TOML integers are 64-bit (tomllib reads longer ones anyway), and a duration of 1e308 s
    or a size of 10^21 GB passed the check and started a node whose deadlines and dates could
    not be shown: each is refused with its field."""
    huge = "99999999999999999999999"
    text = config_text(tmp_path, 2600, f'[audit]\nmax_backlog = {huge}\n').replace(
        'formats = ["csv", "jsonl"]', 'rotate_size = "999999999999999999999GB"')
    text = text.replace("drain_timeout = 5", "drain_timeout = 1e308")
    text = text.replace('expiry = "1h"', 'expiry = "99999999999w"', 1)
    path = tmp_path / "bad.toml"
    path.write_text(text)
    code, _, err = await run_cli("config", "check", str(path))
    assert code == 2
    assert [line.strip() for line in err.splitlines()[1:]] == [
        f"audit.max_backlog: {huge} is not a 64-bit integer (TOML's range)",
        "node.drain_timeout: too long: at most 100 years",
        "classes.policy-documents.expiry: too long: at most 100 years",
        "accounting.rotate_size: not a size: '999999999999999999999GB' (too large: at most"
        " 1 PiB)"], err


async def test_a_byte_order_mark_is_read_past(tmp_path):
    """Windows editors save UTF-8 with a BOM: tomllib then said "Invalid statement (at line 1,
    column 1)" of a file that looks right. The mark is not content, so it is skipped."""
    path = tmp_path / "node.toml"
    path.write_bytes(b"\xef\xbb\xbf" + config_text(tmp_path, 2600).encode())
    code, out, err = await run_cli("config", "check", str(path))
    assert code == 0 and out.startswith(f"{path}: ok"), err


async def test_a_bad_config_at_serve_leaves_the_queue_as_it_was(tmp_path, make_node):
    """`serve` with a broken config exits 2 before it opens the spool: mail queued by the
    last run is all there when the node starts again on a good file."""
    import json

    from postlane.policy.intake import RcptIn
    from tests.conftest import OPERATOR, message

    good = config_text(tmp_path, 2600)
    node = await make_node(good)
    await node.operations.pause("bulk", who=OPERATOR)
    for i in range(3):
        await node.intake.submit("s@insurer.test", [RcptIn(f"r{i}@example.com")],
                                 message(f"m{i}", cls="marketing"))
    await node.stop()
    path = tmp_path / "node.toml"
    for bad in (good.replace("[accounting]", "[acounting]"), good + "[x\n",
                good.replace('formats = ["csv", "jsonl"]', "rotate = 0"),
                good.replace('pool = "bulk"', 'pool = "bulkk"')):
        path.write_text(bad)
        code, out, err = await run_cli("serve", "-c", str(path))
        assert code == 2 and "Traceback" not in out + err, err
    node = await make_node(good)
    target = ["--url", f"http://127.0.0.1:{node.api.port}",
              "--token-file", str(tmp_path / "api-token")]
    code, out, err = await run_cli("queue", "list", "--json", *target)
    assert code == 0, err
    assert len(json.loads(out)["messages"]) == 3, out


async def test_zero_intervals_and_timeouts_are_named_at_check(tmp_path):
    """``monitor.sample_every = 0`` passed the check and `serve` died with a ZeroDivisionError
    traceback; an evaluation, reload or purge interval of 0 spun a loop, a timeout of 0 failed
    every connection and lookup. Each is refused with its field, by check and serve alike."""
    text = config_text(tmp_path, 2600, "[monitor]\nsample_every = 0\nevaluate_every = 0\n"
                                       "[tls]\nreload_interval = 0\n[dns]\ntimeout = 0\n"
                                       "[audit]\npurge_interval = 0\n")
    text = text.replace("idle_timeout = 0.5", "idle_timeout = 0.5\nconnect_timeout = 0")
    path = tmp_path / "bad.toml"
    path.write_text(text)
    for args in (("config", "check", str(path)), ("serve", "-c", str(path))):
        code, out, err = await run_cli(*args)
        assert code == 2 and "Traceback" not in out + err, (args, err)
        assert [line.strip() for line in err.splitlines()[1:]] == [
            "dns.timeout: must be more than 0s",
            "relay.connect_timeout: must be more than 0s",
            "tls.reload_interval: must be more than 0s",
            "audit.purge_interval: must be more than 0s",
            "monitor.evaluate_every: must be more than 0s",
            "monitor.sample_every: must be more than 0s"], err


async def test_a_certificate_and_a_key_that_do_not_belong_together_are_called_so(tmp_path):
    """A renewed certificate installed beside the old key is the common broken pair: it was
    reported as "not a PEM certificate and its private key (NO_CERTIFICATE_ASSIGNED)", OpenSSL
    3's last word, which sent the operator looking for a file format problem."""
    from postlane.edge.tls import selfsigned

    cert, _ = selfsigned("mta.test")
    _, other_key = selfsigned("mta.test")
    (tmp_path / "cert.pem").write_bytes(cert)
    (tmp_path / "key.pem").write_bytes(other_key)
    (tmp_path / "key.pem").chmod(0o600)
    path = tmp_path / "node.toml"
    path.write_text(config_text(tmp_path, 2600, f'[tls]\ncert_file = "{tmp_path}/cert.pem"\n'
                                                f'key_file = "{tmp_path}/key.pem"\n'))
    for cmd in (["config", "check", str(path)], ["serve", "-c", str(path)]):
        code, _, err = await run_cli(*cmd)
        assert code == 2 and "Traceback" not in err, err
        assert [line.strip() for line in err.splitlines()[1:]] == [
            f"tls.cert_file/key_file: the key {tmp_path}/key.pem is not the key of the"
            f" certificate {tmp_path}/cert.pem"], err


async def test_a_table_given_as_a_value_is_named_in_toml_words(tmp_path):
    """``[pools] bulk = 5`` and ``[[listeners]]`` said "Input should be a valid dictionary or
    instance of PoolConfig": a class name of the code, not a TOML word."""
    text = config_text(tmp_path, 2600).replace("[pools.bulk]\nips = ", "[pools]\nbulk = 5\n"
                                                "[pools.bulkx]\nips = ")
    text = text.replace('"127.0.0.30"', '"127.0.0.31"')
    text = text.replace("[listeners.in]", "[[listeners]]")
    path = tmp_path / "bad.toml"
    path.write_text(text)
    code, _, err = await run_cli("config", "check", str(path))
    assert code == 2
    problems = [line.strip() for line in err.splitlines()[1:]]
    assert "listeners: must be a table ([listeners] or { ... })" in problems, problems
    assert "pools.bulk: must be a table ([pools.bulk] or { ... })" in problems, problems
    assert not any("instance of" in p or "dictionary" in p for p in problems), problems
    assert not any("no pool named 'bulk'" in p for p in problems), "the bad entry, once"


async def test_a_path_written_with_a_tilde_is_refused(tmp_path):
    """``spool = "~/spool"`` passed the check, and `serve` made a folder named ``~`` beside
    the config: no shell expands it, so the path is relative to the config file's folder."""
    text = config_text(tmp_path, 2600).replace(f'spool = "{tmp_path}/spool"', 'spool = "~/spool"')
    text = text.replace(f'directory = "{tmp_path}/acct"', 'directory = "~postlane/acct"')
    path = tmp_path / "node.toml"
    path.write_text(text)
    for cmd in (["config", "check", str(path)], ["serve", "-c", str(path)]):
        code, _, err = await run_cli(*cmd)
        assert code == 2 and "Traceback" not in err, err
        assert [line.strip() for line in err.splitlines()[1:]] == [
            "node.spool: '~/spool': '~' is not expanded here; give the full path (or one"
            " relative to the config file's folder)",
            "accounting.directory: '~postlane/acct': '~' is not expanded here; give the full"
            " path (or one relative to the config file's folder)"], err
    assert not (tmp_path / "~").exists()


def _as_nobody(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups",
                           sys.executable, "-c", "from postlane.cli import main; main()", *args],
                          capture_output=True, text=True, timeout=90)


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None,
                    reason="needs root and setpriv to run as another user (CI runs as root)")
def test_files_in_a_folder_the_user_cannot_enter_are_config_errors_not_a_traceback():
    """`postlane init` makes tls/ and keys/ 0700; run as the service's own user (root made
    them), `serve` died in a traceback ending `PermissionError: ... tls/cert.pem`, and every
    other command said `postlane: .../tls/cert.pem: Permission denied`, not which field."""
    if _as_nobody("--version").returncode != 0:
        pytest.skip("this interpreter cannot be run as nobody here")
    folder = Path(tempfile.mkdtemp(prefix="postlane-perm-"))
    try:
        folder.chmod(0o755)
        (folder / "tls").mkdir(mode=0o700)
        for name in ("cert.pem", "key.pem"):
            (folder / "tls" / name).write_text("x")
        path = folder / "node.toml"
        path.write_text(config_text(folder, 2600, '[tls]\ncert_file = "tls/cert.pem"\n'
                                                  'key_file = "tls/key.pem"\n'))
        path.chmod(0o644)
        for args in (["config", "check", str(path)], ["serve", "-c", str(path)]):
            proc = _as_nobody(*args)
            assert proc.returncode == 2, proc.stderr
            assert "Traceback" not in proc.stderr, proc.stderr
            assert f"{path}: configuration is not valid:" in proc.stderr, proc.stderr
            assert (f"tls.cert_file/key_file: cannot read {folder}/tls/cert.pem: Permission"
                    " denied") in proc.stderr, proc.stderr
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None,
                    reason="needs root and setpriv to run as another user (CI runs as root)")
def test_a_store_in_the_spool_folder_the_user_cannot_write_is_named():
    """A restore (or an `upgrade`) run as root, without the `chown` after it, leaves the
    stores root's in a folder the node's user owns: `serve` said only `cannot start: SQLite:
    …/spool.sqlite: unable to open database file`. Now the check names the file, its owner
    and the fix, exit 2."""
    if _as_nobody("--version").returncode != 0:
        pytest.skip("this interpreter cannot be run as nobody here")
    folder = Path(tempfile.mkdtemp(prefix="postlane-perm-"))
    try:
        folder.chmod(0o755)
        for name in ("spool", "acct"):
            (folder / name).mkdir(mode=0o700)
            os.chown(folder / name, 65534, 65534)
        sqlite3.connect(folder / "spool" / "spool.sqlite").close()  # root's, 0644
        (folder / "spool" / "spool.sqlite").chmod(0o600)
        path = folder / "node.toml"
        path.write_text(config_text(folder, 2600).replace(
            f'token_file = "{folder}/api-token"', f'token_file = "{folder}/spool/api-token"'))
        path.chmod(0o644)
        for args in (["config", "check", str(path)], ["serve", "-c", str(path)]):
            proc = _as_nobody(*args)
            assert proc.returncode == 2, proc.stderr
            assert "Traceback" not in proc.stderr, proc.stderr
            assert (f"node.spool: {folder}/spool/spool.sqlite is not readable and writable by"
                    " this user (nobody; it belongs to root)") in proc.stderr, proc.stderr
    finally:
        shutil.rmtree(folder, ignore_errors=True)
