"""The read-only queue view's figures follow the queue through every way out of it: what a
cluster node reports as held per class (``QueueView.held_by_class``, read by /metrics and the
SLA view) is a counter, so it must come back to nothing when the mail is delivered or an
operator deletes it - checked against a walk of the queue, on a real node and spool."""

from __future__ import annotations

from collections import Counter

from postlane.node import Node
from postlane.scheduler.control import Selector
from tests.conftest import OPERATOR, config_text, message, send
from tests.support.waiting import until


def walked(node: Node) -> dict[str, int]:
    """What the counter replaces: a walk of every recipient (``recipients`` leaves out those
    in flight: there are none while the pool is paused)."""
    assert all(lane.inflight == 0 for lane in node.view.lanes())
    return dict(Counter(r.msg.cls for r in node.view.recipients()))


async def test_held_by_class_follows_delivery_and_deletion(tmp_path, sink, make_node):
    node = await make_node(config_text(tmp_path, sink.port))
    port = node.listeners[0].port
    await node.operations.pause("bulk", who=OPERATOR)
    await send(port, "s@insurer.test", ["a@example.com", "b@example.com"],
               message("kept", cls="marketing", extra="X-Correlation-ID: kept\r\n"))
    await send(port, "s@insurer.test", ["c@example.com"],
               message("dropped", cls="marketing", extra="X-Correlation-ID: dropped\r\n"))
    assert node.view.held_by_class() == walked(node) == {"marketing": 3}

    [dropped] = node.view.with_correlation_id("dropped")
    out = await node.operations.queue("delete", Selector(queue_ids=(dropped,)), who=OPERATOR)
    assert out["recipients"] == 1
    assert node.view.held_by_class() == walked(node) == {"marketing": 2}

    await node.operations.resume("bulk", who=OPERATOR)
    await sink.wait_for(1)
    await until(lambda: node.scheduler.queued() == 0, what="both outcomes recorded")
    assert node.view.held_by_class() == {}
