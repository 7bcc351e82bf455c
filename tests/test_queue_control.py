"""`postlane queue …` against a real node with a real backlog: list with filters, show a message
with its attempts, hold (kept across a restart) and release, retry by filter, deferrals by
reason, qshape, delete with a DSN; mistyped names are errors."""

from __future__ import annotations

import asyncio
import json

from postlane.policy.intake import RcptIn
from tests.conftest import OPERATOR, config_text, message, records
from tests.support.waiting import until as _until
from tests.test_cli_ops import run_cli

GREY = "grey.example"


async def test_queue_tools_on_a_real_backlog(tmp_path, sink, make_node):
    for i in range(3):
        sink.rcpt_replies[f"r{i}@{GREY}"] = [f"451 4.7.1 <r{i}@{GREY}>: greylisted"]
    text = config_text(tmp_path, sink.port, f'"{GREY}" = "127.0.0.1:{sink.port}"\n')
    text = text.replace('retry = ["1s", "1s", "2s"]', 'retry = ["1h"]')
    node = await make_node(text)

    def cli(*args: str):
        return run_cli(*args, "--url", f"http://127.0.0.1:{node.api.port}",
                       "--token-file", str(tmp_path / "api-token"))

    async def listed(*args: str) -> dict:
        code, out, err = await cli("queue", "list", "--json", *args)
        assert code == 0, err
        return json.loads(out)

    await node.operations.pause("bulk", who=OPERATOR)  # the campaign waits: a backlog
    campaign = [await node.intake.submit("news@example.com", [RcptIn(f"m{i}@example.com")],
                                         message(f"offer {i}", cls="marketing",
                                                 extra=f"X-Correlation-ID: camp-{i}\r\n"))
                for i in range(5)]
    notices = [await node.intake.submit("notices@example.com", [RcptIn(f"r{i}@{GREY}")],
                                        message("policy", cls="policy-documents"))
               for i in range(3)]
    await _until(lambda: sum(1 for r in node.scheduler.recipients()
                             if r.state.value == "deferred") == 3)

    everything = await listed()
    assert (everything["total_messages"], everything["total_recipients"]) == (8, 8)
    assert [m["queue_id"] for m in everything["messages"]] == campaign + notices  # oldest first
    assert {m["queue_id"] for m in (await listed("--state", "deferred"))["messages"]} == \
        set(notices)
    assert (await listed("--class", "marketing", "--older-than", "0s"))["total_messages"] == 5
    assert (await listed("--correlation-id", "camp-3"))["messages"][0]["queue_id"] == campaign[3]
    assert (await listed("--recipient", "r1@*"))["messages"][0]["queue_id"] == notices[1]
    assert (await listed("--sender", "news@*", "--younger-than", "1h"))["total_messages"] == 5
    code, _, err = await cli("queue", "list", "--pool", "bulkk")
    assert code == 1 and "no pool named 'bulkk' (did you mean 'bulk'?)" in err
    code, _, err = await cli("queue", "list", "--domain", "exmple.com")
    assert code == 1 and "no lane to 'exmple.com' in any pool (did you mean 'example.com'?)" \
        in err
    code, _, err = await cli("purge", "bulk", "exmple.com", "--yes")
    assert code == 1 and "no lane to 'exmple.com'" in err, "a typo is not '0 purged'"

    code, out, err = await cli("queue", "show", notices[0], "--json")
    assert code == 0, err
    shown = json.loads(out)
    assert ["Subject", "policy"] in shown["headers"]
    assert shown["recipients"][0]["state"] == "deferred"
    await node.flush_evidence()
    code, out, err = await cli("queue", "show", notices[0], "--json")
    assert any("greylisted" in a["reply"] for a in json.loads(out)["attempts"])
    code, out, err = await cli("queue", "show", notices[0])
    assert code == 0 and "greylisted" in out and "Subject: policy" in out

    code, out, err = await cli("queue", "deferrals", "--json")
    [reason] = json.loads(out)["reasons"]
    assert reason["recipients"] == 3 and reason["reason"] == "451 4.7.1 …: greylisted"
    assert reason["domains"] == {GREY: 3}
    code, out, err = await cli("queue", "shape", "--json")
    shape = json.loads(out)
    assert shape["rows"][0] == {"key": "TOTAL", "total": 8, "counts": [8, 0, 0, 0, 0, 0, 0, 0]}
    assert {r["key"]: r["total"] for r in shape["rows"][1:]} == {"example.com": 5, GREY: 3}
    code, out, err = await cli("queue", "shape", "--by", "class")
    assert code == 0 and "policy-documents" in out and "<5m" in out

    # hold one message of the campaign; it stays held across a restart
    code, out, err = await cli("queue", "hold", campaign[0])
    assert code == 0 and out.strip() == "held: 1 recipients of 1 messages"
    code, out, _ = await cli("queue", "hold", "--all", "--dry-run", "--state", "queued")
    assert out.strip() == "would be held: 4 recipients of 4 messages"
    code, _, err = await cli("queue", "hold")
    assert code == 1 and "say which messages" in err
    await node.stop()
    node = await make_node(text)
    held = await listed("--state", "held")
    assert [m["queue_id"] for m in held["messages"]] == [campaign[0]]
    await node.operations.resume("bulk", who=OPERATOR)
    await sink.wait_for(4)
    assert not sink.for_rcpt("m0@example.com")
    assert [m["queue_id"] for m in (await listed("--class", "marketing"))["messages"]] == \
        [campaign[0]]
    code, out, err = await cli("queue", "release", campaign[0])
    assert code == 0 and out.strip() == "released: 1 recipients of 1 messages"
    await sink.wait_for(5)
    assert sink.for_rcpt("m0@example.com")

    # retry by filter: the destination now accepts r0
    sink.rcpt_replies[f"r0@{GREY}"] = ["250 2.1.5 ok"]
    code, out, _ = await cli("queue", "retry", "--domain", GREY, "--dry-run")
    assert out.strip() == "would be retried now: 3 recipients of 3 messages"
    code, out, err = await cli("queue", "retry", "--recipient", f"r0@{GREY}")
    assert code == 0 and out.strip() == "retried now: 1 recipients of 1 messages"
    await sink.wait_for(6)
    assert sink.for_rcpt(f"r0@{GREY}")

    # delete the rest with a DSN to the sender: asks first (no terminal: refused), then --yes
    code, _, err = await cli("queue", "delete", "--domain", GREY, "--dsn")
    assert code == 1 and "nothing deleted (2 recipients match" in err
    code, out, err = await cli("queue", "delete", "--domain", GREY, "--dsn", "--yes", "--json")
    assert code == 0 and json.loads(out)["recipients"] == 2
    dsns = [a for a in await sink.wait_for(8) if a.rcpts == ["notices@example.com"]]
    # the sender learns what happened, not who did it
    assert len(dsns) == 2 and all(b"deleted by operator" in a.data for a in dsns)
    assert not any(b"operator admin" in a.data for a in dsns)
    assert (await listed())["total_messages"] == 0
    await node.stop()
    deleted = [r for r in records(tmp_path) if r["dsnDiag"] == "deleted by operator admin"]
    assert sorted(r["rcpt"] for r in deleted) == [f"r1@{GREY}", f"r2@{GREY}"]
    assert {r["type"] + "/" + r["bounceCat"] + "/" + r["operator"] for r in deleted} == {
        "b/purged/admin"}


