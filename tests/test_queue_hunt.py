"""Operator queue control at its edges, through the real CLI against a running node."""

from __future__ import annotations

import asyncio
import json
import time

from postlane.policy.intake import RcptIn
from tests.conftest import OPERATOR, config_text, message, records
from tests.support.pg import pg_schema  # noqa: F401  (fixture)
from tests.support.waiting import until
from tests.test_cli_ops import run_cli
from tests.test_operator_trail import GREY, deferred_across, greylisted_pair


def _cli(node, tmp_path):
    """``postlane`` with its arguments against ``node``'s API and token: (code, out, err)."""
    def cli(*args: str):
        return run_cli(*args, "--url", f"http://127.0.0.1:{node.api.port}",
                       "--token-file", str(tmp_path / "api-token"))
    return cli


async def test_an_action_whose_filter_matches_nothing_says_so_and_exits_1(
        tmp_path, sink, make_node):
    """A filter (or ``--all``) that selects no recipient the action can take did nothing: it
    printed "held: 0 recipients of 0 messages" and exited 0 (``delete --yes`` too: "deleted:
    0", exit 0, while ``delete`` without ``--yes`` said "nothing to delete", exit 1), so a
    script could not tell a mistyped sender pattern from a done hold."""
    node = await make_node(config_text(tmp_path, sink.port))

    cli = _cli(node, tmp_path)

    await node.operations.pause("bulk", who=OPERATOR)
    qid = await node.intake.submit("news@example.com", [RcptIn("a@example.com")],
                                   message("offer", cls="marketing"))
    for action, words, extra in (("hold", "nothing held", ()),
                                 ("release", "nothing released", ()),
                                 ("retry", "nothing retried", ()),
                                 ("delete", "nothing deleted", ("--yes",))):
        code, out, err = await cli("queue", action, "--sender", "nobody@*", *extra)
        assert code == 1 and f"{words}: no " in err and "0 recipients" not in out, \
            (action, code, out, err)
        code, out, err = await cli("queue", action, "--sender", "nobody@*", "--json", *extra)
        assert code == 1 and json.loads(out)["recipients"] == 0, (action, out, err)
    code, out, err = await cli("queue", "release", "--all")  # nothing is held
    assert code == 1 and "nothing released: no held recipient matches" in err, (out, err)
    code, out, err = await cli("queue", "hold", "--all", "--dry-run", "--sender", "nobody@*")
    assert code == 0 and out.strip() == "would be held: 0 recipients of 0 messages", err
    code, out, err = await cli("queue", "hold", "--all")  # something to do: done, exit 0
    assert code == 0 and out.strip() == "held: 1 recipients of 1 messages", err
    code, out, err = await cli("queue", "hold", "--all")  # the same again: nothing left to hold
    assert code == 1 and "nothing held: no queued or deferred recipient matches" in err, err
    assert [r.msg.id for r in node.scheduler.recipients()] == [qid]


async def test_an_action_by_id_names_the_recipients_it_left_on_the_wire(
        tmp_path, sink, make_node):
    """A message with one recipient mid-delivery and others waiting: ``delete Q --yes`` said
    "deleted: 2 recipients of 1 messages", exit 0, with no word of the third, which was then
    delivered after the "successful" delete. The recipients on the wire are named: (``Q: 1
    recipient(s) being delivered now: will be deleted when …``, tests/test_pending_action.py)."""
    gate, data = asyncio.Event(), sink.handle_DATA

    async def held_up(*args):  # a delivery stays under way until the gate opens
        await gate.wait()
        return await data(*args)

    sink.handle_DATA = held_up
    text = config_text(tmp_path, sink.port, max_out=1).replace(
        "[relay]\n", "[relay]\nmax_recipients_per_transaction = 1\n")
    node = await make_node(text)

    cli = _cli(node, tmp_path)

    qid = await node.intake.submit("notices@example.com",
                                   [RcptIn(f"{n}@example.com") for n in "abc"],
                                   message("policy", cls="policy-documents"))
    await until(lambda: node.scheduler.in_flight(qid) == 1)
    on_wire = 1  # one connection, one recipient a transaction: the others wait
    code, out, err = await cli("queue", "delete", qid, "--yes", "--json")
    got = json.loads(out)
    assert got["recipients"] == 3 - on_wire, (out, err)
    assert code == 0 and not got["untouched"] and got["pending"] == {
        qid: f"{on_wire} recipient(s) being delivered now: will be deleted when the delivery"
             " in progress ends, unless it delivers"}, (out, err)
    assert got["pending_recipients"] == on_wire
    code, out, err = await cli("queue", "retry", qid)  # a retry has nothing to wait for
    assert code == 1 and f"{qid}: being delivered now" in err, (out, err)
    gate.set()
    await sink.wait_for(on_wire)
    await until(lambda: not node.scheduler.in_flight(qid))


