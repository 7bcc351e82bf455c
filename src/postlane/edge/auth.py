"""SMTP AUTH (PLAIN, LOGIN) against the users store (``policy/users.py``), at bounded cost.

A password check is scrypt, tens of milliseconds of CPU. It runs in a worker thread (OpenSSL's
scrypt releases the GIL) under a node-wide cap of concurrent checks, never on the event loop: 80
failed AUTHs from 8 addresses used to stall another session's NOOP by up to 1.17 s. Failed
attempts are limited per client (an IPv4 address or an IPv6 /64, ``limits.client_key``; after
the limit, AUTH answers 454 4.7.0 without running scrypt). One ``Authenticator`` per process,
shared by its listeners (``node.py`` and the worker processes build it; a worker's counts its
failures in the main process's, node-wide).
"""

from __future__ import annotations

import asyncio
import logging

from aiosmtpd.smtp import AuthResult, LoginPassword

from ..config.model import SecurityConfig
from ..policy.users import Users
from .limits import RateLimiter, client_key

log = logging.getLogger("postlane.auth")


class Authenticator:
    """The SMTP side of the users store: failures per client IP and the cap on checks."""

    def __init__(self, users: Users, failures_per_minute: int = 10,
                 concurrency: int = 2) -> None:
        self.users = users
        self.failures = RateLimiter(failures_per_minute)
        self.concurrency = concurrency
        self._slots = asyncio.Semaphore(concurrency)
        self._waiting = 0

    @classmethod
    def of(cls, users: Users | None, security: SecurityConfig) -> Authenticator | None:
        """The node's authenticator for ``users`` (None: no users file, no AUTH)."""
        if users is None:
            return None
        return cls(users, security.auth_failures_per_minute, security.auth_concurrency)

    async def may_try(self, client: str) -> bool:
        """Whether ``client`` has failures left this minute (an intake worker asks the main
        process, which counts them for the whole node)."""
        return self.failures.available(client_key(client))

    async def failed(self, client: str) -> None:
        """Count a failed login of ``client``."""
        self.failures.allow(client_key(client))

    async def authenticate(self, client: str, mechanism: str,
                           credentials: LoginPassword) -> AuthResult:
        """Check an AUTH PLAIN/LOGIN login in a worker thread, at most ``concurrency`` at once
        node-wide; failures are limited per client IP, and a queue longer than 16 times the cap
        is refused at once, so guessing costs the node bounded CPU and no event-loop time."""
        name = credentials.login.decode("utf-8", "replace")
        self.users.refresh()
        if not await self.may_try(client):
            log.warning("AUTH refused: too many failures", extra={"client": client})
            return AuthResult(success=False, handled=False,
                              message="454 4.7.0 Too many failed authentications, try later")
        user = self.users.remembered(name, credentials.password)
        if user is None:
            if self._waiting >= 16 * self.concurrency:
                log.warning("AUTH refused: too many checks waiting", extra={"client": client})
                return AuthResult(success=False, handled=False,
                                  message="454 4.7.0 Server busy, try again later")
            self._waiting += 1
            try:
                async with self._slots:
                    user = await asyncio.to_thread(self.users.check, name, credentials.password)
            finally:
                self._waiting -= 1
        if user is None:
            await self.failed(client)
            log.info("AUTH %s failed", mechanism, extra={"user": name[:64], "client": client})
            return AuthResult(success=False, handled=False)
        log.info("AUTH %s ok", mechanism, extra={"user": user.name, "client": client})
        return AuthResult(success=True, auth_data=user.name)
