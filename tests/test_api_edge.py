"""The management API and the SMTP edge, over real HTTP and SMTP on loopback: how an operator's
action came is on its every record, queue actions on many ids, a recipient domain with a
trailing dot, and large listings to a client that does not read."""

from __future__ import annotations

import io
import socket
import time
from pathlib import Path

from postlane.api.queue import ACTION_BODY, MAX_IDS
from postlane.feedback.suppression import Entry
from postlane.policy.intake import RcptIn
from tests.conftest import config_text, message, records
from tests.support.rawsmtp import session
from tests.support.waiting import until
from tests.test_api import api_client
from tests.test_operator_trail import audit


async def paused_campaign(node, tmp_path: Path, count: int) -> list[str]:
    """``count`` marketing messages kept queued in the paused bulk pool (one recipient each)."""
    async with api_client(node, tmp_path) as api:
        assert (await api.post("/api/v1/pools/bulk/pause")).json()["paused"] is True
    return [await node.intake.submit("news@example.com", [RcptIn(f"m{i}@example.com")],
                                     message(f"offer {i}", cls="marketing"))
            for i in range(count)]


async def test_delete_and_purge_records_say_how_the_action_came(tmp_path, sink, make_node):
    node = await make_node(config_text(tmp_path, sink.port))
    ids = await paused_campaign(node, tmp_path, 3)
    async with api_client(node, tmp_path) as api:
        resp = await api.post("/api/v1/queue/hold", json={"queue_ids": [ids[2]]})
        assert resp.json()["recipients"] == 1
        resp = await api.post("/api/v1/queue/delete", json={"queue_ids": [ids[0]]})
        assert resp.json()["recipients"] == 1
        resp = await api.post("/api/v1/pools/bulk/lanes/example.com/purge")
        assert resp.json()["purged"] == 2
    await node.flush_evidence()
    await node.stop()

    # every record of an operator's action carries the channel, the final "b" ones too
    ops = [r for r in records(tmp_path) if r["operator"]]
    assert sorted((r["type"], r["dsnDiag"], r["srcType"]) for r in ops if r["queueId"]) == [
        ("b", "deleted by operator admin", "api"), ("b", "purged by operator admin", "api"),
        ("b", "purged by operator admin", "api"), ("o", "held by operator admin", "api")]
    code, out, err = await audit(tmp_path, "show", "--queue-id", ids[0])
    assert code == 0, err
    assert "deleted by operator admin (via api)" in out
    code, out, _ = await audit(tmp_path, "show", "--queue-id", ids[1])
    assert "purged by operator admin (via api)" in out
    code, out, err = await audit(tmp_path, "verify")
    assert code == 0, out + err


async def test_queue_action_takes_back_the_ids_a_listing_gave(tmp_path, sink, make_node):
    node = await make_node(config_text(tmp_path, sink.port))
    ids = await paused_campaign(node, tmp_path, 10000)
    async with api_client(node, tmp_path) as api:
        listed = (await api.get("/api/v1/queue/messages", params={"limit": 100000})).json()
        named = [m["queue_id"] for m in listed["messages"]]
        assert sorted(named) == sorted(ids)
        resp = await api.post("/api/v1/queue/hold", json={"queue_ids": named})
        assert resp.status_code == 200, resp.text
        assert resp.json()["recipients"] == 10000 and resp.json()["untouched"] == {}


async def test_queue_action_limits_name_the_cap_and_other_routes_keep_theirs(
        tmp_path, sink, make_node):
    node = await make_node(config_text(tmp_path, sink.port))
    ids = await paused_campaign(node, tmp_path, 1)
    filler = [f"{i:024X}" for i in range(MAX_IDS - 1)]
    async with api_client(node, tmp_path) as api:
        # the cap itself, dry run: fits (each id not found is named, so none is silently lost)
        resp = await api.post("/api/v1/queue/hold",
                              json={"queue_ids": ids + filler, "dry_run": True})
        assert resp.status_code == 200, resp.text
        assert resp.json()["recipients"] == 1 and len(resp.json()["untouched"]) == MAX_IDS - 1
        # one id more: a 422 naming the cap
        resp = await api.post("/api/v1/queue/hold", json={"queue_ids": ids + filler + ["X"]})
        assert resp.status_code == 422 and str(MAX_IDS) in resp.json()["error"]
        # a body past the action's limit: 413 naming the limit and the way out
        big = b'{"queue_ids": ["' + b"A" * ACTION_BODY + b'"]}'
        resp = await api.post("/api/v1/queue/delete", content=big,
                              headers={"content-type": "application/json"})
        assert resp.status_code == 413
        assert str(ACTION_BODY) in resp.json()["error"] and "filter" in resp.json()["error"]
        # other routes keep the API's own limit (the largest message, as base64, and fields)
        resp = await api.post("/api/v1/suppressions", content=b" " * 300_000,
                              headers={"content-type": "application/json"})
        assert resp.status_code == 413 and "filter" not in resp.json()["error"]
    assert [r.state.value for r in node.scheduler.recipients()] == ["queued"]  # none held


