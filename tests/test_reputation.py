"""The reputation view: Google Postmaster Tools and Microsoft SNDS importers against loopback
servers (and their outages), DMARC alignment alerts, the alerts firing and resolving with the
offer to pause the marketing pool (never a transactional one), the gauges, and the monthly
rules review.

Fixture provenance. Postmaster Tools answers are built from the published v1 reference
(developers.google.com/gmail/postmaster/reference/rest/v1):
  * ``domains.list`` -> ``{"domains": [Domain], "nextPageToken"}``; Domain: ``name``
    ("domains/{domain}"), ``createTime``, ``permission`` (OWNER | READ | NONE).
  * ``domains.trafficStats.list`` -> ``{"trafficStats": [TrafficStats], "nextPageToken"}``;
    TrafficStats: ``name`` ("domains/{domain}/trafficStats/{YYYYMMDD}"),
    ``userReportedSpamRatio``, ``userReportedSpamRatioLowerBound``/``UpperBound``,
    ``ipReputations`` [{``reputation`` (HIGH | MEDIUM | LOW | BAD), ``ipCount`` (int64 as a
    string), ``sampleIps``}], ``domainReputation``, ``spammyFeedbackLoops`` [{``id``,
    ``spamRatio``}], ``spfSuccessRatio``, ``dkimSuccessRatio``, ``dmarcSuccessRatio``,
    ``outboundEncryptionRatio``, ``inboundEncryptionRatio``, ``deliveryErrors``
    [{``errorClass`` (PERMANENT_ERROR | TEMPORARY_ERROR), ``errorType`` (e.g.
    RATE_LIMIT_EXCEEDED, LOW_IP_REPUTATION), ``errorRatio``}].
  * The token endpoint is Google's OAuth 2.0 JWT-bearer grant (RFC 7523,
    developers.google.com/identity/protocols/oauth2/service-account): form fields
    ``grant_type=urn:ietf:params:oauth:grant-type:jwt-bearer`` and ``assertion`` (an RS256 JWT
    signed with the key file's private key; google-auth sets ``aud`` to Google's token URL
    whatever ``token_uri`` the key names, and posts to ``token_uri``); answer
    ``{"access_token", "expires_in", "token_type"}``. The fixture verifies the signature.
SNDS data follows Microsoft's "Automated Access" description of the per-IP CSV
(sendersupport.olc.protection.outlook.com/snds/FAQ.aspx, "data.aspx"): IP address, activity
start, activity end, RCPT commands, DATA commands, message recipients, filter result,
complaint rate, trap message start, trap message end, trap hits, sample HELO, JMR P1 sender,
comments; no header line; times as M/D/YYYY h:mm AM.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import json
import logging
import math
import re
import threading
import time
from urllib.parse import parse_qs

import httpx
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from typer.testing import CliRunner

from postlane.cli import app
from postlane.reputation import api as reputation_api
from postlane.reputation.alignment import summarise
from postlane.reputation.postmaster import SCOPE, ImportFailed
from postlane.reputation.postmaster import _row as postmaster_row
from postlane.reputation.review import review
from postlane.reputation.snds import parse_snds
from postlane.startup import parse_config
from tests.conftest import config_text
from tests.support.httpfixture import FixtureHTTP
from tests.support.waiting import until
from tests.test_dmarc import crafted

runner = CliRunner()
TOKEN = "ya29.fixture-access-token"
SNDS_KEY = "3f1a2b3c-secret-access-key"


def _b64(data: str) -> bytes:
    return base64.urlsafe_b64decode(data + "=" * (-len(data) % 4))


def google(tmp_path) -> tuple[FixtureHTTP, str]:
    """A loopback Google: token endpoint checking the JWT signature, and Postmaster Tools."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    http = FixtureHTTP()
    key_file = tmp_path / "postmaster-key.json"
    key_file.write_text(json.dumps({
        "type": "service_account", "project_id": "postlane-test", "private_key_id": "k1",
        "private_key": key.private_bytes(serialization.Encoding.PEM,
                                         serialization.PrivateFormat.PKCS8,
                                         serialization.NoEncryption()).decode(),
        "client_email": "postlane@postlane-test.iam.gserviceaccount.com", "client_id": "1",
        "token_uri": f"{http.url}/token"}))
    key_file.chmod(0o600)

    def token(query, body, headers):
        form = parse_qs(body.decode())
        assert form["grant_type"] == ["urn:ietf:params:oauth:grant-type:jwt-bearer"]
        head, claims, sig = form["assertion"][0].split(".")
        key.public_key().verify(_b64(sig), f"{head}.{claims}".encode(), padding.PKCS1v15(),
                                hashes.SHA256())  # raises on a bad signature
        claims = json.loads(_b64(claims))
        assert claims["scope"] == SCOPE and claims["aud"] == "https://oauth2.googleapis.com/token"
        return 200, "application/json", json.dumps({"access_token": TOKEN, "expires_in": 3600,
                                                    "token_type": "Bearer"}).encode()

    http.routes[("POST", "/token")] = token
    return http, str(key_file)


