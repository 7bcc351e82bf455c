"""SLA monitoring: latency windows, the breach predictor, alerts and their delivery."""

from __future__ import annotations

import asyncio
import email
import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from postlane.accounting.records import Record
from postlane.monitor.alerts import (
    Alert,
    AlertManager,
    Condition,
    Undelivered,
    log_notifier,
    mail_notifier,
    webhook_notifier,
)
from postlane.monitor.latency import Series
from postlane.monitor.tracker import Tracker
from postlane.policy.intake import RcptIn
from postlane.startup import parse_config
from tests.conftest import OPERATOR, config_text, message
from tests.support.httpfixture import FixtureHTTP
from tests.support.waiting import until

# -- latency windows (pure computation) --------------------------------------------------------


def test_window_percentiles_are_within_two_percent_and_expire():
    series = Series()
    t0 = 1_000_000.0
    values = [0.01 * (i + 1) for i in range(1000)]  # 10 ms .. 10 s
    for i, v in enumerate(values):
        series.add(t0 + i * 0.05, v)  # 50 s of samples
    now = t0 + 50
    q = series.quantiles(now, 60)
    for quantile, exact in ((0.5, 5.0), (0.95, 9.5), (0.99, 9.9)):
        assert abs(q[quantile] - exact) / exact < 0.02, (quantile, q[quantile])
    assert series.total == 1000
    assert series.quantiles(now + 200, 60) is None, "a 1-minute window forgets after a minute"
    assert series.quantiles(now + 200, 300) is not None


def _tracker(sla: str = "10s") -> Tracker:
    cfg = parse_config(f"""
[pools.p]
ips = [{{ address = "127.0.0.20", ehlo = "a.test" }}]
[classes.urgent]
pool = "p"
priority = 0
sla = "{sla}"
retry = ["5s"]
""")
    return Tracker(cfg)


def _rec(kind: str, qid: str, t: float, queued: float, **kw) -> Record:
    return Record(type=kind, time_logged=t, time_queued=queued, orig="s@x.test",
                  rcpt="r@example.com", queue_id=qid, cls="urgent", vmta_pool="p", **kw)


def test_predictor_sees_a_stall_before_the_deadline():
    tr = _tracker("10s")
    t0 = 1_000_000.0
    for i in range(20):  # a healthy pool: 20 deliveries a second
        tr.on_record(_rec("r", f"q{i}", t0 + i / 20, t0 + i / 20))
        tr.on_record(_rec("d", f"q{i}", t0 + i / 20 + 0.01, t0 + i / 20))
    assert tr.predict_breach("urgent", t0 + 1, horizon=10) is None
    for i in range(10):  # then nothing finishes while five messages a second arrive
        tr.on_record(_rec("r", f"s{i}", t0 + 1 + i / 5, t0 + 1 + i / 5))
    early = tr.predict_breach("urgent", t0 + 1.5, horizon=10)
    later = tr.predict_breach("urgent", t0 + 5, horizon=10)
    assert later is not None and 0 < later < 10, later
    assert early is None or early > later
    assert tr.oldest_age("urgent", t0 + 5) == pytest.approx(4.0)
    breached = tr.predict_breach("urgent", t0 + 12, horizon=10)
    assert breached is not None and breached < 0, "already past the deadline"


def test_a_burst_after_a_quiet_spell_is_no_predicted_breach():
    """The rate is measured over busy time: three messages a minute say nothing about how fast
    the pool drains a burst of fifty."""
    tr = _tracker("10s")
    t0 = 1_000_000.0
    for i in range(3):
        t = t0 + 20 * i
        tr.on_record(_rec("r", f"q{i}", t, t))
        tr.on_record(_rec("d", f"q{i}", t + 0.01, t))
        tr.mark_idle("p")  # the monitor's tick sees no ready or in-flight work
    burst = t0 + 60
    for i in range(50):
        tr.on_record(_rec("r", f"b{i}", burst, burst))
    for i in range(10):
        tr.on_record(_rec("d", f"b{i}", burst + 0.02 * (i + 1), burst))
    assert tr.drain_rate("p", burst + 0.25) == pytest.approx(12 / 60)  # q0 left the window
    assert tr.service_rate("p", burst + 0.25) == pytest.approx(40, rel=0.01), "10 in 0.25 s"
    assert tr.service_rate("p", burst + 1.2) == pytest.approx(1.0), "stalled for 1 s"
    assert tr.predict_breach("urgent", burst + 0.25, horizon=10) is None


