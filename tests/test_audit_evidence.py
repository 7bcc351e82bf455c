"""Delivery evidence end to end: SMTP in, real relay to a TLS sink, audit store, CLI."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import ssl

import pytest
from typer.testing import CliRunner

from postlane.audit.evidence import trails
from postlane.audit.sla import explain, sla_report
from postlane.audit.sqlite import SQLiteAuditStore
from postlane.audit.store import Query
from postlane.cli import app
from postlane.harness.sink import Sink
from tests.conftest import OPERATOR, config_text, message, send
from tests.support.waiting import until
from tests.test_relay_client import cert_files  # noqa: F401  (fixture)

SHORT_CLASS = """
[classes.short]
pool = "critical"
priority = 0
sla = "1m"
retry = ["1s"]
expiry = "2s"
"""


@pytest.fixture
async def tls_sink(cert_files):  # noqa: F811
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(*cert_files)
    s = await Sink(tls_context=ctx).start()
    yield s
    await s.stop()


@pytest.fixture
async def evidence_run(tmp_path, tls_sink, make_node):
    """One node run with a delivered, a deferred-then-delivered, a bounced and an expired
    recipient; returns the audit store path."""
    tls_sink.rcpt_replies = {"soft@example.com": ["450 4.2.1 mailbox busy", "250 2.1.5 ok"],
                             "hard@example.com": ["550 5.1.1 no such user"],
                             "gone@example.com": ["451 4.3.0 try again later"]}
    node = await make_node(config_text(tmp_path, tls_sink.port, SHORT_CLASS))
    port = node.listeners[0].port
    await send(port, "sender@example.com",
               ["ok@example.com", "soft@example.com", "hard@example.com"],
               message("policy", cls="policy-documents",
                       extra="X-Correlation-ID: policy-4711\r\nMessage-ID: <m1@insurer.test>\r\n"),
               mail_options=["ENVID=env-4711"])
    await send(port, "sender@example.com", ["gone@example.com"],
               message("short", cls="short", extra="X-Correlation-ID: claim-9\r\n"))
    # ok, soft (after its retry), the bounce for hard, the bounce for gone (after expiry)
    await tls_sink.wait_for(4, timeout=30)
    await node.stop()
    return node.audit.path


async def test_evidence_of_each_outcome(evidence_run):
    store = SQLiteAuditStore(evidence_run, readonly=True)
    items = {t.rcpt: t for t in trails(store.find(Query(correlation_id="policy-4711")))}
    assert set(items) == {"ok@example.com", "soft@example.com", "hard@example.com"}

    ok = items["ok@example.com"]
    assert ok.outcome == "delivered" and ok.sla_met(0) is True and ok.sla == 120.0
    rec = ok.received
    assert rec["listener"] == "in" and "127.0.0.1" in rec["src_mta"]
    assert rec["env_id"] == "env-4711" and rec["message_id"] == "<m1@insurer.test>"
    [attempt] = ok.attempts
    assert attempt["dlv_source_ip"] == "127.0.0.20" and attempt["dlv_destination_ip"] == "127.0.0.1"
    assert attempt["dlv_tls_protocol"].startswith("TLS") and attempt["dlv_tls_cipher"]
    assert attempt["dsn_diag"].startswith("smtp;250")
    assert attempt["total_seconds_queued"] == ok.latency >= 0

    soft = items["soft@example.com"]
    assert [r["type"] for r in soft.attempts] == ["t", "d"]
    assert soft.attempts[0]["dsn_diag"] == "smtp;450 4.2.1 mailbox busy"
    assert soft.outcome == "delivered" and soft.sla_met(0) is True

    hard = items["hard@example.com"]
    assert hard.outcome == "bounced" and hard.sla_met(0) is None
    assert hard.not_deliverable == "remote-permanent"
    assert "550 5.1.1 no such user" in hard.final["dsn_diag"]

    [gone] = trails(store.find(Query(correlation_id="claim-9")))
    assert gone.outcome == "expired" and gone.sla_met(0) is False
    assert gone.final["dsn_status"] == "4.4.7"
    cause, detail, _ = explain(gone, [], 0)
    assert cause == "expiry" and "451 4.3.0 try again later" in detail
    store.close()


async def test_every_key_finds_the_trail(evidence_run):
    store = SQLiteAuditStore(evidence_run, readonly=True)
    [by_corr] = [t for t in trails(store.find(Query(correlation_id="policy-4711")))
                 if t.rcpt == "soft@example.com"]
    qid = by_corr.queue_id
    for query in (Query(queue_id=qid), Query(message_id="<m1@insurer.test>"),
                  Query(env_id="env-4711"), Query(rcpt="SOFT@example.com"),
                  Query(cls="policy-documents", since=0, until=2e9),
                  Query(pool="critical", since=0, until=2e9)):
        found = {(t.queue_id, t.rcpt) for t in trails(store.find(query))}
        assert (qid, "soft@example.com") in found, query
    assert {t.rcpt for t in trails(store.find(Query(rcpt="soft@example.com")))} == \
        {"soft@example.com"}
    assert trails(store.find(Query(correlation_id="nope"))) == []
    assert trails(store.find(Query(cls="policy-documents", since=0, until=1))) == []
    store.close()


async def test_cli_show_verify_export_sla(evidence_run, tmp_path):
    runner = CliRunner()
    db = str(evidence_run)
    res = runner.invoke(app, ["audit", "show", "--db", db, "--correlation-id", "policy-4711"])
    assert res.exit_code == 0, res.output
    out = res.output
    assert "450 4.2.1 mailbox busy" in out and "550 5.1.1 no such user" in out
    assert "from 127.0.0.20 (tx0.test)" in out and "TLSv1" in out
    assert ", not authenticated, policy opportunistic" in out  # the TLS evidence (issue 16)
    assert "SLA 120s met" in out and "listener in" in out

    res = runner.invoke(app, ["audit", "show", "--db", db, "--recipient", "gone@example.com",
                              "--format", "json"])
    [trail] = json.loads(res.output)
    assert trail["outcome"] == "expired" and trail["sla_met"] is False
    assert trail["received"]["header_X-Correlation-ID"] == "claim-9"

    res = runner.invoke(app, ["audit", "show", "--db", db, "--message-id", "<m1@insurer.test>",
                              "--format", "csv"])
    rows = list(csv.DictReader(io.StringIO(res.output)))
    assert {r["rcpt"] for r in rows} == {"ok@example.com", "soft@example.com",
                                         "hard@example.com"}
    assert all(len(r["hash"]) == 64 for r in rows)

    res = runner.invoke(app, ["audit", "show", "--db", db, "--correlation-id", "nope"])
    assert res.exit_code == 1 and "no records found" in res.output

    res = runner.invoke(app, ["audit", "verify", "--db", db])
    assert res.exit_code == 0 and res.output.startswith("ok:"), res.output

    out_dir = tmp_path / "evidence"
    res = runner.invoke(app, ["audit", "export", "--db", db, "--out", str(out_dir),
                              "--class", "policy-documents"])
    assert res.exit_code == 0, res.output
    manifest = json.loads((out_dir / "manifest.json").read_text())
    assert manifest["store_verification"]["ok"] is True
    exported = list(csv.DictReader((out_dir / "records.csv").open(newline="")))
    assert len(exported) == manifest["records"] > 0
    assert {r["class"] for r in exported} == {"policy-documents"}
    assert manifest["last"]["hash"] == exported[-1]["hash"]
    assert manifest["days"][0]["anchor"] == "00" * 32
    chain = [json.loads(line) for line in (out_dir / "chain.jsonl").open()]
    assert [c["seq"] for c in chain] == [int(r["seq"]) for r in exported]
    res = runner.invoke(app, ["audit", "verify", "--export", str(out_dir)])
    assert res.exit_code == 0 and res.output.startswith("ok"), res.output
    chain[0]["dlv_destination_ip"] = "10.6.6.6"  # a regulator's copy edited afterwards
    (out_dir / "chain.jsonl").write_text("".join(json.dumps(c) + "\n" for c in chain))
    res = runner.invoke(app, ["audit", "verify", "--export", str(out_dir)])
    assert res.exit_code == 1 and "chain.jsonl: SHA-256 does not match" in res.output
    assert f"record seq {chain[0]['seq']}: altered" in res.output

    res = runner.invoke(app, ["audit", "sla", "--db", db, "--from", "2000-01-01",
                              "--to", "2100-01-01", "--format", "json"])
    report = json.loads(res.output)["classes"]
    pol = report["policy-documents"]
    assert pol["messages"] == 3 and pol["delivered"] == 2 and pol["within_sla"] == 2
    assert pol["deliverable"] == 2 and pol["within_sla_share"] == 1.0
    assert pol["latency_s"]["p50"] is not None and pol["breaches"] == []
    assert pol["tls"] == {"encrypted": 2, "authenticated": 0, "encrypted_share": 1.0,
                          "authenticated_share": 0.0}
    [hard] = pol["not_deliverable_recipients"]
    assert hard["recipient"] == "hard@example.com" and "550 5.1.1" in hard["detail"]
    assert report["short"]["breaches"][0]["outcome"] == "expired"
    res = runner.invoke(app, ["audit", "sla", "--db", db, "--from", "2000-01-01",
                              "--to", "2100-01-01", "--class", "short"])
    assert "BREACH" in res.output and "claim-9" in res.output
    res = runner.invoke(app, ["audit", "sla", "--db", db, "--from", "2000-01-01",
                              "--to", "2100-01-01", "--class", "policy-documents"])
    assert "delivered over TLS: 2/2 (100.00%), with the server authenticated (PKIX or DANE):" \
        " 0/2 (0.00%)" in res.output


def write(path, *records) -> None:
    """Records straight into a store (class SLA 60 s), as the recorder would."""
    store = SQLiteAuditStore(path)
    store.append([(r, 60.0, "w", n) for n, r in enumerate(records, 1)])
    store.close()


def test_sla_report_counts_late_delivery_as_breach(tmp_path):
    from postlane.accounting.records import Record

    base = dict(orig="s@x", queue_id="Q1", cls="c", vmta_pool="p", correlation_id="late")
    write(tmp_path / "a.sqlite",
          Record(type="r", time_logged=1000.0, time_queued=1000.0, rcpt="a@x", **base),
          Record(type="d", time_logged=1300.0, time_queued=1000.0, rcpt="a@x",
                 total_seconds_queued=300.0, attempt=1, dsn_diag="smtp;250 ok", **base))
    store = SQLiteAuditStore(tmp_path / "a.sqlite", readonly=True)
    report = sla_report(store, 0, 2000)["classes"]["c"]
    assert report["within_sla"] == 0 and report["latency_s"]["p99"] == 300.0
    assert report["breaches"][0]["cause"] == "our-backoff"
    assert report["breaches"][0]["waits_s"]["our-backoff"] == 300.0


async def test_sla_breach_caused_by_a_pause_names_it(tmp_path, sink, make_node):
    extra = '[classes.claims]\npool = "bulk"\npriority = 1\nsla = "1s"\n'
    node = await make_node(config_text(tmp_path, sink.port, extra))
    await node.operations.pause("bulk", who=OPERATOR)
    await send(node.listeners[0].port, "s@example.com", ["c@example.com"],
               message("claim", cls="claims", extra="X-Correlation-ID: claim-1\r\n"))
    # real time in the scenario: the class's 1 s SLA runs out while the pool is paused
    await asyncio.sleep(1.2)
    await node.operations.resume("bulk", who=OPERATOR)
    await sink.wait_for(1)
    await node.stop()
    store = SQLiteAuditStore(node.audit.path, readonly=True)
    report = sla_report(store, 0, 2e9, "claims")["classes"]["claims"]
    [breach] = report["breaches"]
    assert breach["correlation_id"] == "claim-1" and breach["outcome"] == "delivered"
    assert breach["cause"] == "our-pause" and "pool bulk: pool paused" in breach["detail"]
    store.close()


async def test_node_applies_retention_periodically(tmp_path, sink, make_node):
    key = tmp_path / "audit.key"
    key.write_bytes(b"0123456789abcdef0123456789abcdef")
    key.chmod(0o600)
    extra = f"""
