"""The spool's commits: urgent writes (classes with an SLA) are committed alone, ahead of the
bulk queued before them, and every commit's duration is on /metrics."""

from __future__ import annotations

import httpx
from prometheus_client.parser import text_string_to_metric_families

from postlane.policy.intake import RcptIn
from postlane.spool.writer import Events, WriteQueue
from tests.conftest import config_text, message


def test_urgent_writes_are_taken_alone_then_the_bulk_in_order() -> None:
    queue = WriteQueue()
    bulk = [Events([]) for _ in range(5)]
    urgent = [Events([]) for _ in range(2)]
    for op in bulk[:3]:
        queue.put(op, urgent=False)
    for op in urgent:
        queue.put(op, urgent=True)
    for op in bulk[3:]:
        queue.put(op, urgent=False)
    assert queue.take() == urgent  # a policy notice does not wait for the campaign's rows
    assert queue.take() == bulk  # then the bulk, in the order it was queued
    assert not queue


async def test_commit_durations_are_on_metrics(tmp_path, sink, make_node) -> None:
    node = await make_node(config_text(tmp_path, sink.port))
    before = node.spool.stats.commits
    await node.intake.submit("s@insurer.test", [RcptIn("a@example.com")],
                             message("policy", cls="policy-documents"))
    await sink.wait_for(1)
    await node.spool.flush()
    committed = node.spool.stats.commits
    assert committed > before
    token = (tmp_path / "api-token").read_text().strip()
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{node.api.port}",
                                 headers={"Authorization": f"Bearer {token}"}) as api:
        text = (await api.get("/metrics")).text
    samples = {s.name: s for f in text_string_to_metric_families(text) for s in f.samples
               if s.name.startswith("postlane_spool_")}
    count = samples["postlane_spool_commit_seconds_count"].value
    assert count >= committed  # more may have come since (the delivery's outcome)
    assert samples["postlane_spool_commit_seconds_sum"].value > 0
    assert samples["postlane_spool_operations_total"].value >= count
