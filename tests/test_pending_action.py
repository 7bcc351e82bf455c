"""A hold or delete of a recipient whose delivery is in progress: kept as pending (durably, with
its record) and applied when that delivery ends, unless it delivers - as Postfix's ``postsuper
-h/-d`` of a message in delivery takes effect once the delivery agent returns. It said "being
delivered now", exit 1, and a delivery that then deferred left the recipient queued, retried
later: the hold or delete the operator asked for was lost."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from pathlib import Path

import httpx
import pytest

from postlane.policy.intake import RcptIn
from tests.conftest import config_text, message, records, send
from tests.support.heldsink import HeldSink
from tests.support.pg import pg_schema  # noqa: F401  (fixture)
from tests.support.waiting import until
from tests.test_cluster import cluster_text, start_node
from tests.test_crash_repair import _APINode
from tests.test_queue_hunt import _cli

LATER = "451 4.3.0 try again later"
ADDRESS = "a@example.com"


DROP = "drop"
"""A scripted DATA reply: the connection is closed instead (a connection failure)."""


class _AnswersFirst(HeldSink):
    """A ``HeldSink`` whose first DATA replies are ``first`` (then its ``data_reply``, 250)."""

    def __init__(self, *first: str) -> None:
        super().__init__()
        self.first = list(first)

    async def handle_DATA(self, server, session, envelope) -> str:
        reply = await super().handle_DATA(server, session, envelope)
        reply = self.first.pop(0) if self.first else reply
        if reply == DROP:
            server.transport.close()
            return "421 4.3.0 closing"  # never read: the connection is gone
        return reply


def _pending_on_disk(tmp_path: Path) -> list[tuple[str, str]]:
    """(address, pending action) of every recipient row with one, as the spool has it."""
    db = sqlite3.connect(tmp_path / "spool" / "spool.sqlite")
    try:
        return [(a, json.loads(p)["action"]) for a, p in db.execute(
            "SELECT address, pending FROM recipients WHERE pending != ''")]
    finally:
        db.close()


def _trail(tmp_path: Path, address: str = ADDRESS) -> list[str]:
    """The recipient's records, as filed: "type", or "type/dsnAction" for an operator's."""
    return [r["type"] + (f"/{r['dsnAction']}" if r["type"] == "o" else "")
            for r in records(tmp_path) if r["rcpt"] == address]


async def _on_the_wire(tmp_path: Path, make_node, *first: str):
    """A node whose destination holds the DATA of a policy notice to ``ADDRESS`` until the
    test releases it, then answers ``first`` (then 250): (sink, node, cli, queue id)."""
    sink = await _AnswersFirst(*first).start()
    node = await make_node(config_text(tmp_path, sink.port))
    qid = await node.intake.submit("notices@example.com", [RcptIn(ADDRESS)],
                                   message("policy", cls="policy-documents"))
    await sink.on_the_wire()
    assert node.scheduler.in_flight(qid) == 1
    return sink, node, _cli(node, tmp_path), qid


@pytest.mark.parametrize("ending", [LATER, DROP])
async def test_a_hold_during_a_delivery_that_defers_holds_it(tmp_path, make_node, ending):
    """The receiver answers 451 after the hold, or the connection fails: the recipient is
    held (listed as held, not retried after its retry time), with its pending and its hold
    on the record."""
    sink, node, cli, qid = await _on_the_wire(tmp_path, make_node, ending)
    try:
        code, out, err = await cli("queue", "hold", qid, "--json")
        got = json.loads(out)
        assert code == 0 and not got["untouched"], (out, err)
        assert got["pending"] == {qid: "1 recipient(s) being delivered now: will be held when"
                                       " the delivery in progress ends, unless it delivers"}
        assert _pending_on_disk(tmp_path) == [(ADDRESS, "hold")]  # durable before the answer
        sink.release.set()

        async def held() -> bool:
            code, out, err = await cli("queue", "list", "--state", "held", "--json")
            return code == 0 and json.loads(out)["total_recipients"] == 1

        await until(held, what="the recipient held once its delivery deferred")
        await asyncio.sleep(2.5)  # past its retry time (1 s): a deferred one goes out again
        assert [a.rcpts for a in sink.arrivals] == [[ADDRESS]], "delivered while held"
        assert await held()
        assert not _pending_on_disk(tmp_path)
        code, out, err = await cli("queue", "release", qid)
        assert code == 0, (out, err)
        await sink.wait_for(2)
        await node.stop()
    finally:
        sink.release.set()
        await sink.stop()
    assert _trail(tmp_path) == ["r", "o/hold-pending", "t", "o/hold", "o/release", "d"]


async def test_a_delete_with_a_dsn_during_a_delivery_that_defers_deletes_it(
        tmp_path, make_node):
    """``delete Q --dsn --yes`` while Q is on the wire, the receiver then answers 451: the
    recipient is deleted, with one "b" record (purged) and one DSN to its sender."""
    sink, node, cli, qid = await _on_the_wire(tmp_path, make_node, LATER)
    try:
        code, out, err = await cli("queue", "delete", qid, "--dry-run")
        assert code == 0 and out.strip() == (f"{qid}: 1 recipient(s) being delivered now: would"
                                             " be deleted when the delivery in progress ends,"
                                             " unless it delivers"), (out, err)
        code, out, err = await cli("queue", "delete", qid)  # asks first: no terminal, refused
        assert code == 1 and "nothing deleted (1 recipients match" in err, (out, err)
        assert not _pending_on_disk(tmp_path)
        code, out, err = await cli("queue", "delete", qid, "--dsn", "--yes")
        assert code == 0 and not err, (out, err)
        assert out.strip() == (f"{qid}: 1 recipient(s) being delivered now: will be deleted"
                               " when the delivery in progress ends, unless it delivers")
        sink.release.set()
        dsns = [a for a in await sink.wait_for(2) if a.rcpts == ["notices@example.com"]]
        assert len(dsns) == 1 and b"deleted by operator" in dsns[0].data
        await until(lambda: not node.scheduler.message(qid) and not
                    node.scheduler.in_flight(qid), what="the message gone from the queue")
        await asyncio.sleep(2.5)  # past its retry time: a deferred one goes out again
        assert [a.rcpts for a in sink.arrivals] == [[ADDRESS], ["notices@example.com"]]
        await node.stop()
    finally:
        sink.release.set()
        await sink.stop()
    assert _trail(tmp_path) == ["r", "o/delete-pending", "t", "b"]
    [gone] = [r for r in records(tmp_path) if r["rcpt"] == ADDRESS and r["type"] == "b"]
    assert gone["bounceCat"] == "purged" and gone["dsnDiag"].startswith("deleted by operator")


async def test_a_hold_during_a_delivery_that_delivers_does_nothing_more(tmp_path, make_node):
    """Delivered is final: the hold asked meanwhile holds nothing, and the trail says so."""
    sink, node, cli, qid = await _on_the_wire(tmp_path, make_node)
    try:
        code, out, err = await cli("queue", "hold", qid)
        assert code == 0 and "will be held when the delivery in progress ends" in out, err
        sink.release.set()
        await sink.wait_for(1)
        await until(lambda: not node.scheduler.in_flight(qid), what="the delivery recorded")
        code, out, err = await cli("queue", "list", "--state", "held", "--json")
        assert code == 0 and json.loads(out)["total_recipients"] == 0, (out, err)
        await node.stop()
    finally:
        sink.release.set()
        await sink.stop()
    assert _trail(tmp_path) == ["r", "o/hold-pending", "d", "o/hold-void"]
    [void] = [r for r in records(tmp_path) if r["dsnAction"] == "hold-void"]
    assert "not applied" in void["dsnDiag"] and "delivered, final" in void["dsnDiag"]


@pytest.mark.parametrize("action", ["hold", "delete"])
async def test_a_pending_action_is_applied_by_the_restart_of_a_killed_node(tmp_path, action):
    """The hold (delete with a DSN) is answered as pending, the node is SIGKILLed before the
    delivery ends: the restarted node holds (deletes, with one DSN) the recipient, after the
    "u" of its attempt whose outcome is unknown; it does not send it again."""
    async with _APINode(tmp_path) as node:
        gate = asyncio.Event()  # never set: the killed node's delivery never ends
        data = node.sink.handle_DATA
        reached: list[bool] = []

        async def held_up(server, session, envelope):
            if ADDRESS in envelope.rcpt_tos:
                reached.append(True)
                await gate.wait()
            return await data(server, session, envelope)

        node.sink.handle_DATA = held_up
        await send(node.port, "notices@example.com", [ADDRESS], message("m"))
        db = sqlite3.connect(tmp_path / "spool" / "spool.sqlite")
        try:
            [(qid,)] = db.execute("SELECT msg_id FROM recipients").fetchall()
        finally:
            db.close()
        await until(lambda: reached, what="the message on the wire")
        body = {"queue_ids": [qid], **({"dsn": True} if action == "delete" else {})}
        answer = await node.client.post(f"/queue/{action}", json=body)
        assert answer.status_code == 200 and qid in answer.json()["pending"], answer.text
        await node.kill()  # at once after the answer
        assert _pending_on_disk(tmp_path) == [(ADDRESS, action)]
        await node.restart()
        if action == "hold":
            async def held() -> bool:
                got = await node.client.get("/queue/messages", params={"state": "held"})
                return got.json()["total_recipients"] == 1

            await until(held, what="the recipient held after the restart")
        else:
            await node.sink.wait_for(1)  # the DSN
        assert len(reached) == 1  # not sent again
    if action == "hold":
        assert _trail(tmp_path) == ["r", "o/hold-pending", "u", "o/hold"]
    else:
        assert _trail(tmp_path) == ["r", "o/delete-pending", "u", "b"]
        assert [a.rcpts for a in node.sink.arrivals] == [["notices@example.com"]]
        assert b"deleted by operator" in node.sink.arrivals[0].data


@pytest.mark.parametrize("action", ["hold", "delete"])
async def test_a_pending_action_in_a_cluster(tmp_path, pg_schema, action):  # noqa: F811
    """The same on a cluster node (PostgreSQL spool): held in the shared spool (nobody's, as
    any hold), or deleted with one DSN, once the delivery in progress deferred."""
    sink = await _AnswersFirst(LATER).start()
    node = await start_node(cluster_text(tmp_path, sink.port, pg_schema, "node-a"))
    try:
        cli = _cli(node, tmp_path)
        qid = await node.intake.submit("notices@example.com", [RcptIn(ADDRESS)],
                                       message("policy", cls="policy-documents"))
        await sink.on_the_wire()
        code, out, err = await cli("queue", action, qid, "--json",
                                   *(("--dsn", "--yes") if action == "delete" else ()))
        got = json.loads(out)
        assert code == 0 and not got["untouched"] and got["pending_recipients"] == 1, (out, err)
        async with node.spool.acquire() as conn:
            assert await conn.fetchval("SELECT pending FROM recipients WHERE msg_id = $1",
                                       qid), "not in the shared spool before the answer"
        sink.release.set()
        if action == "hold":
            async def held() -> bool:
                code, out, err = await cli("queue", "list", "--state", "held", "--json")
                return code == 0 and json.loads(out)["total_recipients"] == 1

            await until(held, what="the recipient held once its delivery deferred")
        else:
            dsns = [a for a in await sink.wait_for(2) if a.rcpts == ["notices@example.com"]]
            assert len(dsns) == 1 and b"deleted by operator" in dsns[0].data
        await asyncio.sleep(2.5)  # past its retry time (1 s): a deferred one goes out again
        assert [a.rcpts for a in sink.arrivals if ADDRESS in a.rcpts] == [[ADDRESS]]
        async with node.spool.acquire() as conn:
            rows = await conn.fetch("SELECT state, pending, lease_owner FROM recipients"
                                    " WHERE msg_id = $1", qid)
        if action == "hold":
            assert [tuple(r) for r in rows] == [("held", "", None)]
        else:
            assert all(r["state"] == "bounced" for r in rows)  # or the message is gone
    finally:
        sink.release.set()
        await node.stop()
        await sink.stop()


async def test_a_pending_hold_in_a_cluster_is_applied_by_the_node_that_takes_it_next(
        tmp_path, pg_schema):  # noqa: F811
    """The node stops while the delivery is still on the wire (its drain cuts it): the
    pending hold stays in the shared spool, and the node that claims the recipient next (here
    the same one, started again) holds it instead of sending it again."""
    sink = await _AnswersFirst().start()
    text = cluster_text(tmp_path, sink.port, pg_schema, "node-a").replace(
        "drain_timeout = 5", "drain_timeout = 0.5")
    node = await start_node(text)
    try:
        cli = _cli(node, tmp_path)
        qid = await node.intake.submit("notices@example.com", [RcptIn(ADDRESS)],
                                       message("policy", cls="policy-documents"))
        await sink.on_the_wire()
        code, out, err = await cli("queue", "hold", qid, "--json")
        assert code == 0 and json.loads(out)["pending_recipients"] == 1, (out, err)
        await node.stop()  # the delivery is cut, its outcome never known
        node = await start_node(text)
        cli = _cli(node, tmp_path)

        async def held() -> bool:
            code, out, err = await cli("queue", "list", "--state", "held", "--json")
            return code == 0 and json.loads(out)["total_recipients"] == 1

        await until(held, what="the recipient held by the node that claimed it")
        assert sink.held == 1  # not sent again
    finally:
        sink.release.set()
        await node.stop()
        await sink.stop()


@pytest.mark.parametrize("action", ["hold", "delete"])
async def test_a_pending_action_is_shown_where_the_queue_is_listed(tmp_path, make_node, action):
    """After a hold (delete) was answered as pending, ``queue list``, ``queue show`` and the
    API's listings showed nothing of it: the recipient on the wire was missing (or plain in
    flight), so the operator could not tell the action was waiting. Each shows it now, until
    the delivery ends and the action applies."""
    sink, node, cli, qid = await _on_the_wire(tmp_path, make_node, LATER)
    try:
        code, out, err = await cli("queue", action, qid,
                                   *(("--dsn", "--yes") if action == "delete" else ()))
        assert code == 0 and "being delivered now" in out, (out, err)
        code, out, err = await cli("queue", "list", "--json")
        assert code == 0, err
        [listed] = json.loads(out)["messages"]
        assert listed["queue_id"] == qid
        assert [(r["address"], r["state"], r["pending"]) for r in listed["recipients"]] \
            == [(ADDRESS, "inflight", action)]
        code, out, err = await cli("queue", "list")
        assert code == 0 and f"inflight ({action} pending)" in out, (out, err)
        code, out, err = await cli("queue", "show", qid)
        assert code == 0 and f"{ADDRESS}: inflight ({action} pending)" in out, (out, err)
        code, out, err = await cli("queue", "show", qid, "--json")
        assert code == 0 and [r["pending"] for r in json.loads(out)["recipients"]] \
            == [action], (out, err)
        token = (tmp_path / "api-token").read_text().strip()
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{node.api.port}",
                                     headers={"Authorization": f"Bearer {token}"}) as api:
            got = (await api.get(f"/api/v1/messages/{qid}")).json()
        assert [(r["address"], r["pending"]) for r in got["recipients"]] == [(ADDRESS, action)]
        sink.release.set()
        if action == "hold":
            async def held() -> bool:
                code, out, err = await cli("queue", "list", "--json")
                [m] = json.loads(out)["messages"] or [{"recipients": [{}]}]
                return [(r.get("state"), r.get("pending")) for r in m["recipients"]] \
                    == [("held", None)]

            await until(held, what="held, nothing pending any more")
            code, out, err = await cli("queue", "list")
            assert code == 0 and "pending" not in out, (out, err)
        else:
            await until(lambda: not node.scheduler.message(qid) and not
                        node.scheduler.in_flight(qid), what="the message gone from the queue")
        await node.stop()
    finally:
        sink.release.set()
        await sink.stop()
