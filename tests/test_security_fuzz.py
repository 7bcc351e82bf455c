"""Property-based fuzzing: random SMTP sessions against a live listener (it always answers and
stays up) and random configs (a Config or a ConfigError, never another exception)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import socket
import tempfile
import threading
import tomllib
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from postlane.config import Config
from postlane.edge.smtp import has_long_line
from postlane.harness.sink import Sink
from postlane.node import Node
from postlane.policy.users import User, hash_password, save_user
from postlane.startup import ConfigError, parse_config
from tests.conftest import config_text

REPLY = re.compile(rb"^\d{3}[ -]")


def _threaded_node(tmp, extra: str, relay_from: str = '["127.0.0.0/8"]'):
    """A node and sink on their own event loop in a thread, shared by every example (hypothesis
    examples are synchronous); yields (node, stop)."""
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    box: dict = {}

    async def main() -> None:
        sink = await Sink(keep_data=False).start()
        text = config_text(tmp, sink.port, extra).replace(
            'relay_from = ["127.0.0.0/8"]', f"relay_from = {relay_from}")
        node = Node(parse_config(text))
        await node.start()
        box.update(node=node, sink=sink, stop=asyncio.Event())
        ready.set()
        await box["stop"].wait()
        await node.stop()
        await sink.stop()

    thread = threading.Thread(target=loop.run_until_complete, args=(main(),), daemon=True)
    thread.start()
    assert ready.wait(30)

    def stop() -> None:
        loop.call_soon_threadsafe(box["stop"].set)
        thread.join(30)

    return box["node"], box["sink"], stop


LIMITS = """
[listeners.in.limits]
command_timeout = "3s"
messages_per_minute = 0
"""


@pytest.fixture(scope="module")
def live_node(tmp_path_factory):
    node, _, stop = _threaded_node(tmp_path_factory.mktemp("fuzz"), LIMITS)
    yield node.listeners[0].port
    stop()


@pytest.fixture(scope="module")
def closed_node(tmp_path_factory):
    """No client IP may relay and there are no users: nothing may ever be accepted."""
    node, sink, stop = _threaded_node(tmp_path_factory.mktemp("closed"),
                                      LIMITS + "pregreet_wait = 0\n", "[]")
    yield node, sink
    stop()


_ADDR = st.sampled_from(["<a@example.com>", "<>", "<x@insurer.test>", "a@example.com",
                         "<bad address>", "<\xff@x>", "<" + "a" * 300 + "@example.com>"])
_COMMAND = st.one_of(
    st.builds(lambda a: f"MAIL FROM:{a}", _ADDR),
    st.builds(lambda a, p: f"RCPT TO:{a} {p}", _ADDR,
              st.sampled_from(["", "NOTIFY=NEVER", "NOTIFY=BOGUS", "ORCPT=rfc822;a@b"])),
    st.sampled_from(["EHLO fuzz.test", "HELO fuzz.test", "EHLO", "DATA", "RSET", "NOOP", "VRFY x",
                     "HELP", "STARTTLS", "AUTH PLAIN AGFsaWNlAHB3", "AUTH LOGIN", "BDAT 10",
                     "X-UNKNOWN", "", ".", "MAIL FROM:<a@example.com> SIZE=99999999999"]),
    st.text(max_size=80),
).map(lambda s: s.encode("utf-8", "surrogateescape"))
_LINE = st.one_of(_COMMAND, st.binary(max_size=120))
_EOL = st.sampled_from([b"\r\n", b"\n", b"\r", b"\r\n\r\n"])


def _session(port: int, lines: list[tuple[bytes, bytes]]) -> bytes:
    payload = b"".join(line + eol for line, eol in lines) + b"\r\n.\r\nQUIT\r\n"
    with socket.create_connection(("127.0.0.1", port), timeout=15) as sock:
        sock.sendall(payload)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    return received


_SESSIONS = st.lists(st.tuples(_LINE, _EOL), max_size=25)


@settings(max_examples=50, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(_SESSIONS)
def test_random_smtp_sessions_always_get_answers(live_node, lines):
    received = _session(live_node, lines)
    assert received.startswith(b"220 ")
    for line in received.split(b"\r\n")[:-1]:
        assert REPLY.match(line), line
    with socket.create_connection(("127.0.0.1", live_node), timeout=15) as sock:  # still up
        assert sock.recv(1024).startswith(b"220 ")


_RELAY_TRY = st.lists(st.one_of(
    st.tuples(st.sampled_from([b"EHLO x", b"HELO x", b"MAIL FROM:<a@example.com>",
                               b"MAIL FROM:<>", b"RCPT TO:<v@example.com>",
                               b"RCPT TO:<v@example.com> NOTIFY=NEVER", b"DATA",
                               b"Subject: x", b"", b".", b"RSET", b"AUTH PLAIN AGEAYg=="]),
              _EOL),
    st.tuples(_LINE, _EOL)), max_size=30)


@settings(max_examples=50, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(_RELAY_TRY)
@example([(b"EHLO x", b"\r\n"), (b"MAIL FROM:<a@example.com>", b"\r\n"),
          (b"RCPT TO:<v@example.com>", b"\r\n"), (b"DATA", b"\r\n"), (b"x", b"\r\n")])
def test_no_random_session_gets_mail_relayed(closed_node, lines):
    node, sink = closed_node
    _session(node.listeners[0].port, lines)
    assert node.intake.accepted == 0 and not sink.arrivals


_USERS = Path(tempfile.mkdtemp()) / "users.toml"
save_user(_USERS, User("app", hash_password("fuzz-password"), ["marketing"], "marketing", ["*"]))
BASE = tomllib.loads(config_text(Path("/tmp/fuzz-never-created"), 2525, f"""
[security]
users_file = "{_USERS}"
min_free_space = "1MB"
"""))
BASE["listeners"]["in"].update(tls="none", tls_cert="/nonexistent/cert.pem", require_auth=False,
                               limits={"max_connections": 10, "command_timeout": "1m",
                                       "messages_per_minute": 0})
_SCALAR = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70),
                    st.floats(allow_nan=False, allow_infinity=False),
                    st.text(max_size=30), st.sampled_from(["30s", "2m", "10MB", "-1", "1e999",
                                                           "127.0.0.1", "::1", "starttls"]))
_VALUE = st.recursive(_SCALAR, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=12), inner, max_size=4)),
    max_leaves=10)


def _toml(value) -> str:
    """Inline TOML for a value (None becomes a missing key by the caller)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value if v is not None) + "]"
    return "{" + ", ".join(f"{json.dumps(k)} = {_toml(v)}" for k, v in value.items()
                           if v is not None) + "}"


