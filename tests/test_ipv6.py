"""IPv6 end to end, with the only IPv6 address a test machine is sure to have, ``::1``: as a
client, a listener, a pool's source address, an MX's AAAA in the loopback DNS and the API's
address. Each test goes through the real entry points (SMTP, the accounting records, the CLI)."""

from __future__ import annotations

import asyncio
import base64
import email
import json
import smtplib

from postlane.edge.limits import ConnectionLimits, client_key
from postlane.harness.sink import Sink
from tests.conftest import config_text, message, records
from tests.support.waiting import until
from tests.test_cli_ops import run_cli
from tests.test_config_check import _free_port
from tests.test_security_auth import (  # noqa: F401  (fixtures)
    PASSWORD,
    _client_ctx,
    secure_config,
    tls_files,
    users_file,
)

SIX_LISTENER = ('address = "::1"\nport = 0\nrelay_from = ["::1/128"]')


def _six(text: str, *, pool: str = '{ address = "::1", ehlo = "tx6.test", max_smtp_out = 4 }'
         ) -> str:
    """``config_text`` with the listener on ``::1`` trusting ``::1``, and the critical pool's
    source addresses ``pool``."""
    text = text.replace('address = "127.0.0.1"\nport = 0\nrelay_from = ["127.0.0.0/8"]',
                        SIX_LISTENER)
    return text.replace('{ address = "127.0.0.20", ehlo = "tx0.test", max_smtp_out = 4 }', pool)


def _send6(port: int, rcpts: list[str], data: bytes, ehlo: str = "[IPv6:::1]") -> dict:
    with smtplib.SMTP("::1", port, local_hostname=ehlo, timeout=30) as client:
        return client.sendmail("s@insurer.test", rcpts, data)


def _dns(dns_server) -> str:
    return f'[dns]\nnameserver = "127.0.0.1"\nport = {dns_server.port}\ntimeout = 2\n'


async def test_an_ipv6_client_through_an_ipv6_pool_to_an_ipv6_mx(tmp_path, dns_server,
                                                                   make_node):
    """A client at ``::1`` (EHLO ``[IPv6:::1]``, trusted by ``relay_from = ["::1/128"]``) on a
    listener at ``::1``; the pool's source address ``::1`` and the MX's only address an AAAA
    ``::1``. The Received field gives the client's address as RFC 5321 4.4 has it, an address
    literal (it said ``(::1)``), and the records name both ends of the delivery."""
    mx = await Sink(host="::1").start()
    try:
        dns_server.add_mx("six.example.net", 10, "mx6.example.net")
        dns_server.add_a("mx6.example.net", "::1")
        node = await make_node(_six(config_text(tmp_path, mx.port, _dns(dns_server),
                                                routes=False)))
        port = node.listeners[0].port
        await asyncio.to_thread(_send6, port, ["b@six.example.net"],
                                message(cls="policy-documents"))
        [arrival] = await mx.wait_for(1)
        await until(lambda: any(r["type"] == "d" for r in records(tmp_path)))
    finally:
        await mx.stop()
    assert arrival.peer == "::1" and arrival.ehlo == "tx6.test"
    received = email.message_from_bytes(arrival.data)["Received"]
    assert received.startswith("from [IPv6:::1] ([IPv6:::1])"), received
    [r] = [r for r in records(tmp_path) if r["type"] == "r"]
    assert r["srcMta"] == "[IPv6:::1] (::1)"
    [d] = [r for r in records(tmp_path) if r["type"] == "d"]
    assert (d["dlvSourceIp"], d["dlvDestinationIp"], d["vmta"]) == ("::1", "::1", "tx6.test")


async def test_an_ipv6_stranger_may_not_relay(tmp_path, sink, make_node):
    """``relay_from`` of IPv4 networks only: a client at ``::1`` is a stranger."""
    text = _six(config_text(tmp_path, sink.port)).replace('relay_from = ["::1/128"]',
                                                          'relay_from = ["127.0.0.0/8"]')
    node = await make_node(text)
    try:
        await asyncio.to_thread(_send6, node.listeners[0].port, ["a@example.com"], message())
    except smtplib.SMTPRecipientsRefused as exc:
        assert exc.recipients["a@example.com"][0] == 550
    else:
        raise AssertionError("a stranger at ::1 relayed")


