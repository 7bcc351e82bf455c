"""The node's writes to the suppression list, in a thread of their own (the list itself, its
schema and its reads are ``suppression.py``)."""

from __future__ import annotations

import asyncio
import logging
import queue
import sqlite3
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

from .suppression import SuppressionBusy, SuppressionError, SuppressionList

__all__ = ["SuppressionWriter"]

T = TypeVar("T")


class SuppressionWriter:
    """The node's writes to the list, in a thread of their own: a hard bounce, a complaint or
    an operator's change never waits on the event loop for the database's write lock, which
    a ``postlane suppress import`` of a large list holds for seconds (that wait used to stall
    every SMTP session and delivery of the node).

    Writes run one after the other, in the order given. A write is never dropped: while the
    database is locked or failing it is tried again (a failure is logged once per outage);
    one the database refuses outright (a constraint) goes back to its caller, as bad input.
    ``call`` waits for the result; ``submit`` does not (``flush`` waits for every write
    submitted so far). A write is a store method that takes ``patience`` and may be run more
    than once (it is, while another process holds the lock): give it its data, not a stream."""

    def __init__(self, store: SuppressionList, log: logging.Logger | None = None) -> None:
        self.store = store
        self.log = log or logging.getLogger("postlane.feedback")
        self.written = 0
        self.waiting = 0.0
        """Seconds the current write has waited for the lock (0: none is waiting)."""
        self._patience_at_close = 30.0
        self._queue: queue.SimpleQueue[tuple[Any, ...] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="suppression-writer",
                                        daemon=True)
        self._thread.start()

    def submit(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run ``fn(*args)`` in the writer thread (a method of the store that writes)."""
        self._queue.put((fn, args, None, None))

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` in the writer thread, after every write submitted before it."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[T] = loop.create_future()
        self._queue.put((fn, args, loop, fut))
        return await fut

    async def flush(self) -> None:
        await self.call(_nothing)

    def close(self, patience: float = 30.0) -> None:
        """Write what is queued (waiting at most ``patience`` seconds for a lock), then stop."""
        self._patience_at_close = patience
        self._queue.put(None)
        self._thread.join()

    def _run(self) -> None:
        closing = False
        while True:
            item = self._queue.get()
            if item is None:
                closing = True
                if self._queue.empty():
                    return
                self._queue.put(None)  # after what was queued before the close
                continue
            fn, args, loop, fut = item
            try:
                result = self._attempt(fn, args, closing)
            except BaseException as exc:  # noqa: BLE001 - handed to the caller
                if fut is None:
                    self.log.error("suppression write %s failed: %s", _name(fn), exc)
                else:
                    loop.call_soon_threadsafe(_settle, fut, None, exc)
                continue
            self.written += 1
            if fut is not None:
                loop.call_soon_threadsafe(_settle, fut, result, None)

    def _attempt(self, fn: Callable[..., Any], args: tuple[Any, ...], closing: bool) -> Any:
        """Try ``fn`` until it is done; bad input (``SuppressionError``, a row the database's
        constraints refuse) is not tried again."""
        failures = 0
        started = time.monotonic()
        told = False
        while True:
            waited = time.monotonic() - started
            patience = 5.0 if not closing else max(0.0, self._patience_at_close - waited)
            try:
                result = fn(*args, patience=patience)
                if failures or told:
                    self.log.warning("suppression list writable again after %.1fs",
                                     time.monotonic() - started)
                self.waiting = 0.0
                return result
            except (SuppressionError, sqlite3.IntegrityError):  # the write's own fault: no
                raise  # retry cures it, and every write after it would wait behind it
            except SuppressionBusy:
                if closing and patience <= 0:
                    raise
                if not told:
                    told = True
                    self.log.warning("suppression list locked by another process (an import?):"
                                     " writes wait, the node goes on")
            except Exception as exc:  # a disk error: wait and try again, never drop it
                if failures == 0:
                    self.log.error("suppression list write failed: %s; trying again", exc)
                failures += 1
                if closing and failures >= 3:
                    raise
                time.sleep(min(5.0, 0.1 * 2 ** failures))
            self.waiting = time.monotonic() - started


def _settle(fut: asyncio.Future[Any], result: object, error: BaseException | None) -> None:
    if fut.done():
        return
    if error is None:
        fut.set_result(result)
    else:
        fut.set_exception(error)


def _nothing(patience: float | None = None) -> None:
    return None


def _name(fn: Callable[..., Any]) -> str:
    return getattr(fn, "__name__", repr(fn))
