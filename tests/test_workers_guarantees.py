"""``[node] workers = 2`` keeps the guarantees of one process, through the real entry points:
kill -9 of the main process, the limits a client could otherwise get N times by landing on
different workers, suppression and certificates and users changed while running, hostile
input, and the figures ``status`` reports."""

from __future__ import annotations

import asyncio
import base64
import email
import email.policy
import json
import os
import signal
import smtplib
import socket
import ssl
import subprocess
from pathlib import Path

from postlane.cli import app
from postlane.cli.edge import selfsigned
from postlane.harness.killtest import run
from postlane.harness.sink import Sink
from postlane.policy.dkim import generate_key, write_key
from postlane.policy.users import User, hash_password, save_user
from tests.conftest import config_text, message, records, send
from tests.support.pki import TestCA
from tests.support.rawsmtp import RawSMTP, session
from tests.support.waiting import until
from tests.test_api import api_client
from tests.test_cli_ops import run_cli
from tests.test_config_check import POSTLANE, _free_port
from tests.test_dkim import keys  # noqa: F401  (fixture)
from tests.test_intake_tls import _server_certificate
from tests.test_security_auth import (  # noqa: F401  (fixtures)
    PASSWORD,
    _client_ctx,
    secure_config,
    submit,
    tls_files,
    users_file,
)
from tests.test_workers import _ready, _with_workers


async def _on_every_worker(port: int, count: int = 8) -> list[RawSMTP]:
    """``count`` sessions opened at once (the kernel hands them to both workers), greeted."""
    sessions = await asyncio.gather(*(session(port) for _ in range(count)))
    return list(sessions)


async def test_kill_9_of_the_main_process_with_workers_loses_nothing_acknowledged(tmp_path):
    """The node (``postlane serve``) SIGKILLed 3 times while its 2 workers accept: every
    acknowledged message delivered, its evidence complete, ``audit verify`` clean, no record
    written twice (the restart binds the port again: no worker outlived its main process)."""
    result = await asyncio.to_thread(run, tmp_path, messages=300, kills=3, seed=7, workers="2")
    assert result.kills == 3
    assert result.acknowledged == 300
    assert result.lost == 0
    assert result.delivered == 300
    assert result.evidence_ok, result.problems


async def test_auth_failure_limit_is_node_wide(tmp_path, sink, make_node, tls_files,  # noqa: F811
                                               users_file):  # noqa: F811
    """``security.auth_failures_per_minute`` counts a client IP's failures on every worker
    together: a guesser spreading its connections over the workers gets no more guesses."""
    node = await make_node(_with_workers(secure_config(
        tmp_path, sink.port, tls_files, users_file,
        extra="[listeners.sub.limits]\nmax_bad_commands = 50").replace(
            "[security]\n", "[security]\nauth_failures_per_minute = 2\n")))
    await _ready(node)
    port = node.listeners[1].port

    def guess(client: smtplib.SMTP, password: str) -> int:
        blob = base64.b64encode(f"\0alice\0{password}".encode()).decode()
        return client.docmd("AUTH", f"PLAIN {blob}")[0]

    def guesses() -> list[int]:
        clients = []
        for _ in range(8):  # all open at once: both workers hold some
            c = smtplib.SMTP("127.0.0.1", port, timeout=30)
            c.ehlo("client.test")
            c.starttls(context=_client_ctx())
            c.ehlo("client.test")
            clients.append(c)
        codes = [guess(c, f"guess-{i}") for i, c in enumerate(clients)]
        codes += [guess(c, PASSWORD) for c in clients[:2]]  # even the right one, for now
        for c in clients:
            c.close()
        return codes

    assert await asyncio.to_thread(guesses) == [535, 535] + [454] * 8