async def test_a_pool_of_both_families_sends_an_ipv6_only_mx_from_its_ipv6_address(
        tmp_path, dns_server, make_node):
    """A pool of an IPv4 and an IPv6 source address and an MX with an AAAA only. The slot the
    scheduler took first was the IPv4 one (the least busy, ties in turn): its attempt got
    ``451 4.4.4 ... no IPv4 address`` without connecting, a deferral on the record and the
    lane suspended as if the destination were down, and with more IPv4 than IPv6 addresses in
    the pool the turn came round to the IPv6 one by chance only. The lane now learns the
    families of its MX addresses and takes a slot of one of them: delivered at the first
    attempt, from ``::1``, nothing deferred. Mail to an IPv4-only MX goes from the IPv4
    address."""
    mx = await Sink(host="::1").start()
    four = await Sink(host="127.0.1.4", port=mx.port).start()
    try:
        dns_server.add_mx("six.example.net", 10, "mx6.example.net")
        dns_server.add_a("mx6.example.net", "::1")
        dns_server.add_mx("four.example.net", 10, "mx4.example.net")
        dns_server.add_a("mx4.example.net", "127.0.1.4")
        pool = ", ".join(f'{{ address = "127.0.0.{20 + i}", ehlo = "tx{i}.test" }}'
                         for i in range(3)) + ', { address = "::1", ehlo = "tx6.test" }'
        node = await make_node(_six(config_text(tmp_path, mx.port, _dns(dns_server),
                                                routes=False), pool=pool))
        port = node.listeners[0].port
        for i in range(4):
            await asyncio.to_thread(_send6, port, [f"b{i}@six.example.net",
                                                   f"c{i}@four.example.net"],
                                    message(cls="policy-documents"))
        six = await mx.wait_for(4)
        fours = await four.wait_for(4)
        await until(lambda: sum(r["type"] == "d" for r in records(tmp_path)) == 8)
    finally:
        await four.stop()
        await mx.stop()
    assert {a.peer for a in six} == {"::1"} and {a.ehlo for a in six} == {"tx6.test"}
    assert {a.peer for a in fours} <= {"127.0.0.20", "127.0.0.21", "127.0.0.22"}
    assert not [r for r in records(tmp_path) if r["type"] == "t"]


async def test_the_api_on_ipv6_and_the_cli_that_calls_it(tmp_path, sink, make_node):
    """``[api] address = "::"`` was IPv6 only (``socket.create_server`` sets IPV6_V6ONLY), so
    ``postlane status -c CONFIG``, which calls such a node at 127.0.0.1, could not reach it,
    against what docs/configuration.md and ``config check`` say (the API's ``::`` takes IPv4
    too). ``address = "::1"``: the CLI calls ``http://[::1]:PORT``, and ``--url`` takes one."""
    for address in ("::", "::1"):
        port = _free_port()
        path = tmp_path / f"node-{port}.toml"
        path.write_text(config_text(tmp_path / address.replace(":", "c"), sink.port).replace(
            "[api]\nport = 0", f'[api]\naddress = "{address}"\nport = {port}'))
        node = await make_node(path.read_text())
        code, out, err = await run_cli("status", "--json", "-c", str(path))
        assert code == 0 and json.loads(out)["status"]["pools"], (address, err)
        token = ["--token-file", str(tmp_path / address.replace(":", "c") / "api-token")]
        urls = ["http://[::1]"] + (["http://127.0.0.1"] if address == "::" else [])
        for url in urls:
            code, _, err = await run_cli("queues", "--url", f"{url}:{port}", *token)
            assert code == 0, (address, url, err)
        await node.stop()


async def _raw6(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, bytes]:
    reader, writer = await asyncio.open_connection("::1", port)
    return reader, writer, await reader.readline()


async def _cmd(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, line: str) -> bytes:
    writer.write(line.encode() + b"\r\n")
    reply = await reader.readline()
    while reply[3:4] == b"-":
        reply = await reader.readline()
    return reply


