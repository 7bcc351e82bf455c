"""The [audit] section and the accounting field list: defaults, clear errors."""

from __future__ import annotations

import csv

import pytest

from postlane.startup import ConfigError, load_config, parse_config
from tests.conftest import config_text, message, send


def errors(tmp_path, extra: str) -> list[str]:
    with pytest.raises(ConfigError) as exc:
        parse_config(config_text(tmp_path, 2525, extra))
    return exc.value.errors


def test_defaults_keep_existing_configs_valid(tmp_path):
    cfg = parse_config(config_text(tmp_path, 2525))
    assert cfg.audit.enabled and cfg.audit.path is None and cfg.audit.webhooks == []
    assert cfg.accounting.fields[0] == "type"


def test_unknown_accounting_field_is_named(tmp_path):
    text = config_text(tmp_path, 2525).replace(
        'formats = ["csv", "jsonl"]', 'formats = ["csv"]\nfields = ["type", "rcpt", "bogus"]')
    with pytest.raises(ConfigError) as exc:
        parse_config(text)
    assert any("accounting.fields" in e and "'bogus'" in e for e in exc.value.errors)


def test_audit_errors_name_their_field(tmp_path):
    errs = errors(tmp_path, """
[audit]
[audit.retention.nope]
delete = "30d"
[audit.retention.marketing]
pseudonymise = "90d"
delete = "30d"
[[audit.webhooks]]
url = "ftp://x"
[[audit.webhooks]]
url = "http://127.0.0.1:1/e"
types = ["z"]
classes = ["ghost"]
""")
    text = "\n".join(errs)
    assert "audit.webhooks[0].url" in text and "audit.webhooks[1].types" in text
    errs = errors(tmp_path, """
[audit.retention.nope]
delete = "30d"
[audit.retention.marketing]
pseudonymise = "90d"
delete = "30d"
[[audit.webhooks]]
url = "http://127.0.0.1:1/e"
classes = ["ghost"]
""")
    text = "\n".join(errs)
    assert "audit.retention.nope: no class named 'nope'" in text
    assert "audit.retention.marketing.pseudonymise: needs audit.pseudonymisation_key" in text
    assert "audit.retention.marketing.delete: must be later than pseudonymise" in text
    assert "audit.webhooks[0].classes: no class named 'ghost'" in text


def test_relative_audit_paths_follow_the_config_file(tmp_path):
    path = tmp_path / "node.toml"
    path.write_text(config_text(tmp_path, 2525, '[audit]\npath = "var/audit.db"\n'
                                                 'pseudonymisation_key = "audit.key"\n'))
    cfg = load_config(path)
    assert cfg.audit.path == str(tmp_path / "var/audit.db")
    assert cfg.audit.pseudonymisation_key == str(tmp_path / "audit.key")


async def test_configured_field_list_shapes_the_csv(tmp_path, sink, make_node):
    text = config_text(tmp_path, sink.port, "[audit]\nenabled = false\n").replace(
        'formats = ["csv", "jsonl"]',
        'formats = ["csv"]\nfields = ["type", "rcpt", "dsnStatus", "header_X-Correlation-ID"]')
    node = await make_node(text)
    assert node.audit is None
    await send(node.listeners[0].port, "s@example.com", ["a@example.com"],
               message(cls="policy-documents", extra="X-Correlation-ID: c-1\r\n"))
    await sink.wait_for(1)
    await node.stop()
    [path] = (tmp_path / "acct").glob("*.csv")
    rows = list(csv.DictReader(path.open(newline="")))
    assert list(rows[0]) == ["type", "rcpt", "dsnStatus", "header_X-Correlation-ID"]
    assert [r["type"] for r in rows] == ["r", "d"] and rows[1]["header_X-Correlation-ID"] == "c-1"
    assert not (tmp_path / "spool" / "audit.sqlite").exists()


def test_retention_star_applies_to_classes_without_their_own_entry(tmp_path):
    from postlane.audit.service import retention_policies

    cfg = parse_config(config_text(tmp_path, 2525, """
[audit]
pseudonymisation_key = "k"
[audit.retention."*"]
pseudonymise = "30d"
delete = "60d"
[audit.retention.marketing]
delete = "7d"
"""))
    policies = retention_policies(cfg)
    assert (policies["marketing"].pseudonymise, policies["marketing"].delete) == (None, 604800)
    assert (policies["policy-documents"].pseudonymise,
            policies["policy-documents"].delete) == (2592000, 5184000)
