"""Hostile input at the SMTP door: each gets a clear reply, nothing is smuggled, and the node
keeps serving the next client."""

from __future__ import annotations

import asyncio

import pytest

from tests.conftest import config_text, message, send
from tests.support.rawsmtp import session

SMUGGLED = (b"MAIL FROM:<evil@attacker.test>\r\nRCPT TO:<victim@example.com>\r\nDATA\r\n"
            b"Subject: smuggled\r\n\r\nowned\r\n")


async def _still_serving(node, sink, count: int) -> None:
    await send(node.listeners[0].port, "s@insurer.test", ["later@example.com"], message("later"))
    arrivals = await sink.wait_for(count)
    assert any(a.rcpts == ["later@example.com"] for a in arrivals)


@pytest.mark.parametrize("ending", [b"\n.\n", b"\r.\r", b"\r\n.\n", b"\n.\r\n", b"\r.\r\n",
                                    b"\r\n.\r", b"\n.\r", b"\r.\n"],
                         ids=["LF.LF", "CR.CR", "CRLF.LF", "LF.CRLF", "CR.CRLF", "CRLF.CR",
                              "LF.CR", "CR.LF"])
async def test_smtp_smuggling_variants_stay_one_message(tmp_path, sink, make_node, ending):
    node = await make_node(config_text(tmp_path, sink.port))
    raw = await session(node.listeners[0].port)
    assert (await raw.cmd("MAIL FROM:<s@insurer.test>")).startswith("250")
    assert (await raw.cmd("RCPT TO:<a@example.com>")).startswith("250")
    assert (await raw.cmd("DATA")).startswith("354")
    raw.send(b"Subject: carrier\r\n\r\nbody" + ending + SMUGGLED + b"\r\n.\r\n")
    assert (await raw.reply()).startswith("250 2.0.0")
    assert (await raw.cmd("QUIT")).startswith("221")
    [arrival] = await sink.wait_for(1)
    await _still_serving(node, sink, 2)
    assert len(sink.arrivals) == 2, "the smuggled transaction must not become a message"
    assert not sink.for_rcpt("victim@example.com")
    assert arrival.rcpts == ["a@example.com"]
    assert b"MAIL FROM:<evil@attacker.test>" in arrival.data  # stays inside the body
    lines = arrival.data.split(b"\r\n")
    assert b"\n" not in b"".join(lines) and b"\r" not in b"".join(lines), "no bare CR/LF left"


async def test_nul_invalid_utf8_and_malformed_mime_get_clear_replies(tmp_path, sink, make_node):
    node = await make_node(config_text(tmp_path, sink.port))
    raw = await session(node.listeners[0].port)
    assert (await raw.cmd(b"MAIL FROM:<\xff\xfe@insurer.test>\r\n")).startswith("501 5.1.7")
    assert (await raw.cmd(b"MAIL FROM:<s\x00@insurer.test>\r\n")).startswith("501")
    assert (await raw.cmd("MAIL FROM:<s@insurer.test>")).startswith("250")
    assert (await raw.cmd(b"RCPT TO:<\xc3\x28@example.com>\r\n")).startswith("501 5.1.3")
    assert (await raw.cmd(b"RCPT TO:<a\x00b@example.com>\r\n")).startswith("501")
    assert (await raw.cmd("RCPT TO:<a@example.com>")).startswith("250")
    assert (await raw.cmd("DATA")).startswith("354")
    body = (b"Subject: \xff\xfe broken \x00 utf8\r\nNo colon header line\r\n"
            b"Content-Type: multipart/mixed; boundary=\"never-closed\"\r\n\r\n"
            b"--never-closed\r\nContent-Type: text/plain\r\n\r\nnul \x00 here\r\n")
    raw.send(body + b".\r\n")
    assert (await raw.reply()).startswith("250 2.0.0")
    await raw.close()
    [arrival] = await sink.wait_for(1)
    assert b"nul \x00 here" in arrival.data  # carried, not silently altered
    await _still_serving(node, sink, 2)


async def test_absurdly_long_headers(tmp_path, sink, make_node):
    node = await make_node(config_text(tmp_path, sink.port))
    raw = await session(node.listeners[0].port)
    for data, expect in [(b"Subject: " + b"a" * 50_000 + b"\r\n\r\nx\r\n", "500 5.5.2"),
                         (b"X-Folded: start\r\n" + b"\tcontinued\r\n" * 5_000 + b"\r\nx\r\n",
                          "250 2.0.0"),
                         (b"X-Many: v\r\n" * 20_000 + b"\r\nx\r\n", "552 5.3.4")]:
        assert (await raw.cmd("MAIL FROM:<s@insurer.test>")).startswith("250")
        assert (await raw.cmd("RCPT TO:<a@example.com>")).startswith("250")
        assert (await raw.cmd("DATA")).startswith("354")
        raw.send(data + b".\r\n")
        assert (await raw.reply()).startswith(expect)
    await raw.close()
    await _still_serving(node, sink, 2)