async def test_queue_list_of_thousands_of_ids(tmp_path, sink, make_node):
    """``queue list`` with 3000 queue ids (a script's list, most of them delivered since)
    failed with "InvalidURL: URL component 'query' too long (unexpected; … for a bug report)":
    the ids went into one GET's query string. They are asked in parts, the answer is one."""
    node = await make_node(config_text(tmp_path, sink.port))
    await node.operations.pause("bulk", who=OPERATOR)
    queued = [await node.intake.submit("news@example.com", [RcptIn(f"m{i}@example.com")],
                                       message(f"offer {i}", cls="marketing"))
              for i in range(3)]
    gone = [f"1A250C22AD36B92C167{i:05d}" for i in range(3000)]
    ids = [gone[0], queued[2], *gone[1:1500], queued[0], *gone[1500:], queued[1], queued[0]]
    code, out, err = await run_cli("queue", "list", "--json", *ids, "--url",
                                   f"http://127.0.0.1:{node.api.port}",
                                   "--token-file", str(tmp_path / "api-token"))
    assert code == 0, err
    listed = json.loads(out)
    assert (listed["total_messages"], listed["total_recipients"]) == (3, 3)
    assert [m["queue_id"] for m in listed["messages"]] == queued  # oldest first
    code, out, err = await run_cli("queue", "list", "--json", "--limit", "2", *ids, "--url",
                                   f"http://127.0.0.1:{node.api.port}",
                                   "--token-file", str(tmp_path / "api-token"))
    listed = json.loads(out)
    assert code == 0 and listed["total_messages"] == 3, err
    assert [m["queue_id"] for m in listed["messages"]] == queued[:2]


async def test_an_action_by_id_on_another_node_s_message_says_where_it_is(
        tmp_path, sink, pg_schema):  # noqa: F811
    """In a cluster, ``queue hold Q`` sent to a node for a message another node has claimed
    (deferred there) said "Q: none of its recipients is queued or deferred", which is false:
    it is deferred, on the other node. ``retry Q`` said the same and exited 1, though the
    owner retries it (a retry is asked of every node). Now the id is named as claimed by
    another node (hold, release, delete), and a retry of it is done, exit 0."""
    a, b, _ = await greylisted_pair(tmp_path, sink, pg_schema)
    try:
        [notice] = await deferred_across(a, b, f"r0@{GREY}")
        owner, other = (a, b) if any(r.msg.id == notice for r in a.scheduler.recipients()) \
            else (b, a)
        api = ["--url", f"http://127.0.0.1:{other.api.port}", "--token-file",
               str(tmp_path / "api-token")]
        for args in (("hold", notice), ("delete", notice, "--yes")):
            code, out, err = await run_cli("queue", *args, "--json", *api)
            assert code == 1 and json.loads(out)["elsewhere"] == 1, (args, out, err)
            assert f"{notice}: claimed by another node of the cluster" in err, (args, err)
            assert "none of its recipients" not in err, (args, err)
        sink.rcpt_replies[f"r0@{GREY}"] = ["250 2.1.5 ok"]
        code, out, err = await run_cli("queue", "retry", notice, *api)
        assert code == 0 and "those nodes retry them now" in out and not err, (out, err)
        await sink.wait_for(1)
    finally:
        await a.stop()
        await b.stop()


