"""The HTTP API: injection, operations, status/SLA/alerts, Prometheus /metrics and the dashboard.

Every route under /api/v1 and /metrics needs the bearer token (a router-level dependency, so a
router added later without it - the one-click unsubscribe endpoint - stays public), checked
before the body is read too (``_TokenFirst``). The dashboard page and /openapi.json carry no
data and are public: the page asks for the token and keeps it in sessionStorage, never in a
cookie, so no other site can make a browser call the API (no CSRF).
"""

from __future__ import annotations

import asyncio
import re
import time
from collections import Counter
from collections.abc import Iterable
from email.errors import MessageError
from importlib import resources
from types import UnionType
from typing import TYPE_CHECKING, Annotated, Any, Union, get_args, get_origin

from fastapi import APIRouter, Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.security.utils import get_authorization_scheme_param
from pydantic import BaseModel, Field
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..audit.queries import rcpt_spellings
from ..feedback import unsubscribe
from ..operations import OperationError
from ..policy.headers import header_fields, normalize_newlines, split_message
from ..policy.intake import RcptIn, Rejection
from ..reputation.api import router as reputation_router
from ..scheduler.control import Selector, pending_action
from ..spool import SpoolUnavailable
from . import feedback as feedback_api
from . import queue
from .injection import MessageIn, Queued
from .jsonbody import JSONRoute
from .parts import NodeParts
from .tokens import Token, Tokens, caller

if TYPE_CHECKING:
    from ..spool import Recipient

LaneDomain = Annotated[str | None, Query(min_length=1, description="one lane: its recipient"
                                                             " domain (default: every lane)")]
"""A lane's domain; given empty, it is an error, not the whole pool."""

_JSON = re.compile(r"application/([\w.+-]+\+)?json\s*(;|$)", re.IGNORECASE)
"""A content type FastAPI reads as JSON."""

_bearer = HTTPBearer(auto_error=False, description="token from the [api] token_file")


class FieldError(BaseModel):
    field: str = Field(description="where, e.g. body.to.0 or query.limit")
    message: str


class Error(BaseModel):
    """The body of every error the API answers (docs/api.md, *Authentication and errors*)."""

    error: str = Field(description="what is wrong, in words")
    details: list[FieldError] | None = Field(None, description="422: each invalid field")


def _errors(*codes: tuple[int, str]) -> dict[int | str, dict[str, Any]]:
    return {code: {"model": Error, "description": text} for code, text in codes}


_API_ERRORS = _errors(
    (400, "a JSON body that is not UTF-8, or cannot be read"),
    (401, "no token, a wrong or revoked one, or two Authorization headers"),
    (403, "a read-only token asked to change something"),
    (404, "no such pool, class, lane, message or suppression"),
    (409, "the action is refused in this state (a pausable = false pool, an importer not"
          " configured)"),
    (413, "the request body or the message is too large"),
    (415, "a JSON body sent with another content type"),
    (422, "an invalid request: the details name each field"),
    (503, "refused for now (the intake, the spool, a store); retry later"))
"""What any route under /api/v1 may answer besides its success (the schema listed FastAPI's
422 body, which the API never sends, and nothing else)."""


class APIError(Exception):
    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers


def _error(status: int, message: str, headers: dict[str, str] | None = None,
           **extra: Any) -> JSONResponse:
    return JSONResponse({"error": message, **extra}, status_code=status, headers=headers)


