from __future__ import annotations

import csv
import json
import os
import stat
from datetime import UTC, datetime
from pathlib import Path

import pytest

from postlane.accounting.log import AccountingLog, read_position
from postlane.accounting.records import (
    DEFAULT_FIELDS,
    Record,
    format_time,
    parse_time,
)

T0 = datetime(2026, 11, 27, 18, 40, 1, 123000, tzinfo=UTC).timestamp()


class FakeClock:
    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def make_record(n: int = 0, **kw: object) -> Record:
    base: dict[str, object] = dict(
        type="d",
        time_logged=T0 + 2.5,
        time_queued=T0,
        orig="bounces@bank.example",
        rcpt=f"user{n}@example.net",
        queue_id=f"Q{n:06d}",
        cls="transactional",
        vmta_pool="pool-a",
        dsn_action="relayed",
        dsn_status="2.0.0",
        dsn_diag="smtp;250 2.0.0 OK queued",
        dsn_mta="dns;mx1.example.net (127.0.0.5)",
        dlv_size=1234,
        attempt=1,
        total_seconds_queued=2.5,
        correlation_id=f"corr-{n}",
    )
    base.update(kw)
    return Record(**base)  # type: ignore[arg-type]


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def test_time_format_matches_powermta() -> None:
    assert format_time(T0) == "2026-11-27 18:40:01.123+0000"
    assert parse_time(format_time(T0)) == pytest.approx(T0, abs=0.0005)
    assert format_time(0.9996) == "1970-01-01 00:00:01.000+0000"


def test_record_as_dict_uses_file_field_names() -> None:
    d = make_record(7).as_dict()
    assert tuple(d) == DEFAULT_FIELDS
    assert d["class"] == "transactional"
    assert d["vmtaPool"] == "pool-a"
    assert d["queueId"] == "Q000007"
    assert d["header_X-Correlation-ID"] == "corr-7"
    assert d["timeQueued"] == "2026-11-27 18:40:01.123+0000"
    assert d["totalSecondsQueued"] == 2.5


def test_record_rejects_unknown_type() -> None:
    with pytest.raises(ValueError, match="'x'"):
        make_record(type="x")


def test_header_line_and_csv_values(tmp_path: Path) -> None:
    log = AccountingLog(tmp_path / "acct", clock=FakeClock())
    log.write(make_record(1))
    path = log.current_paths["csv"]
    log.close()
    raw = path.read_bytes()
    assert raw.startswith((",".join(DEFAULT_FIELDS) + "\r\n").encode())
    assert path.name == "acct-20261127-184001.csv"
    (row,) = read_csv(path)
    assert row["rcpt"] == "user1@example.net"
    assert row["timeLogged"] == "2026-11-27 18:40:03.623+0000"
    assert row["totalSecondsQueued"] == "2.500"
    assert row["dlvSize"] == "1234"
    assert row["header_X-Correlation-ID"] == "corr-1"


def test_rfc4180_quoting_round_trips(tmp_path: Path) -> None:
    diag = 'smtp;550 5.7.1 "blocked", see\r\nhttps://example.net/why?a=1,b=2\nthanks'
    log = AccountingLog(tmp_path, clock=FakeClock())
    log.write(make_record(1, type="b", dsn_diag=diag, bounce_cat="policy-related"))
    log.write(make_record(2, dsn_diag="plain"))
    path = log.current_paths["csv"]
    log.close()
    assert b'"smtp;550 5.7.1 ""blocked"", see' in path.read_bytes()
    rows = read_csv(path)
    assert [r["dsnDiag"] for r in rows] == [diag, "plain"]
    assert rows[0]["bounceCat"] == "policy-related"


def test_jsonl_round_trip(tmp_path: Path) -> None:
    records = [make_record(i, dsn_diag=f'diag "{i}", ünïcode') for i in range(3)]
    log = AccountingLog(tmp_path, formats=("csv", "jsonl"), clock=FakeClock())
    log.write_many(records)
    paths = dict(log.current_paths)
    log.close()
    assert paths["csv"].stem == paths["jsonl"].stem
    lines = paths["jsonl"].read_text(encoding="utf-8").splitlines()
    loaded = [json.loads(line) for line in lines]
    assert loaded == [r.as_dict() for r in records]
    assert list(loaded[0]) == list(DEFAULT_FIELDS)
    assert parse_time(loaded[0]["timeLogged"]) == pytest.approx(records[0].time_logged, abs=1e-3)
    assert len(read_csv(paths["csv"])) == 3


