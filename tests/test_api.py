"""The HTTP API over real HTTP on loopback: auth, injection, operations, lookups, metrics."""

from __future__ import annotations

import base64
import csv
import email
import stat
from pathlib import Path

import httpx
import pytest
from openapi_spec_validator import validate

from tests.conftest import config_text, message


def api_client(node, tmp_path: Path, token: str | None = None) -> httpx.AsyncClient:
    token = token if token is not None else (tmp_path / "api-token").read_text().strip()
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.AsyncClient(base_url=f"http://127.0.0.1:{node.api.port}", headers=headers,
                             timeout=30)


async def test_token_file_is_created_0600_and_required(tmp_path, sink, make_node):
    node = await make_node(config_text(tmp_path, sink.port))
    token_file = tmp_path / "api-token"
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    async with api_client(node, tmp_path, token="") as anon:
        resp = await anon.get("/api/v1/status")
        assert resp.status_code == 401
        assert resp.headers["www-authenticate"] == "Bearer"
        assert "missing bearer token" in resp.json()["error"]
        assert (await anon.get("/metrics")).status_code == 401
        assert (await anon.post("/api/v1/pools/bulk/pause")).status_code == 401
        # the page and the schema hold no data
        assert (await anon.get("/")).status_code == 200
        assert (await anon.get("/openapi.json")).status_code == 200
    async with api_client(node, tmp_path, token="wrong") as bad:
        resp = await bad.get("/api/v1/status")
        assert resp.status_code == 401
        assert resp.json()["error"] == "invalid bearer token"
    async with api_client(node, tmp_path) as good:
        resp = await good.get("/api/v1/status")
        assert resp.status_code == 200
        assert resp.json()["node"] == "test-node"


async def test_openapi_schema_is_valid(tmp_path, sink, make_node):
    node = await make_node(config_text(tmp_path, sink.port))
    async with api_client(node, tmp_path) as client:
        schema = (await client.get("/openapi.json")).json()
    validate(schema)
    assert "/api/v1/messages" in schema["paths"]
    assert "/api/v1/pools/{pool}/pause" in schema["paths"]


async def test_structured_injection_is_delivered_and_looked_up(tmp_path, sink, make_node):
    node = await make_node(config_text(tmp_path, sink.port))
    async with api_client(node, tmp_path) as client:
        resp = await client.post("/api/v1/messages", json={
            "from": "notices@insurer.test", "to": ["a@example.com"], "bcc": ["b@example.com"],
            "subject": "Your policy", "text": "Dear customer,\n", "html": "<p>Dear customer</p>",
            "headers": {"X-Policy": "P-1"}, "class": "policy-documents",
            "correlation_id": "policy-4711",
            "attachments": [{"filename": "policy.pdf", "content_type": "application/pdf",
                             "content": base64.b64encode(b"%PDF-1.4 test").decode()}]})
        assert resp.status_code == 202, resp.text
        qid = resp.json()["queue_id"]
        assert resp.json()["recipients"] == 2
        [arrival] = await sink.wait_for(1)
        assert arrival.peer == "127.0.0.20"  # the critical pool: the class was honoured
        assert sorted(arrival.rcpts) == ["a@example.com", "b@example.com"]
        parsed = email.message_from_bytes(arrival.data)
        assert parsed["Subject"] == "Your policy"
        assert parsed["X-Policy"] == "P-1"
        assert parsed["Bcc"] is None
        assert parsed["X-Correlation-ID"] == "policy-4711"
        parts = [p.get_content_type() for p in parsed.walk()]
        assert "text/plain" in parts and "text/html" in parts and "application/pdf" in parts
        found = (await client.get(f"/api/v1/messages/{qid}")).json()
        assert found["class"] == "policy-documents"
        assert {r["state"] for r in found["recipients"]} == {"delivered"}
        by_corr = (await client.get("/api/v1/messages",
                                    params={"correlation_id": "policy-4711"})).json()
        assert [m["queue_id"] for m in by_corr["messages"]] == [qid]
        missing = await client.get("/api/v1/messages/NOPE")
        assert missing.status_code == 404 and "NOPE" in missing.json()["error"]