async def test_suppressed_through_the_api_is_refused_on_every_worker_at_once(
        tmp_path, sink, make_node):
    node = await make_node(_with_workers(config_text(tmp_path, sink.port)))
    await _ready(node)
    sessions = await _on_every_worker(node.listeners[0].port)
    async with api_client(node, tmp_path) as api:
        for address, scope in (("gone@example.com", "all"), ("news@example.com", "best-effort")):
            resp = await api.post("/api/v1/suppressions", json={
                "address": address, "scope": scope, "reason": "asked"})
            assert resp.status_code == 201, resp.text
    for i, raw in enumerate(sessions):
        assert (await raw.cmd("MAIL FROM:<s@insurer.test>")).startswith("250")
        reply = await raw.cmd("RCPT TO:<gone@example.com>")
        assert reply.startswith("550 5.7.1 Recipient suppressed"), reply
        for rcpt in ("news@example.com", f"ok{i}@example.com"):  # best-effort only: at DATA
            assert (await raw.cmd(f"RCPT TO:<{rcpt}>")).startswith("250")
        assert (await raw.cmd("DATA")).startswith("354")
        assert (await raw.cmd(message(f"n{i}", cls="marketing") + b".\r\n")).startswith("250")
        await raw.close()
    arrivals = await sink.wait_for(len(sessions))
    assert sorted(r for a in arrivals for r in a.rcpts) == sorted(
        f"ok{i}@example.com" for i in range(len(sessions)))
    await node.stop()
    dropped = [r["rcpt"] for r in records(tmp_path) if r["type"] == "s"]
    assert dropped == ["news@example.com"] * len(sessions)


async def test_a_renewed_certificate_reaches_every_worker(tmp_path, sink, make_node):
    ca = TestCA(tmp_path / "ca")
    cert, key = ca.issue(["mta.test"], file_name="live")
    node = await make_node(_with_workers(config_text(tmp_path, sink.port, f"""
[tls]
cert_file = "{cert}"
key_file = "{key}"
reload_interval = "0.1s"
""")))
    await _ready(node)
    port = node.listeners[0].port
    verify = ssl.create_default_context(cafile=str(ca.ca_file))
    first = await _server_certificate(port, verify)
    new_cert, new_key = ca.issue(["mta.test"], file_name="renewed")
    os.replace(new_key, key)
    os.replace(new_cert, cert)
    await node.workers.reload()  # what SIGHUP does after the main process's own part

    async def served() -> set[bytes]:
        return set(await asyncio.gather(*(_server_certificate(port, verify)
                                          for _ in range(8))))

    seen = await served()
    assert first not in seen and len(seen) == 1, "every worker serves the renewed one"


async def test_a_user_added_to_the_users_file_can_log_in_on_every_worker(
        tmp_path, sink, make_node, tls_files):  # noqa: F811
    users = tmp_path / "users.toml"
    save_user(users, User("alice", hash_password(PASSWORD), ["policy-documents"],
                          "policy-documents", ["insurer.test"]))
    node = await make_node(_with_workers(secure_config(tmp_path, sink.port, tls_files, users,
                                                       relay_from="[]")))
    await _ready(node)
    port = node.listeners[1].port
    save_user(users, User("carol", hash_password(PASSWORD), ["policy-documents"],
                          "policy-documents", ["insurer.test"]))
    await asyncio.gather(*(submit(port, tls="starttls", user="carol") for _ in range(6)))
    await sink.wait_for(6)