def create_app(parts: NodeParts, tokens: Tokens) -> FastAPI:
    """The API of one node; every protected route requires one of ``tokens``, and a read-only
    one may only read (GET)."""
    app = FastAPI(title="Postlane", version="1", docs_url=None, redoc_url=None,
                  description="Management, injection and monitoring API of a Postlane node.",
                  redirect_slashes=False)  # /metrics/ was a 307 to a Location built from Host

    async def require_token(
            request: Request,
            _scheme: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]  # OpenAPI
    ) -> None:
        token = _authenticate(tokens, request.headers)
        _may_change(token, request.method, request.url.path)
        request.state.token = token

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return _error(exc.status, exc.message, exc.headers)

    @app.exception_handler(OperationError)
    async def _operation_error(_: Request, exc: OperationError) -> JSONResponse:
        return _error(exc.status, str(exc))

    @app.exception_handler(SpoolUnavailable)
    async def _spool_unavailable(_: Request, exc: SpoolUnavailable) -> JSONResponse:
        """The spool could not commit (a full disk, the database away): nothing changed,
        try again; told once in the log as a degraded state, not a traceback per request."""
        return _error(503, f"the spool cannot write now, nothing was changed: {exc}",
                      {"Retry-After": "5"})

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
        headers = getattr(exc, "headers", None)
        if exc.status_code == 405:  # Starlette's Allow names the methods of one route only
            headers = {"Allow": ", ".join(_allowed(request))}
        return _error(exc.status_code, str(exc.detail), headers)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        """A bug: a JSON error like any other; what went wrong goes to the log only (Starlette
        logs the traceback after this answer)."""
        return _error(500, "internal error (the node's log has the details)")

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        content_type = request.headers.get("content-type", "")
        if (any(e["loc"] == ("body",) and e["type"] == "model_attributes_type"
                for e in exc.errors()) and not _JSON.match(content_type)):
            # the body was not read as JSON: say why instead of "not an object"
            return _error(415, "send the body as JSON, with Content-Type: application/json"
                               f" (got {content_type or 'none'})")
        details = [{"field": ".".join(str(p) for p in e["loc"]), "message": _message(e)}
                   for e in exc.errors()]
        text = "; ".join(f"{d['field']}: {d['message']}" for d in details)
        return _error(422, f"invalid request: {text}", details=details)

    max_size = max((lc.max_message_size for lc in parts.config.listeners.values()),
                   default=25 << 20)
    max_body = max_size * 4 // 3 + 65536  # base64 of the largest message plus JSON fields
    # the largest listener's max_header_size (0: no limit), as for the size
    header_limits = [lc.limits.max_header_size for lc in parts.config.listeners.values()]
    max_header = 0 if 0 in header_limits else max(header_limits, default=1 << 20)

    app.add_middleware(_HeadAsGet)
    app.add_middleware(_BodyLimit, limit=max_body, wide=queue.ACTION_PATHS,
                       wide_limit=max(max_body, queue.ACTION_BODY))
    app.add_middleware(_BodyDeadline, timeout=parts.config.api.read_timeout)
    app.add_middleware(_TokenFirst, tokens=tokens)
    app.add_middleware(_OneFraming)  # outermost: before anything else

    api = APIRouter(prefix="/api/v1", dependencies=[Depends(require_token),
                                                    Depends(_known_query)],
                    route_class=JSONRoute, responses=_API_ERRORS)

    @api.post("/messages", status_code=202, response_model=Queued, tags=["injection"])
    async def inject(msg: MessageIn) -> Queued:
        """Queue a message; answers only once it is durable in the spool."""
        cfg = parts.config
        if msg.class_ is not None and msg.class_ not in cfg.classes:
            raise APIError(422, f"class: no traffic class named {msg.class_!r}"
                                f" (classes: {', '.join(sorted(cfg.classes))})")
        if msg.correlation_id and any(name.lower() == cfg.correlation_header.lower()
                                      for name in msg.headers):
            raise APIError(422, f"headers: {cfg.correlation_header} is set from correlation_id;"
                                f" give one of them")
        try:
            data = msg.build(cfg.correlation_header)
        except (ValueError, IndexError, MessageError) as exc:  # the email package's, on a value
            raise APIError(422, f"a header field cannot be written: {exc}") from None
        if msg.correlation_id and msg.is_raw() and _has_field(data, cfg.correlation_header, 2):
            raise APIError(422, f"raw: the message has an {cfg.correlation_header} field: give"
                                " the id there or in correlation_id, not both")
        if len(data) > max_size:
            raise APIError(413, f"message is {len(data)} bytes, the limit is {max_size}")
        if max_header and len(data) > max_header:  # as the SMTP door's 552 5.3.4
            head = len(split_message(normalize_newlines(data))[0])
            if head > max_header:
                raise APIError(413, f"header block is {head} bytes, the limit is {max_header}")
        rcpts = [RcptIn(addr) for addr in msg.envelope_recipients()]
        try:
            qid = await parts.submit(msg.from_, rcpts, data, listener="api",
                                    src_type="api", forced_class=msg.class_)
        except Rejection as exc:
            raise APIError(*_rejection_status(exc)) from None
        return Queued(queue_id=qid, recipients=len(rcpts))

    @api.get("/status", tags=["status"])
    async def status() -> dict:
        """Node, pools (connections, paused), lanes (depth, oldest age, backoff) and degraded
        states; in a cluster also its nodes (alive, suspect, dead; time until takeover) and
        its shared queue per pool."""
        out = parts.status()
        out["alerts_active"] = len((await parts.monitor.alert_lists())["active"])
        if parts.monitor.cluster is not None:
            figures = await parts.monitor.cluster.current()
            paused = set(out["cluster"]["paused"])  # the cluster's, as this node has them
            out["cluster"].update(
                evaluated_by=figures["leader"] if figures else None,
                age_s=figures["age_s"] if figures else None,
                nodes=figures["nodes"] if figures else [],
                pools=figures["pools"] if figures else {},
                lanes=[{**lane, "paused": f"{lane['pool']}/*" in paused
                        or f"{lane['pool']}/{lane['domain']}" in paused}
                       for lane in (figures.get("lanes", []) if figures else [])])
        return out

    ops = parts.operations

    @api.post("/pools/{pool}/pause", tags=["operations"])
    async def pause(request: Request, pool: str,
                    domain: LaneDomain = None) -> dict:
        """Hold a pool (or its lane to one domain); refused (409) for pausable = false."""
        queued = await ops.pause(pool, domain, who=caller(request))
        return {"pool": pool, "domain": domain, "paused": True, "queued": queued}

    @api.post("/pools/{pool}/resume", tags=["operations"])
    async def resume(request: Request, pool: str,
                     domain: LaneDomain = None) -> dict:
        """Let a pool (or one lane) deliver again; ``still_paused``: the pauses that still
        hold that mail ("*": the pool's, after a lane's resume; else its lanes paused on their
        own, after the pool's)."""
        queued = await ops.resume(pool, domain, who=caller(request))
        return {"pool": pool, "domain": domain, "paused": False, "queued": queued,
                "still_paused": ops.still_paused(pool, domain)}

    @api.post("/pools/{pool}/retry", tags=["operations"])
    async def retry(request: Request, pool: str,
                    domain: LaneDomain = None) -> dict:
        """Make deferred recipients of the pool (or lane) due now, lifting a backoff (in a
        cluster on every node: ``elsewhere`` counts those other nodes hold and now retry)."""
        out = await ops.retry(pool, domain, who=caller(request))
        return {"pool": pool, "domain": domain, "retried": out["recipients"],
                "elsewhere": out["elsewhere"], "paused": out["paused"]}

    @api.post("/pools/{pool}/lanes/{domain}/purge", tags=["operations"])
    async def purge(request: Request, pool: str, domain: str) -> dict:
        """Drop the lane's queued and deferred recipients (accounting "b", bounceCat purged)."""
        return {"pool": pool, "domain": domain,
                "purged": await ops.purge(pool, domain, who=caller(request))}

    @api.get("/token", tags=["status"])
    async def token(request: Request) -> dict:
        """The token this request came with: its name and whether it may only read (the
        dashboard offers no actions to a read-only token)."""
        token = request.state.token
        return {"name": token.name, "read_only": token.read_only}

    @api.get("/messages/{queue_id}", tags=["messages"])
    async def message(queue_id: str) -> dict:
        found = await _lookup(parts, queue_id=queue_id)
        if not found:
            raise APIError(404, f"no queued or recently finished message {queue_id!r}"
                                " (older ones are in the accounting files)")
        return found[0]

    @api.get("/messages", tags=["messages"])
    async def messages(correlation_id: Annotated[str | None, Query(min_length=1)] = None,
                       recipient: Annotated[str | None, Query(min_length=3)] = None) -> dict:
        """Queued and recently finished messages by correlation id or recipient address."""
        if (correlation_id is None) == (recipient is None):
            raise APIError(422, "give correlation_id or recipient")
        if recipient is None:
            return {"messages": await _lookup(parts, correlation_id=correlation_id)}
        # each spelling the address may be stored in (domain in U- or A-labels): mail to
        # jörg@exämple.com was not found as jörg@xn--exmple-cua.com
        found: dict[str, dict] = {}
        for spelling in rcpt_spellings(recipient.strip().lower()):
            for entry in await _lookup(parts, recipient=spelling):
                held = found.setdefault(entry["queue_id"], {**entry, "recipients": []})
                held["recipients"] += entry["recipients"]
        return {"messages": list(found.values())}

    @api.get("/activity", tags=["monitoring"])
    async def activity() -> dict:
        """The last 24 hours: outcomes per hour, per source IP (with its connections now) and
        the top deferral and bounce reasons per pool and domain. This node's own (``scope``
        "node", ``node``): in a cluster, what it delivered, deferred and bounced itself."""
        out = {"scope": "node", "node": parts.config.node.name,
               **parts.activity.view(time.time())}
        counts = {(ip["pool"], ip["source_ip"]): ip for ip in out["ips"]}
        out["ips"] = [{"pool": pool["pool"], "source_ip": ip["address"], "ehlo": ip["ehlo"],
                       "connections": ip["in_use"], "max_smtp_out": ip["max_smtp_out"],
                       "reputation": None,
                       **{k: counts.get((pool["pool"], ip["address"]), {}).get(k, 0)
                          for k in ("delivered", "deferred", "bounced")}}
                      for pool in parts.status()["pools"] for ip in pool["ips"]]
        return out

    @api.get("/sla", tags=["monitoring"])
    async def sla() -> dict:
        """Per class: latency percentiles (1/5/15 min), depth, oldest age, drain rate, the
        estimated time to the first breach, and the rules in force (``scope`` "cluster": the
        cluster's figures, the same on every node, with this node's own under ``node``)."""
        return await parts.monitor.sla(time.time())

    @api.get("/alerts", tags=["monitoring"])
    async def alerts() -> dict:
        """Active and recently resolved alerts (in a cluster: the cluster's, on every node)."""
        return await parts.monitor.alert_lists()

    @api.get("/history", tags=["monitoring"])
    async def history() -> dict:
        """Samples of the last hour for the dashboard's charts."""
        return {"samples": list(parts.monitor.history)}

    api.include_router(reputation_router(parts.reputation, parts.config))
    api.include_router(queue.router(parts))
    api.include_router(feedback_api.router(parts))
    app.include_router(api)
    # public: mailbox providers call it
    app.include_router(unsubscribe.router(parts.feedback, parts.spool.flush),
                       responses=_errors((400, "a malformed token"), (410, "an expired token"),
                                         (422, "an invalid request")))

    @app.get("/metrics", dependencies=[Depends(require_token)], tags=["monitoring"],
             response_class=Response,
             responses=_errors((401, "no token, a wrong or revoked one")))
    async def metrics() -> Response:
        """Prometheus text format (scrape with authorization: credentials_file)."""
        cluster = parts.monitor.cluster
        figures = await cluster.current() if cluster is not None else None
        return Response(parts.monitor.metrics.render(figures),
                        media_type="text/plain; version=0.0.4; charset=utf-8")

    page = resources.files("postlane.api").joinpath("dashboard.html").read_text("utf-8")

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def dashboard() -> HTMLResponse:
        return HTMLResponse(page, headers={"Content-Security-Policy": _CSP,
                                           "X-Frame-Options": "DENY"})

    return app


