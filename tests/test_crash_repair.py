"""Crashes the attempt journal and the killtest do not cover: a node SIGKILLed, then its files
torn as by a power loss, started again with ``postlane serve``; what it repairs and says."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import httpx

from postlane.accounting.operators import action_record
from postlane.accounting.records import Record, pack
from postlane.audit.sqlite import SQLiteAuditStore
from postlane.feedback.dsn import FailedRecipient, build_bounce
from postlane.feedback.keys import load_or_create_key
from postlane.feedback.suppression import SuppressionList, adding
from postlane.feedback.unsubscribe import UnsubscribeSigner
from postlane.harness.sink import Sink
from postlane.reputation.store import ReputationStore
from postlane.spool.hold import locked
from tests.conftest import OPERATOR, config_text, message, records, send
from tests.support.waiting import until
from tests.test_evidence import _free_port, _free_ports, _serve, cli
from tests.test_feedback_node import FEEDBACK, _arf


def _events(tmp_path: Path) -> int:
    db = sqlite3.connect(tmp_path / "spool" / "spool.sqlite")
    try:
        return db.execute("SELECT count(*) FROM events").fetchone()[0]
    finally:
        db.close()


async def test_a_torn_accounting_line_is_cut_and_its_record_written_again(tmp_path):
    """The node is SIGKILLed with every record synced (the spool has let the events go); the
    last bytes of both accounting files are then lost. The restart cuts the torn line, says
    so, and writes the lost record again from the audit store: every record once, no torn
    line."""
    sink = await Sink().start()
    port = _free_port()
    cfg = tmp_path / "node.toml"
    cfg.write_text(config_text(tmp_path, sink.port, listener_port=port))
    log = tmp_path / "node.log"
    proc = await _serve(cfg, port, log)
    try:
        for i in range(3):
            await send(port, "s@insurer.test", [f"t{i}@example.com"], message(f"m{i}"))
        await sink.wait_for(3)
        await until(lambda: _events(tmp_path) == 0, what="the events consumed and trimmed")
        position = json.loads((tmp_path / "acct" / "acct.position.json").read_text())
        assert position["feed"] and all(n == 6 for n in position["feed"].values())
        proc.send_signal(signal.SIGKILL)
        await asyncio.to_thread(proc.wait)
        # its recorder sees the node gone, writes its position and ends (its lock goes)
        await until(lambda: not locked(tmp_path / "acct"), what="the recorder ended")
        for name, _ in position["files"].values():  # a power loss takes the synced tail
            os.truncate(name, os.path.getsize(name) - 7)
        proc = await _serve(cfg, port, log)
        await until(lambda: "written again from the audit store" in log.read_text(),
                    what="the lost record written again")
    finally:
        proc.send_signal(signal.SIGTERM)
        await asyncio.to_thread(proc.wait, 60)
        await sink.stop()
    text = log.read_text()
    assert "accounting files shorter than at their last sync" in text
    rows = records(tmp_path)
    assert sorted((r["type"], r["rcpt"]) for r in rows) == sorted(
        (t, f"t{i}@example.com") for i in range(3) for t in "rd")
    assert all(r["queueId"] and r["timeLogged"] for r in rows)
    for path in (tmp_path / "acct").glob("acct-*.jsonl"):
        for line in path.read_text().splitlines():
            json.loads(line)
    res = await asyncio.to_thread(cli, "verify", "-c", str(cfg))
    assert res.exit_code == 0, res.output


def _spool_state(tmp_path: Path) -> list[str]:
    db = sqlite3.connect(tmp_path / "spool" / "spool.sqlite")
    try:
        return [s for (s,) in db.execute("SELECT state FROM recipients ORDER BY msg_id, idx")]
    finally:
        db.close()


class _APINode:
    """A ``postlane serve`` process with its API on a known port, a client for it, and a
    second connection to its spool (to hold the write lock); SIGKILLed and started again."""

    def __init__(self, tmp_path: Path, extra: str = "", pool_extra: str = "") -> None:
        self.tmp_path = tmp_path
        self.extra, self.pool_extra = extra, pool_extra
        """TOML appended to the config, and to its pool ``bulk``."""
        self.port, self.api = _free_ports(2)
        self.cfg, self.log = tmp_path / "node.toml", tmp_path / "node.log"

    async def __aenter__(self) -> _APINode:
        self.sink = await Sink().start()
        self.cfg.write_text(config_text(self.tmp_path, self.sink.port, self.extra,
                                        listener_port=self.port).replace(
            "[api]\nport = 0", f"[api]\nport = {self.api}").replace(
            "[pools.bulk]\n", f"[pools.bulk]\n{self.pool_extra}"))
        self.proc = await _serve(self.cfg, self.port, self.log)
        token = (self.tmp_path / "api-token").read_text().strip()
        self.client = httpx.AsyncClient(base_url=f"http://127.0.0.1:{self.api}/api/v1",
                                        headers={"Authorization": f"Bearer {token}"},
                                        timeout=None)
        self.lock = sqlite3.connect(self.tmp_path / "spool" / "spool.sqlite",
                                    isolation_level=None)
        """Held (``BEGIN IMMEDIATE``): the spool cannot commit."""
        self.list_lock = sqlite3.connect(self.tmp_path / "spool" / "suppression.sqlite3",
                                         isolation_level=None)
        """Held: the suppression list cannot commit (as while a CLI import runs)."""
        return self

    async def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        await asyncio.to_thread(self.proc.wait)

    async def restart(self) -> None:
        """Start again once the killed node's recorder has ended (its lock gone)."""
        await until(lambda: not locked(self.tmp_path / "acct"), what="the recorder ended")
        self.proc = await _serve(self.cfg, self.port, self.log)

    async def __aexit__(self, *exc: object) -> None:
        self.lock.close()
        self.list_lock.close()
        await self.client.aclose()
        self.proc.send_signal(signal.SIGTERM)
        await asyncio.to_thread(self.proc.wait, 60)
        await self.sink.stop()