def test_custom_field_list(tmp_path: Path) -> None:
    fields = ["type", "rcpt", "totalSecondsQueued", "header_X-Correlation-ID", "header_X-Campaign"]
    log = AccountingLog(tmp_path, fields=fields, formats=("csv", "jsonl"), clock=FakeClock())
    log.write(make_record(4))
    paths = dict(log.current_paths)
    log.close()
    assert paths["csv"].read_bytes().splitlines()[0] == ",".join(fields).encode()
    expected = {
        "type": "d",
        "rcpt": "user4@example.net",
        "totalSecondsQueued": "2.500",
        "header_X-Correlation-ID": "corr-4",
        "header_X-Campaign": "",
    }
    assert read_csv(paths["csv"]) == [expected]
    assert json.loads(paths["jsonl"].read_text()) == expected | {"totalSecondsQueued": 2.5}


@pytest.mark.parametrize("bad", ["recipient", "dsn_status", "header_", "header_X:Bad"])
def test_unknown_field_raises_naming_it(tmp_path: Path, bad: str) -> None:
    with pytest.raises(ValueError, match=repr(bad).replace("[", r"\[")):
        AccountingLog(tmp_path, fields=["type", bad])
    assert not list(tmp_path.iterdir())


def test_rejects_unknown_format(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="xml"):
        AccountingLog(tmp_path, formats=("xml",))


def test_rotation_by_size(tmp_path: Path) -> None:
    clock = FakeClock()
    log = AccountingLog(tmp_path, rotate_bytes=600, formats=("csv", "jsonl"), clock=clock)
    for i in range(12):  # files rotate at a sync (the position must name the files written)
        log.write(make_record(i))
        log.sync()
    log.close()
    csvs = list(tmp_path.glob("*.csv"))
    assert len(csvs) > 2
    # Same second: later files get a -N suffix, shared by both formats.
    names = {p.stem for p in csvs}
    assert {"acct-20261127-184001", "acct-20261127-184001-1", "acct-20261127-184001-2"} <= names
    assert {p.stem for p in tmp_path.glob("*.jsonl")} == names
    rows = []
    for path in csvs:
        assert path.read_bytes().startswith(b"type,timeLogged,")
        rows += read_csv(path)
    assert sorted(r["queueId"] for r in rows) == [f"Q{i:06d}" for i in range(12)]
    one_row = len(make_record(0).as_dict()) * 8  # a generous bound on one record's size
    for path in csvs:
        assert path.stat().st_size < 600 + one_row


def test_a_closed_file_changed_outside_postlane_is_named_at_open(tmp_path: Path,
                                                                  caplog) -> None:
    """A rotated file is never written again, so its size when closed is kept in the
    position: a cut or an edit since is named when the files are opened (the node's start),
    not only when someone runs ``audit verify --files``. A file moved or compressed away (a
    log shipper, deploy/accounting-archive.sh) is not a change."""
    def run() -> AccountingLog:
        log = AccountingLog(tmp_path, rotate_bytes=600, formats=("csv", "jsonl"),
                            clock=FakeClock())
        for i in range(12):
            log.write(make_record(i))
            log.sync()
        return log

    run().close()
    csvs = sorted(tmp_path.glob("*.csv"))
    assert len(csvs) > 3
    with caplog.at_level("ERROR", logger="postlane.accounting.log"):
        untouched = AccountingLog(tmp_path, formats=("csv", "jsonl"), clock=FakeClock())
    assert untouched.changed == [] and not caplog.records
    assert len(untouched.closed) == 2 * len(csvs)  # every format's files, the last run's too
    untouched.close()
    cut, shipped = csvs[1], csvs[0]
    size = cut.stat().st_size
    os.truncate(cut, size - 10)
    shipped.rename(shipped.with_suffix(".csv.gz"))
    for _ in range(2):  # still named at the next open: the position keeps the size
        caplog.clear()
        with caplog.at_level("ERROR", logger="postlane.accounting.log"):
            again = AccountingLog(tmp_path, formats=("csv", "jsonl"), clock=FakeClock())
        assert again.changed == [f"{cut} is {size - 10} bytes, {size} when it was closed"]
        assert [r.getMessage() for r in caplog.records] == [
            f"accounting file {cut} is {size - 10} bytes, {size} when it was closed: it was"
            " changed outside Postlane; postlane audit verify --files names the records it"
            " lacks or adds"]
        again.close()


