"""Kill points the killtest and ``test_crash_repair.py`` do not reach: a node SIGKILLed in the
middle of an operator's action on many messages (the moment its first change is on disk), and
what it has done and recorded after its restart."""

from __future__ import annotations

import asyncio
import contextlib
import email
import os
import signal
import smtplib
import sqlite3
import threading
import time
from collections import Counter
from pathlib import Path

import httpx

from tests.conftest import OPERATOR, config_text, message, records, send
from tests.support.waiting import until
from tests.test_crash_repair import _APINode
from tests.test_evidence import cli
from tests.test_feedback_node import FEEDBACK, _arf

MESSAGES, PER_MESSAGE = 3, 1000
"""3,000 recipients: more than one commit of the spool's writer takes (``BATCH_MAX``)."""


def _queued(tmp_path: Path) -> int:
    db = sqlite3.connect(tmp_path / "spool" / "spool.sqlite")
    try:
        return db.execute("SELECT count(*) FROM recipients WHERE state = 'queued'").fetchone()[0]
    finally:
        db.close()


async def _killed_in_the_middle(tmp_path: Path, action: str) -> None:
    """3,000 recipients of the paused pool, ``action`` (purge of the lane, or delete of
    every message) asked over the API and the node SIGKILLed as soon as the first of its
    changes is on disk: the action is all done or not at all, never a part, and each
    recipient's record says which after the restart."""
    total = MESSAGES * PER_MESSAGE
    async with _APINode(tmp_path) as node:
        client = node.client
        assert (await client.post("/pools/bulk/pause", json={})).status_code == 200
        for i in range(MESSAGES):
            rcpts = [f"m{i}-{j}@example.com" for j in range(PER_MESSAGE)]
            assert await send(node.port, "s@insurer.test", rcpts, message(f"m{i}")) == {}
        await until(lambda: _queued(tmp_path) == total, what="all queued on disk")
        # SIGKILL as soon as the action's first commit is on disk
        watcher = _kill_when(tmp_path, node.proc.pid, f"SELECT count(*) < {total} FROM"
                             " recipients WHERE state = 'queued'")
        try:
            if action == "purge":
                answer = await client.post("/pools/bulk/lanes/example.com/purge", json={})
            else:
                answer = await client.post("/queue/delete", json={"all": True})
            assert answer.status_code == 200, answer.text  # answered before the kill
        except httpx.HTTPError:
            pass  # killed before the answer
        await asyncio.to_thread(watcher.join, 60)
        await asyncio.to_thread(node.proc.wait)
        left = _queued(tmp_path)
        assert left in (0, total), f"{action} killed half-way: {total - left} of {total} done"
        await node.restart()
        await until(lambda: sum(r["type"] in "rb" for r in records(tmp_path))
                    == total + (total - left), what="the records filed")
    rows = records(tmp_path)
    finals = Counter(r["rcpt"] for r in rows if r["type"] == "b")
    assert len(finals) == total - left and set(finals.values()) <= {1}
    res = await asyncio.to_thread(cli, "verify", "-c", str(node.cfg), "--files")
    assert res.exit_code == 0, res.output


async def test_a_lane_purge_killed_in_the_middle_is_all_or_nothing(tmp_path):
    """A purge of 3,000 recipients was one spool write per recipient, in commits of 2,000:
    a node killed between them had purged a part of the lane (with their records), the rest
    queued, while the operator had no answer either way."""
    await _killed_in_the_middle(tmp_path, "purge")


async def test_a_delete_of_many_messages_killed_in_the_middle_is_all_or_nothing(tmp_path):
    await _killed_in_the_middle(tmp_path, "delete")


def _kill_on(tmp_path: Path, pid: int, when,
             database: str = "spool.sqlite") -> threading.Thread:
    """A thread that SIGKILLs ``pid`` the moment ``when(connection)`` is true of the
    ``database`` of the spool folder on disk, read as another process would; gives up after
    60 s."""

    def watch() -> None:
        db = sqlite3.connect(tmp_path / "spool" / database, isolation_level=None)
        try:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                with contextlib.suppress(sqlite3.OperationalError):  # not made yet
                    if when(db):
                        os.kill(pid, signal.SIGKILL)
                        return
                time.sleep(0.0005)
        finally:
            db.close()

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def _kill_when(tmp_path: Path, pid: int, sql: str,
               database: str = "spool.sqlite") -> threading.Thread:
    """``_kill_on`` once ``sql`` (a count) is non-zero."""
    return _kill_on(tmp_path, pid, lambda db: db.execute(sql).fetchone()[0], database)