async def test_an_answered_hold_survives_a_sigkill(tmp_path):
    """An operator's hold is answered only once it is durable: while the spool cannot commit
    (another process holds its write lock) the API does not say "held"; a node SIGKILLed then
    has not held the message and has no record of it (not done at all); once answered, a
    SIGKILL right after leaves it held, with its record (done, with its audit record)."""
    async with _APINode(tmp_path) as node:
        client, lock = node.client, node.lock
        assert (await client.post("/pools/bulk/pause", json={})).status_code == 200
        await send(node.port, "s@insurer.test", ["held@example.com"], message("m"))
        held = lambda: client.get("/queue/messages", params={"state": "held"})  # noqa: E731

        async def in_memory() -> bool:
            return (await held()).json()["total_recipients"] == 1

        # the writer idle first: the recorder's trim of the message's records, if still to
        # come when the lock is taken, waits for it, and the hold's read of the spool (which
        # commits what is pending first) with it (seen on a loaded machine: held 20 s later)
        await until(lambda: _events(tmp_path) == 0, what="the spool's events trimmed")
        lock.execute("BEGIN IMMEDIATE")  # the node's spool writer cannot commit now
        post = asyncio.ensure_future(client.post("/queue/hold", json={"all": True}))
        await until(in_memory, what="the hold applied in the node's memory")
        try:
            answer = await asyncio.wait_for(asyncio.shield(post), 5)
        except TimeoutError:
            answer = None
        if answer is not None:  # said "held" while nothing could be committed
            await node.kill()
            lock.execute("ROLLBACK")
            assert _spool_state(tmp_path) == ["held"], f"answered {answer.json()}, not held"
        await node.kill()  # not answered: not done
        post.cancel()
        lock.execute("ROLLBACK")
        assert _spool_state(tmp_path) == ["queued"]
        await node.restart()
        assert not (await held()).json()["total_recipients"]
        answer = await client.post("/queue/hold", json={"all": True})
        assert answer.json()["recipients"] == 1
        await node.kill()  # at once after the answer
        assert _spool_state(tmp_path) == ["held"]
        await node.restart()
        await until(in_memory, what="the message held after the restart")
    ops = [r for r in records(tmp_path) if r["type"] == "o"]
    assert [r["dsnAction"] for r in ops if r["rcpt"] == "held@example.com"] == ["hold"]


def _events(tmp_path: Path) -> int:
    """Events in the spool's outbox not yet trimmed (the recorder has not filed them, or the
    node has not yet committed the trim)."""
    db = sqlite3.connect(tmp_path / "spool" / "spool.sqlite")
    try:
        return db.execute("SELECT count(*) FROM events").fetchone()[0]
    finally:
        db.close()


