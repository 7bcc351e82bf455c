"""One truth for a cluster: two ``postlane serve`` processes on one PostgreSQL schema show the
same queue, SLA figures and alerts, and an outage is told once in the log.

(The issue this answers: node A fired an SLA alert for 259 messages node B had delivered in a
second, B showed a depth of -259, and a 15 s database stop logged a traceback per message.)
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys

import httpx

from postlane.monitor.membership import cluster_status
from postlane.scheduler.control import Selector
from tests.conftest import OPERATOR, send
from tests.conftest import message as plain_message
from tests.support.httpfixture import FixtureHTTP
from tests.support.pg import pg_schema  # noqa: F401  (fixture)
from tests.support.tcpproxy import TCPProxy
from tests.support.waiting import until
from tests.test_cluster import (
    Served,
    _until,
    cluster_text,
    delivered_by,
    send_many,
    start_node,
    subjects_of,
)


def depths(metrics: str) -> list[float]:
    return [float(v) for v in re.findall(r"^postlane_queue_depth\{[^}]*\} (\S+)$", metrics,
                                         re.M)]


async def eventually(check, timeout: float = 60.0):
    """``until`` the async ``check`` (an API call each) returns something true; that value."""
    return await until(check, timeout=timeout, step=0.2, what=check.__name__)


async def test_intake_on_one_node_delivery_by_the_other_no_alert_and_depth_zero(
        tmp_path, sink, pg_schema):  # noqa: F811
    sink.delay = 0.05
    a = Served(tmp_path, "node-a", cluster_text(tmp_path, sink.port, pg_schema, "node-a",
                                                max_out=1))
    b = Served(tmp_path, "node-b", cluster_text(tmp_path, sink.port, pg_schema, "node-b",
                                                max_out=4))
    try:
        port_a = await a.port()
        await b.port()
        names = [f"p{i:03d}" for i in range(120)]
        submit = asyncio.create_task(asyncio.to_thread(send_many, port_a, names,
                                                       "policy-documents"))
        seen_depths: list[int] = []

        async def sampled() -> bool:  # every 0.2 s, both nodes' depths while the mail flows
            for node in (a, b):
                sla = await node.api("/api/v1/sla")
                seen_depths.extend(c["depth"] for c in sla["classes"]  # (null: no figures
                                   if c["depth"] is not None)               # evaluated yet)
            return submit.done() and (len(sink.arrivals) >= len(names)
                                      or len(await submit) < len(names))

        await until(sampled, timeout=120, step=0.2, what="every message delivered")
        assert len(await submit) == len(names)
        assert sorted(subjects_of(sink.arrivals)) == names
        assert min(seen_depths) >= 0, "no negative depth, ever"
        assert max(seen_depths) > 0, "the queue was seen while it was there"

        async def settled() -> list[dict] | None:
            slas = [await node.api("/api/v1/sla") for node in (a, b)]
            if all(c["depth"] == 0 for s in slas for c in s["classes"]):
                return slas
            return None

        sla_a, sla_b = await eventually(settled)
        assert sla_a["scope"] == sla_b["scope"] == "cluster"
        assert sla_a["evaluated_by"] == sla_b["evaluated_by"] in ("node-a", "node-b")
        own = {s["node"]["name"]: {c["class"]: c for c in s["node"]["classes"]}
               for s in (sla_a, sla_b)}
        assert own["node-a"]["policy-documents"]["received_total"] == 120
        assert own["node-b"]["policy-documents"]["received_total"] == 0
        assert own["node-b"]["policy-documents"]["delivered_total"] > 0, "b delivered"
        assert own["node-a"]["policy-documents"]["held"] == own["node-b"]["policy-documents"][
            "held"] == 0, "what each node holds is counted down as it delivers"
        for node in (a, b):
            metrics = await node.api("/metrics")
            assert depths(metrics) and set(depths(metrics)) == {0.0}
            assert "postlane_alert_active{" not in metrics
            alerts = await node.api("/api/v1/alerts")
            assert alerts == {"active": [], "resolved": []}, "no alert, ever"
            status = await node.api("/api/v1/status")
            assert {n["name"]: n["state"] for n in status["cluster"]["nodes"]} == {
                "node-a": "alive", "node-b": "alive"}
    finally:
        await asyncio.to_thread(a.stop)
        await asyncio.to_thread(b.stop)
    assert delivered_by(tmp_path, "node-b") > delivered_by(tmp_path, "node-a")


def domain_depths(metrics: str) -> dict[str, float]:
    return {d: float(v) for d, v in re.findall(
        r'^postlane_domain_queue_depth\{domain="([^"]*)"\} (\S+)$', metrics, re.M)}


async def test_the_queue_per_domain_is_the_clusters_on_every_node(tmp_path, sink,
                                                                  pg_schema):  # noqa: F811
    """/metrics per destination domain counts the shared queue, as its per-class depth does,
    not the lanes of what the scraped node happens to hold (that was 0 on every node while
    a paused pool's 10 waited; and each node's own share while a campaign went out)."""
    a = await start_node(cluster_text(tmp_path, sink.port, pg_schema, "node-a"))
    b = await start_node(cluster_text(tmp_path, sink.port, pg_schema, "node-b"))
    try:
        await a.operations.pause("bulk", who=OPERATOR)
        await _until(lambda: ("bulk", "*") in b.scheduler.paused)
        await asyncio.to_thread(send_many, a.listeners[0].port, [f"q{i}" for i in range(10)])

        for node in (a, b):
            async def counted(node=node) -> dict | None:
                figures = await node.monitor.cluster.current()
                return figures if figures is not None and any(
                    c["class"] == "marketing" and c["depth"] == 10
                    for c in figures["classes"]) else None

            figures = await until(counted, timeout=30, what="the cluster's figures: the 10")
            metrics = node.monitor.metrics.render(figures).decode()
            assert depths(metrics) and max(depths(metrics)) == 10.0
            assert domain_depths(metrics) == {"example.com": 10.0}, node.config.node.name
            oldest = re.search(r'^postlane_domain_oldest_age_seconds\{domain="example.com"\} '
                               r'(\S+)$', metrics, re.M)
            assert oldest is not None and 0 <= float(oldest[1]) < 60
        assert sink.arrivals == []
    finally:
        await a.stop()
        await b.stop()


async def test_mail_on_hold_is_in_the_clusters_queue_as_on_one_node(tmp_path, sink,
                                                                    pg_schema):  # noqa: F811
    """Recipients on hold are not final: one node counts them in its depth (and lanes); the
    cluster's figures left them out, so 2 held of 4 queued showed as a queue of 2, and the
    shared queue per pool had no place for them."""
    a = await start_node(cluster_text(tmp_path, sink.port, pg_schema, "node-a"))
    b = await start_node(cluster_text(tmp_path, sink.port, pg_schema, "node-b"))
    try:
        await a.operations.pause("bulk", who=OPERATOR)
        await _until(lambda: ("bulk", "*") in b.scheduler.paused)
        await asyncio.to_thread(send_many, a.listeners[0].port, [f"h{i}" for i in range(4)])
        for rcpt in ("h0@example.com", "h1@example.com"):
            held = await b.operations.queue("hold", Selector(recipient=rcpt), who=OPERATOR)
            assert held["recipients"] == 1, held
        for node in (a, b):
            async def counted(node=node) -> dict | None:
                figures = await node.monitor.cluster.current()
                return figures if figures is not None and figures["pools"]["bulk"][
                    "on_hold"] == 2 else None

            figures = await until(counted, timeout=30, what="the cluster's figures: 2 on hold")
            [marketing] = [c for c in figures["classes"] if c["class"] == "marketing"]
            assert marketing["depth"] == 4
            assert (figures["pools"]["bulk"]["queued"], figures["pools"]["bulk"]["on_hold"]) \
                == (2, 2)
            metrics = node.monitor.metrics.render(figures).decode()
            assert 'postlane_queue_depth{class="marketing",pool="bulk"} 4.0' in metrics
            assert domain_depths(metrics) == {"example.com": 4.0}
        status = await cluster_status(a.spool, a.config.cluster)
        assert (status["pools"]["bulk"]["queued"], status["pools"]["bulk"]["on_hold"]) == (2, 2)
        assert sink.arrivals == []
    finally:
        await a.stop()
        await b.stop()


SLOW = """
[monitor]
resolve_after = "2s"
[monitor.sla.policy-documents]
lead_time = "4s"
p95 = "1h"
"""


def _alerting_pair(tmp_path, sink, schema: str, monitor: str) -> dict[str, Served]:
    """Two nodes on one schema, one connection per IP and a 10 s policy SLA: a backlog of
    policy notices predicts a breach. ``monitor``: lines added to ``[monitor]``."""
    slow = SLOW.replace("[monitor]\n", "[monitor]\n" + monitor)
    return {name: Served(tmp_path, name, cluster_text(
        tmp_path, sink.port, schema, name, slow, max_out=1).replace(
            'sla = "2m"', 'sla = "10s"')) for name in ("node-a", "node-b")}


async def _backlog(nodes: dict[str, Served]) -> None:
    """40 policy notices through the first node."""
    ports = [await node.port() for node in nodes.values()]
    await asyncio.to_thread(send_many, ports[0], [f"s{i:02d}" for i in range(40)],
                            "policy-documents")


async def test_a_backlog_alerts_once_for_the_cluster_and_resolves_once_after_its_evaluator_dies(
        tmp_path, sink, pg_schema):  # noqa: F811
    sink.delay = 1.0  # a slow receiver: 2 connections in all, one message a second each
    hook = FixtureHTTP()  # the operators' pager: told once per event, not once per node
    paged: list[dict] = []

    def page(_query: dict, body: bytes, _headers: dict) -> tuple[int, str, bytes]:
        paged.append(json.loads(body))
        return 200, "application/json", b"{}"

    hook.json("POST", "/hook", page)
    nodes = _alerting_pair(tmp_path, sink, pg_schema, f'webhook_url = "{hook.url}/hook"\n')
    try:
        await _backlog(nodes)

        async def fired() -> dict | None:
            alerts = await nodes["node-b"].api("/api/v1/alerts")
            return alerts["active"][0] if alerts["active"] else None

        alert = await eventually(fired)
        assert alert["id"] == "predicted-breach:policy-documents"

        async def on_a_too() -> bool:
            alerts = await nodes["node-a"].api("/api/v1/alerts")
            return [a["id"] for a in alerts["active"]] == [alert["id"]]

        await eventually(on_a_too)
        # the node evaluating the cluster dies with the alert active
        evaluator = (await nodes["node-a"].api("/api/v1/sla"))["evaluated_by"]
        survivor = nodes["node-b" if evaluator == "node-a" else "node-a"]
        nodes[evaluator].proc.kill()
        nodes[evaluator].proc.wait(10)

        async def adopted() -> bool:
            sla = await survivor.api("/api/v1/sla")
            alerts = await survivor.api("/api/v1/alerts")
            return sla["evaluated_by"] == survivor.name and not sla["stale"] and [
                a["id"] for a in alerts["active"]] == [alert["id"]]

        await eventually(adopted)
        sink.delay = 0.0  # the receiver recovers: the backlog drains

        async def resolved() -> dict | None:
            alerts = await survivor.api("/api/v1/alerts")
            return None if alerts["active"] else alerts

        alerts = await eventually(resolved, timeout=120)
        assert [a["id"] for a in alerts["resolved"]] == [alert["id"]]
        assert alerts["resolved"][0]["fired_at"] == alert["fired_at"], "the same alert"
    finally:
        for node in nodes.values():
            await asyncio.to_thread(node.stop)
        hook.stop()
    assert [(p["event"], p["alert"]["id"], p["cluster"]) for p in paged] == [
        ("fired", alert["id"], pg_schema), ("resolved", alert["id"], pg_schema)], paged
    told = sorted((r for node in nodes.values() for r in node.lines()
                   if str(r.get("msg", "")).startswith("alert ")), key=lambda r: r["ts"])
    assert [r["msg"].split(":")[0] for r in told] == ["alert fired", "alert resolved"], told
    journal = [json.loads(line) for name in nodes
               for line in (tmp_path / f"acct-{name}" / "alerts.jsonl").read_text().splitlines()
               if (tmp_path / f"acct-{name}" / "alerts.jsonl").exists()]
    assert sorted(j["event"] for j in journal) == ["fired", "resolved"]


async def test_an_alert_whose_page_failed_is_paged_by_the_node_taking_over(
        tmp_path, sink, pg_schema):  # noqa: F811
    """The evaluator stored an alert as fired, its pager refused, and it died: the node that
    took over kept the alert active and never paged it (an outage nobody was told of). Every
    event is now marked told once delivered; the next evaluator tells what was not."""
    sink.delay = 1.0
    hook = FixtureHTTP()
    up = False
    paged: list[dict] = []
    refused: list[dict] = []

    def page(_query: dict, body: bytes, _headers: dict) -> tuple[int, str, bytes]:
        (paged if up else refused).append(json.loads(body))
        return (200 if up else 503), "application/json", b"{}"

    hook.json("POST", "/hook", page)
    nodes = _alerting_pair(tmp_path, sink, pg_schema, f'webhook_url = "{hook.url}/hook"\n'
                           'webhook_retries = 0\nwebhook_backoff = "0.2s"\n')
    try:
        await _backlog(nodes)

        async def fired_not_told() -> dict | None:
            alerts = await nodes["node-b"].api("/api/v1/alerts")
            return alerts["active"][0] if alerts["active"] and refused else None

        alert = await eventually(fired_not_told)
        assert alert["id"] == "predicted-breach:policy-documents"
        evaluator = (await nodes["node-a"].api("/api/v1/sla"))["evaluated_by"]
        assert {r["node"] for r in refused} == {evaluator}
        survivor = nodes["node-b" if evaluator == "node-a" else "node-a"]
        nodes[evaluator].proc.kill()
        nodes[evaluator].proc.wait(10)
        up = True  # the pager is back

        async def told() -> dict | None:
            alerts = await survivor.api("/api/v1/alerts")
            return alerts["active"][0] if paged and alerts["active"] and alerts["active"][0].get(
                "notified") == ["fired"] else None

        again = await eventually(told)
        assert again["fired_at"] == alert["fired_at"], "the same alert, not a new one"
        assert [(p["event"], p["node"]) for p in paged] == [("fired", survivor.name)], paged
        sink.delay = 0.0

        async def resolved() -> dict | None:
            alerts = await survivor.api("/api/v1/alerts")
            done = alerts["resolved"][0] if alerts["resolved"] else None
            return done if done and done.get("notified") == ["fired", "resolved"] else None

        await eventually(resolved, timeout=120)
    finally:
        for node in nodes.values():
            await asyncio.to_thread(node.stop)
        hook.stop()
    assert [(p["event"], p["alert"]["id"]) for p in paged] == [
        ("fired", alert["id"]), ("resolved", alert["id"])], paged


def story(node: Served, kind: str) -> list[str]:
    return [r["event"] for r in node.lines() if r.get("degraded") == kind]


async def test_a_database_outage_is_told_once_when_it_starts_and_once_when_it_ends(
        tmp_path, sink, pg_schema):  # noqa: F811
    proxy = await TCPProxy("127.0.0.1", 5432).start()
    node = Served(tmp_path, "node-a", cluster_text(tmp_path, sink.port, pg_schema, "node-a")
                  .replace("127.0.0.1:5432", f"127.0.0.1:{proxy.port}"))
    try:
        port = await node.port()
        assert await asyncio.to_thread(send_many, port, ["before"]) == ["before"]
        await sink.wait_for(1, timeout=30)
        proxy.cut()
        refused = []
        for i in range(4):  # every message offered meanwhile gets a 451, none a traceback
            try:
                await send(port, "sender@insurer.test", ["x@example.com"],
                           plain_message(f"during{i}"))
            except Exception as exc:  # noqa: BLE001 - smtplib's refusal
                refused.append(str(exc))
            # real time in the scenario: the outage lasts (it is told with its duration, >= 5 s)
            await asyncio.sleep(1.5)
        assert len(refused) == 4 and all("451" in r for r in refused), refused
        await proxy.start()
        await _until(lambda: story(node, "database") == ["start", "end"], timeout=60)
        assert await asyncio.to_thread(send_many, port, ["after"]) == ["after"]
        await sink.wait_for(2, timeout=30)
    finally:
        await asyncio.to_thread(node.stop)  # the proxy runs on this event loop: keep it going
    lines = node.lines()
    assert story(node, "database") == ["start", "end"]
    start, end = (r for r in lines if r.get("degraded") == "database")
    assert start["level"] == "ERROR" and "451" in start["effect"] and start["cause"]
    assert end["refusals"] == 4 and end["duration_s"] >= 5
    assert story(node, "fence") in ([], ["start", "end"])
    assert not [r for r in lines if "exc" in r or "raw" in r], "no traceback"
    assert not [r for r in lines if "retrying 0" in str(r.get("msg"))]
    assert not [r for r in lines if r.get("logger", "").startswith("asyncpg")]
    assert sorted(subjects_of(sink.arrivals)) == ["after", "before"]


async def test_the_queue_per_lane_is_the_clusters_on_every_node(tmp_path, sink,
                                                                pg_schema):  # noqa: F811
    """``postlane queues`` and the status in a cluster: a lane's queue was shown only as what
    the asked node had claimed (nothing, on a node holding none of it), so no node could say
    how much waits for a destination in a pool. The cluster's deepest lanes, on every node."""
    a = await start_node(cluster_text(tmp_path, sink.port, pg_schema, "node-a"))
    b = await start_node(cluster_text(tmp_path, sink.port, pg_schema, "node-b"))
    try:
        await a.operations.pause("bulk", who=OPERATOR)
        await _until(lambda: ("bulk", "*") in b.scheduler.paused)
        await asyncio.to_thread(send_many, a.listeners[0].port, [f"l{i}" for i in range(5)])
        held = await b.operations.queue("hold", Selector(recipient="l0@example.com"),
                                        who=OPERATOR)
        assert held["recipients"] == 1
        token = (tmp_path / "api-token").read_text().strip()
        for node in (a, b):
            async def counted(node=node) -> dict | None:
                async with httpx.AsyncClient(timeout=30) as client:
                    status = (await client.get(
                        f"http://127.0.0.1:{node.api.port}/api/v1/status",
                        headers={"Authorization": f"Bearer {token}"})).json()
                lanes = status["cluster"]["lanes"]
                return status if lanes and lanes[0]["on_hold"] == 1 else None

            status = await until(counted, timeout=30, what="the cluster's lanes")
            [lane] = status["cluster"]["lanes"]
            assert {k: lane[k] for k in ("pool", "domain", "depth", "queued", "deferred",
                                         "on_hold")} == {
                "pool": "bulk", "domain": "example.com", "depth": 5, "queued": 4,
                "deferred": 0, "on_hold": 1}
            assert 0 <= lane["oldest_age_s"] < 60
        assert b.scheduler.queued() == 0, "node-b holds none of it"
        out = await asyncio.to_thread(subprocess.run, [
            sys.executable, "-m", "postlane.cli", "queues", "--url",
            f"http://127.0.0.1:{b.api.port}", "--token-file", str(tmp_path / "api-token")],
            capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        assert "shared queue per lane" in out.stdout
        [row] = [ln for ln in out.stdout.splitlines() if "example.com" in ln and "bulk" in ln]
        assert [c.strip() for c in row.split("│")[3:6]] == ["4", "0", "1"], row
    finally:
        await a.stop()
        await b.stop()


async def test_an_action_by_queue_id_in_a_cluster_names_the_ids_it_left_alone(
        tmp_path, sink, pg_schema):  # noqa: F811
    """By queue id on a cluster node: a held message of the shared spool is released (no
    id left alone), an id no node has is named as not in the queue."""
    a = await start_node(cluster_text(tmp_path, sink.port, pg_schema, "node-a"))
    b = await start_node(cluster_text(tmp_path, sink.port, pg_schema, "node-b"))
    try:
        await a.operations.pause("bulk", who=OPERATOR)
        await _until(lambda: ("bulk", "*") in b.scheduler.paused)
        await asyncio.to_thread(send_many, a.listeners[0].port, ["k0"])
        held = await b.operations.queue("hold", Selector(recipient="k0@example.com"),
                                        who=OPERATOR)
        assert held["recipients"] == 1, held
        [msg] = (await a.operations.control.messages(Selector(state="held")))["messages"]
        qid = msg["queue_id"]
        out = await a.operations.queue("release", Selector(queue_ids=(qid, "NOSUCHID")),
                                       who=OPERATOR)
        assert out["recipients"] == 1, out
        assert list(out["untouched"]) == ["NOSUCHID"], out
        assert out["untouched"]["NOSUCHID"].startswith("not in the queue"), out
    finally:
        await a.stop()
        await b.stop()
