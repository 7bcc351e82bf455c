"""Backup while mail flows, restore into a new folder, verify the evidence, deliver the queue."""

from __future__ import annotations

import asyncio
import json
import shutil
import stat

import pytest
from typer.testing import CliRunner

from postlane.cli import app
from postlane.node import Node
from postlane.startup import load_config
from tests.conftest import OPERATOR, send
from tests.support.waiting import until

runner = CliRunner()


def _init(tmp_path, sink_port: int) -> None:
    result = runner.invoke(app, [
        "init", str(tmp_path / "node"), "--hostname", "mta.example", "--domain",
        "insurer.example", "--listen", "127.0.0.1:0", "--inbound", "127.0.0.1:0", "--api",
        "127.0.0.1:0", "--smarthost", f"127.0.0.1:{sink_port}"])
    assert result.exit_code == 0, result.output


def _notice(n: int) -> bytes:
    return (f"From: notices@insurer.example\r\nTo: c{n}@example.com\r\nSubject: notice {n}\r\n"
            f"X-Postlane-Class: policy-documents\r\nX-Correlation-ID: policy-{n}\r\n\r\n"
            f"Dear customer {n}\r\n").encode()


def _newsletter(n: int) -> bytes:
    return (f"From: news@news.insurer.example\r\nTo: m{n}@example.com\r\nSubject: news {n}\r\n"
            f"\r\nOur news {n}\r\n").encode()


async def test_backup_while_mail_flows_then_restore_verify_and_deliver(tmp_path, sink):
    _init(tmp_path, sink.port)
    node = Node(load_config(tmp_path / "node" / "postlane.toml"))
    await node.start()
    port = node.listeners[0].port
    await node.operations.pause("admin-pool", who=OPERATOR)  # the newsletters wait
    for n in range(5):
        await send(port, "news@news.insurer.example", [f"m{n}@example.com"], _newsletter(n))
    node.feedback.suppression.add("gone@example.com", "all", "test", "operator")
    flowing = True

    async def traffic() -> int:
        n = 0
        while flowing:
            await send(port, "notices@insurer.example", [f"c{n}@example.com"], _notice(n))
            n += 1
        return n

    sender = asyncio.create_task(traffic())
    await sink.wait_for(3, timeout=20)
    result = await asyncio.to_thread(runner.invoke, app, [
        "backup", str(tmp_path / "copy"), "-c", str(tmp_path / "node" / "postlane.toml")])
    flowing = False
    notices = await sender
    await sink.wait_for(notices, timeout=30)
    await node.stop()
    assert result.exit_code == 0, result.output
    assert "SQLite databases copied online" in result.output

    manifest = json.loads((tmp_path / "copy" / "manifest.json").read_text())
    roles = {i["role"]: i for i in manifest["items"]}
    for role in ("state:spool.sqlite", "state:audit.sqlite", "state:suppression.sqlite3",
                 "state:feedback.key", "api.token_file", "dkim.keys[0].key_file",
                 "dkim.keys[1].key_file", "tls.key_file", "config"):
        assert role in roles, role
    assert roles["state:spool.sqlite"]["kind"] == "sqlite"
    assert any(r.startswith("accounting:") and r.endswith(".position.json") for r in roles)
    assert stat.S_IMODE((tmp_path / "copy").stat().st_mode) == 0o700
    before = {p.name: p.stat().st_size for p in (tmp_path / "node" / "var" / "accounting")
              .iterdir()}

    result = runner.invoke(app, ["restore", str(tmp_path / "copy"), str(tmp_path / "new")])
    assert result.exit_code == 0, result.output
    config = tmp_path / "new" / "postlane.toml"
    assert stat.S_IMODE((tmp_path / "new" / "keys" / roles["dkim.keys[0].key_file"]["source"]
                         .rpartition("/")[2]).stat().st_mode) == 0o600
    verify = runner.invoke(app, ["audit", "verify", "-c", str(config)])
    assert verify.exit_code == 0, verify.output

    sink.arrivals.clear()
    restored = Node(load_config(config))
    await restored.start()
    try:
        assert restored.feedback.suppression.check(["gone@example.com"])
        assert ("admin-pool", "*") in restored.scheduler.paused  # the pause survived too
        await restored.operations.resume("admin-pool", who=OPERATOR)
        await sink.wait_for(5, timeout=30)
    finally:
        await restored.stop()
    assert {r for a in sink.arrivals for r in a.rcpts} >= {f"m{n}@example.com" for n in range(5)}
    verify = runner.invoke(app, ["audit", "verify", "-c", str(config), "--json"])
    assert verify.exit_code == 0, verify.output
    # the restored node wrote its own accounting files; the original's were not touched
    after = {p.name: p.stat().st_size for p in (tmp_path / "node" / "var" / "accounting")
             .iterdir()}
    assert after == before
    position = next((tmp_path / "new" / "var" / "accounting").glob("*.position.json"))
    for name, _size in json.loads(position.read_text())["files"].values():
        assert name.startswith(str(tmp_path / "new"))
    shows = runner.invoke(app, ["audit", "show", "-c", str(config), "--recipient",
                                "m0@example.com", "--format", "json"])
    assert shows.exit_code == 0 and "delivered" in shows.output


