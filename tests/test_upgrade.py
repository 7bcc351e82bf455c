"""Upgrade: stores written by the previous release (commit d9db5f8) open, migrate, verify and
deliver; ``postlane upgrade --check`` says what is pending; a newer store is refused."""

from __future__ import annotations

import json
import sqlite3
import time

import pytest
from typer.testing import CliRunner

from postlane import schema
from postlane.audit.sqlite import SQLiteAuditStore
from postlane.audit.store import COLUMNS
from postlane.cli import app
from postlane.feedback.suppression import SuppressionList
from postlane.node import Node
from postlane.startup import load_config
from tests.conftest import OPERATOR, config_text
from tests.support.old_stores import write_old_stores

runner = CliRunner()


def _old_node(tmp_path, sink_port: int):
    write_old_stores(tmp_path / "spool")
    now = time.time()  # the old message is young, whenever this runs
    conn = sqlite3.connect(tmp_path / "spool" / "spool.sqlite")
    conn.execute("UPDATE messages SET queued_at = ?, deadline = ?, expire_at = ?",
                 (now - 10, now + 110, now + 86400))
    conn.commit()
    conn.close()
    path = tmp_path / "node.toml"
    path.write_text(config_text(tmp_path, sink_port))
    return path


def _check(path) -> tuple[int, dict]:
    result = runner.invoke(app, ["upgrade", "--check", "-c", str(path), "--json"])
    return result.exit_code, {s["store"]: s for s in json.loads(result.stdout)}


async def test_stores_of_the_previous_release_migrate_verify_and_deliver(tmp_path, sink):
    path = _old_node(tmp_path, sink.port)
    code, found = _check(path)
    assert code == 1
    assert {k: (v["current"], v["status"]) for k, v in found.items()} == {
        "spool": (1, "pending"), "audit store": (1, "pending"),
        "suppression list": (1, "pending"), "reputation store": (None, "absent")}
    before = runner.invoke(app, ["audit", "verify", "-c", str(path)])

    node = Node(load_config(path))
    await node.start()  # migrates every store
    try:
        await node.operations.retry("critical", who=OPERATOR)  # the old release's deferral
        arrival = (await sink.wait_for(1, timeout=20))[0]
        assert arrival.rcpts == ["later@example.com"]
        assert b"X-Correlation-ID: old-1" in arrival.data
        assert node.feedback.suppression.check(["gone@example.com"])
    finally:
        await node.stop()

    code, found = _check(path)
    assert code == 0 and {v["status"] for v in found.values()} == {"ok"}
    verify = runner.invoke(app, ["audit", "verify", "-c", str(path), "--json"])
    assert verify.exit_code == 0, verify.output
    # before the migration the evidence commands say what to do; after it the scheme-1
    # records verify, chained with the new ones
    assert before.exit_code == 2 and "postlane upgrade" in before.output
    trail = runner.invoke(app, ["audit", "show", "-c", str(path), "--correlation-id", "old-1",
                                "--format", "json"])
    assert trail.exit_code == 0
    outcomes = {r["recipient"]: r["outcome"] for r in json.loads(trail.output)}
    assert outcomes == {"now@example.com": "delivered", "later@example.com": "delivered"}
    entry = SuppressionList(tmp_path / "spool" / "suppression.sqlite3").check(
        ["gone@example.com"])["gone@example.com"]
    assert (entry.reason, entry.expires) == ("old complaint", 0.0)


def test_upgrade_migrates_the_sqlite_stores_with_the_node_stopped(tmp_path):
    path = _old_node(tmp_path, 2600)
    result = runner.invoke(app, ["upgrade", "-c", str(path)])
    assert result.exit_code == 0, result.output
    assert "migrated audit store" in result.output
    conn = sqlite3.connect(tmp_path / "spool" / "audit.sqlite")
    assert schema.columns(conn, "audit_records") == set(COLUMNS)
    assert not schema.columns(conn, "audit_writers")
    assert [r[0] for r in conn.execute("SELECT version FROM audit_migrations")] == [1, 2, 3, 4, 5]
    assert schema.columns(conn, "audit_seals")


