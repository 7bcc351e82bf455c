"""Hostile requests to the HTTP API over real HTTP on loopback: each gets a clear 4xx JSON error
(never a 500 or a traceback) and changes no queued mail."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import email
import email.policy
import json
import logging
from collections.abc import AsyncIterator, Iterator
from typing import get_args

import httpx
import pytest
from fastapi.routing import APIRoute
from pydantic import BaseModel, Strict

from postlane.api.injection import MessageIn, UnwritableHeader
from postlane.api.tokens import add_token
from tests.conftest import config_text
from tests.support.waiting import until
from tests.test_api import api_client


async def _chunks(total: int, piece: bytes) -> AsyncIterator[bytes]:
    """A body without Content-Length (chunked transfer encoding), ``total`` bytes."""
    sent = 0
    while sent < total:
        yield piece
        sent += len(piece)


async def test_a_chunked_body_over_the_limit_is_refused(tmp_path, sink, make_node):
    """The body limit held only for a Content-Length: a chunked body was read whole into memory
    (an anonymous 150 MB one grew the node by 300 MB and got a 422) and an import over the
    limit was taken."""
    node = await make_node(config_text(tmp_path, sink.port))  # limit: 198,869 bytes
    line = b"someone-with-a-long-address@example.com\n"
    async with api_client(node, tmp_path) as client:
        resp = await client.post("/api/v1/suppressions/import", content=_chunks(300_000, line))
        assert resp.status_code == 413, resp.text
        assert "exceeds" in resp.json()["error"]
        assert (await client.get("/api/v1/suppressions")).json()["total"] == 0
        small = await client.post("/api/v1/suppressions/import", content=_chunks(1, line))
        assert small.json() == {"imported": 1}
        resp = await client.post("/api/v1/messages", content=_chunks(1_000_000, b"x" * 65536),
                                 headers={"content-type": "application/json"})
        assert resp.status_code == 413, resp.text
    assert node.intake.accepted == 0


async def test_suppression_paging_out_of_range_is_a_422(tmp_path, sink, make_node):
    """offset=2**63 was a 500 (SQLite's integer overflowed), a negative or zero limit and a
    negative offset were quietly changed."""
    node = await make_node(config_text(tmp_path, sink.port))
    async with api_client(node, tmp_path) as client:
        for query in ("offset=9223372036854775808", "offset=-1", "limit=0", "limit=10001",
                      "limit=-99999999999999999999"):
            resp = await client.get(f"/api/v1/suppressions?{query}")
            assert resp.status_code == 422, (query, resp.text)
            assert resp.json()["error"].startswith(f"invalid request: query.{query[:5]}")
        resp = await client.get("/api/v1/suppressions?limit=10000&offset=9223372036854775807")
        assert resp.json() == {"total": 0, "entries": []}


async def test_suppression_import_with_an_oversized_field_is_a_422(tmp_path, sink, make_node):
    """A CSV field over the csv module's 128 KiB limit was a 500; now the line is named and
    nothing is imported."""
    node = await make_node(config_text(tmp_path, sink.port))
    body = "ok@example.com\n" + "a" * 140_000 + "@example.com\n"
    async with api_client(node, tmp_path) as client:
        resp = await client.post("/api/v1/suppressions/import", content=body)
        assert resp.status_code == 422, resp.text
        assert resp.json()["error"].startswith("line 2: field larger than field limit")
        assert (await client.get("/api/v1/suppressions")).json()["total"] == 0


async def test_an_unexpected_error_is_a_json_500_without_details(tmp_path, sink, make_node,
                                                                 monkeypatch):
    """A bug behind a route answered "Internal Server Error" as text/plain; the API's errors
    are JSON, and the exception's text (a path, a value) stays in the log."""
    node = await make_node(config_text(tmp_path, sink.port))

    async def broken() -> dict:
        raise RuntimeError("/var/lib/postlane/secret.key is broken")

    monkeypatch.setattr(node.monitor, "alert_lists", broken)
    async with api_client(node, tmp_path) as client:
        resp = await client.get("/api/v1/alerts")
        assert resp.status_code == 500
        assert resp.json() == {"error": "internal error (the node's log has the details)"}
        assert "secret" not in resp.text
        assert (await client.get("/api/v1/token")).status_code == 200  # and it goes on serving


async def test_405_names_every_method_the_path_allows(tmp_path, sink, make_node):
    """Allow named only the first route of a path: PUT /api/v1/messages said "POST" although
    GET serves it too."""
    node = await make_node(config_text(tmp_path, sink.port))
    async with api_client(node, tmp_path) as client:
        for path, allowed in (("/api/v1/messages", "GET, HEAD, POST"),
                              ("/api/v1/suppressions", "GET, HEAD, POST"),
                              ("/api/v1/suppressions/export", "GET, HEAD, DELETE"),
                              ("/unsubscribe/abc", "GET, HEAD, POST"),
                              ("/api/v1/status", "GET, HEAD"),
                              ("/api/v1/queue/hold", "POST")):
            resp = await client.put(path)
            assert resp.status_code == 405, (path, resp.text)
            assert resp.headers["allow"] == allowed, path
            assert resp.json() == {"error": "Method Not Allowed"}


async def test_an_empty_domain_is_refused_not_read_as_the_whole_pool(tmp_path, sink, make_node):
    """pause?domain= paused the whole pool (and resume?domain= resumed it) while the answer
    said domain "": a client that meant one lane changed every lane of the pool."""
    node = await make_node(config_text(tmp_path, sink.port))
    async with api_client(node, tmp_path) as client:
        for action in ("pause", "resume", "retry"):
            resp = await client.post(f"/api/v1/pools/bulk/{action}?domain=")
            assert resp.status_code == 422, (action, resp.text)
            assert resp.json()["error"].startswith("invalid request: query.domain: ")
        assert ("bulk", "*") not in node.scheduler.paused
        assert (await client.post("/api/v1/pools/bulk/pause")).status_code == 200
        assert (await client.post("/api/v1/pools/bulk/resume?domain=")).status_code == 422
        assert ("bulk", "*") in node.scheduler.paused


async def test_a_lane_is_paused_only_for_what_could_be_a_domain(tmp_path, sink, make_node):
    """`pause bulk --domain 'bad domain'` was kept as a paused lane nothing could ever match;
    a domain with no mail yet may be paused, one that cannot exist is a 422."""
    node = await make_node(config_text(tmp_path, sink.port))
    async with api_client(node, tmp_path) as client:
        for bad in ("bad domain", "a..b", "-x.example", "[1.2.3]", "x@y.example"):
            resp = await client.post("/api/v1/pools/bulk/pause", params={"domain": bad})
            assert resp.status_code == 422, (bad, resp.text)
            assert "is not a domain" in resp.json()["error"]
        for good in ("Example.COM", "bücher.example", "[127.0.0.1]"):
            resp = await client.post("/api/v1/pools/bulk/pause", params={"domain": good})
            assert resp.status_code == 200, (good, resp.text)
    assert {d for p, d in node.scheduler.paused if p == "bulk"} == {
        "example.com", "xn--bcher-kva.example", "[127.0.0.1]"}, "named as lanes name them"


async def test_cli_path_arguments_cannot_reach_another_route(tmp_path, sink, make_node):
    """The CLI put pool, domain and queue id into the URL unescaped, and the HTTP client folds
    "..": `postlane resume x/../bulk` resumed pool bulk, and `postlane purge bulk
    x/../../../critical/lanes/example.com --yes` would purge another pool's lane."""
    from tests.test_cli_ops import run_cli

    node = await make_node(config_text(tmp_path, sink.port))
    target = ["--url", f"http://127.0.0.1:{node.api.port}",
              "--token-file", str(tmp_path / "api-token")]
    code, _, err = await run_cli("pause", "bulk", *target)
    assert code == 0, err
    for args in (("resume", "x/../bulk"), ("resume", "bulk?domain=x"),
                 ("purge", "critical", "x/../../../bulk/lanes/example.com", "--yes"),
                 ("queue", "show", "../../status")):
        code, out, err = await run_cli(*args, *target)
        assert code == 1 and "HTTP 404" in err, (args, out, err)
    assert ("bulk", "*") in node.scheduler.paused


async def test_a_body_that_is_not_sent_as_json_is_a_415(tmp_path, sink, make_node):
    """curl -d sends a form content type: the answer was "body: Input should be a valid
    dictionary or object to extract fields from" for a body that was a JSON object."""
    node = await make_node(config_text(tmp_path, sink.port))
    body = b'{"from": "s@insurer.test", "to": ["a@example.com"], "text": "x"}'
    async with api_client(node, tmp_path) as client:
        for content_type in ("application/x-www-form-urlencoded", "text/plain"):
            resp = await client.post("/api/v1/messages", content=body,
                                     headers={"content-type": content_type})
            assert resp.status_code == 415, (content_type, resp.text)
            assert "Content-Type: application/json" in resp.json()["error"]
        resp = await client.post("/api/v1/queue/delete", content=b'{"all": true}',
                                 headers={"content-type": "text/plain"})
        assert resp.status_code == 415
        not_object = await client.post("/api/v1/messages", json=[])
        assert not_object.status_code == 422, not_object.text
        assert node.intake.accepted == 0
        # none at all: a 415 too, where FastAPI does not read such a body as JSON anyway
        resp = await client.post("/api/v1/messages", content=body)
        assert resp.status_code in (202, 415), resp.text


async def test_the_token_is_checked_before_the_body_is_read(tmp_path, sink, make_node):
    """FastAPI reads and parses a body before a route's dependencies run: a client without a
    token got 422, 415 or 400 about its body (the node parsed it) instead of 401."""
    node = await make_node(config_text(tmp_path, sink.port))
    json_type = {"content-type": "application/json"}
    async with api_client(node, tmp_path, token="") as anon:
        for content, headers in ((b"{", json_type), (b'{"a": "\xff"}', json_type),
                                 (b'{"all": true}', {"content-type": "text/plain"}),
                                 (b"[" * 100_000, json_type)):
            for path in ("/api/v1/messages", "/api/v1/queue/delete"):
                resp = await anon.post(path, content=content, headers=headers)
                assert resp.status_code == 401, (path, content[:20], resp.text)
                assert resp.headers["www-authenticate"] == "Bearer"
                assert resp.json() == {
                    "error": "missing bearer token (Authorization: Bearer <token>)"}
    async with api_client(node, tmp_path, token="wrong") as bad:
        resp = await bad.post("/api/v1/messages", content=b"{", headers=json_type)
        assert resp.status_code == 401 and resp.json() == {"error": "invalid bearer token"}


async def test_a_wildcard_selector_cannot_stall_the_node(tmp_path, sink, make_node):
    """`*` became `.*` in a backtracking regex: recipient=*a*a*a*a*a*a*a*a*a*b against one
    queued address of 40 a's took 10 s (12 a's: hours) on the event loop, stopping mail and
    API alike; a read-only token could do it with a GET."""
    from postlane.monitor.loopwatch import LoopWatch

    node = await make_node(config_text(tmp_path, sink.port))
    async with api_client(node, tmp_path) as client:
        assert (await client.post("/api/v1/pools/bulk/pause")).status_code == 200
        resp = await client.post("/api/v1/messages", json={
            "from": "s@insurer.test", "to": ["a" * 40 + "@example.com"], "text": "x"})
        assert resp.status_code == 202
        # what the loop was blocked, not the request's wall time: a loaded machine made that
        # over 2 s with nothing blocked (the node's watchdog subtracts the wait for a CPU)
        watch = LoopWatch()
        watch.start()
        try:
            with watch.track() as stalls:
                resp = await client.get("/api/v1/queue/messages",
                                        params={"recipient": "*a" * 9 + "*b"})
                await until(lambda: stalls.ticks >= 1, what="a watchdog tick after the request")
        finally:
            watch.stop()
        assert resp.status_code == 200 and resp.json()["total_messages"] == 0
        assert stalls.max_blocked < 1.0, stalls  # the backtracking regex: 10 s
        for pattern, found in (("*a*@example.com", 1), ("a*", 1), ("*.com", 1), ("*", 1),
                               ("a*b", 0), ("*aa@example.co", 0), ("A" * 40 + "@*", 1),
                               ("a*a@example.com", 1), ("*@example.com*", 1), ("b*", 0)):
            resp = await client.get("/api/v1/queue/messages", params={"recipient": pattern})
            assert resp.json()["total_messages"] == found, pattern


def _json(text: str) -> dict:
    """A JSON body as a client may send it, lone surrogates ("\\ud800") included."""
    return {"content": text.encode(), "headers": {"content-type": "application/json"}}


async def test_lone_surrogates_are_a_422(tmp_path, sink, make_node):
    """JSON may escape half a UTF-16 pair ("\\ud800"), which no UTF-8 text holds: it was a 500
    from the email package, the spool or SQLite, in a message or a queue selector."""
    node = await make_node(config_text(tmp_path, sink.port))
    env = '"from": "s@insurer.test", "to": ["a@example.com"]'
    async with api_client(node, tmp_path) as client:
        for field, body in (
                ("raw", f'{{{env}, "raw": "Subject: x\\r\\n\\r\\n\\ud800"}}'),
                ("text", f'{{{env}, "text": "\\udfff"}}'),
                ("headers.X-A", f'{{{env}, "text": "x", "headers": {{"X-A": "\\ud800"}}}}'),
                ("correlation_id", f'{{{env}, "text": "x", "correlation_id": "\\ud800"}}'),
                ("to.0", '{"from": "s@insurer.test", "to": ["\\ud800@example.com"],'
                         ' "text": "x"}'),
                ("headers", f'{{{env}, "text": "x", "headers": {{"X-\\ud800": "v"}}}}')):
            resp = await client.post("/api/v1/messages", **_json(body))
            assert resp.status_code == 422, (field, resp.text)
            assert f"body: {field} is not valid Unicode" in resp.json()["error"], resp.text
        for field, body in (("recipient", '{"recipient": "\\ud800", "dry_run": true}'),
                            ("correlation_id", '{"correlation_id": "\\ud800"}'),
                            ("queue_ids.0", '{"queue_ids": ["\\ud800"]}')):
            resp = await client.post("/api/v1/queue/delete", **_json(body))
            assert resp.status_code == 422, (field, resp.text)
            assert f"body: {field} is not valid Unicode" in resp.json()["error"], resp.text
    assert node.intake.accepted == 0


async def test_every_line_break_in_a_header_field_is_a_422(tmp_path, sink, make_node):
    """Only CR and LF were refused; the email package also breaks lines at VT, FF, FS, GS, RS,
    NEL, U+2028 and U+2029 and refused those values itself: a 500."""
    node = await make_node(config_text(tmp_path, sink.port))
    env = {"from": "s@insurer.test", "to": ["a@example.com"], "text": "x"}
    async with api_client(node, tmp_path) as client:
        for brk in "\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029":
            for field, extra in (("subject", {"subject": f"a{brk}Bcc: x@evil.test"}),
                                 ("headers.X-A", {"headers": {"X-A": f"a{brk}b"}}),
                                 ("correlation_id", {"correlation_id": f"a{brk}b"}),
                                 ("attachments.0.filename", {"attachments": [
                                     {"filename": f"a{brk}b", "content": ""}]})):
                resp = await client.post("/api/v1/messages", json={**env, **extra})
                assert resp.status_code == 422, (repr(brk), field, resp.text)
                assert f"body.{field}: must not contain a line break" in resp.json()["error"]
    assert node.intake.accepted == 0


async def test_an_address_smtp_would_refuse_is_a_422(tmp_path, sink, make_node):
    """The API's address check was looser than the SMTP door's: a@., a@- and ..@example.com
    were queued (lanes to "." and "-", DNS lookups of them)."""
    node = await make_node(config_text(tmp_path, sink.port))
    async with api_client(node, tmp_path) as client:
        assert (await client.post("/api/v1/pools/bulk/pause")).status_code == 200  # no DNS
        for address in ("a@.", "a@-", "a@example..com", "a@-example.com", "..@example.com",
                        "a.@example.com", "a@" + "x" * 64 + ".com"):
            for body in ({"from": "s@insurer.test", "to": [address], "text": "x"},
                         {"from": address, "to": ["a@example.com"], "text": "x"}):
                resp = await client.post("/api/v1/messages", json=body)
                assert resp.status_code == 422, (address, resp.text)
                assert "not an e-mail address" in resp.json()["error"]
        for address in ("a@example.com", "ü@example.com", "a.b+c@x-y.example.com", "a@b"):
            resp = await client.post("/api/v1/messages", json={
                "from": "s@insurer.test", "to": [address], "text": "x"})
            assert resp.status_code == 202, (address, resp.text)
    assert node.intake.accepted == 4


async def test_control_characters_are_not_suppressed_addresses(tmp_path, sink, make_node):
    """POST /suppressions took "a\\x00b@…" and "a\\x1b[31mb@…" (a terminal escape) into the list
    and, verbatim, into the accounting files; the SMTP door refuses control characters."""
    node = await make_node(config_text(tmp_path, sink.port))
    async with api_client(node, tmp_path) as client:
        for address in ("a\x00b@example.com", "a\x1b[31mb@example.com", "a\x7f@example.com"):
            resp = await client.post("/api/v1/suppressions", json={"address": address})
            assert resp.status_code == 422, (address, resp.text)
            assert "not an email address" in resp.json()["error"]
            resp = await client.post("/api/v1/suppressions/import", content=address + "\n")
            assert resp.status_code == 422 and "line 1" in resp.json()["error"], resp.text
        resp = await client.post("/api/v1/suppressions", json={"address": "ok@example.com",
                                                               "reason": "x\x1b[2Jy"})
        assert resp.status_code == 422, resp.text
        assert (await client.get("/api/v1/suppressions")).json()["total"] == 0
        resp = await client.post("/api/v1/suppressions", json={"address": "ok@example.com",
                                                               "reason": "court order\t42"})
        assert resp.status_code == 201, resp.text


async def test_a_report_nested_too_deep_is_no_report(tmp_path, sink, make_node):
    """3000 nested message/rfc822 parts (96 KB) overflowed the email parser's recursion: a 500
    from POST /feedback/reports, and a 451 forever for the same mail at the FBL address."""
    node = await make_node(config_text(tmp_path, sink.port))
    nested = b"From: fbl@isp.example\r\nMIME-Version: 1.0\r\n" + (
        b"Content-Type: message/rfc822\r\n\r\n" * 3000) + b"Subject: x\r\n\r\nx\r\n"
    async with api_client(node, tmp_path) as client:
        resp = await client.post("/api/v1/feedback/reports", content=nested)
        assert resp.status_code == 200, resp.text
        assert resp.json()["kind"] == "not-a-report"


async def test_a_malformed_unsubscribe_token_gets_a_plain_answer(tmp_path, sink, make_node):
    """The public unsubscribe routes answered a malformed token with Python's own words
    ("not enough values to unpack (expected 2, got 1)", "Incorrect padding")."""
    node = await make_node(config_text(tmp_path, sink.port))
    async with api_client(node, tmp_path, token="") as anon:
        for token in ("abc", "a.b.c", "%00", "x" * 5000, "YQ.YQ", "!!!.!!!"):
            for method in ("GET", "POST"):
                resp = await anon.request(method, f"/unsubscribe/{token}")
                assert resp.status_code == 400, (token, resp.text)
                assert resp.json() == {"error": "malformed token"}, (token, resp.text)


async def test_two_authorization_headers_are_refused(tmp_path, sink, make_node):
    """With two Authorization headers the first counted and the second was ignored: a proxy
    adding its own header, or a client adding one to a proxy's, got the other's rights."""
    node = await make_node(config_text(tmp_path, sink.port))
    token = (tmp_path / "api-token").read_text().strip()
    async with api_client(node, tmp_path, token="") as anon:
        for i, pair in enumerate(((f"Bearer {token}", "Bearer nope"),
                                  ("Bearer nope", f"Bearer {token}"),
                                  (f"Bearer {token}", f"Bearer {token}"))):
            for method, path in (("GET", "/api/v1/token"), ("POST", "/api/v1/pools/bulk/pause"),
                                 ("GET", "/metrics")):
                resp = await anon.request(method, path, headers=[("Authorization", pair[0]),
                                                                 ("Authorization", pair[1])])
                assert resp.status_code == 401, (i, path, resp.text)
                assert resp.json() == {"error": "send one Authorization header, not several"}
    assert ("bulk", "*") not in node.scheduler.paused


async def test_an_unknown_query_parameter_is_a_422(tmp_path, sink, make_node):
    """Unknown JSON fields were refused, unknown query parameters ignored: pause?domian=…
    paused the whole pool, and delete?dry_run=true with {"all": true} deleted every message."""
    node = await make_node(config_text(tmp_path, sink.port))
    async with api_client(node, tmp_path) as client:
        resp = await client.post("/api/v1/pools/bulk/pause?domian=example.com")
        assert resp.status_code == 422, resp.text
        assert resp.json()["error"] == ("unknown query parameter 'domian' (this route takes:"
                                        " domain)")
        assert ("bulk", "*") not in node.scheduler.paused
        assert (await client.post("/api/v1/pools/bulk/pause")).status_code == 200
        queued = await client.post("/api/v1/messages", json={
            "from": "s@insurer.test", "to": ["a@example.com"], "text": "x"})
        assert queued.status_code == 202
        resp = await client.post("/api/v1/queue/delete?dry_run=true", json={"all": True})
        assert resp.status_code == 422, resp.text
        resp = await client.post("/api/v1/pools/bulk/lanes/example.com/purge?dry_run=1")
        assert resp.status_code == 422 and "this route takes none" in resp.json()["error"]
        resp = await client.get("/api/v1/queue/messages?sate=held&limit=5")
        assert resp.status_code == 422, resp.text
        listed = await client.get("/api/v1/queue/messages", params={
            "class": "marketing", "queue_id": [queued.json()["queue_id"], "x"], "limit": 5,
            "pool": "bulk", "state": "queued", "older_than": "0", "sender": "*"})
        assert listed.status_code == 200 and listed.json()["total_messages"] == 1, listed.text
        for path, params in (("/api/v1/suppressions", {"scope": "all", "limit": 5}),
                             ("/api/v1/dmarc/report", {"days": 7, "domain": "x"}),
                             ("/api/v1/queue/shape", {"by": "class", "top": 3}),
                             ("/api/v1/messages", {"recipient": "a@example.com"})):
            assert (await client.get(path, params=params)).status_code == 200, path


async def test_a_suppression_import_that_is_not_utf8_is_a_422(tmp_path, sink, make_node):
    """Bytes that are not UTF-8 became U+FFFD: "m\\xfcller@example.com" in Latin-1 was imported
    as "m\\ufffdller@example.com", suppressing nobody, and the import said it was done."""
    node = await make_node(config_text(tmp_path, sink.port))
    async with api_client(node, tmp_path) as client:
        resp = await client.post("/api/v1/suppressions/import",
                                 content="ok@example.com\nmüller@example.com\n".encode("latin-1"))
        assert resp.status_code == 422, resp.text
        assert resp.json()["error"].startswith("line 2: not UTF-8")
        assert (await client.get("/api/v1/suppressions")).json()["total"] == 0
        resp = await client.post("/api/v1/suppressions/import",
                                 content="müller@example.com\n".encode())
        assert resp.json() == {"imported": 1}


async def test_a_control_character_in_a_header_field_is_a_422(tmp_path, sink, make_node):
    """Only line breaks were refused: a NUL, ESC or DEL in a subject, header value, correlation
    id or file name went into the header as it was (``X-A: a\\x00Bcc: x``; a program that
    stops at the NUL reads another header than one that does not). A tab is white space."""
    node = await make_node(config_text(tmp_path, sink.port))
    env = {"from": "s@insurer.test", "to": ["a@example.com"], "text": "x"}
    async with api_client(node, tmp_path) as client:
        for char in "\x00\x01\x08\x1b\x1f\x7f\x80\x9b":
            for field, extra in (("subject", {"subject": f"a{char}Bcc: x@evil.test"}),
                                 ("headers.X-A", {"headers": {"X-A": f"a{char}b"}}),
                                 ("correlation_id", {"correlation_id": f"a{char}b"}),
                                 ("attachments.0.filename", {"attachments": [
                                     {"filename": f"a{char}b", "content": ""}]})):
                resp = await client.post("/api/v1/messages", json={**env, **extra})
                assert resp.status_code == 422, (repr(char), field, resp.text)
                assert f"body.{field}: must not contain a control character" in \
                    resp.json()["error"], resp.text
        resp = await client.post("/api/v1/messages", json={**env, "subject": "a\tb"})
        assert resp.status_code == 202, resp.text
    [arrival] = await sink.wait_for(1)
    assert b"\r\nSubject: a\tb\r\n" in arrival.data


async def test_content_header_fields_are_refused_not_dropped(tmp_path, sink, make_node):
    """``headers: {"Content-ID": ...}`` was accepted and silently dropped (the email package
    sets the Content-* fields of the part it builds); the docs say Content-* fields come from
    their own fields."""
    node = await make_node(config_text(tmp_path, sink.port))
    env = {"from": "s@insurer.test", "to": ["a@example.com"], "text": "x"}
    async with api_client(node, tmp_path) as client:
        for name in ("Content-ID", "content-disposition", "Content-Language"):
            resp = await client.post("/api/v1/messages",
                                     json={**env, "headers": {name: "<x@y>"}})
            assert resp.status_code == 422, (name, resp.text)
            assert f"headers: {name!r} is set from its own field" in resp.json()["error"]
    assert node.intake.accepted == 0


async def test_a_header_block_over_the_listeners_limit_is_a_413(tmp_path, sink, make_node):
    """The SMTP door refuses a header block over ``max_header_size`` (552 5.3.4); the API took
    one of any size below the message limit (a 20 MB header block, which receivers refuse
    after the node acknowledged it). The largest listener's limit applies, as for the size."""
    node = await make_node(config_text(tmp_path, sink.port,
                                       "[listeners.in.limits]\nmax_header_size = 4096\n"))
    env = {"from": "s@insurer.test", "to": ["a@example.com"]}
    big = "X-Big: " + "a" * 70 + "".join(f"\n\t{'b' * 70}" for _ in range(80))
    async with api_client(node, tmp_path) as client:
        for body in ({**env, "raw": f"Subject: s\n{big}\n\nbody\n"},
                     {**env, "raw": f"Subject: s\n{big}"},  # no body at all
                     {**env, "text": "x", "headers": {"X-Big": "a " * 2100}}):
            resp = await client.post("/api/v1/messages", json=body)
            assert resp.status_code == 413, resp.text
            assert "header block is" in resp.json()["error"]
            assert "the limit is 4096" in resp.json()["error"]
        resp = await client.post("/api/v1/messages",
                                 json={**env, "raw": "Subject: s\n\n" + "body line\n" * 1000})
        assert resp.status_code == 202, resp.text
    assert node.intake.accepted == 1


async def test_a_header_field_given_twice_is_a_422(tmp_path, sink, make_node):
    """``headers`` names differing only in case were two fields: ``Message-ID`` and
    ``message-id`` (or Reply-To, Sender, ...) made the email package raise, a 500; two
    ``X-A`` fields, or the correlation header beside ``correlation_id``, went out twice (intake
    took the first as the correlation id, a reader may take the other)."""
    node = await make_node(config_text(tmp_path, sink.port))
    env = {"from": "s@insurer.test", "to": ["a@example.com"], "text": "x"}
    async with api_client(node, tmp_path) as client:
        for headers in ({"Message-ID": "<a@b>", "message-id": "<c@d>"},
                        {"Reply-To": "a@b.example", "REPLY-TO": "c@d.example"},
                        {"X-A": "1", "x-a": "2"}):
            resp = await client.post("/api/v1/messages", json={**env, "headers": headers})
            assert resp.status_code == 422, (headers, resp.text)
            assert "given twice" in resp.json()["error"], resp.text
        resp = await client.post("/api/v1/messages", json={
            **env, "correlation_id": "c1", "headers": {"x-correlation-id": "c2"}})
        assert resp.status_code == 422, resp.text
        assert "correlation_id" in resp.json()["error"]
    assert node.intake.accepted == 0


async def test_an_encoded_line_break_cannot_inject_a_header_field(tmp_path, sink, make_node):
    """An RFC 2047 encoded word is decoded by the email package when a field is set, and on
    Python before 3.11.10 (CVE-2024-6923) written out with the line break it decodes to: a
    subject of ``=?utf-8?b?DQpCY2M6IHg=?=`` (CR LF ``Bcc: x``) put a Bcc field of its own into
    the message. Such a value is a 422, as a raw line break is; an encoded word that decodes to
    text is kept (it is how a client writes a non-ASCII subject itself)."""
    node = await make_node(config_text(tmp_path, sink.port))
    env = {"from": "s@insurer.test", "to": ["a@example.com"], "text": "x"}
    crlf_b = "=?utf-8?b?DQpCY2M6IGV2aWxAYXR0YWNrZXIudGVzdA==?="  # "\r\nBcc: evil@attacker.test"
    crlf_q = "=?utf-8?q?a=0D=0ABcc:_evil@attacker.test?="
    nul_q = "=?iso-8859-1?Q?a=00b?="
    async with api_client(node, tmp_path) as client:
        for value in (crlf_b, crlf_q, nul_q, f"ok {crlf_b.upper().replace('?B?', '?b?')}"):
            for field, extra in (("subject", {"subject": value}),
                                 ("headers.X-A", {"headers": {"X-A": value}}),
                                 ("headers.Message-ID", {"headers": {"Message-ID": value}}),
                                 ("correlation_id", {"correlation_id": value}),
                                 ("attachments.0.filename", {"attachments": [
                                     {"filename": value, "content": ""}]})):
                resp = await client.post("/api/v1/messages", json={**env, **extra})
                assert resp.status_code == 422, (value, field, resp.text)
                assert f"body.{field}: " in resp.json()["error"], resp.text
                assert "encoded word" in resp.json()["error"], resp.text
        resp = await client.post("/api/v1/messages", json={
            **env, "subject": "=?utf-8?q?Gr=C3=BC=C3=9Fe?="})
        assert resp.status_code == 202, resp.text
    [arrival] = await sink.wait_for(1)
    assert b"Bcc" not in arrival.data and b"attacker" not in arrival.data
    assert "Grüße" in str(email.message_from_bytes(arrival.data, policy=email.policy.default)[
        "Subject"])


def test_a_value_written_as_two_fields_is_refused_whatever_passed_the_checks() -> None:
    """The second line of defence: the built message is read back, and a value the email
    package wrote as more than one field (here unvalidated, as a future email package or a
    missed encoding might) is refused instead of sent."""
    msg = MessageIn.model_construct(
        from_="s@insurer.test", to=["a@example.com"], cc=[], bcc=[], subject=None, text="x",
        html=None, headers={"X-A": "=?utf-8?b?DQpCY2M6IHg=?="}, attachments=[], raw=None,
        raw_base64=None, class_=None, correlation_id=None)
    with pytest.raises(UnwritableHeader):
        msg.build("X-Correlation-ID")


async def test_a_header_value_the_email_package_cannot_write_is_a_422(tmp_path, sink, make_node):
    """Address fields in ``headers`` are parsed by the email package, which raised on some
    values (``Resent-From: <`` an IndexError, ``Message-ID: ü@ü`` a UnicodeEncodeError): a 500."""
    node = await make_node(config_text(tmp_path, sink.port))
    env = {"from": "s@insurer.test", "to": ["a@example.com"], "text": "x"}
    async with api_client(node, tmp_path) as client:
        for name, value in (("Resent-From", "<"), ("Resent-To", '"'), ("Message-ID", "ü@ü")):
            resp = await client.post("/api/v1/messages", json={**env, "headers": {name: value}})
            assert resp.status_code == 422, (name, value, resp.text)
            assert resp.json()["error"].startswith("a header field cannot be written")
    assert node.intake.accepted == 0


async def test_an_age_past_a_floats_range_is_a_422(tmp_path, sink, make_node):
    """``{"older_than": 1e400}`` written out as an integer was a 500 (OverflowError turning it
    into a float); NaN and Infinity, which Python's JSON reader takes, and a duration text whose
    seconds overflow were ages that match nothing or everything."""
    node = await make_node(config_text(tmp_path, sink.port))
    async with api_client(node, tmp_path) as client:
        for body in ('{"older_than": 1' + "0" * 400 + ', "dry_run": true}',
                     '{"older_than": NaN, "dry_run": true}',
                     '{"younger_than": Infinity, "dry_run": true}',
                     '{"older_than": "' + "9" * 400 + 'd", "dry_run": true}'):
            resp = await client.post("/api/v1/queue/hold", content=body,
                                     headers={"content-type": "application/json"})
            assert resp.status_code == 422, (body[:40], resp.text)
            assert "not a duration" in resp.json()["error"]
        resp = await client.get("/api/v1/queue/messages", params={"older_than": "9" * 400})
        assert resp.status_code == 422, resp.text
        ok = await client.post("/api/v1/queue/hold", json={"older_than": 10**20, "dry_run": True})
        assert ok.status_code == 200, ok.text


async def test_an_unknown_suppression_field_is_a_422(tmp_path, sink, make_node):
    """An unknown field was ignored: ``"scop": "all"`` (misspelt) suppressed the address for
    marketing only, and the caller was told 201 with the narrower scope."""
    node = await make_node(config_text(tmp_path, sink.port))
    async with api_client(node, tmp_path) as client:
        resp = await client.post("/api/v1/suppressions",
                                 json={"address": "x@example.com", "scop": "all"})
        assert resp.status_code == 422, resp.text
        assert resp.json()["details"][0]["field"] == "body.scop"
        assert (await client.get("/api/v1/suppressions")).json()["total"] == 0


async def test_head_is_answered_as_get_without_a_body(tmp_path, sink, make_node):
    """HEAD was a 405 on every path (FastAPI routes GET only), and Allow left it out: a
    monitor's HEAD /api/v1/status or HEAD /metrics read as a broken API (RFC 9110 9.1: GET and
    HEAD must be served)."""
    node = await make_node(config_text(tmp_path, sink.port))
    async with api_client(node, tmp_path) as client:
        for path in ("/api/v1/status", "/metrics", "/api/v1/suppressions", "/"):
            get = await client.get(path)
            head = await client.head(path)
            assert head.status_code == get.status_code == 200, (path, head.status_code)
            assert head.headers["content-type"] == get.headers["content-type"], path
            assert head.content == b"", path
        resp = await client.head("/api/v1/suppressions?limit=0")
        assert resp.status_code == 422 and resp.content == b""
        resp = await client.head("/api/v1/queue/hold")
        assert resp.status_code == 405 and resp.headers["allow"] == "POST"
        assert (await client.put("/api/v1/status")).headers["allow"] == "GET, HEAD"
        async with api_client(node, tmp_path, token="") as anon:
            assert (await anon.head("/api/v1/status")).status_code == 401


async def test_an_import_time_that_is_no_time_is_a_422(tmp_path, sink, make_node):
    """A created or expires of "nan" was taken as a float: SQLite stored NULL in a NOT NULL
    column, the write failed and the import never answered; "inf" could not be listed (JSON
    has no Infinity) and "notadate" answered with Python's float() message."""
    node = await make_node(config_text(tmp_path, sink.port))
    async with api_client(node, tmp_path) as client:
        for row in ("a@example.com,all,r,s,nan", "a@example.com,all,r,s,inf",
                    "a@example.com,all,r,s,,NaN", "a@example.com,all,r,s,,-inf",
                    "a@example.com,all,r,s,-5", "a@example.com,all,r,s,1e300",
                    "a@example.com,all,r,s,notadate"):
            resp = await client.post("/api/v1/suppressions/import",
                                     content=f"ok@example.com\n{row}\n")
            assert resp.status_code == 422, (row, resp.text)
            assert resp.json()["error"].startswith("line 2: "), row
            assert "not a Unix time" in resp.json()["error"], row
        listed = await client.get("/api/v1/suppressions")
        assert listed.json()["total"] == 0
        resp = await client.post("/api/v1/suppressions/import",
                                 content="b@example.com,all,r,s,1700000000,4102444800\n")
        assert resp.json() == {"imported": 1}
        entry = (await client.get("/api/v1/suppressions")).json()["entries"][0]
        assert (entry["created"], entry["expires"]) == (1700000000, 4102444800)


async def test_a_json_body_that_is_not_utf8_is_a_400(tmp_path, sink, make_node):
    """RFC 8259 8.1: JSON between systems MUST be UTF-8. A UTF-16 or UTF-32 body was queued
    (Python's json reads bytes in any of them); a byte that is not UTF-8, JSON nested too deep
    or a number of 5,000 digits got "There was an error parsing the body"."""
    node = await make_node(config_text(tmp_path, sink.port))
    body = {"from": "s@insurer.test", "to": ["a@example.com"], "text": "grüße"}
    text = json.dumps(body, ensure_ascii=False)
    json_type = {"content-type": "application/json"}
    async with api_client(node, tmp_path) as client:
        for encoding in ("utf-16", "utf-16-le", "utf-16-be", "utf-32", "utf-32-le"):
            for path in ("/api/v1/messages", "/api/v1/queue/hold", "/api/v1/suppressions"):
                resp = await client.post(path, content=text.encode(encoding), headers=json_type)
                assert resp.status_code == 400, (encoding, path, resp.text)
                assert resp.json() == {"error": f"the body is {encoding.upper()}: JSON must be"
                                                " UTF-8 (RFC 8259 8.1)"}
        for raw, byte in ((text.encode("latin-1"), "b'\\xfc'"),  # a UTF-8 encoded surrogate:
                          (b'{"text": "\xed\xa0\x80"}', "b'\\xed'")):  # not UTF-8 either
            resp = await client.post("/api/v1/messages", content=raw, headers=json_type)
            assert resp.status_code == 400, resp.text
            error = resp.json()["error"]
            assert error.startswith("the body is not UTF-8 (byte ") and byte in error, error
        resp = await client.post("/api/v1/queue/hold", content=b"[" * 100_000, headers=json_type)
        assert resp.status_code == 400
        assert resp.json() == {"error": "the body's JSON is nested too deeply to read"}
        resp = await client.post("/api/v1/queue/hold", headers=json_type,
                                 content=b'{"older_than": 1' + b"0" * 5000 + b"}")
        assert resp.status_code == 400
        assert "cannot be read: Exceeds the limit" in resp.json()["error"], resp.text
        # the charset parameter has no effect (RFC 8259 11); a byte order mark is ignored
        utf16_label = {"content-type": "application/json; charset=utf-16"}
        for content, headers in ((text.encode(), utf16_label),
                                 (b"\xef\xbb\xbf" + text.encode(), json_type)):
            resp = await client.post("/api/v1/messages", content=content, headers=headers)
            assert resp.status_code == 202, resp.text
    assert node.intake.accepted == 2


async def test_a_query_parameter_given_twice_is_a_422(tmp_path, sink, make_node):
    """The last of two values counted and the first was dropped without a word:
    pause?domain=a.example&domain=b.example paused b.example only, and a listing with
    pool=bulk&pool=critical listed critical. Only queue_id takes several values."""
    node = await make_node(config_text(tmp_path, sink.port))
    async with api_client(node, tmp_path) as client:
        for method, path, query in (
                ("POST", "/api/v1/pools/bulk/pause", "domain=a.example&domain=b.example"),
                ("POST", "/api/v1/pools/bulk/resume", "domain=a.example&domain=a.example"),
                ("GET", "/api/v1/queue/messages", "pool=bulk&pool=critical"),
                ("GET", "/api/v1/queue/messages", "limit=1&queue_id=x&limit=2"),
                ("GET", "/api/v1/suppressions", "scope=all&scope=marketing"),
                ("GET", "/api/v1/queue/shape", "by=class&by=domain")):
            resp = await client.request(method, f"{path}?{query}")
            assert resp.status_code == 422, (path, query, resp.text)
            name = query.split("=")[0] if "queue_id" not in query else "limit"
            assert resp.json()["error"] == (f"query parameter {name!r} given 2 times: give it"
                                            " once"), resp.text
        assert not node.scheduler.paused
        resp = await client.get("/api/v1/queue/messages?queue_id=a&queue_id=b&limit=5")
        assert resp.status_code == 200, resp.text


async def test_a_header_value_that_cannot_be_written_is_named(tmp_path, sink, make_node):
    """The 422 for a value the email package cannot parse or write quoted its exception:
    "a header field cannot be written: list index out of range" for Message-ID: <<<>>>,
    "string index out of range" for Reply-To, an 'ascii' codec error for Message-ID: ü@ü."""
    node = await make_node(config_text(tmp_path, sink.port))
    env = {"from": "s@insurer.test", "to": ["a@example.com"], "text": "x"}
    async with api_client(node, tmp_path) as client:
        for name, value in (("Message-ID", "<<<>>>"), ("Reply-To", "a@example.com, <"),
                            ("Resent-From", "<"), ("Resent-To", '"'), ("Message-ID", "ü@ü")):
            resp = await client.post("/api/v1/messages", json={**env, "headers": {name: value}})
            assert resp.status_code == 422, (name, value, resp.text)
            assert resp.json() == {"error": f"a header field cannot be written: headers.{name}:"
                                            f" {value!r} is not a valid {name} field"}
    assert node.intake.accepted == 0


async def test_a_message_attachment_is_attached_as_a_message(tmp_path, sink, make_node):
    """A message/rfc822 attachment (a forwarded e-mail) was refused with "a header field value
    would be written as more than one field": the email package base64-encoded it, which RFC
    2046 5.2.1 forbids for a message/rfc822 part, and the read-back check saw another part.
    Other message/* and multipart/* types were built as parts no reader can take apart
    (multipart/mixed without a boundary) or refused with the same wrong reason."""
    node = await make_node(config_text(tmp_path, sink.port))
    inner = b"From: a@example.com\r\nTo: b@example.com\r\nSubject: forwarded\r\n\r\nbody\r\n"
    env = {"from": "s@insurer.test", "to": ["a@example.com"], "text": "see attached"}
    async with api_client(node, tmp_path) as client:
        resp = await client.post("/api/v1/messages", json={**env, "attachments": [
            {"filename": "fwd.eml", "content_type": "message/rfc822",
             "content": base64.b64encode(inner).decode()}]})
        assert resp.status_code == 202, resp.text
        [arrival] = await sink.wait_for(1)
        parsed = email.message_from_bytes(arrival.data, policy=email.policy.default)
        [part] = [p for p in parsed.walk() if p.get_content_type() == "message/rfc822"]
        assert part["Content-Transfer-Encoding"] in (None, "7bit", "8bit")
        assert part.get_filename() == "fwd.eml"
        assert part.get_content()["Subject"] == "forwarded"
        for content_type in ("message/partial", "message/external-body", "multipart/mixed",
                             "multipart/alternative"):
            resp = await client.post("/api/v1/messages", json={**env, "attachments": [
                {"filename": "x", "content_type": content_type, "content": "eA=="}]})
            assert resp.status_code == 422, (content_type, resp.text)
            assert resp.json()["error"] == (
                f"invalid request: body.attachments.0.content_type: {content_type} cannot be"
                " attached (a part of that type holds parts, not data): attach a message as"
                " message/rfc822, anything else as application/octet-stream"), resp.text
    assert node.intake.accepted == 1


async def test_a_suppression_reason_holds_no_control_character(tmp_path, sink, make_node):
    """POST /suppressions refused ESC in a reason, but an import took it (and NUL, CR LF in a
    quoted field), and POST took C1 controls (CSI, NEL) and U+2028: `postlane suppress list`
    printed them as they were to the operator's terminal."""
    node = await make_node(config_text(tmp_path, sink.port))
    async with api_client(node, tmp_path) as client:
        for reason in ("a\x1b[2Jb", "a\x9bb", "a\x85b", "a\u2028b", "a\x00b"):
            resp = await client.post("/api/v1/suppressions",
                                     json={"address": "x@example.com", "reason": reason})
            assert resp.status_code == 422, (reason, resp.text)
            assert "body.reason: must not contain a control character" in \
                resp.json()["error"], resp.text
        for row in ("b@example.com,all,a\x1b[31mb", "b@example.com,all,\"a\r\nb\"",
                    "b@example.com,all,a\x9bb", "b@example.com,all,a\u2029b"):
            resp = await client.post("/api/v1/suppressions/import",
                                     content=f"ok@example.com\n{row}\n".encode())
            assert resp.status_code == 422, (row, resp.text)
            assert resp.json()["error"].startswith(
                "line 2: reason: must not contain a control character"), resp.text
        assert (await client.get("/api/v1/suppressions")).json()["total"] == 0
        resp = await client.post("/api/v1/suppressions/import",
                                 content="c@example.com,all,tab\there ünïcode\n".encode())
        assert resp.json() == {"imported": 1}, resp.text


async def test_a_read_only_token_is_refused_before_its_body_is_read(tmp_path, sink, make_node):
    """A read-only token's POST got 422, 400 or 413 about its body (the node read and parsed
    it) instead of the 403 it gets for any change; the 403 came only for a well-formed one."""
    node = await make_node(config_text(tmp_path, sink.port))
    viewer = add_token(tmp_path / "api-tokens.json", "viewer", read_only=True)
    json_type = {"content-type": "application/json"}
    async with api_client(node, tmp_path, token=viewer) as client:
        for content in (b"{", b'{"from": 1}', "{}".encode("utf-16"), b"x" * 300_000):
            for path in ("/api/v1/messages", "/api/v1/queue/delete", "/api/v1/suppressions"):
                resp = await client.post(path, content=content, headers=json_type)
                assert resp.status_code == 403, (path, content[:10], resp.text)
                assert resp.json() == {"error": "token 'viewer' is read-only: it cannot POST"
                                                f" {path}"}
        resp = await client.delete("/api/v1/suppressions/x@example.com?bogus=1")
        assert resp.status_code == 403, resp.text
        assert (await client.get("/api/v1/token")).json() == {"name": "viewer",
                                                              "read_only": True}
    assert node.intake.accepted == 0


async def test_a_suppressed_address_with_a_slash_can_be_removed(tmp_path, sink, make_node):
    """a/b@example.com is an address (and the API queues mail to it), and POST /suppressions
    added it, but DELETE /suppressions/a%2Fb@example.com was 404 "Not Found": the path
    parameter stopped at the slash, so no route matched."""
    node = await make_node(config_text(tmp_path, sink.port))
    async with api_client(node, tmp_path) as client:
        for address in ("a/b@example.com", "a//b/@example.com"):
            resp = await client.post("/api/v1/suppressions",
                                     json={"address": address, "scope": "all"})
            assert resp.status_code == 201, resp.text
            quoted = address.replace("/", "%2F")
            resp = await client.delete(f"/api/v1/suppressions/{quoted}?scope=all")
            assert resp.json() == {"removed": 1}, (address, resp.text)
        assert (await client.get("/api/v1/suppressions")).json()["total"] == 0
        resp = await client.delete("/api/v1/suppressions/x%2Fy@example.com")
        assert resp.status_code == 404
        assert resp.json() == {"error": "x/y@example.com is not suppressed"}


async def test_a_raw_message_with_its_own_correlation_field_and_correlation_id_is_a_422(
        tmp_path, sink, make_node):
    """The structured form refused the correlation header beside ``correlation_id``; a raw
    message with an X-Correlation-ID field was queued with two (the given id prepended):
    accounting took one, the recipient's reader may take the other."""
    node = await make_node(config_text(tmp_path, sink.port))
    env = {"from": "s@insurer.test", "to": ["a@example.com"], "correlation_id": "mine"}
    raw = "Subject: x\r\nx-correlation-id: other\r\n\r\nbody\r\n"
    async with api_client(node, tmp_path) as client:
        for extra in ({"raw": raw}, {"raw_base64": base64.b64encode(raw.encode()).decode()},
                      {"raw": raw.replace("\r\n", "\n")}):
            resp = await client.post("/api/v1/messages", json={**env, **extra})
            assert resp.status_code == 422, resp.text
            assert resp.json() == {"error": "raw: the message has an X-Correlation-ID field:"
                                            " give the id there or in correlation_id, not"
                                            " both"}
        # in the body it is no field; without correlation_id the message's own one counts
        body_only = "Subject: x\r\n\r\nX-Correlation-ID: other\r\n"
        resp = await client.post("/api/v1/messages", json={**env, "raw": body_only})
        assert resp.status_code == 202, resp.text
        env.pop("correlation_id")
        resp = await client.post("/api/v1/messages", json={**env, "raw": raw})
        assert resp.status_code == 202, resp.text
    assert node.intake.accepted == 2


async def test_a_suppression_listing_pattern_has_one_wildcard(tmp_path, sink, make_node):
    """``like`` is documented with ``*`` as its wildcard, but went to SQL LIKE as it was:
    ``_`` (common in addresses) matched any one character and ``%`` anything, so
    like=first_last@example.com listed firstXlast@example.com too."""
    node = await make_node(config_text(tmp_path, sink.port))
    async with api_client(node, tmp_path) as client:
        resp = await client.post("/api/v1/suppressions/import", content=(
            b"first_last@example.com\nfirstxlast@example.com\n100%@example.com\n"
            b"1000@example.com\n"))  # (an unquoted backslash is no address: refused)
        assert resp.json() == {"imported": 4}, resp.text
        for like, found in (("first_last@example.com", ["first_last@example.com"]),
                            ("100%@example.com", ["100%@example.com"]),
                            ("%", []), ("_*", []),
                            ("back\\slash@*", []), ("\\", []), ("*\\", []),
                            ("first*", ["first_last@example.com", "firstxlast@example.com"]),
                            ("*0*", ["100%@example.com", "1000@example.com"])):
            resp = await client.get("/api/v1/suppressions", params={"like": like})
            assert [e["address"] for e in resp.json()["entries"]] == found, (like, resp.text)


async def test_a_json_name_given_twice_is_a_422(tmp_path, sink, make_node):
    """{"dry_run": true, "dry_run": false} deleted for real: the last value counted (as a
    repeated query parameter did), where a reader that takes the first (a proxy, a log, the
    operator reading the request) saw a dry run. RFC 8259 4: names SHOULD be unique."""
    node = await make_node(config_text(tmp_path, sink.port))
    json_type = {"content-type": "application/json"}
    async with api_client(node, tmp_path) as client:
        await client.post("/api/v1/pools/bulk/pause")
        queued = await client.post("/api/v1/messages", json={
            "from": "s@insurer.test", "to": ["a@example.com"], "text": "x"})
        assert queued.status_code == 202
        for body, name in ((b'{"all": true, "dry_run": true, "dry_run": false}', "dry_run"),
                           (b'{"pool": "bulk", "state": "queued", "all": false, "all": true}',
                            "all"),
                           (b'{"queue_ids": [], "x": {"a": 1, "a": 2}}', "a")):
            resp = await client.post("/api/v1/queue/delete", content=body, headers=json_type)
            assert resp.status_code == 422, (body, resp.text)
            assert resp.json() == {"error": f"the body's JSON gives the name {name!r} twice:"
                                            " give each name once"}
        assert node.scheduler.queued() == 1


async def test_json_that_is_not_well_formed_says_what_is_wrong(tmp_path, sink, make_node):
    """The 422 for JSON that is not well formed said only "body.1: JSON decode error": the
    position, not what is wrong there."""
    node = await make_node(config_text(tmp_path, sink.port))
    json_type = {"content-type": "application/json"}
    async with api_client(node, tmp_path) as client:
        for content, field, why in ((b"{", "body.1", "Expecting property name enclosed in"
                                                     " double quotes"),
                                    (b'{"all": tru}', "body.8", "Expecting value"),
                                    (b'{"all": true} x', "body.14", "Extra data")):
            resp = await client.post("/api/v1/queue/hold", content=content, headers=json_type)
            assert resp.status_code == 422, resp.text
            assert resp.json() == {
                "error": f"invalid request: {field}: JSON is not well formed: {why}",
                "details": [{"field": field, "message": f"JSON is not well formed: {why}"}]}


async def test_a_path_with_a_trailing_slash_is_no_redirect(tmp_path, sink, make_node):
    """``/metrics/`` answered 307 with a Location built from the request's Host header (any
    host a client names); a path the API does not serve is a 404, with or without a slash."""
    node = await make_node(config_text(tmp_path, sink.port))
    async with api_client(node, tmp_path) as client:
        for path in ("/metrics/", "/api/v1/status/", "/api/v1/pools/"):
            resp = await client.get(path, headers={"Host": "evil.example"})
            assert resp.status_code == 404, (path, resp.status_code, resp.headers)
            assert "location" not in resp.headers
            assert resp.json()["error"], resp.text
        assert (await client.get("/api/v1/status")).status_code == 200


def _timed_config(tmp_path, sink_port: int, read_timeout: float = 0.5) -> str:
    """The test config with a short ``[api] read_timeout``."""
    return config_text(tmp_path, sink_port).replace(
        "[api]\n", f"[api]\nread_timeout = {read_timeout}\n")


async def _connect(node) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", node.api.port)


async def _until_closed(reader: asyncio.StreamReader) -> bytes:
    """Everything the node sends until it closes the connection (a guard of 20 s fails a
    node that never does)."""
    return await asyncio.wait_for(reader.read(), 20)


def _head(path: str, token: str, *fields: str) -> bytes:
    lines = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1", f"Authorization: Bearer {token}",
             "Content-Type: application/json", *fields]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def _status_and_json(answer: bytes) -> tuple[int, dict]:
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), json.loads(body)