def traffic_stats(domain: str, day: dt.date, *, reputation: str, spam: float,
                  bad_ips: list[str], good_ips: list[str]) -> dict:
    return {
        "name": f"domains/{domain}/trafficStats/{day:%Y%m%d}",
        "userReportedSpamRatio": spam, "userReportedSpamRatioLowerBound": spam * 0.8,
        "userReportedSpamRatioUpperBound": spam * 1.2,
        "ipReputations": [{"reputation": "BAD", "ipCount": str(len(bad_ips)),
                           "sampleIps": bad_ips},
                          {"reputation": "HIGH", "ipCount": str(len(good_ips)),
                           "sampleIps": good_ips}],
        "domainReputation": reputation,
        "spammyFeedbackLoops": [{"id": "campaign-7", "spamRatio": 0.02}],
        "spfSuccessRatio": 1.0, "dkimSuccessRatio": 0.99, "dmarcSuccessRatio": 0.99,
        "outboundEncryptionRatio": 1.0, "inboundEncryptionRatio": 1.0,
        "deliveryErrors": [{"errorClass": "TEMPORARY_ERROR", "errorType": "RATE_LIMIT_EXCEEDED",
                            "errorRatio": 0.01}]}


def serve_postmaster(http: FixtureHTTP, bad: bool) -> None:
    day = dt.datetime.now(dt.UTC).date() - dt.timedelta(days=1)
    http.json("GET", "/v1/domains", {"domains": [
        {"name": "domains/news.insurer.test", "createTime": "2026-01-01T00:00:00Z",
         "permission": "OWNER"},
        {"name": "domains/insurer.test", "createTime": "2026-01-01T00:00:00Z",
         "permission": "READ"}]})

    def stats_for(domain, payload):
        def handler(query, body, headers):
            if headers.get("authorization") != f"Bearer {TOKEN}":
                return 401, "application/json", b'{"error": {"message": "no token"}}'
            assert query["startDate.year"] and query["endDate.day"]
            return 200, "application/json", json.dumps(payload).encode()
        return handler

    news = traffic_stats("news.insurer.test", day, reputation="LOW" if bad else "HIGH",
                         spam=0.004 if bad else 0.0002,
                         bad_ips=["127.0.0.30"] if bad else [],
                         good_ips=["127.0.0.20"] if bad else ["127.0.0.20", "127.0.0.30"])
    older = traffic_stats("news.insurer.test", day - dt.timedelta(days=1), reputation="HIGH",
                          spam=0.0001, bad_ips=[], good_ips=["127.0.0.30"])
    # two pages, to follow nextPageToken
    def paged(query, body, headers):
        page = ({"trafficStats": [older]} if query.get("pageToken") == ["p2"]
                else {"trafficStats": [news], "nextPageToken": "p2"})
        return stats_for("", page)(query, body, headers)

    http.json("GET", "/v1/domains/news.insurer.test/trafficStats", paged)
    http.json("GET", "/v1/domains/insurer.test/trafficStats", stats_for("insurer.test", {
        "trafficStats": [traffic_stats("insurer.test", day, reputation="HIGH",
                                       spam=0.002 if bad else 0.0, bad_ips=[],
                                       good_ips=["127.0.0.20"])]}))


def snds_csv(red: bool, day: dt.date | None = None) -> str:
    """SNDS's export for ``day`` (default yesterday, as the service gives it)."""
    day = day or dt.datetime.now(dt.UTC).date() - dt.timedelta(days=1)
    start, end = f"{day:%-m/%-d/%Y} 12:00 AM", f"{day:%-m/%-d/%Y} 11:59 PM"
    return (f"127.0.0.30,{start},{end},5200,5100,5150,{'RED' if red else 'GREEN'},"
            f"{'1.2%' if red else '< 0.1%'},{start},{end},{3 if red else 0},bulk.test,"
            f"bounce@news.insurer.test,\r\n"
            f"127.0.0.20,{start},{end},800,800,800,GREEN,< 0.1%,,,0,tx0.test,"
            f"bounce@insurer.test,\r\n")


