"""TLS at intake by default: a generated certificate (0600, logged by path, shown in status),
certificates reloaded when their files change, ``postlane tls check``, ``require_tls``."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import ssl
import stat
from pathlib import Path

from typer.testing import CliRunner

from postlane.cli import app
from postlane.node import Node
from tests.conftest import config_text
from tests.support.pki import TestCA
from tests.support.rawsmtp import session
from tests.support.waiting import until


async def _server_certificate(port: int, context: ssl.SSLContext | None = None) -> bytes:
    raw = await session(port)
    assert (await raw.cmd("STARTTLS")).startswith("220 2.0.0")
    if context is None:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    await raw.writer.start_tls(context, server_hostname="mta.test")
    der = raw.writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    assert (await raw.cmd("EHLO client.test")).startswith("250")
    await raw.close()
    return der


async def test_starttls_by_default_with_a_generated_certificate(tmp_path, sink, make_node,
                                                                caplog):
    with caplog.at_level(logging.INFO):
        node = await make_node(config_text(tmp_path, sink.port))
    cert, key = tmp_path / "spool" / "tls" / "cert.pem", tmp_path / "spool" / "tls" / "key.pem"
    assert stat.S_IMODE(os.stat(key).st_mode) == 0o600
    [made] = [r for r in caplog.records if "self-signed" in r.getMessage()]
    assert made.cert == str(cert) and made.key == str(key)
    raw = await session(node.listeners[0].port)
    assert "STARTTLS" in await raw.cmd("EHLO client.test")
    await raw.close()
    der = await _server_certificate(node.listeners[0].port)
    [listener] = node.status()["listeners"]
    info = listener["certificate"]
    assert info["generated"] and info["self_signed"] and info["cert_file"] == str(cert)
    assert info["subject"] == "CN=mta.test" and info["sha256"] == hashlib.sha256(der).hexdigest()
    await node.stop()
    node2 = await make_node(config_text(tmp_path, sink.port))  # the same pair next time
    assert await _server_certificate(node2.listeners[0].port) == der


def test_nodes_starting_at_once_make_one_generated_pair(tmp_path, sink):
    """Cluster nodes may share the state folder and start together: each gets the same pair,
    and its key matches its certificate."""
    from concurrent.futures import ThreadPoolExecutor

    from postlane.edge.tls import generated_pair, server_context
    from postlane.startup import parse_config

    config = parse_config(config_text(tmp_path, sink.port))
    with ThreadPoolExecutor(8) as pool:
        pairs = list(pool.map(lambda _: generated_pair(config), range(8)))
    assert len(set(pairs)) == 1
    server_context(*pairs[0])  # loads: the key is the certificate's


async def _reloading_node(tmp_path, sink, make_node) -> tuple[TestCA, Node, Path, Path]:
    """A CA of the test's, and a node serving its certificate for mta.test ("live": the
    certificate and key files, returned too), looking for a renewed one every 0.1 s."""
    ca = TestCA(tmp_path / "ca")
    cert, key = ca.issue(["mta.test"], file_name="live")
    node = await make_node(config_text(tmp_path, sink.port, f"""