@pytest.mark.parametrize("over", [1, 2, 3, 5000])
async def test_a_message_over_the_size_limit_gets_552_however_it_arrives(tmp_path, sink,
                                                                         make_node, over):
    """The read that crosses the limit may also hold the end mark (the whole message was
    buffered): the 552 comes at once instead of a wait for bytes that never come."""
    node = await make_node(config_text(tmp_path, sink.port))  # max_message_size = 100000
    raw = await session(node.listeners[0].port)
    line = b"x" * 98 + b"\r\n"
    body = line * (999 + over // 100) + b"y" * (98 + over % 100) + b"\r\n"
    assert len(body) == 100_000 + over
    assert (await raw.cmd("MAIL FROM:<s@insurer.test>")).startswith("250")
    assert (await raw.cmd("RCPT TO:<a@example.com>")).startswith("250")
    assert (await raw.cmd("DATA")).startswith("354")
    raw.send(body + b".\r\n")
    assert (await raw.reply()).startswith("552 5.3.4")
    assert (await raw.cmd("NOOP")).startswith("250")
    await raw.close()


@pytest.mark.parametrize("over", [0, 1])
@pytest.mark.parametrize("line", [b"..\r\n", b".x\r\n"])
async def test_the_size_limit_counts_the_message_not_its_stuffed_dots(tmp_path, sink,
                                                                      make_node, over, line):
    """RFC 1870: a transparent dot is not an octet of the message. 20,000 lines of "." are
    60,000 octets and 80,000 on the wire (so are 20,000 lines ".x" a client did not stuff: the
    line's first dot is taken off all the same); with the rest the message is exactly at the
    limit (accepted, delivered as sent) or one octet over it (552)."""
    node = await make_node(config_text(tmp_path, sink.port))  # max_message_size = 100000
    raw = await session(node.listeners[0].port)
    head = b"From: s@insurer.test\r\nTo: a@example.com\r\nSubject: dots\r\n\r\n"
    rest = 100_000 + over - len(head) - 60_000
    tail = (b"x" * 98 + b"\r\n") * (rest // 100 - 1) + b"y" * (rest % 100 + 98) + b"\r\n"
    assert len(head + b".\r\n" * 20_000 + tail) == 100_000 + over
    assert (await raw.cmd("MAIL FROM:<s@insurer.test>")).startswith("250")
    assert (await raw.cmd("RCPT TO:<a@example.com>")).startswith("250")
    assert (await raw.cmd("DATA")).startswith("354")
    raw.send(head + line * 20_000 + tail + b".\r\n")
    reply = await raw.reply()
    await raw.close()
    if over:
        assert reply.startswith("552 5.3.4")
        return
    assert reply.startswith("250")
    await sink.wait_for(1)
    assert sink.arrivals[0].data.endswith(b"\r\n\r\n" + line[1:] * 20_000 + tail)


async def test_ten_thousand_recipients(tmp_path, sink, make_node):
    node = await make_node(config_text(tmp_path, sink.port).replace(
        "max_message_size = 100000", "max_message_size = 100000\nmax_recipients = 50"))
    raw = await session(node.listeners[0].port)
    raw.send(b"MAIL FROM:<s@insurer.test>\r\n"
             + b"".join(b"RCPT TO:<r%d@example.com>\r\n" % i for i in range(10_000)))
    received = b""
    while received.count(b"\r\n") < 10_001:
        received += await raw.reader.read(1 << 20)
    mail, *replies = received.decode().split("\r\n")[:-1]
    assert mail.startswith("250")
    assert sum(r.startswith("250 2.1.5") for r in replies) == 50
    assert sum(r.startswith("452 4.5.3") for r in replies) == 9_950
    assert (await raw.cmd("DATA")).startswith("354")
    raw.send(message() + b".\r\n")
    assert (await raw.reply()).startswith("250 2.0.0")
    await raw.close()
    await sink.wait_for(1)
    assert sum(len(a.rcpts) for a in sink.arrivals) == 50
    await _still_serving(node, sink, 2)


@pytest.mark.parametrize("piece", [1, 2, 3, 5, 4096], ids=lambda n: f"{n}-byte writes")
async def test_end_of_data_found_whatever_the_packet_boundaries(tmp_path, sink, make_node,
                                                                piece):
    """The DATA reader jumps to CRLF.CRLF; a mark split across reads, a message that is
    only ".", dot-stuffed lines and lines ending with a full stop must all come out right."""
    node = await make_node(config_text(tmp_path, sink.port))
    raw = await session(node.listeners[0].port)
    bodies = [b"", b"x", b"Ends with a full stop.\r\nAnd again.\r\n..stuffed\r\n..\r\n",
              b"\r\n\r\n.\r.\n"]
    for i, body in enumerate(bodies):
        assert (await raw.cmd("MAIL FROM:<s@insurer.test>")).startswith("250")
        assert (await raw.cmd(f"RCPT TO:<r{i}@example.com>")).startswith("250")
        assert (await raw.cmd("DATA")).startswith("354")
        data = (b"Subject: %d\r\n\r\n" % i + body if body else b"") + b"\r\n.\r\n"
        if not body:
            data = b".\r\n"  # the whole message is the end mark
        # the next command is pipelined behind the mark, in the same pieces
        stream = data + b"NOOP\r\n"
        for at in range(0, len(stream), piece):
            raw.send(stream[at:at + piece])
            await raw.writer.drain()
            await asyncio.sleep(0.001)  # the scenario: a pause between pieces, so the node
            # reads them separately (split as they are on the wire)
        assert (await raw.reply()).startswith("250 2.0.0"), body
        assert (await raw.reply()).startswith("250"), "NOOP stays a command"
    await raw.close()
    arrivals = await sink.wait_for(len(bodies))
    got = {a.rcpts[0]: a.data for a in arrivals}
    assert b"Ends with a full stop.\r\nAnd again.\r\n.stuffed\r\n.\r\n" in got[
        "r2@example.com"]
    assert got["r1@example.com"].endswith(b"\r\n\r\nx\r\n")
    assert b"Subject: 3" in got["r3@example.com"]


async def test_pipelined_commands_get_every_reply_in_order(tmp_path, sink, make_node):
    """RFC 2920: replies to a pipelined group may be sent together, but all of them, in order,
    and never held while the server waits for the client (a bare-LF line is not a command)."""
    node = await make_node(config_text(tmp_path, sink.port))
    raw = await session(node.listeners[0].port)
    raw.send(b"RSET\r\nMAIL FROM:<s@insurer.test>\r\nRCPT TO:<a@example.com>\r\n"
             b"RCPT TO:<nodomain>\r\nRCPT TO:<b@example.com>\r\nDATA\r\n")
    replies = [(await raw.reply())[:3] for _ in range(6)]
    assert replies == ["250", "250", "250", "501", "250", "354"]
    raw.send(b"Subject: pipelined\r\n\r\nbody\r\n.\r\nNOOP\r\nNOOP\r\nQUIT\r\n")
    replies = [(await raw.reply())[:3] for _ in range(4)]
    assert replies == ["250", "250", "250", "221"]
    assert await raw.closed()
    [arrival] = await sink.wait_for(1)
    assert arrival.rcpts == ["a@example.com", "b@example.com"]
    raw = await session(node.listeners[0].port)
    raw.send(b"NOOP\r\nNOOP\n")  # the second is no command until its CRLF comes
    assert (await raw.reply(timeout=5)).startswith("250")
    await raw.close()


async def test_a_354_is_never_held_behind_pipelined_250s(tmp_path, sink, make_node):
    """A client that sends the start of its message before the 354 and then waits for the
    replies gets them: the 250s of MAIL and RCPT, held while more input was buffered, were
    held with the 354 too, and the node waited for the rest of the message (421 after
    command_timeout)."""
    node = await make_node(config_text(tmp_path, sink.port))
    raw = await session(node.listeners[0].port)
    raw.send(b"MAIL FROM:<s@insurer.test>\r\nRCPT TO:<early@example.com>\r\nDATA\r\n"
             b"Subject: early\r\n")
    assert [(await raw.reply(timeout=5))[:3] for _ in range(3)] == ["250", "250", "354"]
    raw.send(b"\r\nbody\r\n.\r\n")
    assert (await raw.reply()).startswith("250 2.0.0")
    await raw.close()
    [arrival] = await sink.wait_for(1)
    assert arrival.rcpts == ["early@example.com"]


async def test_replies_never_echo_control_characters(tmp_path, sink, make_node):
    """aiosmtpd names an unknown command in its reply as sent: a NUL, an ESC (terminal
    escapes in the client's log) or a bare CR went back to the client inside a reply line."""
    node = await make_node(config_text(tmp_path, sink.port))
    raw = await session(node.listeners[0].port)
    for line in (b"X\x00Y", b"A\x1b[2JB", b"FOO\rBAR"):
        raw.send(line + b"\r\n")
        reply = await raw.reader.readline()
        assert reply.startswith(b"500 5.5.1") and reply.endswith(b"\r\n"), reply
        assert all(32 <= byte < 127 for byte in reply[:-2]), reply
    assert (await raw.cmd("NOOP")).startswith("250")
    await raw.close()