def test_restore_refuses_a_damaged_backup_and_a_folder_in_use(tmp_path):
    _init(tmp_path, 2600)
    result = runner.invoke(app, ["backup", str(tmp_path / "copy"), "-c",
                                 str(tmp_path / "node" / "postlane.toml")])
    assert result.exit_code == 0, result.output
    again = runner.invoke(app, ["backup", str(tmp_path / "copy"), "-c",
                                str(tmp_path / "node" / "postlane.toml")])
    assert again.exit_code == 1 and "not empty" in again.output
    used = runner.invoke(app, ["restore", str(tmp_path / "copy"), str(tmp_path / "node")])
    assert used.exit_code == 1 and "not empty" in used.output
    key = next((tmp_path / "copy" / "files").rglob("*.pem"))
    key.write_bytes(key.read_bytes()[:-2] + b"x\n")
    damaged = runner.invoke(app, ["restore", str(tmp_path / "copy"), str(tmp_path / "n2")])
    assert damaged.exit_code == 1 and "damaged" in damaged.output
    assert not (tmp_path / "n2").exists()


def test_backup_of_a_cluster_node_copies_its_files_and_says_how_to_dump_postgresql(
        tmp_path, pg_schema):
    from tests.support.pg import PG_DSN

    _init(tmp_path, 2600)
    config = tmp_path / "node" / "postlane.toml"
    config.write_text(config.read_text().replace('spool = "var/spool"', f'spool = "{PG_DSN}"')
                      + f'\n[cluster]\nschema_name = "{pg_schema}"\n')
    result = runner.invoke(app, ["backup", str(tmp_path / "copy"), "-c", str(config)])
    assert result.exit_code == 0, result.output
    assert f"pg_dump --format=custom --schema={pg_schema}" in result.output
    manifest = json.loads((tmp_path / "copy" / "manifest.json").read_text())
    assert manifest["postgresql"] == {"schema": pg_schema}
    assert {"config", "api.token_file", "dkim.keys[0].key_file"} <= {
        i["role"] for i in manifest["items"]}