def test_rotation_by_age(tmp_path: Path) -> None:
    clock = FakeClock()
    log = AccountingLog(tmp_path, rotate_seconds=60, clock=clock)
    first = log.current_paths["csv"]
    log.write(make_record(1))
    clock.now += 59
    log.write(make_record(2))
    log.sync()
    assert log.current_paths["csv"] == first
    clock.now += 2
    log.sync()
    log.write(make_record(3))
    second = log.current_paths["csv"]
    log.close()
    assert second != first
    assert second.name == "acct-20261127-184102.csv"
    assert [r["queueId"] for r in read_csv(first)] == ["Q000001", "Q000002"]
    assert [r["queueId"] for r in read_csv(second)] == ["Q000003"]


def test_explicit_rotate_and_flush(tmp_path: Path) -> None:
    log = AccountingLog(tmp_path, clock=FakeClock())
    log.write(make_record(1))
    first = log.current_paths["csv"]
    log.flush(fsync=True)
    assert len(read_csv(first)) == 1
    log.rotate()
    assert log.current_paths["csv"] != first
    assert log.current_paths["csv"].read_bytes().startswith(b"type,")
    log.close()
    log.close()  # idempotent
    with pytest.raises(ValueError, match="closed"):
        log.write(make_record(2))


def test_file_mode_and_directory_creation(tmp_path: Path) -> None:
    target = tmp_path / "a" / "b"
    old = os.umask(0o077)
    try:
        log = AccountingLog(target, formats=("csv", "jsonl"), clock=FakeClock())
    finally:
        os.umask(old)
    for path in log.current_paths.values():
        assert stat.S_IMODE(path.stat().st_mode) == 0o640
    log.close()


def test_a_crash_after_a_sync_cuts_the_files_back_to_it(tmp_path: Path) -> None:
    """What was written after the last sync is cut at the next open, and the position says
    which events the files hold: the recorder writes the rest again, exactly once."""
    log = AccountingLog(tmp_path, formats=("csv", "jsonl"), clock=FakeClock())
    log.write_many([make_record(1), make_record(2)])
    log.sync({"w1": 2})
    paths = dict(log.current_paths)
    log.write(make_record(3))
    log.flush()  # on disk, but not covered by the position: the process dies here
    again = AccountingLog(tmp_path, formats=("csv", "jsonl"), clock=FakeClock())
    assert again.feed == {"w1": 2}
    assert again.recovered_bytes > 0
    again.close()
    assert [r["queueId"] for r in read_csv(paths["csv"])] == ["Q000001", "Q000002"]
    assert len(paths["jsonl"].read_text().splitlines()) == 2


def test_a_position_file_of_another_shape_is_unreadable_not_fatal(tmp_path: Path, caplog) -> None:
    """Valid JSON that is not what the log writes (edited by hand, another program's) stopped
    the node's start with an AttributeError; it is an unreadable position: said, and the
    files go on (records after the last sync may be written twice, as for one cut short)."""
    log = AccountingLog(tmp_path, formats=("csv",), clock=FakeClock())
    log.write(make_record(1))
    log.sync({"w1": 1})
    log.close()
    position = tmp_path / "acct.position.json"
    for shape in ('{"files": 5}', '[1, 2]', '{"feed": {"w1": "many"}}',
                  '{"closed": {"a.csv": null}}', '{"runs": [[1]]}'):
        position.write_text(shape)
        caplog.clear()
        again = AccountingLog(tmp_path, formats=("csv",), clock=FakeClock())
        again.write(make_record(2))
        again.sync({"w1": 2})
        again.close()
        assert [r.message for r in caplog.records if r.levelname == "ERROR"] and all(
            "is unreadable" in r.message for r in caplog.records if r.levelname == "ERROR"), \
            shape


