"""IPv6 end to end, with the only IPv6 address a test machine is sure to have, ``::1``: as a
client, a listener, a pool's source address, an MX's AAAA in the loopback DNS and the API's
address. Each test goes through the real entry points (SMTP, the accounting records, the CLI)."""

from __future__ import annotations

import asyncio
import email
import json
import smtplib

from postlane.harness.sink import Sink
from tests.conftest import config_text, message, records
from tests.test_cli_ops import run_cli
from tests.test_config_check import _free_port
from tests.support.waiting import until

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
            await asyncio.to_thread(_send6, port, [f"b{i}@six.example.net", f"c{i}@four.example.net"],
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