async def test_while_a_backup_holds_the_spool_no_event_is_trimmed(tmp_path, sink):
    """The backup copies the audit store before the spool: events the recorder consumes between
    the two copies must still be in the spool copy, so the node trims none while it holds."""
    import sqlite3

    from postlane.spool.hold import held, holding

    _init(tmp_path, sink.port)
    node = Node(load_config(tmp_path / "node" / "postlane.toml"))
    await node.start()
    state = node.spool.path.parent

    def events() -> int:
        with sqlite3.connect(node.spool.path) as db:
            return db.execute("SELECT count(*) FROM events").fetchone()[0]

    try:
        port = node.listeners[0].port
        assert not held(state)
        with holding(state):
            assert held(state)
            for n in range(3):
                await send(port, "notices@insurer.example", [f"c{n}@example.com"], _notice(n))
            await sink.wait_for(3, timeout=20)
            await node.flush_evidence()  # the recorder has consumed every event
            await node.spool.flush()
            assert events() >= 6  # 3 r + 3 d, none trimmed
        assert not held(state)
        await send(port, "notices@insurer.example", ["c9@example.com"], _notice(9))
        await sink.wait_for(4, timeout=20)

        async def trimmed() -> bool:  # the next progress trims what both consumers hold
            await node.flush_evidence()
            await node.spool.flush()
            return events() < 6

        await until(trimmed, step=0.1, what="the events both consumers hold trimmed")
    finally:
        await node.stop()


async def test_a_backup_copies_the_audit_store_and_the_files_before_the_spool(tmp_path, sink):
    _init(tmp_path, sink.port)
    node = Node(load_config(tmp_path / "node" / "postlane.toml"))
    await node.start()
    await send(node.listeners[0].port, "notices@insurer.example", ["c1@example.com"], _notice(1))
    await sink.wait_for(1, timeout=20)
    await node.stop()
    result = await asyncio.to_thread(runner.invoke, app, ["backup", str(tmp_path / "copy"), "-c",
                                 str(tmp_path / "node" / "postlane.toml")])
    assert result.exit_code == 0, result.output
    roles = [i["role"] for i in json.loads((tmp_path / "copy" / "manifest.json")
                                           .read_text())["items"]]
    spool = roles.index("state:spool.sqlite")
    assert roles.index("state:audit.sqlite") < spool
    assert all(roles.index(r) < spool for r in roles if r.startswith("accounting:"))
    assert "state:trim.hold" not in roles


def _damage(copy, how: str) -> None:
    path = copy / "manifest.json"
    manifest = json.loads(path.read_text())
    spool = next(i for i in manifest["items"] if i["role"] == "state:spool.sqlite")
    if how == "not-an-object":
        manifest = []
    elif how == "no-items":
        del manifest["items"]
    elif how == "no-config":
        manifest["items"] = [i for i in manifest["items"] if i["role"] != "config"]
    elif how == "item-outside":
        spool["file"] = "../elsewhere/spool.sqlite"
    elif how == "config-outside":
        manifest["config"] = "../postlane.toml"
    elif how == "role-outside":  # the role says where restore writes the file
        spool["role"] = "state:../../../elsewhere/spool.sqlite"
    elif how == "accounting-outside":
        acct = next(i for i in manifest["items"] if i["role"].startswith("accounting:"))
        acct["role"] = "accounting:../../../elsewhere/acct.position.json"
    elif how == "file-missing":  # a copy of the backup cut short
        (copy / spool["file"]).unlink()
    elif how == "sqlite-truncated":  # and a manifest written after the damage
        target = copy / spool["file"]
        target.write_bytes(target.read_bytes()[:4096])
        import hashlib

        spool["sha256"] = hashlib.sha256(target.read_bytes()).hexdigest()
    path.write_text(json.dumps(manifest))


@pytest.mark.parametrize("how", ["not-an-object", "no-items", "no-config", "item-outside",
                                 "config-outside", "role-outside", "accounting-outside",
                                 "file-missing", "sqlite-truncated"])
