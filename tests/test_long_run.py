"""A node that runs for weeks: what it keeps per destination, per message and per connection
stays bounded (docs/performance.md, *Running for a long time*). Counts only, never durations."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import smtplib
import socket
import sqlite3
import ssl
import struct

from tests.conftest import config_text, message, send
from tests.support.waiting import until
from tests.test_security_auth import (  # noqa: F401  (fixtures)
    PASSWORD,
    _client_ctx,
    secure_config,
    tls_files,
    users_file,
)


def _everywhere(tmp_path, sink_port: int) -> str:
    """Every domain routed to the sink."""
    return config_text(tmp_path, sink_port, f'[routes]\n"*" = "127.0.0.1:{sink_port}"\n',
                       routes=False)


async def test_lanes_of_finished_destinations_are_forgotten(tmp_path, sink, make_node,
                                                           monkeypatch):
    """Each destination domain got a lane that was never dropped: 20 domains, 20 lanes for
    the life of the node, listed by every ``GET /api/v1/status`` and walked by every
    dispatch that found no free slot. A served lane stays ``LANE_KEEP`` (the dashboard lists
    it as idle), then the sweep that runs as lanes are made retires it."""
    from postlane.scheduler import scheduler as sched_mod

    node = await make_node(_everywhere(tmp_path, sink.port))
    port = node.listeners[0].port
    for i in range(20):
        await send(port, "s@insurer.test", [f"a@d{i}.example"], message(f"m{i}", cls="marketing"))
    await sink.wait_for(20)
    lanes = node.scheduler.lanes
    await until(lambda: not any(ln.workers for ln in lanes.values()), what="connections closed")
    node.scheduler._sweep_lanes()
    assert len(lanes) == 20, "served within LANE_KEEP: kept"
    monkeypatch.setattr(sched_mod, "LANE_KEEP", 0.0)
    node.scheduler._sweep_at = len(lanes)  # the next lane made sweeps
    await send(port, "s@insurer.test", ["b@new.example"], message("new", cls="marketing"))
    await sink.wait_for(21)
    assert list(lanes) == [("bulk", "new.example")], list(lanes)
    await until(lambda: not any(ln.workers for ln in lanes.values()), what="connections closed")
    node.scheduler._sweep_lanes()
    assert node.status()["lanes"] == []


async def test_lanes_with_something_to_keep_stay(tmp_path, sink, make_node, monkeypatch):
    """A paused lane (and one holding a recipient) is not retired by the sweep; a finished one
    past ``LANE_KEEP`` is."""
    from postlane.scheduler import scheduler as sched_mod
    from tests.conftest import OPERATOR

    monkeypatch.setattr(sched_mod, "LANE_KEEP", 0.0)
    node = await make_node(_everywhere(tmp_path, sink.port))
    port = node.listeners[0].port
    lanes = node.scheduler.lanes
    await node.operations.pause("bulk", "held.example", who=OPERATOR)
    await send(port, "s@insurer.test", ["a@held.example"], message("held", cls="marketing"))
    await send(port, "s@insurer.test", ["a@other.example"], message("goes", cls="marketing"))
    await sink.wait_for(1)
    await until(lambda: not lanes[("bulk", "other.example")].workers, what="its connection closed")
    node.scheduler._sweep_lanes()
    assert ("bulk", "other.example") not in lanes
    lane = lanes[("bulk", "held.example")]
    assert lane.paused and lane.depth() == 1
    assert node.scheduler._sweep_at == sched_mod.LANE_SWEEP
    await node.operations.resume("bulk", "held.example", who=OPERATOR)
    await sink.wait_for(2)
    await until(lambda: not lane.workers and not lane.depth(), what="the resumed lane served")
    node.scheduler._sweep_lanes()
    assert not lanes


def _tasks_gauge(node) -> float:
    for line in node.monitor.metrics.render().decode().splitlines():
        if line.startswith("postlane_event_loop_tasks "):
            return float(line.split()[1])
    raise AssertionError("no postlane_event_loop_tasks in /metrics")


def _client_hello() -> bytes:
    """A real TLS ClientHello (ssl's memory BIOs), to cut short."""
    inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    with contextlib.suppress(ssl.SSLWantReadError):
        ctx.wrap_bio(inc, out, server_hostname="x").do_handshake()
    return out.read()


def _broken_clients(port: int, rounds: int) -> None:
    """STARTTLS, then the connection dropped in the handshake (nothing sent, half a
    ClientHello, the whole one and a reset), and DATA cut short after a login."""
    hello = _client_hello()
    for i in range(rounds):
        sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        with sock:
            sock.recv(1024)
            sock.sendall(b"EHLO c.test\r\n")
            while not sock.recv(4096).rstrip().split(b"\r\n")[-1].startswith(b"250 "):
                pass
            sock.sendall(b"STARTTLS\r\n")
            assert sock.recv(1024).startswith(b"220")
            if i % 3 == 1:
                sock.sendall(hello[: len(hello) // 2])
            elif i % 3 == 2:
                sock.sendall(hello)
                sock.recv(100)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        client = smtplib.SMTP("127.0.0.1", port, timeout=30)
        client.ehlo("c.test")
        client.starttls(context=_client_ctx())
        client.login("alice", PASSWORD)
        client.mail("notices@insurer.test")
        client.rcpt("a@example.com")
        client.putcmd("data")
        client.getreply()
        assert client.sock is not None
        client.sock.sendall(message("cut")[:-10])
        client.close()


async def test_aborted_handshakes_and_data_leave_nothing_behind(tmp_path, sink, make_node,
                                                                 tls_files, users_file,  # noqa: F811
                                                                 caplog):
    """After N connections dropped mid-handshake or mid-DATA the node holds what it held
    before: no connection in its guard, no task, no file descriptor. Each failed handshake
    is logged with a reason (an SSLEOFError or a reset said "TLS handshake failed: ")."""
    caplog.set_level(logging.INFO, logger="postlane")
    node = await make_node(secure_config(tmp_path, sink.port, tls_files, users_file,
                                         require_auth=True, relay_from="[]"))
    listener = node.listeners[1]
    guard = listener.handler.guard
    await asyncio.to_thread(_broken_clients, listener.port, 3)  # warm: lazily opened files

    def settled() -> bool:
        return guard.connections.total == 0 and not guard._strangers

    await until(settled, what="the warm-up connections let go")
    tasks, fds = _tasks_gauge(node), len(os.listdir("/proc/self/fd"))
    await asyncio.to_thread(_broken_clients, listener.port, 30)
    await until(settled, what="the broken connections let go")
    await until(lambda: _tasks_gauge(node) <= tasks, what="the sessions' tasks done")
    assert _tasks_gauge(node) == tasks
    assert len(os.listdir("/proc/self/fd")) == fds
    assert node.intake.accepted == 0
    failed = [r.getMessage() for r in caplog.records if "TLS handshake failed" in r.getMessage()]
    assert failed and all(not m.endswith(": ") for m in failed), set(failed)  # a reason each


def test_recently_finished_are_bounded_by_recipients_too():
    """The lookups of finished messages kept 10,000 messages however many recipients each
    had: 10,000 messages of 1,000 recipients were 10 million outcomes in memory."""
    from postlane.accounting.records import Record
    from postlane.monitor.tracker import RECENT_MESSAGES, RECENT_RECIPIENTS, Tracker
    from postlane.startup import parse_config

    cfg = parse_config("""
[pools.p]
ips = [{ address = "127.0.0.20", ehlo = "a.test" }]
[classes.bulk]
pool = "p"
priority = 3
""")
    tracker = Tracker(cfg)
    per_message = 1000
    messages = RECENT_RECIPIENTS // per_message + 20
    for m in range(messages):
        for r in range(per_message):
            tracker.on_record(Record(type="d", time_logged=2.0, time_queued=1.0, orig="s@x.test",
                                     rcpt=f"r{r}@d.test", queue_id=f"q{m}", cls="bulk",
                                     vmta_pool="p", correlation_id=f"c{m}"))
    held = sum(len(entry[5]) for entry in tracker.recent.values())
    assert held == tracker.recent_recipients <= RECENT_RECIPIENTS
    assert len(tracker.recent) == RECENT_RECIPIENTS // per_message
    assert f"q{messages - 1}" in tracker.recent and "q0" not in tracker.recent
    assert tracker.finished(correlation_id="c0") == []
    assert len(tracker.finished(correlation_id=f"c{messages - 1}")[0]["recipients"]) == 1000
    # one-recipient messages: the message count is the bound, as before
    for m in range(RECENT_MESSAGES + 5):
        tracker.on_record(Record(type="d", time_logged=2.0, time_queued=1.0, orig="s@x.test",
                                 rcpt="a@d.test", queue_id=f"s{m}", cls="bulk", vmta_pool="p"))
    assert len(tracker.recent) == RECENT_MESSAGES


async def test_an_empty_lane_gives_its_slot_to_a_waiting_one(tmp_path, sink, make_node):
    """One message to three domains through a pool of one connection: the connection of the
    first domain, its lane empty, idled for ``relay.idle_timeout`` while the other two
    domains waited for the slot (a message to 50 domains through 8 slots went out one domain
    every 2 s). With an hour's idle timeout the other domains' mail still goes at once."""
    text = config_text(tmp_path, sink.port, f'[routes]\n"*" = "127.0.0.1:{sink.port}"\n',
                       routes=False, marketing_max_out=1)
    node = await make_node(text.replace("idle_timeout = 0.5", "idle_timeout = 3600"))
    rcpts = [f"r{i}@d{i % 3}.example" for i in range(9)]
    await send(node.listeners[0].port, "s@insurer.test", rcpts, message("m", cls="marketing"))
    await sink.wait_for(3)
    assert sorted(r for a in sink.arrivals for r in a.rcpts) == sorted(rcpts)


async def test_the_spool_wal_shrinks_after_a_large_message(tmp_path, sink, make_node):
    """SQLite keeps a WAL file at the largest size it ever reached: after one large message
    the file beside the spool stayed that large for the life of the spool."""
    from postlane.spool.sqlite import WAL_LIMIT

    text = config_text(tmp_path, sink.port).replace("max_message_size = 100000",
                                                    'max_message_size = "30MB"')
    node = await make_node(text)
    port = node.listeners[0].port
    wal = tmp_path / "spool" / "spool.sqlite-wal"
    body = ("x" * 998 + "\r\n") * (WAL_LIMIT // 1000 + 4096)  # the limit and 4 MB more
    # a reader's snapshot from before the message: no checkpoint gets past it, so the WAL
    # cannot start over (and be cut back) until it ends. Without it, the node's next commit
    # (the delivery's, the recorder's trim) could cut it back before the size was looked at:
    # "assert 8388608 > 8388608" on a loaded machine.
    reader = sqlite3.connect(tmp_path / "spool" / "spool.sqlite", isolation_level=None)
    try:
        reader.execute("BEGIN")
        reader.execute("SELECT count(*) FROM messages").fetchone()
        await send(port, "s@insurer.test", ["big@example.com"],
                   message("big", cls="marketing", body=body))
        await sink.wait_for(1)
        assert wal.stat().st_size > WAL_LIMIT
    finally:
        reader.close()
    sent = 1
    while wal.stat().st_size > WAL_LIMIT:  # small messages: checkpoints, and a WAL begun anew
        await send(port, "s@insurer.test", ["a@example.com"], message("small", cls="marketing"))
        sent += 1
        await sink.wait_for(sent)
        assert sent < 200, f"the WAL stays at {wal.stat().st_size} bytes"