def _dsn_ids(arrivals: list) -> list[str]:
    """The queue id of each DSN (a report from the null sender) the sink took, once per
    arrival (a DSN delivered twice is there twice)."""
    out = []
    for a in arrivals:
        if a.mail_from in ("", "<>"):
            msg = email.message_from_bytes(a.data)
            out.append(msg["X-Postlane-Queued"].split("id=")[1])
    return out


async def test_a_node_killed_as_it_queues_a_bounce_sends_one_dsn(tmp_path):
    """The remote refuses a recipient for good (550); the node is SIGKILLed the moment the
    DSN is on disk. The recipient's final state and "b" record used to follow in a commit of
    their own: killed between, the restarted node delivered the recipient again, was refused
    again, and sent its sender a second DSN (with a "u" and a second attempt on the trail).
    Now the DSN, the final state and the "b" are one commit: one DSN, one "b"."""
    async with _APINode(tmp_path) as node:
        node.sink.rcpt_replies["gone@example.com"] = ["550 5.1.1 no such user"]
        watcher = _kill_when(tmp_path, node.proc.pid,
                             "SELECT count(*) FROM messages WHERE listener = 'dsn'")
        await send(node.port, "s@example.com", ["gone@example.com"], message("m"))
        await asyncio.to_thread(watcher.join, 60)
        await asyncio.to_thread(node.proc.wait)
        await node.restart()
        await node.sink.wait_for(1)
        await until(lambda: not _open_rows(tmp_path), what="nothing left to deliver")
        await asyncio.sleep(1.5)  # a recipient delivered again is refused within this (retry 1s)
    dsns = _dsn_ids(node.sink.arrivals)
    assert len(set(dsns)) == 1, f"{len(set(dsns))} DSNs sent: {dsns}"
    rows = records(tmp_path)
    gone = [r["type"] for r in rows if r["rcpt"] == "gone@example.com"]
    assert gone.count("b") == 1 and "u" not in gone, gone
    assert node.sink.rcpt_attempts["gone@example.com"] == 1
    res = await asyncio.to_thread(cli, "verify", "-c", str(node.cfg), "--files")
    assert res.exit_code == 0, res.output


def _open_rows(tmp_path: Path) -> list[tuple]:
    db = sqlite3.connect(tmp_path / "spool" / "spool.sqlite")
    try:
        return list(db.execute("SELECT msg_id, idx FROM recipients WHERE state NOT IN"
                               " ('delivered', 'bounced', 'expired', 'suppressed')"))
    finally:
        db.close()



async def test_every_message_the_api_answered_202_survives_a_sigkill(tmp_path):
    """Messages injected over the HTTP API from 8 clients at once; the node is SIGKILLed
    after the 30th 202 while the others are still being taken. After the restart every
    message answered 202 is delivered once, with its "r" and "d" on the record."""
    async with _APINode(tmp_path) as node:
        answered: list[str] = []
        enough = asyncio.Event()

        async def client(k: int) -> None:
            for i in range(20):
                try:
                    answer = await node.client.post("/messages", json={
                        "from": "s@insurer.test", "to": [f"api{k}-{i}@example.com"],
                        "subject": "notice", "text": "Hello.", "correlation_id": f"c{k}-{i}"})
                except httpx.HTTPError:
                    return  # the node died under it: no answer, not counted
                if answer.status_code == 202:
                    answered.append(f"c{k}-{i}")
                    if len(answered) >= 30:
                        enough.set()

        clients = [asyncio.ensure_future(client(k)) for k in range(8)]
        await asyncio.wait_for(enough.wait(), 60)
        await node.kill()
        await asyncio.gather(*clients)
        acked = set(answered)
        await node.restart()
        await until(lambda: not _open_rows(tmp_path), what="everything delivered")
    got = Counter(email.message_from_bytes(a.data)["X-Correlation-ID"]
                  for a in node.sink.arrivals)
    assert acked <= set(got), f"answered 202, never delivered: {sorted(acked - set(got))}"
    rows = records(tmp_path)
    for corr in acked:
        types = sorted(r["type"] for r in rows if r["header_X-Correlation-ID"] == corr)
        assert types[:1] == ["d"] and "r" in types, (corr, types)
    res = await asyncio.to_thread(cli, "verify", "-c", str(node.cfg), "--files")
    assert res.exit_code == 0, res.output