def test_a_line_separator_in_a_value_does_not_split_a_jsonl_line(tmp_path: Path) -> None:
    """JSON allows U+2028, U+2029 and NEL raw in a string, and orjson writes them so; a Message-ID
    or remote reply holding one split the record for every reader that breaks lines where
    Python's ``str.splitlines`` does (this file's own round-trip test reads it so). They are
    written as ``\\u2028`` escapes: the same JSON value, one line per record."""
    diag = "smtp;550 a\u2028b\u2029c\x85d\x1ce, \"quoted\" | tab\t nul\x00 \u2013 dash"
    records = [make_record(1, dsn_diag=diag, message_id="<m\u2028@x>"), make_record(2)]
    log = AccountingLog(tmp_path, formats=("csv", "jsonl"), clock=FakeClock())
    log.write_many(records)
    paths = dict(log.current_paths)
    log.close()
    raw = paths["jsonl"].read_bytes()
    assert b"\xe2\x80\xa8" not in raw and b"\xe2\x80\xa9" not in raw and b"\xc2\x85" not in raw
    assert "\u2013".encode() in raw  # other characters stay as they are
    lines = raw.decode("utf-8").splitlines()
    assert [json.loads(line) for line in lines] == [r.as_dict() for r in records]
    assert [r["dsnDiag"] for r in read_csv(paths["csv"])] == [diag, records[1].dsn_diag]


def test_a_full_disk_leaves_each_record_once_in_the_files(small_fs) -> None:
    """ENOSPC in the middle of a batch (a partial write, a failed fsync) must not leave half
    a batch behind for the retry to write again: the files go back to the last sync, the
    position says which events they hold, and once space returns the retry writes each
    record exactly once (a real tmpfs, not a mock: the kernel's short writes and all)."""
    fs = small_fs("acct", "256k")
    log = AccountingLog(fs.path, formats=("csv", "jsonl"), clock=FakeClock())
    written, failures = 0, 0
    while failures < 3:  # the disk fills; the recorder goes on trying from its cursor
        start = log.feed.get("w1", 0)
        batch = [make_record(n) for n in range(start + 1, start + 51)]
        try:
            log.write_many(batch)
            log.sync({"w1": start + 50})
            written = start + 50
        except OSError:
            failures += 1
            assert log.feed.get("w1", 0) == written  # the cursor names what is synced
    fs.grow("8m")
    while log.feed["w1"] < written + 100:
        start = log.feed["w1"]
        log.write_many(make_record(n) for n in range(start + 1, start + 51))
        log.sync({"w1": start + 50})
    log.close()
    expected = [f"Q{n:06d}" for n in range(1, written + 101)]
    rows = [r for p in sorted(fs.path.glob("*.csv")) for r in read_csv(p)]
    assert [r["queueId"] for r in rows] == expected
    lines = [json.loads(line) for p in sorted(fs.path.glob("*.jsonl"))
             for line in p.read_text().splitlines()]
    assert [r["queueId"] for r in lines] == expected


def test_a_file_shorter_than_its_sync_is_cut_to_a_whole_record_and_names_the_lost_events(
        tmp_path: Path) -> None:
    """A power loss (or a cut outside Postlane) takes synced bytes off the end: the files are
    cut back to the same last whole record and the events of the lines lost are named, to be
    written again, instead of a torn line left in the file and the record missing from it."""
    log = AccountingLog(tmp_path, formats=("csv", "jsonl"), clock=FakeClock())
    log.write_events("w1", [(1, make_record(1)), (2, make_record(2))])
    log.write_events("w2", [(7, make_record(3))])
    log.write_events("w1", [(3, make_record(4)), (4, make_record(5))])
    log.sync({"w1": 4, "w2": 7})
    paths = dict(log.current_paths)
    log.close()
    for path in paths.values():  # the last record torn, in each file
        os.truncate(path, path.stat().st_size - 5)
    # and the JSONL file lost one whole line more: both are cut to the fewer records
    data = paths["jsonl"].read_bytes()
    paths["jsonl"].write_bytes(data[:data.rindex(b"\n", 0, data.rindex(b"\n")) + 1])
    again = AccountingLog(tmp_path, formats=("csv", "jsonl"), clock=FakeClock())
    assert again.lost == {"w1": (3, 4)}
    assert again.feed == {"w1": 2, "w2": 7}
    again.close()  # a crash before the recorder wrote them again: the position still says so
    third = AccountingLog(tmp_path, formats=("csv", "jsonl"), clock=FakeClock())
    assert third.lost == {"w1": (3, 4)} and third.feed == {"w1": 2, "w2": 7}
    third.close()
    assert [r["queueId"] for r in read_csv(paths["csv"])] == ["Q000001", "Q000002", "Q000003"]
    assert [json.loads(line)["queueId"] for line in paths["jsonl"].read_text().splitlines()] \
        == ["Q000001", "Q000002", "Q000003"]


