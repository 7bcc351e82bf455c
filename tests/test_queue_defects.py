"""Regression tests of issue 19's queue defects, through the real entry points: the operator CLI
as a subprocess against a running node's API, then the accounting files and the audit store."""

from __future__ import annotations

import json
import logging
import re
import time

import httpx
import pytest

from postlane.audit.backend import open_store_at
from postlane.audit.store import Query
from postlane.operations import OperationError
from postlane.policy.intake import RcptIn
from tests.conftest import OPERATOR, config_text, message, records, send
from tests.support.waiting import until
from tests.test_cli_ops import run_cli

DEFERRING = "deferme.example"


def _deferring_config(tmp_path, sink) -> str:
    """Marketing retries only after an hour, so every retry in the test is the operator's."""
    text = config_text(tmp_path, sink.port, f'[routes]\n"{DEFERRING}" = "127.0.0.1:{sink.port}"\n'
                       f'"example.com" = "127.0.0.1:{sink.port}"\n', routes=False)
    return text.replace('retry = ["1s", "2s"]', 'retry = ["1h"]')


def _deferred(node, attempts: int) -> bool:
    rcpts = list({id(r): r for r in node.scheduler.recipients() if r.domain == DEFERRING}
                 .values())
    return len(rcpts) == 8 and all(r.attempts == attempts and r.state.value == "deferred"
                                   for r in rcpts)


async def test_retry_twice_then_purge_counts_each_recipient_once(tmp_path, sink, make_node):
    """Issue 19 defect 1: two retries of a deferred lane, then a purge, printed "24 recipients
    purged" for 8, wrote three "b" records per recipient (files and audit chain), drove the
    lane's depth to -16 and listed each recipient three times in the lookup API."""
    addresses = [f"r{i}@{DEFERRING}" for i in range(8)]
    for address in addresses:
        sink.rcpt_replies[address] = ["451 4.7.1 greylisted, come back later"]
    node = await make_node(_deferring_config(tmp_path, sink))
    target = ["--url", f"http://127.0.0.1:{node.api.port}",
              "--token-file", str(tmp_path / "api-token")]
    qids = [await node.intake.submit("s@insurer.test", [RcptIn(a)],
                                     message("offer", cls="marketing", extra=(
                                         "X-Correlation-ID: camp-1\r\n")))
            for a in addresses]
    await until(lambda: _deferred(node, 1), what="all 8 deferred once")
    for attempt in (2, 3):
        code, out, err = await run_cli("retry", "bulk", *target)
        assert code == 0, err
        assert out.strip() == "8 recipients retried now"
        await until(lambda a=attempt: _deferred(node, a), what=f"all 8 deferred {attempt} times")

    token = (tmp_path / "api-token").read_text().strip()
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{node.api.port}",
                                 headers={"Authorization": f"Bearer {token}"}) as api:
        found = (await api.get("/api/v1/messages", params={"correlation_id": "camp-1"})).json()
        assert sorted(m["queue_id"] for m in found["messages"]) == sorted(qids)
        assert all(len(m["recipients"]) == 1 for m in found["messages"])

        code, out, err = await run_cli("purge", "bulk", DEFERRING, "--yes", *target)
        assert code == 0, err
        assert out.strip() == "8 recipients purged"

        status = (await api.get("/api/v1/status")).json()
        lane = next(ln for ln in status["lanes"] if ln["domain"] == DEFERRING)
        assert (lane["depth"], lane["deferred"], status["queued"]) == (0, 0, 0)
        metrics = (await api.get("/metrics")).text
        assert 'postlane_queue_depth{class="marketing",pool="bulk"} 0.0' in metrics
        found = (await api.get("/api/v1/messages", params={"correlation_id": "camp-1"})).json()
        assert sorted(len(m["recipients"]) for m in found["messages"]) == [1] * 8
        assert {r["state"] for m in found["messages"] for r in m["recipients"]} == {"purged"}
    await node.stop()

    purged = [r for r in records(tmp_path) if r["bounceCat"] == "purged"]
    assert sorted(r["rcpt"] for r in purged) == sorted(addresses)
    store = open_store_at(str(tmp_path / "spool" / "audit.sqlite"), readonly=True)
    try:
        chained = [r for r in store.find(Query(cls="marketing")) if r["bounce_cat"] == "purged"]
    finally:
        store.close()
    assert sorted(r["rcpt"] for r in chained) == sorted(addresses)


