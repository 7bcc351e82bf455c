"""``postlane reputation import snds|postmaster FILE`` and ``postlane reputation show``: the
morning review with files downloaded by hand, as real subprocesses of the ``postlane`` command
beside a running node (and with the node down), every refusal a one-line reason naming the line.

The files are those of tests/test_reputation.py (its module docstring gives their provenance):
the per-IP SNDS CSV, and Postmaster Tools ``trafficStats.list`` answers as the API sends them.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import sqlite3

import pytest

from postlane.reputation.service import open_store, store_location
from postlane.startup import parse_config
from tests.conftest import config_text
from tests.support.pg import PG_DSN, pg_schema  # noqa: F401  (fixture)
from tests.support.waiting import until
from tests.test_cli_ops import POSTLANE, run_cli
from tests.test_dmarc import crafted
from tests.test_reputation import snds_csv, traffic_stats

YESTERDAY = dt.datetime.now(dt.UTC).date() - dt.timedelta(days=1)
"""One day for the whole module, the files it writes included: a run crossing midnight UTC
had the expectations of one day and an SNDS file of the next."""


def node_config(tmp_path, sink_port: int, extra: str = "") -> str:
    """Two pools with their domains, no importer scheduled: the data comes from files."""
    text = config_text(tmp_path, sink_port, f"""
