"""The scheduler: which recipient goes out next, on which connection slot, and what happens after.

Dispatch is event driven (a new message, a freed slot or a due retry triggers it at once; there is
no polling interval). Lanes are served by strict class priority, then earliest deadline
(injection time + SLA). A worker that holds a slot gives it up after its current transaction when a
more urgent lane of the same pool is waiting for one, so capacity reserved for a higher class is
never kept by a lower one.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import random
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from ..accounting.records import Record
from ..config import Config
from ..spool import Message, Recipient, RecipientUpdate, Spool, State
from .lanes import Lane, SourceSlot

if TYPE_CHECKING:
    from ..relay.deliver import Relay

log = logging.getLogger("postlane.scheduler")

ANY_DOMAIN = "*"


class Failure:
    """A recipient that failed for good, waiting to be reported in a bounce."""

    __slots__ = ("rcpt", "status", "diag", "remote_mta", "action")

    def __init__(self, rcpt: Recipient, status: str, diag: str, remote_mta: str,
                 action: str = "failed") -> None:
        self.rcpt, self.status, self.diag = rcpt, status, diag
        self.remote_mta, self.action = remote_mta, action


class Scheduler:
    def __init__(self, config: Config, spool: Spool, record: Callable[[Record], None],
                 on_failures: Callable[[Message, list[Failure]], None] | None = None) -> None:
        self.config = config
        self.spool = spool
        self.record = record
        self.on_failures = on_failures
        self.relay: Relay | None = None
        self.on_final: Callable[[Recipient], None] | None = None
        """Called when a recipient reaches a final state (cluster mode claims more work)."""
        self.lanes: dict[tuple[str, str], Lane] = {}
        self.slots: dict[str, list[SourceSlot]] = {
            name: [SourceSlot(name, ip.address, ip.ehlo, ip.max_smtp_out) for ip in pool.ips]
            for name, pool in config.pools.items()
        }
        self.paused: set[tuple[str, str]] = set()
        self._ready: set[Lane] = set()
        self._waiting_priority: dict[str, int] = {}
        self._timers: list[tuple[float, int, Recipient]] = []
        self._timer_handle: asyncio.TimerHandle | None = None
        self._timer_seq = itertools.count()
        self._dispatch_pending = False
        self._stopping = False
        self._tasks: set[asyncio.Task] = set()
        self.fifo = config.scheduler == "fifo"

    # -- queueing -------------------------------------------------------------------------------

    def lane(self, pool: str, domain: str) -> Lane:
        lane = self.lanes.get((pool, domain))
        if lane is None:
            lane = self.lanes[(pool, domain)] = Lane(pool, domain)
            lane.paused = (pool, ANY_DOMAIN) in self.paused or (pool, domain) in self.paused
        return lane

    def _order(self, msg: Message) -> tuple[int, float]:
        return (0, msg.queued_at) if self.fifo else (msg.priority, msg.deadline)

    def add(self, rcpt: Recipient) -> None:
        """Make a recipient ready now (or at its retry time if that is still ahead)."""
        lane = self.lane(rcpt.msg.pool, rcpt.domain)
        if rcpt.next_attempt > time.time():
            lane.deferred += 1
            self._add_timer(rcpt)
            return
        rcpt.state = State.QUEUED
        if lane.idle and not lane.blocked(time.time()) and not lane.heap:
            prio, deadline = self._order(rcpt.msg)
            lane.push(rcpt, prio, deadline)
            lane.idle.pop(0).set_result(None)
            return
        prio, deadline = self._order(rcpt.msg)
        lane.push(rcpt, prio, deadline)
        self._ready.add(lane)
        self.kick()

    def add_message(self, rcpts: list[Recipient]) -> None:
        for rcpt in rcpts:
            self.add(rcpt)

    # -- dispatch -------------------------------------------------------------------------------

    def kick(self) -> None:
        if not self._dispatch_pending and not self._stopping:
            self._dispatch_pending = True
            asyncio.get_running_loop().call_soon(self._dispatch)

    def _dispatch(self) -> None:
        self._dispatch_pending = False
        if self._stopping or self.relay is None:
            return
        now = time.time()
        lanes = [ln for ln in self._ready if ln.heap and not ln.blocked(now)]
        self._ready = {ln for ln in self._ready if ln.heap}
        lanes.sort(key=Lane.top)
        waiting: dict[str, int] = {}
        for lane in lanes:
            while len(lane.heap) > len(lane.idle) and lane.workers < self._lane_cap(lane):
                if lane.idle:
                    lane.idle.pop(0).set_result(None)
                    continue
                slot = self._acquire(lane)
                if slot is None:
                    prio = lane.top()[0]
                    if prio < waiting.get(lane.pool, 99):
                        waiting[lane.pool] = prio
                    break
                lane.workers += 1
                task = asyncio.get_running_loop().create_task(self._run_worker(lane, slot))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
            if lane.idle and lane.heap:
                lane.idle.pop(0).set_result(None)
        self._waiting_priority = waiting

    def _lane_cap(self, lane: Lane) -> int:
        return sum(s.max_smtp_out for s in self.slots[lane.pool])

    def _acquire(self, lane: Lane) -> SourceSlot | None:
        best: SourceSlot | None = None
        for slot in self.slots[lane.pool]:
            if slot.free > 0 and (best is None or slot.in_use < best.in_use):
                best = slot
        if best is not None:
            best.in_use += 1
            best.per_domain[lane.domain] = best.per_domain.get(lane.domain, 0) + 1
        return best

    def _release(self, lane: Lane, slot: SourceSlot) -> None:
        slot.in_use -= 1
        left = slot.per_domain.get(lane.domain, 1) - 1
        if left:
            slot.per_domain[lane.domain] = left
        else:
            slot.per_domain.pop(lane.domain, None)

    async def _run_worker(self, lane: Lane, slot: SourceSlot) -> None:
        assert self.relay is not None
        try:
            await self.relay.work(lane, slot)
        except Exception:  # a worker bug must not leak its slot or kill the node
            log.exception("delivery worker for %s/%s failed", lane.pool, lane.domain)
        finally:
            lane.workers -= 1
            self._release(lane, slot)
            if lane.heap:
                self._ready.add(lane)
            self.kick()

    def next_batch(self, lane: Lane) -> list[Recipient]:
        """Called by a worker between transactions: more work for its connection, or nothing
        (lane empty, paused, or a more urgent lane of the pool needs the slot)."""
        if self._stopping or lane.blocked(time.time()) or not lane.heap:
            return []
        waiting = self._waiting_priority.get(lane.pool)
        if waiting is not None and waiting < lane.top()[0]:
            return []
        return self._pop(lane)

    def _pop(self, lane: Lane) -> list[Recipient]:
        now = time.time()
        limit = self.config.relay.max_recipients_per_transaction
        while lane.heap:
            batch = lane.pop_batch(limit)
            live = []
            for rcpt in batch:
                if now >= rcpt.msg.expire_at:
                    lane.inflight -= 1
                    self._expire(rcpt, "message expired before delivery", "")
                else:
                    live.append(rcpt)
            if live:
                return live
        return []

    async def wait_for_work(self, lane: Lane, timeout: float) -> list[Recipient]:
        """Keep a connection open a little while for more mail to the same place."""
        if self._stopping:
            return []
        batch = self.next_batch(lane)
        if batch or timeout <= 0:
            return batch
        fut = asyncio.get_running_loop().create_future()
        lane.idle.append(fut)
        try:
            await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            return []
        finally:
            if fut in lane.idle:
                lane.idle.remove(fut)
        return self.next_batch(lane)

    def suspend(self, lane: Lane, seconds: float, reason: str) -> None:
        """Stop opening connections to a destination that just failed (Postfix's "dead
        destination"); its queued recipients wait without spending attempts."""
        lane.suspended_until = time.time() + seconds
        lane.suspend_reason = reason
        self._ready.add(lane)
        asyncio.get_running_loop().call_later(seconds, self.kick)

    # -- outcomes -------------------------------------------------------------------------------

    def _base_record(self, kind: str, rcpt: Recipient, now: float) -> Record:
        msg = rcpt.msg
        return Record(type=kind, time_logged=now, time_queued=msg.queued_at, orig=msg.mail_from,
                      rcpt=rcpt.address, queue_id=msg.id, cls=msg.cls, vmta_pool=msg.pool,
                      orcpt=rcpt.orcpt, env_id=msg.envid, correlation_id=msg.correlation_id,
                      message_id=msg.message_id, job_id=msg.correlation_id, dlv_size=msg.size,
                      attempt=rcpt.attempts, total_seconds_queued=now - msg.queued_at,
                      listener=msg.listener, auth_user=msg.auth_user)

    def delivered(self, rcpt: Recipient, reply: str, status: str, conn: dict[str, str]) -> None:
        now = time.time()
        rcpt.attempts += 1
        rec = self._base_record("d", rcpt, now)
        rec.dsn_action, rec.dsn_status, rec.dsn_diag = "relayed", status, f"smtp;{reply}"
        _fill_conn(rec, conn)
        self._final(rcpt, State.DELIVERED, reply, rec)

    def bounced(self, rcpt: Recipient, reply: str, status: str, conn: dict[str, str],
                category: str = "") -> None:
        now = time.time()
        rcpt.attempts += 1
        rec = self._base_record("b", rcpt, now)
        rec.dsn_action, rec.dsn_status, rec.dsn_diag = "failed", status, f"smtp;{reply}"
        rec.bounce_cat = category
        _fill_conn(rec, conn)
        self._fail(rcpt, status, reply, conn.get("mx", ""))
        self._final(rcpt, State.BOUNCED, reply, rec)

    def deferred(self, rcpt: Recipient, reply: str, status: str, conn: dict[str, str]) -> None:
        """A temporary failure: retry per the class schedule, or expire past the class expiry."""
        now = time.time()
        rcpt.attempts += 1
        lane = self.lane(rcpt.msg.pool, rcpt.domain)
        cls = self.config.classes.get(rcpt.msg.cls)
        schedule = cls.retry if cls else [300.0]
        delay = schedule[min(rcpt.attempts - 1, len(schedule) - 1)] * random.uniform(0.9, 1.1)
        if now >= rcpt.msg.expire_at:
            lane.inflight -= 1
            self._expire(rcpt, reply, conn.get("mx", ""), conn)
            return
        rcpt.next_attempt = min(now + delay, rcpt.msg.expire_at)
        rcpt.state = State.DEFERRED
        rcpt.last_reply = reply
        rec = self._base_record("t", rcpt, now)
        rec.dsn_action, rec.dsn_status, rec.dsn_diag = "delayed", status, f"smtp;{reply}"
        _fill_conn(rec, conn)
        self.record(rec)
        self.spool.update([RecipientUpdate(rcpt.msg.id, rcpt.idx, State.DEFERRED, rcpt.attempts,
                                           rcpt.next_attempt, reply)])
        lane.inflight -= 1
        lane.deferred += 1
        self._add_timer(rcpt)

    def requeue(self, rcpt: Recipient) -> None:
        """Put back a recipient that was taken but never attempted (connection lost first)."""
        lane = self.lane(rcpt.msg.pool, rcpt.domain)
        lane.inflight -= 1
        self.add(rcpt)

    def _expire(self, rcpt: Recipient, reply: str, mx: str,
                conn: dict[str, str] | None = None) -> None:
        now = time.time()
        rec = self._base_record("b", rcpt, now)
        rec.dsn_action, rec.dsn_status, rec.bounce_cat = "failed", "4.4.7", "message-expired"
        rec.dsn_diag = f"smtp;{reply}" if reply else "message expired"
        if conn:
            _fill_conn(rec, conn)
        self._fail(rcpt, "4.4.7", reply or "message expired", mx)
        self._final(rcpt, State.EXPIRED, reply, rec, from_heap=False)

    def _final(self, rcpt: Recipient, state: State, reply: str, rec: Record,
               from_heap: bool = True) -> None:
        rcpt.state = state
        rcpt.last_reply = reply
        if from_heap:
            self.lane(rcpt.msg.pool, rcpt.domain).inflight -= 1
        self.record(rec)
        self.spool.update([RecipientUpdate(rcpt.msg.id, rcpt.idx, state, rcpt.attempts, 0.0,
                                           reply)])
        msg = rcpt.msg
        msg.remaining -= 1
        if msg.remaining <= 0:
            self.spool.finish(msg.id)
        if self.on_final is not None:
            self.on_final(rcpt)

    def _fail(self, rcpt: Recipient, status: str, diag: str, mx: str) -> None:
        if self.on_failures is not None and "NEVER" not in rcpt.notify.upper() and (
                not rcpt.notify or "FAILURE" in rcpt.notify.upper()):
            self.on_failures(rcpt.msg, [Failure(rcpt, status, diag, mx)])

    # -- retry timers ---------------------------------------------------------------------------

    def _add_timer(self, rcpt: Recipient) -> None:
        heapq.heappush(self._timers, (rcpt.next_attempt, next(self._timer_seq), rcpt))
        if self._timers[0][2] is rcpt:
            self._arm()

    def _arm(self) -> None:
        if self._timer_handle is not None:
            self._timer_handle.cancel()
            self._timer_handle = None
        if self._timers and not self._stopping:
            loop = asyncio.get_running_loop()
            delay = max(0.0, self._timers[0][0] - time.time())
            self._timer_handle = loop.call_later(delay, self._fire)

    def _fire(self) -> None:
        self._timer_handle = None
        now = time.time()
        while self._timers and self._timers[0][0] <= now:
            _, _, rcpt = heapq.heappop(self._timers)
            if rcpt.state is not State.DEFERRED:
                continue  # retried early ("retry now") or purged meanwhile
            self.lane(rcpt.msg.pool, rcpt.domain).deferred -= 1
            rcpt.next_attempt = 0.0
            self.add(rcpt)
        self._arm()

    def retry_now(self, pool: str | None = None, domain: str | None = None) -> int:
        """Make deferred recipients due at once; returns how many."""
        count = 0
        for _, _, rcpt in self._timers:
            if rcpt.state is State.DEFERRED and (pool is None or rcpt.msg.pool == pool) and (
                    domain is None or rcpt.domain == domain):
                self.lane(rcpt.msg.pool, rcpt.domain).deferred -= 1
                rcpt.next_attempt = 0.0
                self.add(rcpt)
                count += 1
        for lane in self.lanes.values():
            if (pool is None or lane.pool == pool) and (domain is None or lane.domain == domain):
                lane.suspended_until = 0.0
        self.kick()
        return count

    # -- pause ----------------------------------------------------------------------------------

    async def set_paused(self, pool: str, domain: str | None, paused: bool) -> None:
        await self.spool.set_paused(pool, domain or ANY_DOMAIN, paused)
        self.apply_paused(pool, domain, paused)

    def apply_paused(self, pool: str, domain: str | None, paused: bool) -> None:
        """Apply a pause already stored (by this node, or by another node of a cluster)."""
        key = (pool, domain or ANY_DOMAIN)
        (self.paused.add if paused else self.paused.discard)(key)
        for lane in self.lanes.values():
            if lane.pool == pool:
                lane.paused = bool({(pool, ANY_DOMAIN), (pool, lane.domain)} & self.paused)
                if lane.heap:
                    self._ready.add(lane)
        self.kick()

    # -- lifecycle ------------------------------------------------------------------------------

    async def drain(self, timeout: float) -> None:
        """Stop taking new work; let in-flight transactions finish (up to ``timeout``)."""
        self._stopping = True
        if self._timer_handle is not None:
            self._timer_handle.cancel()
        for lane in self.lanes.values():
            for fut in lane.idle:
                if not fut.done():
                    fut.set_result(None)
        if self._tasks:
            _, pending = await asyncio.wait(set(self._tasks), timeout=timeout)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=5)

    def queued(self) -> int:
        return sum(lane.depth() for lane in self.lanes.values())


def _fill_conn(rec: Record, conn: dict[str, str]) -> None:
    if not conn:
        return
    rec.dlv_source_ip = conn.get("source_ip", "")
    rec.dlv_destination_ip = conn.get("dest_ip", "")
    rec.dlv_tls_protocol = conn.get("tls", "")
    rec.dlv_tls_cipher = conn.get("cipher", "")
    rec.vmta = conn.get("vmta", "")
    mx = conn.get("mx", "")
    if mx:
        rec.dsn_mta = f"dns;{mx} ({conn.get('dest_ip', '')})"