def rep_config(tmp_path, sink_port: int, key_file: str, google_url: str, snds_url: str,
               extra: str = "") -> str:
    text = config_text(tmp_path, sink_port, f"""
[feedback]
unsubscribe_url = "http://127.0.0.1:9/unsubscribe"
[feedback.classes.marketing]
marketing = true
[monitor]
evaluate_every = "0.1s"
resolve_after = "0.3s"
[reputation.postmaster]
key_file = "{key_file}"
base_url = "{google_url}"
interval = "1h"
[reputation.snds]
url = "{snds_url}"
interval = "1h"
[reputation.dmarc]
addresses = ["dmarc@insurer.test"]
min_messages = 10
unknown_alert = 50
{extra}""")
    text = text.replace("[pools.critical]\n",
                        '[pools.critical]\nreturn_path_domain = "insurer.test"\n')
    return text.replace("[pools.bulk]\n", '[pools.bulk]\nreturn_path_domain = '
                                          '"news.insurer.test"\n')


@pytest.fixture
def google_http(tmp_path):
    http, key_file = google(tmp_path)
    yield http, key_file
    http.stop()


@pytest.fixture
def snds_http():
    http = FixtureHTTP()
    yield http
    http.stop()


async def test_imports_alerts_offers_and_resolution(tmp_path, sink, make_node, google_http,
                                                    snds_http, caplog):
    http, key_file = google_http
    serve_postmaster(http, bad=True)
    snds_http.text("/snds/data.aspx", snds_csv(red=True))
    snds_url = f"{snds_http.url}/snds/data.aspx?key={SNDS_KEY}"
    caplog.set_level(logging.INFO)
    node = await make_node(rep_config(tmp_path, sink.port, key_file, http.url, snds_url))
    rep = node.reputation
    assert (await rep.import_now("postmaster"))["ok"] is True
    assert (await rep.import_now("snds"))["ok"] is True
    assert {("POST", "/token"), ("GET", "/v1/domains")} <= {r[:2] for r in http.requests}

    view = rep.view
    bulk = next(p for p in view["pools"] if p["pool"] == "bulk")
    assert bulk["marketing"] is True and bulk["gmail"]["domain_reputation"] == "LOW"
    assert bulk["gmail"]["spam_ratio"] == 0.004
    (ip,) = bulk["ips"]
    assert ip["gmail_reputation"] == "BAD"
    assert ip["snds"]["filter"] == "RED" and ip["snds"]["complaint_ratio"] == 0.012
    assert ip["snds"]["trap_hits"] == 3
    crit = next(p for p in view["pools"] if p["pool"] == "critical")
    assert crit["marketing"] is False and crit["ips"][0]["gmail_reputation"] == "HIGH"
    assert crit["ips"][0]["snds"]["filter"] == "GREEN"
    assert view["imports"]["postmaster"]["last_error"] == ""

    expected = {"gmail-domain-reputation:news.insurer.test",
                "gmail-spam-critical:news.insurer.test", "gmail-ip-reputation:127.0.0.30",
                "snds-red:127.0.0.30", "gmail-spam-warning:insurer.test"}
    await until(lambda: expected <= set(node.monitor.alerts.active), what="the reputation alerts")
    # the marketing pool is offered for pausing; the transactional pool's alert offers nothing
    assert rep.offers == {key: "bulk" for key in expected - {"gmail-spam-warning:insurer.test"}}
    alert = node.monitor.alerts.active["gmail-spam-critical:news.insurer.test"]
    assert alert.pool == "bulk" and alert.value == 0.004 and alert.threshold == 0.003

    base = f"http://127.0.0.1:{node.api.port}"
    token = (tmp_path / "api-token").read_text().strip()
    async with httpx.AsyncClient(base_url=base,
                                 headers={"Authorization": f"Bearer {token}"}) as api:
        got = (await api.get("/api/v1/reputation")).json()
        assert got["offers"] == rep.offers and got["imports"]["snds"]["age_s"] < 60
        metrics = (await api.get("/metrics")).text
        assert 'postlane_gmail_spam_ratio{domain="news.insurer.test"} 0.004' in metrics
        assert 'postlane_snds_filter{ip="127.0.0.30",pool="bulk"} 2.0' in metrics
        assert 'postlane_gmail_ip_reputation{ip="127.0.0.30",pool="bulk"} 0.0' in metrics
        assert 'postlane_alert_active{class="127.0.0.30",rule="snds-red"} 1.0' in metrics
        assert 'postlane_reputation_import_age_seconds{source="postmaster"}' in metrics
        # the offer is the ordinary pause; a transactional pool refuses it
        assert (await api.post("/api/v1/pools/bulk/pause")).status_code == 200
        assert (await api.post("/api/v1/pools/critical/pause")).status_code == 409
        assert (await api.post("/api/v1/reputation/import/snds")).json()["ok"] is True

    # everything recovers: the alerts resolve
    serve_postmaster(http, bad=False)
    snds_http.text("/snds/data.aspx", snds_csv(red=False))
    await rep.import_now("postmaster")
    await rep.import_now("snds")
    await until(lambda: not node.monitor.alerts.active, what="the alerts resolved")
    resolved = {a.id for a in node.monitor.alerts.history}
    assert expected <= resolved
    journal = [json.loads(line) for line in
               (tmp_path / "acct" / "alerts.jsonl").read_text().splitlines()]
    assert {(e["event"], e["id"]) for e in journal} >= {("fired", "snds-red:127.0.0.30"),
                                                       ("resolved", "snds-red:127.0.0.30")}
    assert SNDS_KEY not in caplog.text


