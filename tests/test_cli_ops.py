"""`postlane status|queues|pause|resume` as real subprocesses against a running node's API."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from pathlib import Path

from postlane.edge.smtp import Listener
from postlane.node import Node
from postlane.startup import parse_config
from tests.conftest import config_text, message, send
from tests.support.pg import pg_schema  # noqa: F401  (fixture)
from tests.support.waiting import until
from tests.test_relay_quirks import Receiver, quick_config

POSTLANE = str(Path(sys.executable).parent / "postlane")


async def run_cli(*args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        POSTLANE, *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "COLUMNS": "200"})
    out, err = await proc.communicate()
    return proc.returncode, out.decode(), err.decode()


async def test_cli_pause_resume_status_queues(tmp_path, sink, make_node):
    node = await make_node(config_text(tmp_path, sink.port))
    target = ["--url", f"http://127.0.0.1:{node.api.port}",
              "--token-file", str(tmp_path / "api-token")]
    code, out, _ = await run_cli("pause", "bulk", *target)
    assert code == 0 and out.strip() == "paused bulk"
    assert ("bulk", "*") in node.scheduler.paused
    code, out, _ = await run_cli("pause", "bulk", "--domain", "example.com", *target)
    assert code == 0 and ("bulk", "example.com") in node.scheduler.paused
    code, _, err = await run_cli("pause", "critical", *target)
    assert code == 1 and "pausable = false" in err and "HTTP 409" in err
    code, out, _ = await run_cli("status", "--json", *target)
    assert code == 0
    data = json.loads(out)
    assert {p["pool"]: p["paused"] for p in data["status"]["pools"]} == {
        "critical": False, "bulk": True}
    assert {c["class"] for c in data["sla"]["classes"]} == {"policy-documents", "marketing"}
    code, out, _ = await run_cli("status", *target)
    assert code == 0 and "test-node" in out and "policy-documents" in out
    assert "127.0.0.0/8" in out, "the networks that may relay without AUTH are shown"
    assert "self-signed, generated" in out
    code, out, _ = await run_cli("resume", "bulk", *target)
    assert code == 0 and ("bulk", "*") not in node.scheduler.paused
    code, out, _ = await run_cli("queues", *target)
    assert code == 0 and "lanes" in out


async def test_status_table_shows_each_class_delivered_and_failed(tmp_path, sink, make_node):
    """The classes table counts each class's deliveries and final failures (``delivered_total``
    and ``failed_total`` of /api/v1/sla): the JSON had them, the table an operator reads did
    not."""
    sink.rcpt_replies = {"gone@example.com": ["550 5.1.1 no such user"]}
    node = await make_node(config_text(tmp_path, sink.port))
    await send(node.listeners[0].port, "s@insurer.test", ["here@example.com"],
               message("one", cls="marketing"))
    await send(node.listeners[0].port, "", ["gone@example.com"],  # no DSN to fail as well
               message("two", cls="marketing"))

    async def counted() -> bool:
        sla = await node.monitor.sla(time.time())
        row = {c["class"]: c for c in sla["classes"]}["marketing"]
        return row["delivered_total"] == 1 and row["failed_total"] == 1

    await until(counted, timeout=30, what="one delivered and one failed")
    code, out, _ = await run_cli("status", "--url", f"http://127.0.0.1:{node.api.port}",
                                 "--token-file", str(tmp_path / "api-token"))
    assert code == 0
    header = next(line for line in out.splitlines() if "breach in" in line)
    assert [c.strip() for c in header.split("┃")][-3:-1] == ["delivered", "failed"], header
    row = next(line for line in out.splitlines() if "marketing" in line and "bulk" in line)
    assert [c.strip() for c in row.split("│")][-3:-1] == ["1", "1"], row


async def test_status_is_not_ready_until_the_listeners_are_open(tmp_path, sink, monkeypatch):
    """The API answers before the SMTP listeners are open (with intake workers, seconds
    before), and ``status`` said "up 499053.9h" (uptime from 0) and exited 0: the README's
    ``until postlane status`` and the container's health check called the node ready, and the
    application that then submitted got "Connection refused"."""
    gate = asyncio.Event()
    opening = Listener.start

    async def held(self: Listener) -> None:
        await gate.wait()
        await opening(self)

    monkeypatch.setattr(Listener, "start", held)
    node = Node(parse_config(config_text(tmp_path, sink.port)))
    starting = asyncio.create_task(node.start())
    try:
        await until(lambda: node.api is not None and node.api.port != 0, what="the API up")
        assert node.api is not None
        target = ["--url", f"http://127.0.0.1:{node.api.port}",
                  "--token-file", str(tmp_path / "api-token")]
        code, _, err = await run_cli("status", *target)
        assert code == 1 and "is starting: its listeners are not open yet" in err
        code, out, _ = await run_cli("status", "--json", *target)
        assert code == 1 and json.loads(out)["status"]["starting"] is True
        assert json.loads(out)["status"]["uptime_s"] == 0
        gate.set()
        await starting
        code, out, _ = await run_cli("status", *target)
        assert code == 0 and "test-node" in out
    finally:
        gate.set()
        await starting
        await node.stop()


async def test_cli_reads_the_node_config_and_explains_failures(tmp_path, sink, make_node):
    node = await make_node(config_text(tmp_path, sink.port))
    cfg = tmp_path / "node.toml"
    cfg.write_text(config_text(tmp_path, sink.port).replace("port = 0\ntoken_file",
                                                            f"port = {node.api.port}\ntoken_file"))
    code, out, err = await run_cli("pause", "bulk", "-c", str(cfg))
    assert code == 0, err
    assert ("bulk", "*") in node.scheduler.paused
    wrong = tmp_path / "wrong-token"
    wrong.write_text("nope\n")
    code, _, err = await run_cli("status", "--url", f"http://127.0.0.1:{node.api.port}",
                                 "--token-file", str(wrong))
    assert code == 1 and "invalid bearer token" in err
    await node.stop()
    code, _, err = await run_cli("status", "-c", str(cfg))
    assert code == 1 and "cannot reach the node's API" in err
    code, _, err = await run_cli("status")
    assert code == 1 and "-c CONFIG" in err


async def test_queues_on_a_cluster_node_shows_the_shared_queue_and_labels_its_lanes(
        tmp_path, sink, pg_schema):  # noqa: F811
    """A cluster node's lanes hold only what it claimed: a paused pool's mail was "queued 0" on
    every node, under a plain "lanes" title, while the cluster held it."""
    from tests.conftest import OPERATOR
    from tests.test_cluster import _until, cluster_text, send_many, start_node

    a = await start_node(cluster_text(tmp_path, sink.port, pg_schema, "node-a"))
    b = await start_node(cluster_text(tmp_path, sink.port, pg_schema, "node-b"))
    try:
        await a.operations.pause("bulk", who=OPERATOR)
        await _until(lambda: ("bulk", "*") in b.scheduler.paused)
        await asyncio.to_thread(send_many, a.listeners[0].port, [f"c{i}" for i in range(3)])

        async def counted() -> bool:
            figures = await b.monitor.cluster.current()
            return figures is not None and figures["pools"]["bulk"]["queued"] == 3

        await until(counted, timeout=30, what="node-b's figures counting the 3")
        code, out, err = await run_cli("queues", "--url", f"http://127.0.0.1:{b.api.port}",
                                       "--token-file", str(tmp_path / "api-token"))
        assert code == 0, err
        assert "shared queue (the whole cluster)" in out
        # the pool table first, then the cluster's lanes (bulk to example.com)
        bulk, lane = [line for line in out.splitlines() if line.startswith("│ bulk ")]
        assert bulk.split("│")[2].strip() == "3", bulk
        assert [c.strip() for c in lane.split("│")[2:4]] == ["example.com", "3"], lane
        assert "lanes of this node (node-b: what it has claimed)" in out
    finally:
        await a.stop()
        await b.stop()


async def test_status_shows_a_remote_reply_in_a_degradation_as_text(tmp_path, make_node):
    """A destination reported unreachable carries the remote server's reply as its cause,
    which ``postlane status`` prints: a greeting with ``[/ip]`` (rich markup) and an escape
    sequence (OSC retitling the terminal, a bell) is shown as text, escaped. The ``[/ip]``
    failed the command (MarkupError) and the escape reached the terminal raw."""
    receiver = Receiver(greeting=b"554 5.7.1 \x1b]0;pwned\x07 [/ip] blocked\r\n")
    port = await receiver.start()
    try:
        node = await make_node(quick_config(tmp_path, port))
        await send(node.listeners[0].port, "s@insurer.test", ["a@example.com"],
                   message(cls="policy-documents"))
        await until(lambda: node.health.active, what="the destination reported unreachable")
        code, out, err = await run_cli("status", "--url", f"http://127.0.0.1:{node.api.port}",
                                       "--token-file", str(tmp_path / "api-token"))
    finally:
        await receiver.stop()
    assert code == 0, err
    line = next(line for line in out.splitlines() if "DEGRADED" in line)
    assert "[/ip] blocked" in line and "\x1b" not in out and "\x07" not in out, line
