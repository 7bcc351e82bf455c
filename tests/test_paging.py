"""Deep lanes keep their head in memory and the rest in the spool (scheduler/paging.py): with a
small window, a paused campaign stays mostly on disk, the figures count it, the operator's
actions reach it, a restart resumes it, and every recipient is delivered exactly once."""

from __future__ import annotations

import collections
import json
import time

import httpx
import pytest

from postlane.node import Node
from postlane.policy.intake import RcptIn
from postlane.scheduler import paging
from postlane.scheduler.control import Selector
from postlane.spool.attempts import AttemptJournal
from postlane.spool.base import Attempt
from postlane.startup import parse_config
from tests.conftest import OPERATOR, config_text, message, records
from tests.support.waiting import until as _until

N = 120


@pytest.fixture(autouse=True)
def small_window(monkeypatch):
    monkeypatch.setattr(paging, "WINDOW", 20)
    monkeypatch.setattr(paging, "LOW", 5)


async def _queue_campaign(node: Node, n: int = N, domains: int = 1) -> list[str]:
    await node.operations.pause("bulk", who=OPERATOR)
    return [await node.intake.submit("s@insurer.test", [RcptIn(f"r{i}@d{i % domains}.example")],
                                     message(f"offer {i}", cls="marketing"))
            for i in range(n)]


def _arrivals(sink) -> collections.Counter:
    return collections.Counter(a.rcpts[0] for a in sink.arrivals)


def _routes(tmp_path, sink, domains: int = 1) -> str:
    routes = "".join(f'"d{i}.example" = "127.0.0.1:{sink.port}"\n' for i in range(domains))
    return config_text(tmp_path, sink.port,
                       f'[routes]\n"example.com" = "127.0.0.1:{sink.port}"\n{routes}',
                       routes=False)


async def test_a_paused_campaign_stays_in_the_spool_and_is_counted(tmp_path, sink, make_node):
    node = await make_node(_routes(tmp_path, sink))
    await _queue_campaign(node)
    lane = node.scheduler.lanes[("bulk", "d0.example")]
    await _until(lambda: not lane.paging)
    assert len(lane.heap) <= paging.WINDOW and lane.spooled >= N - paging.WINDOW
    assert lane.depth() == N and node.scheduler.queued() == N
    assert len(node.scheduler.pager.known) <= paging.WINDOW + 1

    token = (tmp_path / "api-token").read_text().strip()
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{node.api.port}",
                                 headers={"Authorization": f"Bearer {token}"}) as api:
        status = (await api.get("/api/v1/status")).json()
        row = next(ln for ln in status["lanes"] if ln["domain"] == "d0.example")
        assert (row["depth"], row["ready"], status["queued"]) == (N, N, N)
        assert row["oldest_age_s"] > 0
        metrics = (await api.get("/metrics")).text
        assert f'postlane_queue_depth{{class="marketing",pool="bulk"}} {N}.0' in metrics
        assert f'postlane_domain_queue_depth{{domain="d0.example"}} {N}.0' in metrics
        listed = await node.queue.messages(Selector(pool="bulk"))
        assert (listed["total_messages"], listed["total_recipients"]) == (N, N)
        shape = await node.queue.shape()
        assert shape["rows"][0]["total"] == N

    # a policy notice goes out while the campaign waits
    await node.intake.submit("s@insurer.test", [RcptIn("urgent@example.com")],
                             message("notice", cls="policy-documents"))
    await sink.wait_for(1)
    await node.operations.resume("bulk", who=OPERATOR)
    await sink.wait_for(N + 1, timeout=60)
    await _until(lambda: node.scheduler.queued() == 0)
    counts = _arrivals(sink)
    assert len(counts) == N + 1 and set(counts.values()) == {1}
    assert lane.spooled == 0 and lane.cursor is None and lane.oldest(0) == 0.0
    assert not node.scheduler.pager.known and not node.scheduler.pager.messages


async def test_operator_actions_reach_recipients_in_the_spool(tmp_path, sink, make_node):
    node = await make_node(_routes(tmp_path, sink))
    qids = await _queue_campaign(node)
    lane = node.scheduler.lanes[("bulk", "d0.example")]
    await _until(lambda: not lane.paging)
    last = qids[-10:]  # deep in the spool, after the lane's head
    out = await node.operations.queue("hold", Selector(queue_ids=tuple(last)), who=OPERATOR)
    assert out["recipients"] == 10
    assert lane.held == 10 and lane.depth() == N
    out = await node.operations.queue("delete", Selector(queue_ids=tuple(qids[-20:-10])),
                                      who=OPERATOR)
    assert out["recipients"] == 10 and lane.depth() == N - 10
    dry = await node.operations.queue("hold", Selector(pool="bulk"), who=OPERATOR, dry_run=True)
    assert dry["recipients"] == N - 20  # queued ones, in memory and in the spool

    await node.operations.resume("bulk", who=OPERATOR)
    await sink.wait_for(N - 20, timeout=60)
    await _until(lambda: lane.depth() == 10)
    out = await node.operations.queue("release", Selector(queue_ids=tuple(last)), who=OPERATOR)
    assert out["recipients"] == 10
    await sink.wait_for(N - 10, timeout=60)
    await _until(lambda: node.scheduler.queued() == 0)
    counts = _arrivals(sink)
    assert len(counts) == N - 10 and set(counts.values()) == {1}


