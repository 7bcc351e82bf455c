"""Nothing blocks the event loop (issue 21, item 7), checked with the node's own watchdog
(``monitor/loopwatch.py``) while the work that used to block it runs.

The bound, ``BLOCKED``: 200 ms of lag that the loop thread did not spend waiting for a CPU
(the watchdog subtracts its run-queue wait, so a busy machine does not count). What these
checks guard against are blocks of another order: a hard bounce waiting up to 30 s for the
suppression list's lock, a ``proc.wait`` of up to 6 s, a walk of the whole queue. Work the
loop does do (a scrape of a 20,000-recipient queue, an SMTP transaction) takes a few ms to a
few tens of ms here even on a loaded machine, so 200 ms is far from both: it fails on a real
block and never on noise.
"""

from __future__ import annotations

import asyncio
import gc
import os
import signal
import sqlite3
import time
from pathlib import Path

import httpx
import pytest

from postlane.monitor.loopwatch import LoopWatch
from postlane.spool import Message, Recipient
from postlane.spool.sqlite import SQLiteSpool
from tests.conftest import config_text, message, send
from tests.support.waiting import until
from tests.test_cli_ops import run_cli
from tests.test_dkim import key_entry, keys, make_signer  # noqa: F401  (fixture)

BLOCKED = 0.2


async def prefill(spool_dir: Path, count: int, domains: int = 200) -> None:
    """``count`` queued marketing recipients (pool bulk paused), written into the spool."""
    spool = SQLiteSpool(spool_dir)
    await spool.open()
    now = time.time()
    body = b"From: a@insurer.test\r\nSubject: x\r\n\r\nHello\r\n"
    batch = []
    for i in range(count):
        msg = Message(id=f"pre{i:07d}", cls="marketing", pool="bulk", mail_from="n@insurer.test",
                      queued_at=now - i * 0.001, deadline=now + 86400, expire_at=now + 86400,
                      priority=3, size=len(body), correlation_id=f"corr-{i % 1000}")
        batch.append(spool.enqueue(msg, [Recipient(msg, 0, f"u{i}@d{i % domains}.example",
                                                   f"d{i % domains}.example")], body))
        if len(batch) == 2000:
            await asyncio.gather(*batch)
            batch = []
    await asyncio.gather(*batch)
    await spool.set_paused("bulk", "*", True)
    await spool.close()


def _get(port: int, token: str, path: str) -> httpx.Response:
    """A request from a thread: the client's own work stays off the node's loop."""
    return httpx.get(f"http://127.0.0.1:{port}{path}", timeout=60,
                     headers={"Authorization": f"Bearer {token}"})


async def test_the_watchdog_sees_a_block_and_not_a_sleep() -> None:
    watch = LoopWatch()
    watch.start()
    try:
        with watch.track() as stalls:
            # the scenario: an idle wait is no block. It lasts until three ticks (0.15 s at
            # least), not a fixed 0.3 s: a tick a loaded machine ran 0.25 s late left one
            await until(lambda: stalls.ticks >= 3, what="three ticks of an idle loop")
        assert stalls.ticks >= 3 and stalls.max_blocked < BLOCKED
        with watch.track() as stalls:
            time.sleep(0.4)  # the kind of call this issue removed from the loop
            await until(lambda: stalls.ticks >= 1, what="the watchdog's tick after the block")
        assert stalls.max_lag >= 0.3 and stalls.max_blocked >= 0.3
        assert watch.max_lag() >= 0.3
        assert watch.histogram.collect()[0].samples  # observed into the histogram
    finally:
        watch.stop()


