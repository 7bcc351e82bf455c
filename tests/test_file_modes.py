"""Customer data is readable by the node's user only, whatever the umask (issue 19, defect 6):
a node run over SMTP and the CLI commands that write files, all under umask 0022."""

from __future__ import annotations

import os
import stat

import pytest

from tests.conftest import config_text, message, send
from tests.test_cli_ops import run_cli


@pytest.fixture
def umask_0022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


async def test_spool_lists_stores_exports_and_keys_are_private(tmp_path, sink, make_node,
                                                               umask_0022):
    node = await make_node(config_text(tmp_path, sink.port))
    await send(node.listeners[0].port, "s@insurer.test", ["a@example.com"],
               message("policy", cls="policy-documents"))
    await sink.wait_for(1)
    spool = tmp_path / "spool"
    during = {p.name: _mode(p) for p in spool.iterdir()}  # WAL files exist while it runs
    await node.stop()
    assert _mode(spool) == 0o700
    assert {"spool.sqlite", "spool.sqlite-wal", "suppression.sqlite3", "audit.sqlite",
            "feedback.key"} <= set(during)
    assert {name: mode for name, mode in during.items()
            if mode != (0o700 if (spool / name).is_dir() else 0o600)} == {}
    assert _mode(spool / "tls" / "key.pem") == 0o600  # the generated TLS certificate's key

    evidence = tmp_path / "out" / "evidence"
    code, _, err = await run_cli("audit", "export", "--db", str(spool / "audit.sqlite"),
                                 "--out", str(evidence))
    assert code == 0, err
    assert _mode(evidence) == _mode(evidence.parent) == 0o700
    assert {p.name: _mode(p) for p in evidence.iterdir()} == {
        "records.csv": 0o600, "chain.jsonl": 0o600, "manifest.json": 0o600}

    listing = tmp_path / "suppressions.csv"
    code, _, err = await run_cli("suppress", "export", str(listing), "--db",
                                 str(spool / "suppression.sqlite3"))
    assert code == 0, err
    assert _mode(listing) == 0o600

    key = tmp_path / "keys" / "insurer.example.s1.pem"
    code, _, err = await run_cli("dkim", "keygen", "insurer.example", "--selector", "s1",
                                 "--key-file", str(key))
    assert code == 0, err
    assert (_mode(key.parent), _mode(key)) == (0o700, 0o600)