async def test_a_body_shorter_than_its_length_is_a_408_and_closed(tmp_path, sink, make_node):
    """A client that sent part of its body and waited held the connection and the handler
    reading the body for ever: now a 408 after [api] read_timeout, and the connection closes."""
    node = await make_node(_timed_config(tmp_path, sink.port))
    token = (tmp_path / "api-token").read_text().strip()
    for path in ("/api/v1/messages", "/api/v1/suppressions/import", "/api/v1/feedback/reports"):
        reader, writer = await _connect(node)
        writer.write(_head(path, token, "Content-Length: 100") + b'{"from": "a@')
        answer = await _until_closed(reader)
        writer.close()
        status, body = _status_and_json(answer)
        assert status == 408, answer
        assert body == {"error": "the request body did not arrive within 0.5 s"}
        assert b"connection: close" in answer.lower()
    async with api_client(node, tmp_path) as client:
        assert (await client.get("/api/v1/status")).status_code == 200
    assert node.intake.accepted == 0


async def test_a_request_head_cannot_hold_a_connection(tmp_path, sink, make_node):
    """uvicorn bounds the time between requests only until the next byte comes: a connection
    that sent nothing, a head dripped a byte at a time (slowloris) or a body left unfinished
    after the answer (a 401, read by nobody) was held for ever. Now each is closed after
    [api] read_timeout, however it drips."""
    node = await make_node(_timed_config(tmp_path, sink.port))
    reader, writer = await _connect(node)  # silent
    assert await _until_closed(reader) == b""
    writer.close()

    reader, writer = await _connect(node)  # a head that never ends, one byte every 0.05 s
    writer.write(b"GET /api/v1/status HTTP/1.1\r\nHost: 127.0.0.1\r\n")
    for _ in range(400):  # at most 20 s
        if reader.at_eof():
            break
        writer.write(b"X")
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(reader.read(), 0.05)
    assert reader.at_eof()
    writer.close()

    reader, writer = await _connect(node)  # anonymous, with the body never sent
    writer.write(_head("/api/v1/messages", "wrong", "Content-Length: 100") + b"{")
    answer = await reader.readuntil(b"\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 401 ")
    writer.write(b"x")  # a byte more: uvicorn's keep-alive timer stops
    assert (await _until_closed(reader)).endswith(b"}")  # the rest of the 401, then the close
    writer.close()

    async with api_client(node, tmp_path) as client:  # a client that keeps up is served
        assert (await client.get("/api/v1/status")).status_code == 200