async def test_a_scrape_and_lookups_do_not_stall_the_loop(tmp_path, sink, make_node):
    await prefill(tmp_path / "spool", 20_000)
    node = await make_node(config_text(tmp_path, sink.port))
    assert node.scheduler.queued() == 20_000
    # the queue stays in the spool (paged lanes), or, resumed into memory, out of the GC's walks
    assert node.scheduler.pager is not None or gc.get_freeze_count() >= 20_000
    token = (tmp_path / "api-token").read_text().strip()
    port = node.api.port
    with node.monitor.loop_watch.track() as stalls:
        for _ in range(3):
            resp = await asyncio.to_thread(_get, port, token, "/metrics")
            assert resp.status_code == 200
        for i in (0, 7_777, 19_999):
            one = await asyncio.to_thread(_get, port, token, f"/api/v1/messages/pre{i:07d}")
            assert one.json().get("queue_id") == f"pre{i:07d}", one.text
            shown = await asyncio.to_thread(_get, port, token,
                                            f"/api/v1/queue/messages/pre{i:07d}")
            assert shown.json()["recipients"][0]["address"] == f"u{i}@d{i % 200}.example"
            assert shown.json()["body_bytes"] == len(b"Hello\r\n")  # read from disk
        by_corr = await asyncio.to_thread(_get, port, token,
                                          "/api/v1/messages?correlation_id=corr-7")
        assert len(by_corr.json()["messages"]) == 20
        ticks = stalls.ticks
        await until(lambda: stalls.ticks > ticks, what="the tick after the last request")
    assert stalls.ticks >= 3
    assert stalls.max_blocked < BLOCKED, stalls
    metrics = (await asyncio.to_thread(_get, port, token, "/metrics")).text
    assert "postlane_event_loop_lag_seconds_bucket{le=" in metrics
    assert "postlane_event_loop_lag_max_seconds " in metrics


async def test_the_message_index_follows_the_queue(tmp_path, sink, make_node):
    node = await make_node(config_text(tmp_path, sink.port))
    port = node.listeners[0].port
    await node.operations.pause("bulk", who=_operator())
    await send(port, "s@insurer.test", ["a@example.com", "b@example.com"],
               message("held back", cls="marketing", extra="X-Correlation-ID: c-1\r\n"))
    [qid] = node.scheduler.with_correlation_id("c-1")
    assert [r.address for r in node.scheduler.message(qid)] == ["a@example.com",
                                                                  "b@example.com"]
    await node.operations.resume("bulk", who=_operator())
    await sink.wait_for(1)
    await node.flush_evidence()
    assert node.scheduler.message(qid) == [] and node.scheduler.with_correlation_id("c-1") == []
    assert not node.scheduler._by_msg and not node.scheduler._by_corr  # nothing left behind


def _operator():
    from tests.conftest import OPERATOR
    return OPERATOR


async def test_hard_bounces_while_an_import_holds_the_lock_do_not_stall_the_loop(
        tmp_path, sink, make_node):
    """A ``postlane suppress import`` holds the list's write lock for its whole transaction
    (seconds for a large list). The node's hard bounces wait for it in the writer thread."""
    sink.rcpt_replies["gone@example.com"] = ["550 5.1.1 <gone@example.com>: user unknown"]
    node = await make_node(config_text(tmp_path, sink.port))
    writes = node.feedback.writes
    db = tmp_path / "spool" / "suppression.sqlite3"
    importer = sqlite3.connect(db, isolation_level=None)
    importer.execute("BEGIN IMMEDIATE")  # what the import's transaction holds
    try:
        with node.monitor.loop_watch.track() as stalls:
            await send(node.listeners[0].port, "s@insurer.test", ["gone@example.com"],
                       message("news", cls="marketing"))
            await until(lambda: writes.waiting >= 1.0,  # in the writer thread, waiting
                        what="the bounce's write waiting for the lock")
            # the node serves on meanwhile: it takes and delivers mail
            assert await send(node.listeners[0].port, "s@insurer.test", ["ok@example.com"],
                              message("more", cls="marketing")) == {}
            await sink.wait_for(1)
    finally:
        importer.execute("COMMIT")
        importer.close()
    await node.feedback.flush()
    assert stalls.max_blocked < BLOCKED, stalls
    hit = node.feedback.suppression.check(["gone@example.com"])["gone@example.com"]
    assert hit.scope == "best-effort" and hit.source == "bounce"  # waited, not dropped


async def test_a_large_cli_import_beside_hard_bounces(tmp_path, sink, make_node):
    gone = [f"gone{i}@example.com" for i in range(20)]
    for address in gone:
        sink.rcpt_replies[address] = ["550 5.1.1 user unknown"]
    node = await make_node(config_text(tmp_path, sink.port))
    rows = tmp_path / "list.csv"
    rows.write_text("".join(f"imported{i}@example.net,marketing\n" for i in range(200_000)))
    db = tmp_path / "spool" / "suppression.sqlite3"
    with node.monitor.loop_watch.track() as stalls:
        cli = asyncio.ensure_future(run_cli("suppress", "import", "--db", str(db), str(rows)))
        for address in gone:
            await send(node.listeners[0].port, "s@insurer.test", [address],
                       message("news", cls="marketing"))
        code, out, err = await cli
        await node.flush_evidence()
    assert code == 0 and "imported 200000 entries" in out, err
    assert stalls.max_blocked < BLOCKED, stalls
    hits = node.feedback.suppression.check([*gone, "imported199999@example.net"])
    assert set(hits) == {*gone, "imported199999@example.net"}


