"""When bounces suppress an address (issue 19, defect 2), through SMTP against a running node:
a domain-level failure (our resolver's NXDOMAIN) never suppresses; an address-level hard bounce
stops classes without an SLA at once and the classes with an SLA only after repeated evidence,
and the suppression says why and since when, and lapses."""

from __future__ import annotations

import asyncio
import json
import smtplib
import time

import pytest

from tests.conftest import config_text, message, records, send
from tests.support.waiting import until
from tests.test_cli_ops import run_cli


async def _wait_records(node, tmp_path, predicate, count: int = 1,
                        timeout: float = 20.0) -> list[dict]:
    """The accounting records matching ``predicate``, once there are ``count`` of them."""

    async def matching() -> list[dict]:
        await node.flush_evidence()
        rows = [r for r in records(tmp_path) if predicate(r)]
        return rows if len(rows) >= count else []

    return await until(matching, timeout=timeout, what=f"{count} matching accounting record(s)")


async def test_no_such_domain_from_the_resolver_suppresses_nobody(tmp_path, sink, dns_server,
                                                                  make_node):
    """The README tour's failure: the resolver answered NXDOMAIN, the bounce put the customer
    on the `all` list, and the next policy notice was refused `550 5.7.1 Recipient suppressed`."""
    extra = f'[dns]\nnameserver = "127.0.0.1"\nport = {dns_server.port}\ntimeout = 2\n'
    node = await make_node(config_text(tmp_path, sink.port, extra))
    port = node.listeners[0].port
    await send(port, "", ["anna@nowhere.example"], message("policy", cls="policy-documents"))
    [bounce] = await _wait_records(node, tmp_path, lambda r: r["type"] == "b")
    assert bounce["dsnStatus"] == "5.1.2" and bounce["bounceCat"] == "bad-domain"
    assert node.feedback.suppression.count() == 0
    # the next notice (and a newsletter) to the same customer is accepted, not refused
    assert await send(port, "", ["anna@nowhere.example"],
                      message("policy 2", cls="policy-documents")) == {}
    assert await send(port, "", ["anna@nowhere.example"], message("news", cls="marketing")) == {}
    await node.stop()
    assert not [r for r in records(tmp_path) if r["type"] == "s"]


async def test_hard_bounces_suppress_sla_classes_only_after_repeated_evidence(
        tmp_path, sink, make_node):
    sink.rcpt_replies["gone@example.com"] = ["550 5.1.1 <gone@example.com>: user unknown"]
    extra = '[feedback.bounces]\nsuppress_after = 2\nwindow = "1h"\nexpiry = "15s"\n'
    node = await make_node(config_text(tmp_path, sink.port, extra))
    port = node.listeners[0].port

    def bounces(r: dict) -> bool:
        return r["type"] == "b" and r["rcpt"] == "gone@example.com"

    await send(port, "", ["gone@example.com"], message("policy 1", cls="policy-documents"))
    await _wait_records(node, tmp_path, bounces)
    # one bounce: classes without an SLA stop (accepted at RCPT, dropped with an "s" record) ...
    assert await send(port, "", ["gone@example.com"], message("news", cls="marketing")) == {}
    [dropped] = await _wait_records(node, tmp_path, lambda r: r["type"] == "s")
    assert dropped["dsnDiag"].startswith("suppressed (best-effort, bounce, since ")
    assert "hard bounce 1 of 2: bad-mailbox: smtp;550 5.1.1" in dropped["dsnDiag"]
    # ... the policy notice is still sent: one reply is not proof enough
    assert await send(port, "", ["gone@example.com"],
                      message("policy 2", cls="policy-documents")) == {}
    assert len(await _wait_records(node, tmp_path, bounces, count=2)) == 2
    # the second hard bounce within the window: every class stops, with why and since when
    with pytest.raises(smtplib.SMTPRecipientsRefused) as refused:
        await send(port, "", ["gone@example.com"], message("policy 3", cls="policy-documents"))
    code, text = refused.value.recipients["gone@example.com"]
    text = text.decode().replace("\n", " ")
    assert code == 550 and text.startswith("5.7.1 Recipient suppressed (all, bounce, since ")
    assert "until " in text and "2 hard bounces within 3600s, last bad-mailbox" in text

    code, out, err = await run_cli("suppress", "list", "--json", "--db",
                                   str(tmp_path / "spool" / "suppression.sqlite3"))
    assert code == 0, err
    entries = {e["scope"]: e for e in map(json.loads, out.splitlines())}
    assert set(entries) == {"all", "best-effort"}
    assert entries["all"]["expires"] == pytest.approx(entries["all"]["created"] + 15, abs=0.01)
    # the suppression lapses: the address may receive mail again (its expiry passes in real
    # time: the store and the node read the wall clock)
    await asyncio.sleep(max(0.0, entries["all"]["expires"] - time.time()) + 0.1)
    assert await send(port, "", ["gone@example.com"],
                      message("policy 4", cls="policy-documents")) == {}
    await node.stop()