[audit]
pseudonymisation_key = "{key}"
purge_interval = "200ms"
[audit.retention.marketing]
delete = "1ms"
[audit.retention.policy-documents]
pseudonymise = "1ms"
"""
    node = await make_node(config_text(tmp_path, sink.port, extra))
    port = node.listeners[0].port
    await send(port, "s@example.com", ["m@example.com"], message("m", cls="marketing"))
    await send(port, "s@example.com", ["p@example.com"], message("p", cls="policy-documents"))
    await sink.wait_for(2)
    store = SQLiteAuditStore(node.audit.path, readonly=True)
    count = "SELECT count(*), sum(state = 0) FROM audit_records"
    await until(lambda: tuple(store.db.execute(count).fetchone()) == (4, 0), timeout=10,
                what="retention: r and d of each, all processed")
    await node.stop()
    states = dict(store.db.execute("SELECT cls, max(state) FROM audit_records GROUP BY cls"))
    assert states == {"marketing": 2, "policy-documents": 1}
    assert store.verify().ok
    store.close()


def test_remote_bounce_after_relay_is_the_outcome(tmp_path):
    from postlane.accounting.records import Record

    base = dict(orig="s@x", queue_id="Q1", cls="c", vmta_pool="p", rcpt="a@x",
                time_queued=1000.0)
    write(tmp_path / "a.sqlite", Record(type="r", time_logged=1000.0, **base),
          Record(type="d", time_logged=1001.0, total_seconds_queued=1.0, **base),
          Record(type="rb", time_logged=1500.0, dsn_status="5.1.1",
                 dsn_diag="smtp;550 5.1.1 user unknown", **base))
    store = SQLiteAuditStore(tmp_path / "a.sqlite", readonly=True)
    [trail] = trails(store.find(Query(queue_id="Q1")))
    assert trail.outcome == "bounced by the remote side after relay"
    assert trail.sla_met(2000.0) is None and trail.not_deliverable == "remote-permanent"
    assert "550 5.1.1" in explain(trail, [], 2000.0)[1]
    store.close()


def test_a_relayed_report_is_not_called_a_delivery_to_the_mailbox(tmp_path):
    """A success DSN with Action relayed (OpenSMTPD's, passing the message to a next hop
    without DSN) says the message left the receiving side, not that it reached the mailbox:
    the trail said "confirmed" for it as for "delivered"."""
    from postlane.accounting.records import Record

    for action, said in (("relayed", "delivered; the receiving side's report says it relayed it"
                          " onward, not that it reached the mailbox"),
                         ("delivered", "delivered, confirmed by the receiving side's delivery"
                          " report")):
        base = dict(orig="s@x", queue_id="Q1", cls="c", vmta_pool="p", rcpt="a@x",
                    time_queued=1000.0)
        path = tmp_path / f"{action}.sqlite"
        write(path, Record(type="r", time_logged=1000.0, **base),
              Record(type="d", time_logged=1001.0, total_seconds_queued=1.0, **base),
              Record(type="rd", time_logged=1500.0, dsn_action=action, dsn_status="2.0.0",
                     **base))
        store = SQLiteAuditStore(path, readonly=True)
        [trail] = trails(store.find(Query(queue_id="Q1")))
        assert trail.outcome == said
        store.close()


async def test_intake_refuses_while_the_audit_store_is_too_far_behind(tmp_path, sink, make_node):
    """A store that cannot keep up (here: another connection holds its write lock) makes intake
    answer 451 once ``audit.max_backlog`` records wait, instead of growing memory without bound;
    once the store catches up, mail is accepted again and every record reaches it."""
    import smtplib
    import sqlite3

    from postlane.policy.intake import RcptIn, Rejection

    node = await make_node(config_text(tmp_path, sink.port, "[audit]\nmax_backlog = 1000\n"))
    blocker = sqlite3.connect(node.audit.path, isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")
    sent, refused = 0, None
    while refused is None and sent < 5000:
        results = await asyncio.gather(*(
            node.intake.submit("s@insurer.test", [RcptIn(f"m{sent + i}@example.com")],
                               message("offer", cls="marketing")) for i in range(50)),
            return_exceptions=True)
        sent += sum(isinstance(r, str) for r in results)
        refused = next((r for r in results if isinstance(r, Rejection)), None)
    assert refused is not None and refused.reply.startswith("451 4.3.0 Audit trail is behind")
    port = node.listeners[0].port
    with pytest.raises(smtplib.SMTPDataError) as over:  # the same answer over SMTP
        await send(port, "s@insurer.test", ["late@example.com"], message("late"))
    assert over.value.smtp_code == 451
    blocker.execute("ROLLBACK")
    blocker.close()
    await until(lambda: node.recorder.backlog <= 500, timeout=30,
                what="the recorder's backlog under half its limit")
    await send(port, "s@insurer.test", ["again@example.com"], message("again"))
    await sink.wait_for(sent + 1)
    await node.stop()
    store = SQLiteAuditStore(node.audit.path, readonly=True)
    try:
        assert store.verify().ok
        accepted = [r for r in store.rows_between(None, None) if r["type"] == "r"]
    finally:
        store.close()
    assert len(accepted) == sent + 1  # every accepted message has its evidence, none twice


async def test_hostile_values_cannot_forge_a_line_of_the_text_trail(tmp_path, sink, make_node):
    """``audit show`` printed values as they were: a remote server's reply with an ESC
    sequence, or a Message-ID with U+2028 or NEL from the client's header, moved the
    terminal's cursor over the auditor's view (``\\x1b[1A\\x1b[2K`` rewrites the line above) or
    broke a line where a viewer breaks lines. Every control character and line separator is
    shown escaped; the store keeps the value as it was (``--format json``)."""
    sink.rcpt_replies = {"hard@example.com": ["550 5.1.1 no such user\x1b[1A\x1b[2K"]}
    node = await make_node(config_text(tmp_path, sink.port))
    await send(node.listeners[0].port, "sender@example.com", ["hard@example.com"], message(
        "x", extra="Message-ID: <m\u2028\x85x@insurer.test>\r\nX-Correlation-ID: c\x00d\x7f\r\n"))
    await sink.wait_for(1)  # the DSN
    await node.stop()
    runner = CliRunner()
    show = ["audit", "show", "--db", str(node.audit.path), "--recipient", "hard@example.com"]
    res = runner.invoke(app, show)
    assert res.exit_code == 0, res.output
    out = res.output
    assert not any(c in out for c in "\x00\x1b\x7f\x85\u2028\r"), repr(out)
    assert "no such user\\x1b[1A\\x1b[2K" in out
    assert "Message-ID <m\\u2028\\x85x@insurer.test>  correlation c\\x00d\\x7f" in out
    [trail] = json.loads(runner.invoke(app, [*show, "--format", "json"]).output)
    assert trail["received"]["messageId"] == "<m\u2028\x85x@insurer.test>"
