"""Evidence that survives a crash: records committed with the state they describe, fed to the
audit store and the accounting files exactly once, unknown attempts written down, and gaps
found by ``audit verify``."""

from __future__ import annotations

import asyncio
import contextlib
import csv
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from typer.testing import CliRunner

from postlane.accounting.records import unpack
from postlane.audit.evidence import trails
from postlane.audit.sla import sla_report
from postlane.audit.sqlite import SQLiteAuditStore
from postlane.audit.store import Query
from postlane.cli import app
from postlane.harness.sink import Sink
from postlane.spool.attempts import KEEP
from tests.conftest import config_text, message, records, send
from tests.support.waiting import until


def cli(*args: str):
    return CliRunner().invoke(app, ["audit", *args])


def outbox(tmp_path: Path) -> list[tuple]:
    """(writer, n, type, queue id, rcpt) of the events waiting in the spool."""
    db = sqlite3.connect(tmp_path / "spool" / "spool.sqlite")
    try:
        return [(w, n, *(unpack(d)[i] for i in (0, 5, 4))) for w, n, d in db.execute(
            "SELECT writer, n, data FROM events ORDER BY writer, n")]
    finally:
        db.close()


async def test_records_are_in_the_spool_with_the_state_they_describe(tmp_path, sink, make_node):
    """With the recorder stopped, the "r" of an accepted message and the "d" of its delivery
    are already durable in the spool, where the recorder takes them from once it runs."""
    node = await make_node(config_text(tmp_path, sink.port))
    pid = node.recorder.child_pid
    os.kill(pid, signal.SIGSTOP)
    try:
        await send(node.listeners[0].port, "s@insurer.test", ["a@example.com"],
                   message("one", cls="policy-documents"))
        await sink.wait_for(1)

        async def delivered() -> bool:  # the sink has it before the relay reads its 250
            await node.spool.flush()
            return len(outbox(tmp_path)) == 2

        await until(delivered, what="the delivery's event in the spool")
        events = outbox(tmp_path)
        assert [(e[2], e[4]) for e in events] == [("r", "a@example.com"), ("d", "a@example.com")]
        assert events[0][1] + 1 == events[1][1] and events[0][3] == events[1][3]
    finally:
        os.kill(pid, signal.SIGCONT)
    await node.flush_evidence()
    assert outbox(tmp_path) == []  # consumed by both, then trimmed
    store = SQLiteAuditStore(node.audit.path, readonly=True)
    try:
        assert [r["type"] for r in store.rows_between(None, None)] == ["r", "d"]
    finally:
        store.close()
    assert [r["type"] for r in records(tmp_path)] == ["r", "d"]


async def test_a_killed_recorder_is_replaced_and_nothing_is_lost_or_doubled(tmp_path, sink,
                                                                         make_node):
    node = await make_node(config_text(tmp_path, sink.port))
    port = node.listeners[0].port
    for i in range(20):
        await send(port, "s@insurer.test", [f"u{i}@example.com"], message(f"m{i}"))
        if i == 9:
            os.kill(node.recorder.child_pid, signal.SIGKILL)
    await sink.wait_for(20)
    await until(lambda: node.recorder.child_pid is not None
                and node.recorder._proc.poll() is None,
                what="a new recorder started by the node")
    await node.flush_evidence()
    store = SQLiteAuditStore(node.audit.path, readonly=True)
    try:
        rows = list(store.rows_between(None, None))
    finally:
        store.close()
    assert sorted((r["type"], r["rcpt"]) for r in rows) == sorted(
        (t, f"u{i}@example.com") for i in range(20) for t in ("r", "d"))
    lines = [(r["type"], r["rcpt"]) for r in records(tmp_path)]
    assert sorted(lines) == sorted((t, f"u{i}@example.com") for i in range(20) for t in "rd")


