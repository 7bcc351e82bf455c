"""Degraded states tell their story once: a start line (cause, and what the node now answers),
a count while they last, an end line with the duration - not a line per refused message."""

from __future__ import annotations

import socket

from postlane.accounting.records import Record
from postlane.harness.sink import Sink
from postlane.monitor.tracker import Tracker
from postlane.startup import parse_config
from tests.conftest import config_text, message, send
from tests.support.waiting import until


def told(caplog, kind: str) -> list:
    return [r for r in caplog.records if getattr(r, "degraded", None) == kind]


async def test_low_disk_is_told_once_when_it_starts_and_once_when_it_ends(make_node, tmp_path,
                                                                           sink, caplog):
    node = await make_node(config_text(tmp_path, sink.port))
    disk = node.intake.disk
    disk.min_free, _ = 1 << 60, disk.recheck()
    for i in range(3):
        try:
            await send(node.listeners[0].port, "sender@insurer.test", ["x@example.com"],
                       message(f"full{i}"))
        except Exception as exc:  # noqa: BLE001 - smtplib's refusal
            assert "452" in str(exc)
    disk.min_free = 0  # space returns: the node notices on its own within a second
    await until(lambda: "disk" not in node.health.active, timeout=10)
    lines = told(caplog, "disk")
    assert [r.event for r in lines] == ["start", "end"]
    assert lines[0].levelname == "ERROR" and "452" in lines[0].effect
    assert lines[1].refusals == 3
    assert node.health.events["disk"] == 3
    await send(node.listeners[0].port, "sender@insurer.test", ["x@example.com"],
               message("space again"))
    await sink.wait_for(1, timeout=10)


async def test_a_receiver_down_is_told_once_while_its_mail_is_deferred(make_node, tmp_path,
                                                                        caplog):
    # The port stays bound but not listening: a connection is refused, and no other program's
    # bind(0) can take it before the receiver returns on it (asyncio's SO_REUSEADDR may).
    hold = socket.socket()
    hold.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    hold.bind(("127.0.0.1", 0))
    port = hold.getsockname()[1]
    node = await make_node(config_text(tmp_path, port))
    for i in range(3):
        await send(node.listeners[0].port, "sender@insurer.test", ["x@example.com"],
                   message(f"m{i}", cls="policy-documents"))
    await until(lambda: len(told(caplog, "destination")) == 1, timeout=10)
    assert node.health.states()[0]["key"] == "destination:critical/example.com"
    back = await Sink(port=port).start()  # the receiver returns: retries (1s) deliver
    try:
        await back.wait_for(3, timeout=30)
        await until(lambda: not node.health.active, timeout=10)
    finally:
        await back.stop()
        hold.close()
    lines = told(caplog, "destination")
    assert [r.event for r in lines] == ["start", "end"]
    # the first try failed and deferred its message; the others waited in the suspended lane
    assert "deferred" in lines[0].effect and lines[1].deferrals >= 1
    assert not [r for r in caplog.records if r.name == "postlane.relay" and
                r.levelname != "DEBUG"], "no line per failed connection"


def test_a_node_tracker_never_counts_below_zero(tmp_path):
    config = parse_config(config_text(tmp_path, 2525))
    tracker = Tracker(config)
    tracker.on_record(Record(type="d", time_logged=10.0, time_queued=9.0, orig="s@x.test",
                             rcpt="r@example.com", queue_id="Q", cls="marketing",
                             vmta_pool="bulk"))
    assert tracker.classes["marketing"].depth == 0
    clustered = Tracker(config, counts_queue=False)
    clustered.on_record(Record(type="r", time_logged=1.0, time_queued=1.0, orig="s@x.test",
                               rcpt="r@example.com", queue_id="Q", cls="marketing",
                               vmta_pool="bulk"))
    assert clustered.classes["marketing"].depth == 0, "a cluster node counts no queue"
    assert clustered.classes["marketing"].received == 1


def test_health_lines_carry_their_counts(caplog):
    from postlane.health import Health

    health = Health()
    health.begin("k", "disk", "low disk space", cause="1 MB free", effect="452")
    health.begin("k", "disk", "low disk space", cause="again", effect="452")  # once
    health.count("k", 2)
    health.count("other")  # not active: nothing
    health.end("k")
    health.end("k")
    lines = told(caplog, "disk")
    assert [r.event for r in lines] == ["start", "end"] and lines[1].refusals == 2
