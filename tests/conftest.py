"""Shared fixtures: a recording sink, configs routed to it, an in-process node, an SMTP client."""

from __future__ import annotations

import asyncio
import csv
import smtplib
from pathlib import Path

import pytest

from postlane.harness.sink import Sink
from postlane.node import Node
from postlane.operations import Operator
from postlane.startup import parse_config
from tests.support.audit import audit_backend  # noqa: F401  (fixture)
from tests.support.fixtures_dns import dns_server  # noqa: F401  (fixture)
from tests.support.pg import pg_schema, two_spools  # noqa: F401  (fixtures)
from tests.support.shared import SHARED  # noqa: F401  (re-exported)
from tests.support.smallfs import small_fs  # noqa: F401  (fixture)

OPERATOR = Operator("tester", "api")
"""Who the tests' operator actions are on the record as."""


def config_text(tmp_path: Path, sink_port: int, extra: str = "", *, listener_port: int = 0,
                routes: bool = True, critical_ips: int = 1, max_out: int = 4,
                marketing_max_out: int = 4) -> str:
    """A small two-class config on loopback; ``extra`` is appended TOML."""
    crit = ", ".join(f'{{ address = "127.0.0.{20 + i}", ehlo = "tx{i}.test", '
                     f'max_smtp_out = {max_out} }}' for i in range(critical_ips))
    route = f'[routes]\n"example.com" = "127.0.0.1:{sink_port}"\n' if routes else ""
    return f"""
default_class = "marketing"
[node]
name = "test-node"
hostname = "mta.test"
spool = "{tmp_path}/spool"
drain_timeout = 5
[listeners.in]
address = "127.0.0.1"
port = {listener_port}
relay_from = ["127.0.0.0/8"]
max_message_size = 100000
[pools.critical]
pausable = false
ips = [{crit}]
[pools.bulk]
ips = [{{ address = "127.0.0.30", ehlo = "bulk.test", max_smtp_out = {marketing_max_out} }}]
[classes.policy-documents]
pool = "critical"
priority = 0
sla = "2m"
retry = ["1s", "1s", "2s"]
expiry = "1h"
[classes.marketing]
pool = "bulk"
priority = 3
retry = ["1s", "2s"]
expiry = "1h"
[relay]
smtp_port = {sink_port}
idle_timeout = 0.5
[accounting]
directory = "{tmp_path}/acct"
formats = ["csv", "jsonl"]
[api]
port = 0
token_file = "{tmp_path}/api-token"
{route}{extra}
"""


@pytest.fixture
async def sink():
    s = await Sink().start()
    yield s
    await s.stop()


@pytest.fixture
async def make_node(tmp_path):
    nodes: list[Node] = []

    async def factory(text: str) -> Node:
        node = Node(parse_config(text))
        await node.start()
        nodes.append(node)
        return node

    yield factory
    for node in nodes:
        if not node.stopped.is_set():
            await node.stop()


def records(tmp_path: Path) -> list[dict]:
    """Every accounting record the node in ``tmp_path`` wrote (CSV files, in order)."""
    rows: list[dict] = []
    for path in sorted((tmp_path / "acct").glob("*.csv")):
        with open(path, newline="") as fh:
            rows.extend(csv.DictReader(fh))
    return rows


def message(subject: str = "hello", *, cls: str | None = None, extra: str = "",
            body: str = "Hello.\r\n") -> bytes:
    head = f"From: sender@insurer.test\r\nTo: someone@example.com\r\nSubject: {subject}\r\n"
    if cls:
        head += f"X-Postlane-Class: {cls}\r\n"
    return (head + extra + "\r\n" + body).encode()


def _send_sync(port: int, mail_from: str, rcpts: list[str], data: bytes,
               mail_options: list[str] | None = None,
               rcpt_options: list[str] | None = None) -> dict:
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        return client.sendmail(mail_from, rcpts, data, mail_options or [], rcpt_options or [])


async def send(port: int, mail_from: str, rcpts: list[str], data: bytes,
               mail_options: list[str] | None = None,
               rcpt_options: list[str] | None = None) -> dict:
    """Submit over real SMTP (stdlib smtplib in a thread)."""
    return await asyncio.to_thread(_send_sync, port, mail_from, rcpts, data, mail_options,
                                   rcpt_options)