async def test_a_held_message_outlives_its_expiry_and_is_bounced_only_when_released(
        tmp_path, sink, make_node):
    """A hold is never lost nor expired unseen: past its class's expiry, held with its pool
    running, the message stays listed as held, nothing goes out; released, it is bounced at
    once (a DSN to the sender, a ``b`` record message-expired), never delivered."""
    text = config_text(tmp_path, sink.port)
    cut = text.index("[classes.marketing]")
    text = text[:cut] + text[cut:].replace('expiry = "1h"', 'expiry = "2s"', 1)
    node = await make_node(text)

    cli = _cli(node, tmp_path)

    await node.operations.pause("bulk", who=OPERATOR)
    qid = await node.intake.submit("news@example.com", [RcptIn("a@example.com")],
                                   message("offer", cls="marketing"))
    code, out, err = await cli("queue", "hold", qid)
    assert code == 0, err
    [msg] = {r.msg.id: r.msg for r in node.scheduler.recipients()}.values()
    await node.operations.resume("bulk", who=OPERATOR)
    await until(lambda: time.time() > msg.expire_at + 1, what="the hold outlasts the expiry")
    code, out, err = await cli("queue", "list", "--state", "held", "--json")
    assert [m["queue_id"] for m in json.loads(out)["messages"]] == [qid], (out, err)
    assert sink.arrivals == []
    code, out, err = await cli("queue", "release", qid)
    assert code == 0 and out.strip() == "released: 1 recipients of 1 messages", err
    [dsn] = await sink.wait_for(1)
    assert dsn.rcpts == ["news@example.com"] and b"Status: 4.4.7" in dsn.data
    await node.stop()
    [bounce] = [r for r in records(tmp_path) if r["type"] == "b"]
    assert (bounce["rcpt"], bounce["bounceCat"]) == ("a@example.com", "message-expired")


async def test_a_retry_right_after_a_throttling_deferral_goes_out_now(
        tmp_path, sink, make_node):
    """A destination answered 421 (its lane waits ``backoff_retry``, 10 minutes, before the
    next connection); the operator fixes things and runs ``queue retry``: it said "retried
    now: 1 recipients of 1 messages", yet nothing went out for 10 minutes, the lane still
    waiting. The lanes of the recipients it retries no longer wait (their slower backoff
    pace stays)."""
    sink.rcpt_replies["a@example.com"] = ["421 4.7.0 try again later"]
    text = config_text(tmp_path, sink.port, '[destinations.example]\n'
                       'domains = ["example.com"]\nbackoff_retry = "10m"\n')
    node = await make_node(text.replace('retry = ["1s", "1s", "2s"]', 'retry = ["1h"]'))
    qid = await node.intake.submit("notices@example.com", [RcptIn("a@example.com")],
                                   message("policy", cls="policy-documents"))
    await until(lambda: any(r.state.value == "deferred" for r in node.scheduler.message(qid)))
    [lane] = [lane for lane in node.scheduler.lanes.values() if lane.domain == "example.com"]
    assert lane.suspended_until > time.time() + 60, "the 421 makes the lane wait"
    sink.rcpt_replies["a@example.com"] = ["250 2.1.5 ok"]
    code, out, err = await run_cli("queue", "retry", qid, "--url",
                                   f"http://127.0.0.1:{node.api.port}",
                                   "--token-file", str(tmp_path / "api-token"))
    assert code == 0 and out.strip() == "retried now: 1 recipients of 1 messages", err
    [got] = await sink.wait_for(1)
    assert got.rcpts == ["a@example.com"]


async def test_the_null_sender_is_selected_as_the_listing_prints_it(tmp_path, sink, make_node):
    """The listing prints a bounce's empty sender as ``<>``, yet ``--sender '<>'`` matched
    nothing, and ``--sender ''`` (JSON's ``"sender": ""``, or a script's unset variable) was
    no filter at all: ``queue delete --sender '' --pool bulk --yes`` deleted the whole pool's
    mail, not its bounces. ``<>`` and ``''`` select the null sender, ``<a@b>`` is ``a@b``, and
    an empty ``--recipient`` (no address is empty) is refused, nothing done."""
    node = await make_node(config_text(tmp_path, sink.port))
    cli = _cli(node, tmp_path)
    await node.operations.pause("bulk", who=OPERATOR)
    news = await node.intake.submit("news@example.com", [RcptIn("a@example.com")],
                                    message("offer", cls="marketing"))
    bounce = await node.intake.submit("", [RcptIn("b@example.com")],
                                      message("returned mail", cls="marketing"))
    for null in ("<>", ""):
        code, out, err = await cli("queue", "list", "--sender", null, "--json")
        assert code == 0 and [m["queue_id"] for m in json.loads(out)["messages"]] == [bounce], \
            (null, out, err)
    code, out, err = await cli("queue", "hold", "--sender", "<NEWS@example.com>")
    assert code == 0 and out.strip() == "held: 1 recipients of 1 messages", (out, err)
    code, out, err = await cli("queue", "delete", "--recipient", "", "--pool", "bulk", "--yes")
    assert code == 1 and "--recipient" in err and "empty" in err and not out, (out, err)
    code, out, err = await cli("queue", "delete", "--sender", "", "--pool", "bulk", "--yes")
    assert code == 0 and out.strip() == "deleted: 1 recipients of 1 messages", (out, err)
    assert {r.msg.id for r in node.scheduler.recipients()} == {news}


