"""Retry timers: one heap entry per deferred recipient and one loop timer for the earliest, so a
queue of any size costs one ``call_later`` at a time."""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections.abc import Callable, Iterator

from ..spool import Recipient, State
from .clock import Clock


class RetryTimers:
    def __init__(self, clock: Clock, on_due: Callable[[Recipient], None]) -> None:
        self.clock = clock
        self.on_due = on_due
        """Called with each deferred recipient whose retry time has come."""
        self._heap: list[tuple[float, int, Recipient]] = []
        self._seq = itertools.count()
        self._handle: asyncio.TimerHandle | None = None
        self.stopped = False

    def add(self, rcpt: Recipient) -> None:
        """Wake ``rcpt`` at its ``next_attempt`` (it must be DEFERRED then to be woken)."""
        heapq.heappush(self._heap, (rcpt.next_attempt, next(self._seq), rcpt))
        if self._heap[0][2] is rcpt:
            self.arm()

    def arm(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        if self._heap and not self.stopped:
            loop = asyncio.get_running_loop()
            delay = max(0.0, self._heap[0][0] - self.clock.time())
            self._handle = loop.call_later(delay, self.fire)

    def fire(self) -> None:
        """Hand every due recipient still deferred to ``on_due``; arm for the next one."""
        self._handle = None
        now = self.clock.time()
        while self._heap and self._heap[0][0] <= now:
            _, _, rcpt = heapq.heappop(self._heap)
            if rcpt.state is not State.DEFERRED:
                continue  # retried early ("retry now") or purged meanwhile
            self.on_due(rcpt)
        self.arm()

    def take(self, chosen: Callable[[Recipient], bool]) -> list[Recipient]:
        """Remove the chosen waiting recipients (one heap rebuild) and return them."""
        taken: list[Recipient] = []
        kept = []
        for entry in self._heap:
            rcpt = entry[2]
            if rcpt.state is not State.DEFERRED:
                continue  # no longer waiting for this timer
            if chosen(rcpt):
                taken.append(rcpt)
            else:
                kept.append(entry)
        if len(kept) != len(self._heap):
            heapq.heapify(kept)
            self._heap = kept
            self.arm()
        return taken

    def __iter__(self) -> Iterator[Recipient]:
        """The recipients waiting for their retry time."""
        for _, _, rcpt in self._heap:
            if rcpt.state is State.DEFERRED:
                yield rcpt

    def __len__(self) -> int:
        return len(self._heap)

    def stop(self) -> None:
        self.stopped = True
        if self._handle is not None:
            self._handle.cancel()
