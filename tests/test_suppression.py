"""The suppression store and the ``postlane suppress`` commands."""

from __future__ import annotations

import io
import time

import pytest
from typer.testing import CliRunner

from postlane.cli import app
from postlane.feedback.suppression import SuppressionError, SuppressionList


@pytest.fixture
def store(tmp_path):
    s = SuppressionList(tmp_path / "s.sqlite3")
    yield s
    s.close()


def test_scopes(store) -> None:
    store.add("Hard@Example.com", "all", "5.1.1 user unknown", "bounce")
    store.add("news@example.com", "marketing", "unsubscribe", "unsubscribe")
    rcpts = ["hard@example.COM", "news@example.com", "fine@example.com"]
    assert set(store.check(rcpts)) == {"hard@example.COM", "news@example.com"}
    assert set(store.check(rcpts, ["all"])) == {"hard@example.COM"}
    assert store.check(["hard@example.com"])["hard@example.com"].scope == "all"


def test_check_one_answers_as_check_does(store) -> None:
    """The look-up at RCPT: the entry ``check`` gives in every scope, expired ones ignored."""
    store.add("both@example.com", "marketing", "unsubscribe", "unsubscribe")
    store.add("Both@example.com", "best-effort", "complaint", "fbl")
    store.add("gone@example.com", "all", "5.1.1", "bounce", expires=time.time() - 1)
    store.add("gone@example.com", "marketing", "unsubscribe", "unsubscribe")
    for address in ("BOTH@example.com", "gone@example.com", "fine@example.com", "no-at-sign",
                    "a b@example.com"):
        assert store.check_one(address) == store.check([address]).get(address), address
    assert store.check_one("both@example.com").scope == "best-effort"
    assert store.check_one("gone@example.com").scope == "marketing"
    assert store.check_one("fine@example.com") is None


def test_remove_list_and_bad_input(store) -> None:
    store.add("a@example.com", "all")
    store.add("a@example.com", "marketing")
    store.add("b@example.com", "marketing")
    assert store.count() == 3
    assert [e.address for e in store.list(scope="marketing")] == ["a@example.com",
                                                                  "b@example.com"]
    assert store.remove("a@example.com", "marketing") == 1
    assert store.remove("A@example.com") == 1
    assert [e.address for e in store.list(like="a*")] == []
    with pytest.raises(SuppressionError, match="unknown scope"):
        store.add("c@example.com", "transactional")
    with pytest.raises(SuppressionError, match="not an email address"):
        store.add("no-at-sign", "all")


def test_csv_round_trip_and_all_or_nothing_import(store, tmp_path) -> None:
    n = store.import_csv(io.StringIO("address,scope,reason\nx@example.com,all,hard\n"
                                     "y@example.com,,complaint\n"))
    assert n == 2
    out = io.StringIO()
    assert store.export_csv(out) == 2
    lines = out.getvalue().splitlines()
    assert lines[0] == "address,scope,reason,source,created,expires"
    assert lines[1].startswith("x@example.com,all,hard,import,")
    assert lines[2].startswith("y@example.com,marketing,complaint,import,")
    other = SuppressionList(tmp_path / "other.sqlite3")
    assert other.import_csv(io.StringIO(out.getvalue())) == 2
    assert [round(e.created, 3) for e in other.list()] == [round(e.created, 3)
                                                          for e in store.list()]
    with pytest.raises(SuppressionError, match="line 3"):
        other.import_csv(io.StringIO("z@example.com\nw@example.com,all\nbad address,all\n"))
    assert other.count() == 2, "a bad file imports nothing"
    other.close()


def test_suppress_commands(tmp_path) -> None:
    db = str(tmp_path / "s.sqlite3")
    run = CliRunner().invoke
    r = run(app, ["suppress", "add", "--db", db, "--scope", "all", "--reason", "legal hold",
                  "p@example.com"])
    assert r.exit_code == 0 and "suppressed p@example.com (all)" in r.output
    csv_in = tmp_path / "in.csv"
    csv_in.write_text("q@example.com,marketing,complaint\n")
    assert run(app, ["suppress", "import", "--db", db, str(csv_in)]).exit_code == 0
    r = run(app, ["suppress", "list", "--db", db])
    assert "p@example.com\tall\toperator" in r.output and "q@example.com\tmarketing" in r.output
    out = tmp_path / "out.csv"
    assert run(app, ["suppress", "export", "--db", db, str(out)]).exit_code == 0
    assert out.read_text().count("\n") == 3
    r = run(app, ["suppress", "remove", "--db", db, "p@example.com"])
    assert r.exit_code == 0 and "1 entry removed" in r.output
    assert run(app, ["suppress", "remove", "--db", db, "p@example.com"]).exit_code == 1
    r = run(app, ["suppress", "add", "--db", db, "--scope", "nope", "r@example.com"])
    assert r.exit_code == 2 and "unknown scope" in r.output
    csv_in.write_bytes("ok@example.com\nm\u00fcller@example.com\n".encode("latin-1"))
    r = run(app, ["suppress", "import", "--db", db, str(csv_in)])
    assert r.exit_code == 2 and "line 2: not UTF-8" in r.output, "not a traceback"
    r = run(app, ["suppress", "list", "--db", db, "--like", "nobody*"])
    assert r.exit_code == 0 and "no entries match" in r.output
    csv_in.write_text("not-an-address\n")
    r = run(app, ["suppress", "import", "--db", db, str(csv_in)])
    assert r.exit_code == 2 and "line 1" in r.output
    assert run(app, ["suppress", "list"]).exit_code == 2




@pytest.mark.parametrize("address", ["a@@b.example", "a@b..example", "a@-bad-.example",
                                     "a.@b.example", "a@b.example.", "a@[300.1.1.1]"])
def test_suppress_refuses_what_is_no_address(tmp_path, address) -> None:
    """``postlane suppress add a@@b.example`` said "suppressed a@@b.example" (exit 0): a listed
    entry that can suppress nobody, as the SMTP door refuses that path; an import took it too.
    Both now refuse it as the door would, naming the address (the import: its line)."""
    db = str(tmp_path / "s.sqlite3")
    run = CliRunner().invoke
    r = run(app, ["suppress", "add", "--db", db, address])
    assert r.exit_code == 2 and f"not an email address: {address!r}" in r.output, r.output
    csv_in = tmp_path / "in.csv"
    csv_in.write_text(f"ok@example.com\n{address}\n")
    r = run(app, ["suppress", "import", "--db", db, str(csv_in)])
    assert r.exit_code == 2 and "line 2: not an email address" in r.output, r.output
    r = run(app, ["suppress", "list", "--db", db])
    assert "no entries in force" in r.output, r.output


def test_suppress_still_takes_every_address_the_door_takes(tmp_path) -> None:
    db = str(tmp_path / "s.sqlite3")
    good = ["Anna@Example.COM", "<b@example.com>", "j\u00f6rg@b\u00fccher.example",
            '"x.y"@example.com', "c@[192.0.2.1]", "d+tag@sub.example.com"]
    r = CliRunner().invoke(app, ["suppress", "add", "--db", db, *good])
    assert r.exit_code == 0, r.output
    assert r.output.count("suppressed ") == len(good)
