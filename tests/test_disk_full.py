"""A full disk under the spool, the accounting folder or the audit store, on a real small file
system (a tmpfs mounted for the test: ``tests/support/smallfs.py``), or the accounting folder
taken away under a running node: nothing acknowledged is lost, every record reaches the files
and the store exactly once when space (or the folder) returns, the node tells the operator
once, and it recovers without a restart."""

from __future__ import annotations

import json
import logging
import os
import shutil
import smtplib
import sqlite3
import time
from collections import Counter

import pytest

from postlane.monitor.alerts import Alert, AlertManager
from postlane.relay.tlsrpt import NO_POLICY, TLSReports
from postlane.startup import parse_config
from tests.conftest import config_text, message, records, send
from tests.support.waiting import until
from tests.test_api import api_client

NO_FLOOR = "[security]\nmin_free_space = 0\n"


async def fill_accounting(node) -> int:
    """Send one message at a time (to u0@, u1@ ...) until the node's accounting files cannot
    be written (its ``accounting`` state); how many were sent."""
    n = 0
    while "accounting" not in node.health.active:
        await send(node.listeners[0].port, "s@insurer.test", [f"u{n}@example.com"],
                   message(f"m{n}"))
        n += 1
        assert n < 400, "the accounting folder never filled"
    return n


async def test_a_full_accounting_folder_delays_the_files_and_doubles_no_line(
        tmp_path, small_fs, sink, make_node):
    """The recorder cannot write the accounting files: it says so once, keeps running (no
    crash and restart loop), deliveries go on, and once there is room every record is in the
    files once (a failed write used to leave half a batch that the retry wrote again)."""
    acct = small_fs("acct", "160k")
    node = await make_node(config_text(tmp_path, sink.port, NO_FLOOR))
    recorder = node.recorder.child_pid
    port = node.listeners[0].port
    n = await fill_accounting(node)
    for i in range(n, n + 10):  # accepted and delivered while the files cannot be written
        await send(port, "s@insurer.test", [f"u{i}@example.com"], message(f"m{i}"))
    n += 10
    await sink.wait_for(n)
    assert node.recorder.child_pid == recorder  # still the same process
    acct.grow("16m")
    await until(lambda: "accounting" not in node.health.active, timeout=60,
                what="the files written again once there is room")
    await node.flush_evidence()
    lines = Counter((r["type"], r["rcpt"]) for r in records(tmp_path))
    assert lines == Counter({(t, f"u{i}@example.com"): 1 for i in range(n) for t in "rd"})
    assert node.recorder.child_pid == recorder


@pytest.mark.parametrize("how", ["removed", "moved"])
async def test_an_accounting_folder_taken_away_gets_every_record_in_new_files(
        tmp_path, sink, make_node, how):
    """The accounting folder removed (or moved away) while the node runs: degraded until the
    folder is back, then new files there hold every record since the files went (those synced
    before went with them, as at a restart after a file was moved away). The recorder went on
    writing into the file it had open, gone from the folder, and its position named that file:
    the folder got no record again until a restart."""
    node = await make_node(config_text(tmp_path, sink.port))
    port = node.listeners[0].port

    async def deliver(numbers: range) -> None:
        for i in numbers:
            await send(port, "s@insurer.test", [f"u{i}@example.com"], message(f"m{i}"))
        await sink.wait_for(numbers.stop)

    await deliver(range(3))
    await node.flush_evidence()
    acct = tmp_path / "acct"
    if how == "removed":
        shutil.rmtree(acct)
    else:
        acct.rename(tmp_path / "acct.old")
    await deliver(range(3, 6))
    await until(lambda: "accounting" in node.health.active, timeout=30,
                what="the node says the files cannot be written")
    acct.mkdir(mode=0o750)
    await deliver(range(6, 9))
    await until(lambda: "accounting" not in node.health.active, timeout=60,
                what="the files written again once the folder is back")
    await node.flush_evidence()
    lines = Counter((r["type"], r["rcpt"]) for r in records(tmp_path))
    assert lines == Counter({(t, f"u{i}@example.com"): 1 for i in range(3, 9) for t in "rd"})


