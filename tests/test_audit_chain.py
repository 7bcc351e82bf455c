"""Tamper evidence and retention, on both audit stores (SQLite and PostgreSQL): edit the
database in SQL as an attacker would, and verify names the record."""

from __future__ import annotations

import dataclasses
import os
from datetime import UTC, datetime

import pytest
from typer.testing import CliRunner

from postlane.accounting.records import Record
from postlane.audit.chain import (
    HASHED,
    PERSONAL,
    RECORD_COLUMNS,
    chain_hash,
    content_digest,
    personal_digest,
)
from postlane.audit.evidence import trails
from postlane.audit.service import load_key
from postlane.audit.store import Query, Retention
from postlane.cli import app
from tests.support.audit import AuditBackend

DAY1 = datetime(2026, 11, 19, 10, tzinfo=UTC).timestamp()
DAY2 = DAY1 + 86_400
KEY = b"k" * 32


def make_store(backend: AuditBackend, n: int = 20) -> AuditBackend:
    """n records (two per recipient: received, delivered), the second half on the next day."""
    store = backend.open()
    try:
        for i in range(n):
            t = (DAY1 if i < n // 2 else DAY2) + i
            cls = "policy" if i % 4 < 2 else "marketing"
            store.append([(Record(
                type="r" if i % 2 == 0 else "d", time_logged=t, time_queued=t - i % 2,
                orig="s@x.test", rcpt=f"user{i // 2}@example.com", queue_id=f"Q{i // 2}",
                cls=cls, vmta_pool="pool", correlation_id=f"corr-{i // 2}",
                dlv_destination_ip="127.0.0.1" if i % 2 else "",
                dsn_diag=f"smtp;250 ok <user{i // 2}@example.com>" if i % 2 else "",
                total_seconds_queued=float(i % 2), attempt=i % 2),
                120.0 if cls == "policy" else None, "w1", i + 1)])
    finally:
        store.close()
    return backend


def verify(db: AuditBackend, since: str | None = None):
    store = db.open(readonly=True)
    try:
        return store.verify(since)
    finally:
        store.close()


def sql(db: AuditBackend, *statements: tuple) -> None:
    db.sql(*statements)


def shift(db: AuditBackend, after: int, by: int) -> None:
    """Renumber seq > after (what an attacker does to make room or close a gap)."""
    sql(db, ("UPDATE audit_records SET seq = -(seq + ?) WHERE seq > ?", (by, after)),
        ("UPDATE audit_records SET seq = -seq WHERE seq < 0",))


@pytest.fixture
def db(audit_backend) -> AuditBackend:
    return make_store(audit_backend)


def test_hash_scheme_covers_every_record_field():
    """A new Record field needs a new hash scheme (see chain.RECORD_COLUMNS)."""
    assert set(RECORD_COLUMNS) == {f.name for f in dataclasses.fields(Record)}


def test_untouched_store_verifies(db):
    result = verify(db)
    assert result.ok and result.checked == 20 and result.problem is None
    assert [d["day"] for d in result.days] == ["2026-11-19", "2026-11-20"]
    assert result.days[1]["anchor"] == result.days[0]["head"]  # day 2 anchored on day 1
    assert verify(db, "2026-11-20").ok and verify(db, "2026-11-20").checked == 10


@pytest.mark.parametrize("column, value", [("dlv_destination_ip", "10.9.9.9"),
                                           ("rcpt", "someone-else@example.com"),
                                           ("dsn_diag", "smtp;250 made up"),
                                           ("time_logged", DAY1 + 0.5), ("sla", 999.0)])
def test_edited_field_names_the_record(db, column, value):
    sql(db, (f"UPDATE audit_records SET {column} = ? WHERE seq = 7", (value,)))
    problem = verify(db).problem
    assert (problem.seq, problem.kind) == (7, "altered"), problem


def test_deleted_row_is_named(db):
    sql(db, ("DELETE FROM audit_records WHERE seq = 8",))
    problem = verify(db).problem
    assert (problem.seq, problem.kind) == (9, "removed") and "seq 8..8" in problem.detail


def test_deleted_row_with_renumbering_is_named(db):
    sql(db, ("DELETE FROM audit_records WHERE seq = 8",))
    shift(db, 8, -1)
    problem = verify(db).problem
    assert (problem.seq, problem.kind) == (8, "removed"), problem


def test_deleted_last_record_is_caught_by_the_day_seal(db):
    sql(db, ("DELETE FROM audit_records WHERE seq = 20",))
    problem = verify(db).problem
    assert (problem.seq, problem.kind) == (20, "removed"), problem


def test_deleted_day_is_named(db):
    sql(db, ("DELETE FROM audit_records WHERE day = '2026-11-20'",))
    problem = verify(db).problem
    assert (problem.seq, problem.kind) == (11, "removed") and "2026-11-20" in problem.detail


def test_inserted_forged_record_is_named(db):
    """A forger who knows the algorithm and links the new row correctly to its predecessor."""
    shift(db, 10, 1)
    row = db.row(9)
    prev = db.row(10)["hash"]
    row.update(seq=11, rcpt="forged@example.com", prev=prev, ev_n=999)
    row["pdigest"] = personal_digest(row["nonce"], [row[c] for c in PERSONAL])
    row["hash"] = chain_hash(prev, content_digest([row[c] for c in HASHED], row["pdigest"]))
    db.insert(row)
    problem = verify(db).problem
    assert (problem.seq, problem.kind) == (11, "inserted"), problem


def test_inserted_copy_is_named(db):
    sql(db, ("DROP INDEX ax_event",))  # an attacker with write access can
    row = db.row(4)
    row["seq"] = 21
    db.insert(row)
    problem = verify(db).problem
    assert (problem.seq, problem.kind) == (21, "inserted") and "seq 4" in problem.detail


def test_reordered_records_are_named(db):
    sql(db, ("UPDATE audit_records SET seq = -1 WHERE seq = 12",),
        ("UPDATE audit_records SET seq = 12 WHERE seq = 13",),
        ("UPDATE audit_records SET seq = 13 WHERE seq = -1",))
    problem = verify(db).problem
    assert (problem.seq, problem.kind) == (12, "reordered"), problem


def test_cli_verify_exits_1_and_names_the_record(db):
    runner = CliRunner()
    assert runner.invoke(app, ["audit", "verify", *db.cli()]).exit_code == 0
    sql(db, ("UPDATE audit_records SET dsn_status = '2.0.0' WHERE seq = 3",))
    res = runner.invoke(app, ["audit", "verify", *db.cli()])
    assert res.exit_code == 1 and "record seq 3: altered" in res.output


def test_retention_keeps_verification_passing(db):
    store = db.open()
    report = store.purge({"policy": Retention(pseudonymise=86_400 * 2),
                          "marketing": Retention(delete=86_400 * 2)}, KEY, now=DAY2 + 86_400 * 2)
    # day-1 records are older than 2 days at that moment, day-2 records are not
    assert report["policy"]["pseudonymised"] == 6 and report["marketing"]["purged"] == 4
    store.close()
    result = verify(db)
    assert result.ok, result.problem
    assert (result.pseudonymised, result.purged) == (6, 4)
    store = db.open(readonly=True)
    [trail] = trails(store.find(Query(correlation_id="corr-0")))
    assert trail.rcpt.startswith("pseud-") and trail.rcpt.endswith("@example.com")
    assert "user0@" not in trail.final["dsn_diag"] and trail.rcpt in trail.final["dsn_diag"]
    assert store.find(Query(rcpt="user0@example.com")) == []
    [purged] = trails(store.find(Query(queue_id="Q1")))
    assert purged.rcpt == "(purged)" and all(r["state"] == 2 for r in purged.rows)
    assert store.purges()[0]["cls"] in ("policy", "marketing")
    store.close()
    # later records are untouched and the chain stays checkable across the boundary
    assert verify(db, "2026-11-20").ok
    sql(db, ("UPDATE audit_records SET cdigest = ? WHERE seq = 3", (bytes(32),)))
    assert (verify(db).problem.seq, verify(db).problem.kind) == (3, "altered")


def test_pseudonymised_rows_still_detect_edits(db):
    store = db.open()
    store.purge({"policy": Retention(pseudonymise=1)}, KEY, now=DAY2 + 86_400)
    store.close()
    sql(db, ("UPDATE audit_records SET dlv_destination_ip = '10.0.0.1' WHERE seq = 2",))
    assert (verify(db).problem.seq, verify(db).problem.kind) == (2, "altered")


def test_purge_never_launders_a_tampered_row(db):
    sql(db, ("UPDATE audit_records SET rcpt = 'x@example.com' WHERE seq = 5",))
    store = db.open()
    report = store.purge({"policy": Retention(delete=1)}, None, now=DAY2 + 86_400)
    store.close()
    assert report["policy"]["skipped_tampered"] == 1
    assert (verify(db).problem.seq, verify(db).problem.kind) == (5, "altered")


def test_pseudonymisation_key_must_be_private(tmp_path):
    key = tmp_path / "audit.key"
    key.write_bytes(os.urandom(32))
    key.chmod(0o644)
    with pytest.raises(PermissionError):
        load_key(str(key))
    key.chmod(0o600)
    assert len(load_key(str(key))) >= 16


def test_cli_purge_then_show_finds_the_pseudonymised_recipient(db, tmp_path):
    from tests.conftest import config_text

    key = tmp_path / "audit.key"
    key.write_bytes(os.urandom(32))
    key.chmod(0o600)
    cfg = tmp_path / "node.toml"
    cfg.write_text(config_text(tmp_path, 2525, f"""
[classes.policy]
pool = "critical"
{db.toml()}pseudonymisation_key = "{key}"
[audit.retention.policy]
pseudonymise = "1d"
"""))
    runner = CliRunner()
    res = runner.invoke(app, ["audit", "purge", "-c", str(cfg)])
    assert res.exit_code == 0 and "policy: pseudonymised 10" in res.output, res.output
    res = runner.invoke(app, ["audit", "show", "-c", str(cfg), "--recipient", "user0@example.com"])
    assert res.exit_code == 0 and "recipient pseud-" in res.output, res.output
    res = runner.invoke(app, ["audit", "show", *db.cli(), "--recipient",
                              "user0@example.com"])
    assert res.exit_code == 1  # without the key the address is gone
    assert runner.invoke(app, ["audit", "verify", "-c", str(cfg)]).exit_code == 0