def _authenticate(tokens: Tokens, headers: Headers) -> Token:
    """The known token the Authorization header carries (else APIError 401). Two headers are
    refused: which one counts would depend on who reads them (a proxy, this app)."""
    authorization = headers.getlist("authorization")
    challenge = {"WWW-Authenticate": "Bearer"}
    if len(authorization) > 1:
        raise APIError(401, "send one Authorization header, not several", challenge)
    scheme, credentials = get_authorization_scheme_param(authorization[0] if authorization
                                                         else None)
    if scheme.lower() != "bearer" or not credentials:
        raise APIError(401, "missing bearer token (Authorization: Bearer <token>)", challenge)
    token = tokens.check(credentials)
    if token is None:
        raise APIError(401, "invalid bearer token", challenge)
    return token


def _may_change(token: Token, method: str, path: str) -> None:
    """Refuse (APIError 403) anything but a read to a read-only token."""
    if token.read_only and method not in ("GET", "HEAD"):
        raise APIError(403, f"token {token.name!r} is read-only: it cannot {method} {path}")


def _known_query(request: Request) -> None:
    """Refuse a query parameter the route does not take, as unknown JSON fields are: ignored,
    a misspelt one widens an action (``pause?domian=…`` paused the whole pool). Refuse one
    given twice unless it takes several values: the last counted, the first was dropped
    (``pause?domain=a&domain=b`` paused b only)."""
    route = request.scope.get("route")
    params = _query_params(route.dependant) if route is not None else {}
    unknown = sorted(set(request.query_params) - set(params))
    if unknown:
        takes = f"this route takes: {', '.join(sorted(params))}" if params else \
            "this route takes none"
        raise APIError(422, f"unknown query parameter{'s' if len(unknown) > 1 else ''}"
                            f" {', '.join(map(repr, unknown))} ({takes})")
    counts = Counter(name for name, _ in request.query_params.multi_items())
    for name, count in counts.items():
        if count > 1 and not params[name]:
            raise APIError(422, f"query parameter {name!r} given {count} times: give it once")