async def test_the_per_client_limits_hold_for_an_ipv6_client(tmp_path, sink, make_node):
    """A stranger at ``::1``: its connections, messages per minute and bad commands are
    limited as an IPv4 client's are, and it is counted by its /64 (``::/64``), the network a
    client owns whole (docs/security.md, "Limits")."""
    text = _six(config_text(tmp_path, sink.port, "[listeners.in.limits]\n"
                            "max_connections_per_ip = 2\nmessages_per_minute = 2\n"
                            "max_bad_commands = 2\npregreet_wait = 0\n")).replace(
        'relay_from = ["::1/128"]', 'relay_from = ["127.0.0.0/8"]')
    node = await make_node(text)
    port = node.listeners[0].port
    guard = node.listeners[0].handler.guard
    first, second, third = [await _raw6(port) for _ in range(3)]
    assert first[2].startswith(b"220") and second[2].startswith(b"220")
    assert third[2].startswith(b"421 4.7.0 Too many connections from your address")
    assert dict(guard.connections.per_ip) == {"::/64": 2}
    reader, writer, _ = first
    assert (await _cmd(reader, writer, "EHLO [IPv6:::1]")).startswith(b"250")
    for _ in range(2):
        assert (await _cmd(reader, writer, "MAIL FROM:<s@insurer.test>")).startswith(b"250")
        assert (await _cmd(reader, writer, "RSET")).startswith(b"250")
    assert (await _cmd(reader, writer, "MAIL FROM:<s@insurer.test>")).startswith(b"450 4.7.1")
    reader, writer, _ = second
    assert (await _cmd(reader, writer, "XYZZY")).startswith(b"500")
    assert (await _cmd(reader, writer, "XYZZY")).startswith(b"500")
    assert (await reader.readline()).startswith(b"421 4.7.0 Too many errors")
    for _, w, _ in (first, second, third):
        w.close()
    await until(lambda: not guard.connections.per_ip, what="the connections counted out")


def test_an_ipv6_client_is_counted_by_its_64():
    """One host owns its /64 and may connect from any address in it: per-address counting held
    nobody. Another /64 is another client; an IPv4-mapped address is its IPv4 address."""
    limits = ConnectionLimits(10, 1)
    assert limits.admit("2001:db8:0:1::1") is None
    assert limits.admit("2001:db8:0:1:ffff::2", ) is not None  # the same /64
    assert limits.admit("2001:db8:0:2::1") is None
    assert limits.admit("::ffff:192.0.2.1") is None and limits.admit("192.0.2.1") is not None
    limits.release("2001:db8:0:1::1")
    assert limits.admit("2001:db8:0:1::3") is None
    assert client_key("2001:db8:0:1:2:3:4:5") == "2001:db8:0:1::/64"
    assert client_key("192.0.2.1") == "192.0.2.1"


async def test_password_guessing_from_an_ipv6_client_is_cut_off(
        tmp_path, sink, make_node, tls_files, users_file):  # noqa: F811
    """AUTH failures of a client at ``::1`` are counted (``auth_failures_per_minute``) and
    then refused with 454 4.7.0, as from an IPv4 client."""
    text = secure_config(tmp_path, sink.port, tls_files, users_file,
                         extra="[listeners.sub.limits]\nmax_bad_commands = 50").replace(
        "[security]\n", "[security]\nauth_failures_per_minute = 2\n")
    text = text.replace('[listeners.sub]\naddress = "127.0.0.1"',
                        '[listeners.sub]\naddress = "::1"')
    node = await make_node(text)

    def guesses() -> list[int]:
        codes = []
        with smtplib.SMTP("::1", node.listeners[1].port, timeout=30) as c:
            c.ehlo("[IPv6:::1]")
            c.starttls(context=_client_ctx())
            c.ehlo("[IPv6:::1]")
            for i in range(3):
                blob = base64.b64encode(f"\0alice\0guess-{i}".encode()).decode()
                codes.append(c.docmd("AUTH", f"PLAIN {blob}")[0])
            blob = base64.b64encode(f"\0alice\0{PASSWORD}".encode()).decode()
            codes.append(c.docmd("AUTH", f"PLAIN {blob}")[0])
        return codes

    assert await asyncio.to_thread(guesses) == [535, 535, 454, 454]


def test_dmarc_reports_count_our_ipv6_pool_address_as_ours(tmp_path):
    """A DMARC aggregate report's IPv6 ``source_ip``, however the reporter spells it (in full,
    in capitals), is our pool's ``::1`` in the pools group, not an unknown sender; and the
    reputation view lists it under its pool."""
    from typer.testing import CliRunner

    from postlane.cli import app
    from tests.test_dmarc import RUA, crafted

    runner = CliRunner()
    cfg = tmp_path / "postlane.toml"
    cfg.write_text(_six(config_text(tmp_path, 2525, RUA)))  # insurer.test is ours
    path = tmp_path / "six.xml"
    path.write_bytes(crafted([("0:0:0:0:0:0:0:1", 500, "pass", "pass"),
                              ("2001:DB8::7", 3, "fail", "fail")]))
    assert runner.invoke(app, ["dmarc", "import", "-c", str(cfg), str(path)]).exit_code == 0
    out = runner.invoke(app, ["dmarc", "report", "-c", str(cfg), "--days", "3660", "--json"])
    (dom,) = json.loads(out.stdout)["domains"]
    assert {g: v["messages"] for g, v in dom["groups"].items()} == {
        "pools": 500, "forwarders": 0, "authorised": 0, "unknown": 3}
    assert [(s["source_ip"], s["pool"]) for s in dom["groups"]["pools"]["top"]] == [
        ("::1", "critical")]
    assert [(s["source_ip"]) for s in dom["groups"]["unknown"]["top"]] == ["2001:db8::7"]
    out = runner.invoke(app, ["reputation", "show", "-c", str(cfg), "--json"])
    assert out.exit_code == 0, out.output
    [pool] = [p for p in json.loads(out.stdout)["pools"] if p["pool"] == "critical"]
    [ip] = pool["ips"]
    assert ip["address"] == "::1" and ip["dmarc"]["messages"] == 500, ip