async def test_a_lane_s_oldest_age_counts_its_deferred_mail(tmp_path, sink, make_node):
    """Issue 19 defect 4: a lane whose mail is all deferred showed "oldest 0.0s" in `queues`
    and on the dashboard while its class showed the real age."""
    for i in range(8):
        sink.rcpt_replies[f"r{i}@{DEFERRING}"] = ["451 4.7.1 greylisted"]
    node = await make_node(_deferring_config(tmp_path, sink))
    start = time.time()
    for i in range(8):
        await node.intake.submit("s@insurer.test", [RcptIn(f"r{i}@{DEFERRING}")],
                                 message("offer", cls="marketing"))
        if i == 0:
            first_queued = time.time()  # the oldest message was queued by now
    await until(lambda: _deferred(node, 1), what="all 8 deferred once")
    asked = time.time()
    code, out, err = await run_cli("queues", "--json", "--url",
                                   f"http://127.0.0.1:{node.api.port}",
                                   "--token-file", str(tmp_path / "api-token"))
    assert code == 0, err
    lane = next(ln for ln in json.loads(out) if ln["domain"] == DEFERRING)
    assert lane["deferred"] == 8 and lane["ready"] == 0
    # the age of the oldest (deferred) message when asked, not 0.0 (the API rounds to ms)
    assert asked - first_queued - 0.0005 <= lane["oldest_age_s"] <= time.time() - start + 0.1
    assert lane["oldest_age_s"] > 0


async def test_mail_of_a_pool_removed_from_the_config_is_told_and_can_be_removed(
        tmp_path, sink, make_node, caplog):
    """A restart with a pool taken out of the config left its queued mail in a lane nothing
    served, without a word; now it is a degraded state (log, status) until purged."""
    text = config_text(tmp_path, sink.port)
    node = await make_node(text)
    await node.operations.pause("bulk", who=OPERATOR)
    await send(node.listeners[0].port, "s@insurer.test", ["a@example.com"],
               message("m", cls="marketing"))
    await node.stop()
    without = re.sub(r"\[pools\.bulk\]\nips = \[[^\n]*\]\n", "", text).replace(
        'pool = "bulk"', 'pool = "critical"')
    assert "[pools.bulk]" not in without
    node = await make_node(without)
    [state] = node.status()["degraded"]
    assert state["key"] == "orphan-pool:bulk" and state["what"].startswith("1 recipients")
    assert any("no longer has" in r.getMessage() for r in caplog.records
               if r.levelno >= logging.WARNING)
    with pytest.raises(OperationError, match="no longer in the config"):
        await node.operations.pause("bulk", who=OPERATOR)
    assert await node.operations.purge("bulk", "example.com", who=OPERATOR) == 1
    await until(lambda: not node.status()["degraded"], what="the state ends once purged")
    assert not sink.arrivals


async def test_a_lane_paused_before_its_first_mail_is_seen_as_paused(tmp_path, sink, make_node):
    """`pause bulk --domain gmail.example` with no mail there yet was stored and applied, but
    shown nowhere: status, `postlane queues` and the metrics list lanes, and there was none."""
    text = config_text(tmp_path, sink.port)
    node = await make_node(text)
    await node.operations.pause("bulk", "gmail.example", who=OPERATOR)
    lanes = {(r["pool"], r["domain"]): r for r in node.status()["lanes"]}
    assert lanes[("bulk", "gmail.example")]["paused"] is True
    assert lanes[("bulk", "gmail.example")]["depth"] == 0
    await node.stop()
    node = await make_node(text)  # a restart shows it too
    lanes = {(r["pool"], r["domain"]): r for r in node.status()["lanes"]}
    assert lanes[("bulk", "gmail.example")]["paused"] is True