def _paths(node, prefix=()):
    yield prefix
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _paths(value, (*prefix, key))


_BASE_PATHS = [p for p in _paths(BASE) if p]


def _text(data: dict) -> str:
    return "\n".join(f"{json.dumps(k)} = {_toml(v)}" for k, v in data.items() if v is not None)


def test_the_config_mutations_start_from_is_valid():
    assert isinstance(parse_config(_text(BASE)), Config)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(_BASE_PATHS), _VALUE), min_size=1, max_size=4))
def test_mutated_configs_give_config_or_config_error(mutations):
    data = json.loads(json.dumps(BASE))
    for path, value in mutations:
        target = data
        for key in path[:-1]:
            target = target.get(key) if isinstance(target, dict) else None
        if isinstance(target, dict):
            if value is None:
                target.pop(path[-1], None)
            else:
                target[path[-1]] = value
    try:
        cfg = parse_config(_text(data))
    except ConfigError as exc:
        assert exc.errors and all(": " in e for e in exc.errors)
    else:
        assert isinstance(cfg, Config)


@settings(max_examples=50, deadline=None)
@given(st.text(max_size=300))
def test_random_text_configs_give_config_or_config_error(text):
    with contextlib.suppress(ConfigError):
        parse_config(text)


@settings(max_examples=400, deadline=None)
@given(st.lists(st.sampled_from([b"a", b"\r\n", b"\r", b"\n", b"x" * 7]), max_size=60),
       st.integers(min_value=2, max_value=20))
def test_long_line_check_matches_splitting(parts, limit):
    """The DATA reader's windowed line-length check agrees with splitting into lines."""
    data = b"".join(parts)
    assert has_long_line(data, limit) == any(len(line) > limit - 2
                                             for line in data.split(b"\r\n"))