async def test_a_lost_event_fails_verify_and_is_named(tmp_path, sink, make_node):
    """An event deleted from the spool before the recorder took it: the chain itself is
    intact, but verify names the missing event and the recipient without a final record."""
    cfg = tmp_path / "node.toml"
    cfg.write_text(config_text(tmp_path, sink.port))
    node = await make_node(cfg.read_text())
    pid = node.recorder.child_pid
    os.kill(pid, signal.SIGSTOP)
    try:
        for i in range(3):
            await send(node.listeners[0].port, "s@insurer.test", [f"v{i}@example.com"],
                       message(f"m{i}"))
        await sink.wait_for(3)
        await node.spool.flush()
        events = outbox(tmp_path)
        writer, n, _, queue_id, _ = next(e for e in events
                                         if e[2] == "d" and e[4] == "v1@example.com")
        db = sqlite3.connect(tmp_path / "spool" / "spool.sqlite")
        db.execute("DELETE FROM events WHERE writer = ? AND n = ?", (writer, n))
        db.commit()
        db.close()
    finally:
        os.kill(pid, signal.SIGCONT)
    await node.flush_evidence()
    res = await asyncio.to_thread(cli, "verify", "-c", str(cfg))
    assert res.exit_code == 1, res.output
    assert res.output.startswith("ok: 5 records")  # the chain of what is there is intact
    assert f"INCOMPLETE: event(s) {n}..{n} of spool writer {writer} are missing" in res.output
    assert f"message {queue_id} to v1@example.com" in res.output
    assert "has no final record" in res.output
    res = await asyncio.to_thread(cli, "verify", "-c", str(cfg), "--json")
    assert json.loads(res.output)["completeness"]["ok"] is False


async def test_verify_with_the_spool_knows_queued_mail_is_not_missing(tmp_path, make_node):
    """A recipient still deferred has no final record, and that is complete; the message is
    found by any of its keys, from any record."""
    dead = socket.socket()
    dead.bind(("127.0.0.1", 0))  # a port nobody answers on: the delivery is deferred
    cfg = tmp_path / "node.toml"
    cfg.write_text(config_text(tmp_path, dead.getsockname()[1]))
    node = await make_node(cfg.read_text())
    await send(node.listeners[0].port, "s@insurer.test", ["w@example.com"],
               message("m", extra="X-Correlation-ID: corr-w\r\n"))

    async def deferred() -> bool:  # the "t" of the first attempt is in the store
        await node.flush_evidence()
        store = SQLiteAuditStore(node.audit.path, readonly=True)
        try:
            return "t" in [r["type"] for r in store.find(Query(rcpt="w@example.com"))]
        finally:
            store.close()

    await until(deferred, step=0.05, what="the deferral's record")
    res = await asyncio.to_thread(cli, "verify", "-c", str(cfg))
    assert res.exit_code == 0 and "is still queued" in res.output, res.output
    store = SQLiteAuditStore(node.audit.path)  # the "r" gone: found through the "t" alone
    store.db.execute("DROP INDEX ax_event")
    store.db.execute("DELETE FROM audit_records WHERE type = 'r'")
    try:
        [trail] = trails(store.find(Query(correlation_id="corr-w")))
        assert [r["type"] for r in trail.rows] == ["t"]
    finally:
        store.close()
    dead.close()


class _TakesAndHolds(Sink):
    """Records the arrival when the final dot arrives, then holds the 250 (the moment a node
    can die with the message delivered and its outcome not recorded)."""

    hold: float = 30.0

    async def handle_DATA(self, server, session, envelope) -> str:
        reply = await super().handle_DATA(server, session, envelope)
        await asyncio.sleep(self.hold)  # real time in the scenario: a remote that holds its 250
        return reply


def _free_port() -> int:
    return _free_ports(1)[0]


def _free_ports(n: int) -> list[int]:
    """``n`` distinct free ports: each socket is held until all are picked (picked one by
    one, the kernel may give the same port twice)."""
    with contextlib.ExitStack() as held:
        socks = [held.enter_context(socket.socket()) for _ in range(n)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]