async def test_outages_never_fail_the_node_and_show_the_age(tmp_path, sink, make_node,
                                                            google_http, snds_http, caplog):
    http, key_file = google_http
    serve_postmaster(http, bad=False)
    snds_http.text("/snds/data.aspx", snds_csv(red=False))
    snds_url = f"{snds_http.url}/snds/data.aspx?key={SNDS_KEY}"
    node = await make_node(rep_config(tmp_path, sink.port, key_file, http.url, snds_url))
    rep = node.reputation
    assert (await rep.import_now("postmaster"))["ok"]
    assert (await rep.import_now("snds"))["ok"]
    good = rep.view["imports"]["postmaster"]["last_success"]

    http.down = True  # 503 everywhere, the token endpoint included
    snds_http.text("/snds/data.aspx", "<html>Access denied</html>", "text/html")
    failed = await rep.import_now("postmaster")
    assert failed["ok"] is False and "Google refused the service-account token" in failed["error"]
    failed = await rep.import_now("snds")
    assert failed == {"source": "snds", "ok": False, "rows": 0, "error":
                      "SNDS at 127.0.0.1 sent a page, not CSV data (is the access key still"
                      " valid?)"}
    snds_http.stop()  # connection refused
    failed = await rep.import_now("snds")
    assert failed["error"] == "SNDS at 127.0.0.1 unreachable: ConnectError"
    state = rep.view["imports"]
    assert state["postmaster"]["last_success"] == good and state["postmaster"]["rows"] == 3
    assert state["postmaster"]["last_error"].startswith("Google refused")
    assert state["snds"]["last_error"].endswith("unreachable: ConnectError")
    token = (tmp_path / "api-token").read_text().strip()
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{node.api.port}",
                                 headers={"Authorization": f"Bearer {token}"}) as api:
        asked = time.time()
        got = (await api.get("/api/v1/reputation")).json()
        answered = time.time()
    # the age of the last good import (rounded to 0.1 s), whatever failed since
    assert round(asked - good, 1) <= got["imports"]["postmaster"]["age_s"] <= round(
        answered - good, 1)
    assert node.status()["node"] == "test-node"  # the node runs on
    http.down = False
    http.json("GET", "/v1/domains", lambda q, b, h: (403, "application/json", json.dumps(
        {"error": {"message": "The caller does not have permission"}}).encode()))
    failed = await rep.import_now("postmaster")
    assert failed["error"] == ("Postmaster Tools API answered HTTP 403 for /v1/domains: The"
                               " caller does not have permission")
    assert SNDS_KEY not in caplog.text


async def test_a_missing_key_file_is_an_import_error_not_a_crash(tmp_path, sink, make_node):
    node = await make_node(rep_config(tmp_path, sink.port, str(tmp_path / "missing.json"),
                                      "http://127.0.0.1:9", "http://127.0.0.1:9/snds"))
    failed = await node.reputation.import_now("postmaster")
    assert failed["ok"] is False and "cannot use the service-account key" in failed["error"]


async def test_dmarc_alignment_and_unknown_sender_alerts(tmp_path, sink, make_node,
                                                         monkeypatch):
    node = await make_node(rep_config(tmp_path, sink.port, "", "http://127.0.0.1:9",
                                      "http://127.0.0.1:9/snds").replace(
        'key_file = ""\n', "").replace('url = "http://127.0.0.1:9/snds"\n', ""))
    end = int(time.time())
    report = crafted([("127.0.0.30", 80, "fail", "pass"), ("127.0.0.30", 20, "pass", "pass"),
                      ("127.0.0.20", 500, "pass", "pass"), ("203.0.113.9", 60, "fail", "fail"),
                      ("198.51.100.7", 30, "pass", "fail")], domain="news.insurer.test",
                     end=end)
    result = await node.reputation.receive(report, "127.0.0.1")
    assert result["stored"] is True
    await until(lambda: {"dmarc-dkim-alignment:bulk", "dmarc-unknown-senders:news.insurer.test"}
                <= set(node.monitor.alerts.active), what="the DMARC alerts")
    assert "dmarc-dkim-alignment:critical" not in node.monitor.alerts.active
    alert = node.monitor.alerts.active["dmarc-dkim-alignment:bulk"]
    assert alert.value == 0.2 and alert.threshold == 0.95
    assert "203.0.113.9" in node.monitor.alerts.active[
        "dmarc-unknown-senders:news.insurer.test"].message
    assert node.reputation.offers["dmarc-dkim-alignment:bulk"] == "bulk"
    pools = {p["pool"]: p for p in node.reputation.view["pools"]}
    assert pools["bulk"]["dmarc"]["dkim_rate"] == 0.2
    assert pools["critical"]["ips"][0]["dmarc"]["pass_rate"] == 1.0

    # GET /api/v1/dmarc/report sums months of rows: off the event loop, which serves SMTP
    threads = []

    def summarise_watched(*args, **kwargs):
        threads.append(threading.current_thread())
        return summarise(*args, **kwargs)

    monkeypatch.setattr(reputation_api, "summarise", summarise_watched)
    token = (tmp_path / "api-token").read_text().strip()
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{node.api.port}",
                                 headers={"Authorization": f"Bearer {token}"}) as api:
        got = await api.get("/api/v1/dmarc/report", params={"days": 3})
    assert got.status_code == 200 and got.json()["domains"][0]["messages"] == 690
    assert threads and threading.main_thread() not in threads


