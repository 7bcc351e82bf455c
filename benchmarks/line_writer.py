"""Milliseconds per message for a client that writes DATA a line per ``send`` with Nagle on
(no TCP_NODELAY), the way PHPMailer and PHP's stream functions do, against a running node.

Usage: ``python benchmarks/line_writer.py PORT [--messages 200] [--lines 45]``: one connection,
the messages one after another (class ``policy-documents`` by header), plain SMTP; prints one
JSON line. A client that sends each message in one write (smtplib) is the comparison:
``--one-write``.
"""

from __future__ import annotations

import argparse
import json
import socket
import time


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("port", type=int)
    ap.add_argument("--messages", type=int, default=200)
    ap.add_argument("--lines", type=int, default=45)
    ap.add_argument("--one-write", action="store_true")
    args = ap.parse_args()
    sock = socket.create_connection(("127.0.0.1", args.port))  # Nagle on: Python's default
    f = sock.makefile("rb")

    def reply() -> bytes:
        while True:
            line = f.readline()
            if line[3:4] != b"-":
                return line

    def cmd(line: bytes) -> bytes:
        sock.sendall(line + b"\r\n")
        return reply()

    reply()
    cmd(b"EHLO line-writer.example")
    body = [b"From: notices@insurer.example\r\n", b"Subject: Renewal\r\n",
            b"X-Postlane-Class: policy-documents\r\n", b"\r\n"]
    body += [b"Dear customer, your policy renewal is attached below.\r\n"] * args.lines
    started = time.perf_counter()
    for i in range(args.messages):
        cmd(b"MAIL FROM:<notices@insurer.example>")
        cmd(b"RCPT TO:<r%d@example.com>" % i)
        cmd(b"DATA")
        lines = [b"To: r%d@example.com\r\n" % i, *body, b".\r\n"]
        if args.one_write:
            sock.sendall(b"".join(lines))
        else:
            for line in lines:
                sock.sendall(line)
        if not reply().startswith(b"250"):
            raise SystemExit("message refused")
    elapsed = time.perf_counter() - started
    cmd(b"QUIT")
    print(json.dumps({"messages": args.messages, "one_write": args.one_write,
                      "ms_per_message": round(elapsed * 1000 / args.messages, 2)}))


if __name__ == "__main__":
    main()
