"""One suppression list and one complaint rate for a cluster: nodes on one PostgreSQL schema,
each with its own SQLite copy of the list (the look-up at RCPT stays local), over real SMTP.

Each node here has its own list file, as on separate machines (the cluster test config would
otherwise put both in one ``state/`` folder)."""

from __future__ import annotations

import asyncio
import email
import smtplib
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from postlane.accounting.records import Record
from postlane.cli import app
from postlane.feedback import shared_suppression
from postlane.feedback.shared_suppression import SuppressionSync
from postlane.feedback.suppression import SuppressionList
from postlane.feedback.suppression_writer import SuppressionWriter
from postlane.node import Node
from tests.conftest import OPERATOR, message, send
from tests.support.pg import pg_schema, two_spools  # noqa: F401  (fixtures)
from tests.support.tcpproxy import TCPProxy
from tests.support.waiting import until
from tests.test_cluster import cluster_text, start_node
from tests.test_feedback_node import _arf

FEEDBACK = """
[feedback]
fbl_addresses = ["fbl@mta.test"]
complaint_min_delivered = 1
unsubscribe_url = "https://mta.test/unsubscribe"
suppression_db = "{db}"
[feedback.bounces]
suppress_after = 2
[feedback.classes.marketing]
marketing = true
"""


def node_text(tmp_path: Path, sink_port: int, schema: str, name: str) -> str:
    text = cluster_text(tmp_path, sink_port, schema, name,
                        FEEDBACK.format(db=tmp_path / f"{name}-suppression.sqlite3"))
    return text.replace("[pools.bulk]\n", '[pools.bulk]\nbounce_domain = "bounces.mta.test"\n')


def rcpt_reply(port: int, address: str) -> tuple[int, bytes]:
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        client.ehlo("client.test")
        client.mail("sender@insurer.test")
        return client.rcpt(address)


async def suppressed(node: Node, address: str, scopes: tuple[str, ...] = ("all",)) -> bool:
    return bool(node.feedback.suppression.check([address], scopes))


async def test_a_suppression_made_on_one_node_stops_mail_on_the_other_and_a_removal_comes_back(
        tmp_path, sink, pg_schema):  # noqa: F811
    a = await start_node(node_text(tmp_path, sink.port, pg_schema, "node-a"))
    b = await start_node(node_text(tmp_path, sink.port, pg_schema, "node-b"))
    try:
        port_a, port_b = a.listeners[0].port, b.listeners[0].port
        # an operator's suppression through node A's API door: node B refuses at RCPT
        await a.operations.suppress("gone@example.com", "all", "left the company",
                                    who=OPERATOR)
        await until(lambda: b.feedback.suppression.check_one("gone@example.com") is not None,
                    what="node A's suppression on node B")
        code, reply = await asyncio.to_thread(rcpt_reply, port_b, "gone@example.com")
        assert code == 550 and b"left the company" in reply

        # a complaint received by node A (for mail node A sent) stops marketing on node B
        await send(port_a, "news@insurer.test", ["c@example.com"],
                   message("campaign", cls="marketing"))
        [arrival] = await sink.wait_for(1)
        mid = email.message_from_bytes(arrival.data)["Message-ID"]
        assert await send(port_a, "", ["fbl@mta.test"], _arf(arrival.mail_from, mid)) == {}
        await until(lambda: b.feedback.suppression.check_one("c@example.com") is not None,
                    what="node A's complaint on node B")
        await send(port_b, "news@insurer.test", ["c@example.com", "d@example.com"],
                   message("second", cls="marketing"))
        arrivals = await sink.wait_for(2)
        assert arrivals[1].rcpts == ["d@example.com"]  # c was dropped at DATA by node B

        # the API lists the entries on both nodes; a removal on node B reaches node A
        for node in (a, b):
            assert {e.address for e in node.feedback.suppression.list()} == {
                "gone@example.com", "c@example.com"}
        assert await b.operations.unsuppress("gone@example.com", None, who=OPERATOR) == 1
        await until(lambda: a.feedback.suppression.check_one("gone@example.com") is None,
                    what="node B's removal on node A")
        code, _ = await asyncio.to_thread(rcpt_reply, port_a, "gone@example.com")
        assert code == 250
    finally:
        await a.stop()
        await b.stop()


