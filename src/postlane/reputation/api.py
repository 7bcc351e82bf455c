"""Management routes of the reputation view (mounted under /api/v1, behind the token)."""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Annotated, Literal

from fastapi import APIRouter, HTTPException, Query

from .alignment import summarise

if TYPE_CHECKING:
    from ..config import Config
    from .service import ReputationService

__all__ = ["router"]


def router(service: ReputationService, config: Config) -> APIRouter:
    api = APIRouter(tags=["reputation"])

    @api.get("/reputation")
    async def reputation() -> dict:
        """Per pool and IP: Gmail reputation and spam ratio, SNDS colour and complaint rate,
        DMARC alignment, our complaint and bounce rates; DMARC per domain; the importers with
        the age of their last good import; stale destination rules; the marketing pool each
        reputation alert offers to pause."""
        view = dict(service.view)
        now = time.time()
        view["imports"] = {
            name: {**state, "age_s": None if state.get("last_success") is None
                   else round(now - state["last_success"], 1)}
            for name, state in view.get("imports", {}).items()}
        return view

    @api.get("/dmarc/report")
    async def dmarc_report(domain: Annotated[str | None, Query(max_length=253)] = None,
                           days: Annotated[float, Query(gt=0, le=3660)] = 7) -> dict:
        """Alignment per sending domain and the pools / forwarders / authorised / unknown
        split with the top sources of each (``postlane dmarc report``)."""
        if service.store is None:
            raise HTTPException(503, "the reputation store is not open")
        store = service.store

        def read() -> dict:  # off the event loop: months of reports are many rows
            since = time.time() - days * 86400
            return {"conflicting_reports": store.dmarc_conflicts(since),
                    **summarise(store.dmarc_sources(since, domain), service.pool_ips)}

        return {"days": days, **await asyncio.to_thread(read)}

    @api.post("/reputation/import/{source}")
    async def import_now(source: Literal["postmaster", "snds"]) -> dict:
        """Run an importer now (it also runs every ``interval``)."""
        rep = config.reputation
        if not (rep.postmaster.key_file if source == "postmaster" else rep.snds.url):
            raise HTTPException(409, f"the {source} importer is not configured")
        return await service.import_now(source)

    return api