async def test_raw_injection_string_and_base64(tmp_path, sink, make_node):
    node = await make_node(config_text(tmp_path, sink.port))
    raw = message("raw one").decode()
    async with api_client(node, tmp_path) as client:
        one = await client.post("/api/v1/messages", json={
            "from": "s@insurer.test", "to": ["a@example.com"], "raw": raw})
        two = await client.post("/api/v1/messages", json={
            "from": "s@insurer.test", "to": ["b@example.com"], "class": "policy-documents",
            "raw_base64": base64.b64encode(message("raw two")).decode()})
    assert one.status_code == 202 and two.status_code == 202
    arrivals = await sink.wait_for(2)
    subjects = {email.message_from_bytes(a.data)["Subject"]: a.peer for a in arrivals}
    assert subjects == {"raw one": "127.0.0.30", "raw two": "127.0.0.20"}


@pytest.mark.parametrize(("body", "needle"), [
    ({"to": ["a@example.com"], "text": "x"}, "body.from"),
    ({"from": "s@insurer.test", "to": [], "text": "x"}, "body.to"),
    ({"from": "s@insurer.test", "to": ["a@example.com"], "subject": "hi\r\nBcc: x@evil.test",
      "text": "x"}, "CR or LF"),
    ({"from": "s@insurer.test", "to": ["a@example.com\r\nRCPT TO:<x@evil.test>"], "text": "x"},
     "CR or LF"),
    ({"from": "s@insurer.test", "to": ["not-an-address"], "text": "x"}, "not an e-mail address"),
    ({"from": "s@insurer.test", "to": ["a@example.com"], "text": "x",
      "headers": {"X-Evil": "a\nBcc: x@evil.test"}}, "CR or LF"),
    ({"from": "s@insurer.test", "to": ["a@example.com"], "text": "x",
      "headers": {"Bad Name": "v"}}, "not a valid header field name"),
    ({"from": "s@insurer.test", "to": ["a@example.com"], "text": "x",
      "headers": {"Subject": "v"}}, "set from its own field"),
    ({"from": "s@insurer.test", "to": ["a@example.com"]}, "at least one of text and html"),
    ({"from": "s@insurer.test", "to": ["a@example.com"], "raw": "Subject: x\r\n\r\nx",
      "subject": "y"}, "cannot be combined with subject"),
    ({"from": "s@insurer.test", "to": ["a@example.com"], "raw_base64": "***"}, "not valid base64"),
    ({"from": "s@insurer.test", "to": ["a@example.com"], "text": "x", "class": "nope"},
     "no traffic class named 'nope'"),
    ({"from": "s@insurer.test", "to": ["a@example.com"], "text": "x", "surprise": 1},
     "body.surprise"),
])
async def test_injection_validation(tmp_path, sink, make_node, body, needle):
    node = await make_node(config_text(tmp_path, sink.port))
    async with api_client(node, tmp_path) as client:
        resp = await client.post("/api/v1/messages", json=body)
    assert resp.status_code == 422, resp.text
    assert needle in resp.json()["error"]
    assert node.intake.accepted == 0


async def test_injection_refused_by_intake_and_too_large(tmp_path, sink, make_node):
    node = await make_node(config_text(tmp_path, sink.port))
    async with api_client(node, tmp_path) as client:
        unknown = await client.post("/api/v1/messages", json={
            "from": "s@insurer.test", "to": ["a@example.com"],
            "raw": message(cls="no-such-class").decode()})
        big = await client.post("/api/v1/messages", json={
            "from": "s@insurer.test", "to": ["a@example.com"], "text": "x" * 150_000})
        huge = await client.post("/api/v1/messages", content=b"x" * 300_000,
                                 headers={"content-type": "application/json"})
        not_json = await client.post("/api/v1/messages", content=b"{",
                                     headers={"content-type": "application/json"})
    assert unknown.status_code == 422 and "no-such-class" in unknown.json()["error"]
    assert big.status_code == 413 and "limit is 100000" in big.json()["error"]
    assert huge.status_code == 413 and "exceeds" in huge.json()["error"]
    assert not_json.status_code == 422 and not_json.json()["error"].startswith("invalid request")