async def test_hostile_input_does_not_take_a_worker_down(tmp_path, sink, make_node):
    """A bad-command storm gets the 421 of ``max_bad_commands`` as in one process, and a
    100 MB line without CRLF is refused; no worker exits."""
    node = await make_node(_with_workers(config_text(tmp_path, sink.port)))
    await _ready(node)
    pids = node.workers.pids()
    port = node.listeners[0].port
    storm = await _on_every_worker(port, 4)
    for raw in storm:
        raw.send(b"BOGUS\r\n" * 200)
        assert await raw.closed()
        await raw.close()
    chunk = b"A" * (1 << 20)
    for phase in ("command", "DATA"):
        raw = await session(port)
        if phase == "DATA":
            assert (await raw.cmd("MAIL FROM:<s@insurer.test>")).startswith("250")
            assert (await raw.cmd("RCPT TO:<x@example.com>")).startswith("250")
            assert (await raw.cmd("DATA")).startswith("354")
        try:
            for _ in range(100):
                raw.send(chunk)
                await raw.writer.drain()
            raw.send(b"\r\n.\r\n")
            reply = await raw.reply(timeout=60)
            assert reply[:3] in ("500", "552", "421", ""), reply
        except ConnectionError:
            pass  # cut off before the whole line: fine too
        await raw.close()
    await send(port, "s@insurer.test", ["after@example.com"], message("after", cls="marketing"))
    await sink.wait_for(1)
    assert node.workers.pids() == pids and node.workers.restarts == 0


async def test_size_and_recipient_limits_hold_in_a_worker(tmp_path, sink, make_node):
    node = await make_node(_with_workers(config_text(
        tmp_path, sink.port).replace(
            "[listeners.in]\n", "[listeners.in]\nmax_recipients = 3\n",
            1)))
    await _ready(node)
    for raw in await _on_every_worker(node.listeners[0].port, 4):
        assert "SIZE 100000" in await raw.cmd("EHLO client.test")
        assert (await raw.cmd("MAIL FROM:<s@insurer.test> SIZE=200000")).startswith("552")
        assert (await raw.cmd("MAIL FROM:<s@insurer.test>")).startswith("250")
        codes = [(await raw.cmd(f"RCPT TO:<r{i}@example.com>"))[:3] for i in range(5)]
        assert codes == ["250"] * 3 + ["452"] * 2, codes
        await raw.close()


async def test_status_counts_what_the_workers_sign(tmp_path, sink, make_node, keys):  # noqa: F811
    """``status`` (and the API's) DKIM figures include the signatures the workers made."""
    from tests.test_dkim import key_entry

    dkim = "[dkim]\n" + key_entry(tmp_path, keys, "insurer.test", "r1")
    node = await make_node(_with_workers(config_text(tmp_path, sink.port, dkim)))
    await _ready(node)
    for i in range(4):
        await send(node.listeners[0].port, "s@insurer.test", [f"a{i}@example.com"],
                   message(f"signed-{i}", cls="policy-documents"))
    await sink.wait_for(4)
    assert all(b"DKIM-Signature:" in a.data for a in sink.arrivals)
    assert node.status()["accepted"] == 4
    await until(lambda: node.status()["dkim"]["signed"] == 4, what="4 signatures counted")
    await node.stop()
    assert sum(1 for r in records(tmp_path) if r["type"] == "r") == 4


async def test_status_and_metrics_count_every_workers_connections_and_messages(
        tmp_path, sink, make_node):
    """Open SMTP connections (``status`` listeners' ``connections``, the
    ``postlane_smtp_connections`` gauge) and received messages (``accepted``, the "received"
    recipients) are the node's, whichever worker took them."""
    from tests.test_metrics_exposition import _metrics

    node = await make_node(_with_workers(config_text(tmp_path, sink.port)))
    await _ready(node)
    port = node.listeners[0].port
    for i in range(6):
        await send(port, "s@insurer.test", [f"a{i}@example.com"], message(f"m{i}"))
    held = await _on_every_worker(port, 5)
    await until(lambda: node.status()["listeners"][0]["connections"] == 5,
                what="5 connections counted")
    text = await _metrics(node, tmp_path)
    assert 'postlane_smtp_connections{listener="in"} 5.0' in text, text
    assert node.status()["accepted"] == 6
    target = ["--url", f"http://127.0.0.1:{node.api.port}",
              "--token-file", str(tmp_path / "api-token")]
    code, out, err = await run_cli("status", "--json", *target)
    assert code == 0, err
    shown = json.loads(out)["status"]
    assert shown["listeners"][0]["connections"] == 5 and shown["accepted"] == 6
    code, out, err = await run_cli("status", *target)
    assert code == 0 and "connections" in out, out + err
    received = [line for line in text.splitlines()
                if line.startswith("postlane_recipients_total") and 'outcome="received"' in line]
    assert sum(float(line.rsplit(" ", 1)[1]) for line in received) == 6, received
    for raw in held:
        await raw.close()
    await until(lambda: node.status()["listeners"][0]["connections"] == 0,
                what="the connections given back")


