"""``postlane audit verify --files``: the accounting files, rotated ones included, say what the
audit store says (a real node writes both; the files are then damaged as a careless log shipper,
a bad restore or an edit would)."""

from __future__ import annotations

import asyncio
import csv
import gzip
import io
import json
import sqlite3
import subprocess
from pathlib import Path

import pytest

from postlane.accounting.records import DEFAULT_FIELDS
from postlane.audit.filecheck import ordered
from tests.conftest import config_text, message, send
from tests.support.pg import pg_schema  # noqa: F401  (fixture)
from tests.support.waiting import until
from tests.test_cluster import cluster_text, start_node
from tests.test_disk_full import NO_FLOOR, fill_accounting
from tests.test_evidence import cli


def node_config(tmp_path: Path, port: int, formats: str = '["csv", "jsonl"]',
                extra: str = "") -> Path:
    """The test config with files rotated every 2 KB (a few records each)."""
    text = config_text(tmp_path, port, extra).replace(
        'formats = ["csv", "jsonl"]', f"formats = {formats}\nrotate_size = 2048")
    cfg = tmp_path / "node.toml"
    cfg.write_text(text)
    return cfg


async def run_node(tmp_path: Path, sink, make_node, cfg: Path, messages: int = 12) -> None:
    """A node takes and delivers ``messages`` messages (one with two recipients), and stops."""
    node = await make_node(cfg.read_text())
    port = node.listeners[0].port
    for i in range(messages):
        rcpts = [f"u{i}@example.com"] + ([f"v{i}@example.com"] if i == 3 else [])
        await send(port, "s@insurer.test", rcpts, message(f"m{i}"))
        await sink.wait_for(i + 1)
        await node.flush_evidence()  # a sync, where the files rotate once over 2 KB
    await node.stop()


def csv_files(tmp_path: Path) -> list[Path]:
    return ordered((tmp_path / "acct").glob("acct-*.csv"))


def row(line: bytes) -> dict[str, str]:
    return dict(zip(DEFAULT_FIELDS, next(csv.reader([line.decode()])), strict=True))


def identity(line: bytes) -> str:
    """How verify names the record of a CSV line: type, queue id, recipient, time."""
    r = row(line)
    return f"{r['type']} {r['queueId']} to {r['rcpt']} at {r['timeLogged']}"


async def verify(cfg: Path, *more: str):
    return await asyncio.to_thread(cli, "verify", "-c", str(cfg), "--files", *more)


async def test_the_files_of_a_node_match_its_store(tmp_path, sink, make_node):
    cfg = node_config(tmp_path, sink.port)
    await run_node(tmp_path, sink, make_node, cfg)
    files = csv_files(tmp_path)
    assert len(files) >= 4  # rotated: closed files are checked too
    res = await verify(cfg)
    assert res.exit_code == 0, res.output
    assert f"files: 26 lines in {len(files)} files match the store" in res.output
    res = await verify(cfg, "--json")
    assert res.exit_code == 0, res.output
    report = json.loads(res.output)["files"]
    assert report["ok"] and report["format"] == "csv" and report["lines"] == 26


async def test_jsonl_files_alone_are_checked(tmp_path, sink, make_node):
    cfg = node_config(tmp_path, sink.port, '["jsonl"]')
    await run_node(tmp_path, sink, make_node, cfg)
    paths = ordered((tmp_path / "acct").glob("acct-*.jsonl"))
    res = await verify(cfg)
    assert res.exit_code == 0, res.output
    assert f"files: 26 lines in {len(paths)} files match the store" in res.output
    lines = paths[1].read_bytes().splitlines(keepends=True)
    paths[1].write_bytes(b"".join(lines[:1] + [lines[1][:40] + b"\n"] + lines[2:]))
    res = await verify(cfg)
    assert res.exit_code == 1, res.output
    assert f"FILES: not a whole record: {paths[1].name} line 2" in res.output
    obj = json.loads(lines[1])
    assert (f"FILES: missing from the files: {obj['type']} {obj['queueId']} to {obj['rcpt']}"
            f" at {obj['timeLogged']}") in res.output


