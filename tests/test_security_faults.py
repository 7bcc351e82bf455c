"""Remote faults on the delivery side: each ends as a retry or a bounce with an accounting
record, and a message hit by a temporary fault still arrives once the remote side behaves."""

from __future__ import annotations

import socket

import pytest

from postlane.policy.intake import RcptIn
from tests.conftest import config_text, message, records, send
from tests.support.badserver import FAULTS, BadServer
from tests.support.waiting import until

# 2 s, not 0.5 s: a healthy server's reply must come within them, and on a loaded machine
# one came 0.6 s late (a deferral the test did not expect); a hung one costs 2 s
TIMEOUTS = "[relay]\nconnect_timeout = 2\ncommand_timeout = 2\ndata_timeout = 2\n"


def fault_config(tmp_path, port: int, dns_port: int, *, routes: bool = True) -> str:
    text = config_text(tmp_path, port, f'[dns]\nnameserver = "127.0.0.1"\nport = {dns_port}\n'
                                       f"timeout = 2\n", routes=routes)
    return text.replace("[relay]\n", TIMEOUTS, 1).replace('retry = ["1s", "1s", "2s"]',
                                                         'retry = ["0.2s"]')



async def deferred(node, count: int = 1) -> None:
    """Wait until ``count`` recipients wait for a retry."""
    await until(lambda: sum(lane.deferred for lane in node.scheduler.lanes.values()) >= count,
                what=f"{count} recipient(s) deferred")


@pytest.fixture
async def bad():
    server = await BadServer().start()
    yield server
    await server.stop()


@pytest.mark.parametrize("fault", [f for f in FAULTS if f != "tls-fail"])
async def test_temporary_fault_is_retried_then_delivered(tmp_path, make_node, dns_server, bad,
                                                         fault):
    bad.faults = [fault]
    node = await make_node(fault_config(tmp_path, bad.port, dns_server.port))
    await send(node.listeners[0].port, "s@example.com", ["a@example.com"],
               message(fault, cls="policy-documents"))
    await bad.wait_for(1)
    assert node.listeners[0].handler.intake.accepted == 1
    await node.stop()
    kinds = [(r["rcpt"], r["type"]) for r in records(tmp_path)]
    assert kinds == [("a@example.com", "r"), ("a@example.com", "t"), ("a@example.com", "d")]
    deferral = next(r for r in records(tmp_path) if r["type"] == "t")
    assert deferral["dsnStatus"].startswith("4.")


async def test_failed_tls_handshake_goes_in_clear_at_once(tmp_path, make_node, dns_server,
                                                           bad):
    """Under the (default) opportunistic policy a failed STARTTLS handshake is retried in
    clear text on a new connection in the same attempt: delivered, no deferral."""
    bad.faults = ["tls-fail"]
    node = await make_node(fault_config(tmp_path, bad.port, dns_server.port))
    await send(node.listeners[0].port, "s@example.com", ["a@example.com"],
               message(cls="policy-documents"))
    await bad.wait_for(1)
    await node.stop()
    assert [r["type"] for r in records(tmp_path)] == ["r", "d"]
    assert bad.connections == 2 and len(bad.received) == 1


async def test_greeting_554_defers_without_a_bounce(tmp_path, make_node, dns_server, bad):
    """A 5xx greeting skips the server (Postfix's smtp_skip_5xx_greeting): with no other host
    to try the mail is deferred with the greeting's status made 4.x.x, never bounced, and
    arrives once the server takes mail."""
    bad.faults = ["banner-554"]
    node = await make_node(fault_config(tmp_path, bad.port, dns_server.port))
    await send(node.listeners[0].port, "s@example.com", ["a@example.com"],
               message(cls="policy-documents"))
    await bad.wait_for(1)
    await node.stop()
    [(mail_from, rcpts, _)] = bad.received
    assert mail_from == "s@example.com" and rcpts == ["a@example.com"], "no DSN, the message"
    rows = records(tmp_path)
    assert [r["type"] for r in rows] == ["r", "t", "d"]
    assert rows[1]["dsnStatus"] == "4.3.2" and rows[1]["dsnDiag"] == (
        "smtp;554 5.3.2 No SMTP service here")