async def test_a_node_starts_on_a_full_accounting_disk_degraded_not_refused(
        tmp_path, small_fs, sink, make_node):
    """The recorder could not create its files at start (ENOSPC) and the node refused to
    start ("cannot start: ...", exit 1) - while the same disk filling under a running node
    only degrades it. Now it starts in the ``accounting`` state: mail is taken and delivered,
    the records wait in the spool, and the files are written once there is room."""
    acct = small_fs("acct", "160k")
    acct.fill()
    node = await make_node(config_text(tmp_path, sink.port, NO_FLOOR))
    assert "accounting" in node.health.active
    port = node.listeners[0].port
    for i in range(3):
        await send(port, "s@insurer.test", [f"u{i}@example.com"], message(f"m{i}"))
    await sink.wait_for(3)
    assert "accounting" in node.health.active
    acct.free()
    await until(lambda: "accounting" not in node.health.active, timeout=60,
                what="the files set up once there is room")
    await node.flush_evidence()
    lines = Counter((r["type"], r["rcpt"]) for r in records(tmp_path))
    assert lines == Counter({(t, f"u{i}@example.com"): 1 for i in range(3) for t in "rd"})


async def test_a_full_spool_disk_defers_deliveries_once_not_a_traceback_each(
        tmp_path, small_fs, sink, make_node, caplog):
    """The attempt journal (beside the spool) cannot grow: no final dot is sent without its
    mark, so the delivery is deferred - told once as a degraded state, not a traceback per
    attempt - and made once the disk has room again."""
    spool = small_fs("spool", "24m")
    node = await make_node(config_text(tmp_path, sink.port, NO_FLOOR))
    spool.fill()
    with open(spool.path / "ballast", "r+b") as fh:  # room for the spool's commit (the 250),
        fh.truncate(fh.seek(0, 2) - 512 * 1024)      # not for a journal window (1 MB)
    caplog.set_level(logging.INFO)
    await send(node.listeners[0].port, "s@insurer.test", ["a@example.com"],
               message("one", cls="policy-documents"))
    await until(lambda: node.health.active.get("attempt-journal")
                and node.health.active["attempt-journal"].count >= 2, timeout=30,
                what="deliveries deferred for the journal")
    assert sink.arrivals == []
    assert not [r for r in caplog.records if "failed unexpectedly" in r.getMessage()]
    spool.free()
    await sink.wait_for(1)
    await until(lambda: "attempt-journal" not in node.health.active, what="the state ended")
    await node.flush_evidence()
    assert [r["type"] for r in records(tmp_path)][-1] == "d"


async def test_the_free_space_floor_covers_the_evidence_folders(tmp_path, small_fs, sink,
                                                               make_node):
    """The accounting folder (and the audit store) may be another file system than the spool:
    below ``security.min_free_space`` there, intake refuses new mail (452 4.3.1; the API 503)
    so that the records of mail already accepted still have room."""
    acct = small_fs("acct", "8m")
    audit = small_fs("audit", "8m")
    node = await make_node(config_text(
        tmp_path, sink.port,
        f'[audit]\npath = "{audit.path}/audit.sqlite"\n[security]\nmin_free_space = "4MB"\n'))
    port = node.listeners[0].port
    await send(port, "s@insurer.test", ["before@example.com"], message("before"))
    for fs in (acct, audit):
        fs.fill()
        node.intake.disk.recheck()
        with pytest.raises(smtplib.SMTPSenderRefused) as refused:
            await send(port, "s@insurer.test", ["during@example.com"], message("during"))
        assert refused.value.smtp_code == 452 and b"4.3.1" in refused.value.smtp_error
        assert str(fs.path) in node.health.active["disk"].cause
        fs.free()
        await until(lambda: "disk" not in node.health.active, what="space back, noticed")
    await send(port, "s@insurer.test", ["after@example.com"], message("after"))
    arrivals = await sink.wait_for(2)
    assert sorted(a.rcpts[0] for a in arrivals) == ["after@example.com", "before@example.com"]


async def test_the_api_says_503_while_the_spool_cannot_commit(tmp_path, small_fs, sink,
                                                             make_node):
    """A full spool disk: injection is refused 503 with the reason, and so is an operator's
    pause (its commit failed: it used to be a 500 "internal error" and a traceback)."""
    spool = small_fs("spool", "24m")
    node = await make_node(config_text(tmp_path, sink.port, NO_FLOOR))
    spool.fill()
    async with api_client(node, tmp_path) as api:
        sent = await api.post("/api/v1/messages", json={
            "from": "s@insurer.test", "to": ["a@example.com"], "subject": "s",
            "text": "x" * 50000})
        assert sent.status_code == 503 and "4.3.0" in sent.json()["error"]
        paused = await api.post("/api/v1/pools/bulk/pause")
        assert paused.status_code == 503, paused.text
        assert "spool" in paused.json()["error"]
        spool.free()
        assert (await api.post("/api/v1/pools/bulk/pause")).status_code == 200


def _spool_events(tmp_path) -> int:
    db = sqlite3.connect(tmp_path / "spool" / "spool.sqlite")
    try:
        return db.execute("SELECT count(*) FROM events").fetchone()[0]
    finally:
        db.close()