async def test_a_drain_cut_short_by_sigkill_loses_nothing_and_keeps_the_trail(tmp_path):
    """200 messages accepted, then SIGTERM (drain) while they are being delivered and SIGKILL
    0.05 to 0.8 s into the drain, four times: after the last restart every message is
    delivered (a second arrival only with an "outcome unknown" on its trail), every record
    once in the files, and ``audit verify --files`` passes."""
    async with _APINode(tmp_path) as node:
        taken = node.sink.handle_DATA

        async def slowly(server, session, envelope):  # deliveries still under way at the kill
            await asyncio.sleep(0.05)
            return await taken(server, session, envelope)

        node.sink.handle_DATA = slowly
        await node.client.post("/pools/bulk/pause", json={})
        for i in range(200):
            await send(node.port, "s@insurer.test", [f"d{i}@example.com"],
                       message(f"d{i}", extra=f"X-Correlation-ID: d{i}\r\n"))
        assert (await node.client.post("/pools/bulk/resume", json={})).status_code == 200
        for delay in (0.05, 0.2, 0.4, 0.8):
            await node.sink.wait_for(min(200, len(node.sink.arrivals) + 10))
            node.proc.send_signal(signal.SIGTERM)
            await asyncio.sleep(delay)
            await node.kill()
            await node.restart()
        await until(lambda: not _open_rows(tmp_path), what="everything delivered")
    got = Counter(email.message_from_bytes(a.data)["X-Correlation-ID"]
                  for a in node.sink.arrivals)
    assert set(got) == {f"d{i}" for i in range(200)}
    rows = records(tmp_path)
    for corr, n in got.items():
        types = Counter(r["type"] for r in rows if r["header_X-Correlation-ID"] == corr)
        assert types["r"] == 1 and types["d"] == 1, (corr, types)
        assert n == 1 or types["u"] >= n - 1, (corr, n, types)
    res = await asyncio.to_thread(cli, "verify", "-c", str(node.cfg), "--files")
    assert res.exit_code == 0, res.output


