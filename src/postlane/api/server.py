"""Serving the API inside the node's event loop, guarded by the named tokens (tokens.py)."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import math
import socket
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from .app import create_app
from .tokens import Tokens

if TYPE_CHECKING:
    from .parts import NodeParts

log = logging.getLogger("postlane.api")


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        """The node owns SIGTERM/SIGINT (they drain it); uvicorn must not take them over."""
        yield


class _HTTPProtocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline for reading a request. uvicorn has none: its
    keep-alive timeout runs only between requests and the first byte of the next one stops
    it, so a client that connected and sent nothing, dripped a head a byte at a time
    (slowloris) or left a body nobody reads (after a 401) unfinished held the connection for
    ever. The body a handler waits for is bounded in the app (``app._BodyDeadline``: a 408).
    And at most ``max_connections`` at once: uvicorn takes any number, each a file descriptor
    the SMTP listeners need too."""

    read_timeout = 30.0
    max_connections = 100
    _warned = -60.0
    _deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)  # type: ignore[arg-type]
        if len(self.connections) > self.max_connections:  # itself included
            self.transport.close()
            now = self.loop.time()
            if now - _HTTPProtocol._warned > 60:  # told once a minute, not per connection
                _HTTPProtocol._warned = now
                log.warning("API connections refused: max_connections are open",
                            extra={"max_connections": self.max_connections})
            return
        self._watch()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._watch()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._watch()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel()
        self._resumed()
        super().connection_lost(exc)

    _stalled: asyncio.TimerHandle | None = None

    def pause_writing(self) -> None:
        """The client does not read as fast as an answer is written (a streamed export waits
        for it): it has ``read_timeout`` to read on, else the connection is dropped. A client
        that asked and never read held its connection, and the answer's stream, for ever."""
        super().pause_writing()
        if self._stalled is None:
            self._stalled = self.loop.call_later(self.read_timeout, self._drop)

    def resume_writing(self) -> None:
        self._resumed()
        super().resume_writing()

    def _resumed(self) -> None:
        if self._stalled is not None:
            self._stalled.cancel()
            self._stalled = None

    def _drop(self) -> None:
        self._stalled = None
        self.transport.abort()  # what is buffered for it goes too

    def shutdown(self) -> None:
        """A node stopping drops a client it waits on to read, rather than wait for it."""
        if self.flow is not None and self.flow.write_paused:
            self._drop()
            return
        super().shutdown()

    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to a request h11 cannot read (a malformed head, one over 16 KiB, a
        Transfer-Encoding other than chunked) as JSON, like every error of the API (it was a
        text/plain ``Invalid HTTP request received.``); then the connection is closed."""
        body = json.dumps({"error": "the request is not valid HTTP/1.1 (RFC 9112)"}).encode()
        headers = [(b"content-type", b"application/json"), (b"connection", b"close")]
        for event in (h11.Response(status_code=400, headers=headers, reason=b"Bad Request"),
                      h11.Data(data=body), h11.EndOfMessage()):
            self.transport.write(self.conn.send(event) or b"")
        self.transport.close()

    def _watch(self) -> None:
        """Start the deadline while the client owes a head, or a body the app no longer reads
        (it has answered); stop it once the app has the head. A deadline that runs is not
        restarted by more bytes: a drip cannot stretch it."""
        theirs, ours = self.conn.their_state, self.conn.our_state
        if theirs is h11.IDLE or (theirs is h11.SEND_BODY and ours in (h11.DONE, h11.MUST_CLOSE)):
            if self._deadline is None:
                self._deadline = self.loop.call_later(self.read_timeout, self._expired)
        else:
            self._cancel()

    def _cancel(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expired(self) -> None:
        self._deadline = None
        if not self.transport.is_closing():
            self.transport.close()


class _OncePerMinute(logging.Filter):
    """uvicorn's warnings are about clients (a request it cannot read, an Upgrade it does not
    serve): a client sending garbage in a loop wrote a line per connection. Each warning is told
    the first time in a minute, with the count of those left out; errors (a handler's bug) all
    pass."""

    every = 60.0

    def __init__(self) -> None:
        super().__init__()
        self.last: dict[str, float] = {}
        self.left_out: dict[str, int] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno != logging.WARNING:
            return True
        key, now = str(record.msg), time.monotonic()
        if now - self.last.get(key, -math.inf) < self.every:
            self.left_out[key] = self.left_out.get(key, 0) + 1
            return False
        self.last[key] = now
        if left := self.left_out.pop(key, 0):
            record.msg = f"{record.msg} ({left} more like it in the last minute)"
        return True


_ONCE_PER_MINUTE = _OncePerMinute()


def _uvicorn_logs_as_the_nodes() -> None:
    """uvicorn's loggers write through the node's handlers (its own dictConfig, the default,
    gave them handlers of their own in another format), its warnings once a minute."""
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        logger.handlers = []
        logger.propagate = True
    errors = logging.getLogger("uvicorn.error")
    if _ONCE_PER_MINUTE not in errors.filters:
        errors.addFilter(_ONCE_PER_MINUTE)


class APIServer:
    def __init__(self, parts: NodeParts) -> None:
        self.parts = parts
        self.port = 0
        self._server: _Server | None = None
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        cfg = self.parts.config.api
        app = create_app(self.parts, Tokens(cfg.token_file, cfg.named_tokens_file()))
        protocol = type("HTTPProtocol", (_HTTPProtocol,), {
            "read_timeout": cfg.read_timeout, "max_connections": cfg.max_connections})
        self._server = _Server(uvicorn.Config(app, host=cfg.address, port=cfg.port,
                                              http=protocol, log_level="warning",
                                              access_log=False, lifespan="off",
                                              server_header=False, log_config=None))
        _uvicorn_logs_as_the_nodes()
        # Bound here rather than by uvicorn, whose bind failure is a sys.exit inside a task.
        family = socket.AF_INET6 if ":" in cfg.address else socket.AF_INET
        # "::" takes IPv4 too, as documented: create_server makes an IPv6 socket IPv6 only
        # unless told, and the CLI calls a node whose API is on "::" at 127.0.0.1
        dual = cfg.address == "::" and socket.has_dualstack_ipv6()
        try:
            sock = socket.create_server((cfg.address, cfg.port), family=family,
                                        dualstack_ipv6=dual)
        except OSError as exc:
            raise OSError(exc.errno, f"API cannot listen on {cfg.address}:{cfg.port}:"
                                     f" {exc.strerror}") from None
        self.port = sock.getsockname()[1]
        self._task = asyncio.get_running_loop().create_task(self._server.serve([sock]))
        while not self._server.started and not self._task.done():
            await asyncio.sleep(0.01)
        if self._task.done():
            self._task.result()
        log.info("API listening", extra={"address": cfg.address, "port": self.port})
        if not ipaddress.ip_address(cfg.address).is_loopback:
            log.warning("API listens beyond loopback: put TLS (a reverse proxy) in front of it,"
                        " the bearer token travels in clear HTTP", extra={"address": cfg.address})

    async def stop(self) -> None:
        if self._server is not None and self._task is not None:
            self._server.should_exit = True
            await asyncio.wait({self._task}, timeout=5)