async def test_an_internationalised_domain_is_selected_in_either_form(tmp_path, sink, make_node):
    """Lanes are named in A-labels (``xn--bcher-kva.example``) and ``pause --domain
    bücher.example`` took the U-label, but ``queue list --domain bücher.example``, ``retry
    bulk --domain bücher.example`` and ``purge bulk bücher.example`` answered "no lane to
    'bücher.example' (did you mean 'xn--bcher-kva.example'?)", and ``--recipient
    '*@xn--bcher-kva.example'`` (the lane's name) matched nothing of ``i@bücher.example``.
    Either form names the one domain."""
    node = await make_node(config_text(tmp_path, sink.port))
    cli = _cli(node, tmp_path)
    await node.operations.pause("bulk", who=OPERATOR)
    qid = await node.intake.submit("news@example.com", [RcptIn("i@bücher.example")],
                                   message("offer", cls="marketing"))
    for args in (("--domain", "bücher.example"), ("--domain", "BÜCHER.example"),
                 ("--domain", "xn--bcher-kva.example"),
                 ("--recipient", "*@xn--bcher-kva.example"),
                 ("--recipient", "I@xn--bcher-kva.example"), ("--recipient", "i@bücher.example")):
        code, out, err = await cli("queue", "list", *args, "--json")
        assert code == 0 and [m["queue_id"] for m in json.loads(out)["messages"]] == [qid], \
            (args, out, err)
    code, out, err = await cli("retry", "bulk", "--domain", "bücher.example")
    assert code == 0 and out.strip() == "0 recipients retried now", (out, err)
    code, out, err = await cli("purge", "bulk", "bücher.example", "--yes")
    assert code == 0 and out.strip() == "1 recipients purged", (out, err)
    assert not list(node.scheduler.recipients())


async def test_a_resume_names_the_pauses_still_holding_the_mail(tmp_path, sink, make_node):
    """A lane paused on its own stays paused when its pool is resumed (and a pool's pause
    outlasts a resume of one lane), yet ``resume bulk`` said only "resumed bulk" and ``status``
    showed the pool "running" while its mail to example.com stayed queued. The resume names
    what still holds the mail, with the command that lets it go, and ``status`` the paused
    lanes of a running pool."""
    node = await make_node(config_text(tmp_path, sink.port))
    cli = _cli(node, tmp_path)
    code, out, err = await cli("pause", "bulk")
    assert code == 0, err
    code, out, err = await cli("resume", "bulk", "--domain", "example.com")
    assert code == 0 and out.strip() == ("resumed bulk to example.com; pool bulk stays paused"
                                         " (postlane resume bulk)"), (out, err)
    code, out, err = await cli("pause", "bulk", "--domain", "example.com")
    assert code == 0, err
    code, out, err = await cli("resume", "bulk", "--json")
    assert code == 0 and json.loads(out)["still_paused"] == ["example.com"], (out, err)
    await node.intake.submit("news@example.com", [RcptIn("a@example.com")],
                             message("offer", cls="marketing"))
    code, out, err = await cli("status", "--json")
    [bulk] = [p for p in json.loads(out)["status"]["pools"] if p["pool"] == "bulk"]
    assert (bulk["paused"], bulk["paused_lanes"]) == (False, ["example.com"]), bulk
    code, out, err = await cli("status")
    assert code == 0 and "running, lanes paused: example.com" in out, out
    code, out, err = await cli("resume", "bulk")
    assert code == 0 and out.strip() == ("resumed bulk; still paused: its lanes to example.com"
                                         " (postlane resume bulk --domain DOMAIN)"), (out, err)
    code, out, err = await cli("resume", "bulk", "--domain", "example.com")
    assert code == 0 and out.strip() == "resumed bulk to example.com", (out, err)
    await sink.wait_for(1)