async def test_content_length_with_transfer_encoding_is_a_400_and_closed(tmp_path, sink,
                                                                         make_node):
    """A request with both Content-Length and Transfer-Encoding: chunked was read chunked, so
    what a proxy going by the length took for its body was a second request to the node
    (request smuggling). Now a 400 and the connection is closed: the rest is never read."""
    node = await make_node(config_text(tmp_path, sink.port))
    token = (tmp_path / "api-token").read_text().strip()
    smuggled = (f"POST /api/v1/pools/bulk/pause HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                f"Authorization: Bearer {token}\r\nContent-Length: 0\r\n\r\n").encode()
    body = b"0\r\n\r\n" + smuggled
    for framing in ((f"Content-Length: {len(body)}", "Transfer-Encoding: chunked"),
                    ("Transfer-Encoding: chunked", f"content-length: {len(body)}")):
        reader, writer = await _connect(node)
        writer.write(_head("/api/v1/queue/hold", token, *framing) + body)
        answer = await _until_closed(reader)
        writer.close()
        assert answer.count(b"HTTP/1.1 ") == 1, answer  # the smuggled one got no answer
        status, error = _status_and_json(answer)
        assert status == 400, answer
        assert "Content-Length and Transfer-Encoding" in error["error"]
    async with api_client(node, tmp_path) as client:
        pools = {p["pool"]: p for p in (await client.get("/api/v1/status")).json()["pools"]}
        assert pools["bulk"]["paused"] is False


async def test_a_yes_no_field_takes_true_or_false_only(tmp_path, sink, make_node):
    """A boolean of a JSON body was pydantic's lax one: "yes", "on", "t", "1", 1 were true and
    "no", "off", "f", "0", 0 false, so ``"dry_run": "n"`` acted for real. JSON has true and
    false; anything else is a 422 naming the field, and nothing is done."""
    node = await make_node(config_text(tmp_path, sink.port))
    async with api_client(node, tmp_path) as client:
        assert (await client.post("/api/v1/pools/bulk/pause")).status_code == 200
        qid = (await client.post("/api/v1/messages", json={
            "from": "a@insurer.test", "to": ["b@example.com"], "text": "x"})).json()["queue_id"]
        for value in ("yes", "on", "t", "1", "true", 1, 0, "no", "off", "0", "false", None):
            for path, field, body in (
                    ("/api/v1/queue/hold", "all", {"dry_run": True}),
                    ("/api/v1/queue/hold", "dry_run", {"all": True}),
                    ("/api/v1/queue/delete", "dsn", {"all": True, "dry_run": True})):
                resp = await client.post(path, json={**body, field: value})
                assert resp.status_code == 422, (path, field, value, resp.text)
                assert resp.json()["details"] == [
                    {"field": f"body.{field}", "message": "Input should be a valid boolean"}]
        resp = await client.post("/api/v1/queue/hold", json={"all": True, "dry_run": True})
        assert resp.json()["recipients"] == 1
        resp = await client.post("/api/v1/queue/hold", json={"all": True, "dry_run": False})
        assert resp.json()["recipients"] == 1
        state = (await client.get(f"/api/v1/queue/messages/{qid}")).json()
        assert {r["state"] for r in state["recipients"]} == {"held"}



async def test_every_yes_no_field_of_the_api_is_strict(tmp_path, sink, make_node):
    """Every boolean of a body the node's API reads has the one strict type
    (``jsonbody.Flag``), and no query parameter is FastAPI's lax boolean: a field added later
    keeps the rule (docs/api.md)."""
    node = await make_node(config_text(tmp_path, sink.port))
    app = node.api._server.config.app
    found = []

    def check(model: type[BaseModel], where: str) -> None:
        for name, info in model.model_fields.items():
            kinds = get_args(info.annotation) or (info.annotation,)
            if bool in kinds:
                found.append(f"{where}.{name}")
                assert Strict(strict=True) in info.metadata, f"{where}.{name} is a lax bool"
            for kind in kinds:
                if isinstance(kind, type) and issubclass(kind, BaseModel):
                    check(kind, f"{where}.{name}")

    def api_routes(routes: list) -> Iterator[APIRoute]:
        for route in routes:
            if isinstance(route, APIRoute):
                yield route
            elif hasattr(route, "original_router"):  # FastAPI's included router
                yield from api_routes(route.original_router.routes)

    for route in api_routes(app.routes):
        for param in route.dependant.body_params:
            if isinstance(param.field_info.annotation, type) and issubclass(
                    param.field_info.annotation, BaseModel):
                check(param.field_info.annotation, f"{route.path} body")
        for dep in [route.dependant, *route.dependant.dependencies]:
            for param in dep.query_params:
                assert bool not in (get_args(param.field_info.annotation)
                                    or (param.field_info.annotation,)), (route.path, param.name)
    assert "/queue/delete body.dsn" in found and len(found) >= 9


async def test_the_recipient_cap_counts_to_cc_and_bcc_together(tmp_path, sink, make_node):
    """``to``, ``cc`` and ``bcc`` took 1,000 addresses each, so one message had 3,000
    recipients: the cap is 1,000 for all of them together, a 422 naming it."""
    node = await make_node(config_text(tmp_path, sink.port))

    def addresses(field: str, count: int) -> list[str]:
        return [f"{field}{i}@example.com" for i in range(count)]

    async with api_client(node, tmp_path) as client:
        assert (await client.post("/api/v1/pools/bulk/pause")).status_code == 200
        for counts in ((400, 400, 201), (1, 0, 1000), (1000, 1, 0), (334, 334, 334)):
            body = {"from": "a@insurer.test", "text": "x",
                    **{f: addresses(f, n) for f, n in zip(("to", "cc", "bcc"),
                                                              counts, strict=True)}}
            resp = await client.post("/api/v1/messages", json=body)
            assert resp.status_code == 422, (counts, resp.text)
            assert resp.json()["details"] == [{
                "field": "body", "message": f"{sum(counts)} recipients (to, cc and bcc"
                                            " together): at most 1000 a message"}]
        body = {"from": "a@insurer.test", "text": "x", "to": addresses("to", 400),
                "cc": addresses("cc", 400), "bcc": addresses("bcc", 200)}
        resp = await client.post("/api/v1/messages", json=body)
        assert resp.status_code == 202, resp.text
        assert resp.json()["recipients"] == 1000
    assert node.intake.accepted == 1


async def test_connections_beyond_the_cap_are_closed_at_once(tmp_path, sink, make_node):
    """Anyone who could reach the API could open connections without end (no token needed to
    connect), each a file descriptor of the node's, which the SMTP listeners need too: beyond
    [api] max_connections a new one is closed at once, and served again when one is free."""
    node = await make_node(config_text(tmp_path, sink.port).replace(
        "[api]\n", "[api]\nmax_connections = 3\n"))
    held = [await _connect(node) for _ in range(3)]
    reader, writer = await _connect(node)
    writer.write(b"GET /openapi.json HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    assert await _until_closed(reader) == b""
    writer.close()
    for _, w in held:
        w.close()
    async with api_client(node, tmp_path) as client:
        async def served() -> bool:
            try:
                return (await client.get("/api/v1/status")).status_code == 200
            except httpx.TransportError:
                return False
        assert await until(served, what="the API serving again")


async def test_a_request_that_is_no_http_gets_the_apis_json_error(tmp_path, sink, make_node):
    """uvicorn answered a request it could not read (a malformed head, a Transfer-Encoding
    other than chunked) with a text/plain 400, the one error of the API
    that was not ``{"error": ...}``; the connection is closed after it, as before."""
    node = await make_node(config_text(tmp_path, sink.port))
    for request in (b"GARBAGE\r\n\r\n",
                    b"POST /api/v1/queue/hold HTTP/1.1\r\nHost: a\r\n"
                    b"Transfer-Encoding: gzip\r\n\r\n"):
        reader, writer = await _connect(node)
        writer.write(request)
        answer = await _until_closed(reader)
        writer.close()
        status, body = _status_and_json(answer)
        assert status == 400, answer
        assert b"content-type: application/json" in answer.lower()
        assert body == {"error": "the request is not valid HTTP/1.1 (RFC 9112)"}


async def test_uvicorns_warnings_are_the_nodes_log_lines_told_once_a_minute(tmp_path, sink,
                                                                           make_node, caplog):
    """uvicorn logged each request it could not read in its own format, beside the node's
    handlers (its dictConfig at every API start), once per request: a client sending garbage
    in a loop wrote a line per connection. Now uvicorn's lines go through the node's logging,
    the same warning once a minute with the count of those left out."""
    from postlane.api.server import _ONCE_PER_MINUTE as told_once
    node = await make_node(config_text(tmp_path, sink.port))
    told_once.last.clear()  # (one process: earlier tests' garbage)
    told_once.left_out.clear()
    caplog.set_level("WARNING")
    for _ in range(20):
        reader, writer = await _connect(node)
        writer.write(b"GARBAGE\r\n\r\n")
        await _until_closed(reader)
        writer.close()
    told = [r for r in caplog.records if r.name == "uvicorn.error"]
    assert len(told) == 1, [r.getMessage() for r in told]
    assert "Invalid HTTP request" in told[0].getMessage()
    assert not logging.getLogger("uvicorn").handlers  # the node's own handlers write them
    told_once.last = {key: at - 61 for key, at in told_once.last.items()}  # a minute later
    reader, writer = await _connect(node)
    writer.write(b"GARBAGE\r\n\r\n")
    await _until_closed(reader)
    writer.close()
    told = [r for r in caplog.records if r.name == "uvicorn.error"]
    assert len(told) == 2
    assert "19 more like it in the last minute" in told[1].getMessage()