async def test_restore_refuses_a_broken_backup_in_one_line(tmp_path, how):
    """A backup that is cut short or whose manifest is not what backup writes is refused with
    one line saying why, nothing written (it was a traceback, or a restore that succeeded; a
    role naming a path outside the state or accounting folder was written there)."""
    _init(tmp_path, 2600)
    node = Node(load_config(tmp_path / "node" / "postlane.toml"))
    await node.start()  # the stores exist
    await node.stop()
    result = runner.invoke(app, ["backup", str(tmp_path / "copy"), "-c",
                                 str(tmp_path / "node" / "postlane.toml")])
    assert result.exit_code == 0, result.output
    _damage(tmp_path / "copy", how)
    done = runner.invoke(app, ["restore", str(tmp_path / "copy"), str(tmp_path / "new")])
    assert done.exit_code == 1, (done.output, done.exception)
    assert done.exception is None or isinstance(done.exception, SystemExit), done.exception
    lines = done.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), done.output
    said = {"file-missing": "incomplete", "sqlite-truncated": "SQLite's check",
            "no-config": "lists no config"}.get(how, "damaged")
    assert said in lines[0], done.output
    assert not (tmp_path / "new").exists() and not (tmp_path / "elsewhere").exists()


def test_a_backup_run_as_root_leaves_the_hold_file_to_the_nodes_user(tmp_path):
    """Backups run as root; the node runs as its own user and must be able to see the hold
    (a root-owned 0600 trim.hold read as 'not held': the node trimmed events the backup
    needed) and the next backup as that user must open it."""
    import os

    if os.geteuid() != 0:
        pytest.skip("the check is about root")
    _init(tmp_path, 2600)
    state = tmp_path / "node" / "var" / "spool"
    state.mkdir(parents=True, exist_ok=True)
    os.chown(state, 65534, 65534)
    result = runner.invoke(app, ["backup", str(tmp_path / "copy"), "-c",
                                 str(tmp_path / "node" / "postlane.toml")])
    assert result.exit_code == 0, result.output
    hold = state / "trim.hold"
    assert (hold.stat().st_uid, hold.stat().st_gid) == (65534, 65534)


async def test_stores_kept_outside_the_state_folder_are_copied_before_the_spool(tmp_path, sink):
    """An audit store (``audit.path``) or a suppression list (``feedback.suppression_db``) the
    config keeps elsewhere is copied before the spool too, as in the state folder: copied
    after it, the list could hold an operator's change whose record (settled meanwhile) the
    spool copy lacks, and the audit store events the restored spool would number again."""
    _init(tmp_path, sink.port)
    cfg = tmp_path / "node" / "postlane.toml"
    text = cfg.read_text().replace(
        "[feedback]", '[feedback]\nsuppression_db = "../elsewhere/suppression.sqlite3"', 1)
    cfg.write_text(text + '\n[audit]\npath = "../elsewhere/audit.sqlite"\n')
    node = Node(load_config(cfg))
    await node.start()
    await send(node.listeners[0].port, "notices@insurer.example", ["c1@example.com"], _notice(1))
    await sink.wait_for(1, timeout=20)
    await node.stop()
    assert (tmp_path / "elsewhere" / "suppression.sqlite3").is_file()
    result = await asyncio.to_thread(runner.invoke, app, ["backup", str(tmp_path / "copy"), "-c",
                                                          str(cfg)])
    assert result.exit_code == 0, result.output
    roles = [i["role"] for i in json.loads((tmp_path / "copy" / "manifest.json")
                                           .read_text())["items"]]
    spool = roles.index("state:spool.sqlite")
    assert roles.index("audit.path") < spool
    assert roles.index("feedback.suppression_db") < spool
    assert roles.index("audit.path") < roles.index("feedback.suppression_db")