def test_a_quoted_line_break_is_not_a_record_end(tmp_path: Path) -> None:
    log = AccountingLog(tmp_path, formats=("csv",), clock=FakeClock())
    log.write_events("w1", [(1, make_record(1, dsn_diag="550 one\nline two")),
                            (2, make_record(2))])
    log.sync({"w1": 2})
    path = log.current_paths["csv"]
    log.close()
    os.truncate(path, path.stat().st_size - 3)
    again = AccountingLog(tmp_path, formats=("csv",), clock=FakeClock())
    assert again.lost == {"w1": (2, 2)}
    again.close()
    assert [r["dsnDiag"] for r in read_csv(path)] == ["550 one\nline two"]


def test_a_full_disk_then_a_torn_tail_still_leaves_each_record_once(small_fs) -> None:
    """The two repairs meet: writes that failed on a full disk went back to the last sync,
    and so did the list of events the files' lines are; a power loss then tears the synced
    tail. The repair names exactly the events of the lines lost (not those of the failed
    writes too), and writing them again leaves each record once in the files."""
    fs = small_fs("acct", "256k")
    log = AccountingLog(fs.path, formats=("csv", "jsonl"), clock=FakeClock())
    failures = 0
    while failures < 3:  # the disk fills; the recorder goes on trying from its cursor
        start = log.feed.get("w1", 0)
        try:
            log.write_events("w1", [(n, make_record(n)) for n in range(start + 1, start + 51)])
            log.sync({"w1": start + 50})
        except OSError:
            failures += 1
    fs.grow("8m")
    start = log.feed["w1"]
    log.write_events("w1", [(n, make_record(n)) for n in range(start + 1, start + 21)])
    log.sync({"w1": start + 20})
    total = start + 20
    paths = dict(log.current_paths)
    log.close()
    for path in paths.values():  # a power loss tears the last synced record
        os.truncate(path, path.stat().st_size - 5)
    again = AccountingLog(fs.path, formats=("csv", "jsonl"), clock=FakeClock())
    assert again.lost == {"w1": (total, total)}
    assert again.feed == {"w1": total - 1}
    again.write_events("w1", [(total, make_record(total))])  # what the recorder does
    again.sync({"w1": total})
    again.close()
    expected = [f"Q{n:06d}" for n in range(1, total + 1)]
    files = sorted(fs.path.glob("acct-*.csv"), key=lambda p: p.stat().st_mtime_ns)
    assert [r["queueId"] for p in files for r in read_csv(p)] == expected
    files = sorted(fs.path.glob("acct-*.jsonl"), key=lambda p: p.stat().st_mtime_ns)
    assert [json.loads(line)["queueId"] for p in files
            for line in p.read_text().splitlines()] == expected