async def test_stopping_a_stuck_signing_process_does_not_stall_the_loop(tmp_path, keys):  # noqa: F811
    signer, _ = make_signer(tmp_path, "[dkim]\n" + key_entry(tmp_path, keys, "insurer.test", "r1"))
    await signer.start()
    procs = [p._proc for group in signer._processes.values() for p in group]
    for proc in procs:
        os.kill(proc.pid, signal.SIGSTOP)  # it would not exit on SIGTERM until continued
    watch = LoopWatch()
    watch.start()
    loop = asyncio.get_running_loop()
    for proc in procs:
        loop.call_later(0.5, os.kill, proc.pid, signal.SIGCONT)  # runs only if the loop does
    try:
        with watch.track() as stalls:
            await signer.stop()
            ticks = stalls.ticks
            await until(lambda: stalls.ticks > ticks, what="the tick after the stop")
    finally:
        watch.stop()
    assert all(proc.poll() is not None for proc in procs)
    assert stalls.max_blocked < BLOCKED, stalls


async def test_a_node_that_cannot_listen_closes_what_it_opened(tmp_path, sink, keys):  # noqa: F811
    """Node.start with a listener port in use: a clean OSError naming the listener, and the
    spool, audit writer, recorder, signers, monitor, API and the list's writer closed again."""
    import socket
    import threading

    from postlane.node import Node
    from postlane.startup import parse_config

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    before = set(threading.enumerate())
    node = Node(parse_config(config_text(
        tmp_path, sink.port, "[dkim]\n" + key_entry(tmp_path, keys, "insurer.test", "r1"),
        listener_port=port)))
    try:
        try:
            await node.start()
        except OSError as exc:
            error = exc
        else:
            raise AssertionError("started on a port in use")
    finally:
        taken.close()
    assert f"listener 'in' (listeners.in in the config) cannot listen on 127.0.0.1:{port}" \
        in str(error)
    children = [node.recorder._proc] + [p._proc for group in node.signer._processes.values()
                                        for p in group]
    assert all(proc is not None and proc.poll() is not None for proc in children)
    assert node.spool._thread is None and node.spool._reader is None  # closed
    assert not node.feedback.writes._thread.is_alive()
    assert node.monitor.loop_watch._handle is None and node.monitor._task.done()
    with pytest.raises(OSError):  # the API's port is closed again
        socket.create_connection(("127.0.0.1", node.api.port), timeout=1).close()
    left = [t for t in set(threading.enumerate()) - before if t.is_alive()
            and not t.name.startswith(("asyncio_", "ThreadPoolExecutor"))]
    assert not left, left
    tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    assert not [t for t in tasks if not t.done()], tasks


async def test_an_api_import_waits_for_the_lock_and_imports_every_row(tmp_path, sink, make_node):
    """The import's rows are parsed once, then written when the lock is free: a write the
    writer tries again must not find its input consumed."""
    node = await make_node(config_text(tmp_path, sink.port))
    token = (tmp_path / "api-token").read_text().strip()
    db = tmp_path / "spool" / "suppression.sqlite3"
    importer = sqlite3.connect(db, isolation_level=None)
    importer.execute("BEGIN IMMEDIATE")
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{node.api.port}",
                                 headers={"Authorization": f"Bearer {token}"}) as client:
        posted = asyncio.ensure_future(client.post(
            "/api/v1/suppressions/import", content="a@example.com\nb@example.com,all\n",
            timeout=60))
        await until(lambda: node.feedback.writes.waiting >= 5.5,
                    what="the write waiting past one round of the writer's patience")
        importer.execute("COMMIT")
        importer.close()
        resp = await posted
    assert resp.status_code == 200 and resp.json() == {"imported": 2}
    assert set(node.feedback.suppression.check(["a@example.com", "b@example.com"])) == {
        "a@example.com", "b@example.com"}
