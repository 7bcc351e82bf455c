"""Running under systemd: the unit passes systemd-analyze, the node says READY/WATCHDOG/
RELOADING/STOPPING over $NOTIFY_SOCKET, logs with journald priorities, and a SIGHUP reloads
routes, DKIM keys and the TLS certificate while mail flows (a broken file changes nothing)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import smtplib
import socket
import ssl
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from typer.testing import CliRunner

from postlane.admin.service import Notifier, reload
from postlane.cli import app
from postlane.cli.edge import selfsigned
from postlane.harness.sink import Sink
from postlane.node import Node
from postlane.policy.dkim import generate_key, write_key
from postlane.startup import load_config
from tests.support.waiting import until

REPO = Path(__file__).resolve().parents[1]
POSTLANE = Path(sys.executable).parent / "postlane"
runner = CliRunner()


@pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                    reason="systemd-analyze is not installed (Debian package systemd)")
def test_the_unit_passes_systemd_analyze_verify(tmp_path):
    text = (REPO / "deploy" / "systemd" / "postlane.service").read_text()
    for line in ("Type=notify", "ProtectSystem=strict", "NoNewPrivileges=yes",
                 "CapabilityBoundingSet=CAP_NET_BIND_SERVICE", "ReadWritePaths=/var/lib/postlane",
                 "ExecReload=/bin/kill -HUP $MAINPID", "User=postlane",
                 "RestartPreventExitStatus=2"):
        assert line in text.splitlines(), line
    assert any(line.startswith("WatchdogSec=") for line in text.splitlines())
    unit = tmp_path / "postlane.service"  # ExecStart pointed at this venv's command
    unit.write_text(text.replace("/usr/local/bin/postlane", str(POSTLANE)))
    done = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0 and not done.stderr.strip(), done.stderr


def test_accounting_archive_compresses_only_closed_files(tmp_path):
    acct = tmp_path / "accounting"
    acct.mkdir()
    for name in ("acct-20261101-000000.csv", "acct-20261102-000000.csv", "alerts.jsonl"):
        (acct / name).write_text("type\n")
    (acct / "acct.position.json").write_text(json.dumps(
        {"files": {"csv": [str(acct / "acct-20261102-000000.csv"), 5]}, "feed": {},
         "closed": {str(acct / "acct-20261101-000000.csv"): 5}}))  # closed for good
    subprocess.run(["sh", str(REPO / "deploy" / "accounting-archive.sh"), str(acct), "400"],
                   check=True, timeout=30)
    assert sorted(p.name for p in acct.iterdir()) == [
        "acct-20261101-000000.csv.gz", "acct-20261102-000000.csv", "acct.position.json",
        "alerts.jsonl"]
    (acct / "acct-20261103-000000.csv").write_text("type\n")
    (acct / "acct.position.json").write_text("{not json")  # cannot tell what is open: stop
    done = subprocess.run(["sh", str(REPO / "deploy" / "accounting-archive.sh"), str(acct),
                           "400"], capture_output=True, timeout=30)
    assert done.returncode != 0 and (acct / "acct-20261103-000000.csv").exists()


def test_accounting_archive_leaves_a_file_the_node_just_started(tmp_path):
    """A rotation (or a start) makes the new files first and names them in the position a
    moment later. The script read the position, then listed the files: a new file made in
    between was named nowhere, so it was gzipped and unlinked while the node wrote on into it
    (the node then logs the file gone and starts others; lines it synced between gzip's read
    and the unlink were in neither). Only files older than every file the position names as
    being written are compressed."""
    acct = tmp_path / "accounting"
    acct.mkdir()
    names = ("acct-20261101-000000.csv", "acct-20261101-000000.jsonl",
             "acct-20261102-000000.csv", "acct-20261102-000000.jsonl",
             "acct-20261102-000000-1.csv", "acct-20261102-000000-1.jsonl")
    for name in names:
        (acct / name).write_text("type\n")
    (acct / "acct.position.json").write_text(json.dumps(  # still the files before the rotation
        {"files": {"csv": [str(acct / names[2]), 5], "jsonl": [str(acct / names[3]), 0]},
         "feed": {}, "closed": {}}))
    subprocess.run(["sh", str(REPO / "deploy" / "accounting-archive.sh"), str(acct), "400"],
                   check=True, timeout=30)
    assert sorted(p.name for p in acct.iterdir()) == sorted(
        [f"{n}.gz" for n in names[:2]] + list(names[2:]) + ["acct.position.json"])


class NotifySocket:
    """What a service manager hears on $NOTIFY_SOCKET."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.messages: list[str] = []
        self._stop = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop:
            with contextlib.suppress(TimeoutError):
                self.messages.append(self.sock.recv(4096).decode())

    async def wait(self, text: str, after: int = 0, timeout: float = 30) -> int:
        """Index of the first message from ``after`` on that contains ``text``."""

        def found() -> int | None:
            return next((i for i, msg in enumerate(self.messages[after:], after) if text in msg),
                        None)

        await until(lambda: found() is not None, timeout=timeout,
                    what=f"{text!r} on the notify socket (after message {after})")
        index = found()
        assert index is not None
        return index

    def close(self) -> None:
        self._stop = True
        self._thread.join(timeout=5)
        self.sock.close()


