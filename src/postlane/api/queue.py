"""HTTP routes of message-level queue control (``/api/v1/queue``): list, show, hold, release,
retry, delete, deferrals by reason, and the qshape view. Mounted behind the API token."""

from __future__ import annotations

import asyncio
import re
import time
from typing import TYPE_CHECKING, Annotated, Literal

from fastapi import APIRouter, Depends, Query, Request
from fastapi.exceptions import RequestValidationError
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    WithJsonSchema,
    model_validator,
)

from ..config.model import parse_duration
from ..policy.headers import header_fields, split_message
from ..scheduler.control import SelectionError, Selector, message_view
from .injection import valid_unicode
from .jsonbody import Flag, JSONRoute
from .tokens import caller

if TYPE_CHECKING:
    from .parts import NodeParts

__all__ = ["ACTION_BODY", "ACTION_PATHS", "MAX_IDS", "router"]

MAX_IDS = 100_000
"""Queue ids one action (or listing) may name: as many as a listing gives at most
(``limit``), so an operator can post back the ids they listed."""
ACTION_BODY = MAX_IDS * 40 + 65536
"""The request body limit of a queue action (``ACTION_PATHS``): ``MAX_IDS`` ids of 24
characters, quoted, with a separator and pretty-printing's indentation, plus the filters. The
other routes keep the API's own limit (docs/api.md, *Queue control*)."""
ACTION_PATHS = frozenset(f"/api/v1/queue/{a}" for a in ("hold", "release", "retry", "delete"))
ACTION_TOO_LARGE = (f"a queue action takes at most {MAX_IDS} queue ids ({ACTION_BODY} bytes"
                    " of body): select by a filter instead (pool, domain, class, state,"
                    " older_than, sender, recipient, correlation_id), or send the ids in parts")


def _age(value: object) -> float | None:
    """Seconds from a number or a duration text (``600``, ``"600"``, ``"10m"``): the query
    string gives text, JSON either."""
    return None if value is None else parse_duration(value)


Age = Annotated[float | None, BeforeValidator(_age),
                WithJsonSchema({"anyOf": [{"type": "string"}, {"type": "number"},
                                          {"type": "null"}]})]
"""An age in seconds, given as a number or a duration text."""


class SelectorIn(BaseModel):
    """Which messages: every field given must match; ``all`` for the whole queue."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    queue_ids: list[str] = Field([], max_length=MAX_IDS)
    pool: str | None = None
    domain: str | None = None
    cls: str | None = Field(None, alias="class")
    state: Literal["queued", "deferred", "held"] | None = None
    older_than: Age = Field(None, description="age, e.g. 600 or '10m'")
    younger_than: Age = None
    sender: str | None = Field(None, description="envelope sender, * as wildcard")
    recipient: str | None = Field(None, description="recipient address, * as wildcard")
    correlation_id: str | None = None
    all: Flag = False
    _unicode = model_validator(mode="before")(staticmethod(valid_unicode))

    def selector(self) -> Selector:
        return Selector(tuple(self.queue_ids), self.pool, self.domain, self.cls, self.state,
                        self.older_than, self.younger_than, self.sender, self.recipient,
                        self.correlation_id, self.all)


class ActionIn(SelectorIn):
    dry_run: Flag = Field(False, description="count what would change, change nothing")


class DeleteIn(ActionIn):
    dsn: Flag = Field(False, description="send the sender a bounce (DSN); default: silently")


def _listing(pool: str | None = None, domain: str | None = None,
             cls: Annotated[str | None, Query(alias="class")] = None,
             state: Literal["queued", "deferred", "held"] | None = None,
             older_than: str | None = None, younger_than: str | None = None,
             sender: str | None = None, recipient: str | None = None,
             correlation_id: str | None = None,
             queue_id: Annotated[list[str] | None, Query()] = None) -> SelectorIn:
    """The query parameters of a listing as a selector; a bad value (``older_than=soon``) is a
    422 naming the parameter, as FastAPI's own checks give."""
    try:
        return SelectorIn(queue_ids=queue_id or [], pool=pool, domain=domain, cls=cls,
                          state=state, older_than=older_than, younger_than=younger_than,
                          sender=sender, recipient=recipient, correlation_id=correlation_id)
    except ValidationError as exc:
        raise RequestValidationError([{**e, "loc": ("query", *e["loc"])}
                                      for e in exc.errors(include_url=False)]) from None