def test_predictor_respects_retry_times_and_forgets_finished():
    tr = _tracker("10s")
    t0 = 1_000_000.0
    tr.on_record(_rec("r", "q", t0, t0))
    tr.on_record(_rec("t", "q", t0 + 6, t0, attempt=1))  # next try ~5.5 s later: past 10 s
    assert tr.predict_breach("urgent", t0 + 6, horizon=10) == pytest.approx(4.0)
    tr.on_record(_rec("d", "q", t0 + 7, t0))
    assert tr.predict_breach("urgent", t0 + 7, horizon=10) is None
    assert tr.classes["urgent"].depth == 0
    assert tr.finished("q")[0]["recipients"][0]["state"] == "delivered"


# -- end to end: a slowing remote server -------------------------------------------------------

SLA_EXTRA = """
[monitor]
evaluate_every = "0.1s"
sample_every = "0.5s"
rate_window = "5s"
resolve_after = "0.5s"
[monitor.sla.policy-documents]
lead_time = "2s"
p95 = "30s"
"""


async def test_predictive_alert_fires_before_any_breach_and_resolves(tmp_path, sink, make_node):
    text = config_text(tmp_path, sink.port, SLA_EXTRA).replace('sla = "2m"', 'sla = "3s"')
    node = await make_node(text)
    sent: list[float] = []

    async def trickle(seconds: float) -> None:
        end = time.time() + seconds
        while time.time() < end:
            await node.intake.submit("s@insurer.test", [RcptIn(f"p{len(sent)}@example.com")],
                                     message("policy", cls="policy-documents"))
            sent.append(time.time())
            await asyncio.sleep(0.2)  # the scenario: a steady arrival rate, in real time

    await trickle(1.0)  # healthy: delivered in milliseconds
    assert not node.monitor.alerts.active
    sink.delay = 4.0  # the remote server slows beyond the 3 s SLA
    await trickle(2.5)
    sink.delay = 0.0  # and recovers
    await sink.wait_for(len(sent), timeout=30)
    await until(lambda: not node.monitor.alerts.active, timeout=15,
                what="the alerts resolved after the recovery")
    resolved = [a for a in node.monitor.alerts.history if a.rule == "predicted-breach"]
    assert resolved, "the predictive alert fired and resolved"
    alert = resolved[0]
    latencies = [(a.time - float(email.message_from_bytes(a.data)["X-Postlane-Queued"]
                                 .split(";")[0]), a) for a in sink.arrivals]
    breaches = [a.time - lat + 3.0 for lat, a in latencies if lat > 3.0]
    assert breaches, "the slowdown did make messages breach (otherwise the test proves nothing)"
    assert alert.fired_at < min(breaches), (alert.fired_at, min(breaches))
    assert alert.resolved_at is not None and alert.resolved_at > alert.fired_at
    assert not node.monitor.alerts.active
    journal = [json.loads(line) for line in
               (tmp_path / "acct" / "alerts.jsonl").read_text().splitlines()]
    events = [(j["event"], j["rule"]) for j in journal]
    assert ("fired", "predicted-breach") in events and ("resolved", "predicted-breach") in events


