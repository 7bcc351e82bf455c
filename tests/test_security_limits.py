"""Each intake limit: its refusal, its enhanced status code, and the node serving on after it."""

from __future__ import annotations

import asyncio

from tests.conftest import config_text, message, send
from tests.support.rawsmtp import RawSMTP, session
from tests.support.waiting import until


def limited(tmp_path, sink_port, limits: str, extra: str = "", relay_from: str | None = None
            ) -> str:
    text = config_text(tmp_path, sink_port, f"[listeners.in.limits]\n{limits}\n{extra}")
    if relay_from is not None:
        text = text.replace('relay_from = ["127.0.0.0/8"]', f"relay_from = {relay_from}")
    return text


async def test_connections_per_ip_and_in_total(tmp_path, sink, make_node):
    node = await make_node(limited(tmp_path, sink.port,
                                   "max_connections_per_ip = 2\nmax_connections = 4",
                                   relay_from='["127.0.0.9/32"]'))
    port = node.listeners[0].port
    trusted = [await RawSMTP.connect(port, source="127.0.0.9") for _ in range(3)]
    for raw in trusted:  # relay_from clients are exempt from the per-IP count
        assert (await raw.reply()).startswith("220")
    await trusted.pop().close()
    await trusted.pop().close()
    await until(lambda: node.listeners[0].handler.guard.connections.total <= 1,
                what="the closed trusted connections given back")
    first = [await RawSMTP.connect(port) for _ in range(2)]
    for raw in first:
        assert (await raw.reply()).startswith("220")
    third = await RawSMTP.connect(port)
    assert (await third.reply()).startswith("421 4.7.0 Too many connections from your address")
    assert await third.closed()
    other = await RawSMTP.connect(port, source="127.0.0.2")  # another client IP still gets in
    assert (await other.reply()).startswith("220")
    fourth = await RawSMTP.connect(port, source="127.0.0.3")  # the trusted one takes no slot
    assert (await fourth.reply()).startswith("220")
    fifth = await RawSMTP.connect(port, source="127.0.0.4")
    assert (await fifth.reply()).startswith("421 4.7.0 Too many connections,")
    await first[0].cmd("QUIT")
    await first[0].close()
    # the slot is released once the server sees the close
    await until(lambda: node.listeners[0].handler.guard.connections.per_ip["127.0.0.1"] < 2,
                what="the closed connection's slot released")
    again = await RawSMTP.connect(port)
    assert (await again.reply()).startswith("220")
    for raw in (first[1], other, fourth, again, *trusted):
        await raw.close()


async def test_strangers_filling_the_slots_lock_out_no_trusted_client(tmp_path, sink,
                                                                     make_node):
    """Idle strangers holding every slot (slot exhaustion): the applications in relay_from
    still get in and submit, and once strangers hold 80 % of the slots their idle connections
    get the short stress timeout, so the slots come free (Postfix's smtpd under stress)."""
    # a 3 s stress timeout, not 1 s: the steps from the stress to the refused sixth connection
    # must come within it (1.2 s late, as on a loaded machine, a stranger was already cut and
    # the sixth got a 220)
    node = await make_node(limited(
        tmp_path, sink.port, 'max_connections = 5\npregreet_wait = 0\nstress_timeout = "3s"',
        relay_from='["127.0.0.1/32"]'))
    port = node.listeners[0].port
    idle = [await RawSMTP.connect(port, source=f"127.0.0.{2 + i}") for i in range(3)]
    for raw in idle:
        assert (await raw.reply()).startswith("220")
    assert not node.listeners[0].handler.guard.connections.stressed
    idle += [await RawSMTP.connect(port, source=f"127.0.0.{5 + i}") for i in range(2)]
    for raw in idle[3:]:
        assert (await raw.reply()).startswith("220")
    refused = await RawSMTP.connect(port, source="127.0.0.8")
    assert (await refused.reply()).startswith("421 4.7.0 Too many connections,")
    app = await session(port)  # 127.0.0.1: trusted
    assert (await app.cmd("MAIL FROM:<s@insurer.test>")).startswith("250")
    assert (await app.cmd("RCPT TO:<a@example.com>")).startswith("250")
    assert (await app.cmd("DATA")).startswith("354")
    app.send(message() + b".\r\n")
    assert (await app.reply()).startswith("250")
    # every idle stranger, including the three that came before the stress, is cut
    for raw in idle:
        assert (await raw.reply(timeout=60)).startswith("421 4.4.2 Idle too long")
        assert await raw.closed()
    await until(lambda: not node.listeners[0].handler.guard.connections.stressed,
                what="the stress over")
    late = await RawSMTP.connect(port, source="127.0.0.8")
    assert (await late.reply()).startswith("220")
    assert (await late.cmd("EHLO late.test")).startswith("250")
    await app.close()
    await late.close()
    await sink.wait_for(1)


