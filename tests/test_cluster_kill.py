"""Kill points of a cluster: two ``postlane serve`` processes on one PostgreSQL schema, one of
them SIGKILLed the moment a change it makes is committed (a thread watches the shared spool
from outside, as ``tests/test_crash_hunt.py`` does the SQLite one), and what the cluster has
done, sent and recorded once the other node has taken its work over."""

from __future__ import annotations

import asyncio
import contextlib
import email
import json
import os
import signal
import smtplib
import threading
import time
from collections.abc import Mapping

import psycopg
import pytest

from postlane.feedback.dsn import FailedRecipient, build_bounce
from tests.conftest import message, send
from tests.support.pg import PG_DSN, pg_schema  # noqa: F401  (fixture)
from tests.support.waiting import until
from tests.test_cluster import Served, send_many, subjects_of
from tests.test_cluster_feedback import FEEDBACK
from tests.test_cluster_truth import _node, _rows, ops_cli
from tests.test_feedback_node import _arf


def _kill_when(schema: str, pid: int | Mapping[str, int], sql: str,
               sig: int = signal.SIGKILL) -> threading.Thread:
    """A thread that SIGKILLs ``pid`` (or sends it ``sig``) the moment ``sql`` (a count, on
    the shared schema, read as another process would) is non-zero; gives up after 60 s.
    ``pid`` a mapping of node names: ``sql`` gives (a node's name or NULL, the count), and
    the node it last named is the one killed (its name in the thread's ``named``)."""

    def watch() -> None:
        named = ""
        with psycopg.connect(PG_DSN, autocommit=True,
                             options=f"-c search_path={schema}") as conn:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                with contextlib.suppress(psycopg.errors.UndefinedTable):  # not made yet
                    row = conn.execute(sql).fetchone()
                    if isinstance(pid, Mapping):
                        named = row[0] or named
                    if row[-1] and (named or not isinstance(pid, Mapping)):
                        thread.named = named  # type: ignore[attr-defined]
                        os.kill(pid[named] if isinstance(pid, Mapping) else pid, sig)
                        return
                time.sleep(0.0002)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def _dsns(arrivals: list) -> list[str]:
    """The queue id of each DSN (from the null sender) the sink took, once per arrival."""
    return [email.message_from_bytes(a.data)["X-Postlane-Queued"].split("id=")[1]
            for a in arrivals if a.mail_from in ("", "<>")]


async def _drained(schema: str) -> bool:
    """No message left in the shared spool, and no node's records left in its outbox (the
    surviving node's recorder has adopted the killed one's)."""
    rows = await _rows(schema, "SELECT (SELECT count(*) FROM messages)"
                       " + (SELECT count(*) FROM events) AS n")
    return rows[0]["n"] == 0


async def _until_drained(schema: str, what: str, timeout: float = 60) -> None:
    """``_drained``, or an AssertionError that shows what was left."""
    try:
        await until(lambda: _drained(schema), timeout=timeout, step=0.1, what=what)
    except AssertionError as exc:
        left = [await _rows(schema, sql) for sql in (
            "SELECT m.id, m.listener, r.address, r.state, r.lease_owner FROM messages m"
            " LEFT JOIN recipients r ON r.msg_id = m.id",
            "SELECT e.writer, e.n, w.node FROM events e LEFT JOIN writers w USING (writer)",
            "SELECT * FROM writers", "SELECT name, heartbeat, clock_timestamp() FROM nodes")]
        raise AssertionError(f"{exc}; left: {left}") from None


async def _killed_at(node: Served, watcher: threading.Thread) -> None:
    await asyncio.to_thread(watcher.join, 60)
    await asyncio.to_thread(node.proc.wait, 30)


