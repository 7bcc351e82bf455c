"""The feedback loop over HTTP: RFC 8058 one-click unsubscribe (headers on marketing mail, the POST
endpoint served by uvicorn on loopback, valid, tampered and expired tokens) and the management
routes (suppressions, posted reports, complaint rates)."""

from __future__ import annotations

import asyncio
import csv
import email
import re
import time

import httpx
import pytest
import uvicorn
from fastapi import FastAPI

from postlane.feedback.unsubscribe import TokenError, UnsubscribeSigner, router
from tests.conftest import config_text, message, send
from tests.support.waiting import until

EXTRA = """
[feedback]
unsubscribe_url = "https://mta.test/unsubscribe"
unsubscribe_mailto = "unsubscribe@mta.test"
unsubscribe_ttl = "30d"
[feedback.classes.marketing]
marketing = true
"""


@pytest.fixture
async def serve():
    servers = []

    async def start(app: FastAPI) -> str:
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0,
                                               log_level="warning", lifespan="off"))
        task = asyncio.get_running_loop().create_task(server.serve())
        await until(lambda: server.started, what="the HTTP server started")
        servers.append((server, task))
        port = server.servers[0].sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    yield start
    for server, task in servers:
        server.should_exit = True
        await task


def test_tokens() -> None:
    signer = UnsubscribeSigner(b"k" * 32, ttl=60)
    token = signer.token("a@example.com", now=1000)
    assert signer.verify(token, now=1059) == "a@example.com"
    with pytest.raises(TokenError) as exc:
        signer.verify(token, now=1061)
    assert exc.value.expired
    other = UnsubscribeSigner(b"x" * 32, ttl=60)
    with pytest.raises(TokenError, match="signature"):
        other.verify(token, now=1000)
    with pytest.raises(TokenError, match="malformed"):
        signer.verify("nonsense", now=1000)