async def test_connection_refused_is_retried(tmp_path, make_node, dns_server, bad):
    with socket.socket() as probe:  # a port with nobody listening
        probe.bind(("127.0.0.1", 0))
        dead = probe.getsockname()[1]
    node = await make_node(fault_config(tmp_path, dead, dns_server.port))
    await send(node.listeners[0].port, "s@example.com", ["a@example.com"],
               message(cls="policy-documents"))
    await deferred(node)
    node.config.routes["example.com"] = f"127.0.0.1:{bad.port}"  # the server comes back
    await bad.wait_for(1)
    await node.stop()
    kinds = [r["type"] for r in records(tmp_path)]
    assert kinds == ["r", "t", "d"]


@pytest.mark.parametrize("rcode", ["SERVFAIL", "timeout"])
async def test_dns_temporary_failures_are_retried(tmp_path, make_node, dns_server, bad, rcode):
    if rcode == "timeout":
        dns_server.set_timeout("dnsfault.test")
    else:
        dns_server.set_rcode("dnsfault.test", rcode)
    node = await make_node(fault_config(tmp_path, bad.port, dns_server.port, routes=False))
    await send(node.listeners[0].port, "s@dnsfault.test", ["a@dnsfault.test"],
               message(cls="policy-documents"))
    await deferred(node)
    dns_server.clear()
    dns_server.add_mx("dnsfault.test", 10, "mx.dnsfault.test")
    dns_server.add_a("mx.dnsfault.test", "127.0.0.1")
    await bad.wait_for(1, timeout=30)
    await node.stop()
    rows = [r for r in records(tmp_path) if r["rcpt"] == "a@dnsfault.test"]
    assert [r["type"] for r in rows] == ["r", "t", "d"]
    assert rows[1]["dsnStatus"] == "4.4.3"


async def test_nxdomain_bounces(tmp_path, make_node, dns_server, bad):
    dns_server.set_rcode("nowhere.test", "NXDOMAIN")
    node = await make_node(fault_config(tmp_path, bad.port, dns_server.port))
    await send(node.listeners[0].port, "s@example.com", ["a@nowhere.test"],
               message(cls="policy-documents"))
    await bad.wait_for(1)  # the DSN to s@example.com
    await node.stop()
    rows = [r for r in records(tmp_path) if r["rcpt"] == "a@nowhere.test"]
    assert [r["type"] for r in rows] == ["r", "b"]
    assert rows[1]["dsnStatus"] == "5.1.2"


async def test_an_unexpected_delivery_error_defers_instead_of_stranding(tmp_path, make_node,
                                                                       dns_server, bad):
    """An envelope the edge would refuse, injected behind its back, makes the client raise a
    non-SMTP error; the recipient must still get a retry record, not vanish in memory."""
    node = await make_node(fault_config(tmp_path, bad.port, dns_server.port))
    await node.intake.submit("bad\r\nRSET@example.com", [RcptIn("a@example.com")],
                             message(cls="policy-documents"))
    await deferred(node)
    await node.stop()
    types = [r["type"] for r in records(tmp_path)]
    assert types[:2] == ["r", "t"] and set(types[2:]) <= {"t"}, types  # a retry may run too


async def test_an_unexpected_error_while_connecting_defers_instead_of_stranding(
        tmp_path, make_node, sink, monkeypatch, caplog):
    """A bug in planning or opening the connection (the TLS policy: a hostile MTA-STS policy
    and a certificate our parser refused both once raised there) killed the lane's worker
    with the batch it had taken: the recipients got no record and waited in memory until a
    restart. They are deferred like a failed transaction's."""
    from postlane.relay.tlspolicy import TLSPolicy

    async def broken(*args, **kwargs):
        raise RuntimeError("a bug in the TLS policy")

    monkeypatch.setattr(TLSPolicy, "plan", broken)
    node = await make_node(config_text(tmp_path, sink.port))
    await send(node.listeners[0].port, "s@insurer.test", ["a@example.com"],
               message(cls="policy-documents"))

    def deferral() -> dict | None:
        rows = [r for r in records(tmp_path) if r["rcpt"] == "a@example.com" and r["type"] == "t"]
        return rows[0] if rows else None

    row = await until(deferral, what="a deferral record")
    assert row["dsnStatus"] == "4.3.0", row
    assert any("a bug in the TLS policy" in (r.exc_text or "") or r.exc_info
               for r in caplog.records if "unexpectedly" in r.getMessage())