async def test_pause_resume_retry_purge_and_metrics(tmp_path, sink, make_node):
    node = await make_node(config_text(tmp_path, sink.port))
    async with api_client(node, tmp_path) as client:
        refused = await client.post("/api/v1/pools/critical/pause")
        assert refused.status_code == 409 and "pausable = false" in refused.json()["error"]
        assert (await client.post("/api/v1/pools/nope/pause")).status_code == 404
        assert (await client.post("/api/v1/pools/bulk/pause")).json()["paused"] is True
        for i in range(3):
            resp = await client.post("/api/v1/messages", json={
                "from": "s@insurer.test", "to": [f"m{i}@example.com"], "text": "offer"})
            assert resp.status_code == 202
        status = (await client.get("/api/v1/status")).json()
        [bulk] = [p for p in status["pools"] if p["pool"] == "bulk"]
        assert bulk["paused"] is True
        [lane] = [ln for ln in status["lanes"] if ln["pool"] == "bulk"]
        assert lane["depth"] == 3 and lane["paused"] is True
        queued = (await client.get(f"/api/v1/messages/{resp.json()['queue_id']}")).json()
        assert queued["recipients"][0]["state"] == "queued"
        retry = await client.post("/api/v1/pools/bulk/retry", params={"domain": "example.com"})
        assert retry.json()["retried"] == 0
        purged = await client.post("/api/v1/pools/bulk/lanes/example.com/purge")
        assert purged.json()["purged"] == 3
        assert (await client.post("/api/v1/pools/bulk/resume")).json()["paused"] is False
        await client.post("/api/v1/messages", json={
            "from": "s@insurer.test", "to": ["after@example.com"], "text": "still flows"})
        await sink.wait_for(1)
        metrics = (await client.get("/metrics")).text
    assert [a.rcpts for a in sink.arrivals] == [["after@example.com"]]
    assert 'postlane_recipients_total{class="marketing",outcome="purged",pool="bulk",' \
           'source_ip=""} 3.0' in metrics
    assert 'outcome="delivered",pool="bulk",source_ip="127.0.0.30"} 1.0' in metrics
    assert 'postlane_delivery_latency_seconds_count{class="marketing",pool="bulk"} 1.0' in metrics
    assert 'postlane_pool_paused{pool="critical"} 0.0' in metrics
    assert 'postlane_connections_max{pool="bulk",source_ip="127.0.0.30"} 4.0' in metrics
    assert 'postlane_sla_seconds{class="policy-documents"} 120.0' in metrics
    await node.stop()
    rows = []
    for path in (tmp_path / "acct").glob("*.csv"):
        with open(path, newline="") as fh:
            rows.extend(csv.DictReader(fh))
    purged_rows = [r for r in rows if r["bounceCat"] == "purged"]
    assert len(purged_rows) == 3
    assert {r["type"] for r in purged_rows} == {"b"}
    assert {(r["dsnDiag"], r["operator"]) for r in purged_rows} == {
        ("purged by operator admin", "admin")}