async def test_a_report_naming_many_domains_keeps_the_view_bounded(tmp_path, sink, make_node):
    """Anyone may mail the rua address: 150 header From domains with unknown senders made 150
    alerts, 750 series on /metrics and 150 dashboard rows. The view keeps 100, the pools'
    domain first however small. (The report is about our policy domain: one about another
    organisation's is dropped, ``test_dmarc.py``; its rows may name any header From.)"""
    node = await make_node(rep_config(tmp_path, sink.port, "", "http://127.0.0.1:9",
                                      "http://127.0.0.1:9/snds").replace(
        'key_file = ""\n', "").replace('url = "http://127.0.0.1:9/snds"\n', ""))
    rows = [(f"203.0.113.{i % 200}", 1000 + i, "fail", "fail") for i in range(150)]
    rows.append(("127.0.0.30", 1, "pass", "pass"))
    report = crafted(rows, domain="spoofed.test", end=int(time.time()))
    names = iter([f"d{i}.spoofed.test" for i in range(150)] + ["news.insurer.test"])
    report = re.sub(rb"<header_from>spoofed.test</header_from>",
                    lambda m: f"<header_from>{next(names)}</header_from>".encode(), report)
    report = report.replace(b"<policy_published><domain>spoofed.test</domain>",
                            b"<policy_published><domain>insurer.test</domain>")
    assert (await node.reputation.receive(report, "127.0.0.1"))["stored"] is True
    dmarc = node.reputation.view["dmarc"]
    assert len(dmarc["domains"]) == 100 and dmarc["domains_omitted"] == 51
    kept = {d["domain"] for d in dmarc["domains"]}
    assert "news.insurer.test" in kept and "d149.spoofed.test" in kept
    assert "d0.spoofed.test" not in kept  # the smallest of the others
    unknown = [c for c in node.reputation.conditions(time.time())
               if c.rule == "dmarc-unknown-senders"]
    assert len(unknown) == 99
    token = (tmp_path / "api-token").read_text().strip()
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{node.api.port}",
                                 headers={"Authorization": f"Bearer {token}"}) as api:
        metrics = (await api.get("/metrics")).text
        everything = (await api.get("/api/v1/dmarc/report", params={"days": 3})).json()
    assert metrics.count("postlane_dmarc_messages{") == 400
    assert len(everything["domains"]) == 151  # asked for: all of them


async def test_a_burst_of_reports_shares_view_refreshes(tmp_path, sink, make_node,
                                                         monkeypatch):
    """Each stored report waits for the view before its 250: five reports arriving while the
    view is being computed read the whole window five times, one after the other; they now
    share one run."""
    node = await make_node(rep_config(tmp_path, sink.port, "", "http://127.0.0.1:9",
                                      "http://127.0.0.1:9/snds").replace(
        'key_file = ""\n', "").replace('url = "http://127.0.0.1:9/snds"\n', ""))
    rep = node.reputation
    gate, reads, read = threading.Event(), [], rep._read

    def held_read(now):
        reads.append(now)
        if len(reads) == 1:
            gate.wait(30)  # the first run is slow: the others arrive meanwhile
        return read(now)

    monkeypatch.setattr(rep, "_read", held_read)
    asked, refresh = [], rep.refresh

    async def counted_refresh():
        asked.append(1)
        await refresh()

    monkeypatch.setattr(rep, "refresh", counted_refresh)
    end = int(time.time())

    def mail(i: int) -> bytes:
        return crafted([("203.0.113.9", 5, "fail", "fail")], report_id=f"burst-{i}",
                       domain="news.insurer.test", end=end)

    first = asyncio.create_task(rep.receive(mail(0), "127.0.0.1"))
    await until(lambda: reads, what="the first refresh")
    others = [asyncio.create_task(rep.receive(mail(i), "127.0.0.1")) for i in range(1, 6)]
    await until(lambda: len(asked) == 6, what="five more refreshes asked")
    gate.set()
    results = await asyncio.gather(first, *others)
    assert all(r["stored"] for r in results)
    assert len(reads) == 2
    unknown = next(d for d in rep.view["dmarc"]["domains"] if d["domain"] == "news.insurer.test")
    assert unknown["groups"]["unknown"]["messages"] == 30  # the shared run saw every report