def _query_params(dependant: Any) -> dict[str, bool]:
    """The query parameters a route (FastAPI's ``Dependant``) and its dependencies declare,
    each with whether it takes several values (``queue_id=a&queue_id=b``)."""
    params = {p.alias: _takes_several(p.field_info.annotation) for p in dependant.query_params}
    for sub in dependant.dependencies:
        params.update(_query_params(sub))
    return params


def _takes_several(annotation: Any) -> bool:
    """Whether a parameter's type is a list (or a union holding one: ``list[str] | None``)."""
    origin = get_origin(annotation)
    if origin in (list, tuple, set, frozenset):
        return True
    return origin in (Union, UnionType) and any(_takes_several(a) for a in get_args(annotation))


class _TokenFirst:
    """Refuse a request to a protected path without a valid token, or a read-only token's
    change, before its body is read: FastAPI reads and parses a body before a route's
    dependencies run, so an anonymous client (or a read-only one) had the node parse its body
    and got answers about it. The routes' dependency still checks both."""

    def __init__(self, app: ASGIApp, tokens: Tokens) -> None:
        self.app, self.tokens = app, tokens

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] == "http" and (path.startswith("/api/v1/") or path == "/metrics"):
            try:
                token = _authenticate(self.tokens, Headers(scope=scope))
                _may_change(token, scope["method"], path)
            except APIError as exc:
                response = _error(exc.status, exc.message, exc.headers)
                return await response(scope, receive, send)
        await self.app(scope, receive, send)


