"""RFC 8058 one-click unsubscribe: signed, expiring tokens, the two header fields, and the HTTP
endpoint that mailbox providers POST to.

The token carries the address and an expiry and is signed with the node's feedback key, so the
endpoint needs no database of issued tokens and a guessed or edited token changes nothing. A GET
never unsubscribes (link scanners follow every URL); it shows a page whose button POSTs.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import html
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from fastapi import APIRouter, HTTPException
from fastapi.responses import HTMLResponse, Response

if TYPE_CHECKING:
    from .service import FeedbackService

__all__ = ["TokenError", "UnsubscribeSigner", "router"]

_MAC_BYTES = 16


class TokenError(ValueError):
    """A token that is malformed, tampered with (``expired`` False) or past its expiry."""

    def __init__(self, message: str, expired: bool = False) -> None:
        super().__init__(message)
        self.expired = expired


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class UnsubscribeSigner:
    def __init__(self, key: bytes, ttl: float) -> None:
        self._key = hashlib.sha256(b"unsubscribe:" + key).digest()  # not the VERP key itself
        self.ttl = ttl

    def _mac(self, payload: bytes) -> bytes:
        return hmac.new(self._key, payload, hashlib.sha256).digest()[:_MAC_BYTES]

    def token(self, address: str, now: float | None = None) -> str:
        expires = int((now if now is not None else time.time()) + self.ttl)
        payload = f"{expires}:{address}".encode()
        return f"{_b64(payload)}.{_b64(self._mac(payload))}"

    def verify(self, token: str, now: float | None = None) -> str:
        """The address a valid token was issued for (raises TokenError)."""
        try:
            body, mac = token.split(".")
            payload = _unb64(body)
            given = _unb64(mac)
            expires_text, address = payload.decode("utf-8").split(":", 1)
            expires = int(expires_text)
        except (ValueError, UnicodeDecodeError):  # Python's words would say nothing to a user
            raise TokenError("malformed token") from None
        if not hmac.compare_digest(given, self._mac(payload)):
            raise TokenError("token signature does not match")
        if (now if now is not None else time.time()) > expires:
            raise TokenError("token has expired", expired=True)
        return address

    def header_fields(self, address: str, url: str, mailto: str | None) -> list[bytes]:
        """``List-Unsubscribe`` and ``List-Unsubscribe-Post`` for one recipient (added before
        DKIM signing, so that the signature covers them as RFC 8058 requires)."""
        token = self.token(address)
        targets = [f"<{url.rstrip('/')}/{token}>"]
        if mailto:
            targets.append(f"<mailto:{mailto}?subject=unsubscribe%20{token}>")
        return [f"List-Unsubscribe: {', '.join(targets)}".encode(),
                b"List-Unsubscribe-Post: List-Unsubscribe=One-Click"]


_PAGE = """<!doctype html><html><head><meta charset="utf-8"><title>Unsubscribe</title></head>
<body><form method="post"><p>Stop marketing mail to {address}?</p>
<input type="hidden" name="List-Unsubscribe" value="One-Click">
<button type="submit">Unsubscribe</button></form>
<p>Notices about your contracts are not affected.</p></body></html>"""


def router(feedback: FeedbackService, flush: Callable[[], Awaitable[None]]) -> APIRouter:
    """Public routes (no API token: mailbox providers call them): ``POST /unsubscribe/{token}``
    suppresses the address for marketing, answered once the entry and its record are on disk
    (``flush``: the spool's); ``GET`` shows a confirmation page."""
    api = APIRouter(tags=["unsubscribe"])

    def _verify(token: str) -> str:
        try:
            return feedback.signer.verify(token)
        except TokenError as exc:
            raise HTTPException(410 if exc.expired else 400, str(exc)) from None

    @api.post("/unsubscribe/{token}")
    async def one_click(token: str) -> dict:
        """RFC 8058 one-click: the body (List-Unsubscribe=One-Click) carries nothing we need."""
        address = _verify(token)
        await feedback.unsubscribe_now(address, "one-click", flush)
        return {"unsubscribed": address, "scope": "marketing"}

    @api.get("/unsubscribe/{token}", response_class=Response, responses={
        200: {"content": {"text/html": {"schema": {"type": "string"}}},
              "description": "the confirmation page"}})  # errors are JSON, as the API's
    async def page(token: str) -> HTMLResponse:
        return HTMLResponse(_PAGE.format(address=html.escape(_verify(token))))

    return api