def test_snds_csv_parsing():
    rows = parse_snds("IP Address,Activity start,Activity end,RCPT,DATA,Recipients,Filter,"
                      "Complaint,Trap start,Trap end,Traps,HELO,MAIL FROM,Comments\r\n"
                      "192.0.2.1,6/1/2026 12:00 AM,6/1/2026 11:59 PM,10,9,9,YELLOW,0.4%,,,0,"
                      "h.test,a@b.test,\r\n")
    assert rows == [{"ip": "192.0.2.1", "period_start": 1780272000.0,
                     "period_end": 1780358340.0, "rcpt_commands": 10, "data_commands": 9,
                     "recipients": 9, "filter": "YELLOW", "complaint_rate": "0.4%",
                     "complaint_ratio": 0.004, "trap_hits": 0, "helo": "h.test",
                     "mail_from": "a@b.test", "comments": ""}]
    from postlane.reputation.postmaster import ImportFailed

    with pytest.raises(ImportFailed, match="SNDS data line 2: filter result 'PURPLE'"):
        parse_snds("192.0.2.1,6/1/2026 12:00 AM,6/1/2026 11:59 PM,1,1,1,GREEN,,,,0,,,\r\n"
                   "192.0.2.2,6/1/2026 12:00 AM,6/1/2026 11:59 PM,1,1,1,PURPLE,,,,0,,,\r\n")
    assert parse_snds("") == []


# -- the monthly rules review -------------------------------------------------------------------

SNDS_LINE = ("127.0.0.30,1/2/2026 12:00 AM,1/2/2026 11:59 PM,{rcpt},5100,5150,GREEN,{rate},,,"
             "{trap},helo.test,m@x.test,\r\n")


@pytest.mark.parametrize("fields, reason", [
    ({"rate": "nan%"}, "complaint rate 'nan%' is not a percentage"),
    ({"rate": "inf"}, "complaint rate 'inf' is not a percentage"),
    ({"rate": "-5%"}, "complaint rate '-5%' is not a percentage"),
    ({"rate": "500%"}, "complaint rate '500%' is not a percentage"),
    ({"trap": "-4"}, "trap hits '-4' is not a count"),
    ({"trap": "1" * 25}, "trap hits '11111111111111111111' is not a count"),
    ({"rcpt": "1e3"}, "RCPT commands '1e3' is not a count"),
])
def test_snds_refuses_impossible_values(fields, reason):
    """A NaN rate reached the view, whose JSON cannot hold it (GET /reputation: 500); a count
    beyond BIGINT failed the store with a bare OverflowError."""
    line = SNDS_LINE.format(**{"rcpt": "5200", "rate": "1%", "trap": "0", **fields})
    with pytest.raises(ImportFailed, match=f"SNDS data line 2: {re.escape(reason)}"):
        parse_snds(SNDS_LINE.format(rcpt="1", rate="< 0.1%", trap="0") + line)


def test_snds_odd_but_readable_files():
    good = SNDS_LINE.format(rcpt="5200", rate="0.4%", trap="2")
    # a UTF-8 BOM hid the first IP: the line was skipped as a header, silently
    assert [r["ip"] for r in parse_snds("\ufeff" + good)] == ["127.0.0.30"]
    assert parse_snds("") == [] and parse_snds("\r\n\r\n") == []  # no data for the day
    v6 = parse_snds(good.replace("127.0.0.30", "2001:DB8::0001"))
    assert v6[0]["ip"] == "2001:db8::1"  # as the pools write it
    with pytest.raises(ImportFailed, match="SNDS data line 2: field larger than field limit"):
        parse_snds(good + '127.0.0.31,"' + "x" * 200_000 + '"\r\n')
    with pytest.raises(ImportFailed, match="SNDS data line 1: the activity ends"):
        parse_snds(good.replace("1/2/2026 12:00 AM", "1/5/2026 12:00 AM", 1))
    # a period in 2099 would stay the IP's latest, its colour (and alert) for good
    future = good.replace("1/2/2026", "1/2/2099").replace("127.0.0.30", "127.0.0.20")
    now = dt.datetime(2026, 1, 3, tzinfo=dt.UTC).timestamp()
    assert [r["ip"] for r in parse_snds(good + future, now)] == ["127.0.0.30"]