def test_restore_on_a_new_machine_makes_the_state_folder_as_private_as_init_did(tmp_path):
    """docs/operations.md: `init --state-dir` outside the config folder, backup, the machine
    lost, `restore` into a new folder: the state folder it recreates is 0700 as init made it
    (it was 0755: made as the accounting folder's parent, under the umask), the keys and the
    token 0600."""
    import os
    import shutil

    state_dir = tmp_path / "lib" / "postlane"
    result = runner.invoke(app, [
        "init", str(tmp_path / "etc"), "--state-dir", str(state_dir), "--hostname",
        "mta.example", "--domain", "insurer.example", "--listen", "127.0.0.1:0", "--inbound",
        "127.0.0.1:0", "--api", "127.0.0.1:0", "--smarthost", "127.0.0.1:2600"])
    assert result.exit_code == 0, result.output
    assert stat.S_IMODE(state_dir.stat().st_mode) == 0o700
    result = runner.invoke(app, ["backup", str(tmp_path / "copy"), "-c",
                                 str(tmp_path / "etc" / "postlane.toml")])
    assert result.exit_code == 0, result.output
    shutil.rmtree(tmp_path / "etc")  # the lost machine
    shutil.rmtree(tmp_path / "lib")
    old = os.umask(0o022)
    try:
        result = runner.invoke(app, ["restore", str(tmp_path / "copy"), str(tmp_path / "etc")])
    finally:
        os.umask(old)
    assert result.exit_code == 0, result.output
    assert stat.S_IMODE(state_dir.stat().st_mode) == 0o700
    assert stat.S_IMODE((tmp_path / "lib").stat().st_mode) == 0o700
    for secret in [tmp_path / "etc" / "api-token", *(tmp_path / "etc" / "keys").iterdir()]:
        assert stat.S_IMODE(secret.stat().st_mode) == 0o600, secret


@pytest.mark.parametrize("inside", ["var/spool/backup", "var/accounting/backup"])
async def test_a_backup_into_the_folders_it_copies_is_refused(tmp_path, inside):
    """A backup inside the state folder was copied into every later backup, which then failed
    (`[Errno 17] File exists: …/accounting/acct.position.json`, the nested copy's spool read as
    the node's), and is lost with the machine it should survive; so is one in the accounting
    folder. Refused with one line, nothing made; a backup beside them works."""
    _init(tmp_path, 2600)
    node = Node(load_config(tmp_path / "node" / "postlane.toml"))
    await node.start()  # the state folder and the accounting files exist
    await node.stop()
    config = str(tmp_path / "node" / "postlane.toml")
    dest = tmp_path / "node" / inside
    refused = runner.invoke(app, ["backup", str(dest), "-c", config])
    assert refused.exit_code == 1, refused.output
    lines = refused.output.strip().splitlines()
    assert len(lines) == 1 and "inside" in lines[0], refused.output
    assert not dest.exists()
    done = runner.invoke(app, ["backup", str(tmp_path / "copy"), "-c", config])
    assert done.exit_code == 0, done.output


def test_a_restore_that_fails_half_way_leaves_nothing_behind(tmp_path):
    """A write that fails during the restore (here the restored config's absolute state folder
    cannot be made: a file is in its place) takes back what the restore wrote: it left the new
    folder with the config, keys and certificate in it, and a second try then refused it as
    not empty."""
    sink_port = 2600
    result = runner.invoke(app, [
        "init", str(tmp_path / "node"), "--hostname", "mta.example", "--domain",
        "insurer.example", "--listen", "127.0.0.1:0", "--inbound", "127.0.0.1:0", "--api",
        "127.0.0.1:0", "--smarthost", f"127.0.0.1:{sink_port}",
        "--state-dir", str(tmp_path / "state")])
    assert result.exit_code == 0, result.output
    done = runner.invoke(app, ["backup", str(tmp_path / "copy"), "-c",
                               str(tmp_path / "node" / "postlane.toml")])
    assert done.exit_code == 0, done.output
    shutil.rmtree(tmp_path / "state")
    (tmp_path / "state").write_text("not a folder\n")  # where the state folder goes
    failed = runner.invoke(app, ["restore", str(tmp_path / "copy"), str(tmp_path / "new")])
    assert failed.exit_code == 1, failed.output
    assert len(failed.output.strip().splitlines()) == 1, failed.output
    assert not (tmp_path / "new").exists()
    assert (tmp_path / "state").read_text() == "not a folder\n"
