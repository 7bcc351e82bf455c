"""`postlane bench` through its real entry point: the JSON line, pools respected, nothing lost."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


def _bench(*args: str) -> dict:
    out = subprocess.run([sys.executable, "-m", "postlane.cli", "bench", "--json", *args],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_bench_lanes_keep_each_class_on_its_pool():
    # 100/s: the three transactional classes (sent in turn) all start within the campaign,
    # however fast the node takes its 400 messages
    result = _bench("--marketing", "400", "--transactional-rate", "100", "--message-kb", "2")
    assert result["lost"] == 0 and result["marketing"] == 400 and result["refused_at_intake"] == 0
    assert set(result["latency_s"]) == {"policy-documents", "claims", "payment-receipts",
                                        "marketing"}
    for figures in result["latency_s"].values():
        assert figures["p50"] <= figures["p95"] <= figures["p99"] <= figures["max"]
    sources = result["sources"]
    assert set(sources["policy-documents"]) <= {"127.0.0.10", "127.0.0.11"}
    assert set(sources["claims"]) <= {"127.0.0.12", "127.0.0.13"}
    assert set(sources["payment-receipts"]) <= {"127.0.0.14", "127.0.0.15"}
    assert set(sources["marketing"]) <= {"127.0.0.16", "127.0.0.17", "127.0.0.18", "127.0.0.19"}
    for key in ("throughput_msgs_s", "intake_msgs_s", "rss_mb_peak"):
        assert result[key] > 0


def test_bench_plain_clients_reconnect_without_pipelining():
    # the plain-client shape of issue 17: no PIPELINING either side, reconnects, one domain
    result = _bench("--marketing", "120", "--transactional-rate", "20", "--no-pipelining",
                    "--reconnect-every", "10", "--domains", "1", "--message-kb", "2.5",
                    "--connections", "4", "--sink-no-pipelining")
    assert result["lost"] == 0 and result["marketing"] == 120
    assert result["client"] == {"pipelining": False, "reconnect_every": 10, "connections": 4,
                                "domains": 1}
    assert result["sink_pipelining"] is False and result["message_kb"] == 2.5
    assert result["client_connects"] >= 120 // 10  # each connection QUIT after 10 messages
    assert result["node_processes"] >= 1
    assert result["node_cpu_s_all"] >= result["node_cpu_s"] > 0
    assert result["rss_mb_all_max"] > 0


@pytest.mark.parametrize("seed", [False, True])
def test_bench_queued_behind_a_paused_pool(seed):
    result = _bench("--queued-behind", "300", "--transactional-rate", "20",
                    "--transactional-seconds", "2", "--message-kb", "1", "--domains", "3",
                    *(["--seed-queue"] if seed else []))
    behind = result["queued_behind"]
    assert behind["accepted"] == 300 and behind["node_queued"] == 300
    assert behind["via"] == ("spool" if seed else "smtp")
    assert result["lost"] == 0 and result["marketing"] == 0 and result["transactional"] > 0
    assert "marketing" not in result["latency_s"]  # the campaign waits behind its pause
    for key in ("metrics", "status", "metrics_after", "status_after"):
        assert 0 < behind[key]["p50_ms"] <= behind[key]["max_ms"]
    assert behind["rss_mb_all_queued"] > 0


def test_bench_fifo_baseline_shares_one_queue_and_signs():
    result = _bench("--marketing", "100", "--transactional-rate", "5", "--baseline", "fifo",
                    "--message-kb", "2", "--dkim", "ed25519")
    assert result["lost"] == 0 and result["baseline"] == "fifo" and result["dkim"] == "ed25519"
    used = {ip for ips in result["sources"].values() for ip in ips}
    assert set(result["sources"]["policy-documents"]) <= used


@pytest.mark.parametrize("args", [["--baseline", "lifo"], ["--marketing", "-1"], ["--dkim", "dsa"],
                                  ["--message-kb", "0"], ["--nodes", "2"], ["--domains", "0"],
                                  ["--marketing", "10", "--queued-behind", "10"],
                                  ["--spool", "postgresql://x@127.0.0.1/x", "--nodes", "0"]])
def test_bench_refuses_bad_arguments(args):
    out = subprocess.run([sys.executable, "-m", "postlane.cli", "bench", *args],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "Invalid value" in out.stderr


def test_bench_on_postgresql_leaves_no_schema_behind():
    import asyncio

    import asyncpg

    from tests.support.pg import PG_DSN, pg_reachable

    if not pg_reachable():
        pytest.skip("PostgreSQL is not reachable on 127.0.0.1:5432 (make test starts it)")
    result = _bench("--marketing", "100", "--transactional-rate", "5", "--message-kb", "2",
                    "--spool", PG_DSN)
    assert result["lost"] == 0 and result["spool"] == "postgresql"

    async def bench_schemas() -> list:
        conn = await asyncpg.connect(PG_DSN)
        try:
            return await conn.fetch("SELECT nspname FROM pg_namespace WHERE nspname LIKE"
                                    " 'bench\\_%'")
        finally:
            await conn.close()

    assert asyncio.run(bench_schemas()) == []


def test_bench_two_nodes_on_postgresql_share_the_load():
    from tests.support.pg import PG_DSN, pg_reachable

    if not pg_reachable():
        pytest.skip("PostgreSQL is not reachable on 127.0.0.1:5432 (make test starts it)")
    result = _bench("--marketing", "200", "--transactional-rate", "5", "--message-kb", "2",
                    "--spool", PG_DSN, "--nodes", "2")
    assert result["lost"] == 0 and result["duplicates"] == 0 and result["marketing"] == 200
    assert result["nodes"] == 2 and result["spool"] == "postgresql"
    per_node = result["per_node"]
    assert set(per_node) == {"bench-1", "bench-2"}, per_node
    assert all(node["delivered"] > 0 for node in per_node.values()), per_node
    assert sum(node["delivered"] for node in per_node.values()) == \
        result["marketing"] + result["transactional"]
    # each node sends from its own copy of the pools: node 2's IPs are node 1's + 20
    marketing = set(result["sources"]["marketing"])
    assert marketing <= {f"127.0.0.{i}" for i in (16, 17, 18, 19, 36, 37, 38, 39)}
    assert marketing & {"127.0.0.16", "127.0.0.17", "127.0.0.18", "127.0.0.19"}
    assert marketing & {"127.0.0.36", "127.0.0.37", "127.0.0.38", "127.0.0.39"}