async def test_queue_ages_from_query_and_body(tmp_path, sink, make_node):
    """older_than/younger_than are seconds or duration texts, from the query string or JSON; a
    bad one is a 422 naming it (it was a 500 from the query string)."""
    node = await make_node(config_text(tmp_path, sink.port))
    async with api_client(node, tmp_path) as client:
        assert (await client.post("/api/v1/pools/bulk/pause")).json()["paused"] is True
        resp = await client.post("/api/v1/messages", json={
            "from": "s@insurer.test", "to": ["aged@example.com"], "text": "offer"})
        assert resp.status_code == 202

        async def listed(query: str) -> int:
            resp = await client.get(f"/api/v1/queue/messages?pool=bulk&{query}")
            assert resp.status_code == 200, resp.text
            return resp.json()["total_messages"]

        assert await listed("younger_than=1h") == 1
        assert await listed("younger_than=3600") == 1
        assert await listed("older_than=1h") == 0
        assert await listed("older_than=0") == 1
        for query in ("older_than=soon", "younger_than=-5"):
            bad = await client.get(f"/api/v1/queue/messages?{query}")
            assert bad.status_code == 422, bad.text
            field = query.split("=")[0]
            assert bad.json()["error"].startswith(f"invalid request: query.{field}: ")
        dry = await client.post("/api/v1/queue/hold", json={
            "pool": "bulk", "older_than": "1h", "dry_run": True})
        assert dry.status_code == 200 and dry.json()["recipients"] == 0, dry.text
        dry = await client.post("/api/v1/queue/hold", json={
            "pool": "bulk", "younger_than": 3600, "dry_run": True})
        assert dry.status_code == 200 and dry.json()["recipients"] == 1, dry.text
        bad = await client.post("/api/v1/queue/hold", json={"older_than": "soon"})
        assert bad.status_code == 422 and "body.older_than" in bad.json()["error"]
        assert "not a duration" in bad.json()["error"]


def test_a_token_file_that_is_not_text_is_refused_in_words(tmp_path):
    """Binary bytes in the token file raised UnicodeDecodeError out of the node's start."""
    from postlane.api.tokens import TokenError, load_token

    path = tmp_path / "api-token"
    path.write_bytes(bytes(range(128, 200)))
    with pytest.raises(TokenError, match="is not text"):
        load_token(path)


def test_nodes_starting_together_read_one_whole_token_and_key(tmp_path):
    """Nodes sharing a state folder may create the API token and feedback key at the same
    instant: each reads the whole secret, the same one, from a 0600 file."""
    from concurrent.futures import ProcessPoolExecutor

    from postlane.api.tokens import load_token
    from postlane.feedback.keys import load_or_create_key

    for round_ in range(5):
        token, key = tmp_path / f"t{round_}" / "api.token", tmp_path / f"k{round_}" / "fb.key"
        with ProcessPoolExecutor(4) as pool:
            tokens = list(pool.map(load_token, [token] * 8))
            keys = list(pool.map(load_or_create_key, [key] * 8))
        assert len(set(tokens)) == 1 and tokens[0]
        assert len(set(keys)) == 1 and len(keys[0]) == 64
        for path in (token, key):
            assert stat.S_IMODE(path.stat().st_mode) == 0o600
            assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary left


async def test_the_schema_describes_the_errors_the_api_sends(tmp_path, sink, make_node):
    """The schema gave FastAPI's 422 body ({"detail": [{"loc", "msg", "type"}]}), which the API
    never sends (it sends {"error", "details": [{"field", "message"}]}), and no other error:
    not the 401 every route under /api/v1 and /metrics answers without a token."""
    node = await make_node(config_text(tmp_path, sink.port))
    async with api_client(node, tmp_path) as client:
        schema = (await client.get("/openapi.json")).json()
    validate(schema)
    assert "HTTPValidationError" not in schema["components"]["schemas"]
    error = schema["components"]["schemas"]["Error"]
    assert error["required"] == ["error"] and "details" in error["properties"]
    for path, operations in schema["paths"].items():
        for method, operation in operations.items():
            errors = {code: r for code, r in operation["responses"].items() if code >= "400"}
            if path.startswith("/api/v1/"):
                assert {"401", "403", "422"} <= set(errors), (method, path, sorted(errors))
            elif path == "/metrics":
                assert "401" in errors
            for code, response in errors.items():
                ref = response["content"]["application/json"]["schema"]["$ref"]
                assert ref == "#/components/schemas/Error", (method, path, code, ref)