async def test_a_growing_backlog_alerts_at_least_the_lead_time_before_the_breach(
        tmp_path, sink, make_node):
    """The bench's target: arrivals outpace a slowed remote server, the queue grows, and the
    alert comes at least ``lead_time`` before the first message breaches."""
    extra = SLA_EXTRA.replace('lead_time = "2s"', 'lead_time = "1s"')
    text = config_text(tmp_path, sink.port, extra, max_out=1).replace('sla = "2m"', 'sla = "2s"')
    node = await make_node(text)
    sink.delay = 0.2  # one connection: about 5 messages a second
    count = 0
    start = time.time()
    while (now := time.time()) < start + 2.5:  # 15 a second
        # as many as the schedule has due by now: a loop slowed by a loaded machine catches up
        # (one submission a turn made 6 a second when each took 0.1 s longer: no backlog)
        while count < int((now - start) * 15) + 1:
            await node.intake.submit("s@insurer.test", [RcptIn(f"p{count}@example.com")],
                                     message("policy", cls="policy-documents"))
            count += 1
        await asyncio.sleep(0.066)  # the scenario: arrivals at a real-time rate
    await sink.wait_for(count, timeout=60)
    queued = [float(email.message_from_bytes(a.data)["X-Postlane-Queued"].split(";")[0])
              for a in sink.arrivals]
    breaches = [q + 2.0 for q, a in zip(queued, sink.arrivals, strict=True) if a.time - q > 2.0]
    assert breaches, "the backlog did make messages breach (otherwise the test proves nothing)"
    fired = [a for a in [*node.monitor.alerts.history, *node.monitor.alerts.active.values()]
             if a.rule == "predicted-breach"]
    assert fired, "the predictive alert fired"
    assert fired[0].fired_at <= min(breaches) - 1.0, (fired[0].fired_at, min(breaches))


async def test_threshold_alert_and_ops_mail(tmp_path, sink, make_node):
    extra = """
[monitor]
evaluate_every = "0.1s"
resolve_after = "60s"
ops_address = "ops@example.com"
ops_from = "monitor@insurer.test"
[monitor.sla.policy-documents]
p95 = "0.3s"
window = "1m"
lead_time = "0.01s"
"""
    node = await make_node(config_text(tmp_path, sink.port, extra))
    sink.delay = 0.6
    for i in range(3):
        await node.intake.submit("s@insurer.test", [RcptIn(f"p{i}@example.com")],
                                 message("policy", cls="policy-documents"))
    await until(lambda: "latency-threshold:policy-documents" in node.monitor.alerts.active,
                what="the threshold alert fired")
    alert = node.monitor.alerts.active["latency-threshold:policy-documents"]
    assert alert.value > 0.3 and alert.threshold == 0.3
    assert "p95 delivery latency" in alert.message
    sink.delay = 0.0
    arrivals = await sink.wait_for(4, timeout=20)
    [mail] = [a for a in arrivals if a.rcpts == ["ops@example.com"]]
    assert mail.peer == "127.0.0.20", "sent through the highest-priority class's pool"
    parsed = email.message_from_bytes(mail.data)
    assert "FIRED" in parsed["Subject"] and "policy-documents" in parsed["Subject"]


# -- webhook delivery --------------------------------------------------------------------------


class _Hook(BaseHTTPRequestHandler):
    fail_first = 0
    bodies: list[dict] = []

    def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).bodies.append(body)
        code = 500 if len(type(self).bodies) <= type(self).fail_first else 204
        self.send_response(code)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def hook_server():
    servers = []

    def start(fail_first: int):
        handler = type("Hook", (_Hook,), {"fail_first": fail_first, "bodies": []})
        server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}/hook", handler

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def _alert() -> Alert:
    now = time.time()
    return Alert("predicted-breach:claims", "predicted-breach", "claims", "trans-high",
                 "claims: first SLA breach expected in 90s", 90.0, 1200.0, now, now)


async def test_webhook_retries_until_accepted(hook_server):
    url, handler = hook_server(fail_first=2)
    notify = webhook_notifier(url, "node-1", retries=3, backoff=0.05, timeout=5)
    await notify("fired", _alert())
    assert len(handler.bodies) == 3, "two 500s, then delivered"
    body = handler.bodies[-1]
    assert body["event"] == "fired" and body["node"] == "node-1"
    assert body["alert"]["id"] == "predicted-breach:claims"
    assert body["alert"]["class"] == "claims" and body["alert"]["state"] == "active"