async def _serve(cfg: Path, port: int, log: Path) -> subprocess.Popen:
    with open(log, "ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "postlane.cli", "serve", "-c", str(cfg)],
                                stdout=out, stderr=out)

    def listening() -> bool:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
            return True
        assert proc.poll() is None, log.read_text()[-2000:]
        return False

    await until(listening, timeout=30, step=0.05, what="the node listening")
    return proc


async def _killed_after_the_final_dot(tmp_path: Path, correlation: str,
                                      before_restart: Callable[[], None] = lambda: None
                                      ) -> tuple[Path, Path]:
    """A policy notice submitted to ``postlane serve``, the node SIGKILLed while the remote
    holds its 250, ``before_restart`` run, the node started again until the remote has the
    second copy, then stopped: the config file and the node's log."""
    sink = await _TakesAndHolds().start()
    port = _free_port()
    cfg = tmp_path / "node.toml"
    cfg.write_text(config_text(tmp_path, sink.port, listener_port=port))
    log = tmp_path / "node.log"
    proc = await _serve(cfg, port, log)
    try:
        await send(port, "s@insurer.test", ["x@example.com"],
                   message("notice", cls="policy-documents",
                           extra=f"X-Correlation-ID: {correlation}\r\n"))
        await sink.wait_for(1)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        before_restart()
        sink.hold = 0.0
        proc = await _serve(cfg, port, log)
        await sink.wait_for(2, timeout=60)
    finally:
        proc.send_signal(signal.SIGTERM)
        await asyncio.to_thread(proc.wait, 60)
        await sink.stop()
    return cfg, log


async def test_a_crash_after_the_final_dot_leaves_an_unknown_attempt(tmp_path):
    """SIGKILL while the remote holds its 250: after the restart the trail says attempt 1's
    outcome is unknown, then attempt 2 delivered; verify and the SLA report account for it."""
    cfg, log = await _killed_after_the_final_dot(tmp_path, "crash-1")
    res = await asyncio.to_thread(cli, "show", "-c", str(cfg), "--correlation-id", "crash-1")
    assert res.exit_code == 0, res.output
    assert "attempt 1: OUTCOME UNKNOWN (node stopped) from 127.0.0.20" in res.output, res.output
    assert "attempt 2: delivered from 127.0.0.20" in res.output
    assert "outcome: delivered" in res.output
    res = await asyncio.to_thread(cli, "verify", "-c", str(cfg))
    assert res.exit_code == 0, res.output
    store = SQLiteAuditStore(tmp_path / "spool" / "audit.sqlite", readonly=True)
    try:
        report = sla_report(store, 0, time.time() + 60)["classes"]["policy-documents"]
    finally:
        store.close()
    [unknown] = report["unknown_attempts"]
    assert unknown["recipient"] == "x@example.com" and unknown["attempts"] == [1]
    assert unknown["within_sla_if_then"] is True and unknown["outcome"] == "delivered"
    assert [r["type"] for r in records(tmp_path)] == ["r", "u", "d"]
    text = log.read_text()
    assert "observer" not in text  # the "u" record is known to every observer
    # the restart says what it recovered (the first start, on a new spool, says nothing)
    assert text.count("recovered after an unclean stop") == 1
    assert "1 recipients not yet final queued again" in text
    assert "outcome unknown: attempt 1 to x@example.com (queue id" in text, text[-3000:]


async def test_an_unknown_attempt_survives_a_restart_hours_after_the_crash(tmp_path):
    """The node is SIGKILLed while the remote holds its 250 and comes back only after the
    attempt journal's files are older than their keep time (a crash at night, a restart in the
    morning): the restart still reads the attempt and writes its "u" record."""
    def hours_later() -> None:
        then = time.time() - KEEP - 3600
        for path in (tmp_path / "spool").glob("attempts-*.log"):
            os.utime(path, (then, then))

    cfg, _ = await _killed_after_the_final_dot(tmp_path, "late-1", hours_later)
    assert [r["type"] for r in records(tmp_path)] == ["r", "u", "d"]
    res = await asyncio.to_thread(cli, "verify", "-c", str(cfg))
    assert res.exit_code == 0, res.output