def _workers_of(pid: int) -> list[int]:
    """Intake worker processes started by the main process ``pid`` (their command line names
    it), whether or not it still runs."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"postlane.workers.process" in argv and str(pid).encode() in argv[-3:]:
            found.append(int(entry.name))
    return found


async def _listening(port: int, pid: int) -> None:
    """Until the node's 2 workers are up and one of them greets."""

    async def greeted() -> bool:
        try:
            raw = await RawSMTP.connect(port)
        except OSError:
            return False
        ok = (await raw.reply()).startswith("220")
        await raw.close()
        return ok

    await until(lambda: len(_workers_of(pid)) == 2, timeout=60, what="2 workers")
    await until(greeted, timeout=60, what="the listener")


async def _serve(path: Path, log: Path) -> asyncio.subprocess.Process:
    with log.open("ab") as out:
        return await asyncio.create_subprocess_exec(POSTLANE, "serve", "-c", str(path),
                                                    stdout=out, stderr=out)


async def test_sigterm_with_transfers_under_way_in_workers(tmp_path, sink):
    """``postlane serve`` with 2 workers, SIGTERM while clients are mid-transaction: a client
    idle in a transaction gets 421, a message mid-DATA is finished, committed and answered 250;
    the node exits 0, leaves no worker behind, and everything acknowledged is in the audit
    trail (``postlane audit verify`` clean)."""
    path = tmp_path / "node.toml"
    port = _free_port()
    path.write_text(_with_workers(config_text(tmp_path, sink.port, listener_port=port)))
    proc = await _serve(path, tmp_path / "node.log")
    try:
        await _listening(port, proc.pid)
        sessions = await _on_every_worker(port, 6)
        for raw in sessions:
            assert (await raw.cmd("MAIL FROM:<s@insurer.test>")).startswith("250")
            assert (await raw.cmd("RCPT TO:<x@example.com>")).startswith("250")
        mid_data = sessions[:3]
        for i, raw in enumerate(mid_data):
            assert (await raw.cmd("DATA")).startswith("354")
            raw.send(f"Subject: mid-{i}\r\nX-Class: marketing\r\n\r\nhalf".encode())
            await raw.writer.drain()
        workers = _workers_of(proc.pid)
        proc.send_signal(signal.SIGTERM)
        for raw in sessions[3:]:  # idle in a transaction: 421 once its worker drains

            async def refused(raw: RawSMTP = raw) -> bool:
                reply = await raw.cmd("RCPT TO:<y@example.com>")
                assert reply[:3] in ("250", "421"), reply
                return reply.startswith("421 4.3.2")

            await until(refused, timeout=30, what="421 from a draining worker")
        for raw in mid_data:
            raw.send(b" and the rest\r\n.\r\n")
            assert (await raw.reply()).startswith("250"), "a transfer under way is finished"
        for raw in sessions:
            await raw.close()
        assert await asyncio.wait_for(proc.wait(), 60) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert not [p for p in workers if Path(f"/proc/{p}").exists()], "no worker left behind"
    log = (tmp_path / "node.log").read_text()
    assert "Traceback" not in log, log
    code, out, err = await run_cli("audit", "verify", "-c", str(path))
    assert code == 0, out + err
    assert sum(1 for r in records(tmp_path) if r["type"] == "r") == 3
    await sink.wait_for(3)  # delivered during the drain


