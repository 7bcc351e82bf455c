"""Priority lanes: ordering under contention, caps, pause/resume, backoff, classification.

Ordering is checked by arrival order at the sink, never by wall-clock thresholds.
"""

from __future__ import annotations

import asyncio

import pytest

from postlane.harness.sink import Sink
from postlane.operations import OperationError
from tests.conftest import OPERATOR, config_text, message, records, send
from tests.support.heldsink import HeldSink


def shared_pool_config(tmp_path, sink_port: int, *, slots: int = 1, extra: str = "") -> str:
    """Every class in one pool with ``slots`` connections: contention by construction."""
    return f"""
default_class = "marketing"
[node]
hostname = "mta.test"
spool = "{tmp_path}/spool"
drain_timeout = 5
[listeners.in]
port = 0
relay_from = ["127.0.0.0/8"]
[pools.shared]
ips = [{{ address = "127.0.0.40", ehlo = "shared.test", max_smtp_out = {slots} }}]
[classes.policy-documents]
pool = "shared"
priority = 0
sla = "2m"
[classes.claims]
pool = "shared"
priority = 1
sla = "30m"
[classes.payment-receipts]
pool = "shared"
priority = 1
sla = "5m"
[classes.marketing]
pool = "shared"
priority = 3
[relay]
idle_timeout = 0.5
[accounting]
directory = "{tmp_path}/acct"
[api]
enabled = false
[routes]
"*" = "127.0.0.1:{sink_port}"
{extra}
"""


def subjects(sink: Sink) -> list[str]:
    out = []
    for arrival in sink.arrivals:
        for line in arrival.data.split(b"\r\n"):
            if line.startswith(b"Subject: "):
                out.append(line[9:].decode())
    return out


async def _submit_all(port: int, items: list[tuple[str, str, str]]) -> None:
    """Submit (subject, class, recipient) in order, each acknowledged before the next."""
    for subject, cls, rcpt in items:
        await send(port, "sender@insurer.test", [rcpt], message(subject, cls=cls))


async def test_later_policy_notice_overtakes_queued_marketing_in_one_slot(tmp_path, make_node):
    sink = await HeldSink().start()
    try:
        node = await make_node(shared_pool_config(tmp_path, sink.port))
        port = node.listeners[0].port
        await _submit_all(port, [(f"m{i}", "marketing", f"r{i}@example.com") for i in range(5)])
        await sink.on_the_wire()  # held until the rest is queued
        await _submit_all(port, [("policy", "policy-documents", "p@example.com")])
        sink.release.set()
        await sink.wait_for(6, timeout=30)
        order = subjects(sink)
        # m0 (maybe m1) was already on the wire; the policy notice is next, ahead of the rest
        assert order.index("policy") <= 2, order
        assert node.scheduler.slots["shared"][0].in_use <= 1
    finally:
        await sink.stop()


async def test_higher_priority_lane_takes_the_slot_from_another_domain(tmp_path, make_node):
    sink = await HeldSink().start()
    try:
        node = await make_node(shared_pool_config(tmp_path, sink.port))
        port = node.listeners[0].port
        await _submit_all(port, [(f"m{i}", "marketing", f"r{i}@news.example") for i in range(5)])
        await sink.on_the_wire()  # held until the rest is queued
        await _submit_all(port, [("policy", "policy-documents", "p@customers.example")])
        sink.release.set()
        await sink.wait_for(6, timeout=30)
        order = subjects(sink)
        assert order.index("policy") <= 2, order
    finally:
        await sink.stop()


async def test_earliest_deadline_first_within_a_priority(tmp_path, make_node):
    sink = await HeldSink().start()
    try:
        node = await make_node(shared_pool_config(tmp_path, sink.port))
        port = node.listeners[0].port
        await _submit_all(port, [("blocker", "marketing", "b@example.com")])
        await sink.on_the_wire()  # held until the rest is queued
        await _submit_all(port, [("claim", "claims", "c@example.com"),        # deadline +30 min
                                 ("receipt", "payment-receipts", "r@example.com")])  # +5 min
        sink.release.set()
        await sink.wait_for(3, timeout=30)
        order = subjects(sink)
        assert order.index("receipt") < order.index("claim"), order
    finally:
        await sink.stop()