def _children(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError):
                if int((entry / "stat").read_text().rsplit(") ", 1)[1].split()[1]) == pid:
                    out.append(int(entry.name))
    return out


def _gone(pid: int) -> bool:
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(") ", 1)[1][0] == "Z"
    except (OSError, IndexError):
        return True


def _filed(tmp_path: Path) -> list[tuple[str, str]]:
    """(type, rcpt) of the lines the accounting position vouches for (synced)."""
    acct = tmp_path / "acct"
    position = json.loads((acct / "acct.position.json").read_text())
    out = []
    for name, size in position["files"].values():
        if name.endswith(".csv"):
            text = Path(name).read_bytes()[:size].decode()
            out += [(r["type"], r["rcpt"]) for r in csv.DictReader(text.splitlines())]
    return out


async def test_a_recorder_that_outlives_its_killed_node_writes_no_line_twice(tmp_path, sink):
    """SIGKILL of the node alone: its recorder, slow (stopped here) with lines it has not
    synced yet, writes them after the restarted node's recorder has started. The new one waits
    for it, so each record is in the accounting files once."""
    port = _free_port()
    cfg = tmp_path / "node.toml"
    cfg.write_text(config_text(tmp_path, sink.port, listener_port=port))
    log = tmp_path / "node.log"
    proc = await _serve(cfg, port, log)
    try:
        [recorder] = _children(proc.pid)
        store = tmp_path / "spool" / "audit.sqlite"
        for i in range(50):  # stop the recorder between writing a record's lines and its sync
            await send(port, "s@insurer.test", [f"o{i}@example.com"], message(f"m{i}"))

            def stored(i: int = i) -> bool:
                with contextlib.closing(sqlite3.connect(f"file:{store}?mode=ro", uri=True)) as db:
                    return bool(db.execute("SELECT 1 FROM audit_records WHERE type = 'd' AND"
                                           " rcpt = ?", (f"o{i}@example.com",)).fetchone())

            await until(stored, what="the delivery in the audit store")
            os.kill(recorder, signal.SIGSTOP)
            if ("d", f"o{i}@example.com") not in _filed(tmp_path):
                break
            os.kill(recorder, signal.SIGCONT)
        else:
            raise AssertionError("the recorder synced each line before it could be stopped")
        sent = i + 1
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        with open(log, "ab") as out:
            proc = subprocess.Popen([sys.executable, "-m", "postlane.cli", "serve", "-c",
                                     str(cfg)], stdout=out, stderr=out)

        def listening() -> bool:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
                return True
            return False

        await until(lambda: listening() or "previous recorder" in log.read_text(), timeout=30,
                    what="the new node listening, or its recorder waiting for the old one")
        if listening():  # the new recorder runs beside the old one: let it sync the lines
            await until(lambda: ("d", f"o{i}@example.com") in _filed(tmp_path),
                        what="the new recorder's sync")
        os.kill(recorder, signal.SIGCONT)
        await until(lambda: _gone(recorder), what="the old recorder's end")
        await until(listening, timeout=30, what="the new node listening")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(recorder, signal.SIGCONT)
        proc.send_signal(signal.SIGTERM)
        await asyncio.to_thread(proc.wait, 60)
    lines = sorted((r["type"], r["rcpt"]) for r in records(tmp_path))
    assert lines == sorted((t, f"o{n}@example.com") for n in range(sent) for t in "rd")
    res = await asyncio.to_thread(cli, "verify", "-c", str(cfg))
    assert res.exit_code == 0, res.output


