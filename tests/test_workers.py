"""SMTP intake in worker processes (``[node] workers = 2``): the workers accept, the main process
commits and delivers; 250 only once committed; a worker killed mid-transfer loses nothing
acknowledged and is started again; priority, pause and the node-wide limits hold.
"""

from __future__ import annotations

import asyncio
import os
import signal
import smtplib
import socket

import pytest

from postlane.harness.sink import Sink
from tests.conftest import OPERATOR, config_text, message, records, send
from tests.support.waiting import until
from tests.test_lanes import _submit_all, shared_pool_config, subjects
from tests.test_security_auth import secure_config, submit, tls_files, users_file  # noqa: F401


def _with_workers(text: str, extra_node: str = "") -> str:
    """A test config with ``workers = 2`` in its ``[node]`` table."""
    return text.replace("[node]\n", f"[node]\nworkers = 2\n{extra_node}", 1)


async def _ready(node) -> None:
    assert node.workers is not None and len(node.workers.pids()) == 2


async def test_workers_accept_from_several_connections_and_deliver_everything(
        tmp_path, sink, make_node):
    node = await make_node(_with_workers(config_text(tmp_path, sink.port)))
    await _ready(node)
    port = node.listeners[0].port

    async def client(k: int) -> None:
        for i in range(10):
            await send(port, "s@insurer.test", [f"c{k}-{i}@example.com", f"d{k}-{i}@example.com"],
                       message(f"c{k}-{i}", cls="marketing" if i % 2 else "policy-documents"))

    await asyncio.gather(*(client(k) for k in range(6)))
    await sink.wait_for(60, timeout=60)  # one transaction per message (one domain)
    assert sorted(subjects(sink)) == sorted(f"c{k}-{i}" for k in range(6) for i in range(10))
    assert sum(len(a.rcpts) for a in sink.arrivals) == 120
    assert node.intake.accepted == 60
    await node.stop()
    recs = records(tmp_path)  # the "r" records were committed with the messages
    assert sum(1 for r in recs if r["type"] == "r") == 120
    assert sum(1 for r in recs if r["type"] == "d") == 120
    ids = {r["queueId"] for r in recs if r["type"] == "r"}
    assert len(ids) == 60, "queue ids are unique across the workers"


async def test_queue_ids_never_collide_between_the_main_process_and_the_workers(
        tmp_path, sink, make_node):
    """Each process of a node numbers its queue ids under its own tag (the id's middle part):
    the main process (API submissions, DSNs) and each worker. Worker 0 once had the main
    process's tag, so an API submission and a worker's message could get one id in the same
    millisecond (the spool refused the duplicate: a 451 for the whole group commit)."""
    from tests.test_api import api_client

    node = await make_node(_with_workers(config_text(tmp_path, sink.port)))
    await _ready(node)
    port = node.listeners[0].port

    replies: list[str] = []

    def one(k: int) -> None:
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
            client.ehlo()
            client.mail("s@insurer.test")
            client.rcpt(f"t{k}@example.com")
            code, text = client.data(message(f"t{k}", cls="marketing"))
            assert code == 250, text
            replies.append(text.decode().rsplit(" ", 1)[-1])

    await asyncio.gather(*(asyncio.to_thread(one, k) for k in range(12)))
    async with api_client(node, tmp_path) as api:
        resp = await api.post("/api/v1/messages", json={
            "from": "notices@insurer.test", "to": ["api@example.com"], "subject": "via API",
            "text": "Hello.\n", "class": "marketing"})
        assert resp.status_code == 202, resp.text
        main_id = resp.json()["queue_id"]

    def tag(qid: str) -> str:
        return qid[11:-5]

    worker_tags = {tag(q) for q in replies}
    assert len(worker_tags) == 2, "the kernel handed the twelve connections to both workers"
    assert tag(main_id) not in worker_tags
    assert len({len(q) for q in [main_id, *replies]}) == 1


def _client_until_acked(port: int, seqs: list[int], acked: set[int], stop: list[bool]) -> None:
    """Send each message until it gets a 250, reconnecting after any failure."""
    client = None
    for seq in seqs:
        while not stop:
            try:
                if client is None:
                    client = smtplib.SMTP("127.0.0.1", port, timeout=30)
                client.sendmail("s@insurer.test", [f"k{seq}@example.com"],
                                message(f"k{seq}", cls="marketing",
                                        body=("x" * 70 + "\r\n") * 30))
            except (OSError, smtplib.SMTPException):
                client = None
                continue
            acked.add(seq)
            break
    if client is not None:
        client.close()