def _open(tmp_path: Path) -> list[tuple[str, str, str]]:
    """(queue id, address, state) of every recipient row the spool has on disk."""
    db = sqlite3.connect(tmp_path / "spool" / "spool.sqlite")
    try:
        return list(db.execute("SELECT msg_id, address, state FROM recipients"
                               " ORDER BY msg_id, idx"))
    finally:
        db.close()


async def _deleted_with_a_dsn(tmp_path: Path, locked_spool: bool) -> None:
    """A message of the paused pool deleted with a DSN over the API (with the spool's write
    lock held by another process while the answer is awaited if ``locked_spool``), the node
    SIGKILLed at once after the answer and started again, the pool resumed, the node
    stopped: the deleted recipient is never delivered, it has one "b" record (purged), and
    its sender has one DSN."""
    async with _APINode(tmp_path) as node:
        client, lock = node.client, node.lock
        assert (await client.post("/pools/bulk/pause", json={})).status_code == 200
        await send(node.port, "notices@example.com", ["gone@example.com"], message("m"))
        [msg] = (await client.get("/queue/messages")).json()["messages"]
        qid = msg["queue_id"]
        if locked_spool:  # the DSN cannot be committed: no "deleted" that is not so
            lock.execute("BEGIN IMMEDIATE")
        answer = await client.post("/queue/delete", json={"queue_ids": [qid], "dsn": True})
        if locked_spool:
            assert answer.status_code == 503, answer.text
            assert "the DSN is not yet queued" in answer.json()["error"], answer.text
            lock.execute("ROLLBACK")  # the node queues the DSN, then writes the final state
            await until(lambda: [a for q, a, s in _open(tmp_path) if q != qid] == [
                "notices@example.com"] and all(s == "bounced" for q, _, s in _open(tmp_path)
                                               if q == qid), what="the DSN queued, then final")
        else:
            assert answer.status_code == 200, answer.text
            assert answer.json()["recipients"] == 1
        await node.kill()  # at once after the answer
        rows = _open(tmp_path)
        assert [(a, s) for q, a, s in rows if q != qid] == [("notices@example.com", "queued")], \
            f"answered {answer.text}; on disk: {rows}"
        assert all(s == "bounced" for q, _, s in rows if q == qid), rows
        await node.restart()
        assert (await client.post("/pools/bulk/resume", json={})).status_code == 200
        await node.sink.wait_for(1)
    arrivals = node.sink.arrivals
    assert [a.rcpts for a in arrivals] == [["notices@example.com"]]
    assert b"deleted by operator" in arrivals[0].data
    rows = records(tmp_path)
    gone = [(r["type"], r["bounceCat"]) for r in rows if r["rcpt"] == "gone@example.com"]
    assert gone == [("r", ""), ("b", "purged")], gone
    assert [r["type"] for r in rows if r["rcpt"] == "notices@example.com"] == ["r", "d"]


async def test_an_answered_delete_with_a_dsn_survives_a_sigkill(tmp_path):
    """``queue delete --dsn`` is answered once the DSN is queued and the recipients' final
    states are written after it (the order that never leaves a sender untold): a node
    SIGKILLed right after the answer has deleted the message, with its "b" record, and sends
    the DSN after its restart. The final states used to wait for the DSN in a task of their
    own after the answer: the restarted node delivered the "deleted" message."""
    await _deleted_with_a_dsn(tmp_path, locked_spool=False)


async def test_a_delete_whose_dsn_cannot_be_queued_is_answered_503(tmp_path):
    """While the spool cannot commit (another process holds its write lock), the DSN of a
    ``delete --dsn`` cannot be queued: after ``DSN_WAIT`` the answer is 503, not "deleted"
    and not a hang; once the spool commits again the node queues the DSN and writes the
    final states, each once."""
    await _deleted_with_a_dsn(tmp_path, locked_spool=True)


def test_the_audit_store_commits_to_disk_before_the_spool_lets_the_events_go(tmp_path):
    """The node trims the spool's events once the store has committed them, so a commit must
    be on disk when it returns (``synchronous=FULL``): under NORMAL a power loss took the
    store's last commits back after their events had left the spool, and those records were
    lost from the store for good."""
    store = SQLiteAuditStore(tmp_path / "audit.sqlite")
    try:
        assert store.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert store.db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    finally:
        store.close()