@pytest.mark.parametrize("damage", ["deleted", "doubled", "cut", "shipped"])
async def test_damaged_files_are_named(tmp_path, sink, make_node, damage):
    """A line deleted from the middle of a rotated file, a line written twice, a line cut in
    half, and the oldest file moved away by a log shipper (not a problem)."""
    cfg = node_config(tmp_path, sink.port)
    await run_node(tmp_path, sink, make_node, cfg)
    files = csv_files(tmp_path)
    rotated = files[1]  # neither the oldest nor the one being written
    lines = rotated.read_bytes().splitlines(keepends=True)
    assert len(lines) >= 3  # the header and two records at least
    line = lines[2]  # the second record, line 3 of the file
    if damage == "deleted":
        rotated.write_bytes(b"".join(lines[:2] + lines[3:]))
    elif damage == "doubled":
        rotated.write_bytes(b"".join(lines[:3] + [line] + lines[3:]))
    elif damage == "cut":
        rotated.write_bytes(b"".join(lines[:2] + [line[:len(line) // 2] + b"\r\n"] + lines[3:]))
    else:
        files[0].unlink()
    res = await verify(cfg)
    if damage == "shipped":
        assert res.exit_code == 0, res.output
        assert f"in {len(files) - 1} files match the store" in res.output
        return
    assert res.exit_code == 1, res.output
    assert res.output.startswith("ok: ")  # the store itself is fine
    if damage == "deleted":
        assert f"FILES: missing from the files: {identity(line)}" in res.output
    elif damage == "doubled":
        assert (f"FILES: doubled: {identity(line)} in {rotated.name} line 3,"
                f" {rotated.name} line 4") in res.output
        assert "missing from the files" not in res.output
    else:
        assert f"FILES: not a whole record: {rotated.name} line 3" in res.output
        assert f"FILES: missing from the files: {identity(line)}" in res.output
    assert "not in the store" not in res.output
    report = json.loads((await verify(cfg, "--json")).output)["files"]
    assert not report["ok"] and report["counts"][
        {"deleted": "missing", "doubled": "doubled", "cut": "cut"}[damage]] == 1


async def test_files_the_archive_script_compressed_are_checked_too(tmp_path, sink, make_node):
    """deploy/accounting-archive.sh (docs/operations.md: daily) gzips every closed file: those
    are the node's rotated files still, so a record cut out of one is named. ``--files`` read
    only ``acct-*.csv``: after the first archive run it checked the file being written alone."""
    cfg = node_config(tmp_path, sink.port)
    await run_node(tmp_path, sink, make_node, cfg)
    files = csv_files(tmp_path)
    script = Path(__file__).resolve().parents[1] / "deploy" / "accounting-archive.sh"
    done = subprocess.run(["sh", str(script), str(tmp_path / "acct"), "400"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    packed = sorted((tmp_path / "acct").glob("acct-*.csv.gz"))
    assert len(packed) == len(files) - 1  # all but the one being written
    res = await verify(cfg)
    assert res.exit_code == 0, res.output
    assert f"files: 26 lines in {len(files)} files match the store" in res.output
    # a gzip stopped half-way leaves its .gz beside the original, which is what counts
    Path(str(files[-1]) + ".gz").write_bytes(gzip.compress(files[-1].read_bytes())[:20])
    res = await verify(cfg)
    assert res.exit_code == 0, res.output
    assert f"files: 26 lines in {len(files)} files match the store" in res.output
    archived = Path(str(files[1]) + ".gz")
    lines = gzip.decompress(archived.read_bytes()).splitlines(keepends=True)
    archived.write_bytes(gzip.compress(b"".join(lines[:2] + lines[3:])))
    res = await verify(cfg)
    assert res.exit_code == 1, res.output
    assert f"FILES: missing from the files: {identity(lines[2])}" in res.output
    archived.write_bytes(archived.read_bytes()[:-12])  # a copy cut short
    res = await verify(cfg)
    assert res.exit_code == 1, res.output
    assert (f"FILES: not a whole record: {archived.name}: cannot be read (Compressed file"
            " ended before the end-of-stream marker was reached)") in res.output


async def test_a_line_the_store_does_not_have_is_named(tmp_path, sink, make_node):
    """A line added to a closed file later (an edit): the store has no record of it."""
    cfg = node_config(tmp_path, sink.port)
    await run_node(tmp_path, sink, make_node, cfg)
    rotated = csv_files(tmp_path)[1]
    lines = rotated.read_bytes().splitlines(keepends=True)
    values = {**row(lines[2]), "rcpt": "forged@example.com"}  # same time and message
    out = io.StringIO()
    csv.writer(out, lineterminator="\r\n").writerow(values.values())
    forged = out.getvalue().encode()
    rotated.write_bytes(b"".join(lines[:3] + [forged] + lines[3:]))
    res = await verify(cfg)
    assert res.exit_code == 1, res.output
    assert f"FILES: not in the store: {rotated.name} line 4: {identity(forged)}" in res.output


async def test_fields_without_the_key_skip_the_files_check(tmp_path, sink, make_node):
    cfg = node_config(tmp_path, sink.port)
    cfg.write_text(cfg.read_text().replace(
        "rotate_size = 2048", 'rotate_size = 2048\nfields = ["type", "timeLogged", "rcpt"]'))
    await run_node(tmp_path, sink, make_node, cfg, messages=2)
    res = await verify(cfg)
    assert res.exit_code == 0, res.output
    assert "files: not checked: the accounting fields lack queueId" in res.output


async def test_a_running_node_has_records_not_yet_filed(tmp_path, small_fs, sink, make_node):
    """The files cannot be written (their disk is full) while the store takes every record:
    the records past the files' position are on their way, not missing; once there is room
    they are filed and match."""
    acct = small_fs("acct", "64k")
    cfg = node_config(tmp_path, sink.port, extra=NO_FLOOR)
    node = await make_node(cfg.read_text())
    port = node.listeners[0].port
    n = await fill_accounting(node)
    for i in range(n, n + 5):
        await send(port, "s@insurer.test", [f"u{i}@example.com"], message(f"m{i}"))
    n += 5
    await sink.wait_for(n)

    def stored() -> int:
        db = sqlite3.connect(f"file:{node.audit.path}?mode=ro", uri=True)
        try:
            return db.execute("SELECT count(*) FROM audit_records").fetchone()[0]
        finally:
            db.close()

    await until(lambda: stored() == 2 * n, what="every record in the store")
    feed = json.loads((tmp_path / "acct" / "acct.position.json").read_text())["feed"]
    assert sum(feed.values()) < 2 * n  # the files are behind the store
    res = await verify(cfg)
    assert res.exit_code == 0, res.output
    assert "match the store" in res.output
    acct.grow("16m")
    await until(lambda: "accounting" not in node.health.active, timeout=60,
                what="the files written once there is room")
    await node.flush_evidence()
    res = await verify(cfg)
    assert res.exit_code == 0, res.output
    assert f"files: {2 * n} lines in" in res.output


async def test_each_node_of_a_cluster_checks_its_own_files(tmp_path, sink, pg_schema):  # noqa: F811
    """Two nodes on one PostgreSQL spool and audit store (one chain for the cluster): each
    node's files hold its own records only, so the other node's records in the same span are
    not missing from them, nor are its earlier life's; a line deleted from node-a's rotated
    file is."""
    texts = {name: cluster_text(tmp_path, sink.port, pg_schema, name).replace(
        'formats = ["csv", "jsonl"]', 'formats = ["csv", "jsonl"]\nrotate_size = 2048')
        for name in ("node-a", "node-b")}
    nodes = [await start_node(text) for text in texts.values()]
    try:
        for i in range(16):  # interleaved: both nodes' records share one time span
            if i == 8:  # node-a's second life writes on under a new spool writer id
                await nodes[0].stop()
                nodes[0] = await start_node(texts["node-a"])
            node = nodes[i % 2]
            await send(node.listeners[0].port, "s@insurer.test", [f"u{i}@example.com"],
                       message(f"m{i}"))
            await sink.wait_for(i + 1)
            await node.flush_evidence()
    finally:
        for node in nodes:
            await node.stop()
    cfgs = {}
    for name, text in texts.items():
        cfgs[name] = tmp_path / f"{name}.toml"
        cfgs[name].write_text(text)
        res = await verify(cfgs[name])
        assert res.exit_code == 0, res.output
        assert "match the store" in res.output and "missing" not in res.output
    files = ordered((tmp_path / "acct-node-a").glob("acct-*.csv"))
    assert len(files) >= 3
    lines = files[1].read_bytes().splitlines(keepends=True)
    files[1].write_bytes(b"".join(lines[:2] + lines[3:]))
    res = await verify(cfgs["node-a"])
    assert res.exit_code == 1, res.output
    assert f"FILES: missing from the files: {identity(lines[2])}" in res.output
    assert (await verify(cfgs["node-b"])).exit_code == 0