async def test_kill_of_a_worker_mid_transfer_loses_nothing_acknowledged(
        tmp_path, sink, make_node):
    node = await make_node(_with_workers(config_text(tmp_path, sink.port)))
    await _ready(node)
    port = node.listeners[0].port
    # a transfer held open mid-DATA on some worker: killing its worker must not deliver it
    # (in a thread: the node's event loop answers the worker's admission)
    held = await asyncio.to_thread(socket.create_connection, ("127.0.0.1", port))
    await asyncio.to_thread(held.recv, 1024)
    held.sendall(b"EHLO t.test\r\nMAIL FROM:<s@insurer.test>\r\nRCPT TO:<half@example.com>\r\n"
                 b"DATA\r\nSubject: half\r\n\r\nhalf a message\r\n")
    acked: set[int] = set()
    stop: list[bool] = []
    clients = [asyncio.to_thread(_client_until_acked, port, list(range(k, 200, 4)), acked, stop)
               for k in range(4)]
    tasks = [asyncio.ensure_future(c) for c in clients]
    await until(lambda: len(acked) >= 40, what="40 messages acknowledged")
    for pid in node.workers.pids():  # both workers: whichever held a transfer
        os.kill(pid, signal.SIGKILL)
    await asyncio.gather(*tasks)
    assert acked == set(range(200))
    await sink.wait_for(200, timeout=60)
    await until(lambda: {f"k{i}" for i in acked} <= set(subjects(sink)),
                what="every acknowledged message delivered")  # 200 arrivals may hold a repeat
    got = set(subjects(sink))
    assert {f"k{i}" for i in acked} <= got, "every acknowledged message was delivered"
    assert "half" not in " ".join(got)
    assert node.workers.restarts >= 2
    await until(lambda: len(node.workers.pids()) == 2 and all(
        c.ready.done() for c in node.workers.channels.values()), what="both workers started again")
    await send(port, "s@insurer.test", ["after@example.com"], message("after", cls="marketing"))
    held.close()
    await until(lambda: "after" in subjects(sink), timeout=30, what="the message sent after")
    # the killed workers' connections were given back
    await until(lambda: node.workers.guards["in"].connections.total == 0,
                what="the killed workers' connections given back")


async def test_priority_holds_through_the_workers(tmp_path, make_node):
    sink = await Sink(delay=0.3).start()
    try:
        node = await make_node(_with_workers(shared_pool_config(tmp_path, sink.port)))
        await _ready(node)
        port = node.listeners[0].port
        await _submit_all(port, [(f"m{i}", "marketing", f"r{i}@example.com") for i in range(5)])
        await _submit_all(port, [("policy", "policy-documents", "p@example.com")])
        await sink.wait_for(6, timeout=30)
        order = subjects(sink)
        assert order.index("policy") <= 2, order
        assert node.scheduler.slots["shared"][0].in_use <= 1
    finally:
        await sink.stop()


async def test_pause_holds_marketing_with_workers(tmp_path, sink, make_node):
    node = await make_node(_with_workers(config_text(tmp_path, sink.port)))
    port = node.listeners[0].port
    await node.operations.pause("bulk", who=OPERATOR)
    for i in range(3):
        await send(port, "s@insurer.test", [f"m{i}@example.com"], message(f"m{i}",
                                                                          cls="marketing"))
    await send(port, "s@insurer.test", ["p@example.com"], message("policy",
                                                                   cls="policy-documents"))
    await sink.wait_for(1)
    assert subjects(sink) == ["policy"]
    await node.operations.resume("bulk", who=OPERATOR)
    await sink.wait_for(4, timeout=30)


async def test_connection_cap_per_ip_is_node_wide(tmp_path, sink, make_node):
    text = _with_workers(config_text(tmp_path, sink.port,
                                     "[listeners.in.limits]\nmax_connections = 3\n"))
    node = await make_node(text)
    port = node.listeners[0].port

    def greet() -> tuple[socket.socket, bytes]:
        sock = socket.create_connection(("127.0.0.1", port))
        sock.settimeout(10)
        return sock, sock.recv(1024)

    opened = [await asyncio.to_thread(greet) for _ in range(5)]
    greetings = [g[:3] for _, g in opened]
    assert greetings.count(b"220") == 3 and greetings.count(b"421") == 2, greetings
    for sock, _ in opened:
        sock.close()
    await until(lambda: node.workers.guards["in"].connections.total == 0,
                what="the closed connections given back")
    sock, greeting = await asyncio.to_thread(greet)
    assert greeting.startswith(b"220")
    sock.close()


async def test_rate_limit_is_node_wide(tmp_path, sink, make_node):
    text = _with_workers(config_text(
        tmp_path, sink.port, "[listeners.in.limits]\nmessages_per_minute = 2\npregreet_wait = 0\n"
    )).replace('relay_from = ["127.0.0.0/8"]', 'relay_from = ["10.9.9.0/24"]', 1)
    node = await make_node(text)
    port = node.listeners[0].port

    def mail_once() -> int:
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
            client.ehlo("t.test")
            return client.mail("s@insurer.test")[0]

    codes = [await asyncio.to_thread(mail_once) for _ in range(4)]
    assert codes == [250, 250, 450, 450], codes


