"""Every operator action on the record (issue 19): named API tokens made with the CLI, a
read-only one refused, actions over HTTP and the CLI on a real node with a real backlog, then
`postlane audit show` naming the operator, `audit verify` passing over those records, the SLA
report reading pauses and holds from them, and the suppress commands recorded as the local user.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import json
import logging
import os
import pwd
import stat
import time
from pathlib import Path

import httpx

from postlane.api.tokens import add_token
from postlane.policy.intake import RcptIn
from postlane.scheduler.control import Selector
from tests.conftest import OPERATOR, config_text, message, records
from tests.support.pg import pg_schema  # noqa: F401  (fixture)
from tests.support.waiting import until
from tests.test_cli_ops import run_cli
from tests.test_cluster import cluster_text, start_node

GREY = "grey.example"


@contextlib.contextmanager
def umask(mask: int):
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def audit(tmp_path: Path, *args: str):
    return run_cli("audit", *args, "--db", str(tmp_path / "spool" / "audit.sqlite"))


async def deferred_notices(node, count: int) -> list[str]:
    """Policy notices to the greylisting domain, deferred (retry in an hour)."""
    ids = [await node.intake.submit("notices@example.com", [RcptIn(f"r{i}@{GREY}")],
                                    message("policy", cls="policy-documents"))
           for i in range(count)]
    await until(lambda: sum(1 for r in node.scheduler.recipients()
                            if r.state.value == "deferred") == count,
                what=f"{count} deferred notices")
    return ids


async def test_named_tokens_and_the_operator_trail(tmp_path, sink, make_node, caplog):
    caplog.set_level(logging.INFO)
    for i in range(3):
        sink.rcpt_replies[f"r{i}@{GREY}"] = [f"451 4.7.1 <r{i}@{GREY}>: greylisted"]
    text = config_text(tmp_path, sink.port, f'"{GREY}" = "127.0.0.1:{sink.port}"\n')
    node = await make_node(text.replace('retry = ["1s", "1s", "2s"]', 'retry = ["1h"]'))
    tokens_file = tmp_path / "api-tokens.json"  # the default: beside api.token_file

    # tokens are made on the running node's machine, with the umask most systems have
    with umask(0o022):
        code, alice, err = await run_cli("api", "token", "add", "alice",
                                         "--tokens-file", str(tokens_file))
        assert code == 0 and "shown only now" in err, err
        code, out, err = await run_cli("api", "token", "add", "grafana", "--read-only",
                                       "--tokens-file", str(tokens_file), "--out",
                                       str(tmp_path / "grafana.token"))
        assert code == 0 and "written to" in out, err
    alice, grafana = alice.strip(), (tmp_path / "grafana.token").read_text().strip()
    assert mode(tokens_file) == mode(tmp_path / "grafana.token") == 0o600
    assert mode(tmp_path / "api-tokens.json.lock") == 0o600
    stored = tokens_file.read_text()
    assert alice not in stored and grafana not in stored  # hashes only
    code, out, _ = await run_cli("api", "token", "list", "--json", "--tokens-file",
                                 str(tokens_file))
    assert [(t["name"], t["read_only"]) for t in map(json.loads, out.splitlines())] == [
        ("alice", False), ("grafana", True)]
    for bad in ("admin", "no spaces", "alice"):
        code, _, err = await run_cli("api", "token", "add", bad, "--tokens-file",
                                     str(tokens_file))
        assert code == 1, bad
    assert "exists" in err

    base = f"http://127.0.0.1:{node.api.port}/api/v1"
    as_alice = httpx.AsyncClient(base_url=base, headers={"Authorization": f"Bearer {alice}"})
    as_grafana = httpx.AsyncClient(base_url=base,
                                   headers={"Authorization": f"Bearer {grafana}"})
    async with as_alice, as_grafana:
        # a read-only token reads, and is refused (403) anything else
        assert (await as_grafana.get("/status")).status_code == 200
        assert (await as_grafana.get("/token")).json() == {"name": "grafana", "read_only": True}
        resp = await as_grafana.post("/pools/bulk/pause")
        assert resp.status_code == 403 and "read-only" in resp.json()["error"]
        assert (await as_grafana.delete("/suppressions/x@example.com")).status_code == 403
        assert (await as_grafana.post("/queue/hold", json={"all": True})).status_code == 403
        assert ("bulk", "*") not in node.scheduler.paused

        # alice builds a backlog and works on it
        assert (await as_alice.post("/pools/bulk/pause")).json()["paused"] is True
        campaign = [await node.intake.submit("news@example.com", [RcptIn(f"m{i}@example.com")],
                                             message(f"offer {i}", cls="marketing"))
                    for i in range(2)]
        notices = await deferred_notices(node, 3)
        hold = {"queue_ids": [notices[0]]}
        assert (await as_alice.post("/queue/hold", json=hold)).json()["recipients"] == 1
        assert (await as_alice.post("/queue/release", json=hold)).json()["recipients"] == 1
        sink.rcpt_replies[f"r1@{GREY}"] = ["250 2.1.5 ok"]
        resp = await as_alice.post("/queue/retry", json={"recipient": f"r1@{GREY}"})
        assert resp.json()["recipients"] == 1
        await sink.wait_for(1)
        resp = await as_alice.post("/queue/delete", json={"queue_ids": [notices[2]]})
        assert resp.json()["recipients"] == 1
        resp = await as_alice.post("/pools/bulk/lanes/example.com/purge")
        assert resp.json()["purged"] == 2
        assert (await as_alice.post("/pools/bulk/resume")).json()["paused"] is False
        resp = await as_alice.post("/suppressions", json={"address": "x@example.com",
                                                          "scope": "all", "reason": "legal"})
        assert resp.status_code == 201
        assert (await as_alice.delete("/suppressions/x@example.com")).json() == {"removed": 1}

        # a revoked token is refused at its next request, without a restart
        code, out, _ = await run_cli("api", "token", "revoke", "grafana", "--tokens-file",
                                     str(tokens_file))
        assert code == 0 and out.strip() == "revoked 'grafana'"
        assert (await as_grafana.get("/status")).status_code == 401
        assert (await as_alice.get("/status")).status_code == 200

    # the CLI (admin token) over the same API
    cli = ["--url", base.removesuffix("/api/v1"), "--token-file", str(tmp_path / "api-token")]
    code, out, err = await run_cli("queue", "hold", notices[0], *cli)
    assert code == 0 and "held: 1 recipients" in out, err
    await node.flush_evidence()
    await node.stop()

    code, out, err = await audit(tmp_path, "show", "--queue-id", notices[0])
    assert code == 0, err
    assert "held by operator alice (via api)" in out
    assert "released by operator alice (via api)" in out
    assert "held by operator admin (via api)" in out
    assert "outcome: held by operator admin (still queued)" in out
    code, out, _ = await audit(tmp_path, "show", "--queue-id", notices[1])
    assert "retried now by operator alice" in out and "outcome: delivered" in out
    code, out, _ = await audit(tmp_path, "show", "--queue-id", notices[2], "--format", "json")
    [trail] = json.loads(out)
    assert trail["outcome"] == "deleted by operator alice"
    assert [(o["type"], o["operator"]) for o in trail["operations"]] == [("b", "alice")]
    code, out, _ = await audit(tmp_path, "show", "--queue-id", campaign[0])
    assert "purged by operator alice" in out and "outcome: purged by operator alice" in out
    code, out, _ = await audit(tmp_path, "show", "--recipient", "x@example.com")
    assert "suppressed by operator alice (scope all): legal" in out
    assert "unsuppressed by operator alice (every scope, 1 entry)" in out
    code, out, err = await audit(tmp_path, "verify")
    assert code == 0, out + err

    # the accounting files have them too: one "o" record per pool action, per recipient else
    ops = [r for r in records(tmp_path) if r["operator"]]
    assert {(r["type"], r["dsnAction"], r["vmtaPool"], r["rcpt"]) for r in ops
            if r["type"] == "o" and r["dsnAction"] in ("pause", "resume")} == {
        ("o", "pause", "bulk", ""), ("o", "resume", "bulk", "")}
    pause = next(r for r in ops if r["dsnAction"] == "pause")
    assert pause["dsnDiag"] == "pool bulk paused by operator alice (0 recipients queued)"
    assert pause["srcType"] == "api" and pause["operator"] == "alice"
    assert sorted((r["type"], r["dsnAction"] if r["type"] == "o" else r["bounceCat"],
                   r["operator"]) for r in ops) == [
        ("b", "purged", "alice"), ("b", "purged", "alice"), ("b", "purged", "alice"),
        ("o", "hold", "admin"), ("o", "hold", "alice"), ("o", "pause", "alice"),
        ("o", "release", "alice"), ("o", "resume", "alice"), ("o", "retry", "alice"),
        ("o", "suppress", "alice"), ("o", "unsuppress", "alice")]

    # no token (nor its hash) in any log line
    secrets = {alice, grafana, (tmp_path / "api-token").read_text().strip()}
    logged = "\n".join(f"{r.getMessage()} {vars(r)}" for r in caplog.records)
    assert not any(s in logged for s in secrets)
    assert "grafana" in logged  # names are logged (tokens loaded), secrets not


async def test_suppress_commands_are_recorded_as_the_local_user(tmp_path, sink, make_node):
    """The suppress commands act on the list's file; their records reach the chain through the
    spool, at once if the node runs, else when it starts."""
    cfg = tmp_path / "node.toml"
    cfg.write_text(config_text(tmp_path, sink.port))
    me = pwd.getpwuid(os.getuid()).pw_name
    node = await make_node(cfg.read_text())
    code, out, err = await run_cli("suppress", "add", "y@example.com", "--scope", "all",
                                   "--reason", "court order", "-c", str(cfg))
    assert code == 0 and out.strip() == "suppressed y@example.com (all)", err
    await node.flush_evidence()  # the recorder feeds every writer of the outbox
    code, out, _ = await audit(tmp_path, "show", "--recipient", "y@example.com")
    assert f"suppressed by operator {me} (scope all): court order (via cli)" in out
    await node.stop()
    code, _, err = await run_cli("suppress", "remove", "y@example.com", "-c", str(cfg))
    assert code == 0, err
    code, _, err = await run_cli("suppress", "add", "z@example.com", "--db",
                                 str(tmp_path / "spool" / "suppression.sqlite3"))
    assert code == 0 and "not on the audit trail: give -c CONFIG" in err
    node = await make_node(cfg.read_text())  # takes the record written while it was down
    await node.flush_evidence()
    await node.stop()
    code, out, _ = await audit(tmp_path, "show", "--recipient", "y@example.com", "--format",
                               "csv")
    rows = list(csv.DictReader(out.splitlines()))
    assert [(r["type"], r["dsnAction"], r["operator"], r["srcType"]) for r in rows] == [
        ("o", "suppress", me, "cli"), ("o", "unsuppress", me, "cli")]
    assert rows[0]["dsnDiag"] == f"suppressed by operator {me} (scope all): court order"
    # the CLI's own writers' events are complete too (verify -c checks against the spool)
    code, out, err = await run_cli("audit", "verify", "-c", str(cfg), "--json")
    assert code == 0, out + err


async def test_sla_report_reads_pauses_and_holds_from_the_chain(tmp_path, sink, make_node):
    """A notice an operator held past its SLA is a breach caused by that hold, not by the
    destination that deferred it once."""
    sink.rcpt_replies[f"r0@{GREY}"] = ["451 4.7.1 greylisted", "250 2.1.5 ok"]
    text = config_text(tmp_path, sink.port, f'"{GREY}" = "127.0.0.1:{sink.port}"\n')
    text = text.replace('sla = "2m"', 'sla = "0.5s"').replace('retry = ["1s", "1s", "2s"]',
                                                              'retry = ["1h"]')
    node = await make_node(text)
    [notice] = await deferred_notices(node, 1)
    [msg] = [r.msg for r in node.scheduler.recipients() if r.msg.id == notice]
    await node.operations.queue("hold", Selector(queue_ids=(notice,)), who=OPERATOR)
    held_at = time.time()
    # the scenario is a hold in real time: it outlasts the SLA and is most of the wait (twice
    # everything before it), so the breach is the hold's and not the deferral's
    await until(lambda: time.time() > max(msg.deadline, held_at + 2 * (held_at - msg.queued_at)),
                what="the hold outlasts the notice's SLA")
    releasing = time.time()
    await node.operations.queue("release", Selector(queue_ids=(notice,)), who=OPERATOR)
    await sink.wait_for(1)
    await node.flush_evidence()
    await node.stop()
    code, out, err = await audit(tmp_path, "sla", "--from", "0", "--to", "4000000000",
                                 "--format", "json")
    assert code == 0, err
    [breach] = json.loads(out)["classes"]["policy-documents"]["breaches"]
    assert breach["cause"] == "our-pause", breach
    assert "held by operator tester" in breach["detail"]
    # the whole hold (at least what the test saw of it; the report rounds to ms) is our pause
    held_for = releasing - held_at - 0.0005
    assert breach["waits_s"]["our-pause"] >= held_for > breach["waits_s"]["remote-deferral"]



async def greylisted_pair(tmp_path, sink, schema: str) -> tuple:
    """Two started nodes on one schema, retries an hour apart, whose destination greylists
    ``r0@GREY``; and their config texts by node name."""
    sink.rcpt_replies[f"r0@{GREY}"] = ["451 4.7.1 greylisted"]
    route = f'"{GREY}" = "127.0.0.1:{sink.port}"\n'
    texts = {name: cluster_text(tmp_path, sink.port, schema, name, route).replace(
        'retry = ["1s", "1s", "2s"]', 'retry = ["1h"]') for name in ("node-a", "node-b")}
    return await start_node(texts["node-a"]), await start_node(texts["node-b"]), texts

async def test_hold_and_release_across_a_cluster(tmp_path, sink, pg_schema):  # noqa: F811
    """On a PostgreSQL spool a held recipient is in the shared spool, nobody's: no node claims
    it, any node lists, shows and releases it, and whoever has a slot delivers it then."""
    a, b, texts = await greylisted_pair(tmp_path, sink, pg_schema)
    try:
        api = {n.config.node.name: ["--url", f"http://127.0.0.1:{n.api.port}", "--token-file",
                                    str(tmp_path / "api-token")] for n in (a, b)}

        async def queue(node: str, *args: str) -> dict:
            code, out, err = await run_cli("queue", *args, "--json", *api[node])
            assert code == 0, err
            return json.loads(out)

        # a campaign nobody has claimed (its pool paused cluster-wide), held from node-b
        await a.operations.pause("bulk", who=OPERATOR)
        campaign = [await a.intake.submit("news@example.com", [RcptIn(f"m{i}@example.com")],
                                          message(f"offer {i}", cls="marketing"))
                    for i in range(3)]
        held = await queue("node-b", "hold", "--pool", "bulk")
        assert (held["recipients"], held["elsewhere"]) == (3, 0)
        await a.operations.resume("bulk", who=OPERATOR)
        await until(lambda: all(("bulk", "*") not in n.scheduler.paused for n in (a, b)),
                    what="both nodes took the resume")
        await asyncio.sleep(1.0)  # a bound: held work is not claimed; nothing to wait for
        assert sink.arrivals == [], "no node claims a held recipient"
        listed = await queue("node-a", "list", "--state", "held")
        assert sorted(m["queue_id"] for m in listed["messages"]) == sorted(campaign)
        shown = await queue("node-a", "show", campaign[0])
        assert ["Subject", "offer 0"] in shown["headers"]

        # a notice deferred on the node that claimed it: that node's to hold
        [notice] = await deferred_across(a, b, f"r0@{GREY}")
        owner, other = (a, b) if any(r.msg.id == notice for r in a.scheduler.recipients()) \
            else (b, a)
        sel = ["--recipient", f"r0@{GREY}"]
        assert (await queue(other.config.node.name, "hold", *sel))["elsewhere"] == 1
        assert (await queue(owner.config.node.name, "hold", *sel))["recipients"] == 1
        assert not any(r.msg.id == notice for r in owner.scheduler.recipients())

        sink.rcpt_replies[f"r0@{GREY}"] = ["250 2.1.5 ok"]
        assert (await queue(other.config.node.name, "release", notice))["recipients"] == 1
        assert (await queue("node-a", "release", campaign[0]))["recipients"] == 1
        await sink.wait_for(2)
        deleted = await queue("node-b", "delete", campaign[1], "--yes")
        assert deleted["recipients"] == 1
        assert (await queue("node-a", "release", "--all"))["recipients"] == 1
        arrivals = await sink.wait_for(3)
        assert sorted(a.rcpts[0] for a in arrivals) == [
            "m0@example.com", "m2@example.com", f"r0@{GREY}"]
        for node in (a, b):
            await node.flush_evidence()
    finally:
        await a.stop()
        await b.stop()
    ops = [r for name in ("node-a", "node-b") for r in records_of(tmp_path, name)
           if r["operator"]]
    assert sorted((r["type"], r["dsnAction"] if r["type"] == "o" else r["bounceCat"])
                  for r in ops) == [("b", "purged")] + [("o", "hold")] * 4 + [
        ("o", "pause"), ("o", "release"), ("o", "release"), ("o", "release"), ("o", "resume")]
    cfg = tmp_path / "node-a.toml"
    cfg.write_text(texts["node-a"])
    code, out, err = await run_cli("audit", "verify", "-c", str(cfg))
    assert code == 0, out + err
    code, out, _ = await run_cli("audit", "show", "-c", str(cfg), "--queue-id", campaign[1])
    assert "held by operator admin" in out and "outcome: deleted by operator admin" in out


async def deferred_across(a, b, rcpt: str) -> list[str]:
    """A policy notice to ``rcpt``, deferred on whichever node claimed it."""
    qid = await a.intake.submit("notices@example.com", [RcptIn(rcpt)],
                                message("policy", cls="policy-documents"))
    await until(lambda: any(r.msg.id == qid and r.state.value == "deferred"
                            for n in (a, b) for r in n.scheduler.recipients()),
                what="the notice deferred on one of the nodes")
    return [qid]


def records_of(tmp_path: Path, name: str) -> list[dict]:
    rows: list[dict] = []
    for path in sorted((tmp_path / f"acct-{name}").glob("*.csv")):
        with open(path, newline="") as fh:
            rows.extend(csv.DictReader(fh))
    return rows


async def test_a_broken_tokens_file_fails_closed(tmp_path, sink, make_node, caplog):
    node = await make_node(config_text(tmp_path, sink.port))
    tokens_file = tmp_path / "api-tokens.json"
    alice = add_token(tokens_file, "alice")
    admin = (tmp_path / "api-token").read_text().strip()
    base = f"http://127.0.0.1:{node.api.port}/api/v1/token"

    async def whoami(token: str) -> int:
        async with httpx.AsyncClient() as client:
            return (await client.get(base, headers={"Authorization": f"Bearer {token}"})
                    ).status_code

    assert (await whoami(alice), await whoami(admin)) == (200, 200)
    tokens_file.write_text('{"format": "postlane-api-tokens/1", "tokens": {"alice": {}}')
    assert (await whoami(alice), await whoami(admin)) == (401, 200)
    assert "only the admin token is accepted until it is fixed" in caplog.text
    tokens_file.unlink()
    bob = add_token(tokens_file, "bob", read_only=True)
    assert (await whoami(alice), await whoami(bob)) == (401, 200)
