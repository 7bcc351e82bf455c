"""Delivery events back to the originating system: audit records POSTed to HTTP webhooks.

Each webhook has a durable cursor (the last audit seq it has acknowledged, kept in the audit
store), so delivery is at-least-once and in order across restarts and receiver outages: a batch
is retried with exponential backoff until the receiver answers 2xx, and only then does the cursor
move. Receivers deduplicate on ``seq``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path

import httpx

from ...config.model import WebhookConfig
from .store import SQLiteAuditStore, row_record

__all__ = ["WebhookSender", "event_of"]

log = logging.getLogger("postlane.audit.webhooks")

_POLL = 5.0  # seconds between looks at the store when no commit notification arrives


def event_of(row: dict) -> dict:
    """One record as the receiver sees it: PowerMTA field names plus its place in the chain
    (``hash`` lets the receiver hold an independent anchor of the audit trail)."""
    event: dict = {"seq": row["seq"], "hash": bytes(row["hash"]).hex()}
    event.update(row_record(row).as_dict())
    return event


class WebhookSender:
    def __init__(self, store_path: str | Path, hook: WebhookConfig, node: str) -> None:
        self.hook = hook
        self.name = hook.name or hook.url
        self.node = node
        self.store_path = Path(store_path)
        self.wake = asyncio.Event()

    async def run(self) -> None:
        """Deliver forever (cancel to stop; the cursor already marks what was acknowledged)."""
        hook = self.hook
        store = await asyncio.to_thread(SQLiteAuditStore, self.store_path)
        try:
            async with httpx.AsyncClient(timeout=hook.timeout) as client:
                cursor = await asyncio.to_thread(store.cursor, self.name)
                delay = hook.retry_min
                while True:
                    self.wake.clear()
                    rows, upto = await asyncio.to_thread(
                        store.rows_after, cursor, hook.types, hook.classes, hook.batch)
                    if rows and not await self._post(client, rows):
                        await asyncio.sleep(delay)
                        delay = min(delay * 2, hook.retry_max)
                        continue
                    delay = hook.retry_min
                    if upto != cursor:
                        await asyncio.to_thread(store.set_cursor, self.name, upto)
                        cursor = upto
                    if len(rows) < hook.batch:
                        with contextlib.suppress(TimeoutError):
                            await asyncio.wait_for(self.wake.wait(), _POLL)
        finally:
            await asyncio.to_thread(store.close)

    async def _post(self, client: httpx.AsyncClient, rows: list[dict]) -> bool:
        payload = {"node": self.node, "events": [event_of(r) for r in rows]}
        try:
            resp = await client.post(self.hook.url, json=payload, headers=self.hook.headers)
        except httpx.HTTPError as exc:
            log.warning("webhook delivery failed", extra={"webhook": self.name,
                                                          "error": type(exc).__name__})
            return False
        if 200 <= resp.status_code < 300:
            return True
        log.warning("webhook refused a batch", extra={"webhook": self.name,
                                                      "status": resp.status_code})
        return False