async def test_torn_lines_written_again_on_a_full_disk_are_written_once_space_returns(
        tmp_path, small_fs, sink, make_node):
    """A power loss tore the accounting files' synced tail, and the disk is full at the
    restart: the lost records (the spool has let their events go) cannot be written again from
    the audit store. The files go back to their last sync, the position still names the lost
    events, and once there is room every record is in the files once (the failed write had
    taken them out of the list to write again, and they were never written)."""
    acct = small_fs("acct", "16m")
    cfg = config_text(tmp_path, sink.port, NO_FLOOR)
    node = await make_node(cfg)
    port = node.listeners[0].port
    for i in range(20):
        await send(port, "s@insurer.test", [f"t{i}@example.com"], message(f"m{i}"))
    await sink.wait_for(20)
    await node.flush_evidence()
    await until(lambda: _spool_events(tmp_path) == 0, what="the events consumed and trimmed")
    await node.stop()
    position = acct.path / "acct.position.json"
    for name, _ in json.loads(position.read_text())["files"].values():
        os.truncate(name, os.path.getsize(name) // 2)  # half the synced records gone
    acct.fill()
    with open(acct.path / "ballast", "r+b") as fh:  # room for the new files and their
        fh.truncate(fh.seek(0, 2) - 2 * 4096)      # position, not for the lost lines
    node = await make_node(cfg)
    await until(lambda: "accounting" in node.health.active, what="the write again failed")
    assert json.loads(position.read_text())["lost"], "the lost events left the position"
    acct.free()
    await until(lambda: "accounting" not in node.health.active, timeout=60,
                what="the lost lines written once there is room")
    await node.flush_evidence()
    lines = Counter((r["type"], r["rcpt"]) for r in records(tmp_path))
    assert lines == Counter({(t, f"t{i}@example.com"): 1 for i in range(20) for t in "rd"})
    assert not json.loads(position.read_text())["lost"]


async def test_tls_report_counts_on_a_full_disk_are_one_line_per_outage_and_kept(
        tmp_path, small_fs, caplog):
    """The TLS-report file (tlsrpt.sqlite3) on a full disk: each round (a minute) logged a
    traceback, and the counts taken out of memory for the failed write were gone. Now: one
    line when the outage starts, one when it ends, and the counts are saved once there is
    room."""
    fs = small_fs("state", "256k")
    reports = TLSReports(parse_config(config_text(tmp_path, 2525)), None, fs.path / "t.sqlite3")
    reports.session("a.test", NO_POLICY, "mx.a.test", "192.0.2.1", "192.0.2.2")
    assert await reports.tick(send=True)  # the file exists, with its first count
    fs.fill()
    caplog.clear()
    for _ in range(3):  # three rounds of the outage, a session counted in each
        reports.session("a.test", NO_POLICY, "mx.a.test", "192.0.2.1", "192.0.2.2",
                        "starttls-not-supported", "no STARTTLS")
        assert not await reports.tick(send=True)
    told = [r for r in caplog.records if r.name == "postlane.tlsrpt"]
    assert [r.levelname for r in told] == ["ERROR"], told
    assert told[0].exc_info is None and "cannot be saved" in told[0].getMessage()
    fs.free()
    caplog.clear()
    assert await reports.tick(send=True)
    assert [r.getMessage() for r in caplog.records if r.name == "postlane.tlsrpt"] == [
        "TLS report counts saved again"]
    day = time.strftime("%Y-%m-%d", time.gmtime())
    report = reports.report(day, "a.test")
    assert report is not None
    [policy] = report["policies"]
    assert policy["summary"] == {"total-successful-session-count": 1,
                                 "total-failure-session-count": 3}


async def test_an_alert_is_told_while_its_journal_disk_is_full(tmp_path, small_fs, caplog):
    """``alerts.jsonl`` lives in the accounting folder: on a full disk its write raised before
    the notifiers were called, so the alert about the full disk itself was never paged."""
    acct = small_fs("acct", "64k")
    acct.fill()
    told: list[str] = []

    async def pager(event: str, alert: Alert) -> None:
        told.append(event)

    manager = AlertManager([pager], resolve_after=0.0, journal=acct.path / "alerts.jsonl")
    now = time.time()
    for n in range(2):
        manager.emit("fired", Alert(f"disk:{n}", "disk", "c", "p", "full", 1.0, 0.0, now, now))
    await until(lambda: told == ["fired", "fired"], what="both told")
    assert [r.getMessage() for r in caplog.records if r.levelname == "ERROR"] == [
        "alert file cannot be written; alerts are told all the same"]
    await manager.close()