def test_notifier_speaks_to_an_abstract_socket_and_stays_quiet_without_one():
    name = f"postlane-test-{os.getpid()}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    sock.settimeout(5)
    try:
        Notifier({"NOTIFY_SOCKET": "@" + name}).ready("up")
        assert sock.recv(100) == b"READY=1\nSTATUS=up"
    finally:
        sock.close()
    Notifier({}).ready("nobody listens")  # no socket: nothing happens
    assert Notifier({"WATCHDOG_USEC": "30000000"}).watchdog_interval == 15.0
    assert Notifier({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}).watchdog_interval is None


def _submit(port: int, n: int, cert_holder: list | None = None) -> None:
    msg = (f"From: notices@insurer.example\r\nTo: c{n}@example.com\r\nSubject: n{n}\r\n"
           f"X-Postlane-Class: policy-documents\r\n\r\nDear customer\r\n").encode()
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        client.starttls(context=ssl._create_unverified_context())
        if cert_holder is not None:
            cert_holder.append(client.sock.getpeercert(binary_form=True))
        client.sendmail("notices@insurer.example", [f"c{n}@example.com"], msg)


async def test_serve_notifies_systemd_logs_for_journald_and_reloads_on_sighup(tmp_path):
    first, second = await Sink().start(), await Sink().start()
    result = runner.invoke(app, [
        "init", str(tmp_path / "node"), "--hostname", "mta.example", "--domain",
        "insurer.example", "--listen", "127.0.0.1:0", "--inbound", "127.0.0.1:0", "--api",
        "127.0.0.1:0", "--smarthost", f"127.0.0.1:{first.port}"])
    assert result.exit_code == 0, result.output
    config = tmp_path / "node" / "postlane.toml"
    notify = NotifySocket(tmp_path / "notify")
    log_path = tmp_path / "serve.log"
    log_file = open(log_path, "wb")  # noqa: SIM115 (the child writes it)
    st = os.fstat(log_file.fileno())
    env = {**os.environ, "NOTIFY_SOCKET": str(tmp_path / "notify"), "WATCHDOG_USEC": "400000",
           "JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}
    proc = subprocess.Popen([str(POSTLANE), "serve", "-c", str(config)], env=env,
                            stderr=log_file, stdout=subprocess.DEVNULL)
    try:
        ready = await notify.wait("READY=1")
        await notify.wait("WATCHDOG=1", ready)
        line = next(ln for ln in log_path.read_text().splitlines() if '"listening"' in ln)
        assert line.startswith("<6>{")  # the priority prefix journald reads
        port = json.loads(line[3:])["listeners"]["submission"]
        certs: list[bytes] = []
        await asyncio.to_thread(_submit, port, 0, certs)
        await first.wait_for(1, timeout=30)

        # new routes, a new DKIM key and a renewed certificate, then SIGHUP while mail flows
        key = tmp_path / "node" / "keys" / "insurer.example.next.pem"
        write_key(key, generate_key("rsa-sha256"))
        cert, pem = selfsigned("mta-renewed.example", 30)
        (tmp_path / "node" / "tls" / "cert.pem").write_bytes(cert)
        (tmp_path / "node" / "tls" / "key.pem").write_bytes(pem)
        text = config.read_text().replace(f"127.0.0.1:{first.port}", f"127.0.0.1:{second.port}")
        config.write_text(text + '\n[[dkim.keys]]\ndomain = "insurer.example"\n'
                                 'selector = "next"\nkey_file = "keys/insurer.example.next.pem"'
                                 '\nnot_before = 2020-01-01\n')
        flowing = asyncio.create_task(asyncio.to_thread(
            lambda: [_submit(port, n) for n in range(1, 6)]))
        mark = len(notify.messages)
        proc.send_signal(signal.SIGHUP)
        await notify.wait("RELOADING=1", mark)
        await notify.wait("STATUS=reloaded", mark)
        await flowing  # nothing refused during the reload
        # connections open to the old route finish (relay.idle_timeout)
        await until(lambda: not any(first.concurrent.values()), timeout=30,
                    what="the connections to the old route closed")
        await asyncio.to_thread(_submit, port, 9, certs)
        arrivals = await second.wait_for(1, timeout=30)
        assert certs[0] != certs[1]  # the renewed certificate, no restart
        assert b" s=next;" in arrivals[-1].data.split(b"\r\n\r\n")[0]
        await until(lambda: len(first.arrivals) + len(second.arrivals) >= 7,
                    what="all 7 delivered")
        await asyncio.sleep(0.5)  # a bound: no duplicate comes after them (nothing to wait on)
        assert len(first.arrivals) + len(second.arrivals) == 7  # all delivered, once

        # a broken config changes nothing
        config.write_text(text + "\n[node\n")
        mark = len(notify.messages)
        proc.send_signal(signal.SIGHUP)
        await notify.wait("reload refused", mark)
        expected = len(second.arrivals) + 1
        await asyncio.to_thread(_submit, port, 10)
        await second.wait_for(expected, timeout=30)
        assert "reload refused" in log_path.read_text()

        mark = len(notify.messages)
        proc.send_signal(signal.SIGTERM)
        await notify.wait("STOPPING=1", mark)
        assert await asyncio.to_thread(proc.wait, 60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        log_file.close()
        notify.close()
        await first.stop()
        await second.stop()


async def test_reload_names_what_waits_for_a_restart_and_applies_class_settings(
        tmp_path, sink, caplog):
    result = runner.invoke(app, [
        "init", str(tmp_path / "node"), "--hostname", "mta.example", "--domain",
        "insurer.example", "--listen", "127.0.0.1:0", "--inbound", "127.0.0.1:0", "--api",
        "127.0.0.1:0", "--smarthost", f"127.0.0.1:{sink.port}"])
    assert result.exit_code == 0
    config = tmp_path / "node" / "postlane.toml"
    node = Node(load_config(config))
    await node.start()
    try:
        text = config.read_text()
        config.write_text(text.replace('sla = "30m"', 'sla = "20m"')
                          .replace('drain_timeout = "30s"', 'drain_timeout = "40s"'))
        assert await reload(node, config, Notifier({}))
        assert node.config.classes["claims"].sla == 1200
        assert node.config.node.drain_timeout == 30  # waits for a restart, and says so
        assert "node changed; those take effect at the next restart" in caplog.text
    finally:
        await node.stop()


async def test_sigterm_to_the_whole_unit_drains_like_sigterm_to_the_node(tmp_path):
    """systemd's default KillMode=control-group (and `timeout`, `kill -- -PGID`) sends SIGTERM to
    every process of the node at once. The recorder and the DKIM signers died of it mid-drain
    ('recorder process ended (exit -15); starting another'); like the intake workers, they now
    leave their ending to the node, which drains first."""
    sink = await Sink().start()
    result = runner.invoke(app, [
        "init", str(tmp_path / "node"), "--hostname", "mta.example", "--domain",
        "insurer.example", "--listen", "127.0.0.1:0", "--inbound", "127.0.0.1:0", "--api",
        "127.0.0.1:0", "--smarthost", f"127.0.0.1:{sink.port}"])
    assert result.exit_code == 0, result.output
    log_path = tmp_path / "serve.log"
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen([str(POSTLANE), "serve", "-c", str(tmp_path / "node" /
                                                                   "postlane.toml")],
                                stderr=log_file, stdout=subprocess.DEVNULL,
                                start_new_session=True)
    try:
        await until(lambda: '"listening"' in log_path.read_text(), timeout=60,
                    what="the node listening")
        line = next(ln for ln in log_path.read_text().splitlines() if '"listening"' in ln)
        port = json.loads(line)["listeners"]["submission"]
        await asyncio.to_thread(_submit, port, 0)
        await sink.wait_for(1, timeout=30)
        os.killpg(proc.pid, signal.SIGTERM)
        code = await asyncio.to_thread(proc.wait, 60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        await sink.stop()
    log = log_path.read_text()
    assert code == 0, log
    assert '"level": "ERROR"' not in log, log
    assert '"stopped"' in log


async def test_a_drain_that_runs_out_of_time_says_what_it_cut_off(tmp_path, make_node, caplog):
    """Deliveries still on the wire when ``drain_timeout`` runs out are cut off and delivered
    again at the next start: the log says so (the node logged `stopped` as after a drain that
    finished, and the operator learned of it only from the next start's `outcome unknown`)."""
    from tests.conftest import config_text, message, send
    from tests.support.heldsink import HeldSink

    sink = await HeldSink().start()
    try:
        node = await make_node(config_text(tmp_path, sink.port).replace(
            "drain_timeout = 5", "drain_timeout = 1"))
        for n in range(2):
            await send(node.listeners[0].port, "s@insurer.test", [f"r{n}@example.com"],
                       message(f"m{n}"))
        await sink.on_the_wire(2)
        with caplog.at_level("WARNING", logger="postlane.scheduler"):
            await node.stop()
    finally:
        sink.release.set()
        await sink.stop()
    said = [r.getMessage() for r in caplog.records if "drain_timeout" in r.getMessage()]
    assert said and "2 recipient(s)" in said[0] and "next start" in said[0], caplog.text