async def test_max_smtp_out_is_never_exceeded(tmp_path, make_node):
    sink = await Sink(delay=0.05).start()
    try:
        text = config_text(tmp_path, sink.port, critical_ips=2, max_out=2)
        text = text.replace('[routes]\n"example.com"', '[routes]\n"*"')
        node = await make_node(text)
        port = node.listeners[0].port
        rcpts = [f"r{i}@d{i % 4}.example" for i in range(40)]
        await asyncio.gather(*[
            send(port, "s@insurer.test", [r], message(cls="policy-documents")) for r in rcpts])
        await sink.wait_for(40, timeout=60)
        assert set(sink.max_concurrent) == {"127.0.0.20", "127.0.0.21"}
        assert max(sink.max_concurrent.values()) <= 2, dict(sink.max_concurrent)
    finally:
        await sink.stop()


async def test_destination_rule_caps_connections_per_ip(tmp_path, make_node):
    sink = await Sink(delay=0.05).start()
    try:
        extra = '[destinations.example]\ndomains = ["example.com"]\nmax_connections_per_ip = 1\n'
        node = await make_node(config_text(tmp_path, sink.port, extra, max_out=5))
        port = node.listeners[0].port
        await asyncio.gather(*[send(port, "s@insurer.test", [f"r{i}@example.com"],
                                    message(cls="policy-documents")) for i in range(15)])
        await sink.wait_for(15, timeout=60)
        assert sink.max_concurrent["127.0.0.20"] == 1
    finally:
        await sink.stop()


async def test_pause_holds_marketing_not_transactional_and_survives_restart(
        tmp_path, sink, make_node):
    text = config_text(tmp_path, sink.port)
    node = await make_node(text)
    port = node.listeners[0].port
    await node.operations.pause("bulk", who=OPERATOR)
    for i in range(5):
        await send(port, "s@insurer.test", [f"m{i}@example.com"], message(f"m{i}",
                                                                          cls="marketing"))
    await send(port, "s@insurer.test", ["p@example.com"], message("policy",
                                                                   cls="policy-documents"))
    await sink.wait_for(1)
    assert subjects(sink) == ["policy"], "paused marketing waits, the policy notice does not"
    lane = next(ln for ln in node.status()["lanes"] if ln["pool"] == "bulk")
    # the state, not a wait: every marketing recipient is ready and none was taken
    assert lane["paused"] and lane["depth"] == lane["ready"] == 5 and lane["inflight"] == 0
    await node.stop()

    node2 = await make_node(text)  # same spool: pause state and queue come back
    assert ("bulk", "*") in node2.scheduler.paused
    lane = next(ln for ln in node2.status()["lanes"] if ln["pool"] == "bulk")
    assert lane["paused"] and lane["ready"] == 5 and lane["inflight"] == 0
    assert len(sink.arrivals) == 1
    await node2.operations.resume("bulk", who=OPERATOR)
    await sink.wait_for(6, timeout=30)
    assert sorted(subjects(sink)[1:]) == [f"m{i}" for i in range(5)]


async def test_pause_one_domain_of_a_pool(tmp_path, sink, make_node):
    text = config_text(tmp_path, sink.port).replace('[routes]\n"example.com"', '[routes]\n"*"')
    node = await make_node(text)
    port = node.listeners[0].port
    await node.operations.pause("bulk", "slow.example", who=OPERATOR)
    await send(port, "s@insurer.test", ["a@slow.example"], message("held", cls="marketing"))
    await send(port, "s@insurer.test", ["b@fast.example"], message("goes", cls="marketing"))
    await sink.wait_for(1)
    assert subjects(sink) == ["goes"]
    lane = node.scheduler.lanes[("bulk", "slow.example")]
    assert lane.paused and len(lane.heap) == 1 and lane.inflight == 0  # waits, not taken
    await node.operations.resume("bulk", "slow.example", who=OPERATOR)
    await sink.wait_for(2)


async def test_non_pausable_pool_refuses_pause(tmp_path, sink, make_node):
    node = await make_node(config_text(tmp_path, sink.port))
    with pytest.raises(OperationError) as err:
        await node.operations.pause("critical", who=OPERATOR)
    assert err.value.status == 409 and "pausable" in str(err.value)
    with pytest.raises(OperationError):
        await node.operations.pause("no-such-pool", who=OPERATOR)