def test_lost_events_stay_in_the_position_when_writing_them_again_fails(small_fs) -> None:
    """A torn tail names events to write again; the recorder takes them out of ``lost`` as it
    writes them. If that write fails (the disk full), the files go back to their last sync and
    ``lost`` with them: the position still names the events, and neither this process's retry
    nor a restart forgets them."""
    fs = small_fs("acct", "1m")
    log = AccountingLog(fs.path, formats=("csv", "jsonl"), clock=FakeClock())
    log.write_events("w1", [(n, make_record(n)) for n in range(1, 11)])
    log.sync({"w1": 10})
    paths = dict(log.current_paths)
    log.close()
    for path in paths.values():  # a power loss tears the last synced record
        os.truncate(path, path.stat().st_size - 5)
    again = AccountingLog(fs.path, formats=("csv", "jsonl"), clock=FakeClock())
    assert again.lost == {"w1": (10, 10)}
    fs.fill()
    again.lost.pop("w1")  # the recorder writes it again (from the audit store) ...
    again.write_events("w1", [(10, make_record(10))])
    with pytest.raises(OSError):
        again.sync({"w1": 10})
    assert again.lost == {"w1": (10, 10)}  # ... and the failed write puts it back
    assert again.feed == {"w1": 9}
    again.close()
    fs.free()
    third = AccountingLog(fs.path, formats=("csv", "jsonl"), clock=FakeClock())
    assert third.lost == {"w1": (10, 10)} and third.feed == {"w1": 9}
    third.lost.pop("w1")
    third.write_events("w1", [(10, make_record(10))])
    third.sync({"w1": 10})
    third.close()
    fourth = AccountingLog(fs.path, formats=("csv", "jsonl"), clock=FakeClock())
    assert fourth.lost == {}
    fourth.close()
    expected = [f"Q{n:06d}" for n in range(1, 11)]
    files = sorted(fs.path.glob("acct-*.csv"), key=lambda p: p.stat().st_mtime_ns)
    assert [r["queueId"] for p in files for r in read_csv(p)] == expected


class _Killed(BaseException):
    """The process dying where it is (nothing after it runs, no undo)."""


def test_a_position_committed_to_the_cluster_but_not_beside_the_files_is_the_one_used(
        tmp_path: Path) -> None:
    """A cluster's recorder commits each position to the database (with ``writers.filed``,
    where an adopter of its events goes on from) after the fsync and before the position file.
    Killed between the two, the database's position is newer: a restart keeps the lines it
    names (the adopter skipped them), and a reader of the files trusts it; killed before the
    commit, the lines past the older position are no record of the files (written again)."""
    committed: list[dict] = []
    log = AccountingLog(tmp_path, commit=committed.append)
    log.write_events("node-a/1", [(1, make_record(1)), (2, make_record(2))])
    log.sync({"node-a/1": 2})
    assert committed[-1]["feed"] == {"node-a/1": 2}

    def die(position: dict) -> None:
        committed.append(position)
        raise _Killed

    log._commit = die
    log.write_events("node-a/1", [(3, make_record(3))])
    with pytest.raises(_Killed):
        log.sync({"node-a/1": 3})
    os.close(log._files["csv"])  # the process is gone: no close
    published = committed[-1]
    assert read_position(tmp_path)["feed"] == {"node-a/1": 2}, "the file is a sync behind"
    assert read_position(tmp_path, published=published)["feed"] == {"node-a/1": 3}
    again = AccountingLog(tmp_path, published=published)
    assert again.feed == {"node-a/1": 3} and again.recovered_bytes == 0
    again.close()
    rows = [r for path in sorted(tmp_path.glob("acct-*.csv")) for r in read_csv(path)]
    assert [r["rcpt"] for r in rows] == [f"user{n}@example.net" for n in (1, 2, 3)]


def test_a_committed_position_is_never_committed_again_under_its_generation(
        tmp_path: Path) -> None:
    """The commit went through but the position file could not be written (the disk full):
    the sync fails and the batch is written again; the next commit must carry a newer
    generation, or the cluster (which keeps the newest) would keep the failed one's."""
    committed: list[dict] = []
    blocker = tmp_path / "acct.position.json.tmp"

    def commit(position: dict) -> None:
        committed.append(position)
        if len(committed) == 2:
            blocker.mkdir()  # the position file cannot be written aside: an OSError

    log = AccountingLog(tmp_path, commit=commit)
    log.write_events("w", [(1, make_record(1))])
    log.sync({"w": 1})
    log.write_events("w", [(2, make_record(2))])
    with pytest.raises(OSError):
        log.sync({"w": 2})
    blocker.rmdir()
    log.write_events("w", [(2, make_record(2))])
    log.sync({"w": 2})
    log.close()
    gens = [p["gen"] for p in committed]
    assert gens == sorted(set(gens)), gens