def test_dns_checklist_and_check_of_an_ipv6_pool_address(tmp_path):
    """``postlane init`` with ``--ip ::1``: the checklist asks for an AAAA, the ``ip6.arpa``
    PTR and ``ip6:`` in the SPF record; ``dns check`` against a nameserver at ``[::1]:PORT``
    finds them."""
    import re

    from typer.testing import CliRunner

    from postlane.cli import app
    from postlane.startup import load_config
    from tests.support.dnsserver import DNSServer
    from tests.test_firstrun import _publish

    runner = CliRunner()
    ips = ["127.0.0.50", "::1", "127.0.0.52", "127.0.0.53"]
    made = runner.invoke(app, ["init", str(tmp_path / "node"), "--hostname", "mta.example",
                               "--domain", "insurer.example",
                               *[a for ip in ips for a in ("--ip", ip)],
                               "--listen", "127.0.0.1:0", "--inbound", "127.0.0.1:0",
                               "--api", "127.0.0.1:0"])
    assert made.exit_code == 0, made.output
    out = made.output
    assert re.search(r"tx2\.insurer\.example\.\s+IN AAAA ::1\s", out), out
    assert re.search(r"1\.0(\.0){30}\.ip6\.arpa\.\s+IN PTR\s+tx2\.insurer\.example\.", out)
    assert re.search(r'"v=spf1 [^"]*ip6:::1 [^"]*-all"', out)
    config = tmp_path / "node" / "postlane.toml"
    with DNSServer(host="::1") as server:
        _publish(server, load_config(config))
        checked = runner.invoke(app, ["dns", "check", "-c", str(config), "--nameserver",
                                      f"[::1]:{server.port}", "--json"])
    assert checked.exit_code == 0, checked.output
    statuses = {(r["name"], r["type"]): r["status"] for r in json.loads(checked.output)["records"]}
    assert statuses[("tx2.insurer.example", "AAAA")] == "ok"


async def test_a_report_posted_over_ipv4_to_the_dual_stack_api_names_an_ipv4_client(
        tmp_path, sink, make_node):
    """The API on ``::`` sees an IPv4 client as ``::ffff:127.0.0.1``; the feedback record of a
    report it posted names it ``127.0.0.1``, as the API on ``0.0.0.0`` would."""
    import httpx

    from tests.test_feedback_http import EXTRA

    port = _free_port()
    text = config_text(tmp_path, sink.port, EXTRA).replace(
        "[pools.bulk]\n", '[pools.bulk]\nbounce_domain = "bounces.mta.test"\n').replace(
        "[api]\nport = 0", f'[api]\naddress = "::"\nport = {port}')
    node = await make_node(text)
    assert node.feedback is not None
    verp = node.feedback.verp.encode("1A2B3C4D5E6F7A8B9C0D", 0, "w@example.com",
                                     "bounces.mta.test")
    arf = (f"From: fbl@isp.example\r\nTo: fbl@mta.test\r\nSubject: FBL\r\n"
           f'MIME-Version: 1.0\r\nContent-Type: multipart/report; '
           f'report-type=feedback-report; boundary="b"\r\n\r\n'
           f"--b\r\nContent-Type: message/feedback-report\r\n\r\nFeedback-Type: abuse\r\n"
           f"Version: 1\r\n\r\n--b\r\nContent-Type: text/rfc822-headers\r\n\r\n"
           f"Return-Path: <{verp}>\r\nTo: redacted\r\n\r\n--b--\r\n")
    token = (tmp_path / "api-token").read_text().strip()
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}/api/v1",
                                 headers={"Authorization": f"Bearer {token}"}) as client:
        r = await client.post("/feedback/reports", content=arf)
    assert r.status_code == 200 and r.json()["kind"] == "complaint"
    await until(lambda: [r for r in records(tmp_path) if r["srcType"] == "feedback"])
    assert {r["srcMta"] for r in records(tmp_path) if r["srcType"] == "feedback"} == {
        "127.0.0.1"}