async def test_webhook_says_so_after_its_retries(hook_server, caplog):
    url, handler = hook_server(fail_first=100)
    notify = webhook_notifier(url, "node-1", retries=2, backoff=0.01, timeout=5)
    with pytest.raises(Undelivered, match="HTTP 500"):
        await notify("resolved", _alert())
    assert len(handler.bodies) == 3
    assert "alert webhook failed after its retries" in caplog.text


async def test_a_refused_page_is_tried_again_until_it_gets_through(hook_server, tmp_path):
    """The webhook notifier gave up after ``webhook_retries`` and the event was never told:
    a pager down for a minute lost the page. Now the alert manager tries the failed notifier
    again, with backoff, until it takes the event, and only then marks it told - the other
    notifiers are told once."""
    url, handler = hook_server(fail_first=5)
    logged: list[str] = []

    async def log_once(event: str, alert: Alert) -> None:
        logged.append(event)
        await log_notifier(event, alert)

    manager = AlertManager([log_once, webhook_notifier(url, "node-1", retries=0, backoff=0.01,
                                                       timeout=5)],
                           resolve_after=0.0, journal=tmp_path / "alerts.jsonl",
                           retry_backoff=0.01)
    told: list[tuple[str, str]] = []

    async def record(event: str, alert: Alert) -> None:
        told.append((event, alert.id))

    manager.told = record
    alert = _alert()
    manager.emit("fired", alert)
    await until(lambda: alert.notified == ["fired"], timeout=30, what="the page through")
    assert len(handler.bodies) == 6, "five refusals, then taken"
    assert logged == ["fired"] and told == [("fired", alert.id)]
    await manager.close()


async def test_restart_counts_resumed_messages(tmp_path, sink, make_node):
    text = config_text(tmp_path, sink.port)
    node = await make_node(text)
    await node.operations.pause("bulk", who=OPERATOR)
    for i in range(2):
        await node.intake.submit("s@insurer.test", [RcptIn(f"m{i}@example.com")],
                                 message("offer", cls="marketing"))
    await node.intake.submit("s@insurer.test", [RcptIn("late@example.com")],
                             message("policy", cls="policy-documents"))
    await sink.wait_for(1)
    await node.stop()
    again = await make_node(text)
    states = {c["class"]: c for c in again.monitor.class_states(time.time())}
    assert states["marketing"]["depth"] == 2
    assert states["marketing"]["oldest_age_s"] > 0
    assert states["policy-documents"]["depth"] == 0
    assert states["policy-documents"]["latency_s"]["1m"] is None, "history is not persisted"


async def test_one_nodes_live_totals_are_since_its_start_and_the_audit_store_keeps_all(
        tmp_path, sink, make_node):
    """The decision for one node (docs/operations.md, *Monitoring*): ``delivered_total`` of
    /api/v1/sla and the /metrics counters count since the node started - a restart starts
    them again, as ``postlane_uptime_seconds`` does - while ``postlane audit sla`` counts
    every delivery of a period from the audit store, restarts or not."""
    from tests.test_cli_ops import run_cli

    text = config_text(tmp_path, sink.port)
    (tmp_path / "node.toml").write_text(text)
    start = time.time() - 1
    for run in range(2):
        node = await make_node(text)
        await node.intake.submit("s@insurer.test", [RcptIn(f"r{run}@example.com")],
                                 message("notice", cls="policy-documents"))
        await sink.wait_for(run + 1)
        sla = await node.monitor.sla(time.time())
        totals = {c["class"]: c["delivered_total"] for c in sla["classes"]}
        assert (sla["scope"], totals["policy-documents"]) == ("node", 1), "since this start"
        metrics = node.monitor.metrics.render().decode()
        delivered = re.findall(
            r'^postlane_recipients_total\{[^}]*outcome="delivered"[^}]*\} (\S+)$', metrics, re.M)
        assert delivered == ["1.0"], metrics
        await node.stop()
    code, out, err = await run_cli("audit", "sla", "-c", str(tmp_path / "node.toml"),
                                   "--from", str(start), "--to", str(time.time() + 1),
                                   "--format", "json")
    assert code == 0, err
    assert json.loads(out)["classes"]["policy-documents"]["delivered"] == 2