async def test_a_port_in_use_with_workers_is_one_clear_error_and_no_orphan(tmp_path, sink):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        path = tmp_path / "node.toml"
        path.write_text(_with_workers(config_text(tmp_path, sink.port, listener_port=port)))
        proc = await asyncio.create_subprocess_exec(
            POSTLANE, "serve", "-c", str(path), stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(proc.communicate(), 60)
    text = err.decode()
    assert proc.returncode == 1, text
    assert "Traceback" not in text
    assert text.count("cannot listen on") == 1, text
    assert (f"listener 'in' (listeners.in in the config) cannot listen on 127.0.0.1:{port}:"
            f" Address already in use") in text
    assert not _workers_of(proc.pid)


async def test_a_worker_killed_right_after_each_250_loses_nothing(tmp_path, sink, make_node,
                                                                  caplog):
    """SIGKILL of the worker that just said 250: the message is committed (delivered, one "r"
    record each, ``audit verify`` clean), the worker is started again, logged once a kill."""
    text = _with_workers(config_text(tmp_path, sink.port))
    (tmp_path / "node.toml").write_text(text)
    node = await make_node(text)
    await _ready(node)
    port = node.listeners[0].port
    for i in range(4):
        raw = await session(port)
        assert (await raw.cmd("MAIL FROM:<s@insurer.test>")).startswith("250")
        assert (await raw.cmd(f"RCPT TO:<k{i}@example.com>")).startswith("250")
        assert (await raw.cmd("DATA")).startswith("354")
        reply = await raw.cmd(f"Subject: k{i}\r\nX-Class: marketing\r\n\r\nbody\r\n.".encode()
                              + b"\r\n")
        assert reply.startswith("250"), reply
        before = node.workers.restarts
        for pid in node.workers.pids():  # the one that answered is among them
            os.kill(pid, signal.SIGKILL)
        await raw.close()
        await until(lambda b=before: node.workers.restarts == b + 2 and len(
            node.workers.pids()) == 2 and all(c.ready.done() for c in
                                              node.workers.channels.values()),
                    timeout=30, what="both workers started again")
    await sink.wait_for(4)
    await node.stop()
    assert sorted(r["rcpt"] for r in records(tmp_path) if r["type"] == "r") == [
        f"k{i}@example.com" for i in range(4)]
    code, out, err = await run_cli("audit", "verify", "-c", str(tmp_path / "node.toml"))
    assert code == 0, out + err
    told = [r for r in caplog.records if "starting it again" in r.getMessage()]
    assert len(told) == 8, [r.getMessage() for r in told]


async def test_workers_sign_and_classify_as_one_process_does(tmp_path, sink, make_node,
                                                            keys):  # noqa: F811
    """The same message through ``workers = 1`` and ``workers = 2``: the same header fields
    added (DKIM-Signature with the same tags, Message-ID, Date, Received...), the same record
    fields and values but for times and ids."""
    from tests.test_dkim import key_entry

    dkim = "[dkim]\n" + key_entry(tmp_path, keys, "insurer.test", "r1")
    data = message("same", cls="policy-documents")
    seen = []
    for workers in (1, 2):
        home = tmp_path / f"w{workers}"
        home.mkdir()
        text = config_text(home, sink.port, dkim)
        node = await make_node(_with_workers(text) if workers > 1 else text)
        await send(node.listeners[0].port, "s@insurer.test", ["a@example.com"], data)
        arrival = (await sink.wait_for(workers))[-1]
        await node.stop()
        parsed = email.message_from_bytes(arrival.data, policy=email.policy.default)
        sig = {k: v for k, v in (t.strip().split("=", 1)
                                 for t in str(parsed["DKIM-Signature"]).split(";") if "=" in t)}
        [rec] = [r for r in records(home) if r["type"] == "r"]
        seen.append((list(parsed), sorted(sig),
                     (sig["d"], sig["s"], sig["a"], sig["h"]),
                     {k: v for k, v in rec.items() if not _varies(k)}, sorted(rec)))
    assert seen[0] == seen[1]


def _varies(field: str) -> bool:
    """Record fields that differ from one run to the next (times, ids, the node's paths)."""
    return any(w in field.lower() for w in ("time", "queueid", "msgid", "message-id", "jobid",
                                            "env", "size", "id"))


async def test_sighup_reaches_every_worker_before_the_reload_is_reported(tmp_path):
    """``postlane serve`` with 2 workers and no periodic certificate check: a renewed
    certificate and a new DKIM key, SIGHUP; once systemd hears ``reloaded`` every worker serves
    the new certificate and signs with the new key (docs/operations.md, *Reload*)."""
    from tests.test_service import POSTLANE as SERVE
    from tests.test_service import NotifySocket, _submit, runner

    relay = await Sink().start()
    try:
        result = runner.invoke(app, [
            "init", str(tmp_path / "node"), "--hostname", "mta.example", "--domain",
            "insurer.example", "--listen", "127.0.0.1:0", "--inbound", "127.0.0.1:0", "--api",
            "127.0.0.1:0", "--smarthost", f"127.0.0.1:{relay.port}"])
        assert result.exit_code == 0, result.output
        config = tmp_path / "node" / "postlane.toml"
        text = _with_workers(config.read_text()).replace("[tls]\n",
                                                         '[tls]\nreload_interval = "1h"\n', 1)
        config.write_text(text)
        notify = NotifySocket(tmp_path / "notify")
        log_path = tmp_path / "serve.log"
        with log_path.open("wb") as log_file:
            proc = subprocess.Popen([str(SERVE), "serve", "-c", str(config)],
                                    env={**os.environ, "NOTIFY_SOCKET": str(tmp_path / "notify")},
                                    stderr=log_file, stdout=subprocess.DEVNULL)
        try:
            await notify.wait("READY=1", timeout=60)
            line = next(ln for ln in log_path.read_text().splitlines() if '"listening"' in ln)
            port = json.loads(line[line.index("{"):])["listeners"]["submission"]
            before: list[bytes] = []
            await asyncio.to_thread(_submit, port, 0, before)
            key = tmp_path / "node" / "keys" / "insurer.example.next.pem"
            write_key(key, generate_key("rsa-sha256"))
            cert, pem = selfsigned("mta-renewed.example", 30)
            (tmp_path / "node" / "tls" / "cert.pem").write_bytes(cert)
            (tmp_path / "node" / "tls" / "key.pem").write_bytes(pem)
            config.write_text(text + '\n[[dkim.keys]]\ndomain = "insurer.example"\n'
                                     'selector = "next"\nkey_file = '
                                     '"keys/insurer.example.next.pem"\nnot_before = 2020-01-01\n')
            mark = len(notify.messages)
            proc.send_signal(signal.SIGHUP)
            await notify.wait("STATUS=reloaded", mark)
            after: list[bytes] = []
            await asyncio.gather(*(asyncio.to_thread(_submit, port, n, after)
                                   for n in range(1, 9)))
            assert before[0] not in after, "every worker serves the renewed certificate"
            arrivals = await relay.wait_for(9, timeout=30)
            selectors = [a.data.split(b" s=", 1)[1].split(b";", 1)[0] for a in arrivals[1:]]
            assert set(selectors) == {b"next"}, selectors
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)
            notify.close()
        assert proc.returncode == 0
    finally:
        await relay.stop()


