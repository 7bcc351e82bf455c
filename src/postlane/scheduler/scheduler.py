"""The scheduler: which recipient goes out next, on which connection slot, and what happens after.

Dispatch is event driven (a new message, a freed slot or a due retry triggers it at once; there is
no polling interval). Lanes are served by strict class priority, then earliest deadline
(injection time + SLA). A worker that holds a slot gives it up after its current transaction when a
more urgent lane of the same pool is waiting for one, so capacity reserved for a higher class is
never kept by a lower one.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import logging
import random
import time
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING

import orjson

from ..accounting.records import Record, format_time
from ..config import Config
from ..feedback.categories import default_classifier
from ..monitor.health import Health
from ..operations import DONE, stamp
from ..spool import Message, PostgresSpool, Recipient, RecipientUpdate, Spool, State
from .lanes import Lane, SourceSlot
from .paging import Pager
from .rules import RuleBook
from .shared_rate import LocalRate, RateLimiter, SharedRate

if TYPE_CHECKING:
    from ..operations import Operator
    from ..relay.deliver import Relay

log = logging.getLogger("postlane.scheduler")

ANY_DOMAIN = "*"
DORMANT = 0.25
FAIR_SHARE = 50
"""Messages a connection sends before it makes room for an equally urgent waiting lane."""


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
        """Tells the in-memory observers of a record; the spool write that goes with each
        state change carries the record itself (the durable copy)."""
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
        self._waiting: dict[str, tuple[int, float]] = {}
        """Per pool, the (priority, deadline) of the most urgent lane that found no free slot."""
        self._timers: list[tuple[float, int, Recipient]] = []
        """Retry timers: exactly one entry per deferred recipient (``take`` removes them)."""
        self.held: dict[tuple[str, int], Recipient] = {}
        self._by_msg: dict[str, dict[int, Recipient]] = {}
        """Every recipient held, not yet final, by message id: a lookup of one message (the
        API's) must not walk the whole queue."""
        self._by_corr: dict[str, set[str]] = {}
        """Message ids by correlation id (of the messages in ``_by_msg``)."""
        """Recipients an operator put on hold, by (queue id, index)."""
        self._timer_handle: asyncio.TimerHandle | None = None
        self._timer_seq = itertools.count()
        self._dispatch_pending = False
        self._stopping = False
        self.fenced = False
        """No transaction starts (a cluster node that missed its heartbeats: the fence)."""
        self._tasks: set[asyncio.Task] = set()
        self.fifo = config.scheduler == "fifo"
        self.rules = RuleBook(config.destinations)
        self._rotation = itertools.count()
        self.classify: Callable[[str, str], str] = default_classifier().classify
        """Reply -> bounce category (PowerMTA names) for "b" and "t" records."""
        self.rates: RateLimiter = (
            SharedRate(spool, on_tokens=self._tokens_arrived) if isinstance(spool, PostgresSpool)
            else LocalRate(on_tokens=self._tokens_arrived))
        """Per-pool destination rates (``max_rate_per_pool``): across the cluster on
        PostgreSQL, in this process on SQLite; the same token bucket either way."""
        self._rate_waiting: dict[str, set[Lane]] = {}
        self.health = Health()
        """The node's: destinations that cannot be reached are told there, once each."""
        self.pager: Pager | None = None
        """Deep lanes keep their heads in memory and the rest in the spool (``paging.py``;
        the node sets it up on a SQLite spool)."""

    # -- queueing -------------------------------------------------------------------------------

    def lane(self, pool: str, domain: str) -> Lane:
        lane = self.lanes.get((pool, domain))
        if lane is None:
            lane = self.lanes[(pool, domain)] = Lane(pool, domain)
            lane.paused = (pool, ANY_DOMAIN) in self.paused or (pool, domain) in self.paused
            name = self.rules.for_domain(domain)
            if name:
                self.set_rule(lane, name)
        return lane

    def set_rule(self, lane: Lane, name: str) -> None:
        lane.rule_name, lane.rule = name, self.config.destinations[name]

    def _order(self, msg: Message) -> tuple[int, float]:
        return (0, msg.queued_at) if self.fifo else (msg.priority, msg.deadline)

    def add(self, rcpt: Recipient, fresh: bool = False) -> None:
        """Make a recipient ready now (or at its retry time if that is still ahead); ``fresh``:
        just accepted (a deep lane may leave it in the spool, see ``paging.py``)."""
        if rcpt.open_attempt is not None:
            self._outcome_unknown(rcpt)
        self.index(rcpt)
        lane = self.lane(rcpt.msg.pool, rcpt.domain)
        if not rcpt.counted:
            rcpt.counted = True
            lane.ages.enter(rcpt.msg.queued_at)
        pager = self.pager
        if rcpt.state is State.HELD:
            lane.held += 1
            self.held[(rcpt.msg.id, rcpt.idx)] = rcpt
            if pager is not None:
                pager.keep(rcpt)
            return
        if rcpt.next_attempt > time.time():
            rcpt.state = State.DEFERRED  # the timer only fires deferred recipients
            lane.deferred += 1
            self._add_timer(rcpt)
            if pager is not None:
                pager.keep(rcpt)
            return
        rcpt.state = State.QUEUED
        prio, deadline = self._order(rcpt.msg)
        if pager is not None:
            if fresh and pager.spill(lane, rcpt, prio, deadline):
                return
            pager.keep(rcpt)
        lane.push(rcpt, prio, deadline)
        if len(lane.heap) == 1 and not lane.blocked(time.time()) and lane.wake_one():
            return  # a connection was idling on this lane: it takes the work directly
        self._ready.add(lane)
        self.kick()

    def add_message(self, rcpts: list[Recipient]) -> None:
        for rcpt in rcpts:
            self.add(rcpt, fresh=True)

    def wake(self, lane: Lane) -> None:
        """Work arrived in a lane from elsewhere than intake (a page read from the spool)."""
        if lane.heap:
            self._ready.add(lane)
            self.kick()

    def stopping(self) -> bool:
        return self._stopping

    def outcome_unknown(self, rcpt: Recipient) -> None:
        """See ``_outcome_unknown`` (for recipients read in from the spool)."""
        self._outcome_unknown(rcpt)

    def _left(self, rcpt: Recipient) -> None:
        """A recipient is final, or no longer this node's: its lane's ages and the pager
        forget it."""
        if rcpt.counted:
            self.lane(rcpt.msg.pool, rcpt.domain).ages.leave(rcpt.msg.queued_at)
        if self.pager is not None:
            self.pager.gone(rcpt)

    # -- dispatch -------------------------------------------------------------------------------

    def kick(self) -> None:
        if not self._dispatch_pending and not self._stopping:
            self._dispatch_pending = True
            asyncio.get_running_loop().call_soon(self._dispatch)

    def _dispatch(self) -> None:
        self._dispatch_pending = False
        if self._stopping or self.fenced or self.relay is None:
            return
        now = time.time()
        lanes = [ln for ln in self._ready
                 if ln.heap and not ln.blocked(now) and not ln.rate_wait]
        self._ready = {ln for ln in self._ready if ln.heap}
        lanes.sort(key=Lane.top)
        waiting: dict[str, tuple[int, float]] = {}
        for lane in lanes:
            tokens = self._rate_budget(lane)
            while len(lane.heap) > len(lane.idle) and lane.workers < self._lane_cap(lane):
                if tokens < 1:
                    break  # more connections than rate tokens would only be refused
                tokens -= 1
                if lane.wake_one():
                    continue
                slot = self._acquire(lane)
                if slot is None:
                    if lane.pool not in waiting:
                        waiting[lane.pool] = lane.top()
                        self._release_idle(lane.pool)
                    break
                lane.workers += 1
                task = asyncio.get_running_loop().create_task(self._run_worker(lane, slot))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
            if lane.heap:
                lane.wake_one()
        self._waiting = waiting

    def _rate_budget(self, lane: Lane) -> float:
        """How many connections of a lane may start now under its per-pool rate: the tokens
        at hand, and at least one (whose refusal fetches more)."""
        key = lane.rate_key
        if key is None:
            return float("inf")
        assert lane.rule is not None and lane.rule.max_rate_per_pool is not None
        return max(1.0, self.rates.available(key, lane.rule.max_rate_per_pool,
                                             lane.rule.pool_burst))

    def _release_idle(self, pool: str) -> None:
        """A lane of ``pool`` waits for a slot: connections idling on dormant lanes (nothing
        queued for DORMANT seconds) give theirs up now rather than at their idle timeout. A lane
        that is only momentarily empty keeps its warm connection: releasing those made the bench
        reconnect for most messages of a campaign (py-spy: 15 % of the node's CPU in connects).
        Connections of a lane waiting for rate tokens cannot use their slot either: they go too."""
        dormant = time.monotonic() - DORMANT
        for lane in self.lanes.values():
            if lane.pool == pool and lane.idle and (
                    lane.rate_wait or (not lane.heap and lane.touched < dormant)):
                while lane.wake_one():
                    pass

    def _lane_cap(self, lane: Lane) -> int:
        slots = self.slots[lane.pool]
        per_ip = lane.max_connections_per_ip(time.time())
        if per_ip is None:
            return sum(s.max_smtp_out for s in slots)
        return sum(min(s.max_smtp_out, per_ip) for s in slots)

    def _acquire(self, lane: Lane) -> SourceSlot | None:
        """The least busy IP of the lane's pool with a free slot, within the destination's
        per-IP connection limit."""
        per_ip = lane.max_connections_per_ip(time.time())
        key = lane.dest_key
        best: SourceSlot | None = None
        slots = self.slots[lane.pool]
        start = next(self._rotation) % len(slots)  # ties go round the pool's IPs
        for slot in slots[start:] + slots[:start]:
            if slot.free <= 0 or (per_ip is not None and slot.per_dest.get(key, 0) >= per_ip):
                continue
            if best is None or slot.in_use < best.in_use:
                best = slot
        if best is not None:
            best.in_use += 1
            best.per_dest[key] = best.per_dest.get(key, 0) + 1
        return best

    def _release(self, lane: Lane, slot: SourceSlot) -> None:
        slot.in_use -= 1
        key = lane.dest_key
        left = slot.per_dest.get(key, 1) - 1
        if left:
            slot.per_dest[key] = left
        else:
            slot.per_dest.pop(key, None)

    async def throttle(self, lane: Lane, slot: SourceSlot) -> None:
        """Hold the next transaction until the destination's per-IP rate allows it."""
        now = time.time()
        rate = lane.rate_per_ip(now)
        if not rate:
            return
        at = max(now, lane.next_send.get(slot.address, 0.0))
        lane.next_send[slot.address] = at + 1.0 / rate
        if at > now:
            await asyncio.sleep(at - now)

    def max_messages_per_connection(self, lane: Lane) -> int:
        limit = self.config.pools[lane.pool].max_messages_per_connection
        if lane.rule is not None:
            limit = min(limit, lane.rule.max_messages_per_connection)
        return limit

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

    def next_batch(self, lane: Lane, sent: int = 0) -> list[Recipient]:
        """Called by a worker between transactions: more work for its connection, or nothing:
        lane empty or paused, a lane of higher priority in the pool needs the slot, or (after
        ``FAIR_SHARE`` messages on this connection) an equally urgent lane with an earlier
        deadline does. Without the last rule, busy lanes of a campaign keep their connections
        and one destination's mail can wait for the whole campaign."""
        if self._stopping or self.fenced or lane.blocked(time.time()) or not lane.heap:
            return []
        waiting = self._waiting.get(lane.pool)
        if waiting is not None:
            top = lane.top()
            if waiting[0] < top[0] or (sent >= FAIR_SHARE and waiting < top) or lane.rate_wait:
                del self._waiting[lane.pool]  # one connection makes room per waiting lane
                return []
        if not self.admit(lane):
            return []
        return self._pop(lane)

    def admit(self, lane: Lane) -> bool:
        """Take one token of the lane's per-pool rate for its next message. On a refusal the
        lane waits (``rate_wait``: no new connections, idle ones stay parked) until the limiter
        calls ``_tokens_arrived``."""
        key = lane.rate_key
        if key is None:
            return True
        assert lane.rule is not None and lane.rule.max_rate_per_pool is not None
        if self.rates.try_acquire(key, lane.rule.max_rate_per_pool, lane.rule.pool_burst):
            return True
        lane.rate_wait = True
        lane.rate_refusals += 1
        self._rate_waiting.setdefault(key, set()).add(lane)
        return False

    def _tokens_arrived(self, key: str) -> None:
        """Tokens for ``key`` can be had again: its waiting lanes go back to dispatch, which
        wakes their idle connections or opens new ones, most urgent lane first."""
        for lane in self._rate_waiting.pop(key, ()):
            lane.rate_wait = False
            if lane.heap:
                self._ready.add(lane)
        self.kick()

    def _pop(self, lane: Lane) -> list[Recipient]:
        now = time.time()
        limit = self.config.relay.max_recipients_per_transaction
        if self.config.pools[lane.pool].bounce_domain:
            limit = 1  # a VERP return path names one recipient
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
                if self.pager is not None and lane.cursor is not None:
                    self.pager.low(lane)
                return live
        if self.pager is not None and lane.cursor is not None:
            self.pager.low(lane)
        return []

    async def wait_for_work(self, lane: Lane, timeout: float, sent: int = 0) -> list[Recipient]:
        """Keep a connection open a little while for more mail to the same place."""
        if self._stopping:
            return []
        batch = self.next_batch(lane, sent)
        if batch or timeout <= 0:
            return batch
        loop = asyncio.get_running_loop()
        until = loop.time() + timeout
        while True:
            fut = loop.create_future()
            lane.idle.append(fut)
            # a timer that ends the wait, lighter than asyncio.wait_for (its own future, timer
            # and callbacks for each wait: one per message when connections outnumber the flow)
            timer = loop.call_at(until, _time_up, fut)
            try:
                if await fut is _TIME_UP:
                    return []
            finally:
                timer.cancel()
                if fut in lane.idle:
                    lane.idle.remove(fut)
            refusals = lane.rate_refusals
            batch = self.next_batch(lane, sent)
            if batch or lane.rate_refusals == refusals or until <= loop.time():
                return batch
            # woken, but the tokens went to another connection or node: wait for the next ones

    @staticmethod
    def outage_key(lane: Lane) -> str:
        """The ``Health`` key of a destination that cannot be reached from a pool."""
        return f"destination:{lane.pool}/{lane.domain}"

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

    def _outcome_unknown(self, rcpt: Recipient) -> None:
        """A recipient comes back (restart, or another node's work taken over) with an attempt
        that was marked as started and never settled: its final dot may have been sent and
        taken. Say so in its trail (a "u" record), count the attempt, and deliver it again."""
        attempt, rcpt.open_attempt = rcpt.open_attempt, None
        assert attempt is not None
        now = time.time()
        rcpt.attempts += 1
        rec = self._base_record("u", rcpt, now)
        rec.total_seconds_queued = attempt.started - rcpt.msg.queued_at  # delivered no sooner
        rec.dsn_diag = (f"attempt started {format_time(attempt.started)}; outcome unknown: the"
                        " node stopped before recording the reply (it may have been delivered)")
        with contextlib.suppress(ValueError):
            _fill_conn(rec, orjson.loads(attempt.info or "{}"))
        self.record(rec)
        self.spool.update([RecipientUpdate(rcpt.msg.id, rcpt.idx, rcpt.state, rcpt.attempts,
                                           rcpt.next_attempt, rcpt.last_reply)], (rec,))

    def delivered(self, rcpt: Recipient, reply: str, status: str, conn: dict[str, str]) -> None:
        now = time.time()
        rcpt.attempts += 1
        rec = self._base_record("d", rcpt, now)
        rec.dsn_action, rec.dsn_status, rec.dsn_diag = "relayed", status, f"smtp;{reply}"
        _fill_conn(rec, conn)
        self._final(rcpt, State.DELIVERED, reply, rec)
        lane = self.lane(rcpt.msg.pool, rcpt.domain)
        if self.health.active:
            self.health.end(self.outage_key(lane))
        if lane.in_backoff(now) and lane.rule is not None and lane.rule.backoff_until_success:
            self._end_backoff(lane, "delivery succeeded")

    def bounced(self, rcpt: Recipient, reply: str, status: str, conn: dict[str, str],
                category: str = "") -> None:
        now = time.time()
        rcpt.attempts += 1
        rec = self._base_record("b", rcpt, now)
        rec.dsn_action, rec.dsn_status, rec.dsn_diag = "failed", status, f"smtp;{reply}"
        rec.bounce_cat = category or self.classify(status, reply)
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
        if self._wants_backoff(lane, reply):
            self._start_backoff(lane, reply, now)
        if lane.in_backoff(now) and lane.rule is not None:
            delay = max(delay, lane.rule.backoff_retry * random.uniform(0.9, 1.1))
        if now >= rcpt.msg.expire_at:
            lane.inflight -= 1
            self._expire(rcpt, reply, conn.get("mx", ""), conn)
            return
        rcpt.next_attempt = min(now + delay, rcpt.msg.expire_at)
        rcpt.state = State.DEFERRED
        rcpt.last_reply = reply
        rec = self._base_record("t", rcpt, now)
        rec.dsn_action, rec.dsn_status, rec.dsn_diag = "delayed", status, f"smtp;{reply}"
        rec.bounce_cat = self.classify(status, reply)
        _fill_conn(rec, conn)
        self.record(rec)
        self.spool.update([RecipientUpdate(rcpt.msg.id, rcpt.idx, State.DEFERRED, rcpt.attempts,
                                           rcpt.next_attempt, reply)], (rec,))
        lane.inflight -= 1
        lane.deferred += 1
        self._add_timer(rcpt)

    # -- backoff mode ---------------------------------------------------------------------------

    def _wants_backoff(self, lane: Lane, reply: str) -> bool:
        if lane.rule is None or not lane.rule.backoff_on:
            return False
        text = reply.lower()
        return any(text.startswith(p) or (len(p) > 3 and p.lower() in text)
                   for p in lane.rule.backoff_on)

    def _start_backoff(self, lane: Lane, reply: str, now: float) -> None:
        """The destination asked us to slow down: fewer connections, slower rate, longer retry,
        until ``backoff_duration`` has passed or (if so configured) a delivery succeeds."""
        assert lane.rule is not None
        if not lane.in_backoff(now):
            lane.backoff_switches += 1
            log.warning("backoff on", extra={"pool": lane.pool, "domain": lane.domain,
                                             "rule": lane.rule_name, "reply": reply[:200]})
            self.suspend(lane, lane.rule.backoff_retry, f"backoff: {reply[:200]}")
        lane.backoff_until = now + lane.rule.backoff_duration

    def _end_backoff(self, lane: Lane, why: str) -> None:
        lane.backoff_until = 0.0
        lane.backoff_switches += 1
        log.warning("backoff off", extra={"pool": lane.pool, "domain": lane.domain,
                                          "rule": lane.rule_name, "why": why})
        self._ready.add(lane)
        self.kick()

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
                                           reply)], (rec,))
        self._unindex(rcpt)
        msg = rcpt.msg
        msg.remaining -= 1
        if msg.remaining <= 0:
            self.spool.finish(msg.id)
        self._left(rcpt)
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

    def take(self, chosen: Callable[[Recipient], bool]) -> list[Recipient]:
        """Take the chosen queued, deferred and held recipients out of the queue (in-flight
        ones finish their transaction); their state is left for the caller to set. Each heap
        is rebuilt once, so a filter over the whole queue costs O(queued)."""
        taken: list[Recipient] = []
        for lane in self.lanes.values():
            mine = [chosen(item[3]) for item in lane.heap]
            if any(mine):
                taken += [item[3] for item, out in zip(lane.heap, mine, strict=True) if out]
                lane.heap = [item for item, out in zip(lane.heap, mine, strict=True) if not out]
                heapq.heapify(lane.heap)
        kept = []
        for entry in self._timers:
            rcpt = entry[2]
            if rcpt.state is not State.DEFERRED:
                continue  # no longer waiting for this timer
            if chosen(rcpt):
                self.lane(rcpt.msg.pool, rcpt.domain).deferred -= 1
                taken.append(rcpt)
            else:
                kept.append(entry)
        if len(kept) != len(self._timers):
            heapq.heapify(kept)
            self._timers = kept
            self._arm()
        for key, rcpt in list(self.held.items()):
            if chosen(rcpt):
                del self.held[key]
                self.lane(rcpt.msg.pool, rcpt.domain).held -= 1
                taken.append(rcpt)
        return taken

    def lift(self, pool: str, domain: str | None) -> None:
        """End the suspension (backoff wait) of a pool's lanes, or of its lane to ``domain``."""
        for lane in self.lanes.values():
            if lane.pool == pool and domain in (None, lane.domain):
                lane.suspended_until = 0.0
        self.kick()

    def requeue_now(self, rcpts: list[Recipient], action: str, who: Operator) -> None:
        """Queue recipients taken out of the queue again, due now (an operator's retry or
        release: an "o" record each)."""
        for rcpt in rcpts:
            rcpt.state, rcpt.next_attempt = State.QUEUED, 0.0
            self.add(rcpt)
        self._operated(rcpts, action, who)

    def hold(self, rcpts: list[Recipient], who: Operator) -> None:
        """Keep recipients taken out of the queue on hold until released (durable)."""
        for rcpt in rcpts:
            rcpt.state = State.HELD
            self.add(rcpt)
        self._operated(rcpts, "hold", who)

    def _operated(self, rcpts: list[Recipient], action: str, who: Operator) -> None:
        """Write the recipients' new state with an "o" record each, in one spool write."""
        if not rcpts:
            return
        recs = self.operator_records(rcpts, action, who)
        for rec in recs:
            self.record(rec)
        self.spool.update([RecipientUpdate(r.msg.id, r.idx, r.state, r.attempts,
                                           r.next_attempt, r.last_reply) for r in rcpts], recs)

    def operator_records(self, rcpts: list[Recipient], action: str,
                         who: Operator) -> list[Record]:
        """The records of ``who``'s ``action`` on recipients: purge and delete end them (a
        "b" each, bounce_cat "purged"), the others get an "o" each."""
        now = time.time()
        final = action in ("purge", "delete")
        recs = [stamp(self._base_record("b" if final else "o", r, now), action, who)
                for r in rcpts]
        if final:
            for rec in recs:
                rec.dsn_action, rec.dsn_status, rec.bounce_cat = "failed", "5.0.0", "purged"
        return recs

    def remove(self, rcpts: list[Recipient], action: str, who: Operator,
               dsn: bool = False) -> None:
        """Bounce recipients taken out of the queue on an operator's decision (``action``
        purge or delete): a "b" record each, naming the operator, and a DSN to the sender only
        if ``dsn``."""
        for rcpt, rec in zip(rcpts, self.operator_records(rcpts, action, who), strict=True):
            if dsn:
                self._told(rcpt, action)
            self._final(rcpt, State.BOUNCED, rec.dsn_diag, rec, from_heap=False)

    def _told(self, rcpt: Recipient, action: str) -> None:
        """A DSN for a recipient an operator removed: it says what happened, not who did it."""
        self._fail(rcpt, "5.0.0", f"{DONE[action]} by operator", "")

    def let_go(self, rcpts: list[Recipient]) -> None:
        """Cluster mode: recipients taken out of this node's queue that the shared spool
        alone keeps now (``operate_shared``): their messages are forgotten once none of their
        recipients is left here."""
        for rcpt in rcpts:
            self._unindex(rcpt)
            rcpt.msg.remaining -= 1
            if rcpt.msg.remaining <= 0:
                self.spool.finish(rcpt.msg.id)
            self._left(rcpt)
            if self.on_final is not None:
                self.on_final(rcpt)  # room for more work

    async def operate_shared(self, rcpts: list[Recipient], action: str, who: Operator,
                             states: tuple[State, ...], dsn: bool = False) -> list[Recipient]:
        """Cluster mode: ``who``'s ``action`` on recipients no other node holds (those this
        node took out of its queue, and unclaimed or held ones of the shared spool), written
        with their records in one guarded transaction; returns those it changed. Nothing of
        them stays in this node's memory: held ones are nobody's, released and retried ones
        are claimed afresh by whichever node has a slot."""
        state = {"hold": State.HELD, "release": State.QUEUED, "retry": State.QUEUED}.get(
            action, State.BOUNCED)
        made: dict[int, Record] = {}

        def records(moved: list[Recipient]) -> list[Record]:
            made.update(zip(map(id, moved), self.operator_records(moved, action, who),
                            strict=True))
            return [made[id(r)] for r in moved]

        assert isinstance(self.spool, PostgresSpool)
        moved = await self.spool.operate(rcpts, state, states, records)
        for rcpt in moved:
            self.record(made[id(rcpt)])
            if dsn:
                self._told(rcpt, action)
        return moved

    def recipients(self) -> Iterator[Recipient]:
        """Every queued, deferred and held (not in-flight) recipient held in memory."""
        for lane in self.lanes.values():
            for item in lane.heap:
                yield item[3]
        for _, _, rcpt in self._timers:
            if rcpt.state is State.DEFERRED:
                yield rcpt
        yield from self.held.values()

    def index(self, rcpt: Recipient) -> None:
        """Make a recipient in memory findable by message and correlation id (a page read in
        from the spool comes in here too)."""
        msg = rcpt.msg
        held = self._by_msg.get(msg.id)
        if held is None:
            held = self._by_msg[msg.id] = {}
            if msg.correlation_id:
                self._by_corr.setdefault(msg.correlation_id, set()).add(msg.id)
        held[rcpt.idx] = rcpt

    def _unindex(self, rcpt: Recipient) -> None:
        msg = rcpt.msg
        held = self._by_msg.get(msg.id)
        if held is None or held.pop(rcpt.idx, None) is None or held:
            return
        del self._by_msg[msg.id]
        ids = self._by_corr.get(msg.correlation_id)
        if ids is not None:
            ids.discard(msg.id)
            if not ids:
                del self._by_corr[msg.correlation_id]

    def message(self, msg_id: str) -> list[Recipient]:
        """The queued, deferred and held recipients of one message (as ``recipients``, without
        walking the queue)."""
        held = self._by_msg.get(msg_id)
        if not held:
            return []
        return [r for _, r in sorted(held.items()) if r.state in _WAITING]

    def with_correlation_id(self, correlation_id: str) -> list[str]:
        """The ids of the messages held with this correlation id."""
        return sorted(self._by_corr.get(correlation_id, ()))

    def oldest(self, now: float) -> dict[tuple[str, str], float]:
        """Per lane with recipients not yet final, the age of its oldest (``Lane.oldest``:
        kept as recipients come and go, so this is O(lanes))."""
        return {lane.key: lane.oldest(now) for lane in self.lanes.values() if lane.depth()}

    # -- pause ----------------------------------------------------------------------------------

    async def set_paused(self, pool: str, domain: str | None, paused: bool,
                         events: Sequence[Record] = ()) -> None:
        """Pause or resume, with the record of it (``events``) in the same spool write."""
        await self.spool.set_paused(pool, domain or ANY_DOMAIN, paused, events)
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
                if self.pager is not None and lane.cursor is not None:
                    self.pager.low(lane)
        self.kick()

    # -- lifecycle ------------------------------------------------------------------------------

    def fence(self, on: bool) -> None:
        """Start no transaction (transactions under way finish), or start again."""
        self.fenced = on
        if not on:
            self.kick()

    async def drain(self, timeout: float) -> None:
        """Stop taking new work; let in-flight transactions finish (up to ``timeout``)."""
        self._stopping = True
        if self._timer_handle is not None:
            self._timer_handle.cancel()
        if isinstance(self.rates, SharedRate):
            self.rates.close()
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


_WAITING = frozenset({State.QUEUED, State.DEFERRED, State.HELD})


_TIME_UP = object()


def _time_up(fut: asyncio.Future) -> None:
    """End an idle connection's wait (``wait_for_work``) unless work came first."""
    if not fut.done():
        fut.set_result(_TIME_UP)


def _fill_conn(rec: Record, conn: dict[str, str]) -> None:
    if not conn:
        return
    rec.dlv_source_ip = conn.get("source_ip", "")
    rec.dlv_destination_ip = conn.get("dest_ip", "")
    rec.dlv_tls_protocol = conn.get("tls", "")
    rec.dlv_tls_cipher = conn.get("cipher", "")
    rec.dlv_tls_auth = conn.get("tls_auth", "")
    rec.dlv_tls_policy = conn.get("tls_policy", "")
    rec.vmta = conn.get("vmta", "")
    mx = conn.get("mx", "")
    if mx:
        rec.dsn_mta = f"dns;{mx} ({conn.get('dest_ip', '')})"