def _recorder_pid(node_pid: int) -> int | None:
    """The node's recorder process (``python -m postlane.audit.recorder``), if one runs."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            cmd = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if parent == node_pid and b"postlane.audit.recorder" in cmd:
            return int(entry.name)
    return None


async def test_a_stop_while_the_recorder_waits_to_restart_files_every_record(tmp_path):
    """The recorder process SIGKILLed 5 times in a row waits 4 s before its next start (the
    pause for a recorder that keeps dying); mail delivered meanwhile has its records only in
    the spool. A SIGTERM then used to wait the pause out and end the node with those records
    in neither the accounting files nor (had the store not been ahead) the audit store,
    until a next start. Now the stop cuts the pause short and starts a recorder once more to
    write them: the node stops at once with every record filed."""
    async with _APINode(tmp_path) as node:
        for _ in range(5):
            pid = await until(lambda: _recorder_pid(node.proc.pid), timeout=30,
                              what="a recorder running")
            await asyncio.sleep(0.5)  # ready, not killed as it starts
            os.kill(pid, signal.SIGKILL)
            await until(lambda p=pid: _recorder_pid(node.proc.pid) not in (p,),
                        what="the recorder gone")
        await asyncio.sleep(0.5)
        assert _recorder_pid(node.proc.pid) is None  # pausing
        for i in range(3):
            await send(node.port, "s@insurer.test", [f"late{i}@example.com"],
                       message(f"late{i}"))
        await node.sink.wait_for(3)
        await until(lambda: not _open_rows(tmp_path), what="delivered")
        started = time.monotonic()
        node.proc.send_signal(signal.SIGTERM)
        await asyncio.to_thread(node.proc.wait, 60)
        took = time.monotonic() - started
    assert took < 3, f"the stop took {took:.1f}s"
    types = sorted((r["rcpt"], r["type"]) for r in records(tmp_path)
                   if r["rcpt"].startswith("late"))
    assert types == [(f"late{i}@example.com", t) for i in range(3) for t in "dr"], types
    res = await asyncio.to_thread(cli, "verify", "-c", str(node.cfg), "--files")
    assert res.exit_code == 0, res.output


async def test_a_large_suppression_import_killed_as_it_lands_is_whole_with_its_record(tmp_path):
    """5,000 addresses imported over the API, the node SIGKILLed the moment the first of them
    is in the list on disk: the list has all of them, and after the restart the import has
    its one "o" record (the list's transaction carries it until the spool has it)."""
    rows = "address\n" + "".join(f"imp{i}@example.com\n" for i in range(5000))
    async with _APINode(tmp_path) as node:
        watcher = _kill_when(tmp_path, node.proc.pid, "SELECT count(*) FROM suppression WHERE"
                             " address LIKE 'imp%'", database="suppression.sqlite3")
        with contextlib.suppress(httpx.HTTPError):
            await node.client.post("/suppressions/import", params={"scope": "all"},
                                   content=rows.encode())
        await asyncio.to_thread(watcher.join, 60)
        await asyncio.to_thread(node.proc.wait)
        db = sqlite3.connect(tmp_path / "spool" / "suppression.sqlite3")
        try:
            (listed,) = db.execute("SELECT count(*) FROM suppression WHERE address LIKE"
                                   " 'imp%'").fetchone()
        finally:
            db.close()
        assert listed == 5000
        await node.restart()
    ops = [r["dsnAction"] for r in records(tmp_path) if r["type"] == "o"]
    assert ops == ["suppress-import"], ops
    res = await asyncio.to_thread(cli, "verify", "-c", str(node.cfg), "--files")
    assert res.exit_code == 0, res.output


async def test_a_recorder_killed_while_it_rotates_files_leaves_each_line_once(tmp_path):
    """The accounting files rotate at (almost) every sync (``rotate_size`` 1 KB) while mail
    flows, and the recorder process is SIGKILLed 5 times at random moments (rotations
    included): every record is in the files once, and ``audit verify --files`` passes."""
    import random

    rng = random.Random(5)
    async with _APINode(tmp_path, "") as node:
        node.proc.send_signal(signal.SIGTERM)
        await asyncio.to_thread(node.proc.wait, 60)
        node.cfg.write_text(node.cfg.read_text().replace(
            'formats = ["csv", "jsonl"]', 'formats = ["csv", "jsonl"]\nrotate_size = "1KB"'))
        await node.restart()
        done = asyncio.Event()

        async def sender() -> int:  # mail flows (and files rotate) all through the kills
            i = 0
            while not done.is_set():
                await send(node.port, "s@insurer.test", [f"k{i}-{j}@example.com" for j in range(5)],
                           message(f"k{i}"))
                i += 1
                await asyncio.sleep(0.05)
            return i

        sending = asyncio.ensure_future(sender())
        kills = 0
        while kills < 5:
            await asyncio.sleep(rng.uniform(0.3, 1.2))
            pid = _recorder_pid(node.proc.pid)
            if pid is not None:  # (one killed as it starts makes the next wait 5 s)
                os.kill(pid, signal.SIGKILL)
                kills += 1
        done.set()
        sent = await sending
        await until(lambda: not _open_rows(tmp_path), timeout=120, what="everything delivered")
    assert len(list((tmp_path / "acct").glob("*.csv"))) > 3  # it did rotate
    rows = records(tmp_path)
    lines = Counter(tuple(r.values()) for r in rows)
    assert [k for k, n in lines.items() if n > 1] == []
    types = Counter((r["rcpt"], r["type"]) for r in rows if r["rcpt"].startswith("k"))
    assert all(types[(f"k{i}-{j}@example.com", t)] == 1
               for i in range(sent) for j in range(5) for t in "rd")
    res = await asyncio.to_thread(cli, "verify", "-c", str(node.cfg), "--files")
    assert res.exit_code == 0, res.output


async def test_a_dsn_to_a_suppressed_sender_writes_the_final_state_with_its_drop(
        tmp_path, sink, make_node):
    """The DSN of a refused recipient goes to a sender on the suppression list: the DSN is
    dropped (an "s" record) and the refused recipient's final state and "b" are written in
    that same spool write; nothing is left open and each record is there once."""
    sink.rcpt_replies["gone@example.com"] = ["550 5.1.1 no such user"]
    node = await make_node(config_text(tmp_path, sink.port))
    await node.operations.suppress("s@example.com", "all", "test", who=OPERATOR)
    await send(node.listeners[0].port, "s@example.com", ["gone@example.com"], message("m"))

    async def filed() -> list[tuple[str, str]]:
        await node.flush_evidence()
        rows = [(r["type"], r["rcpt"]) for r in records(tmp_path) if r["type"] in "rbs"]
        return rows if ("s", "s@example.com") in rows else []

    rows = await until(filed, what="the DSN dropped")
    assert sorted(rows) == [("b", "gone@example.com"), ("r", "gone@example.com"),
                            ("s", "s@example.com")], rows
    await until(lambda: not _open_rows(tmp_path), what="nothing open")
    assert sink.arrivals == []


async def test_a_node_killed_as_it_records_a_delivery_with_notify_success_sends_its_dsn(
        tmp_path):
    """NOTIFY=SUCCESS to a receiver without DSN: this node owes the sender a "relayed" DSN
    (RFC 3461 5.2.2). The delivery's final state was committed first and the DSN queued
    after it: a node SIGKILLed between them never sent the DSN (the recipient was final, so
    nothing made it again). Now the final state waits for the DSN's commit, as a failure's
    does: the node killed the moment the delivery is final on disk has its DSN too."""
    async with _APINode(tmp_path) as node:
        def final(db: sqlite3.Connection, seen: list[bool] = []) -> bool:  # noqa: B006
            (n,) = db.execute("SELECT count(*) FROM recipients WHERE address = 'ok@example.com'"
                              " AND state = 'queued'").fetchone()
            seen.append(bool(n))
            return any(seen) and not n  # queued on disk before, not any more
        watcher = _kill_on(tmp_path, node.proc.pid, final)
        await send(node.port, "s@example.com", ["ok@example.com"], message("m"),
                   rcpt_options=["NOTIFY=SUCCESS"])
        await asyncio.to_thread(watcher.join, 60)
        await asyncio.to_thread(node.proc.wait)
        await node.restart()
        await until(lambda: not _open_rows(tmp_path), what="nothing left to deliver")
        await asyncio.sleep(1.5)
    dsns = set(_dsn_ids(node.sink.arrivals))
    assert len(dsns) == 1, f"{len(dsns)} DSNs sent"
    res = await asyncio.to_thread(cli, "verify", "-c", str(node.cfg), "--files")
    assert res.exit_code == 0, res.output


async def test_a_complaint_by_message_id_sent_again_after_a_sigkill_is_one_f_record(tmp_path):
    """An FBL that strips our VERP names the message by its Message-ID only. The node is
    SIGKILLed the moment the complaint's "f" is committed (before its 250); the FBL sends the
    report again to the restarted node, whose memory of reports was gone with the process: a
    second "f", a second complaint in the rate. The message is found by its Message-ID and
    the copy under its queue id (outbox, then store): one "f"."""
    async with _APINode(tmp_path, FEEDBACK) as node:
        await send(node.port, "news@insurer.test", ["c@example.com"],
                   message("campaign", cls="marketing"))
        [arrival] = await node.sink.wait_for(1)
        arf = _arf("", email.message_from_bytes(arrival.data)["Message-ID"], ["c@example.com"])
        watcher = _kill_when(tmp_path, node.proc.pid,
                             "SELECT count(*) FROM events WHERE instr(data, 'arf;abuse') > 0")
        with contextlib.suppress(smtplib.SMTPException, OSError):
            await send(node.port, "", ["fbl@mta.test"], arf)
        await asyncio.to_thread(watcher.join, 60)
        await asyncio.to_thread(node.proc.wait)
        await node.restart()
        assert await send(node.port, "", ["fbl@mta.test"], arf) == {}
    f = [(r["rcpt"], r["dsnAction"]) for r in records(tmp_path) if r["type"] == "f"]
    assert f == [("c@example.com", "abuse")], f