async def test_strangers_filling_the_slots_get_the_stress_timeout_in_workers(
        tmp_path, sink, make_node):
    """Once strangers hold 80 % of a listener's ``max_connections`` (counted node-wide), their
    idle connections get ``stress_timeout`` on every worker, as in one process."""
    from tests.test_security_limits import limited

    node = await make_node(_with_workers(limited(
        tmp_path, sink.port, 'max_connections = 5\npregreet_wait = 0\nstress_timeout = "1s"',
        relay_from='["127.0.0.1/32"]')))
    await _ready(node)
    port = node.listeners[0].port
    idle = [await RawSMTP.connect(port, source=f"127.0.0.{2 + i}") for i in range(5)]
    for raw in idle:
        assert (await raw.reply()).startswith("220")
    assert node.listeners[0].handler.guard.connections.stressed
    for raw in idle:  # command_timeout is 300 s: only the stress timeout cuts them
        assert (await raw.reply(timeout=30)).startswith("421 4.4.2 Idle too long")
        assert await raw.closed()
    await until(lambda: not node.listeners[0].handler.guard.connections.stressed,
                what="the stress over")
    late = await RawSMTP.connect(port, source="127.0.0.8")
    assert (await late.reply()).startswith("220")
    await late.close()


async def test_refusals_of_a_degraded_state_in_workers_are_the_nodes(tmp_path, small_fs, sink,
                                                                      make_node):
    """Low disk: the 452s the workers answer are counted in the node's degraded state
    (``status`` ``degraded``, ``postlane_degraded_events_total``), as in one process."""
    from tests.test_metrics_exposition import _metrics

    acct = small_fs("acct", "8m")
    node = await make_node(_with_workers(config_text(
        tmp_path, sink.port, '[security]\nmin_free_space = "4MB"\n')))
    await _ready(node)
    port = node.listeners[0].port
    acct.fill()
    node.intake.disk.recheck()
    await until(lambda: "disk" in node.health.active, what="low disk noticed")

    def mail() -> int:
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
            client.ehlo("client.test")
            return client.mail("s@insurer.test")[0]

    async def refused() -> bool:
        return await asyncio.to_thread(mail) == 452

    await until(refused, what="the workers refuse too")  # their own check, each second
    for _ in range(3):
        assert await asyncio.to_thread(mail) == 452
    counted = node.health.active["disk"].count
    assert counted >= 4, node.health.states()
    text = await _metrics(node, tmp_path)
    assert f'postlane_degraded_events_total{{state="disk"}} {float(counted)}' in text
    acct.free()