[tls]
cert_file = "{cert}"
key_file = "{key}"
reload_interval = "0.1s"
"""))
    return ca, node, cert, key


async def test_a_renewed_certificate_is_served_without_a_restart(tmp_path, sink, make_node,
                                                                caplog):
    ca, node, cert, key = await _reloading_node(tmp_path, sink, make_node)
    port = node.listeners[0].port
    verify = ssl.create_default_context(cafile=str(ca.ca_file))
    first = await _server_certificate(port, verify)
    new_cert, new_key = ca.issue(["mta.test"], file_name="renewed")
    cert.write_bytes(b"-----BEGIN CERTIFICATE-----\nhalf written")  # a broken moment
    await until(lambda: any("not reloaded" in r.getMessage() for r in caplog.records),
                what="the broken file tried and refused")
    assert await _server_certificate(port, verify) == first, "a broken file keeps the old one"
    os.replace(new_key, key)
    os.replace(new_cert, cert)

    async def renewed() -> bool:
        return await _server_certificate(port, verify) != first

    await until(renewed, timeout=10, step=0.05, what="the renewed certificate served")
    assert not node.status()["listeners"][0]["certificate"]["generated"]


async def test_require_tls_refuses_mail_before_starttls(tmp_path, sink, make_node):
    node = await make_node(config_text(tmp_path, sink.port).replace(
        'relay_from = ["127.0.0.0/8"]', 'relay_from = ["127.0.0.0/8"]\nrequire_tls = true'))
    raw = await session(node.listeners[0].port)
    assert (await raw.cmd("MAIL FROM:<s@insurer.test>")).startswith("530 5.7.0")
    assert (await raw.cmd("STARTTLS")).startswith("220")
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    await raw.writer.start_tls(ctx)
    assert (await raw.cmd("EHLO client.test")).startswith("250")
    assert (await raw.cmd("MAIL FROM:<s@insurer.test>")).startswith("250")
    await raw.close()


async def test_tls_check_shows_what_a_client_sees(tmp_path, sink, make_node):
    ca = TestCA(tmp_path / "ca")
    cert, key = ca.issue(["mta.test"])
    text = config_text(tmp_path, sink.port, f'[tls]\ncert_file = "{cert}"\nkey_file = "{key}"\n')
    node = await make_node(text)
    path = tmp_path / "node.toml"
    path.write_text(text.replace("port = 0\nrelay_from",
                                 f"port = {node.listeners[0].port}\nrelay_from"))
    runner = CliRunner()
    result = await asyncio.to_thread(runner.invoke, app, ["tls", "check", "-c", str(path)])
    assert result.exit_code == 0, result.output
    assert "TLSv1.3" in result.output and "names      mta.test" in result.output
    assert "verified   no, for mta.test" in result.output  # not a CA of this system
    result = await asyncio.to_thread(runner.invoke, app, [
        "tls", "check", "-c", str(path), "--ca-file", str(ca.ca_file)])
    assert "verified   yes, for mta.test" in result.output, result.output
    result = await asyncio.to_thread(runner.invoke, app, ["tls", "check", "-c", str(path),
                                                          "--json"])
    [listener] = json.loads(result.output)
    assert listener["protocol"] == "TLSv1.3" and listener["verified"] is False
    assert listener["certificate"]["names"] == ["mta.test"]


def test_a_private_key_every_user_can_read_is_told(tmp_path, caplog):
    """A TLS key left at mode 0644 served mail without a word (DKIM keys must be 0600)."""
    from postlane.cli.edge import selfsigned
    from postlane.edge.tls import ServerCertificate

    cert, key = selfsigned("localhost")
    (tmp_path / "cert.pem").write_bytes(cert)
    (tmp_path / "key.pem").write_bytes(key)
    for mode, told in ((0o644, True), (0o640, False), (0o600, False)):
        (tmp_path / "key.pem").chmod(mode)
        caplog.clear()
        ServerCertificate(str(tmp_path / "cert.pem"), str(tmp_path / "key.pem"))
        assert any("readable by every user" in r.getMessage() for r in caplog.records) == told


async def test_a_stalled_starttls_handshake_frees_its_slot(tmp_path, sink, make_node, caplog):
    """RFC 3207 after the 220: a client that never finishes the handshake (silent, or half a
    ClientHello) is cut at ``command_timeout`` and its connection slot is given back. With a
    command timeout under asyncio's 60 s handshake timeout, the cut left aiosmtpd's session
    waiting for commands for ever: the slot stayed taken, ``max_connections_per_ip`` such
    clients locked a host out until a restart."""
    # 2 s, not 0.5 s: the client's own steps (EHLO, STARTTLS, QUIT) must come within it, and
    # one 0.6 s late, as on a loaded machine, got "421 Idle too long" instead of the 220
    node = await make_node(config_text(tmp_path, sink.port, """
[listeners.in.limits]
command_timeout = "2s"
pregreet_wait = 0
"""))
    port = node.listeners[0].port
    connections = node.listeners[0].handler.guard.connections
    caplog.set_level(logging.INFO, logger="postlane.edge")
    for first_bytes in (b"", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"):
        raw = await session(port)
        assert (await raw.cmd("STARTTLS")).startswith("220")
        raw.send(first_bytes)
        assert await raw.closed(), "the server cuts the stalled handshake"
        await until(lambda: connections.total == 0, what="the slot given back")
    assert any("TLS handshake failed" in r.getMessage() for r in caplog.records)
    raw = await session(port)  # and the listener still serves
    assert (await raw.cmd("QUIT")).startswith("221")
    await raw.close()


async def test_status_shows_the_certificate_served_not_a_file_that_did_not_load(
        tmp_path, sink, make_node, caplog):
    """``postlane status`` describes the certificate the listener serves. It read the file on
    disk at every call: a renewed certificate whose key did not match (so not loaded, the old
    one still served) was shown with the new dates, hiding an old certificate running out; a
    half-written file made ``status`` itself fail."""
    ca, node, cert, key = await _reloading_node(tmp_path, sink, make_node)
    port = node.listeners[0].port
    served = hashlib.sha256(await _server_certificate(port)).hexdigest()
    new_cert, _ = ca.issue(["mta.test"], file_name="renewed")
    os.replace(new_cert, cert)  # the key not renewed with it: the pair does not load
    await until(lambda: any("not reloaded" in r.getMessage() for r in caplog.records),
                what="the mismatched pair tried and refused")
    assert hashlib.sha256(await _server_certificate(port)).hexdigest() == served
    assert node.status()["listeners"][0]["certificate"]["sha256"] == served
    caplog.clear()
    cert.write_bytes(b"-----BEGIN CERTIFICATE-----\nhalf written")
    await until(lambda: any("not reloaded" in r.getMessage() for r in caplog.records),
                what="the broken file tried and refused")
    assert node.status()["listeners"][0]["certificate"]["sha256"] == served