async def test_drain_with_workers_answers_421_then_stops(tmp_path, sink, make_node):
    node = await make_node(_with_workers(config_text(tmp_path, sink.port)))
    port = node.listeners[0].port
    await send(port, "s@insurer.test", ["a@example.com"], message("a", cls="marketing"))
    pids = node.workers.pids()
    await node.stop()
    for pid in pids:
        try:
            os.kill(pid, 0)
            raise AssertionError(f"worker {pid} still running")
        except ProcessLookupError:
            pass
    await sink.wait_for(1)


async def test_starttls_through_a_worker(tmp_path, sink, make_node):
    node = await make_node(_with_workers(config_text(tmp_path, sink.port)))
    port = node.listeners[0].port

    def over_tls() -> None:
        import ssl

        ctx = ssl.create_default_context()
        ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
            client.starttls(context=ctx)
            client.sendmail("s@insurer.test", ["tls@example.com"], message("tls", cls="marketing"))

    await asyncio.to_thread(over_tls)
    await sink.wait_for(1)
    assert subjects(sink) == ["tls"]


async def test_reload_reaches_every_worker(tmp_path, sink, make_node):
    node = await make_node(_with_workers(config_text(tmp_path, sink.port)))
    port = node.listeners[0].port
    node.config.default_class = "policy-documents"  # as admin/service.py's reload merges it
    await node.workers.reload()
    for i in range(4):  # whichever worker takes each connection
        await send(port, "s@insurer.test", [f"x{i}@example.com"], message(f"x{i}"))
    await sink.wait_for(4)
    await node.stop()
    classes = {r["class"] for r in records(tmp_path) if r["type"] == "r"}
    assert classes == {"policy-documents"}, classes


async def test_auth_through_a_worker(
        tmp_path, sink, make_node, tls_files, users_file):  # noqa: F811
    """Each worker process builds its own SMTP AUTH from its intake's users store: a wrong
    password is refused with 535, the right one relays with the user's default class and is
    accounted to the user, through whichever worker takes the connection."""
    node = await make_node(_with_workers(secure_config(tmp_path, sink.port, tls_files,
                                                       users_file, relay_from="[]")))
    await _ready(node)
    port = node.listeners[1].port
    with pytest.raises(smtplib.SMTPAuthenticationError) as err:
        await submit(port, tls="starttls", user="alice", password="not-the-password-4711")
    assert err.value.smtp_code == 535
    for _ in range(2):
        await submit(port, tls="starttls", user="alice")
    arrivals = await sink.wait_for(2)
    assert {a.peer for a in arrivals} == {"127.0.0.20"}, "alice's default class"
    await node.stop()
    users = [r["authUser"] for r in records(tmp_path) if r["type"] == "r"]
    assert users == ["alice", "alice"]


# A stand-in for the interpreter the node starts its intake workers with (``sys.executable``):
# every other child (the audit recorder, signing processes) runs the real one; a worker either
# exits at once with status 3 (as an interpreter that cannot run it would) or starts without the
# listening sockets it inherits (each other descriptor but its channel to the main process is
# closed), so that its own start fails inside Postlane's code.
_WORKER_WRAPPER = """#!/bin/bash
case "$*" in *postlane.workers.process*)
  case "$WORKER_FAULT" in
    exit) echo "worker stand-in: exiting at start" >&2; exit 3;;
    sockets) for fd in /proc/$$/fd/*; do n=${{fd##*/}}
               if [ "$n" -gt 2 ] && [ "$n" != "$3" ] && [ "$n" != 255 ]; then eval "exec $n>&-"; fi
             done;;
  esac;;
esac
exec {python} "$@"
"""


@pytest.mark.parametrize("fault", ["exit", "sockets"])
def test_a_worker_that_fails_at_start_is_one_clear_error_not_a_traceback(tmp_path, fault):
    """``[node] workers = 2`` and a worker that ends during the node's start: ``serve`` said
    ``RuntimeError: intake worker 1 exited at start`` under a screenful of traceback (and the
    worker its own). Now: exit 1, ``cannot start:`` naming the worker and why, no traceback."""
    import subprocess
    import sys

    wrapper = tmp_path / "python-wrapper"
    wrapper.write_text(_WORKER_WRAPPER.format(python=sys.executable))
    wrapper.chmod(0o755)
    path = tmp_path / "node.toml"
    path.write_text(_with_workers(config_text(tmp_path, 2600)))
    code = ("import sys; sys.executable = sys.argv.pop(1); from postlane.cli import main;"
            " sys.argv[0] = 'postlane'; main()")
    proc = subprocess.run([sys.executable, "-c", code, str(wrapper), "serve", "-c", str(path)],
                          capture_output=True, text=True, timeout=110,
                          env={**os.environ, "WORKER_FAULT": fault})
    err = proc.stderr
    assert proc.returncode == 1, err
    assert "Traceback" not in err, err
    assert "cannot start: intake worker " in err, err
    if fault == "exit":
        assert "exited during start-up with status 3" in err, err
    else:
        assert "Bad file descriptor" in err, err