class _HeadAsGet:
    """Answer HEAD as GET without the body (RFC 9110 9.3.2): FastAPI routes a GET route for GET
    only, so HEAD was a 405 on every path. Only GET routes are reached this way, and they change
    nothing."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "HEAD":
            return await self.app(scope, receive, send)

        async def headers_only(message: Message) -> None:
            if message["type"] == "http.response.body":
                message = {**message, "body": b""}
            await send(message)

        await self.app({**scope, "method": "GET"}, receive, headers_only)


class _BodyLimit:
    """Refuse a body larger than ``limit`` before it is in memory: from its Content-Length
    before it is read, and while a body without one (chunked) streams in. A POST to one of
    the ``wide`` paths (queue actions, whose body is a list of queue ids an operator listed)
    has ``wide_limit``, and its 413 says how many ids fit and what to do instead."""

    def __init__(self, app: ASGIApp, limit: int, wide: frozenset[str] = frozenset(),
                 wide_limit: int = 0) -> None:
        self.app, self.limit, self.wide, self.wide_limit = app, limit, wide, wide_limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit, hint = self.limit, ""
        if scope["method"] == "POST" and scope["path"] in self.wide:
            limit, hint = self.wide_limit, f": {queue.ACTION_TOO_LARGE}"
        length = Headers(scope=scope).get("content-length", "")
        if length.isdigit() and int(length) > limit:
            response = _error(413, f"request body of {length} bytes exceeds {limit}{hint}")
            return await response(scope, receive, send)
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > limit:  # the app's handler turns it into the JSON error
                raise HTTPException(413, f"request body exceeds {limit} bytes{hint}")
            return message

        await self.app(scope, counted, send)


class _BodyDeadline:
    """A request's body must arrive within ``timeout`` of its head: a client that sent less
    than its Content-Length and waited held the connection and the handler reading it for
    ever. Then a 408, and the connection is closed (the rest of the body is never read)."""

    def __init__(self, app: ASGIApp, timeout: float) -> None:
        self.app, self.timeout = app, timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        deadline = asyncio.get_running_loop().time() + self.timeout
        complete = False

        async def timed() -> Message:
            nonlocal complete
            if complete:  # after the body: waiting for a disconnect is no read
                return await receive()
            try:
                async with asyncio.timeout_at(deadline):
                    message = await receive()
            except TimeoutError:  # the app's handler turns it into the JSON error
                raise HTTPException(408, f"the request body did not arrive within"
                                         f" {self.timeout:g} s", {"Connection": "close"}) from None
            complete = message["type"] != "http.request" or not message.get("more_body")
            return message

        await self.app(scope, timed, send)


class _OneFraming:
    """Refuse (400, then close) a request with both Content-Length and Transfer-Encoding: the
    server reads it chunked, a proxy in front may go by the length, and what one takes for the
    body's end the other takes for a second request (request smuggling; RFC 9112 6.3 lets a
    server refuse it, and it must close the connection after)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            names = {name.lower() for name, _ in scope["headers"]}
            if b"content-length" in names and b"transfer-encoding" in names:
                response = _error(400, "a request with both Content-Length and"
                                       " Transfer-Encoding is refused (RFC 9112 6.3): send"
                                       " one", {"Connection": "close"})
                return await response(scope, receive, send)
        await self.app(scope, receive, send)