[feedback]
unsubscribe_url = "http://127.0.0.1:9/unsubscribe"
[feedback.classes.marketing]
marketing = true
[monitor]
evaluate_every = "0.1s"
resolve_after = "0.3s"
[reputation.dmarc]
min_messages = 10
{extra}""")
    text = text.replace("[pools.critical]\n",
                        '[pools.critical]\nreturn_path_domain = "insurer.test"\n')
    return text.replace("[pools.bulk]\n",
                        '[pools.bulk]\nreturn_path_domain = "news.insurer.test"\n')


def postmaster_json(bad: bool, day: dt.date = YESTERDAY) -> str:
    """A trafficStats.list answer as the API sends it (two-space indented)."""
    return json.dumps({"trafficStats": [traffic_stats(
        "news.insurer.test", day, reputation="LOW" if bad else "HIGH",
        spam=0.004 if bad else 0.0002, bad_ips=["127.0.0.30"] if bad else [],
        good_ips=["127.0.0.20"] if bad else ["127.0.0.20", "127.0.0.30"])]}, indent=2)


def stored(tmp_path, table: str) -> int:
    with sqlite3.connect(tmp_path / "spool" / "reputation.sqlite3") as db:
        return db.execute(f"SELECT count(*) FROM {table}").fetchone()[0]


async def test_import_and_show_beside_a_running_node_then_with_it_down(tmp_path, sink,
                                                                       make_node):
    text = node_config(tmp_path, sink.port)
    cfg = tmp_path / "node.toml"
    cfg.write_text(text)
    node = await make_node(text)
    snds = tmp_path / "snds-export.csv"
    snds.write_text(snds_csv(red=True, day=YESTERDAY))
    gmail = tmp_path / "trafficStats.json"
    gmail.write_text(postmaster_json(bad=True))
    report = tmp_path / "report.xml"
    report.write_bytes(crafted([("127.0.0.30", 90, "pass", "fail"),
                                ("127.0.0.30", 10, "fail", "fail")],
                               domain="news.insurer.test",
                               end=int(dt.datetime.now(dt.UTC).timestamp()) - 3600))
    assert (await run_cli("dmarc", "import", "-c", str(cfg), str(report)))[0] == 0

    code, out, err = await run_cli("reputation", "import", "snds", str(snds), "-c", str(cfg))
    assert (code, err) == (0, "")
    assert out == (f"{snds}: stored 2 rows (2 new) for 127.0.0.20, 127.0.0.30,"
                   f" {YESTERDAY.isoformat()}\n")
    code, out, err = await run_cli("reputation", "import", "postmaster", str(gmail), "-c",
                                   str(cfg), "--json")
    assert (code, err) == (0, "")
    assert json.loads(out) == {
        "file": str(gmail), "source": "postmaster", "ok": True, "rows": 1,
        "domains": ["news.insurer.test"], "first_day": YESTERDAY.isoformat(),
        "last_day": YESTERDAY.isoformat(), "older_than_view": 0, "new": 1,
        "already_stored": 0, "future_skipped": 0}

    # the same files again, and a file holding one line twice: each row stored once
    twice = tmp_path / "twice.csv"
    twice.write_text(snds_csv(red=True, day=YESTERDAY).splitlines(keepends=True)[0] * 2)
    code, out, _ = await run_cli("reputation", "import", "snds", str(snds), str(twice), "-c",
                                 str(cfg))
    assert code == 0
    assert out.splitlines() == [
        f"{snds}: stored 2 rows (0 new, 2 already stored, updated from the file) for"
        f" 127.0.0.20, 127.0.0.30, {YESTERDAY.isoformat()}",
        f"{twice}: stored 1 row (0 new, 1 already stored, updated from the file) for"
        f" 127.0.0.30, {YESTERDAY.isoformat()}"]
    code, out, _ = await run_cli("reputation", "import", "postmaster", str(gmail), "-c",
                                 str(cfg))
    assert code == 0 and "(0 new, 1 already stored, updated from the file)" in out
    assert (stored(tmp_path, "snds_data"), stored(tmp_path, "postmaster_stats")) == (2, 1)

    # the view, as the node computes it, from the store
    code, out, err = await run_cli("reputation", "show", "-c", str(cfg), "--json")
    assert (code, err) == (0, "")
    view = json.loads(out)
    bulk = next(p for p in view["pools"] if p["pool"] == "bulk")
    assert bulk["gmail"]["domain_reputation"] == "LOW" and bulk["gmail"]["spam_ratio"] == 0.004
    assert bulk["dmarc"] == {"pool": "bulk", "messages": 100, "pass_rate": 0.9,
                             "dkim_rate": 0.9}
    (ip,) = bulk["ips"]
    assert ip["gmail_reputation"] == "BAD" and ip["dmarc"]["pass_rate"] == 0.9
    assert (ip["snds"]["filter"], ip["snds"]["complaint_ratio"], ip["snds"]["trap_hits"]) == (
        "RED", 0.012, 3)
    crit = next(p for p in view["pools"] if p["pool"] == "critical")
    assert crit["ips"][0]["snds"]["filter"] == "GREEN" and crit["gmail"] is None
    alerts = {a["id"] for a in view["alerts"]}
    assert alerts == {"gmail-domain-reputation:news.insurer.test",
                      "gmail-spam-critical:news.insurer.test", "gmail-ip-reputation:127.0.0.30",
                      "snds-red:127.0.0.30", "dmarc-dkim-alignment:bulk"}
    code, out, _ = await run_cli("reputation", "show", "-c", str(cfg))
    assert code == 0
    lines = out.splitlines()
    assert "pool bulk (domains: news.insurer.test; marketing: its alerts offer a pause)" in lines
    assert "pool critical (domains: insurer.test)" in lines
    assert (f"  Gmail news.insurer.test {YESTERDAY.isoformat()}: domain reputation LOW, spam"
            f" ratio 0.40%") in lines
    assert "  DMARC: 100 messages, pass 90.0%, DKIM aligned 90.0%" in lines
    assert (f"  127.0.0.30       SNDS RED {YESTERDAY.isoformat()}, complaint rate 1.2%, 3 trap"
            f" hits;  Gmail IP BAD;  DMARC pass 90.0%") in lines
    assert (f"  127.0.0.20       SNDS GREEN {YESTERDAY.isoformat()}, complaint rate < 0.1%, 0"
            f" trap hits;  Gmail IP HIGH;  DMARC pass -") in lines
    assert "alerts: 5" in lines and any(line.startswith("  snds-red:127.0.0.30: SNDS filter"
                                                        " result RED") for line in lines)

    # the running node reads the same store: at its next view refresh the alerts fire there
    await node.reputation.refresh()
    await until(lambda: alerts <= set(node.monitor.alerts.active), what="the alerts")
    assert node.reputation.offers["snds-red:127.0.0.30"] == "bulk"

    # with the node down, the same commands work on the store; the good figures replace the bad
    await node.stop()
    gmail.write_text(postmaster_json(bad=False))
    snds.write_text(snds_csv(red=False, day=YESTERDAY))
    for source, path in (("postmaster", gmail), ("snds", snds)):
        code, out, err = await run_cli("reputation", "import", source, str(path), "-c",
                                       str(cfg))
        assert (code, err) == (0, "") and "already stored, updated from the file" in out
    code, out, _ = await run_cli("reputation", "show", "-c", str(cfg), "--json")
    view = json.loads(out)
    assert {a["id"] for a in view["alerts"]} == {"dmarc-dkim-alignment:bulk"}
    bulk = next(p for p in view["pools"] if p["pool"] == "bulk")
    assert bulk["ips"][0]["snds"]["filter"] == "GREEN"
    assert bulk["gmail"]["domain_reputation"] == "HIGH"


async def test_stdin_old_and_future_rows(tmp_path):
    """'-' reads stdin; rows older than the view's window are stored and said to be outside
    it; rows dated more than a day ahead are left out, as the scheduled importers do."""
    cfg = tmp_path / "node.toml"
    cfg.write_text(node_config(tmp_path, 9))
    old = YESTERDAY - dt.timedelta(days=20)
    ahead = YESTERDAY + dt.timedelta(days=10)
    days = json.dumps({"trafficStats": [json.loads(postmaster_json(False, d))["trafficStats"][0]
                                        for d in (old, YESTERDAY, ahead)]})
    path = tmp_path / "days.json"
    path.write_text(days)
    code, out, _ = await run_cli("reputation", "import", "postmaster", str(path), "-c", str(cfg))
    assert code == 0
    assert out == (f"{path}: stored 2 rows (2 new) for news.insurer.test, {old.isoformat()} .."
                   f" {YESTERDAY.isoformat()}; 1 dated more than a day ahead left out; 1 older"
                   f" than 5 days (stored; the view and its alerts use the last 5 days)\n")
    proc = await asyncio.create_subprocess_exec(
        POSTLANE, "reputation", "import", "snds", "-", "-c", str(cfg),
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)
    out_b, err_b = await proc.communicate(snds_csv(red=False, day=YESTERDAY).encode())
    assert proc.returncode == 0, err_b
    assert out_b.decode().startswith("-: stored 2 rows (2 new) for 127.0.0.20, 127.0.0.30")


def _line(day: dt.date, **change: str) -> str:
    """One SNDS line for 127.0.0.30 on ``day``, with fields changed by name."""
    fields = {"ip": "127.0.0.30", "start": f"{day:%-m/%-d/%Y} 12:00 AM",
              "end": f"{day:%-m/%-d/%Y} 11:59 PM", "rcpt": "10", "data": "10", "rcpts": "10",
              "filter": "GREEN", "rate": "< 0.1%", "trap_start": "", "trap_end": "",
              "traps": "0", "helo": "bulk.test", "from": "bounce@news.insurer.test",
              "comments": ""}
    fields.update(change)
    return ",".join(fields.values()) + "\r\n"


GOOD_LINE = _line(YESTERDAY)
FUTURE = YESTERDAY + dt.timedelta(days=30)
STAT = json.loads(postmaster_json(False))["trafficStats"][0]

SNDS_REFUSALS = [
    ("rate.csv", GOOD_LINE + _line(YESTERDAY, rate="nan%"),
     "SNDS data line 2: complaint rate 'nan%' is not a percentage"),
    ("ip.csv", "IP Address,Activity start\r\n" + GOOD_LINE + _line(YESTERDAY, ip="10.0.0.999"),
     "SNDS data line 3: '10.0.0.999' is not an IP address"),
    ("traps.csv", _line(YESTERDAY, traps="-4"), "SNDS data line 1: trap hits '-4' is not a count"),
    ("colour.csv", _line(YESTERDAY, filter="PURPLE"),
     "SNDS data line 1: filter result 'PURPLE' is not GREEN, YELLOW or RED"),
    ("huge-field.csv", GOOD_LINE + "127.0.0.30,\"" + "x" * 140000 + "\"\r\n",
     "SNDS data line 2: field larger than field limit (131072)"),
    ("page.html", "<html><body>Sign in to SNDS</body></html>",
     "line 1: not SNDS CSV data (an HTML page or JSON)"),
    ("stats.json", postmaster_json(False), "line 1: not SNDS CSV data (an HTML page or JSON)"),
    ("empty.csv", "", "no SNDS data lines"),
    ("header.csv", "IP Address,Activity start,Activity end\r\n", "no SNDS data lines"),
    ("ahead.csv", _line(FUTURE), f"every row is dated more than a day ahead (from"
                                 f" {FUTURE.isoformat()}): is the file or this clock wrong?"),
    ("latin1.csv", (GOOD_LINE + _line(YESTERDAY, comments="caf\xe9")).encode("latin-1"),
     "line 2: not UTF-8 text (byte 0xe9)"),
]
POSTMASTER_REFUSALS = [
    ("truncated.json", postmaster_json(False)[:200], "not JSON: Unterminated string"),
    ("bad-name.json", json.dumps({"trafficStats": [STAT, {**STAT, "name": "trafficStats/1"}]},
                                 indent=2),
     "line 43: trafficStats name 'trafficStats/1' is not domains/DOMAIN/trafficStats/YYYYMMDD"),
    ("bad-day.json", json.dumps({"trafficStats": [
        {**STAT, "name": "domains/news.insurer.test/trafficStats/20261399"}]}, indent=2),
     "line 3: unexpected trafficStats name 'domains/news.insurer.test/trafficStats/20261399'"),
    ("error.json", json.dumps({"error": {"code": 403, "message": "The caller does not have"
                                                                 " permission"}}),
     "line 1: an error answer, not traffic stats: 'The caller does not have permission'"),
    ("domains.json", json.dumps({"domains": [{"name": "domains/insurer.test"}]}),
     "line 1: neither a trafficStats.list answer (no \"trafficStats\") nor a TrafficStats"
     " (no \"name\")"),
    ("not-list.json", '{"trafficStats": {"name": "x"}}', "line 1: \"trafficStats\" is not a list"),
    ("entry.json", '{"trafficStats": [\n  "domains/x/trafficStats/20261201"\n]}',
     "line 1: a trafficStats entry is str, not an object"),
    ("csv.json", snds_csv(red=False, day=YESTERDAY),
     "line 1: not Postmaster Tools JSON (trafficStats answers are JSON objects)"),
    ("none.json", "{}\n", "no traffic stats"),
    ("deep.json", "[" * 100000, "line 1: the JSON nests too deep"),
    ("ahead.json", json.dumps({"trafficStats": [
        {**STAT, "name": f"domains/news.insurer.test/trafficStats/{FUTURE:%Y%m%d}"}]}),
     f"every row is dated more than a day ahead (from {FUTURE.isoformat()})"),
]


@pytest.mark.parametrize("source, cases", [("snds", SNDS_REFUSALS),
                                           ("postmaster", POSTMASTER_REFUSALS)])
async def test_every_bad_file_is_refused_on_one_line_and_the_good_one_stored(tmp_path, source,
                                                                              cases):
    cfg = tmp_path / "node.toml"
    cfg.write_text(node_config(tmp_path, 9))
    paths = []
    for name, data, _ in cases:
        paths.append(tmp_path / name)
        if isinstance(data, str):
            paths[-1].write_text(data, encoding="utf-8", newline="")
        else:
            paths[-1].write_bytes(data)
    good = tmp_path / ("good.csv" if source == "snds" else "good.json")
    good.write_text(GOOD_LINE if source == "snds" else postmaster_json(False))
    big = tmp_path / "big"
    with big.open("wb") as fh:
        fh.truncate(64 * 1024 * 1024 + 1)
    missing = tmp_path / "missing"
    code, out, err = await run_cli("reputation", "import", source, *map(str, paths), str(good),
                                   str(big), str(missing), "-c", str(cfg))
    assert code == 1 and err == ""
    lines = out.splitlines()
    assert len(lines) == len(cases) + 3, out  # one line per file
    for line, path, (_, _, reason) in zip(lines, paths, cases, strict=False):
        assert line.startswith(f"{path}: refused: "), line
        assert reason in line, (reason, line)
    assert lines[len(cases)].startswith(f"{good}: stored 1 row (1 new)")
    assert lines[-2] == (f"{big}: refused: larger than 64 MB: not an SNDS export nor Postmaster"
                         f" Tools answers")
    assert lines[-1] == f"{missing}: refused: cannot read: No such file or directory"
    # nothing of a refused file was stored: each file whole or not at all
    assert stored(tmp_path, "snds_data" if source == "snds" else "postmaster_stats") == 1
    code, out, _ = await run_cli("reputation", "import", source, str(paths[0]), "-c", str(cfg),
                                 "--json")
    assert code == 1
    got = json.loads(out)
    assert got["ok"] is False and cases[0][2] in got["error"]


async def test_usage_and_store_errors(tmp_path):
    cfg = tmp_path / "node.toml"
    cfg.write_text(node_config(tmp_path, 9))
    good = tmp_path / "good.csv"
    good.write_text(GOOD_LINE)
    code, _, err = await run_cli("reputation", "import", "sndz", str(good), "-c", str(cfg))
    assert code == 2 and "Invalid value for SOURCE: must be snds or postmaster" in err
    code, _, err = await run_cli("reputation", "import", "snds", str(good))
    assert code == 2 and "--config" in err
    code, _, err = await run_cli("reputation", "show", "-c", str(tmp_path / "nope.toml"))
    assert code == 2
    away = tmp_path / "away.toml"
    away.write_text(node_config(tmp_path, 9, '[reputation]\nstore = "postgresql://postlane@'
                                             '127.0.0.1:1/none"\n'))
    for args in (("import", "snds", str(good)), ("show",)):
        code, out, err = await run_cli("reputation", *args, "-c", str(away))
        assert code == 1 and out == "" and len(err.splitlines()) == 1, err  # libpq's two lines
        assert err.startswith("cannot open the reputation store at postgresql://postlane@"
                              "127.0.0.1:1/none: connection failed")


@pytest.mark.skipif(os.geteuid() != 0, reason="only root can write as another user")
async def test_root_is_refused_a_store_the_node_could_not_read(tmp_path):
    """As root, into the node user's folder: a reputation.sqlite3 root makes there is one the
    node (another user) cannot open; say whom to run as instead (as `suppress` does)."""
    cfg = tmp_path / "node.toml"
    cfg.write_text(node_config(tmp_path, 9))
    folder = tmp_path / "spool"
    folder.mkdir(mode=0o700)
    os.chown(folder, 65534, 65534)
    good = tmp_path / "good.csv"
    good.write_text(GOOD_LINE)
    report = tmp_path / "report.xml"
    report.write_bytes(crafted([("127.0.0.30", 1, "pass", "pass")]))
    location = store_location(parse_config(cfg.read_text()))
    for args in (("reputation", "import", "snds", str(good)), ("dmarc", "import", str(report)),
                 ("rules", "reviewed", "gmail"), ("reputation", "show"),
                 ("dmarc", "report")):  # reading creates the store when there is none yet
        code, _, err = await run_cli(*args, "-c", str(cfg))
        assert code == 1 and f"{folder} belongs to" in err and "sudo -u" in err, (args, err)
        assert not os.path.exists(location)
    # a store the node made is read as root (it leaves no file of its own there)
    open_store(parse_config(cfg.read_text())).close()
    os.chown(location, 65534, 65534)
    code, out, err = await run_cli("reputation", "show", "-c", str(cfg), "--json")
    assert code == 0 and json.loads(out)["pools"], err
    assert {p.stat().st_uid for p in folder.iterdir()} == {65534}


async def test_import_into_the_clusters_postgresql_store(tmp_path, pg_schema):  # noqa: F811
    """In a cluster the store is the spool's PostgreSQL schema: imported once, whichever node's
    config the command is given."""
    cfg = tmp_path / "node.toml"
    cfg.write_text(node_config(tmp_path, 9).replace(f'spool = "{tmp_path}/spool"',
                                                    f'spool = "{PG_DSN}"')
                   + f'[cluster]\nschema_name = "{pg_schema}"\n')
    snds = tmp_path / "snds.csv"
    snds.write_text(snds_csv(red=True, day=YESTERDAY))
    gmail = tmp_path / "stats.json"
    gmail.write_text(postmaster_json(bad=True))
    for expected in ("(2 new)", "(0 new, 2 already stored, updated from the file)"):
        code, out, err = await run_cli("reputation", "import", "snds", str(snds), "-c", str(cfg))
        assert code == 0 and expected in out, err
    code, out, err = await run_cli("reputation", "import", "postmaster", str(gmail), str(gmail),
                                   "-c", str(cfg))
    assert code == 0, err
    assert ["(1 new)" in line for line in out.splitlines()] == [True, False]
    code, out, _ = await run_cli("reputation", "show", "-c", str(cfg), "--json")
    assert "snds-red:127.0.0.30" in {a["id"] for a in json.loads(out)["alerts"]}
    store = open_store(parse_config(cfg.read_text()))
    try:
        assert store.pg and len(store.snds(0)) == 2 and len(store.postmaster("2000-01-01")) == 1
    finally:
        store.close()