async def test_a_restart_resumes_a_deep_queue_from_the_spool(tmp_path, sink):
    text = _routes(tmp_path, sink, domains=2)
    node = Node(parse_config(text))
    await node.start()
    await _queue_campaign(node, domains=2)
    await node.stop()

    again = Node(parse_config(text))
    await again.start()
    try:
        lanes = [again.scheduler.lanes[("bulk", f"d{i}.example")] for i in range(2)]
        await _until(lambda: not any(ln.paging for ln in lanes))
        assert sum(ln.depth() for ln in lanes) == N
        assert all(len(ln.heap) <= paging.WINDOW for ln in lanes)
        assert all(ln.oldest(time.time()) > 0 for ln in lanes)
        states = {s["class"]: s for s in again.monitor.class_states(10 ** 10)}
        assert states["marketing"]["depth"] == N
        await again.operations.resume("bulk", who=OPERATOR)
        await sink.wait_for(N, timeout=60)
        await _until(lambda: again.scheduler.queued() == 0)
        counts = _arrivals(sink)
        assert len(counts) == N and set(counts.values()) == {1}
    finally:
        await again.stop()


async def _stopped_with_an_unknown_attempt_deep(tmp_path, sink) -> tuple[str, list[str]]:
    """A paused campaign's node stopped, and the journal naming an attempt of its last message
    with no outcome in the spool, as a crash would leave it: the config and the queue ids."""
    text = _routes(tmp_path, sink)
    node = Node(parse_config(text))
    await node.start()
    qids = await _queue_campaign(node)
    await node.stop()
    journal = AttemptJournal(tmp_path / "spool")
    journal.open()
    journal.write([Attempt(qids[-1], 0, time.time(), "{}", 1)])
    journal.close()
    return text, qids


async def test_a_look_at_the_queue_leaves_a_deep_recipient_its_unknown_attempt(tmp_path, sink):
    """An attempt journaled before a crash, for a recipient deep in a paused lane: the
    operator's look at the queue (which reads spool rows too) took the journal entry, so when
    the lane reached the recipient it was delivered again without its "u" record."""
    text, qids = await _stopped_with_an_unknown_attempt_deep(tmp_path, sink)

    again = Node(parse_config(text))
    await again.start()
    try:
        seen = await again.queue.select(Selector(pool="bulk"))  # the operator looks
        assert len(seen) == N
        await again.operations.resume("bulk", who=OPERATOR)
        await sink.wait_for(N, timeout=60)
        await _until(lambda: again.scheduler.queued() == 0)
        await again.flush_evidence()
    finally:
        await again.stop()
    last = [r["type"] for r in records(tmp_path) if r["rcpt"] == f"r{N - 1}@d0.example"]
    assert sorted(last) == ["d", "r", "u"]  # (the two runs' files in either order)


async def test_an_action_on_a_deep_recipient_records_its_unknown_attempt_first(tmp_path, sink):
    """Deleting a recipient still in the spool whose last attempt's outcome is unknown: its
    trail says "u" before the deletion, as when a page reads it in."""
    text, qids = await _stopped_with_an_unknown_attempt_deep(tmp_path, sink)

    again = Node(parse_config(text))
    await again.start()
    try:
        out = await again.operations.queue("delete", Selector(queue_ids=(qids[-1],)),
                                           who=OPERATOR)
        assert out["recipients"] == 1
        await again.flush_evidence()
    finally:
        await again.stop()
    last = [r["type"] for r in records(tmp_path) if r["rcpt"] == f"r{N - 1}@d0.example"]
    assert sorted(last)[1:] == ["r", "u"] and len(last) == 3, last


async def test_a_deep_recipient_in_unicode_upper_case_is_found_as_in_memory(tmp_path, sink,
                                                                            make_node):
    """The spool's selection by recipient compared SQLite's ``lower()``, which folds ASCII
    only, while the in-memory matcher folds with Python: ``JÖRG@EXÄMPLE.com`` deep in a paused
    lane was not found as ``jörg@exämple.com`` (``queue list``, ``GET /messages``, actions),
    nor its decomposed spelling; the same recipient at the lane's head was."""
    from tests.test_api import api_client
    from tests.test_cli_ops import run_cli

    node = await make_node(_routes(tmp_path, sink))
    await node.operations.pause("bulk", who=OPERATOR)
    deep = "J\u00d6RG@EX\u00c4MPLE.com"
    rcpts = [f"r{i}@ex\u00e4mple.com" for i in range(N)]
    qids = [await node.intake.submit("s@insurer.test", [RcptIn(r)],
                                     message(f"offer {i}", cls="marketing"))
            for i, r in enumerate([deep, *rcpts, deep])]
    lane = node.scheduler.lanes[("bulk", "xn--exmple-cua.com")]
    await _until(lambda: not lane.paging)
    assert lane.spooled >= N - paging.WINDOW
    head, spooled = qids[0], qids[-1]
    assert (head, 0) in node.scheduler.pager.known
    assert (spooled, 0) not in node.scheduler.pager.known  # deep: only the spool has it

    target = ["--url", f"http://127.0.0.1:{node.api.port}",
              "--token-file", str(tmp_path / "api-token")]
    for spelling in ("j\u00f6rg@ex\u00e4mple.com", "jo\u0308rg@xn--exmple-cua.com", deep):
        code, out, err = await run_cli("queue", "list", "--json", "--recipient", spelling,
                                       *target)
        assert code == 0, (spelling, err)
        assert sorted(m["queue_id"] for m in json.loads(out)["messages"]) == sorted(
            [head, spooled]), spelling
    async with api_client(node, tmp_path) as api:
        resp = await api.get("/api/v1/messages", params={"recipient": "j\u00f6rg@ex\u00e4mple.com"})
        assert sorted(m["queue_id"] for m in resp.json()["messages"]) == sorted(
            [head, spooled]), resp.text
    out = await node.operations.queue("hold", Selector(recipient="j\u00f6rg@ex\u00e4mple.com"),
                                      who=OPERATOR)
    assert out["recipients"] == 2
