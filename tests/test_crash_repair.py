"""Crashes the attempt journal and the killtest do not cover: a node SIGKILLed, then its files
torn as by a power loss, started again with ``postlane serve``; what it repairs and says."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
from pathlib import Path

from postlane.harness.sink import Sink
from postlane.spool.hold import locked
from tests.conftest import config_text, message, records, send
from tests.support.waiting import until
from tests.test_evidence import _free_port, _serve, cli


def _events(tmp_path: Path) -> int:
    db = sqlite3.connect(tmp_path / "spool" / "spool.sqlite")
    try:
        return db.execute("SELECT count(*) FROM events").fetchone()[0]
    finally:
        db.close()


async def test_a_torn_accounting_line_is_cut_and_its_record_written_again(tmp_path):
    """The node is SIGKILLed with every record synced (the spool has let the events go); the
    last bytes of both accounting files are then lost. The restart cuts the torn line, says
    so, and writes the lost record again from the audit store: every record once, no torn
    line."""
    sink = await Sink().start()
    port = _free_port()
    cfg = tmp_path / "node.toml"
    cfg.write_text(config_text(tmp_path, sink.port, listener_port=port))
    log = tmp_path / "node.log"
    proc = await _serve(cfg, port, log)
    try:
        for i in range(3):
            await send(port, "s@insurer.test", [f"t{i}@example.com"], message(f"m{i}"))
        await sink.wait_for(3)
        await until(lambda: _events(tmp_path) == 0, what="the events consumed and trimmed")
        position = json.loads((tmp_path / "acct" / "acct.position.json").read_text())
        assert position["feed"] and all(n == 6 for n in position["feed"].values())
        proc.send_signal(signal.SIGKILL)
        await asyncio.to_thread(proc.wait)
        # its recorder sees the node gone, writes its position and ends (its lock goes)
        await until(lambda: not locked(tmp_path / "acct"), what="the recorder ended")
        for name, _ in position["files"].values():  # a power loss takes the synced tail
            os.truncate(name, os.path.getsize(name) - 7)
        proc = await _serve(cfg, port, log)
        await until(lambda: "written again from the audit store" in log.read_text(),
                    what="the lost record written again")
    finally:
        proc.send_signal(signal.SIGTERM)
        await asyncio.to_thread(proc.wait, 60)
        await sink.stop()
    text = log.read_text()
    assert "accounting files shorter than at their last sync" in text
    rows = records(tmp_path)
    assert sorted((r["type"], r["rcpt"]) for r in rows) == sorted(
        (t, f"t{i}@example.com") for i in range(3) for t in "rd")
    assert all(r["queueId"] and r["timeLogged"] for r in rows)
    for path in (tmp_path / "acct").glob("acct-*.jsonl"):
        for line in path.read_text().splitlines():
            json.loads(line)
    res = await asyncio.to_thread(cli, "verify", "-c", str(cfg))
    assert res.exit_code == 0, res.output
