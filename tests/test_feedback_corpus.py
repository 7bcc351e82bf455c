"""The report parser against real-world corpora (../shared/testdata, see its README.md).

Figures: ``.venv/bin/python -m tests.support.corpus_score`` (also printed here with -s)."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from postlane.cli import app
from tests.support.corpus_score import TESTDATA, score_arf, score_bounces
from tests.support.shared import needs_corpus

pytestmark = needs_corpus(TESTDATA)


def test_bounce_corpus_recall_and_precision() -> None:
    score = score_bounces()
    print(json.dumps(score))
    assert score["files"] > 600
    assert score["recipient"]["recall"] >= 0.95
    assert score["recipient"]["precision"] >= 0.95
    assert score["permanent"]["recall"] >= 0.95 and score["permanent"]["precision"] >= 0.95
    assert score["temporary"]["recall"] >= 0.85 and score["temporary"]["precision"] >= 0.85
    assert score["kind_accuracy"]["not-bounce"] == "2/2", "a non-bounce never suppresses anyone"


def test_arf_corpus() -> None:
    score = score_arf()
    print(json.dumps(score))
    assert score["feedback_type_accuracy"] == 1.0
    assert score["source_ip_accuracy"] == 1.0
    assert score["recipient"]["recall"] == 1.0
    # lower on purpose: when Original-Rcpt-To is absent the returned message's single To: is
    # taken (the corpus expects nothing there); see docs/feedback.md
    assert score["recipient"]["precision"] >= 0.75


def test_feedback_parse_command_prints_one_json_object_per_file() -> None:
    files = [TESTDATA / "bounces/sisimai/bsd/lhost-qmail-01.eml",
             TESTDATA / "bounces/sisimai/bsd/lhost-postfix-01.eml",
             TESTDATA / "arf/stalwart/002.eml",
             TESTDATA / "bounces/sisimai/bsd/rfc3834-01.eml",
             TESTDATA / "bounces/sisimai/not/is-not-bounce-01.eml"]
    result = CliRunner().invoke(app, ["feedback", "parse", *map(str, files)])
    assert result.exit_code == 0, result.output
    out = [json.loads(line) for line in result.output.splitlines()]
    assert [o["kind"] for o in out] == ["bounce", "bounce", "complaint", "auto-reply",
                                        "not-a-report"]
    [qmail] = out[0]["recipients"]
    assert qmail["address"] == "kijitora@example.ne.jp"
    assert qmail["permanent"] is True and qmail["category"] == "bad-mailbox"
    assert out[2]["complaint"]["feedback_type"] == "abuse"
    assert out[2]["recipients"][0]["address"] == "user@example.com"
    assert out[4]["recipients"] == []


def test_feedback_parse_reports_unreadable_files(tmp_path) -> None:
    result = CliRunner().invoke(app, ["feedback", "parse", str(tmp_path / "missing.eml")])
    assert result.exit_code == 1
    assert "cannot read" in result.output