async def test_recipients_size_and_line_length(tmp_path, sink, make_node):
    node = await make_node(config_text(tmp_path, sink.port, """
[listeners.in.limits]
max_line_length = 200
""").replace("max_message_size = 100000", "max_message_size = 100000\nmax_recipients = 3"))
    raw = await session(node.listeners[0].port)
    assert (await raw.cmd("MAIL FROM:<s@insurer.test>")).startswith("250")
    replies = [await raw.cmd(f"RCPT TO:<r{i}@example.com>") for i in range(4)]
    assert [r[:9] for r in replies] == ["250 2.1.5"] * 3 + ["452 4.5.3"]
    assert (await raw.cmd("DATA")).startswith("354")
    raw.send(b"Subject: long\r\n\r\n" + b"x" * 500 + b"\r\n.\r\n")
    assert (await raw.reply()).startswith("500 5.5.2 Line too long")
    assert (await raw.cmd("MAIL FROM:<s@insurer.test>")).startswith("250")
    assert (await raw.cmd("RCPT TO:<r@example.com>")).startswith("250")
    assert (await raw.cmd("DATA")).startswith("354")
    raw.send((b"y" * 150 + b"\r\n") * 1000 + b".\r\n")
    assert (await raw.reply()).startswith("552 5.3.4")
    assert (await raw.cmd("MAIL FROM:<s@insurer.test>")).startswith("250")
    assert (await raw.cmd("RCPT TO:<r@example.com>")).startswith("250")
    assert (await raw.cmd("DATA")).startswith("354")
    raw.send(b"Subject: ok\r\n\r\n" + b"z" * 190 + b"\r\n.\r\n")
    assert (await raw.reply()).startswith("250 2.0.0")
    await raw.close()
    [arrival] = await sink.wait_for(1)
    assert arrival.rcpts == ["r@example.com"]


async def test_idle_connection_gets_421_then_closed(tmp_path, sink, make_node):
    node = await make_node(limited(tmp_path, sink.port, 'command_timeout = "0.3s"'))
    raw = await session(node.listeners[0].port)
    assert (await raw.reply(timeout=10)).startswith("421 4.4.2")
    assert await raw.closed()


async def test_each_command_restarts_the_idle_clock(tmp_path, sink, make_node):
    """The idle clock is one timer per connection whose deadline each command moves: a client
    that keeps talking is never cut, and one that stops is cut once the deadline passes."""
    # a 2 s clock and a command every 0.5 s: 4 s in total, twice the clock, never idle for
    # more than 0.5 s; the 1.5 s to spare is a late wakeup a loaded machine may give (with a
    # 0.5 s clock and 0.2 s pauses, one wakeup 0.4 s late cut the client)
    node = await make_node(limited(tmp_path, sink.port, 'command_timeout = "2s"'))
    raw = await session(node.listeners[0].port)
    for _ in range(8):
        assert (await raw.cmd("NOOP")).startswith("250")
        await asyncio.sleep(0.5)  # the scenario: real time passes on the node's idle clock
    assert (await raw.reply(timeout=10)).startswith("421 4.4.2 Idle too long")
    assert await raw.closed()


async def test_bad_commands_disconnect(tmp_path, sink, make_node):
    node = await make_node(limited(tmp_path, sink.port, "max_bad_commands = 3"))
    raw = await session(node.listeners[0].port)
    assert (await raw.cmd("MAIL FROM:<bad address>")).startswith("501")
    assert (await raw.cmd("RCPT TO:<x@example.com>")).startswith("503 5.5.1")  # not counted
    assert (await raw.cmd("EHLO")).startswith("501 5.5.4")
    raw.send(b"XYZZY\r\n")
    assert (await raw.reply()).startswith("500 5.5.1")
    assert (await raw.reply()).startswith("421 4.7.0 Too many errors")
    assert await raw.closed()
    await send(node.listeners[0].port, "s@insurer.test", ["a@example.com"], message())
    await sink.wait_for(1)


async def test_messages_per_minute(tmp_path, sink, make_node):
    node = await make_node(limited(tmp_path, sink.port, "messages_per_minute = 2",
                                   relay_from='["127.0.0.9/32"]'))
    raw = await session(node.listeners[0].port)
    for _ in range(2):
        assert (await raw.cmd("MAIL FROM:<s@insurer.test>")).startswith("250")
        assert (await raw.cmd("RSET")).startswith("250 2.0.0")
    assert (await raw.cmd("MAIL FROM:<s@insurer.test>")).startswith("450 4.7.1")
    await raw.close()
    trusted = await RawSMTP.connect(node.listeners[0].port, source="127.0.0.9")
    assert (await trusted.reply()).startswith("220")
    assert (await trusted.cmd("EHLO app.test")).startswith("250")
    for _ in range(5):  # relay_from clients are exempt
        assert (await trusted.cmd("MAIL FROM:<s@insurer.test>")).startswith("250")
        assert (await trusted.cmd("RSET")).startswith("250")
    await trusted.close()


