"""Installed like a real package: the wheel in a fresh venv outside the clone carries its data
files (destination and bounce rules, the case study, the dashboard, the systemd unit and the
other files docs/operations.md has an operator copy), and `postlane init` + `postlane serve`
deliver a message from there. The sdist carries the docs and deploy files and builds the same
wheel."""

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
import tarfile
import urllib.request
import zipfile
from pathlib import Path

import pytest

from postlane.harness.sink import Sink
from tests.support.waiting import until

REPO = Path(__file__).resolve().parents[1]
# what docs/operations.md has an operator copy from the installed package, and where it lives
# in the clone
DEPLOY = {"data/deploy/postlane.service": "deploy/systemd/postlane.service",
          "data/deploy/postlane.logrotate": "deploy/logrotate/postlane",
          "data/deploy/accounting-archive.sh": "deploy/accounting-archive.sh",
          # the Grafana dashboard docs/monitoring.md has an operator import (it was in the
          # sdist's docs/ only: a wheel's operator had none)
          "data/grafana-dashboard.json": "docs/grafana-dashboard.json"}


def _run(*args: str | Path, cwd: Path, timeout: float = 300) -> str:
    done = subprocess.run([str(a) for a in args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def _source(tmp_path: Path, *extra: str) -> Path:
    """A copy of what the Dockerfile copies (and `extra`), to build away from the clone."""
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "MANIFEST.in", *extra):
        shutil.copy2(REPO / name, source / name)
    for name in ("src", "examples", "deploy"):
        shutil.copytree(REPO / name, source / name, symlinks=True,
                        ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    return source


def _data_files(wheel: Path) -> dict[str, bytes]:
    """Every file of the wheel's package that is not Python source, by name."""
    with zipfile.ZipFile(wheel) as z:
        return {n: z.read(n) for n in z.namelist()
                if n.startswith("postlane/") and not n.endswith(".py")}


async def test_the_wheel_installs_outside_the_clone_and_delivers(tmp_path):
    source = _source(tmp_path)
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
import importlib.resources as r, json, postlane, sys
d = r.files("postlane")
print(json.dumps({"pkg": postlane.__file__, "files": [str(d / n) for n in (
    "data/destinations.toml", "data/bounce-rules.toml", "data/insurance.toml",
    "api/dashboard.html", *sys.argv[1:])]}))""", *DEPLOY, cwd=home)
    found = json.loads(where)
    assert found["pkg"].startswith(str(venv))
    for path in found["files"]:
        assert Path(path).is_file() and not Path(path).is_symlink(), path
    for path, (name, origin) in zip(found["files"][-len(DEPLOY):], DEPLOY.items(), strict=True):
        assert path.endswith(name) and Path(path).read_bytes() == (REPO / origin).read_bytes()
    if shutil.which("systemd-analyze"):  # the unit as an operator copies it from the venv
        unit = tmp_path / "postlane.service"
        unit.write_text(Path(found["files"][-len(DEPLOY)]).read_text().replace(
            "/usr/local/bin/postlane", str(postlane)))
        done = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True,
                              text=True, timeout=60)
        assert done.returncode == 0 and not done.stderr.strip(), done.stderr

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



@pytest.mark.timeout(300)
def test_the_sdist_carries_docs_and_deploy_files_and_builds_the_same_wheel(tmp_path):
    source = _source(tmp_path, "Dockerfile", "compose.yaml", "Makefile")
    shutil.copytree(REPO / "docs", source / "docs")
    dist = tmp_path / "dist"
    _run(sys.executable, "-c", "import sys; from setuptools import build_meta as b; "
         "b.build_sdist(sys.argv[1])", dist, cwd=source)
    sdist = next(dist.glob("postlane-*.tar.gz"))
    with tarfile.open(sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
        tar.extractall(tmp_path / "unpacked", filter="data")
    for name in ("docs/operations.md", "deploy/systemd/postlane.service",
                 "deploy/logrotate/postlane", "deploy/accounting-archive.sh",
                 "examples/insurance.toml", "Dockerfile", "compose.yaml"):
        assert name in names, name
    built = {}
    for name, src in (("clone", source), ("sdist", next((tmp_path / "unpacked").iterdir()))):
        out = tmp_path / f"wheel-{name}"
        _run(sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", out, src,
             cwd=tmp_path)
        built[name] = _data_files(next(out.glob("postlane-*.whl")))
    assert built["sdist"] == built["clone"]
    assert {f"postlane/{n}" for n in DEPLOY} <= set(built["sdist"])