def router(parts: NodeParts) -> APIRouter:
    from .app import APIError

    api = APIRouter(prefix="/queue", tags=["queue"], route_class=JSONRoute)
    queue = parts.control

    async def run(fn, *args, **kwargs):
        try:
            return await fn(*args, **kwargs)
        except SelectionError as exc:
            raise APIError(exc.status, str(exc)) from None

    @api.get("/messages")
    async def messages(sel: Annotated[SelectorIn, Depends(_listing)],
                       limit: Annotated[int, Query(ge=1, le=MAX_IDS)] = 1000) -> dict:
        """Queued, deferred and held messages (oldest first) with their recipients (in a
        cluster: the cluster's queue, on whichever node is asked)."""
        return await run(queue.messages, sel.selector(), limit)

    @api.get("/messages/{queue_id:path}")  # "a/b" is no message, not a missing route
    async def show(queue_id: str) -> dict:
        """One message: envelope, header fields, recipients, and every attempt recorded in the
        audit store (time, source IP, destination, the remote reply)."""
        sel = Selector(queue_ids=(queue_id,))
        rcpts = await run(queue.select, sel)
        rcpts += queue.pending_here(sel)  # on the wire with a hold or delete waiting
        rcpts.sort(key=lambda r: r.idx)
        if not rcpts:
            raise APIError(404, f"no message {queue_id!r} in the queue (in flight, finished or"
                                " never queued: see postlane audit show --queue-id)")
        out = message_view(rcpts, time.time())
        try:
            try:
                data = await parts.spool.load_body(queue_id)
            except KeyError:  # in a cluster: held, or claimed by another node
                if queue.shared is None:
                    raise
                data = await queue.shared.load_body(queue_id)
            head, body = split_message(data)
            out["headers"] = [[_text(raw.split(b":", 1)[0]), _text(_unfolded(raw))]
                              for name, raw in header_fields(head) if name]
            out["body_bytes"] = len(body)
        except KeyError:
            out["headers"], out["body_bytes"] = [], 0
        out["attempts"] = await asyncio.to_thread(_attempts, parts, queue_id)
        return out

    async def act(request: Request, action: str, body: ActionIn, dsn: bool = False) -> dict:
        return await parts.operations.queue(action, body.selector(), who=caller(request),
                                           dry_run=body.dry_run, dsn=dsn)

    @api.post("/hold")
    async def hold(request: Request, body: ActionIn) -> dict:
        """Keep messages from delivery until released (survives a restart; in a cluster,
        held in the shared spool, where no node claims them)."""
        return await act(request, "hold", body)

    @api.post("/release")
    async def release(request: Request, body: ActionIn) -> dict:
        return await act(request, "release", body)

    @api.post("/retry")
    async def retry(request: Request, body: ActionIn) -> dict:
        """Deferred recipients become due now, and their lanes stop waiting out a failure
        or a backoff's ``backoff_retry`` (the backoff's slower pace stays)."""
        return await act(request, "retry", body)

    @api.post("/delete")
    async def delete(request: Request, body: DeleteIn) -> dict:
        """Remove messages: a "b" record each (bounceCat purged), a DSN only with ``dsn``."""
        return await act(request, "delete", body, body.dsn)

    @api.get("/deferrals")
    async def deferrals(top: Annotated[int, Query(ge=1, le=1000)] = 50) -> dict:
        """Deferred recipients grouped by the reply that deferred them."""
        return {"reasons": await queue.deferrals(parts.queue.classify, top)}

    @api.get("/shape")
    async def shape(by: Literal["domain", "class"] = "domain",
                    top: Annotated[int, Query(ge=1, le=1000)] = 20) -> dict:
        """qshape: recipients not yet final by age bucket, per domain or class."""
        return await queue.shape(by, top)

    return api


def _text(raw: bytes) -> str:
    """A header field as it is: UTF-8 read as such, any other byte as ``\\xe9`` (``postcat``
    shows the bytes; ``field_value``'s replacement character lost them)."""
    return raw.decode("utf-8", "backslashreplace")


def _unfolded(raw: bytes) -> bytes:
    _, _, value = raw.partition(b":")
    return re.sub(rb"\r\n[ \t]+", b" ", value).strip()


def _attempts(parts: NodeParts, queue_id: str) -> list[dict] | None:
    """The message's delivery records from the audit store (None: the store is off)."""
    if not parts.audited:
        return None
    from ..audit.backend import open_audit_store
    from ..audit.store import Query as AuditQuery

    store = open_audit_store(parts.config, readonly=True)
    try:
        rows = store.find(AuditQuery(queue_id=queue_id))
    finally:
        store.close()
    return [{"type": r["type"], "time": r["time_logged"], "recipient": r["rcpt"],
             "source_ip": r["dlv_source_ip"], "destination": r["dsn_mta"],
             "tls": r["dlv_tls_protocol"], "status": r["dsn_status"], "reply": r["dsn_diag"]}
            for r in rows if r["type"] in ("t", "d", "b")]