async def test_low_disk_space_refuses_with_452_and_recovers(tmp_path, sink, make_node):
    node = await make_node(config_text(tmp_path, sink.port, "[security]\nmin_free_space = 0\n"))
    port = node.listeners[0].port
    sink.delay = 0.5  # the first message is still queued while the disk "fills"
    await send(port, "s@insurer.test", ["before@example.com"], message())
    disk = node.intake.disk
    raw = await session(port)
    assert (await raw.cmd("MAIL FROM:<s@insurer.test>")).startswith("250")
    assert (await raw.cmd("RCPT TO:<during@example.com>")).startswith("250")
    disk.min_free, _ = 1 << 60, disk.recheck()
    assert (await raw.cmd("RCPT TO:<during2@example.com>")).startswith("452 4.3.1")
    assert (await raw.cmd("DATA")).startswith("354")
    raw.send(message() + b".\r\n")
    assert (await raw.reply()).startswith("452 4.3.1"), "not stored, so not acknowledged"
    assert (await raw.cmd("MAIL FROM:<s@insurer.test>")).startswith("452 4.3.1")
    disk.min_free, _ = 0, disk.recheck()  # space returns: intake resumes on its own
    assert (await raw.cmd("MAIL FROM:<s@insurer.test>")).startswith("250")
    assert (await raw.cmd("RCPT TO:<after@example.com>")).startswith("250")
    assert (await raw.cmd("DATA")).startswith("354")
    raw.send(message() + b".\r\n")
    assert (await raw.reply()).startswith("250")
    await raw.close()
    arrivals = await sink.wait_for(2)
    assert sorted(a.rcpts[0] for a in arrivals) == ["after@example.com", "before@example.com"]
    assert node.intake.accepted == 2


async def test_command_timeout_is_idle_time_during_a_slow_data_transfer(tmp_path, sink,
                                                                        make_node):
    node = await make_node(limited(tmp_path, sink.port, 'command_timeout = "2s"\n'
                                                        "min_data_rate = 0"))
    raw = await session(node.listeners[0].port)
    assert (await raw.cmd("MAIL FROM:<s@insurer.test>")).startswith("250")
    assert (await raw.cmd("RCPT TO:<slow@example.com>")).startswith("250")
    assert (await raw.cmd("DATA")).startswith("354")
    raw.send(b"Subject: slow\r\n\r\n")
    # a line every 0.5 s against a 2 s clock: 4 s in total, twice the clock, with 1.5 s to
    # spare for a late wakeup (a 0.5 s clock with 0.2 s pauses failed on one 0.4 s late)
    for i in range(8):
        raw.send(b"line %d\r\n" % i)
        await raw.writer.drain()
        await asyncio.sleep(0.5)  # the scenario: a slow sender, in real time
    raw.send(b".\r\n")
    assert (await raw.reply()).startswith("250 2.0.0")
    await raw.close()
    await sink.wait_for(1)


async def test_unknown_commands_count_as_bad_commands_then_421(tmp_path, sink, make_node):
    """aiosmtpd closed the session at the 5th unknown command with a 502, whatever
    ``max_bad_commands`` said; an unknown command is a bad command like the others."""
    node = await make_node(limited(tmp_path, sink.port, "max_bad_commands = 8"))
    raw = await session(node.listeners[0].port)
    for i in range(7):
        assert (await raw.cmd(f"XCMD{i}")).startswith("500 5.5.1"), i
    assert (await raw.cmd("NOOP")).startswith("250"), "the session goes on"
    assert (await raw.cmd("XCMD7")).startswith("500 5.5.1")
    assert (await raw.reply()).startswith("421 4.7.0 Too many errors")
    assert await raw.closed()


async def test_junk_commands_beyond_the_limit_count_as_bad_ones(tmp_path, sink, make_node):
    """NOOP, RSET, VRFY, EXPN and HELP cost nothing: without a limit one client held a slot
    for ever by sending one before each idle timeout. Beyond ``max_junk_commands`` since the
    last accepted message each is a bad command (Postfix's smtpd_junk_command_limit)."""
    node = await make_node(limited(tmp_path, sink.port,
                                   "max_junk_commands = 4\nmax_bad_commands = 2"))
    raw = await session(node.listeners[0].port)
    for verb in ("NOOP", "RSET", "VRFY anna", "HELP"):
        assert (await raw.cmd(verb))[0] == "2", verb
    assert (await raw.cmd("MAIL FROM:<app@insurer.example>")).startswith("250")
    assert (await raw.cmd("RCPT TO:<anna@example.com>")).startswith("250")
    assert (await raw.cmd("DATA")).startswith("354")
    assert (await raw.cmd("Subject: x\r\n\r\nbody\r\n.")).startswith("250")
    for _ in range(4):  # an accepted message starts the count again
        assert (await raw.cmd("NOOP")).startswith("250")
    assert (await raw.cmd("NOOP")).startswith("250"), "the 5th is answered, and counted"
    assert (await raw.cmd("NOOP")).startswith("250")
    assert (await raw.reply()).startswith("421 4.7.0 Too many errors")
    assert await raw.closed()