async def test_a_node_killed_as_a_deletes_dsn_commits_sends_one_dsn(tmp_path, sink,
                                                                    pg_schema):  # noqa: F811
    """``postlane queue delete --dsn`` on node-a, SIGKILLed the moment the DSN is committed.
    The deleted recipient's final state and "b" record were written in a commit after the
    DSN's: killed between, node-b took the recipient over, delivered it (here: refused, 550)
    and sent the sender a second DSN. The DSN and the final state are one transaction now:
    one DSN, the recipient never delivered, its "b" once."""
    sink.rcpt_replies["gone@example.com"] = ["550 5.1.1 no such user"]
    a, b = (_node(tmp_path, sink.port, pg_schema, name) for name in ("node-a", "node-b"))
    try:
        port = await a.port()
        await b.port()
        paused = await asyncio.to_thread(ops_cli, a, "pause", "bulk")
        assert paused.returncode == 0, paused.stderr
        await send(port, "notices@example.com", ["gone@example.com"], message("m"))
        [row] = await _rows(pg_schema, "SELECT id FROM messages")
        watcher = _kill_when(pg_schema, a.proc.pid,
                             "SELECT count(*) FROM messages WHERE listener = 'dsn'")
        await asyncio.to_thread(ops_cli, a, "queue", "delete", row["id"], "--dsn", "--yes")
        await _killed_at(a, watcher)
        resumed = await asyncio.to_thread(ops_cli, b, "resume", "bulk")
        assert resumed.returncode == 0, resumed.stderr
        await sink.wait_for(1, timeout=60)
        await _until_drained(pg_schema, "node-b took over and delivered what was left")

        async def counted() -> dict | None:  # the DSN delivered, the deleted one failed
            totals = _totals(await b.api("/api/v1/sla"))["marketing"]
            return totals if totals[2] == 0 and totals[0] + totals[1] >= 2 else None

        assert await until(counted, timeout=20, step=0.2, what="the cluster's totals") == (
            1, 1, 0)
    finally:
        for node in (a, b):
            await asyncio.to_thread(node.stop, signal.SIGKILL)
    dsns = _dsns(sink.arrivals)
    assert len(dsns) == 1, f"{len(dsns)} DSNs sent: {dsns}"
    assert sink.rcpt_attempts["gone@example.com"] == 0, "a deleted recipient was delivered"
    trail = [r["type"] for r in await _rows(
        pg_schema, "SELECT type FROM audit_records WHERE rcpt = 'gone@example.com'"
        " ORDER BY seq")]
    assert sorted(trail) == ["b", "r"], trail


def _verp(text: str) -> str:
    """The bulk pool sends with VERP return paths (a remote bounce comes back to the nodes)."""
    return text.replace("[pools.bulk]\n", '[pools.bulk]\nbounce_domain = "bounces.mta.test"\n')


def _feedback_nodes(tmp_path, sink_port: int, schema: str) -> tuple[Served, Served]:
    """Two nodes of one cluster, each with its own suppression list file (one key: the
    nodes share their ``state`` folder here)."""
    return tuple(_node(tmp_path, sink_port, schema, name, edit=_verp,  # type: ignore[return-value]
                       extra=FEEDBACK.format(db=tmp_path / f"{name}-suppression.sqlite3"))
                 for name in ("node-a", "node-b"))


async def test_a_remote_bounce_sent_again_after_a_kill_is_one_rb_record(tmp_path, sink,
                                                                       pg_schema):  # noqa: F811
    """The receiving side bounces a delivered message to its VERP address at node-a, which is
    SIGKILLed the moment the "rb" record is committed, before its 250: the reporting MTA sends
    the report again, to node-b (the bounce domain's other MX). Each node remembered the
    reports it had recorded since its own start only, so node-b wrote a second "rb": two
    remote bounces of one recipient in the trail, the pool's bounce counts and the
    exports."""
    a, b = _feedback_nodes(tmp_path, sink.port, pg_schema)
    try:
        port_a, port_b = await a.port(), await b.port()
        await send(port_a, "news@insurer.test", ["v1@example.com"],
                   message("campaign", cls="marketing"))
        [arrival] = await sink.wait_for(1)
        dsn = build_bounce(reporting_mta="mx.example.com", sender=arrival.mail_from,
                           recipients=[FailedRecipient(
                               "v1@example.com", "failed", "5.1.1",
                               "550 5.1.1 <v1@example.com>: no such user (rb-marker)",
                               "mx.example.com")],
                           original=arrival.data, arrival_date=time.time(), ret="HDRS")
        watcher = _kill_when(pg_schema, a.proc.pid, "SELECT (SELECT count(*) FROM events WHERE"
                             " position('rb-marker'::bytea in data) > 0)"
                             " + (SELECT count(*) FROM audit_records WHERE type = 'rb')")
        with contextlib.suppress(smtplib.SMTPException, OSError):
            await send(port_a, "", [arrival.mail_from], dsn)
        await _killed_at(a, watcher)
        assert await send(port_b, "", [arrival.mail_from], dsn) == {}
        await _until_drained(pg_schema, "node-a's records adopted by node-b")
    finally:
        for node in (a, b):
            await asyncio.to_thread(node.stop, signal.SIGKILL)
    rb = await _rows(pg_schema, "SELECT rcpt, dsn_status FROM audit_records WHERE type = 'rb'")
    assert [tuple(r) for r in rb] == [("v1@example.com", "5.1.1")], rb