async def test_an_action_on_a_queue_id_it_cannot_act_on_says_why_and_exits_1(
        tmp_path, sink, make_node):
    """By queue id, an id the action left alone is named with the reason (not in the queue:
    delivered or never queued; being delivered now, for a release or retry; nothing in the state
    the action takes)
    and the command exits 1; it was "held: 0 recipients of 0 messages", exit 0, for a typo,
    for a message just delivered and for one mid-delivery alike."""
    gate, data = asyncio.Event(), sink.handle_DATA

    async def held_up(*args):  # a delivery stays under way until the gate opens
        await gate.wait()
        return await data(*args)

    sink.handle_DATA = held_up
    node = await make_node(config_text(tmp_path, sink.port))

    def cli(*args: str):
        return run_cli(*args, "--url", f"http://127.0.0.1:{node.api.port}",
                       "--token-file", str(tmp_path / "api-token"))

    code, out, err = await cli("queue", "hold", "NOSUCHID")
    assert code == 1 and "NOSUCHID: not in the queue" in err, (out, err)
    assert "audit show --queue-id NOSUCHID" in err

    qid = await node.intake.submit("notices@example.com", [RcptIn("a@example.com")],
                                   message("policy", cls="policy-documents"))
    await _until(lambda: node.scheduler.in_flight(qid) == 1)
    code, out, err = await cli("queue", "release", qid, "--json")
    assert code == 1 and json.loads(out)["untouched"] == {qid: "being delivered now"}, err
    assert f"{qid}: being delivered now" in err
    # a hold waits for the delivery to end (tests/test_pending_action.py)
    code, out, err = await cli("queue", "hold", qid, "--json")
    assert code == 0 and not json.loads(out)["untouched"] and qid in json.loads(out)["pending"]
    gate.set()
    await sink.wait_for(1)
    await _until(lambda: not node.scheduler.in_flight(qid))
    await node.spool.flush()
    for action in ("hold", "release", "retry"):  # just delivered
        code, out, err = await cli("queue", action, qid)
        assert code == 1 and f"{qid}: not in the queue" in err, (action, out, err)
    code, out, err = await cli("queue", "delete", qid, "--yes")
    assert code == 1 and f"{qid}: not in the queue" in err
    # without --yes and nothing to delete: it said "nothing deleted (0 recipients match;
    # confirm, or pass --yes)", as if --yes would delete something
    code, out, err = await cli("queue", "delete", qid)
    assert code == 1 and f"{qid}: not in the queue" in err and "--yes" not in err, err

    await node.operations.pause("bulk", who=OPERATOR)
    waiting = await node.intake.submit("news@example.com", [RcptIn("m@example.com")],
                                       message("offer", cls="marketing"))
    code, out, err = await cli("queue", "release", waiting, "NOSUCHID")
    assert code == 1 and f"{waiting}: none of its recipients is held" in err, err
    assert "NOSUCHID: not in the queue" in err
    code, out, err = await cli("queue", "hold", waiting, "NOSUCHID")
    assert code == 1 and "held: 1 recipients of 1 messages" in out and "NOSUCHID" in err
    code, out, err = await cli("queue", "release", waiting)
    assert code == 0 and "released: 1 recipients of 1 messages" in out and not err, err