async def test_the_cli_on_one_nodes_file_reaches_the_cluster(tmp_path, sink, pg_schema):  # noqa: F811
    """``postlane suppress`` writes the node's file directly (node up or not): its changes are
    shared too, the next second, or at the node's next start."""
    a = await start_node(node_text(tmp_path, sink.port, pg_schema, "node-a"))
    b = await start_node(node_text(tmp_path, sink.port, pg_schema, "node-b"))
    db_b = str(tmp_path / "node-b-suppression.sqlite3")
    try:
        out = CliRunner().invoke(app, ["suppress", "add", "--db", db_b, "--scope", "all",
                                       "x@example.com"])
        assert out.exit_code == 0, out.output
        await until(lambda: a.feedback.suppression.check_one("x@example.com") is not None,
                    what="a CLI suppression on node B's file, on node A")
    finally:
        await b.stop()
    out = CliRunner().invoke(app, ["suppress", "remove", "--db", db_b, "x@example.com"])
    assert out.exit_code == 0, out.output
    b = await start_node(node_text(tmp_path, sink.port, pg_schema, "node-b"))
    try:
        await until(lambda: a.feedback.suppression.check_one("x@example.com") is None,
                    what="a removal made while node B was down, on node A")
    finally:
        await a.stop()
        await b.stop()


async def test_a_node_started_later_has_the_whole_list_and_shares_what_it_had(
        tmp_path, sink, pg_schema):  # noqa: F811
    a = await start_node(node_text(tmp_path, sink.port, pg_schema, "node-a"))
    try:
        for i in range(3):
            await a.operations.suppress(f"old{i}@example.com", "all", "", who=OPERATOR)
        await a.operations.unsuppress("old1@example.com", None, who=OPERATOR)
        await a.suppression_sync.sync()  # pushed now, not at A's next tick (a loaded machine)
        # node C had a list of its own before it joined the cluster
        before = SuppressionList(tmp_path / "node-c-suppression.sqlite3")
        before.add("mine@example.com", "all", "from before", "import")
        before.close()
        c = await start_node(node_text(tmp_path, sink.port, pg_schema, "node-c"))
        try:  # in force at its start, before any tick
            assert {e.address for e in c.feedback.suppression.list()} == {
                "old0@example.com", "old2@example.com", "mine@example.com"}
            code, _ = await asyncio.to_thread(rcpt_reply, c.listeners[0].port,
                                              "old2@example.com")
            assert code == 550
            await until(lambda: a.feedback.suppression.check_one("mine@example.com")
                        is not None, what="node C's earlier entry on node A")
            assert a.feedback.suppression.check_one("mine@example.com").reason == "from before"
        finally:
            await c.stop()
    finally:
        await a.stop()


async def test_hard_bounces_at_two_nodes_add_up(tmp_path, sink, pg_schema):  # noqa: F811
    """``suppress_after = 2``: one hard bounce at each node suppresses for every class; the
    same message's bounce at both (its reporting MTA sent it again to the other node, the
    first having died before its 250) is one piece of evidence on both."""
    a = await start_node(node_text(tmp_path, sink.port, pg_schema, "node-a"))
    b = await start_node(node_text(tmp_path, sink.port, pg_schema, "node-b"))
    try:
        def bounce(node: Node, rcpt: str, queue_id: str) -> None:
            node.feedback.on_record(Record(
                type="rb", time_logged=time.time(), time_queued=0, orig="",
                rcpt=rcpt, queue_id=queue_id, cls="marketing", vmta_pool="bulk",
                dsn_action="failed", dsn_status="5.1.1", dsn_diag="smtp;550 5.1.1 unknown",
                bounce_cat="bad-mailbox"))

        bounce(a, "h@example.com", "q1")
        bounce(a, "once@example.com", "q3")
        await a.feedback.flush()
        await until(lambda: b.feedback.suppression.check_one("once@example.com") is not None,
                    what="node A's bounces on node B")
        assert not b.feedback.suppression.check(["h@example.com"], ["all"])
        bounce(b, "h@example.com", "q2")
        bounce(b, "once@example.com", "q3")  # the same message's bounce again
        await b.feedback.flush()
        entry = b.feedback.suppression.check(["h@example.com"], ["all"])["h@example.com"]
        assert entry.reason.startswith("2 hard bounces")
        await until(lambda: a.feedback.suppression.check(["h@example.com"], ["all"]),
                    what="the escalation on node A")
        await asyncio.sleep(2.5)  # two syncs: node B's evidence reached node A
        for node in (a, b):
            assert not node.feedback.suppression.check(["once@example.com"], ["all"])
            count = node.feedback.suppression._db.execute(
                "SELECT count(*) FROM bounces WHERE address = 'once@example.com'").fetchone()[0]
            assert count == 1, node.config.node.name
    finally:
        await a.stop()
        await b.stop()


