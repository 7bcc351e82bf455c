"""Lanes and connection slots: the in-memory shape of the queue.

A lane is the queue of one (pool, destination domain). Inside a lane recipients are ordered by
(class priority, deadline), so a policy notice sharing a pool with slower classes still goes first.
Each source IP has a hard cap of concurrent outbound connections (``max_smtp_out``); a pool's slots
belong to that pool alone, so no other class can ever hold them.

A lane keeps only its head in memory when it is deep: ``spooled`` counts its ready recipients
that wait in the spool alone, all of them after ``cursor`` in the lane's order; the pager
(``paging.py``) reads them in, in order, as the head drains. What the monitor and the status
need (depth, oldest age) are counters kept as recipients come and go, so reading them costs
nothing however deep the queue.
"""

from __future__ import annotations

import asyncio
import heapq
import ipaddress
import itertools
import time
from dataclasses import dataclass, field

from ..config.model import DestinationRule
from ..spool import Recipient, State

_seq = itertools.count()


@dataclass(slots=True, eq=False)
class SourceSlot:
    """One source IP of a pool, with its EHLO name and connection cap."""

    pool: str
    address: str
    ehlo: str
    max_smtp_out: int
    in_use: int = 0
    per_dest: dict[str, int] = field(default_factory=dict)
    version: int = field(init=False, default=0)
    """4 or 6: the family of ``address``, which decides the MX addresses it can reach."""

    def __post_init__(self) -> None:
        self.version = ipaddress.ip_address(self.address).version

    @property
    def free(self) -> int:
        return self.max_smtp_out - self.in_use


class AgeLedger:
    """The injection times of a lane's recipients not yet final, by second: ``oldest`` is
    amortised O(1) and memory grows with the seconds a queue spans, not its depth. Exact while
    the oldest second still holds its first recipient, otherwise early by under a second."""

    __slots__ = ("_count", "_seconds")

    def __init__(self) -> None:
        self._count: dict[int, list] = {}
        """second -> [recipients, earliest injection time seen in it]"""
        self._seconds: list[int] = []

    def enter(self, queued_at: float, n: int = 1, earliest: float | None = None) -> None:
        second = int(queued_at)
        entry = self._count.get(second)
        if entry is None:
            self._count[second] = [n, queued_at if earliest is None else earliest]
            heapq.heappush(self._seconds, second)
        else:
            entry[0] += n
            entry[1] = min(entry[1], queued_at if earliest is None else earliest)

    def leave(self, queued_at: float) -> None:
        entry = self._count.get(int(queued_at))
        if entry is not None:
            entry[0] -= 1

    def oldest(self) -> float | None:
        """Injection time of the oldest recipient not yet final (None: none)."""
        seconds, count = self._seconds, self._count
        while seconds:
            entry = count[seconds[0]]
            if entry[0] > 0:
                return entry[1]
            del count[heapq.heappop(seconds)]
        return None


@dataclass(slots=True, eq=False)
class Lane:
    pool: str
    domain: str
    heap: list = field(default_factory=list)
    workers: int = 0
    idle: list[asyncio.Future] = field(default_factory=list)
    paused: bool = False
    suspended_until: float = 0.0
    suspend_reason: str = ""
    deferred: int = 0
    """Recipients of this lane waiting for a retry time (they sit in the scheduler's timer heap)."""
    inflight: int = 0
    held: int = 0
    """Recipients of this lane an operator put on hold (in the scheduler's ``held``)."""
    rule_name: str = ""
    rule: DestinationRule | None = None
    backoff_until: float = 0.0
    backoff_switches: int = 0
    touched: float = 0.0
    """monotonic time of the last message queued here: tells a dormant lane from a busy one."""
    next_send: dict[str, float] = field(default_factory=dict)
    """Per source IP: earliest time the rate limit lets the next message go."""
    rate_wait: bool = False
    """The rule's per-pool rate refused a token: the lane waits for ``on_tokens``."""
    rate_refusals: int = 0
    spooled: int = 0
    """Ready recipients of this lane kept only in the spool (after ``cursor``), read in by the
    pager as the head drains."""
    cursor: tuple | None = None
    """(priority, deadline, queue id, index) of the last recipient the head covers: every
    ready recipient up to it is in ``heap``, none after it. None: the whole lane is here."""
    paging: bool = False
    """A read of the next page is under way."""
    spills: int = 0
    """New recipients left in the spool so far (a page tells from it whether any came while
    it read)."""
    ages: AgeLedger = field(default_factory=AgeLedger)
    families: frozenset[int] = frozenset()
    """IP versions of the destination's addresses at its last lookup (empty: not known yet).
    A slot of another family reaches none of them (``relay.deliver.reachable``): the lane
    takes a slot of one of these when its pool has one."""

    @property
    def dest_key(self) -> str:
        """What per-IP connection limits count against: the rule (gmail.com and googlemail.com
        share Google's MXes) or the domain."""
        return f"rule:{self.rule_name}" if self.rule_name else self.domain

    @property
    def rate_key(self) -> str | None:
        """The token bucket of the rule's ``max_rate_per_pool``: one per rule and pool, since a
        pool is a sending identity (its own IPs, EHLO and signing domain) and a transactional
        pool must never wait for tokens a campaign spent. None: no per-pool rate."""
        if self.rule is None or self.rule.max_rate_per_pool is None:
            return None
        return f"{self.rule_name}/{self.pool}"

    def in_backoff(self, now: float) -> bool:
        return self.backoff_until > now

    def max_connections_per_ip(self, now: float) -> int | None:
        if self.rule is None:
            return None
        if self.in_backoff(now):
            return self.rule.backoff_max_connections_per_ip
        return self.rule.max_connections_per_ip

    def rate_per_ip(self, now: float) -> float | None:
        if self.rule is None:
            return None
        if self.in_backoff(now):
            return self.rule.backoff_rate_per_ip or self.rule.max_rate_per_ip
        return self.rule.max_rate_per_ip

    @property
    def key(self) -> tuple[str, str]:
        return (self.pool, self.domain)

    def wake_one(self) -> bool:
        """Hand the lane's work to one connection idling on it; False if none is waiting."""
        while self.idle:
            fut = self.idle.pop(0)
            if not fut.done():
                fut.set_result(None)
                return True
        return False

    def push(self, rcpt: Recipient, priority: int, deadline: float) -> None:
        heapq.heappush(self.heap, (priority, deadline, next(_seq), rcpt))
        self.touched = time.monotonic()

    def top(self) -> tuple[int, float]:
        prio, deadline, _, _ = self.heap[0]
        return prio, deadline

    def blocked(self, now: float) -> bool:
        return self.paused or self.suspended_until > now

    def pop_batch(self, limit: int) -> list[Recipient]:
        """The most urgent recipient plus its message's other recipients in this lane: one
        SMTP transaction carries them all."""
        if not self.heap:
            return []
        first = heapq.heappop(self.heap)[3]
        batch = [first]
        while self.heap and len(batch) < limit and self.heap[0][3].msg is first.msg:
            batch.append(heapq.heappop(self.heap)[3])
        for rcpt in batch:
            rcpt.state = State.INFLIGHT
        self.inflight += len(batch)
        return batch

    def depth(self) -> int:
        return len(self.heap) + self.spooled + self.deferred + self.inflight + self.held

    def ready(self) -> int:
        """Recipients that could go now but for a pause, a suspension or a free slot."""
        return len(self.heap) + self.spooled

    def oldest(self, now: float) -> float:
        """Age of the lane's oldest recipient not yet final (0: none); O(1)."""
        at = self.ages.oldest()
        return 0.0 if at is None else max(0.0, now - at)
