"""The dashboard in headless Chromium (Debian's package, driven by Playwright): it loads, shows
the API's numbers, and its buttons pause and resume a pool on the running node."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import httpx
import pytest

from postlane.api.tokens import add_token
from postlane.policy.intake import RcptIn
from tests.conftest import OPERATOR, config_text, message, records
from tests.support.pg import pg_schema  # noqa: F401  (fixture)
from tests.support.waiting import until

CHROMIUM = "/usr/bin/chromium"
DOCS_SCREENSHOT = Path(__file__).resolve().parents[1] / "docs" / "dashboard.png"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"]

pytestmark = pytest.mark.skipif(not os.path.exists(CHROMIUM),
                                reason="needs Debian's chromium (make test installs it)")


async def test_dashboard_shows_the_api_numbers_and_pauses_a_pool(tmp_path, sink, make_node):
    from playwright.async_api import async_playwright

    extra = '[monitor]\nsample_every = "0.2s"\nevaluate_every = "0.2s"\n'
    node = await make_node(config_text(tmp_path, sink.port, extra))
    for i in range(4):
        await node.intake.submit("s@insurer.test", [RcptIn(f"p{i}@example.com")],
                                 message("policy", cls="policy-documents"))
    await sink.wait_for(4)
    await node.operations.pause("bulk", who=OPERATOR)
    for i in range(3):  # held in the paused pool: visible as queued
        await node.intake.submit("s@insurer.test", [RcptIn(f"m{i}@example.com")],
                                 message("offer", cls="marketing"))
    base = f"http://127.0.0.1:{node.api.port}"
    token = (tmp_path / "api-token").read_text().strip()
    status = await _get(base, token, "/api/v1/status")
    assert status["queued"] == 3

    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            page = await browser.new_page(viewport={"width": 1280, "height": 900})
            await page.goto(base + "/")
            await page.fill("#token", "wrong")
            await page.click("#login-form button")
            await page.wait_for_selector("#login-error:has-text('refused')")
            await page.fill("#token", token)
            await page.click("#login-form button")
            await page.wait_for_selector("#classes tr[data-class='policy-documents']")
            assert await page.text_content("#node") == status["node"]
            assert await page.text_content("[data-testid=queued]") == "3"
            sla = (await _get(base, token, "/api/v1/sla"))["classes"]
            for item in sla:
                depth = await page.text_content(
                    f"#classes tr[data-class='{item['class']}'] td[data-field='depth']")
                assert int(depth) == item["depth"]
            assert await page.text_content("[data-testid=alert-count]") == "0"
            assert await page.locator("#charts svg").count() == 2 * len(sla)
            assert await page.locator(
                "#pools tr[data-pool='critical'] button").count() == 0, "not pausable"

            await page.click("#pools tr[data-pool='bulk'] button[data-action=resume]")
            await page.wait_for_selector("#pools tr[data-pool='bulk'] button[data-action=pause]")
            assert ("bulk", "*") not in node.scheduler.paused
            await sink.wait_for(7)
            # pausing asks first: dismissed, nothing happens; accepted, the pool pauses
            page.once("dialog", lambda dialog: asyncio.ensure_future(dialog.dismiss()))
            await page.click("#pools tr[data-pool='bulk'] button[data-action=pause]")
            await page.wait_for_timeout(300)
            assert ("bulk", "*") not in node.scheduler.paused
            page.once("dialog", lambda dialog: asyncio.ensure_future(dialog.accept()))
            await page.click("#pools tr[data-pool='bulk'] button[data-action=pause]")
            await page.wait_for_selector("#pools tr[data-pool='bulk'] button[data-action=resume]")
            assert ("bulk", "*") in node.scheduler.paused
            state = await page.text_content("#pools tr[data-pool='bulk'] td[data-field=state]")
            assert state == "paused"
            await page.wait_for_timeout(1500)  # let a few history samples draw
            # POSTLANE_SCREENSHOT=1 refreshes the picture in docs/ (else it stays in tmp)
            shot = DOCS_SCREENSHOT if os.environ.get("POSTLANE_SCREENSHOT") else (
                tmp_path / "dashboard.png")
            await page.screenshot(path=str(shot), full_page=True)
            assert shot.stat().st_size > 10_000
            assert await page.text_content("[data-testid=who]") == "admin"

            # a read-only token sees the same numbers and is offered nothing to change
            viewer = add_token(tmp_path / "api-tokens.json", "viewer", read_only=True)
            ro = await browser.new_page(viewport={"width": 1280, "height": 900})
            await ro.goto(base + "/")
            await ro.fill("#token", viewer)
            await ro.click("#login-form button")
            await ro.wait_for_selector("[data-testid=who]:has-text('viewer (read-only)')")
            resume = ro.locator("#pools tr[data-pool='bulk'] button[data-action=resume]")
            await resume.wait_for(state="attached")
            assert await resume.is_hidden()
        finally:
            await browser.close()
        await node.flush_evidence()
        assert [(r["dsnAction"], r["operator"]) for r in records(tmp_path)
                if r["type"] == "o"] == [("pause", "tester"), ("resume", "admin"),
                                         ("pause", "admin")]


async def test_dashboard_explains_deferrals_and_finds_messages(tmp_path, sink, make_node):
    """The operator's panels: top deferral and bounce reasons per pool and domain, per-IP
    counts, outcomes per hour, lanes that sort, filter and fold idle ones away, time axes,
    a purge that asks first, and a lookup by correlation id or address."""
    from playwright.async_api import async_playwright

    sink.rcpt_replies = {"grey@grey.example": ["451 4.7.1 <grey@grey.example> greylisted"],
                         "gone@example.com": ["550 5.1.1 <gone@example.com> user unknown"]}
    text = config_text(tmp_path, sink.port, f'"grey.example" = "127.0.0.1:{sink.port}"\n'
                       f'"idle.example" = "127.0.0.1:{sink.port}"\n')
    node = await make_node(text.replace('retry = ["1s", "2s"]', 'retry = ["1h"]'))
    for rcpt in ("ok@example.com", "gone@example.com", "grey@grey.example", "a@idle.example"):
        await node.intake.submit("", [RcptIn(rcpt)], message(
            "offer", cls="marketing", extra=f"X-Correlation-ID: c-{rcpt.split('@')[0]}\r\n"))
    await sink.wait_for(2)  # ok@ and a@idle: the idle lane is empty again
    await until(lambda: any(r.state.value == "deferred" for r in node.scheduler.recipients()),
                what="grey@'s first attempt deferred")
    base = f"http://127.0.0.1:{node.api.port}"
    token = (tmp_path / "api-token").read_text().strip()
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            page = await browser.new_page(viewport={"width": 1280, "height": 900})
            await page.goto(base + "/")
            await page.fill("#token", token)
            await page.click("#login-form button")
            await page.wait_for_selector("#reasons tr td.reason")
            reasons = await page.inner_text("#reasons")
            assert "greylisted" in reasons and "grey.example" in reasons
            assert "user unknown" in reasons and "bad-mailbox" in reasons
            assert "grey@grey.example" not in reasons, "addresses are taken out of reasons"
            delivered = await page.text_content(
                "#ips tr[data-ip='127.0.0.30'] td[data-field=delivered]")
            assert delivered == "2"
            assert await page.text_content("#hours tr td[data-field=delivered]") == "2"
            assert await page.locator("[data-testid=time-axis]").count() >= 1
            # idle lanes are folded away until asked for; the filter and the sort work
            assert await page.locator("#lanes tr[data-lane='bulk/idle.example']").count() == 0
            await page.check("#show-idle")
            await page.wait_for_selector("#lanes tr[data-lane='bulk/idle.example']")
            await page.fill("#lane-filter", "grey")
            assert await page.locator("#lanes tr").count() == 1
            await page.fill("#lane-filter", "")
            await page.click("#lane-head th[data-sort=domain]")
            domains = await page.eval_on_selector_all(
                "#lanes tr", "rows => rows.map(r => r.dataset.lane.split('/')[1])")
            assert domains == sorted(domains)
            # look a message up by correlation id, then by address
            await page.fill("#lookup", "c-grey")
            await page.click("#lookup-form button")
            await page.wait_for_selector("#lookup-results td[data-field=state]")
            assert await page.text_content("#lookup-results td[data-field=state]") == "deferred"
            await page.fill("#lookup", "gone@example.com")
            await page.click("#lookup-form button")
            await page.wait_for_selector("#lookup-results td:has-text('gone@example.com')")
            assert await page.text_content("#lookup-results td[data-field=state]") == "bounced"
            # purging a lane asks first
            purge = "#lanes tr[data-lane='bulk/grey.example'] button[data-action=purge]"
            page.once("dialog", lambda dialog: asyncio.ensure_future(dialog.dismiss()))
            await page.click(purge)
            await page.wait_for_timeout(300)
            assert node.scheduler.lanes[("bulk", "grey.example")].depth() == 1
            page.once("dialog", lambda dialog: asyncio.ensure_future(dialog.accept()))
            await page.click(purge)
            await page.wait_for_selector(purge, state="detached")
            assert node.scheduler.lanes[("bulk", "grey.example")].depth() == 0
        finally:
            await browser.close()


async def _get(base: str, token: str, path: str) -> dict:
    async with httpx.AsyncClient(base_url=base,
                                 headers={"Authorization": f"Bearer {token}"}) as api:
        return (await api.get(path)).json()


async def test_in_a_cluster_the_activity_panels_say_whose_they_are(tmp_path, sink,
                                                                  pg_schema):  # noqa: F811
    """The outcomes per hour, top reasons and source IPs come from the node's own accounting
    stream: in a cluster, node-b's dashboard showed "0 delivered" beside the cluster's queue
    and SLA while node-a delivered everything, with nothing saying whose numbers they were."""
    from playwright.async_api import async_playwright

    from tests.test_cluster import cluster_text, send_many, start_node

    a = await start_node(cluster_text(tmp_path, sink.port, pg_schema, "node-a"))
    b = None
    try:
        await asyncio.to_thread(send_many, a.listeners[0].port, ["one", "two"])
        await sink.wait_for(2)
        await a.operations.pause("bulk", who=OPERATOR)  # three wait in the cluster's queue
        await asyncio.to_thread(send_many, a.listeners[0].port, ["w1", "w2", "w3"])
        b = await start_node(cluster_text(tmp_path, sink.port, pg_schema, "node-b"))
        base = f"http://127.0.0.1:{b.api.port}"
        token = (tmp_path / "api-token").read_text().strip()
        activity = await _get(base, token, "/api/v1/activity")
        assert (activity["scope"], activity["node"]) == ("node", "node-b")
        async with async_playwright() as pw:
            browser = await pw.chromium.launch(executable_path=CHROMIUM, args=ARGS)
            try:
                page = await browser.new_page(viewport={"width": 1280, "height": 900})
                await page.goto(base + "/")
                await page.fill("#token", token)
                await page.click("#login-form button")
                await page.wait_for_selector("#cluster:not([hidden])")
                await page.wait_for_selector(".activity-scope:has-text('node-b')")
                headings = await page.eval_on_selector_all(
                    ".activity-scope", "spans => spans.map(s => s.closest('h2').innerText)")
                assert len(headings) == 3, headings
                assert all("node node-b only" in h for h in headings), headings
                queued = "#shared-lanes tr[data-lane='bulk/example.com'] td[data-field=queued]"
                await page.wait_for_selector(f"{queued}:has-text('3')")
                lanes = await page.inner_text("#lanes-scope")
                assert "node node-b only: what it has claimed" in lanes, lanes
            finally:
                await browser.close()
    finally:
        for node in (a, b):
            if node is not None:
                await node.stop()