def test_postmaster_rows_keep_plausible_values():
    stat = traffic_stats("insurer.test", dt.date(2026, 1, 2), reputation="HIGH", spam=0.001,
                         bad_ips=["2001:DB8::0001", "not an ip", {"ip": 1}],
                         good_ips="127.0.0.20")
    stat.update(userReportedSpamRatio=math.nan, spfSuccessRatio=True, dkimSuccessRatio=7,
                domainReputation={"level": "HIGH"})
    stat["ipReputations"].append("BAD")
    stat["deliveryErrors"].append(None)
    row = postmaster_row("insurer.test", stat)
    assert (row["spam_ratio"], row["spf_ratio"], row["dkim_ratio"], row["dmarc_ratio"]) == (
        None, None, None, 0.99)
    assert row["domain_reputation"] == ""
    assert json.loads(row["ip_reputations"]) == [
        {"reputation": "BAD", "ip_count": 3, "sample_ips": ["2001:db8::1"]},
        {"reputation": "HIGH", "ip_count": 10, "sample_ips": []}]  # a string is not a list
    assert len(json.loads(row["delivery_errors"])) == 1
    with pytest.raises(ImportFailed, match="unexpected trafficStats name"):
        postmaster_row("insurer.test",
                       {**stat, "name": "domains/insurer.test/trafficStats/20261399"})


async def test_hostile_answers_never_break_the_view(tmp_path, sink, make_node, google_http,
                                                   snds_http):
    """Postmaster JSON with NaN (Python's JSON parser takes it), a date in the year 2999 and
    garbage sample IPs; an SNDS file with a NaN rate: the imports say what was wrong, the view,
    the API and /metrics stay correct."""
    http, key_file = google_http
    day = dt.datetime.now(dt.UTC).date() - dt.timedelta(days=1)
    stats = [traffic_stats("news.insurer.test", day, reputation="HIGH", spam=0.0002,
                           bad_ips=[], good_ips=["127.0.0.30", {"x": 1}, ["127.0.0.20"]]),
             traffic_stats("news.insurer.test", dt.date(2999, 12, 31), reputation="BAD",
                           spam=0.5, bad_ips=["127.0.0.30"], good_ips=[])]
    stats[0]["userReportedSpamRatio"] = math.nan
    body = json.dumps({"trafficStats": stats}).encode()
    assert b"NaN" in body
    http.json("GET", "/v1/domains", {"domains": [{"name": "domains/news.insurer.test"},
                                                 {"name": "domains/../../token?"}, {}]})
    http.json("GET", "/v1/domains/news.insurer.test/trafficStats",
              lambda q, b, h: (200, "application/json", body))
    snds_http.text("/snds/data.aspx", SNDS_LINE.format(rcpt="1", rate="nan%", trap="0"))
    node = await make_node(rep_config(tmp_path, sink.port, key_file, http.url,
                                      f"{snds_http.url}/snds/data.aspx?key={SNDS_KEY}"))
    rep = node.reputation
    assert (await rep.import_now("postmaster")) == {"source": "postmaster", "ok": True,
                                                    "error": "", "rows": 1}
    failed = await rep.import_now("snds")
    assert failed["error"] == ("SNDS data line 1: complaint rate 'nan%' is not a percentage")
    bulk = next(p for p in rep.view["pools"] if p["pool"] == "bulk")
    assert bulk["gmail"]["day"] == day.isoformat() and bulk["gmail"]["spam_ratio"] is None
    assert bulk["ips"][0]["gmail_reputation"] == "HIGH"
    assert not [c for c in rep.conditions(time.time()) if c.rule.startswith("gmail")]
    token = (tmp_path / "api-token").read_text().strip()
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{node.api.port}",
                                 headers={"Authorization": f"Bearer {token}"}) as api:
        got = await api.get("/api/v1/reputation")
        assert got.status_code == 200, got.text
        metrics = (await api.get("/metrics")).text
    assert "NaN" not in metrics and "postlane_gmail_spam_ratio{" not in metrics
    # what this version cannot show (a row from elsewhere in a shared store) keeps the last
    # view: the refresh raised, which ended its once-a-minute task for good
    rep.store.put_postmaster([{**postmaster_row("news.insurer.test", stats[0]),
                               "ip_reputations": json.dumps([{"reputation": "LOW",
                                                              "sample_ips": [{"x": 1}]}])}],
                             time.time())
    before = rep.view
    await rep.refresh()
    assert rep.view is before


