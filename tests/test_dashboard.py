"""The dashboard in headless Chromium (Debian's package, driven by Playwright): it loads, shows
the API's numbers, and its buttons pause and resume a pool on the running node."""

from __future__ import annotations

import os
from pathlib import Path

import httpx
import pytest

from postlane.policy.intake import RcptIn
from tests.conftest import config_text, message

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
    await node.pause("bulk")
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
        finally:
            await browser.close()


async def _get(base: str, token: str, path: str) -> dict:
    async with httpx.AsyncClient(base_url=base,
                                 headers={"Authorization": f"Bearer {token}"}) as api:
        return (await api.get(path)).json()