def test_the_stores_that_answer_a_report_commit_to_disk_first(tmp_path):
    """A complaint or an unsubscribe is in force, and a DMARC report stored, once its sender
    has its 250: their stores commit with ``synchronous=FULL`` (they ran NORMAL, under which
    WAL gives the last commits back to a power loss: a complainer mailed again, a report the
    reporter will not resend lost)."""
    suppression = SuppressionList(tmp_path / "suppression.sqlite")
    reputation = ReputationStore(tmp_path / "reputation.sqlite")
    try:
        for conn in (suppression._wdb, reputation._conn):
            assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
            assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    finally:
        suppression.close()
        reputation.close()


def _children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (the node's recorder, started from a thread)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


async def test_verify_names_records_a_torn_store_lost_that_the_files_hold(tmp_path):
    """The node and its recorder SIGKILLed with every event consumed and trimmed, then the
    store's last commit torn off (its WAL cut short, as a power loss leaves it): verify says
    which events the store lost, that the spool has let them go and that the files hold them,
    rather than only that a recipient has no final record."""
    sink = await Sink().start()
    port = _free_port()
    cfg = tmp_path / "node.toml"
    cfg.write_text(config_text(tmp_path, sink.port, listener_port=port))
    proc = await _serve(cfg, port, tmp_path / "node.log")
    try:
        for i in range(3):
            await send(port, "s@insurer.test", [f"t{i}@example.com"], message(f"m{i}"))
        await sink.wait_for(3)
        await until(lambda: _events(tmp_path) == 0, what="the events consumed and trimmed")
        for pid in [proc.pid, *_children(proc.pid)]:  # a power loss stops every process
            os.kill(pid, signal.SIGKILL)
        await asyncio.to_thread(proc.wait)
        await until(lambda: not locked(tmp_path / "acct"), what="the recorder gone")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        await sink.stop()
    wal = tmp_path / "spool" / "audit.sqlite-wal"
    os.truncate(wal, wal.stat().st_size - 100)
    res = await asyncio.to_thread(cli, "verify", "-c", str(cfg))
    assert res.exit_code == 1, res.output
    assert "of spool writer" in res.output and "are in the accounting files but not in the" \
        " store, and the spool has let them go" in res.output, res.output
    assert "..6 of spool writer" in res.output, res.output


def _suppressed(tmp_path: Path, address: str) -> list[str]:
    """The scopes the node's suppression list has ``address`` in, as on disk."""
    db = sqlite3.connect(tmp_path / "spool" / "suppression.sqlite3")
    try:
        return [s for (s,) in db.execute("SELECT scope FROM suppression WHERE address = ?",
                                         (address,))]
    finally:
        db.close()


async def _suppression_change_killed(tmp_path: Path, change: str) -> None:
    """An operator's suppression ``change`` ("add", "remove", "import") over the API while the spool
    cannot commit (another process holds its write lock), the node SIGKILLed once the list
    has the change but before any answer, then started again and stopped: the change is
    either not made or made with its one "o" record."""
    address = "gone@example.com"
    async with _APINode(tmp_path) as node:
        client, lock = node.client, node.lock
        if change == "remove":
            added = await client.post("/suppressions", json={"address": address,
                                                             "scope": "all"})
            assert added.status_code == 201, added.text
        lock.execute("BEGIN IMMEDIATE")  # the record cannot be committed now
        post = asyncio.ensure_future(
            client.post("/suppressions", json={"address": address, "scope": "all"})
            if change == "add" else client.delete(f"/suppressions/{address}")
            if change == "remove" else client.post(
                "/suppressions/import", params={"scope": "all"},
                content=f"address\n{address}\nother@example.com\n".encode()))
        await until(lambda: bool(_suppressed(tmp_path, address)) == (change != "remove"),
                    what="the list changed")
        await node.kill()  # no answer yet
        post.cancel()
        lock.execute("ROLLBACK")
        await node.restart()
    actions = [r["dsnAction"] for r in records(tmp_path)
               if r["type"] == "o" and r["rcpt"] in (address, "")]
    expected = {"add": ["suppress"], "remove": ["suppress", "unsuppress"],
                "import": ["suppress-import"]}[change]
    assert actions == expected, (actions, _suppressed(tmp_path, address))
    assert bool(_suppressed(tmp_path, address)) == (change != "remove")


async def test_a_suppression_killed_before_its_record_is_recorded_at_the_restart(tmp_path):
    """The list and the spool are two stores: the list's change used to be committed first
    and its record after, so a node SIGKILLed between the two kept the change without its
    record (an operator's action off the record). The record now waits in the list's own
    transaction and the restart writes it."""
    await _suppression_change_killed(tmp_path, "add")


async def test_an_unsuppress_killed_before_its_record_is_recorded_at_the_restart(tmp_path):
    """The worst case of the above: the operator, unanswered, removes the address again,
    gets 404 "not suppressed", and the removal was never on the record."""
    await _suppression_change_killed(tmp_path, "remove")


async def test_an_import_killed_before_its_record_is_recorded_at_the_restart(tmp_path):
    await _suppression_change_killed(tmp_path, "import")


def _bounce_evidence(tmp_path: Path, address: str) -> int:
    """The hard bounces of ``address`` the suppression list counts, as on disk."""
    db = sqlite3.connect(tmp_path / "spool" / "suppression.sqlite3")
    try:
        return db.execute("SELECT count(*) FROM bounces WHERE address = ?",
                          (address,)).fetchone()[0]
    finally:
        db.close()


async def test_a_bounce_sent_again_after_a_sigkill_is_counted_once(tmp_path):
    """A remote bounce (DSN at the VERP address) arrives while the spool cannot commit: the
    list's bounce evidence is written, the node is SIGKILLed before its "rb" record is
    committed and before the 250, so the reporting MTA sends the same DSN again after the
    restart. It is one bounce of one message: one "rb" record and one count of evidence
    (it used to count twice, and with ``suppress_after = 2`` one bounce stopped every class,
    regulated notices included)."""
    rcpt = "v1@example.com"
    async with _APINode(tmp_path, "[feedback.bounces]\nsuppress_after = 2\n",
                        pool_extra='bounce_domain = "bounces.mta.test"\n') as node:
        await send(node.port, "news@insurer.test", [rcpt], message("campaign"))
        [arrival] = await node.sink.wait_for(1)
        verp = arrival.mail_from
        assert verp.endswith("@bounces.mta.test"), verp
        # the sink has the message before the node commits its "d": wait for it on the record,
        # or the lock below holds the "d" back too and the restart delivers the message again
        await until(lambda: [r["type"] for r in records(tmp_path) if r["rcpt"] == rcpt]
                    == ["r", "d"], what="the delivery on the record")
        dsn = build_bounce(reporting_mta="mx.example.com", sender=verp,
                           recipients=[FailedRecipient(rcpt, "failed", "5.1.1",
                                                       "550 5.1.1 no such user",
                                                       "mx.example.com")],
                           original=arrival.data, arrival_date=time.time(), ret="HDRS")
        node.lock.execute("BEGIN IMMEDIATE")  # the "rb" record cannot be committed now
        first = asyncio.ensure_future(send(node.port, "", [verp], dsn))
        await until(lambda: _bounce_evidence(tmp_path, rcpt) == 1, what="the evidence noted")
        await node.kill()  # before the 250
        node.lock.execute("ROLLBACK")
        with contextlib.suppress(Exception):
            await first
        await node.restart()
        assert await send(node.port, "", [verp], dsn) == {}  # the reporting MTA's retry
    assert [r["type"] for r in records(tmp_path) if r["rcpt"] == rcpt] == ["r", "d", "rb"]
    assert _bounce_evidence(tmp_path, rcpt) == 1
    assert _suppressed(tmp_path, rcpt) == ["best-effort"]


async def test_an_answered_one_click_unsubscribe_survives_a_sigkill(tmp_path):
    """RFC 8058 one-click: the mailbox provider POSTs once and does not come back after a
    200. The answer used to go out before the entry and its "f" record were written (the
    entry handed to the list's writer thread, the record to the spool's next commit): a node
    SIGKILLed right after it could have neither, and the unsubscribed customer got the next
    campaign. Now the answer waits for both; unanswered, the change is either not made or
    made with its record (written at the restart)."""
    address = "reader@example.com"
    async with _APINode(tmp_path) as node:
        key = load_or_create_key(tmp_path / "spool" / "feedback.key")
        token = UnsubscribeSigner(key, 3600).token(address)
        url = f"http://127.0.0.1:{node.api}/unsubscribe/{token}"
        async with httpx.AsyncClient(timeout=None) as anon:
            node.lock.execute("BEGIN IMMEDIATE")  # the spool cannot commit now
            post = asyncio.ensure_future(anon.post(url))
            try:
                answer = await asyncio.wait_for(asyncio.shield(post), 3)
            except TimeoutError:
                answer = None
            await node.kill()  # at once after the answer, or without one
            post.cancel()
            node.lock.execute("ROLLBACK")
        assert answer is None or answer.status_code == 200, answer.text
        await node.restart()
        later = UnsubscribeSigner(key, 3600).token("later@example.com")
        async with httpx.AsyncClient(timeout=None) as anon:  # answered, then killed at once
            answered = await anon.post(f"http://127.0.0.1:{node.api}/unsubscribe/{later}")
        assert answered.status_code == 200, answered.text
        await node.kill()
        await node.restart()
    rows = records(tmp_path)
    unsubscribed = [r["dsnAction"] for r in rows if r["type"] == "f" and r["rcpt"] == address]
    suppressed = _suppressed(tmp_path, address)
    if answer is not None or suppressed:  # done: the entry and its one record
        assert (suppressed, unsubscribed) == (["marketing"], ["unsubscribe"])
    else:  # not done at all
        assert unsubscribed == []
    assert _suppressed(tmp_path, "later@example.com") == ["marketing"]
    assert [r["dsnAction"] for r in rows
            if r["type"] == "f" and r["rcpt"] == "later@example.com"] == ["unsubscribe"]


async def test_a_complaint_while_the_node_dies_mid_delivery_is_on_the_record_once(tmp_path):
    """An FBL complaint arrives by SMTP while the spool cannot commit (the delivery of the
    complained-of message, a second before, is not committed either); the node is SIGKILLed
    before the 250, and the ISP sends the report again after the restart. The complaint is
    in force, its "f" record is there once, the recipient is not mailed again (an "s" after
    the "u" of the attempt whose outcome the node never recorded), and the evidence is
    complete: ``audit verify`` used to call such a recipient INCOMPLETE, and ``audit show``
    now says that the earlier attempt may have delivered it."""
    rcpt = "c@example.com"
    async with _APINode(tmp_path, FEEDBACK,
                        pool_extra='bounce_domain = "bounces.mta.test"\n') as node:
        node.sink.delay = 1.0  # the DATA of the delivery takes a second
        await send(node.port, "news@insurer.test", [rcpt], message("offer"))
        await until(lambda: node.sink.rcpt_attempts[rcpt] == 1, what="the delivery started")
        node.lock.execute("BEGIN IMMEDIATE")  # its outcome cannot be committed now
        [arrival] = await node.sink.wait_for(1)
        node.sink.delay = 0.0
        arf = _arf(arrival.mail_from, "<offer@insurer.test>")
        first = asyncio.ensure_future(send(node.port, "", ["fbl@mta.test"], arf))
        await until(lambda: bool(_suppressed(tmp_path, rcpt)), what="the complaint in force")
        await node.kill()  # before the 250
        node.lock.execute("ROLLBACK")
        with contextlib.suppress(Exception):
            await first
        await node.restart()
        assert await send(node.port, "", ["fbl@mta.test"], arf) == {}  # the ISP's retry
        await until(lambda: "s" in {r["type"] for r in records(tmp_path)},
                    what="the recipient stopped")
    assert len(node.sink.arrivals) == 1
    trail = [r["type"] for r in records(tmp_path) if r["rcpt"] == rcpt]
    assert trail[:2] == ["r", "u"] and sorted(trail[2:]) == ["f", "s"], trail
    assert _suppressed(tmp_path, rcpt) == ["marketing"]
    res = await asyncio.to_thread(cli, "verify", "-c", str(node.cfg), "--files")
    assert res.exit_code == 0, res.output
    res = await asyncio.to_thread(cli, "show", "-c", str(node.cfg), "--recipient", rcpt)
    assert "not sent again (an earlier attempt's outcome is unknown: it may have been" \
           " delivered)" in res.output, res.output


def _paused(tmp_path: Path) -> list[tuple[str, str]]:
    db = sqlite3.connect(tmp_path / "spool" / "spool.sqlite")
    try:
        return list(db.execute("SELECT pool, domain FROM paused"))
    finally:
        db.close()


async def test_answered_queue_actions_survive_a_sigkill_each(tmp_path):
    """Each operator action the API answered, the node SIGKILLed at once after the answer:
    a pause; a hold by filter and a delete by id (no DSN); a release by filter; a resume.
    After each restart the action is done, with its records once; at the end the deleted
    message was never delivered, the others once, and ``audit verify --files`` is clean."""
    async with _APINode(tmp_path) as node:
        client = node.client
        assert (await client.post("/pools/bulk/pause", json={})).status_code == 200
        await node.kill()
        assert _paused(tmp_path) == [("bulk", "*")]
        await node.restart()
        for i in range(3):
            await send(node.port, "s@insurer.test", [f"m{i}@example.com"], message(f"m{i}"))
        by_rcpt = {m["recipients"][0]["address"]: m["queue_id"]
                   for m in (await client.get("/queue/messages")).json()["messages"]}
        answer = await client.post("/queue/hold", json={"recipient": "m1@*"})
        assert answer.json()["recipients"] == 1, answer.text
        answer = await client.post("/queue/delete", json={"queue_ids": [by_rcpt["m0@example.com"]]})
        assert answer.json()["recipients"] == 1, answer.text
        await node.kill()
        assert [(a, s) for _, a, s in _open(tmp_path)] == [
            ("m1@example.com", "held"), ("m2@example.com", "queued")]
        await node.restart()
        answer = await client.post("/queue/release", json={"recipient": "m1@*"})
        assert answer.json()["recipients"] == 1, answer.text
        await node.kill()
        assert [s for _, _, s in _open(tmp_path)] == ["queued", "queued"]
        await node.restart()
        assert (await client.post("/pools/bulk/resume", json={})).status_code == 200
        await node.kill()
        assert _paused(tmp_path) == []
        await node.restart()
        await node.sink.wait_for(2)
        await until(lambda: not _open(tmp_path), what="both delivered")
    assert sorted(a.rcpts[0] for a in node.sink.arrivals) == ["m1@example.com", "m2@example.com"]
    rows = records(tmp_path)
    assert [(r["dsnAction"], r["rcpt"]) for r in rows if r["type"] == "o"] == [
        ("pause", ""), ("hold", "m1@example.com"), ("release", "m1@example.com"),
        ("resume", "")]
    assert [(r["type"], r["bounceCat"]) for r in rows if r["rcpt"] == "m0@example.com"] == [
        ("r", ""), ("b", "purged")]
    res = await asyncio.to_thread(cli, "verify", "-c", str(node.cfg), "--files")
    assert res.exit_code == 0, res.output


async def test_a_record_the_spool_committed_is_not_written_again_at_the_start(
        tmp_path, sink, make_node):
    """The window the list's waiting records leave: a node killed after its spool committed
    an operator's record and before the list let its copy go. The start looks for each
    waiting record in the spool's outbox, then in the audit store (the outbox lets an event go
    only once the store holds it), and writes only the one never committed."""
    node = await make_node(config_text(tmp_path, sink.port))
    store, writes = node.feedback.suppression, node.feedback.writes

    async def waiting(address: str) -> Record:
        rec = action_record("suppress", OPERATOR, target=address)
        entry = SuppressionList.entry(address, "all")
        await writes.call(store.recorded, adding([entry]), lambda n: pack(rec))
        return rec

    node.persist(await waiting("trimmed@example.com"))  # committed, then let go by the spool
    await node.spool.flush()
    await until(lambda: _events(tmp_path) == 0, what="the record in the store only")
    node.persist(await waiting("outbox@example.com"))  # committed, maybe still in the outbox
    await node.spool.flush()
    await waiting("lost@example.com")  # never committed
    assert await node.operations.record_pending() == 1
    assert not store.pending()
    await node.stop()
    assert sorted(r["rcpt"] for r in records(tmp_path) if r["type"] == "o") == [
        "lost@example.com", "outbox@example.com", "trimmed@example.com"]


async def test_a_suppress_command_killed_before_its_record_is_recorded_at_the_node_start(
        tmp_path):
    """``postlane suppress add -c CFG`` changes the list's file and posts its record to the
    spool's outbox as it ends. SIGKILLed in between (here: the post waits for the spool's
    write lock another process holds), it left the address suppressed and no record of who
    did it. The record now waits in the list: the node's next start writes it, once."""
    async with _APINode(tmp_path) as node:
        await node.kill()  # the node is down; its spool is locked by someone else
        node.lock.execute("BEGIN IMMEDIATE")
        command = subprocess.Popen(
            [sys.executable, "-m", "postlane.cli", "suppress", "add", "court@example.com",
             "--scope", "all", "--reason", "court order", "-c", str(node.cfg)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            await until(lambda: _suppressed(tmp_path, "court@example.com") == ["all"],
                        what="the list changed")
        finally:
            command.kill()
            command.wait()
        node.lock.execute("ROLLBACK")
        await node.restart()
    rows = [r for r in records(tmp_path) if r["rcpt"] == "court@example.com"]
    assert [(r["type"], r["dsnAction"], r["srcType"]) for r in rows] == [
        ("o", "suppress", "cli")], rows
    assert rows[0]["dsnDiag"].endswith("(scope all): court order"), rows[0]["dsnDiag"]


async def test_an_unsubscribe_by_mail_is_in_force_before_its_250(tmp_path):
    """The List-Unsubscribe mailto: a mail to ``unsubscribe_mailto`` with the signed token in
    its subject. Its 250 used to go out once the "f" record was committed but before the
    entry was written (the list's writer was not waited for on that path): while the list
    cannot commit (another process holds its write lock) the sender got its 250, and a node
    SIGKILLed then had a record of an unsubscribe that was not in force. The 250 now waits
    for the entry; unanswered, the sender sends again."""
    address = "reader@example.com"
    extra = ('[feedback]\nunsubscribe_url = "https://mta.test/unsubscribe"\n'
             'unsubscribe_mailto = "unsubscribe@mta.test"\n')
    async with _APINode(tmp_path, extra) as node:
        key = load_or_create_key(tmp_path / "spool" / "feedback.key")
        token = UnsubscribeSigner(key, 3600).token(address)
        mail = f"From: {address}\r\nSubject: unsubscribe {token}\r\n\r\n".encode()
        node.list_lock.execute("BEGIN IMMEDIATE")  # the list cannot commit now
        first = asyncio.ensure_future(send(node.port, address, ["unsubscribe@mta.test"], mail))
        try:
            answered = await asyncio.wait_for(asyncio.shield(first), 3) == {}
        except TimeoutError:
            answered = False
        await node.kill()
        node.list_lock.execute("ROLLBACK")
        with contextlib.suppress(Exception):
            await first
        if answered:  # told 250: the unsubscribe must be in force
            assert _suppressed(tmp_path, address) == ["marketing"], "250 without the entry"
        await node.restart()
        assert await send(node.port, address, ["unsubscribe@mta.test"], mail) == {}
    assert _suppressed(tmp_path, address) == ["marketing"]


async def test_a_complaint_resent_after_a_sigkill_is_recorded_once(tmp_path):
    """An FBL complaint arrives while the suppression list cannot commit (a CLI import holds
    its write lock): no 250 until the entry is written. Its "f" record used to be handed to
    the spool first, and committed with the spool's next write; the node SIGKILLed, the ISP
    sends the report again and the complaint was on the record twice (and counted twice in
    the complaint rate). The record now follows the entry."""
    rcpt = "c@example.com"
    async with _APINode(tmp_path, FEEDBACK,
                        pool_extra='bounce_domain = "bounces.mta.test"\n') as node:
        await send(node.port, "news@insurer.test", [rcpt], message("offer"))
        [arrival] = await node.sink.wait_for(1)
        await until(lambda: "d" in {r["type"] for r in records(tmp_path)}, what="delivered")
        arf = _arf(arrival.mail_from, "<offer@insurer.test>")
        node.list_lock.execute("BEGIN IMMEDIATE")  # the list cannot commit now
        first = asyncio.ensure_future(send(node.port, "", ["fbl@mta.test"], arf))
        await until(lambda: "suppression list locked by another process"
                    in node.log.read_text(), what="the complaint's entry waiting")
        # the spool commits whatever it was handed meanwhile (other mail goes on)
        await send(node.port, "news@insurer.test", ["other@example.com"], message("x"))
        assert not first.done()
        await node.kill()
        node.list_lock.execute("ROLLBACK")
        with contextlib.suppress(Exception):
            await first
        await node.restart()
        assert await send(node.port, "", ["fbl@mta.test"], arf) == {}  # the ISP's retry
    assert [r["type"] for r in records(tmp_path) if r["rcpt"] == rcpt] == ["r", "d", "f"]
    assert _suppressed(tmp_path, rcpt) == ["marketing"]