def test_review_suggests_from_deferrals_and_reputation(tmp_path):
    cfg = parse_config(config_text(tmp_path, 2525, """
[destinations.insurer-partner]
domains = ["partner.test"]
max_connections_per_ip = 4
reason = "Partner asked for 4 connections (ticket 1234)"
[reputation]
spam_ratio_critical = 0.004
"""))
    now = time.time()
    early, late = now - 20 * 86400, now - 2 * 86400
    recs = [{"type": "d", "rcpt": f"u{i}@gmail.com", "time_logged": early} for i in range(1000)]
    recs += [{"type": "d", "rcpt": f"u{i}@gmail.com", "time_logged": late} for i in range(900)]
    recs += [{"type": "t", "rcpt": f"u{i}@googlemail.com", "time_logged": late,
              "dsn_status": "4.7.0", "dsn_diag": "421 4.7.0 Try again later"} for i in range(100)]
    recs += [{"type": "d", "rcpt": "x@outlook.com", "time_logged": late}]
    gmail = [{"domain": "news.insurer.test", "day": "2026-06-01", "spam_ratio": 0.0025,
              "domain_reputation": "LOW"}]
    snds = [{"ip": "127.0.0.30", "filter": "RED"}, {"ip": "127.0.0.20", "filter": "YELLOW"},
            {"ip": "127.0.0.30", "filter": "GREEN"}]
    # the SNDS account also lists IPs outside the pools: they say nothing about these rules
    snds += [{"ip": "198.51.100.9", "filter": "RED"}] * 3
    entries = {e["rule"]: e for e in review(cfg, {"microsoft": {
        "reviewed_at": now - 86400, "reviewer": "ops"}}, recs, gmail, snds, now, "node.toml")}
    g = entries["gmail"]
    assert g["origin"] == "shipped" and "Google" in g["source"] and g["stale"] is True
    assert g["traffic"]["recent"] == {"delivered": 900, "deferred": 100, "throttled": 100,
                                      "bounced": 0}
    assert any(s.startswith("deferrals with throttling replies rising (0.0% -> 10.0%")
               for s in g["suggestions"])
    # the configured limit, not Google's 0.30 %
    assert "Gmail user-reported spam ratio reached 0.25% (limit 0.40%)" in g["suggestions"]
    m = entries["microsoft"]
    assert m["stale"] is False and m["reviewer"] == "ops"
    assert "SNDS: 1 RED and 1 YELLOW IP-days" in m["suggestions"]
    p = entries["insurer-partner"]
    assert (p["origin"], p["file"]) == ("operator", "node.toml")
    assert p["source"] == "Partner asked for 4 connections (ticket 1234)"
    assert p["suggestions"] == ["no traffic in the last 30 days: keep the rule only if mail is"
                                " expected"]


def test_rules_review_and_reviewed_cli(tmp_path):
    path = tmp_path / "node.toml"
    path.write_text(config_text(tmp_path, 2525))
    out = runner.invoke(app, ["rules", "review", "-c", str(path), "--json"])
    assert out.exit_code == 0, out.output
    entries = {e["rule"]: e for e in map(json.loads, out.stdout.splitlines())}
    assert entries["gmail"]["stale"] and entries["gmail"]["last_reviewed"] is None
    assert entries["gmail"]["file"] == "postlane/data/destinations.toml"
    assert runner.invoke(app, ["rules", "reviewed", "gmail", "-c", str(path), "--by", "anna",
                               "--note", "limits fine"]).exit_code == 0
    text = runner.invoke(app, ["rules", "review", "-c", str(path)]).stdout
    assert "gmail\n  origin: shipped (postlane/data/destinations.toml)\n" in text
    assert "by anna" in text and "microsoft  [STALE]" in text
    entries = {e["rule"]: e for e in map(json.loads, runner.invoke(
        app, ["rules", "review", "-c", str(path), "--json"]).stdout.splitlines())}
    assert entries["gmail"]["stale"] is False and entries["gmail"]["reviewer"] == "anna"
    assert entries["microsoft"]["stale"] is True
    bad = runner.invoke(app, ["rules", "reviewed", "nope", "-c", str(path)])
    assert bad.exit_code == 2 and "no destination rule named 'nope'" in bad.output


def test_config_check_names_reputation_errors(tmp_path):
    from postlane.config import ConfigError

    with pytest.raises(ConfigError) as err:
        parse_config(config_text(tmp_path, 2525, """
[reputation]
spam_ratio_warning = 0.005
[reputation.dmarc]
addresses = ["not-an-address"]
[reputation.snds]
url = "ftp://snds.example/data?key=secret-key"
"""))
    assert err.value.errors == [
        "reputation.dmarc.addresses[0]: not an address: 'not-an-address'",
        "reputation.snds.url: not an http(s) URL",
        "reputation.spam_ratio_warning: must not exceed spam_ratio_critical"]