async def test_complaint_rates_count_every_node(tmp_path, sink, pg_schema):  # noqa: F811
    a = await start_node(node_text(tmp_path, sink.port, pg_schema, "node-a"))
    b = await start_node(node_text(tmp_path, sink.port, pg_schema, "node-b"))
    try:
        await send(a.listeners[0].port, "news@insurer.test", ["r1@example.com"],
                   message("one", cls="marketing"))
        [first] = await sink.wait_for(1)
        await send(b.listeners[0].port, "news@insurer.test", ["r2@example.com"],
                   message("two", cls="marketing"))
        await sink.wait_for(2)
        mid = email.message_from_bytes(first.data)["Message-ID"]
        await send(b.listeners[0].port, "", ["fbl@mta.test"], _arf(first.mail_from, mid))

        def row(node: Node) -> dict:
            return next((r for r in node.feedback.rates.rates()
                         if (r["pool"], r["domain"]) == ("bulk", "*")), {})

        for node in (a, b):  # whichever node delivered or got the complaint
            await until(lambda n=node: row(n).get("delivered") == 2
                        and row(n).get("complaints") == 1, what="the cluster's counts")
            assert row(node)["rate"] == 0.5 and row(node)["alert"]
            assert node.reputation._complaint_rate("bulk") == 0.5
    finally:
        await a.stop()
        await b.stop()


@pytest.fixture
async def copies(two_spools, tmp_path, monkeypatch) -> AsyncIterator[list[SuppressionSync]]:  # noqa: F811
    """Two nodes' lists on one shared log, synced only when the test says (no tick), one
    change per page (every push, pull and copy takes several)."""
    monkeypatch.setattr(shared_suppression, "TICK", 3600.0)
    monkeypatch.setattr(shared_suppression, "PAGE", 1)
    syncs = [SuppressionSync(spool, SuppressionWriter(SuppressionList(tmp_path / f"{i}.db")))
             for i, spool in enumerate(two_spools)]
    yield syncs
    for sync in syncs:
        await sync.stop()
        sync.writes.close()
        sync.store.close()


def listed(sync: SuppressionSync) -> dict[str, str]:
    return {e.address: e.reason for e in sync.store.list()}


async def test_changes_to_one_address_on_two_nodes_end_alike_on_both(copies) -> None:
    """Node B removes an address, then node A (not yet having seen it) adds it again: both
    end with the add, the later change in the shared log, whichever order they sync in."""
    a, b = copies
    a.store.add("x@example.com", "all", "first")
    await a.start()
    await b.start()
    assert listed(b) == {"x@example.com": "first"}
    b.store.remove("x@example.com")
    a.store.add("x@example.com", "all", "again")
    await b.sync()  # the removal goes into the log first
    await a.sync()  # then the add: node A applies the removal, then its own add
    await b.sync()
    assert listed(a) == listed(b) == {"x@example.com": "again"}
    # and the other way round: an add, then a removal made elsewhere
    a.store.add("y@example.com", "marketing", "a's")
    b.store.add("y@example.com", "marketing", "b's")
    b.store.remove("y@example.com")
    await a.sync()
    await b.sync()
    await a.sync()
    assert listed(a) == listed(b) == {"x@example.com": "again"}


async def test_a_node_away_longer_than_the_log_copies_the_whole_list(copies) -> None:
    a, b = copies
    a.store.add("x@example.com", "all")
    a.store.add("y@example.com", "all")
    await a.start()
    await b.start()
    await b.stop()  # node B goes away
    a.store.remove("x@example.com")
    a.store.add("z@example.com", "all")
    await a.sync()
    assert await a.spool.trim_suppressions(0.0) > 0  # the log no longer has those changes
    await b.start()
    assert set(listed(b)) == {"y@example.com", "z@example.com"}


async def test_a_node_cut_off_keeps_its_copy_and_catches_up(tmp_path, sink, pg_schema,  # noqa: F811
                                                             caplog):
    proxy = await TCPProxy("127.0.0.1", 5432).start()
    a = await start_node(node_text(tmp_path, sink.port, pg_schema, "node-a"))
    b = await start_node(node_text(tmp_path, sink.port, pg_schema, "node-b").replace(
        "127.0.0.1:5432", f"127.0.0.1:{proxy.port}"))
    try:
        await a.operations.suppress("before@example.com", "all", "", who=OPERATOR)
        await until(lambda: b.feedback.suppression.check_one("before@example.com"),
                    what="node A's entry on node B")
        proxy.cut()
        await a.operations.suppress("during@example.com", "all", "", who=OPERATOR)
        b.feedback.suppression.add("local@example.com", "all", "5.1.1", "bounce")
        await until(lambda: "suppression list not synced" in caplog.text,
                    what="node B's sync failing")
        assert b.feedback.suppression.check_one("before@example.com")  # its copy still works
        assert b.feedback.suppression.check_one("during@example.com") is None
        await proxy.start()
        await until(lambda: b.feedback.suppression.check_one("during@example.com"),
                    what="node B catching up")
        await until(lambda: a.feedback.suppression.check_one("local@example.com"),
                    what="node B's change made while cut off, on node A")
    finally:
        await a.stop()
        await asyncio.wait_for(b.stop(), 30)