async def test_backoff_on_421_then_recovery_on_success(tmp_path, sink, make_node):
    sink.rcpt_replies = {"a@example.com": ["421 4.7.0 Try again later, rate limited",
                                           "250 2.1.5 ok"]}
    extra = ('[destinations.example]\ndomains = ["example.com"]\nbackoff_on = ["421"]\n'
             'backoff_retry = "1s"\nbackoff_duration = "1h"\nmax_connections_per_ip = 4\n')
    node = await make_node(config_text(tmp_path, sink.port, extra))
    await send(node.listeners[0].port, "s@insurer.test", ["a@example.com"],
               message(cls="policy-documents"))
    await sink.wait_for(1, timeout=20)
    lane = node.scheduler.lane("critical", "example.com")
    assert lane.backoff_switches == 2, "switched into backoff on 421 and out on the success"
    assert lane.backoff_until == 0.0
    await node.stop()
    assert [r["type"] for r in records(tmp_path) if r["rcpt"] == "a@example.com"] == \
        ["r", "t", "d"]


async def test_backoff_lowers_the_connection_cap(tmp_path, sink, make_node):
    extra = ('[destinations.example]\ndomains = ["example.com"]\nmax_connections_per_ip = 4\n'
             'backoff_max_connections_per_ip = 1\n')
    node = await make_node(config_text(tmp_path, sink.port, extra))
    lane = node.scheduler.lane("critical", "example.com")
    assert node.scheduler._lane_cap(lane) == 4
    node.scheduler._start_backoff(lane, "421 4.7.0 slow down", 0.0)
    lane.backoff_until = 1e12
    assert node.scheduler._lane_cap(lane) == 1


async def test_classification_by_rule_and_mt_priority(tmp_path, sink, make_node):
    extra = ('[classification]\nmt_priority = { "5" = "policy-documents", "-9" = "marketing" }\n'
             '[[classification.rules]]\nclass = "policy-documents"\n'
             'sender_domain = "policies.insurer.test"\n')
    node = await make_node(config_text(tmp_path, sink.port, extra))
    port = node.listeners[0].port
    await send(port, "notices@policies.insurer.test", ["a@example.com"], message("by-rule"))
    await send(port, "x@other.test", ["b@example.com"], message("by-mt-priority"),
               mail_options=["MT-PRIORITY=7"])
    await send(port, "x@other.test", ["c@example.com"], message("low"),
               mail_options=["MT-PRIORITY=-3"])
    await sink.wait_for(3)
    peers = {s: a.peer for s, a in zip(subjects(sink), sink.arrivals, strict=True)}
    assert peers["by-rule"] == "127.0.0.20" and peers["by-mt-priority"] == "127.0.0.20"
    assert peers["low"] == "127.0.0.30"


async def test_a_busy_lane_makes_room_for_an_older_one_in_its_pool(tmp_path, make_node):
    """One slot, two destinations of one class, both queued: the lane holding the connection
    yields after FAIR_SHARE messages to the other (whose mail is older than its own next
    message), instead of draining its whole queue first."""
    from postlane.scheduler.scheduler import FAIR_SHARE

    sink = await Sink(delay=0.01).start()
    try:
        node = await make_node(shared_pool_config(tmp_path, sink.port))
        await node.operations.pause("shared", who=OPERATOR)
        items = []
        for i in range(FAIR_SHARE + 20):
            items += [(f"a{i}", "marketing", f"r{i}@a.example"),
                      (f"b{i}", "marketing", f"r{i}@b.example")]
        await _submit_all(node.listeners[0].port, items)
        await node.operations.resume("shared", who=OPERATOR)
        await sink.wait_for(len(items), timeout=60)
        order = subjects(sink)
        assert order[:FAIR_SHARE] == [f"a{i}" for i in range(FAIR_SHARE)]
        assert order[FAIR_SHARE:2 * FAIR_SHARE] == [f"b{i}" for i in range(FAIR_SHARE)]
    finally:
        await sink.stop()