async def test_one_nodes_failed_total_counts_its_final_failures(tmp_path, sink, make_node):
    """``failed_total`` per class in /api/v1/sla (one node: since its start): every ``b``
    record - the bounce, and the DSN to a sender whose domain does not resolve."""
    from tests.conftest import records

    sink.rcpt_replies = {"gone@example.com": ["550 5.1.1 no such user"]}
    node = await make_node(config_text(tmp_path, sink.port))
    await node.intake.submit("s@insurer.test", [RcptIn("gone@example.com"),
                                                RcptIn("here@example.com")],
                             message("notice", cls="marketing"))
    await sink.wait_for(1)

    async def failed() -> int | None:
        await node.flush_evidence()
        bounced = sum(1 for r in records(tmp_path) if r["type"] == "b")
        sla = await node.monitor.sla(time.time())
        total = sum(c["failed_total"] for c in sla["classes"])
        return total if bounced == 2 and total == bounced else None

    assert await until(failed, timeout=30, what="both failures counted") == 2


async def test_an_alert_mail_subject_carries_no_field_of_its_own() -> None:
    """An alert's text can name what a DMARC report (anyone's XML) calls a domain; in the
    alert mail's Subject an RFC 2047 word of CR LF ``Bcc: x`` was decoded by the email package
    and written as a field of its own, and a raw CR LF made the notification raise."""
    sent: list[bytes] = []

    async def submit(data: bytes) -> str:
        sent.append(data)
        return "Q1"

    notify = mail_notifier(submit, "n1", "postlane@mta.test", "ops@insurer.test")
    for domain in ("=?utf-8?b?DQpCY2M6IGV2aWxAYXR0YWNrZXIudGVzdA==?=", "a.test\r\nBcc: x@y.test"):
        alert = Alert("dmarc-unknown-senders:x", "dmarc-unknown-senders", "", "",
                      f"600 messages as {domain} from unknown senders", 600, 500, 0, 0)
        await notify("fired", alert)
    assert len(sent) == 2
    for data in sent:
        msg = email.message_from_bytes(data)
        assert msg["Bcc"] is None and len(msg.get_all("Subject")) == 1, data[:400]


async def test_an_alert_not_told_before_a_restart_is_told_after_it(tmp_path, sink, make_node):
    """One node fired an alert while its pager was down, then restarted: its alerts were in
    memory only, so the page was never sent (and an alert told as fired was never resolved).
    The node now keeps them in ``alerts.json`` beside its spool and, at start, tells what it
    had not told - here the fire, then the resolve, its condition being gone."""
    hook = FixtureHTTP()
    up = False
    paged: list[dict] = []
    refused: list[dict] = []

    def page(_query: dict, body: bytes, _headers: dict) -> tuple[int, str, bytes]:
        (paged if up else refused).append(json.loads(body))
        return (200 if up else 503), "application/json", b"{}"

    hook.json("POST", "/hook", page)
    text = config_text(tmp_path, sink.port, f"""
[monitor]
webhook_url = "{hook.url}/hook"
webhook_retries = 0
webhook_backoff = "0.1s"
resolve_after = "1s"
evaluate_every = "0.1s"
""")
    try:
        node = await make_node(text)
        node.monitor.sources.append(lambda now: [Condition(
            "gmail-reputation", "marketing", "bulk", 1.0, 2.0, "marketing: reputation low")])
        await until(lambda: refused, timeout=30, what="the page refused")
        [alert] = node.monitor.alerts.active.values()
        await node.stop()
        assert paged == []
        up = True  # the pager is back; the condition is gone with the old process
        await make_node(text)
        await until(lambda: len(paged) == 2, timeout=30, what="fired and resolved told")
    finally:
        hook.stop()
    assert [(p["event"], p["alert"]["id"], p["alert"]["fired_at"]) for p in paged] == [
        ("fired", alert.id, alert.fired_at), ("resolved", alert.id, alert.fired_at)]