async def test_a_domain_with_a_trailing_dot_is_refused_by_name_and_the_rest_delivered(
        tmp_path, sink, make_node):
    """RFC 5321 4.1.2: a Domain is sub-domains joined by dots, none after the last; the root's
    dot of DNS is not part of it. ``b@example.com.`` is refused (501) saying so, at RCPT, where
    the client still holds the message: the other recipients are delivered, none lost."""
    node = await make_node(config_text(tmp_path, sink.port))
    raw = await session(node.listeners[0].port)
    reply = await raw.cmd("MAIL FROM:<s@insurer.test.>")
    assert reply.startswith("501 5.1.7") and "trailing dot" in reply, reply
    assert (await raw.cmd("MAIL FROM:<s@insurer.test>")).startswith("250 ")
    for path in ("<b@example.com.>", "b@example.com.", "<b@EXAMPLE.COM.>"):
        reply = await raw.cmd(f"RCPT TO:{path}")
        assert reply.startswith("501 5.1.3") and "trailing dot" in reply, reply
    assert "trailing dot" not in await raw.cmd("RCPT TO:<b@example.com..>")  # not the case
    assert (await raw.cmd("RCPT TO:<a@example.com>")).startswith("250 ")
    assert (await raw.cmd("DATA")).startswith("354")
    assert (await raw.cmd(message("dot").decode() + "\r\n.")).startswith("250 ")
    await raw.close()
    [arrival] = await sink.wait_for(1)
    assert arrival.rcpts == ["a@example.com"]
    async with api_client(node, tmp_path) as api:
        resp = await api.post("/api/v1/messages", json={
            "from": "notices@insurer.test", "to": ["b@example.com."], "subject": "x",
            "text": "x"})
        assert resp.status_code == 422 and "trailing dot" in resp.json()["error"], resp.text


async def test_the_suppression_export_is_streamed(tmp_path, sink, make_node):
    """The export of the whole suppression list (no cap: millions of entries) was built whole
    in memory, and its bytes kept in the socket's buffer for a client that did not read: now
    streamed page by page, chunked, the same CSV as ``postlane suppress export``."""
    node = await make_node(config_text(tmp_path, sink.port))
    store = node.feedback.suppression
    async with api_client(node, tmp_path) as api:
        for part in range(3):  # 12,000 addresses (more than two pages), in bodies the API takes
            rows = "".join(f"s{part}-{i}@example.org,all,test\n" for i in range(4000))
            resp = await api.post("/api/v1/suppressions/import", params={"scope": "all"},
                                  content=rows.encode(), headers={"content-type": "text/csv"})
            assert resp.json() == {"imported": 4000}, resp.text
        async with api.stream("GET", "/api/v1/suppressions/export") as resp:
            assert resp.status_code == 200 and "content-length" not in resp.headers
            assert resp.headers["transfer-encoding"] == "chunked"
            assert resp.headers["content-type"] == "text/csv; charset=utf-8"
            exported = (await resp.aread()).decode()
        whole = io.StringIO()
        assert store.export_csv(whole) == 12000
        assert exported == whole.getvalue()  # the same bytes as the file export
        assert exported.count("\r\n") == 12001 and exported.startswith("address,scope,")

        # a client that asks and never reads, then goes: the node answers the next one
        raw = socket.create_connection(("127.0.0.1", node.api.port))
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        token = (tmp_path / "api-token").read_text().strip()
        raw.sendall(f"GET /api/v1/suppressions/export HTTP/1.1\r\nHost: x\r\n"
                    f"Authorization: Bearer {token}\r\n\r\n".encode())
        raw.close()
        assert (await api.get("/api/v1/status")).status_code == 200


def export_asked(node, tmp_path: Path) -> socket.socket:
    """A client that asks for the export with a small receive buffer and never reads."""
    raw = socket.socket()
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    raw.connect(("127.0.0.1", node.api.port))
    token = (tmp_path / "api-token").read_text().strip()
    raw.sendall(f"GET /api/v1/suppressions/export HTTP/1.1\r\nHost: x\r\n"
                f"Authorization: Bearer {token}\r\n\r\n".encode())
    return raw


async def test_a_client_that_never_reads_is_dropped_and_does_not_hold_a_stop(
        tmp_path, sink, make_node):
    text = config_text(tmp_path, sink.port).replace("[api]\n", '[api]\nread_timeout = "1s"\n')
    node = await make_node(text)
    now = time.time()
    node.feedback.suppression.add_many(Entry(f"u{i}@example.org", "all", "t", "import", now)
                                       for i in range(100_000))  # a few MB of CSV
    connections = node.api._server.server_state.connections
    raw = export_asked(node, tmp_path)
    await until(lambda: connections, what="the client's connection")
    # it reads nothing: after read_timeout the node drops it (and what it streamed for it)
    await until(lambda: not connections, what="the stalled connection dropped")
    raw.close()
    # a stop while such a client waits drops it instead of waiting for it
    raw = export_asked(node, tmp_path)
    await until(lambda: any(c.flow.write_paused for c in connections), what="a stalled write")
    await node.stop()
    assert node.api._task.done() and not connections
    raw.close()