async def test_a_bounced_recipient_is_not_final_on_disk_before_its_dsn(tmp_path, sink,
                                                                      make_node):
    """Between a 550 and the commit of its DSN (the original read back, the report built and
    queued) a SIGKILL must not leave the recipient bounced and its message gone with no DSN
    queued: the sender would never learn. The DSN's submission is held here; what the spool
    holds meanwhile is what a SIGKILL would leave."""
    sink.rcpt_replies = {"gone@example.com": ["550 5.1.1 <gone@example.com>: user unknown"]}
    node = await make_node(config_text(tmp_path, sink.port))
    submit, held, go = node.intake.submit, asyncio.Event(), asyncio.Event()

    async def slow_dsn(*args, **kwargs):
        if kwargs.get("src_type") == "dsn":
            held.set()
            await go.wait()
        return await submit(*args, **kwargs)

    node.intake.submit = slow_dsn
    await send(node.listeners[0].port, "s@example.com", ["gone@example.com"], message("m"))
    await until(held.is_set, what="the DSN on its way")
    await node.spool.flush()
    with contextlib.closing(sqlite3.connect(tmp_path / "spool" / "spool.sqlite")) as db:
        rows = db.execute("SELECT r.state, m.mail_from FROM recipients r JOIN messages m"
                          " ON m.id = r.msg_id").fetchall()
    assert rows == [("queued", "s@example.com")]  # a restart delivers it again ("u" first)
    go.set()
    [dsn] = await sink.wait_for(1)
    assert dsn.rcpts == ["s@example.com"] and dsn.mail_from == "<>"
    await node.flush_evidence()
    with contextlib.closing(sqlite3.connect(tmp_path / "spool" / "spool.sqlite")) as db:
        assert db.execute("SELECT count(*) FROM recipients").fetchone() == (0,)
    assert sorted((r["type"], r["rcpt"]) for r in records(tmp_path)) == [
        ("b", "gone@example.com"), ("d", "s@example.com"), ("r", "gone@example.com"),
        ("r", "s@example.com")]  # the DSN's "r" is written before the bounce's "b"


async def test_a_recorder_that_keeps_dying_is_restarted_after_a_pause(tmp_path, sink, make_node,
                                                                      caplog):
    """A recorder that ends soon after each start (a full disk, say) was started again at once,
    some eight times a second; the second quick end in a row waits, and nothing is lost."""
    node = await make_node(config_text(tmp_path, sink.port))
    port = node.listeners[0].port
    for kill in range(2):
        child = node.recorder.child_pid
        os.kill(child, signal.SIGKILL)
        await until(lambda child=child: node.recorder.child_pid not in (None, child)
                    and node.recorder._ready.done(), what=f"restart {kill + 1}")
    ends = [r.getMessage() for r in caplog.records if "recorder process ended" in r.getMessage()]
    assert ends[0].endswith("starting another") and ends[1].endswith("starting another in 1s")
    await send(port, "s@insurer.test", ["u@example.com"], message("after"))
    await sink.wait_for(1)
    await node.flush_evidence()
    assert [(r["type"], r["rcpt"]) for r in records(tmp_path)] == [
        ("r", "u@example.com"), ("d", "u@example.com")]


async def test_a_dsn_the_spool_cannot_take_now_is_tried_again(tmp_path, sink, make_node):
    """The DSN's submission failed (the spool failing for a moment): the recipients were
    written final anyway and the sender never told. Now the DSN is tried again."""
    from postlane.spool import SpoolUnavailable

    sink.rcpt_replies = {"gone@example.com": ["550 5.1.1 <gone@example.com>: user unknown"]}
    node = await make_node(config_text(tmp_path, sink.port))
    submit, failed = node.intake.submit, []

    async def failing_once(*args, **kwargs):
        if kwargs.get("src_type") == "dsn" and not failed:
            failed.append(1)
            raise SpoolUnavailable("spool commit failed: disk I/O error")
        return await submit(*args, **kwargs)

    node.intake.submit = failing_once
    await send(node.listeners[0].port, "s@example.com", ["gone@example.com"], message("m"))
    [dsn] = await sink.wait_for(1, timeout=20)
    assert failed and dsn.rcpts == ["s@example.com"] and dsn.mail_from == "<>"
    await node.flush_evidence()
    assert sorted(r["type"] for r in records(tmp_path)) == ["b", "d", "r", "r"]
