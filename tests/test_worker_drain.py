"""An intake worker's drain ends its own signing processes (``Worker.drain``: their exits
awaited in threads, the suppression list's writer joined in a thread - never on the worker's
event loop, which is still answering 421 and finishing transfers)."""

from __future__ import annotations

from pathlib import Path

from tests.conftest import config_text, message, send
from tests.test_dkim import key_entry, keys  # noqa: F401  (fixture)
from tests.test_workers import _ready, _with_workers


def _children(pid: int) -> set[int]:
    out: set[int] = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        out |= {int(c) for c in (task / "children").read_text().split()}
    return out


def _signing(pid: int) -> bool:
    try:
        return b"postlane.policy.signing" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except FileNotFoundError:
        return False


async def test_a_worker_drain_ends_its_signing_processes(tmp_path, sink, make_node, keys):  # noqa: F811
    dkim = "[dkim]\n" + key_entry(tmp_path, keys, "insurer.test", "r1")
    node = await make_node(_with_workers(config_text(tmp_path, sink.port, dkim)))
    await _ready(node)
    assert node.workers is not None
    signers = {c for pid in node.workers.pids() for c in _children(pid) if _signing(c)}
    assert signers, "each worker signs in processes of its own"
    await send(node.listeners[0].port, "s@insurer.test", ["a@example.com"],
               message("signed", cls="policy-documents"))
    await sink.wait_for(1)
    assert b"DKIM-Signature:" in sink.arrivals[0].data
    await node.stop()
    assert not any(Path(f"/proc/{pid}").exists() for pid in signers), "reaped by their worker"