_CSP = ("default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
        "connect-src 'self'; img-src 'self' data:; frame-ancestors 'none'")


def _allowed(request: Request) -> list[str]:
    """The methods some route serves at the request's path (HEAD wherever GET: _HeadAsGet)."""
    methods = [method for method in ("GET", "POST", "PUT", "PATCH", "DELETE")
               if any(route.matches({**request.scope, "method": method})[0] is Match.FULL
                      for route in request.app.router.routes)]
    return [*methods[:1], "HEAD", *methods[1:]] if "GET" in methods else methods


def _has_field(data: bytes, name: str, count: int = 1) -> bool:
    """Whether the header block of ``data`` holds ``count`` or more fields named ``name``
    (the correlation header prepended to a raw message that had one: two, read two ways)."""
    head = split_message(normalize_newlines(data))[0]
    return sum(field == name.lower() for field, _ in header_fields(head)) >= count


def _message(error: dict) -> str:
    """One validation error in words: for JSON that is not well formed what is wrong at its
    position (FastAPI says only "JSON decode error" and keeps the reason in ``ctx``)."""
    if error.get("type") == "json_invalid":
        return f"JSON is not well formed: {error.get('ctx', {}).get('error', 'unreadable')}"
    return str(error["msg"]).removeprefix("Value error, ")


def _rejection_status(exc: Rejection) -> tuple[int, str]:
    if exc.code == 552:
        return 413, exc.text
    if 400 <= exc.code < 500:
        return 503, f"temporarily refused: {exc.text}"
    return 422, exc.text


async def _lookup(parts: NodeParts, queue_id: str | None = None,
                  correlation_id: str | None = None,
                  recipient: str | None = None) -> list[dict]:
    """Queued, deferred and held recipients from the scheduler (by queue id or correlation id
    through its index, by recipient address a walk) and those deep lanes left in the spool (in a
    cluster also those waiting in the shared spool unclaimed or with another node),
    finished ones from the monitor's recent records (in-flight recipients show once their
    attempt ends, or at once with their pending hold or delete)."""
    found: dict[str, dict] = {}
    sched = parts.queue
    sel = Selector(queue_ids=(queue_id,) if queue_id else (), correlation_id=correlation_id,
                   recipient=recipient)
    held: Iterable[Recipient]
    if queue_id is not None:
        held = sched.message(queue_id)
    elif correlation_id:
        held = [r for qid in sched.with_correlation_id(correlation_id)
                for r in sched.message(qid)]
    else:
        held = sched.recipients()
    async with parts.control.spooled(sel) as spooled:
        everyone = [*held, *spooled]
    everyone += parts.control.pending_here(sel)  # on the wire with a hold or delete waiting
    shared = parts.control.shared
    if shared is not None:  # a cluster: also where it waits unclaimed or with another node
        seen = {(r.msg.id, r.idx) for r in everyone}
        everyone += [r for r in await shared.not_held_here(sel.queue_ids, correlation_id,
                                                           recipient)
                     if (r.msg.id, r.idx) not in seen]
    for rcpt in everyone:
        msg = rcpt.msg
        if msg.id != queue_id and (not correlation_id or msg.correlation_id != correlation_id) \
                and (not recipient or rcpt.address.lower() != recipient):
            continue
        entry = found.setdefault(msg.id, {
            "queue_id": msg.id, "class": msg.cls, "pool": msg.pool,
            "correlation_id": msg.correlation_id, "message_id": msg.message_id,
            "queued_at": msg.queued_at, "recipients": []})
        entry["recipients"].append({
            "address": rcpt.address, "state": rcpt.state.value, "attempts": rcpt.attempts,
            "next_attempt": rcpt.next_attempt or None, "reply": rcpt.last_reply,
            "pending": pending_action(rcpt)})
    for done in parts.monitor.tracker.finished(queue_id, correlation_id, recipient):
        entry = found.setdefault(done["queue_id"], {**done, "recipients": []})
        entry["recipients"].extend(done["recipients"])
    return list(found.values())
