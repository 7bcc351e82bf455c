"""Management HTTP routes of the feedback loop: the suppression list, reports posted by
providers' webhooks or operators, complaint rates.

Mounted under ``/api/v1`` behind the API token (unlike ``unsubscribe.router``, nothing here is
public); changes to the list go through ``parts.operations``, on the record.
"""

from __future__ import annotations

import asyncio
import io
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Annotated, Literal

from fastapi import APIRouter, HTTPException, Query, Request, Response
from fastapi.responses import StreamingResponse
from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from ..address import plain_ip
from ..feedback.dmarc import is_aggregate
from ..feedback.suppression import CSV_FIELDS, SuppressionError, check_reason, csv_text
from .jsonbody import JSONRoute
from .tokens import caller

if TYPE_CHECKING:
    from .parts import NodeParts

__all__ = ["router"]

MAX_REPORT = 10 * 1024 * 1024
Scope = Literal["all", "best-effort", "marketing"]


class SuppressionIn(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a misspelt "scope" is no narrower entry
    address: str = Field(max_length=254)
    scope: Scope = "marketing"
    reason: Annotated[str, AfterValidator(check_reason)] = Field(
        "", max_length=500, description="free text; no control characters but tab")


def _dmarc_answer(result: dict) -> dict:
    """What ``import_report`` did with a posted aggregate report: 200 with ``outcome``
    "stored" or "already stored" (a resent report is counted once), else 422 with the reason
    (not about one of the node's domains; unreadable or hostile)."""
    if result.get("not_ours"):
        raise HTTPException(422, f"DMARC aggregate report not stored: {result['error']}")
    if not result["ok"]:
        raise HTTPException(422, f"DMARC aggregate report refused: {result['error']}")
    return {"kind": "dmarc", "outcome": "stored" if result["stored"] else "already stored",
            **{k: result[k] for k in ("conflict", "reporter", "email", "report_id",
                                      "policy_domain", "records", "messages")}}


def router(parts: NodeParts) -> APIRouter:
    api = APIRouter(tags=["feedback"], route_class=JSONRoute)
    store = parts.feedback.suppression

    @api.get("/suppressions")
    async def list_(scope: Scope | None = None, like: str | None = None,
                    limit: Annotated[int, Query(ge=1, le=10_000)] = 100,
                    offset: Annotated[int, Query(ge=0, lt=2**63)] = 0) -> dict:
        # scans of a list of millions: in a thread, never on the event loop
        entries = await asyncio.to_thread(store.list, scope, like, limit, offset)
        return {"total": await asyncio.to_thread(store.count),
                "entries": [e.as_dict() for e in entries]}

    ops = parts.operations

    @api.post("/suppressions", status_code=201)
    async def add(request: Request, item: SuppressionIn) -> dict:
        try:
            entry = await ops.suppress(item.address, item.scope, item.reason,
                                       who=caller(request))
        except SuppressionError as exc:
            raise HTTPException(422, str(exc)) from None
        return entry.as_dict()

    @api.delete("/suppressions/{address:path}")  # a/b@example.com is an address
    async def remove(request: Request, address: str, scope: Scope | None = None) -> dict:
        try:
            removed = await ops.unsuppress(address, scope, who=caller(request))
        except SuppressionError as exc:
            raise HTTPException(422, str(exc)) from None
        if not removed:
            raise HTTPException(404, f"{address} is not suppressed")
        return {"removed": removed}

    @api.post("/suppressions/import")
    async def import_(request: Request, scope: Scope = "marketing") -> dict:
        """CSV body: address[,scope,reason,source,created,expires]; all rows or none."""
        try:
            text = csv_text(await request.body())
            count = await ops.import_suppressions(io.StringIO(text), scope,
                                                  who=caller(request))
        except SuppressionError as exc:
            raise HTTPException(422, str(exc)) from None
        return {"imported": count}

    @api.get("/suppressions/export", response_class=Response, responses={
        200: {"content": {"text/csv": {"schema": {"type": "string"}}},
              "description": "address,scope,reason,source,created,expires"}})
    async def export() -> StreamingResponse:
        """The whole list as CSV, streamed page by page (5,000 entries, each read in a
        thread): a list of millions was built whole in memory, and kept there for a client
        that did not read it."""
        async def pages() -> AsyncIterator[str]:
            yield ",".join(CSV_FIELDS) + "\r\n"
            after: tuple[str, str] | None = ("", "")
            while after is not None:
                rows, after = await asyncio.to_thread(store.export_page, after)
                yield rows

        return StreamingResponse(pages(), media_type="text/csv; charset=utf-8")

    @api.post("/feedback/reports")
    async def report(request: Request) -> dict:
        """A bounce or ARF report as a raw RFC 5322 message (e.g. from a provider webhook):
        handled as if it had arrived by SMTP at the FBL address. A DMARC aggregate report (a
        mail carrying one, or the XML, gzip or zip file itself) goes where mail to the rua
        address goes, and the answer says whether it was stored."""
        data = await request.body()
        if not data or len(data) > MAX_REPORT:
            raise HTTPException(413 if data else 422, "send one message, at most 10 MB")
        client = plain_ip(request.client.host) if request.client else ""
        limit = parts.config.reputation.dmarc.max_report_size
        if await asyncio.to_thread(is_aggregate, data, limit):
            return _dmarc_answer(await parts.reputation.receive(data, client, via="api"))
        report = await parts.feedback.receive(data, [], client)
        assert report is not None  # None only for mail to a rua address: no recipient here
        await parts.spool.flush()  # its records are on disk before the answer
        return report.as_dict()

    @api.get("/feedback/complaint-rates")
    async def rates() -> dict:
        return {"threshold": parts.feedback.rates.alert_rate,
                "rates": parts.feedback.rates.rates()}

    return api
