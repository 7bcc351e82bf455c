"""Delivery events back to the originating system: audit records POSTed to HTTP webhooks.

Each webhook has a durable cursor (the last audit seq it has acknowledged, kept in the audit
store), so delivery is at-least-once and in order across restarts and receiver outages: a batch
is retried with exponential backoff until the receiver answers 2xx, and only then does the cursor
move. Receivers deduplicate on ``seq``. In a cluster the cursor is shared and one node sends.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

import httpx

from ..config.model import WebhookConfig
from .queries import row_record
from .store import AuditStore

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
    """Delivers one webhook. With several nodes on one PostgreSQL store, each node runs a
    sender but only the one holding the webhook's cursor (``AuditStore.hold_cursor``) sends;
    the others check again every few seconds and take over when that node goes away."""

    def __init__(self, open_store: Callable[[], AuditStore], hook: WebhookConfig,
                 node: str) -> None:
        self.hook = hook
        self.name = hook.name or hook.url
        self.node = node
        self.open_store = open_store
        self.wake = asyncio.Event()
        self.rounds = 0
        """Looks at the store completed (sent or found nothing, held the cursor or not): that
        the sender is alive and has seen what was committed before its last round began."""

    async def run(self) -> None:
        """Deliver forever (cancel to stop; the cursor already marks what was acknowledged).
        A store that cannot be read (the database away) is retried like a refusing receiver."""
        hook = self.hook
        store: AuditStore | None = None
        delay = hook.retry_min
        try:
            async with httpx.AsyncClient(timeout=hook.timeout) as client:
                while True:
                    self.wake.clear()
                    try:
                        if store is None:
                            store = await asyncio.to_thread(self.open_store)
                        more = await self._round(client, store)
                    except Exception as exc:  # the database away, a locked file: try again
                        log.warning("webhook cannot read the audit store",
                                    extra={"webhook": self.name, "error": repr(exc)})
                        more = None
                    self.rounds += 1
                    if more is None:
                        await asyncio.sleep(delay)
                        delay = min(delay * 2, hook.retry_max)
                        continue
                    delay = hook.retry_min
                    if not more:
                        with contextlib.suppress(TimeoutError):
                            await asyncio.wait_for(self.wake.wait(), _POLL)
        finally:
            if store is not None:
                await asyncio.to_thread(store.close)

    async def _round(self, client: httpx.AsyncClient, store: AuditStore) -> bool | None:
        """Send one batch: True if more may be waiting, False to wait for a commit (or for
        another node's sender to go away), None if the receiver did not take it."""
        hook = self.hook
        if not await asyncio.to_thread(store.hold_cursor, self.name):
            return False
        # read every round: after a reconnect another node may have moved it meanwhile
        cursor = await asyncio.to_thread(store.cursor, self.name)
        rows, upto = await asyncio.to_thread(store.rows_after, cursor, hook.types,
                                             hook.classes, hook.batch)
        if rows and not await self._post(client, rows):
            return None
        if upto != cursor:
            await asyncio.to_thread(store.set_cursor, self.name, upto)
        return len(rows) == hook.batch

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
