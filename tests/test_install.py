"""Installed like a real package: the wheel in a fresh venv outside the clone carries its data
files (destination and bounce rules, the case study, the dashboard), and `postlane init` +
`postlane serve` deliver a message from there."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import site
import smtplib
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

from postlane.harness.sink import Sink
from tests.support.waiting import until

REPO = Path(__file__).resolve().parents[1]


def _run(*args: str | Path, cwd: Path, timeout: float = 300) -> str:
    done = subprocess.run([str(a) for a in args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


async def test_the_wheel_installs_outside_the_clone_and_delivers(tmp_path):
    source = tmp_path / "source"  # what the Dockerfile copies, built away from the clone
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, source / name)
    for name in ("src", "examples"):
        shutil.copytree(REPO / name, source / name, symlinks=True,
                        ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    wheels = tmp_path / "wheels"
    _run(sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", wheels, source,
         cwd=tmp_path)
    wheel = next(wheels.glob("postlane-*.whl"))
    venv = tmp_path / "venv"
    _run(sys.executable, "-m", "venv", venv, cwd=tmp_path)
    # the dependencies come from this venv's site-packages (as a plain path: its editable
    # finder for the clone's src/ is not loaded); Postlane itself only from the wheel
    target = next((venv / "lib").glob("python3*/site-packages"))
    (target / "deps.pth").write_text(site.getsitepackages()[0] + "\n")
    _run(venv / "bin" / "pip", "install", "-q", "--no-deps", "--no-index", wheel, cwd=tmp_path)
    postlane = venv / "bin" / "postlane"

    home = tmp_path / "elsewhere"
    home.mkdir()
    assert _run(postlane, "--version", cwd=home).startswith("postlane ")
    where = _run(venv / "bin" / "python", "-c", """
import importlib.resources as r, json, postlane
d = r.files("postlane")
print(json.dumps({"pkg": postlane.__file__, "files": [str(d / n) for n in (
    "data/destinations.toml", "data/bounce-rules.toml", "data/insurance.toml",
    "api/dashboard.html")]}))""", cwd=home)
    found = json.loads(where)
    assert found["pkg"].startswith(str(venv))
    for path in found["files"]:
        assert Path(path).is_file() and not Path(path).is_symlink(), path

    sink = await Sink().start()
    with socket.socket() as probe:  # a free port for the API, which `postlane status` reads
        probe.bind(("127.0.0.1", 0))
        api_port = probe.getsockname()[1]
    _run(postlane, "init", "node", "--hostname", "mta.example", "--domain", "insurer.example",
         "--listen", "127.0.0.1:0", "--inbound", "127.0.0.1:0", "--api", f"127.0.0.1:{api_port}",
         "--smarthost", f"127.0.0.1:{sink.port}", cwd=home)
    _run(postlane, "config", "check", "node/postlane.toml", cwd=home)
    log = open(home / "serve.log", "wb")  # noqa: SIM115 (the child writes it)
    proc = subprocess.Popen([str(postlane), "serve", "-c", "node/postlane.toml"], cwd=home,
                            stderr=log, env={**os.environ, "PYTHONPATH": ""})
    try:
        def listening() -> dict | None:
            for line in (home / "serve.log").read_text().splitlines():
                if '"listening"' in line:
                    return json.loads(line)["listeners"]
            return None

        with contextlib.suppress(AssertionError):  # the log says why, below
            await until(lambda: listening() or proc.poll() is not None, timeout=30, step=0.05,
                        what="the node listening (or gone)")
        ports = listening()
        assert ports, (home / "serve.log").read_text()
        msg = (b"From: notices@insurer.example\r\nTo: anna@example.com\r\nSubject: renewal\r\n"
               b"X-Postlane-Class: policy-documents\r\n\r\nDear Anna\r\n")
        with smtplib.SMTP("127.0.0.1", ports["submission"], timeout=30) as client:
            client.sendmail("notices@insurer.example", ["anna@example.com"], msg)
        arrival = (await sink.wait_for(1, timeout=30))[0]
        assert b"DKIM-Signature:" in arrival.data
        status = json.loads(_run(postlane, "status", "-c", "node/postlane.toml", "--json",
                                 cwd=home))
        assert status["status"]["node"] == "postlane-1"
        page = urllib.request.urlopen(  # the dashboard, from the installed package
            f"http://127.0.0.1:{api_port}/", timeout=10).read()
        assert b"<html" in page.lower()
    finally:
        proc.terminate()  # the sink answers the node's QUIT meanwhile: wait in a thread
        assert await asyncio.to_thread(proc.wait, 60) == 0
        log.close()
        await sink.stop()