async def test_queue_list_and_deferrals_print_replies_and_addresses_as_they_are(
        tmp_path, sink, make_node):
    """A remote reply, an address are text, not rich markup: ``[mx.example.net]`` vanished from
    ``queue list`` and ``queue deferrals``, and a ``[/ip]`` in a reply made both crash with
    ``MarkupError`` (exit 1 and a traceback), so the operator could not list the queue."""
    reply = "451 4.7.1 try later [/ip] from [mx.grey.example] [bold]"
    sink.rcpt_replies[f"r0@{GREY}"] = [reply]
    text = config_text(tmp_path, sink.port, f'"{GREY}" = "127.0.0.1:{sink.port}"\n')
    text = text.replace('retry = ["1s", "1s", "2s"]', 'retry = ["1h"]')
    node = await make_node(text)
    await node.intake.submit("notices@example.com", [RcptIn(f"r0@{GREY}")],
                             message("policy", cls="policy-documents"))
    await _until(lambda: any(r.state.value == "deferred" for r in node.scheduler.recipients()))
    target = ("--url", f"http://127.0.0.1:{node.api.port}",
              "--token-file", str(tmp_path / "api-token"))
    code, out, err = await run_cli("queue", "list", *target)
    assert code == 0, err
    assert reply in out
    code, out, err = await run_cli("queue", "deferrals", *target)
    assert code == 0, err
    assert "[/ip] from [mx.grey.example] [bold]" in out


