"""Webhooks: a real HTTP receiver on loopback that fails, recovers, and sees a node restart."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from postlane.audit.sqlite import SQLiteAuditStore
from tests.conftest import config_text, message, send
from tests.support.waiting import until


class Receiver(ThreadingHTTPServer):
    """Answers 503 while ``down`` or for the next ``fail`` requests, then 200 and keeps events."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.fail = 0
        self.down = False
        self.requests = 0
        self.events: list[dict] = []
        self.lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/events"


class _Handler(BaseHTTPRequestHandler):
    server: Receiver

    def do_POST(self) -> None:  # noqa: N802 (stdlib name)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        srv = self.server
        with srv.lock:
            srv.requests += 1
            refuse = srv.down or srv.fail > 0
            if srv.fail > 0:
                srv.fail -= 1
            if not refuse:
                assert self.headers["Authorization"] == "Bearer t0k"
                srv.events.extend(body["events"])
        self.send_response(503 if refuse else 200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def receiver():
    srv = Receiver()
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def hook(url: str) -> str:
    return f"""
[[audit.webhooks]]
url = "{url}"
name = "policy-system"
types = ["d", "b"]
classes = ["policy-documents"]
batch = 2
retry_min = "50ms"
retry_max = "200ms"
headers = {{ Authorization = "Bearer t0k" }}
"""


async def test_webhook_retries_and_resumes_after_restart(tmp_path, sink, make_node, receiver):
    text = config_text(tmp_path, sink.port, hook(receiver.url))
    receiver.fail = 3
    node = await make_node(text)
    port = node.listeners[0].port
    for i in range(3):
        await send(port, "s@example.com", [f"p{i}@example.com"],
                   message(f"p{i}", cls="policy-documents", extra=f"X-Correlation-ID: c{i}\r\n"))
    await send(port, "s@example.com", ["m@example.com"], message("m", cls="marketing"))
    await until(lambda: len(receiver.events) == 3)
    assert receiver.requests >= 3 + 2  # three refusals, then batches of two
    assert {e["header_X-Correlation-ID"] for e in receiver.events} == {"c0", "c1", "c2"}
    assert all(e["type"] == "d" and e["class"] == "policy-documents" for e in receiver.events)

    # outage spanning a restart: the event written meanwhile must arrive, once, afterwards
    receiver.down = True
    await send(port, "s@example.com", ["p3@example.com"],
               message("p3", cls="policy-documents", extra="X-Correlation-ID: c3\r\n"))
    await sink.wait_for(5)
    await until(lambda: receiver.requests >= 7)  # it kept trying
    await node.stop()
    receiver.down = False
    node = await make_node(text)
    await until(lambda: len(receiver.events) == 4)
    store = SQLiteAuditStore(node.audit.path, readonly=True)
    written = store.db.execute("SELECT max(seq) FROM audit_records").fetchone()[0]
    # the cursor moves after the 2xx of its batch: once it is past every record, nothing is left
    # to send (again), so no duplicate can follow
    await until(lambda: store.cursor("policy-system") >= written, what="the cursor at the end")
    await node.stop()

    expected = [r[0] for r in store.db.execute(
        "SELECT seq FROM audit_records WHERE type IN ('d', 'b') AND cls = 'policy-documents' "
        "ORDER BY seq")]
    assert [e["seq"] for e in receiver.events] == expected  # none lost, none twice, in order
    assert receiver.events[-1]["header_X-Correlation-ID"] == "c3"
    last = store.db.execute("SELECT max(seq) FROM audit_records").fetchone()[0]
    assert store.cursor("policy-system") == last
    hashes = dict(store.db.execute("SELECT seq, hex(hash) FROM audit_records"))
    assert all(hashes[e["seq"]].lower() == e["hash"] for e in receiver.events)
    assert store.verify().ok  # the chain continued across the restart
    store.close()