async def test_one_click_unsubscribe_end_to_end(tmp_path, sink, make_node, serve):
    node = await make_node(config_text(tmp_path, sink.port, EXTRA))
    app = FastAPI()
    app.include_router(router(node.feedback, node.spool.flush))
    base = await serve(app)
    port = node.listeners[0].port
    await send(port, "news@insurer.test", ["u@example.com"], message("offer", cls="marketing"))
    await send(port, "docs@insurer.test", ["u@example.com"], message("policy",
                                                                     cls="policy-documents"))
    arrivals = await sink.wait_for(2)
    by_subject = {email.message_from_bytes(a.data)["Subject"]: email.message_from_bytes(a.data)
                  for a in arrivals}
    offer = by_subject["offer"]
    assert offer["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    url = re.match(r"<(https://mta\.test/unsubscribe/[^>]+)>, <mailto:unsubscribe@mta\.test"
                   r"\?subject=unsubscribe%20[^>]+>$", offer["List-Unsubscribe"]).group(1)
    assert by_subject["policy"]["List-Unsubscribe"] is None, "only marketing classes"
    token = url.rpartition("/")[2]
    async with httpx.AsyncClient(base_url=base) as client:
        page = await client.get(f"/unsubscribe/{token}")
        assert page.status_code == 200 and "u@example.com" in page.text
        assert not node.feedback.suppression.check(["u@example.com"]), "GET changes nothing"
        tampered = token[:3] + ("A" if token[3] != "A" else "B") + token[4:]
        r = await client.post(f"/unsubscribe/{tampered}", data={"List-Unsubscribe": "One-Click"})
        assert r.status_code == 400
        expired = node.feedback.signer.token("u@example.com",
                                             now=time.time() - 31 * 86400)
        r = await client.post(f"/unsubscribe/{expired}", data={"List-Unsubscribe": "One-Click"})
        assert r.status_code == 410
        assert not node.feedback.suppression.check(["u@example.com"])
        r = await client.post(f"/unsubscribe/{token}", data={"List-Unsubscribe": "One-Click"})
        assert r.status_code == 200
        assert r.json() == {"unsubscribed": "u@example.com", "scope": "marketing"}
    # the mailto variant carries the same token in its subject; a forged one changes nothing
    mailto = re.search(r"<mailto:(unsubscribe@mta\.test)\?subject=unsubscribe%20([^>]+)>",
                       offer["List-Unsubscribe"])
    forged = f"Subject: unsubscribe {node.feedback.signer.token('u@example.com')[:-3]}xyz\r\n\r\n"
    assert await send(port, "u@example.com", [mailto.group(1)], forged.encode()) == {}
    await send(port, "u@example.com", [mailto.group(1)],
               f"Subject: unsubscribe {mailto.group(2)}\r\n\r\n".encode())
    # marketing stops, the regulatory notice still arrives
    await send(port, "news@insurer.test", ["u@example.com"], message("offer 2", cls="marketing"))
    await send(port, "docs@insurer.test", ["u@example.com"], message("policy 2",
                                                                     cls="policy-documents"))
    arrivals = await sink.wait_for(3)
    assert email.message_from_bytes(arrivals[2].data)["Subject"] == "policy 2"
    await node.stop()
    rows = []
    for path in sorted((tmp_path / "acct").glob("*.csv")):
        with open(path, newline="") as fh:
            rows.extend(csv.DictReader(fh))
    assert [(r["type"], r["rcpt"], r["dsnDiag"].split(", since ")[0])
            for r in rows if r["type"] in ("f", "s")] == [
        ("f", "u@example.com", "unsubscribe;one-click"),
        ("f", "u@example.com", "unsubscribe;mailto"),
        ("s", "u@example.com", "suppressed (marketing, unsubscribe")]


def test_marketing_class_needs_an_unsubscribe_url(tmp_path) -> None:
    from postlane.startup import ConfigError, parse_config

    text = config_text(tmp_path, 25, "[feedback.classes.marketing]\nmarketing = true\n"
                                     "[feedback.classes.nope]\n")
    with pytest.raises(ConfigError) as exc:
        parse_config(text)
    assert "feedback.unsubscribe_url: required because class 'marketing' is marketing" in str(
        exc.value)
    assert "feedback.classes.nope: no class named 'nope'" in str(exc.value)


async def test_management_routes(tmp_path, sink, make_node):
    """The routes under the node's API, behind its token."""
    text = config_text(tmp_path, sink.port, EXTRA).replace(
        "[pools.bulk]\n", '[pools.bulk]\nbounce_domain = "bounces.mta.test"\n')
    node = await make_node(text)
    token = (tmp_path / "api-token").read_text().strip()
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{node.api.port}/api/v1",
                                 headers={"Authorization": f"Bearer {token}"}) as client:
        r = await client.post("/suppressions", json={"address": "X@example.com", "scope": "all",
                                                     "reason": "legal"})
        assert r.status_code == 201 and r.json()["address"] == "x@example.com"
        assert (await client.post("/suppressions", json={"address": "x", "scope": "all"})
                ).status_code == 422
        assert (await client.post("/suppressions", json={"address": "y@example.com",
                                                         "scope": "some"})).status_code == 422
        r = await client.post("/suppressions/import", content="a@example.com\nb@example.com,all\n")
        assert r.json() == {"imported": 2}
        r = await client.post("/suppressions/import", content="ok@example.com\nbad\n")
        assert r.status_code == 422 and "line 2" in r.json()["error"]
        r = await client.get("/suppressions", params={"scope": "all"})
        assert r.json()["total"] == 3
        assert [e["address"] for e in r.json()["entries"]] == ["b@example.com", "x@example.com"]
        export = (await client.get("/suppressions/export")).text
        assert export.splitlines()[0] == "address,scope,reason,source,created,expires"
        assert (await client.delete("/suppressions/a@example.com")).json() == {"removed": 1}
        assert (await client.delete("/suppressions/a@example.com")).status_code == 404
        # a complaint posted by a provider webhook, recipient only in the VERP return path
        verp = node.feedback.verp.encode("1A2B3C4D5E6F7A8B9C0D", 0, "w@example.com",
                                         "bounces.mta.test")
        arf = (f"From: fbl@isp.example\r\nTo: fbl@mta.test\r\nSubject: FBL\r\n"
               f'MIME-Version: 1.0\r\nContent-Type: multipart/report; '
               f'report-type=feedback-report; boundary="b"\r\n\r\n'
               f"--b\r\nContent-Type: message/feedback-report\r\n\r\nFeedback-Type: abuse\r\n"
               f"Version: 1\r\n\r\n--b\r\nContent-Type: text/rfc822-headers\r\n\r\n"
               f"Return-Path: <{verp}>\r\nTo: redacted\r\n\r\n--b--\r\n")
        r = await client.post("/feedback/reports", content=arf)
        assert r.status_code == 200 and r.json()["kind"] == "complaint"
        assert node.feedback.suppression.check(["w@example.com"])
        r = await client.get("/feedback/complaint-rates")
        assert r.json()["threshold"] == 0.001
        assert {(x["pool"], x["domain"]) for x in r.json()["rates"]} >= {("bulk", "example.com")}