async def test_kill_9_of_the_main_process_leaves_no_worker(tmp_path, sink):
    """Workers die with their main process (``PR_SET_PDEATHSIG``), so nothing is acknowledged
    that the main process did not commit, and a restart finds the port free."""
    port = _free_port()
    path = tmp_path / "node.toml"
    path.write_text(_with_workers(config_text(tmp_path, sink.port, listener_port=port)))
    proc = await _serve(path, tmp_path / "node.log")
    try:
        await _listening(port, proc.pid)
        raw = await session(port)  # a worker answers
        assert (await raw.cmd("MAIL FROM:<s@insurer.test>")).startswith("250")
        workers = _workers_of(proc.pid)
    finally:
        proc.kill()
        await proc.wait()
    await until(lambda: not [p for p in workers if Path(f"/proc/{p}").exists()],
                what="the workers gone with their main process")
    assert await raw.closed()
    await raw.close()
    again = await _serve(path, tmp_path / "node.log")
    try:
        await _listening(port, again.pid)
        await send(port, "s@insurer.test", ["after@example.com"], message("after"))
        await sink.wait_for(1)
    finally:
        again.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(again.wait(), 60) == 0


async def test_implicit_tls_and_auth_through_the_workers(
        tmp_path, sink, make_node, tls_files, users_file):  # noqa: F811
    node = await make_node(_with_workers(secure_config(tmp_path, sink.port, tls_files,
                                                       users_file, tls="implicit",
                                                       relay_from="[]")))
    await _ready(node)
    port = node.listeners[1].port
    await asyncio.gather(*(submit(port, tls="implicit", user="alice") for _ in range(4)))
    await sink.wait_for(4)
    await node.stop()
    assert [r["authUser"] for r in records(tmp_path) if r["type"] == "r"] == ["alice"] * 4
