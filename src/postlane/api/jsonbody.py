"""JSON request bodies read as RFC 8259 says: UTF-8 only, each name of an object once, with a
clear 400 for a body that cannot be read at all, and yes/no fields that are JSON's true or
false (``Flag``).

FastAPI reads a JSON body with ``json.loads(bytes)``, which guesses UTF-16 and UTF-32 too, so a
UTF-16 body was accepted, and a body with a byte that is not UTF-8, nested too deep or holding
a number too long to convert got "There was an error parsing the body". A router whose routes
take a JSON body uses ``route_class=JSONRoute``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Coroutine
from typing import Annotated, Any

from fastapi import HTTPException, Request, Response
from fastapi.routing import APIRoute
from pydantic import Strict

__all__ = ["Flag", "JSONRoute", "read_json"]

Flag = Annotated[bool, Strict()]
"""A yes/no field of a JSON body: true or false, anything else a 422. Pydantic's lax bool read
"yes", "on", "t", "1" and 1 as true and "no", "off", "f", "0" and 0 as false, so a client's
``"dry_run": "n"`` deleted for real; every body's booleans are this type (a test walks the
routes)."""

_RFC = "JSON must be UTF-8 (RFC 8259 8.1)"


def read_json(data: bytes) -> Any:
    """The JSON value in ``data``, which must be UTF-8 (a leading byte order mark is ignored,
    as RFC 8259 allows). A syntax error stays a ``json.JSONDecodeError`` (FastAPI's 422 naming
    the position); anything else that cannot be read is a 400 saying why."""
    encoding = json.detect_encoding(data)
    if encoding not in ("utf-8", "utf-8-sig"):
        raise HTTPException(400, f"the body is {encoding.upper()}: {_RFC}")
    try:
        text = data.decode("utf-8-sig")  # strict: an encoded surrogate is no UTF-8 either
    except UnicodeDecodeError as exc:
        raise HTTPException(400, f"the body is not UTF-8 (byte {exc.start}: "
                                 f"{data[exc.start:exc.start + 1]!r}): {_RFC}") from None
    try:
        return json.loads(text, object_pairs_hook=_unique)
    except json.JSONDecodeError:
        raise
    except RecursionError:
        raise HTTPException(400, "the body's JSON is nested too deeply to read") from None
    except ValueError as exc:  # an integer of more than 4300 digits (sys.int_info)
        raise HTTPException(400, f"the body's JSON cannot be read: {exc}") from None


def _unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """An object whose names are unique (RFC 8259 4: SHOULD), else a 422: the last value
    counted, where a reader that takes the first (a proxy, a log) saw another request
    (``{"dry_run": true, "dry_run": false}`` deleted for real)."""
    out: dict[str, Any] = {}
    for name, value in pairs:
        if name in out:
            raise HTTPException(422, f"the body's JSON gives the name {name!r} twice: give"
                                     " each name once")
        out[name] = value
    return out


class _Request(Request):
    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            self._json = read_json(await self.body())
        return self._json


class JSONRoute(APIRoute):
    """A route whose JSON body is read by ``read_json``."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def strict(request: Request) -> Response:
            return await handler(_Request(request.scope, request.receive))

        return strict
