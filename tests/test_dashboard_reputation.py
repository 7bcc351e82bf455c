"""The dashboard's reputation panel in headless Chromium (Debian's package, driven by
Playwright, as in test_dashboard.py): the figures of /api/v1/reputation per pool and IP, the
DMARC split, the age of the imports, the stale rules, and the reputation alert that offers to
pause the marketing pool (and pauses it), while the transactional pool's alert offers nothing."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import pytest

from tests.support.httpfixture import FixtureHTTP
from tests.test_dashboard import ARGS, CHROMIUM
from tests.test_dmarc import crafted
from tests.test_reputation import SNDS_KEY, google, rep_config, serve_postmaster, snds_csv

SCREENSHOT = Path(__file__).resolve().parents[1] / "docs" / "dashboard-reputation.png"

pytestmark = pytest.mark.skipif(not os.path.exists(CHROMIUM),
                                reason="needs Debian's chromium (make test installs it)")


async def test_reputation_panel_and_the_pause_offer(tmp_path, sink, make_node):
    from playwright.async_api import async_playwright

    http, key_file = google(tmp_path)
    snds = FixtureHTTP()
    try:
        serve_postmaster(http, bad=True)
        snds.text("/snds/data.aspx", snds_csv(red=True))
        node = await make_node(rep_config(tmp_path, sink.port, key_file, http.url,
                                          f"{snds.url}/snds/data.aspx?key={SNDS_KEY}"))
        rep = node.reputation
        await rep.import_now("postmaster")
        await rep.import_now("snds")
        await rep.receive(crafted([("127.0.0.30", 900, "pass", "pass"),
                                   ("198.51.100.7", 40, "pass", "fail"),
                                   ("203.0.113.9", 60, "fail", "fail")],
                                  domain="news.insurer.test", end=int(time.time())))
        token = (tmp_path / "api-token").read_text().strip()
        async with async_playwright() as pw:
            browser = await pw.chromium.launch(executable_path=CHROMIUM, args=ARGS)
            try:
                page = await browser.new_page(viewport={"width": 1400, "height": 1000})
                await page.goto(f"http://127.0.0.1:{node.api.port}/")
                await page.fill("#token", token)
                await page.click("#login-form button")
                await page.wait_for_selector("#reputation tr[data-ip='127.0.0.30']")
                bulk = "#reputation tr[data-pool='bulk']"
                assert await page.text_content(f"{bulk} td[data-field=gmail-domain]") == "LOW"
                assert await page.text_content(f"{bulk} td[data-field=spam]") == "0.40 %"
                assert await page.get_attribute(f"{bulk} td[data-field=spam] span",
                                                "class") == "bad"
                ip = "#reputation tr[data-ip='127.0.0.30']"
                assert await page.text_content(f"{ip} td[data-field=gmail-ip]") == "BAD"
                assert await page.text_content(f"{ip} td[data-field=snds]") == "RED"
                assert await page.text_content(
                    "#reputation tr[data-ip='127.0.0.20'] td[data-field=snds]") == "GREEN"
                dom = "#dmarc tr[data-domain='news.insurer.test']"
                assert await page.text_content(f"{dom} td[data-field=forwarders]") == "40"
                assert await page.text_content(f"{dom} td[data-field=unknown]") == "60"
                assert "ago" in await page.text_content("[data-import=postmaster]")
                assert await page.locator("#stale-rules [data-rule=gmail]").count() == 1

                # the alerts: the marketing pool's carry a pause button, the other none
                alert = "#alerts [data-alert='snds-red:127.0.0.30']"
                await page.wait_for_selector(f"{alert} button[data-pool=bulk]")
                warning = "#alerts [data-alert='gmail-spam-warning:insurer.test']"
                await page.wait_for_selector(warning)
                assert await page.locator(f"{warning} button").count() == 0
                if os.environ.get("POSTLANE_SCREENSHOT"):
                    await page.screenshot(path=str(SCREENSHOT), full_page=True)
                page.once("dialog", lambda dialog: asyncio.ensure_future(dialog.accept()))
                await page.click(f"{alert} button[data-pool=bulk]")  # asks first, like every pause
                await page.wait_for_selector(f"{alert} >> text=bulk paused")
                assert ("bulk", "*") in node.scheduler.paused
                assert ("critical", "*") not in node.scheduler.paused
            finally:
                await browser.close()
    finally:
        http.stop()
        snds.stop()