async def test_queue_show_list_and_deferrals_escape_terminal_controls(tmp_path, sink, make_node):
    """A remote reply and a header field come from strangers: their ESC sequences (clear the
    screen, set the window title) reached the operator's terminal raw from ``queue show``,
    ``list`` and ``deferrals``; they are shown escaped (``\\x1b``), as ``audit show`` does."""
    sink.rcpt_replies[f"r0@{GREY}"] = ["451 4.7.1 grey \x1b]0;owned\x07 \x1b[2J done"]
    text = config_text(tmp_path, sink.port, f'"{GREY}" = "127.0.0.1:{sink.port}"\n')
    text = text.replace('retry = ["1s", "1s", "2s"]', 'retry = ["1h"]')
    node = await make_node(text)
    qid = await node.intake.submit(
        "n@example.com", [RcptIn(f"r0@{GREY}")],
        message("Pr\u00e4mie", cls="policy-documents", extra="X-Esc: a\x1b]0;t\x07b\r\n"))
    await _until(lambda: any(r.state.value == "deferred" for r in node.scheduler.recipients()))
    await node.flush_evidence()
    target = ("--url", f"http://127.0.0.1:{node.api.port}",
              "--token-file", str(tmp_path / "api-token"))
    for args in (("show", qid), ("list",), ("deferrals",)):
        code, out, err = await run_cli("queue", *args, *target)
        assert code == 0, err
        assert "\x1b" not in out and "\x07" not in out, args
        assert "grey \\x1b]0;owned\\x07 \\x1b[2J done" in out, args
    code, out, _ = await run_cli("queue", "show", qid, *target)
    assert "X-Esc: a\\x1b]0;t\\x07b" in out and "Subject: Pr\u00e4mie" in out


async def test_queue_show_of_a_malformed_id_says_there_is_no_such_message(tmp_path, sink,
                                                                          make_node):
    """``queue show .`` fetched the queue listing (the HTTP client folds "." and "..") and
    failed with ``KeyError: 'queue_id'`` (with ``--json`` it printed the whole queue as if it
    were the message); ``a/b`` and ``..`` gave a bare "Not Found"."""
    node = await make_node(config_text(tmp_path, sink.port))
    await node.operations.pause("bulk", who=OPERATOR)
    await node.intake.submit("news@example.com", [RcptIn("m0@example.com")],
                             message("offer", cls="marketing"))
    target = ("--url", f"http://127.0.0.1:{node.api.port}",
              "--token-file", str(tmp_path / "api-token"))
    for qid in (".", "..", "a/b", "../messages", "%2e"):
        for extra in ((), ("--json",)):
            code, out, err = await run_cli("queue", "show", qid, *extra, *target)
            assert code == 1 and out == "", (qid, out)
            assert f"no message {qid!r} in the queue" in err, (qid, err)


async def test_queue_show_keeps_the_bytes_of_a_header_that_is_not_utf8(tmp_path, sink,
                                                                      make_node):
    """A header field in Latin-1 (8-bit, not UTF-8) was shown as ``caf\ufffd``: the byte was
    lost; ``show`` gives it as ``\xe9``, UTF-8 and RFC 2047 words as they are."""
    node = await make_node(config_text(tmp_path, sink.port))
    await node.operations.pause("bulk", who=OPERATOR)
    data = (b"From: =?UTF-8?B?SsO8cmdlbg==?= <s@insurer.test>\r\nTo: a@example.com\r\n"
            b"Subject: Pr\xc3\xa4mie \xe2\x82\xac\r\nX-Latin: caf\xe9\r\n"
            b"X-Postlane-Class: marketing\r\n\r\nHi\r\n")
    qid = await node.intake.submit("s@insurer.test", [RcptIn("a@example.com")], data)
    target = ("--url", f"http://127.0.0.1:{node.api.port}",
              "--token-file", str(tmp_path / "api-token"))
    code, out, err = await run_cli("queue", "show", qid, *target)
    assert code == 0, err
    assert "X-Latin: caf\\xe9" in out and "\ufffd" not in out
    assert "Subject: Pr\u00e4mie \u20ac" in out
    assert "From: =?UTF-8?B?SsO8cmdlbg==?= <s@insurer.test>" in out