def test_upgrade_refuses_to_migrate_under_a_running_node(tmp_path):
    """Without --check it migrated the SQLite stores even while a node had them open; a
    running node's recorder holds the accounting folder, so that is what it looks at."""
    import fcntl
    import os

    path = _old_node(tmp_path, 2600)
    acct = tmp_path / "acct"
    acct.mkdir(exist_ok=True)
    fd = os.open(acct, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # as a running recorder does
        result = runner.invoke(app, ["upgrade", "-c", str(path)])
        assert result.exit_code == 2 and "a node is running" in result.output
        assert _check(path)[1]["spool"]["status"] == "pending", "nothing migrated"
    finally:
        os.close(fd)
    assert runner.invoke(app, ["upgrade", "-c", str(path)]).exit_code == 0


def test_a_fresh_store_has_the_columns_of_this_release(tmp_path):
    SQLiteAuditStore(tmp_path / "audit.sqlite").close()
    conn = sqlite3.connect(tmp_path / "audit.sqlite")
    assert schema.columns(conn, "audit_records") == set(COLUMNS)


async def test_a_store_newer_than_this_release_is_refused(tmp_path, sink):
    path = _old_node(tmp_path, sink.port)
    runner.invoke(app, ["upgrade", "-c", str(path)])
    conn = sqlite3.connect(tmp_path / "spool" / "suppression.sqlite3")
    conn.execute("INSERT INTO suppression_migrations VALUES (99, 0)")
    conn.commit()
    conn.close()
    code, found = _check(path)
    assert code == 2 and found["suppression list"]["status"] == "newer"
    with pytest.raises(RuntimeError, match="newer than this Postlane"):
        SuppressionList(tmp_path / "spool" / "suppression.sqlite3")


async def test_upgrade_check_reads_the_postgresql_schema(tmp_path, pg_schema):
    from postlane.spool import PostgresSpool
    from tests.support.pg import PG_DSN

    path = tmp_path / "node.toml"
    path.write_text(config_text(tmp_path, 2600).replace(
        f'spool = "{tmp_path}/spool"', f'spool = "{PG_DSN}"')
        + f'[cluster]\nschema_name = "{pg_schema}"\n')
    code, found = _check(path)
    assert code == 0 and found["spool"]["status"] == "absent"
    assert found["spool"]["location"] == f"PostgreSQL schema {pg_schema}"
    spool = PostgresSpool(PG_DSN, pg_schema)
    await spool.open()  # the first node migrates the shared schema
    await spool.close()
    code, found = _check(path)
    assert code == 0 and found["spool"]["status"] == "ok"
    assert found["suppression list"]["location"].endswith("suppression.sqlite3")


@pytest.mark.parametrize("store", ["spool", "audit"])
def test_serve_on_a_newer_store_says_so_in_one_line_and_exits_2(tmp_path, store):
    """A downgrade: the node refuses the store with the advice `upgrade --check` gives, exit
    2, and no traceback (a traceback in the journal reads as a crash, not as a refusal)."""
    import subprocess
    import sys
    from pathlib import Path

    path = _old_node(tmp_path, 9)
    assert runner.invoke(app, ["upgrade", "-c", str(path)]).exit_code == 0
    conn = sqlite3.connect(tmp_path / "spool" / ("spool.sqlite" if store == "spool"
                                                 else "audit.sqlite"))
    if store == "spool":
        conn.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    else:
        conn.execute("INSERT INTO audit_migrations VALUES (99, 0)")
    conn.commit()
    conn.close()
    done = subprocess.run([Path(sys.executable).parent / "postlane", "serve", "-c", str(path)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    assert "newer than this Postlane" in done.stderr, done.stderr
    assert "install the release that wrote it" in done.stderr, done.stderr


@pytest.mark.parametrize("store", ["spool.sqlite", "audit.sqlite", "suppression.sqlite3"])
@pytest.mark.parametrize("damage", ["garbage", "truncated"])
@pytest.mark.parametrize("check", [True, False])
def test_upgrade_on_a_damaged_store_names_it_in_one_line(tmp_path, store, damage, check):
    """A store that is not a database, or cut short, is named with its file (it said only
    `error: DatabaseError: file is not a database`, with four stores to choose from), exit 2,
    no traceback."""
    path = _old_node(tmp_path, 9)
    assert runner.invoke(app, ["upgrade", "-c", str(path)]).exit_code == 0
    target = tmp_path / "spool" / store
    data = target.read_bytes()
    target.write_bytes(b"not a database\n" * 100 if damage == "garbage" else data[:5000])
    result = runner.invoke(app, ["upgrade", *(["--check"] if check else []), "-c", str(path)])
    assert result.exit_code == 2, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and str(target) in lines[0], result.output


@pytest.mark.parametrize("command", [["suppress", "list"], ["suppress", "export"],
                                     ["suppress", "add", "x@example.com"],
                                     ["suppress", "remove", "x@example.com"]])
def test_a_command_on_a_newer_suppression_list_refuses_it_as_a_downgrade(tmp_path, command):
    """After a downgrade the suppression commands refuse the newer list as ``serve`` does: the
    advice and exit 2, not an "unexpected" error asking for a bug report."""
    import subprocess
    import sys
    from pathlib import Path

    path = _old_node(tmp_path, 9)
    assert runner.invoke(app, ["upgrade", "-c", str(path)]).exit_code == 0
    db = tmp_path / "spool" / "suppression.sqlite3"
    conn = sqlite3.connect(db)
    conn.execute("INSERT INTO suppression_migrations VALUES (99, 0)")
    conn.commit()
    conn.close()
    before = db.read_bytes()
    done = subprocess.run([Path(sys.executable).parent / "postlane", *command, "-c", str(path)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert "unexpected" not in done.stderr and "Traceback" not in done.stderr, done.stderr
    assert "newer than this Postlane" in done.stderr, done.stderr
    assert "install the release that wrote it" in done.stderr, done.stderr
    assert db.read_bytes() == before  # refused, not written


def test_a_suppress_command_leaves_the_list_of_a_running_older_node_as_it_is(tmp_path):
    """Between ``pip install --upgrade`` and the restart the old node still runs: a suppress
    command of the new release migrated its list under it, and the old node's writer then
    failed on every hard bounce ("table bounces has 4 columns but 3 values were supplied").
    It refuses instead while a node runs (its recorder holds the accounting folder), and
    migrates the list as before when none does."""
    import fcntl
    import os

    path = _old_node(tmp_path, 2600)
    db = tmp_path / "spool" / "suppression.sqlite3"
    acct = tmp_path / "acct"
    acct.mkdir(exist_ok=True)
    fd = os.open(acct, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # as a running recorder does
        for command in (["suppress", "add", "x@example.com"], ["suppress", "list"]):
            result = runner.invoke(app, [*command, "-c", str(path)])
            assert result.exit_code == 1, result.output
            assert "schema version" in result.output and "a node runs on it" in result.output
            assert _check(path)[1]["suppression list"]["status"] == "pending", "not migrated"
    finally:
        os.close(fd)
    result = runner.invoke(app, ["suppress", "list", "--db", str(db)])  # whose node, unknown
    assert result.exit_code == 1 and "postlane upgrade" in result.output, result.output
    assert _check(path)[1]["suppression list"]["status"] == "pending"
    result = runner.invoke(app, ["suppress", "add", "x@example.com", "-c", str(path)])
    assert result.exit_code == 0, result.output  # no node runs: migrated, then written
    assert _check(path)[1]["suppression list"]["status"] == "ok"
    assert runner.invoke(app, ["suppress", "list", "--db", str(db)]).exit_code == 0
