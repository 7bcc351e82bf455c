"""A long run against a node that is already running: does anything grow without bound?

Drives a node's submission listener (STARTTLS + AUTH PLAIN) for ``--minutes`` with a mix of
well-behaved and broken clients, scrapes ``/metrics`` and ``GET /api/v1/status`` every second,
and every ``--sample`` seconds prints one JSON line of the node's figures: RSS (the node and its
child processes), open fds, threads, the spool's and the audit store's file sizes (with their
WAL), the ``postlane_event_loop_tasks`` gauge, the established connections on the listener and
the queue depth. It stops by itself; everything goes to loopback addresses only.

The clients (threads, each at a modest pace; ~5 messages a second in all by default):

- ``senders``: STARTTLS, AUTH, 1-5 messages, QUIT, reconnect;
- ``abort_data``: AUTH, MAIL, RCPT, DATA, half a message, then the socket closed;
- ``tls_drop``: STARTTLS, then the TCP connection dropped in the handshake (nothing sent, half
  a ClientHello, or the whole ClientHello and a reset);
- ``tls_silent``: STARTTLS, then nothing until the node closes the connection;
- ``idle``: EHLO (or the whole login), then nothing until the node's 421.

Other phases: ``big`` (``--big-count`` concurrent messages of ``--big-mb`` MB each, the node's
peak RSS sampled every 0.2 s) and ``rcpt`` (one message to ``--rcpts`` recipients).

Usage (docs/performance.md, *Running for a long time*)::

    python benchmarks/soak.py soak --pid NODE_PID --host 127.0.4.1 --port 3401 \
        --api http://127.0.4.1:3403 --token-file DIR/api-token --spool DIR/var/spool \
        --user app --password-file DIR/pw --minutes 18
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import smtplib
import socket
import ssl
import struct
import sys
import threading
import time
import urllib.request
from pathlib import Path

STOP = threading.Event()
COUNTS: dict[str, int] = {}
_LOCK = threading.Lock()


def count(key: str, n: int = 1) -> None:
    with _LOCK:
        COUNTS[key] = COUNTS.get(key, 0) + n


def _ctx() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def _message(i: int, size: int = 2000, rcpt: str = "someone@dest.example") -> bytes:
    body = ("x" * 76 + "\r\n") * max(1, size // 78)
    return (f"From: app@soak.test\r\nTo: {rcpt}\r\nSubject: soak {i}\r\n"
            f"Message-ID: <soak-{i}-{random.getrandbits(48)}@soak.test>\r\n\r\n{body}").encode()


class Client:
    def __init__(self, args: argparse.Namespace) -> None:
        self.a = args
        self.password = Path(args.password_file).read_text().splitlines()[0]

    def login(self, timeout: float = 30.0) -> smtplib.SMTP:
        s = smtplib.SMTP(self.a.host, self.a.port, timeout=timeout)
        s.ehlo("client.soak.test")
        s.starttls(context=_ctx())
        s.ehlo("client.soak.test")
        s.login(self.a.user, self.password)
        return s

    def raw(self, timeout: float = 30.0) -> tuple[socket.socket, bytes]:
        sock = socket.create_connection((self.a.host, self.a.port), timeout=timeout)
        greeting = sock.recv(4096)
        return sock, greeting

    def starttls_raw(self) -> socket.socket:
        sock, _ = self.raw()
        sock.sendall(b"EHLO client.soak.test\r\n")
        _read_reply(sock)
        sock.sendall(b"STARTTLS\r\n")
        reply = _read_reply(sock)
        if not reply.startswith(b"220"):
            raise OSError(f"STARTTLS refused: {reply!r}")
        return sock


def _read_reply(sock: socket.socket) -> bytes:
    data = b""
    while True:
        chunk = sock.recv(4096)
        if not chunk:
            return data
        data += chunk
        lines = data.split(b"\r\n")
        if len(lines) >= 2 and len(lines[-2]) >= 4 and lines[-2][3:4] == b" ":
            return data


def _client_hello() -> bytes:
    """The bytes a TLS client sends first (a real ClientHello from ssl's memory BIOs)."""
    inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = _ctx().wrap_bio(inc, out, server_hostname="mx.soak.test")
    with contextlib.suppress(ssl.SSLWantReadError):
        obj.do_handshake()
    return out.read()


def _pace(seconds: float) -> bool:
    """Sleep; False once the run is over."""
    return not STOP.wait(seconds)


def senders(c: Client, per_second: float, domains: int, first: int) -> None:
    i = first
    while not STOP.is_set():
        try:
            s = c.login()
            for _ in range(random.randint(1, 5)):
                i += 1
                rcpt = f"user{i % 500}@dest{i % domains}.example"
                s.sendmail("app@soak.test", [rcpt], _message(i, rcpt=rcpt))
                count("sent")
                if not _pace(1.0 / per_second):
                    break
            s.quit()
        except (OSError, smtplib.SMTPException) as exc:
            count(f"sender_error:{type(exc).__name__}")
            _pace(1.0)


def abort_data(c: Client, every: float) -> None:
    while _pace(every):
        try:
            s = c.login()
            s.mail("app@soak.test")
            s.rcpt("aborted@dest.example")
            s.putcmd("data")
            s.getreply()
            s.sock.sendall(_message(0, size=random.randint(1000, 200_000))[:-100])
            s.sock.close()  # mid-DATA
            count("aborted_data")
        except (OSError, smtplib.SMTPException) as exc:
            count(f"abort_error:{type(exc).__name__}")


def tls_drop(c: Client, every: float) -> None:
    hello = _client_hello()
    n = 0
    while _pace(every):
        n += 1
        try:
            sock = c.starttls_raw()
            kind = n % 3
            if kind == 1:
                sock.sendall(hello[: len(hello) // 2])
            elif kind == 2:
                sock.sendall(hello)
                sock.recv(100)  # part of the ServerHello
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()  # (kind 2: a reset)
            count(f"tls_drop_{kind}")
        except OSError as exc:
            count(f"tls_drop_error:{type(exc).__name__}")


def _hold_until_closed(sock: socket.socket, limit: float) -> tuple[float, bytes]:
    """Wait until the node closes the connection; the seconds it took and what it said."""
    start, said = time.monotonic(), b""
    sock.settimeout(1.0)
    while time.monotonic() - start < limit and not STOP.is_set():
        try:
            chunk = sock.recv(4096)
        except TimeoutError:
            continue
        except OSError:
            break
        if not chunk:
            break
        said += chunk
    return time.monotonic() - start, said


def tls_silent(c: Client, every: float, record: list) -> None:
    while _pace(every):
        try:
            sock = c.starttls_raw()
            held, said = _hold_until_closed(sock, 600)
            sock.close()
            if not STOP.is_set():
                record.append(round(held, 1))
            count("tls_silent")
        except OSError as exc:
            count(f"tls_silent_error:{type(exc).__name__}")


def idle(c: Client, every: float, record: list) -> None:
    n = 0
    while _pace(every):
        n += 1
        try:
            if n % 2:
                sock, _ = c.raw()
                sock.sendall(b"EHLO client.soak.test\r\n")
                _read_reply(sock)
                held, said = _hold_until_closed(sock, 600)
                sock.close()
            else:  # logged in, inside TLS
                s = c.login()
                assert s.sock is not None
                held, said = _hold_until_closed(s.sock, 600)
                s.close()
            if not STOP.is_set():
                record.append((round(held, 1), said[:40].decode("ascii", "replace")))
            count("idle")
        except (OSError, smtplib.SMTPException) as exc:
            count(f"idle_error:{type(exc).__name__}")


def _get(url: str, token: str) -> bytes:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return resp.read()


def scraper(api: str, token: str, last: dict) -> None:
    while _pace(1.0):
        try:
            last["metrics"] = _get(api + "/metrics", token).decode()
            last["status"] = json.loads(_get(api + "/api/v1/status", token))
            count("scrapes")
        except OSError as exc:
            count(f"scrape_error:{type(exc).__name__}")


def _children(pid: int) -> list[int]:
    """The node's child processes (recorder, signers), whichever thread started them."""
    kids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                kids.append(int(entry))
    return kids


def _rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def _threads(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    return 0


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return -1


def _gauge(metrics: str, name: str) -> float | None:
    for line in metrics.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return None


def _established(host: str, port: int) -> int:
    """Server-side established connections of the listener (/proc/net/tcp)."""
    want = f"{socket.htonl(int.from_bytes(socket.inet_aton(host), 'big')):08X}:{port:04X}"
    n = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        parts = line.split()
        if parts[1] == want and parts[3] == "01":
            n += 1
    return n


def sample(a: argparse.Namespace, last: dict, t0: float) -> dict:
    pid = a.pid
    spool = Path(a.spool)
    kids = _children(pid)
    status = last.get("status") or {}
    metrics = last.get("metrics") or ""
    return {
        "t_s": round(time.monotonic() - t0),
        "rss_mb": round(_rss_kb(pid) / 1024, 1),
        "children_rss_mb": round(sum(_rss_kb(k) for k in kids) / 1024, 1),
        "fds": len(os.listdir(f"/proc/{pid}/fd")),
        "threads": _threads(pid),
        "tasks": _gauge(metrics, "postlane_event_loop_tasks"),
        "established": _established(a.host, a.port),
        "queued": status.get("queued"),
        "lanes": len(status.get("lanes") or []),
        "spool_mb": round(_size(spool / "spool.sqlite") / 2**20, 2),
        "spool_wal_mb": round(_size(spool / "spool.sqlite-wal") / 2**20, 2),
        "audit_mb": round(_size(spool / "audit.sqlite") / 2**20, 2),
        "audit_wal_mb": round(_size(spool / "audit.sqlite-wal") / 2**20, 2),
        "other_files": {p.name: _size(p) for p in spool.iterdir()
                        if p.name.startswith("attempts-")},
        **{k: v for k, v in sorted(COUNTS.items())},
    }


def run_soak(a: argparse.Namespace) -> None:
    c = Client(a)
    token = Path(a.token_file).read_text().strip()
    last: dict = {}
    silent: list = []
    idles: list = []
    threads = [threading.Thread(target=senders, daemon=True,
                                args=(c, a.rate / a.senders, a.domains, n * 10_000_000))
               for n in range(a.senders)]
    threads += [threading.Thread(target=abort_data, args=(c, 2.0), daemon=True),
                threading.Thread(target=tls_drop, args=(c, 1.0), daemon=True),
                threading.Thread(target=scraper, args=(a.api, token, last), daemon=True)]
    threads += [threading.Thread(target=tls_silent, args=(c, 5.0, silent), daemon=True)
                for _ in range(3)]
    threads += [threading.Thread(target=idle, args=(c, 5.0, idles), daemon=True)
                for _ in range(3)]
    t0 = time.monotonic()
    print(json.dumps(sample(a, last, t0)), flush=True)
    for t in threads:
        t.start()
    end = t0 + a.minutes * 60
    while time.monotonic() < end:
        time.sleep(min(a.sample, max(0.0, end - time.monotonic())))
        print(json.dumps(sample(a, last, t0)), flush=True)
    STOP.set()
    for t in threads:
        t.join(timeout=15)
    print(json.dumps({"tls_silent_held_s": silent[-10:], "idle_held": idles[-6:]}), flush=True)
    # the queue drains, then the figures once more
    for _ in range(120):
        try:
            last["status"] = json.loads(_get(a.api + "/api/v1/status", token))
            last["metrics"] = _get(a.api + "/metrics", token).decode()
        except OSError:
            pass
        if not (last.get("status") or {}).get("queued"):
            break
        time.sleep(1)
    time.sleep(5)
    last["metrics"] = _get(a.api + "/metrics", token).decode()
    print(json.dumps({"drained": True, **sample(a, last, t0)}), flush=True)


def _peak_rss(pid: int, done: threading.Event, out: dict) -> None:
    while not done.is_set():
        rss = _rss_kb(pid) + sum(_rss_kb(k) for k in _children(pid))
        out["main"] = max(out.get("main", 0), _rss_kb(pid))
        out["all"] = max(out.get("all", 0), rss)
        time.sleep(0.2)


def run_big(a: argparse.Namespace) -> None:
    c = Client(a)
    size = int(a.big_mb * 2**20)
    done, peak = threading.Event(), {}
    before = _rss_kb(a.pid)
    watcher = threading.Thread(target=_peak_rss, args=(a.pid, done, peak), daemon=True)
    watcher.start()
    results: list = []

    def one(i: int) -> None:
        try:
            s = c.login(timeout=600)
            s.sendmail("app@soak.test", [f"big{i}@dest.example"],
                       _message(i, size=size, rcpt=f"big{i}@dest.example"))
            s.quit()
            results.append("ok")
        except (OSError, smtplib.SMTPException) as exc:
            results.append(repr(exc)[:200])

    workers = [threading.Thread(target=one, args=(i,)) for i in range(a.big_count)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    time.sleep(a.settle)
    done.set()
    watcher.join()
    print(json.dumps({"messages": a.big_count, "mb_each": a.big_mb, "results": results,
                      "rss_before_mb": round(before / 1024, 1),
                      "peak_rss_main_mb": round(peak["main"] / 1024, 1),
                      "peak_rss_with_children_mb": round(peak["all"] / 1024, 1),
                      "rss_after_mb": round(_rss_kb(a.pid) / 1024, 1)}), flush=True)


def run_rcpt(a: argparse.Namespace) -> None:
    c = Client(a)
    s = c.login()
    s.mail("app@soak.test")
    replies: dict[int, int] = {}
    for i in range(a.rcpts):
        code, _ = s.rcpt(f"r{i}@d{i % 50}.example")
        replies[code] = replies.get(code, 0) + 1
    code, msg = s.data(_message(1, rcpt="undisclosed-recipients:;"))
    s.quit()
    print(json.dumps({"rcpt_replies": replies, "data": [code, msg.decode()[:120]]}), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("phase", choices=["soak", "big", "rcpt"])
    p.add_argument("--pid", type=int, required=True, help="the node's process id")
    p.add_argument("--host", default="127.0.4.1")
    p.add_argument("--port", type=int, default=3401)
    p.add_argument("--api", default="http://127.0.4.1:3403")
    p.add_argument("--token-file", required=True)
    p.add_argument("--spool", required=True, help="the node's spool folder")
    p.add_argument("--user", default="app")
    p.add_argument("--password-file", required=True)
    p.add_argument("--minutes", type=float, default=18)
    p.add_argument("--sample", type=float, default=30)
    p.add_argument("--rate", type=float, default=5.0, help="messages per second in all")
    p.add_argument("--senders", type=int, default=4)
    p.add_argument("--domains", type=int, default=7, help="recipient domains the senders use"
                   " (a large number: nearly every message to a new domain)")
    p.add_argument("--big-count", type=int, default=10)
    p.add_argument("--big-mb", type=float, default=25)
    p.add_argument("--settle", type=float, default=20, help="seconds to sample after")
    p.add_argument("--rcpts", type=int, default=1000)
    a = p.parse_args()
    if not a.host.startswith("127."):
        sys.exit("loopback addresses only")
    {"soak": run_soak, "big": run_big, "rcpt": run_rcpt}[a.phase](a)


if __name__ == "__main__":
    main()