def _totals(sla: dict) -> dict[str, tuple]:
    return {c["class"]: (c["delivered_total"], c["failed_total"], c["depth"])
            for c in sla["classes"]}


async def test_totals_after_a_takeover_of_deferred_work_count_every_outcome_once(
        tmp_path, sink, pg_schema):  # noqa: F811
    """node-a is SIGKILLed the moment it holds a deferred recipient (a 451 committed), with
    deliveries, bounces and deferrals of both classes under way on both nodes. node-b takes
    its work over (retries that deliver or bounce), node-a restarts: the cluster's totals on
    both nodes (``/api/v1/sla`` and ``postlane status --json``) are the audit store's "d"
    and "b" counts, and what the sink took, exactly."""
    sink.delay = 0.02
    script = {"later": ["451 4.3.0 try later", "250 2.1.5 Ok"],  # deferred, then delivered
              "soft": ["451 4.3.0 try later", "550 5.1.1 no such user"],  # then refused
              "gone": ["550 5.1.1 no such user"]}
    batches: list[tuple[int, str, list[str]]] = []  # (n, class, subjects)
    for n in (0, 1):
        policy = [f"p{n}{i:02d}" for i in range(20)] + [
            f"{kind}{n}{i}" for kind in script for i in range(3)]
        bulk = [f"m{n}{i:02d}" for i in range(20)] + [f"mlater{n}{i}" for i in range(3)]
        batches += [(n, "policy-documents", policy), (n, "marketing", bulk)]
        for names in (policy, bulk):
            for name in names:
                kind = name.removeprefix("m").rstrip("0123456789")
                if kind in script:
                    sink.rcpt_replies[f"{name}@example.com"] = list(script[kind])
    route = f'"insurer.test" = "127.0.0.1:{sink.port}"\n'  # the senders get their DSNs
    a, b = (_node(tmp_path, sink.port, pg_schema, name, extra=route, max_out=2,
                    marketing_max_out=2)
            for name in ("node-a", "node-b"))
    seen: list = []
    try:
        ports = [await a.port(), await b.port()]
        watcher = _kill_when(pg_schema, a.proc.pid, "SELECT count(*) FROM recipients WHERE"
                             " state = 'deferred' AND lease_owner = 'node-a'")
        # all through node-b (node-a claims its share of the shared queue): every one acked
        acked = await asyncio.gather(*(asyncio.to_thread(send_many, ports[1], names, cls)
                                       for _, cls, names in batches))
        assert sum(map(len, acked)) == sum(len(names) for *_, names in batches)
        await _killed_at(a, watcher)
        a = _node(tmp_path, sink.port, pg_schema, "node-a", extra=route, max_out=2,
                  marketing_max_out=2)
        await a.port()
        await _until_drained(pg_schema, "every recipient final, every record in the store")
        stored = {(r["cls"], r["type"]): r["n"] for r in await _rows(
            pg_schema, "SELECT cls, type, count(*) AS n FROM audit_records"
            " WHERE type IN ('d', 'b') GROUP BY cls, type")}
        want = {cls: (stored.get((cls, "d"), 0), stored.get((cls, "b"), 0), 0)
                for cls in ("policy-documents", "marketing")}

        async def agreed() -> bool:
            seen.clear()
            for node in (a, b):
                seen.append(_totals(await node.api("/api/v1/sla")))
                out = await asyncio.to_thread(ops_cli, node, "status", "--json")
                assert out.returncode == 0, out.stderr
                seen.append(_totals(json.loads(out.stdout)["sla"]))
            return all(s == want for s in seen)

        with contextlib.suppress(AssertionError):
            await until(agreed, timeout=20, step=0.5, what="the totals on both nodes")
    finally:
        for node in (a, b):
            await asyncio.to_thread(node.stop, signal.SIGKILL)
    assert seen and all(s == want for s in seen), (want, seen)
    took = set(subjects_of([x for x in sink.arrivals if x.mail_from not in ("", "<>")]))
    dsns = set(_dsns(sink.arrivals))  # one per bounced recipient, delivered in its class
    assert len(dsns) == 12, dsns
    assert want == {"policy-documents": (sum(1 for t in took if not t.startswith("m"))
                                         + len(dsns), 12, 0),
                    "marketing": (sum(1 for t in took if t.startswith("m")), 0, 0)}, want
    assert len(took) == 2 * (20 + 3 + 20 + 3), sorted(took)  # every delivery at the sink


