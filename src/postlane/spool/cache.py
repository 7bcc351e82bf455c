"""The bodies of recently accepted messages, kept in memory so that the first delivery attempt
(usually seconds after acceptance) reads no disk and makes no database round trip."""

from __future__ import annotations

import collections

BODY_CACHE_BYTES = 32 * 1024 * 1024


class BodyCache:
    """Least recently stored first out, bounded in bytes."""

    def __init__(self, max_bytes: int = BODY_CACHE_BYTES) -> None:
        self.max_bytes = max_bytes
        self._items: collections.OrderedDict[str, bytes] = collections.OrderedDict()
        self._bytes = 0

    def put(self, msg_id: str, body: bytes) -> None:
        self._items[msg_id] = body
        self._bytes += len(body)
        while self._bytes > self.max_bytes and self._items:
            _, old = self._items.popitem(last=False)
            self._bytes -= len(old)

    def get(self, msg_id: str) -> bytes | None:
        return self._items.get(msg_id)

    def pop(self, msg_id: str) -> None:
        body = self._items.pop(msg_id, None)
        if body is not None:
            self._bytes -= len(body)
