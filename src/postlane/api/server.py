"""Serving the API inside the node's event loop, guarded by the named tokens (tokens.py)."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
from collections.abc import Iterator
from typing import TYPE_CHECKING

import uvicorn

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


class APIServer:
    def __init__(self, parts: NodeParts) -> None:
        self.parts = parts
        self.port = 0
        self._server: _Server | None = None
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        cfg = self.parts.config.api
        app = create_app(self.parts, Tokens(cfg.token_file, cfg.named_tokens_file()))
        self._server = _Server(uvicorn.Config(app, host=cfg.address, port=cfg.port,
                                              log_level="warning", access_log=False,
                                              lifespan="off", server_header=False))
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