async def test_a_node_killed_as_its_bounces_dsn_commits_leaves_nothing_behind(
        tmp_path, sink, pg_schema):  # noqa: F811
    """The remote refuses a recipient for good; the node delivering it is stopped the moment
    the DSN is committed (with the recipient's final state and "b", one transaction), and
    SIGKILLed once its recorder has filed and stored that commit's records (its spool never
    trimmed them). The message itself was deleted in a commit after the DSN's: killed
    between, it stayed in the shared spool with no recipient left to deliver, and the running
    node never removed it (only a node's start sweeps). And the other node, adopting the
    killed one's records with nothing left to file, never told its spool to trim them: they
    stayed in the outbox until that node wrote records of its own. Now the message goes in
    the DSN's commit, and an adopted position is recorded at the next sync: one DSN, one
    attempt, nothing left."""
    sink.rcpt_replies["gone@example.com"] = ["550 5.1.1 no such user"]
    nodes = {name: _node(tmp_path, sink.port, pg_schema, name) for name in ("node-a", "node-b")}
    try:
        port = await nodes["node-a"].port()
        await nodes["node-b"].port()
        watcher = _kill_when(pg_schema, {n: node.proc.pid for n, node in nodes.items()},
                             "SELECT (SELECT lease_owner FROM recipients WHERE address ="
                             " 'gone@example.com'), (SELECT count(*) FROM messages"
                             " WHERE listener = 'dsn')", signal.SIGSTOP)
        await send(port, "notices@example.com", ["gone@example.com"], message("m"))
        await asyncio.to_thread(watcher.join, 60)
        stopped = nodes[watcher.named]  # type: ignore[attr-defined]

        async def filed() -> bool:  # its recorder, still running, has it all in its files
            rows = await _rows(pg_schema, "SELECT count(*) AS n FROM writers w WHERE"
                               f" w.node = '{watcher.named}' AND w.filed < (SELECT"  # type: ignore[attr-defined]
                               " coalesce(max(n), 0) FROM events e WHERE e.writer = w.writer)")
            return rows[0]["n"] == 0

        await until(filed, timeout=30, step=0.02, what="the stopped node's records filed")
        stopped.proc.kill()
        await asyncio.to_thread(stopped.proc.wait, 30)
        await sink.wait_for(1, timeout=60)  # the other node delivers the DSN
        await _until_drained(pg_schema, "nothing left in the shared spool", timeout=20)
    finally:
        for node in nodes.values():
            await asyncio.to_thread(node.stop, signal.SIGKILL)
    assert len(_dsns(sink.arrivals)) == 1, _dsns(sink.arrivals)
    assert sink.rcpt_attempts["gone@example.com"] == 1
    trail = [r["type"] for r in await _rows(
        pg_schema, "SELECT type FROM audit_records WHERE rcpt = 'gone@example.com'"
        " ORDER BY seq")]
    assert trail == ["r", "b"], trail


@pytest.mark.parametrize("verp", [True, False], ids=["VERP", "Message-ID only"])
async def test_a_complaint_sent_again_after_a_kill_is_one_f_record(tmp_path, sink,
                                                                   pg_schema,  # noqa: F811
                                                                   verp):
    """As for a bounce: an FBL's complaint reaches node-a, SIGKILLed the moment its "f"
    record is committed, and the FBL sends it again, to node-b, which recorded a second "f"
    (a second complaint in the cluster's complaint rate). One "f" now; also when the FBL
    stripped our VERP and the report names the message by its Message-ID only."""
    a, b = _feedback_nodes(tmp_path, sink.port, pg_schema)
    try:
        port_a, port_b = await a.port(), await b.port()
        await send(port_a, "news@insurer.test", ["c1@example.com"],
                   message("campaign", cls="marketing"))
        [arrival] = await sink.wait_for(1)
        mid = email.message_from_bytes(arrival.data)["Message-ID"]
        arf = _arf(arrival.mail_from, mid) if verp else _arf("", mid, ["c1@example.com"])
        watcher = _kill_when(pg_schema, a.proc.pid, "SELECT (SELECT count(*) FROM events WHERE"
                             " position('arf;abuse'::bytea in data) > 0)"
                             " + (SELECT count(*) FROM audit_records WHERE type = 'f')")
        with contextlib.suppress(smtplib.SMTPException, OSError):
            await send(port_a, "", ["fbl@mta.test"], arf)
        await _killed_at(a, watcher)
        assert await send(port_b, "", ["fbl@mta.test"], arf) == {}
        await _until_drained(pg_schema, "node-a's records adopted by node-b")
    finally:
        for node in (a, b):
            await asyncio.to_thread(node.stop, signal.SIGKILL)
    f = await _rows(pg_schema, "SELECT rcpt, dsn_action FROM audit_records WHERE type = 'f'")
    assert [tuple(r) for r in f] == [("c1@example.com", "abuse")], f