async def test_a_retry_or_release_into_a_paused_lane_says_the_mail_waits(
        tmp_path, sink, make_node):
    """``queue retry``, ``retry POOL`` and ``queue release`` of mail whose lane is paused said
    "retried now: 1 recipients" (or "released") and nothing went out: the pause holds it. The
    answer counts those that wait for a resume (``paused``) and says so."""
    sink.rcpt_replies["a@example.com"] = ["451 4.7.1 greylisted"]
    text = config_text(tmp_path, sink.port).replace('retry = ["1s", "2s"]', 'retry = ["1h"]')
    node = await make_node(text)
    cli = _cli(node, tmp_path)
    qid = await node.intake.submit("news@example.com", [RcptIn("a@example.com")],
                                   message("offer", cls="marketing"))
    await until(lambda: any(r.state.value == "deferred" for r in node.scheduler.message(qid)))
    await node.operations.pause("bulk", "example.com", who=OPERATOR)
    code, out, err = await cli("queue", "retry", qid)
    assert code == 0 and out.splitlines() == [
        "retried now: 1 recipients of 1 messages",
        "1 of them wait in paused lanes until a resume (postlane queues)"], (out, err)
    code, out, err = await cli("queue", "hold", qid)
    assert code == 0, err
    code, out, err = await cli("queue", "release", qid, "--json")
    assert code == 0 and json.loads(out)["paused"] == 1, (out, err)
    await node.operations.resume("bulk", "example.com", who=OPERATOR)
    await until(lambda: any(r.state.value == "deferred" for r in node.scheduler.message(qid))
                and sink.rcpt_attempts["a@example.com"] == 2)
    await node.operations.pause("bulk", who=OPERATOR)
    code, out, err = await cli("retry", "bulk")
    assert code == 0 and out.strip() == ("1 recipients retried now; 1 of them wait in paused"
                                         " lanes until a resume (postlane queues)"), (out, err)


async def test_an_unconfirmed_delete_of_mail_other_nodes_hold_says_where_it_is(
        tmp_path, sink, pg_schema):  # noqa: F811
    """In a cluster, ``queue delete --recipient X`` (asked, not ``--yes``) sent to a node while
    another node has claimed X's mail said "nothing to delete: no queued recipient matches",
    though it matches, on the other node; with ``--yes`` the same delete said "1 more match on
    other nodes". It says where the mail is, exit 1 (nothing was deleted), and ``--json``
    prints the count (``recipients`` 0, ``elsewhere`` 1), as the docs say of ``--json``."""
    a, b, _ = await greylisted_pair(tmp_path, sink, pg_schema)
    try:
        [notice] = await deferred_across(a, b, f"r0@{GREY}")
        other = b if any(r.msg.id == notice for r in a.scheduler.recipients()) else a
        api = ["--url", f"http://127.0.0.1:{other.api.port}", "--token-file",
               str(tmp_path / "api-token")]
        code, out, err = await run_cli("queue", "delete", "--recipient", f"r0@{GREY}", *api)
        assert code == 1 and not out and "nothing to delete on this node: 1 more match on" \
            " other nodes of the cluster" in err, (out, err)
        code, out, err = await run_cli("queue", "delete", "--recipient", f"r0@{GREY}",
                                       "--json", *api)
        got = json.loads(out)
        assert code == 1 and (got["recipients"], got["elsewhere"]) == (0, 1), (out, err)
        code, out, err = await run_cli("queue", "delete", "--sender", "nobody@*", "--json",
                                       *api)
        assert code == 1 and json.loads(out)["recipients"] == 0, (out, err)
        assert "nothing to delete: no queued recipient matches" in err, err
    finally:
        await a.stop()
        await b.stop()


async def test_a_listing_cut_by_limit_says_so_and_an_empty_name_is_told(
        tmp_path, sink, make_node):
    """``queue list --limit 1`` of three messages printed "3 messages, 3 recipients" over one
    row, with no word of the two left out; ``purge bulk ''`` (a script's unset variable) and
    ``pause ''`` answered a bare "Not Found (HTTP 404)": the empty name made another URL."""
    node = await make_node(config_text(tmp_path, sink.port))
    cli = _cli(node, tmp_path)
    await node.operations.pause("bulk", who=OPERATOR)
    for i in range(3):
        await node.intake.submit("news@example.com", [RcptIn(f"m{i}@example.com")],
                                 message(f"offer {i}", cls="marketing"))
    code, out, err = await cli("queue", "list", "--limit", "1")
    assert code == 0 and "the oldest 1 of 3 messages shown (--limit)" in out, (out, err)
    code, out, err = await cli("queue", "list")
    assert code == 0 and "shown (--limit)" not in out, out
    for args in (("purge", "bulk", "", "--yes"), ("purge", "", "example.com", "--yes"),
                 ("pause", ""), ("resume", ""), ("retry", "")):
        code, out, err = await cli(*args)
        assert code == 1 and "Not Found" not in err and "empty" in err, (args, out, err)
    assert len(list(node.scheduler.recipients())) == 3
