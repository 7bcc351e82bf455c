"""CLI output (issue 19): every command that prints or changes something can answer in JSON,
`killtest` is listed in the help, and tables are not cut when piped."""

from __future__ import annotations

import asyncio
import json
import os

import typer

from postlane.cli import app
from postlane.policy.intake import RcptIn
from tests.conftest import OPERATOR, config_text, message
from tests.test_cli_ops import POSTLANE, run_cli

#: Commands whose output is one format by design: JSON already, CSV, or a run's own report.
ONE_FORMAT = {
    "serve": "logs JSON lines",
    "demo": "a human report of a run (the bench behind it has --json)",
    "dkim bench": "a measurement printout for docs/performance.md",
    "killtest": "prints one JSON line",
    "sink": "a try-out tool that prints a line per message it receives",
    "feedback parse": "prints one JSON object per file",
    "audit show": "--format text|json|csv",
    "audit sla": "--format text|json|csv",
}


def _commands(group, prefix: str = ""):
    for name, cmd in group.commands.items():
        path = f"{prefix}{name}"
        if hasattr(cmd, "commands"):  # a group (typer's own click or the click package)
            yield from _commands(cmd, path + " ")
        else:
            yield path, cmd


def test_every_command_that_prints_or_changes_something_has_json():
    root = typer.main.get_command(app)
    missing = [path for path, cmd in _commands(root) if path not in ONE_FORMAT
               and not any("--json" in p.opts for p in cmd.params)]
    assert missing == []


async def test_killtest_is_listed_in_help():
    code, out, _ = await run_cli("--help")
    assert code == 0 and "killtest" in out and "queue" in out


async def test_tables_are_not_cut_when_piped_and_json_answers(tmp_path, sink, make_node):
    node = await make_node(config_text(tmp_path, sink.port))
    await node.operations.pause("bulk", who=OPERATOR)
    long_rcpt = "a-very-long-local-part-of-a-policyholder-address-" + "x" * 60 + "@example.com"
    await node.intake.submit("s@insurer.test", [RcptIn(long_rcpt)],
                             message("offer", cls="marketing"))
    target = ["--url", f"http://127.0.0.1:{node.api.port}",
              "--token-file", str(tmp_path / "api-token")]
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    proc = await asyncio.create_subprocess_exec(
        POSTLANE, "queue", "list", *target, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, env=env)
    out, err = await proc.communicate()
    assert proc.returncode == 0, err
    assert long_rcpt in out.decode(), "a piped table is as wide as it needs"
    code, out, err = await run_cli("pause", "bulk", "--domain", "example.com", "--json", *target)
    assert code == 0 and json.loads(out) == {"pool": "bulk", "domain": "example.com",
                                             "paused": True, "queued": 1}
    code, out, err = await run_cli("purge", "bulk", "example.com", "--yes", "--json", *target)
    assert json.loads(out) == {"pool": "bulk", "domain": "example.com", "purged": 1}
    cfg = tmp_path / "node.toml"
    cfg.write_text(config_text(tmp_path, sink.port))
    code, out, err = await run_cli("config", "check", str(cfg), "--json")
    assert code == 0 and json.loads(out)["ok"] is True


def test_help_keeps_bracketed_words():
    """Help is rendered as rich markup, where ``[routes]`` is a style tag and vanishes unless
    written ``\\[routes]``: every bracketed word of a command's help reaches the reader."""
    import re

    from typer.testing import CliRunner

    root = typer.main.get_command(app)
    lost = []
    for path, cmd in _commands(root):
        texts = [cmd.help or ""] + [getattr(p, "help", None) or "" for p in cmd.params]
        words = [w.replace("\\[", "[") for t in texts for w in re.findall(r"\\?\[[^\]\s]*\]", t)]
        if not words:
            continue
        out = CliRunner().invoke(app, [*path.split(), "--help"], terminal_width=200).output
        lost += [(path, w) for w in words if w not in out]
    assert lost == []


def test_audit_show_says_nothing_found_on_stderr(tmp_path):
    """`postlane audit show --correlation-id NOPE` printed "no records found" on stdout (exit 1),
    where a script reading the trail takes it for one; as `suppress list` does, the note goes to
    stderr and stdout stays empty (JSON: an empty list)."""
    from typer.testing import CliRunner

    from postlane.audit.backend import open_store_at

    db = str(tmp_path / "audit.sqlite")
    open_store_at(db).close()
    runner = CliRunner()
    res = runner.invoke(app, ["audit", "show", "--db", db, "--correlation-id", "nope"])
    assert res.exit_code == 1 and res.stdout == "", res.stdout
    assert "no records found" in res.stderr
    res = runner.invoke(app, ["audit", "show", "--db", db, "--correlation-id", "nope",
                              "--format", "json"])
    assert res.exit_code == 1 and json.loads(res.stdout) == []
