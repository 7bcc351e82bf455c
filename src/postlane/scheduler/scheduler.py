"""The scheduler: which recipient goes out next, on which connection slot, and what happens after.

Dispatch is event driven (a new message, a freed slot or a due retry triggers it at once; there is
no polling interval). Lanes are served by strict class priority, then earliest deadline
(injection time + SLA). A worker that holds a slot gives it up after its current transaction when a
more urgent lane of the same pool is waiting for one, so capacity reserved for a higher class is
never kept by a lower one.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Callable, Iterable, Iterator

from ..accounting.records import Record
from ..config import Config
from ..config.model import DestinationRule
from ..health import Health
from ..relay.deliver import Relay
from ..spool import Message, PostgresSpool, Recipient, Spool, State
from .clock import SYSTEM_CLOCK, Clock
from .delivery import DeliveryLoop
from .lanes import Lane, SourceSlot
from .operator import ANY_DOMAIN, OperatorActions
from .outcomes import Failure, OutcomeRecording
from .paging import Pager
from .rules import RuleBook
from .shared_rate import LocalRate, RateLimiter, SharedRate
from .slots import Slots
from .timers import RetryTimers

__all__ = ["ANY_DOMAIN", "Failure", "Scheduler"]

log = logging.getLogger("postlane.scheduler")

DORMANT = 0.25
FAIR_SHARE = 50
"""Messages a connection sends before it makes room for an equally urgent waiting lane."""
LANE_SWEEP = 1024
"""Lanes a scheduler may hold before it looks for idle ones to retire (then twice as many as it
kept): a node that runs for weeks sees a new destination domain every few messages."""
LANE_KEEP = 3600.0
"""Seconds an idle lane stays after its last mail was queued: the dashboard and ``postlane
queues`` list recently served destinations (folded as idle), and a lane that is made again
at once costs more than one that stays."""


def _unclassified(status: str, reply: str) -> str:
    return ""


class Scheduler(DeliveryLoop, OutcomeRecording, OperatorActions):
    """The queue and its workers. Its concepts live in modules of their own: slots.py
    (connection slots), pacing.py (per-IP spacing, backoff), timers.py (retry timers),
    delivery.py (the worker loop that drives the relay), outcomes.py (outcome recording),
    operator.py (operator actions); here: queueing and dispatch."""

    def __init__(self, config: Config, spool: Spool, record: Callable[[Record], None],
                 on_failures: Callable[[Message, list[Failure]], bool] | None = None, *,
                 relay: Relay | None = None,
                 classify: Callable[[str, str], str] = _unclassified,
                 screen: Callable[[Recipient], tuple[str, str] | None] | None = None,
                 health: Health | None = None, clock: Clock = SYSTEM_CLOCK) -> None:
        self.config = config
        self.screen = screen
        """(scope, reason) when the suppression list now stops a recipient about to be sent
        (``FeedbackService.at_delivery``): the entry came while it was queued."""
        self.spool = spool
        self.clock = clock
        """Every time the scheduler reads (tests pass one they set)."""
        self.record = record
        """Tells the in-memory observers of a record; the spool write that goes with each
        state change carries the record itself (the durable copy)."""
        self.on_failures = on_failures
        self.owing: dict[str, int] = {}
        self.unwritten: set[tuple[str, int]] = set()
        self.relay = relay
        """Opens connections and performs transactions for the workers (None: no delivery)."""
        self.on_final: Callable[[Recipient], None] | None = None
        """Called when a recipient reaches a final state (cluster mode claims more work)."""
        self.lanes: dict[tuple[str, str], Lane] = {}
        self._slots = Slots(config)
        self.paused: set[tuple[str, str]] = set()
        self._ready: set[Lane] = set()
        self._waiting: dict[str, tuple[int, float]] = {}
        """Per pool, the (priority, deadline) of the most urgent lane that found no free slot."""
        self._waiting_workers: dict[str, int] = {}
        """Per pool, the connections that lane holds already."""
        self.timers = RetryTimers(clock, self._due)
        """Retry timers: exactly one entry per deferred recipient (``take`` removes them)."""
        self.held: dict[tuple[str, int], Recipient] = {}
        """Recipients an operator put on hold, by (queue id, index)."""
        self._by_msg: dict[str, dict[int, Recipient]] = {}
        """Every recipient held, not yet final, by message id: a lookup of one message (the
        API's) must not walk the whole queue."""
        self._by_corr: dict[str, set[str]] = {}
        """Message ids by correlation id (of the messages in ``_by_msg``)."""
        self._by_class: Counter[str] = Counter()
        """The recipients in ``_by_msg`` per class: what a cluster node holds, for /metrics
        and the SLA view without a walk of the queue."""
        self._dispatch_pending = False
        self._stopping = False
        self.fenced = False
        """No transaction starts (a cluster node that missed its heartbeats: the fence)."""
        self._tasks: set[asyncio.Task] = set()
        self._pending_tasks: set[asyncio.Task] = set()
        self.fifo = config.scheduler == "fifo"
        self.rules = RuleBook(config.destinations)
        self.classify = classify
        """Reply -> bounce category (PowerMTA names) for "b" and "t" records (the node
        passes the feedback loop's, which follows a reload's bounce rules)."""
        self.rates: RateLimiter = (
            SharedRate(spool, on_tokens=self._tokens_arrived) if isinstance(spool, PostgresSpool)
            else LocalRate(on_tokens=self._tokens_arrived))
        """Per-pool destination rates (``max_rate_per_pool``): across the cluster on
        PostgreSQL, in this process on SQLite; the same token bucket either way."""
        self._rate_waiting: dict[str, set[Lane]] = {}
        self._sweep_at = LANE_SWEEP
        self._recheck: asyncio.TimerHandle | None = None
        self.health = health if health is not None else Health()
        """The node's: destinations that cannot be reached are told there, once each."""
        self.pager: Pager | None = None
        """Deep lanes keep their heads in memory and the rest in the spool (``paging.py``;
        the node sets it up on a SQLite spool: ``use_pager``)."""

    # -- set-up and reload ----------------------------------------------------------------------

    def resume_paused(self, paused: set[tuple[str, str]]) -> None:
        """Adopt the pauses stored in the spool, at start, before any recipient is queued
        (each lane reads them when it is made); a lane paused before its first mail is made
        now, so that it is seen as paused."""
        self.paused = set(paused)
        for pool, domain in paused:
            if domain != ANY_DOMAIN and pool in self.config.pools:
                self.lane(pool, domain)

    def use_pager(self, pager: Pager) -> None:
        """Page deep lanes through ``pager`` (at start, before the queue is resumed)."""
        self.pager = pager

    def notify_final(self, fn: Callable[[Recipient], None]) -> None:
        """Call ``fn`` when a recipient reaches a final state: the claimer, built after the
        scheduler (it needs it), registers at its start to claim more work."""
        self.on_final = fn

    def apply_rules(self, destinations: dict[str, DestinationRule]) -> None:
        """Take a reload's destination rules (already in ``config.destinations``): every lane
        is matched again; a lane matched by its MX (not its domain) keeps that rule if it is
        still there."""
        self.rules = RuleBook(destinations)
        for lane in self.lanes.values():
            name = self.rules.for_domain(lane.domain) or (
                lane.rule_name if lane.rule_name in destinations else None)
            lane.rule_name, lane.rule = (name, destinations[name]) if name else ("", None)

    @property
    def slots(self) -> dict[str, list[SourceSlot]]:
        """Each pool's source slots (connection counts per IP)."""
        return self._slots.by_pool

    # -- queueing -------------------------------------------------------------------------------

    def lane(self, pool: str, domain: str) -> Lane:
        lane = self.lanes.get((pool, domain))
        if lane is None:
            if len(self.lanes) >= self._sweep_at:
                self._sweep_lanes()
            lane = self.lanes[(pool, domain)] = Lane(pool, domain)
            lane.paused = (pool, ANY_DOMAIN) in self.paused or (pool, domain) in self.paused
            name = self.rules.for_domain(domain)
            if name:
                self.set_rule(lane, name)
        return lane

    def _idle(self, lane: Lane) -> bool:
        """Whether a lane holds nothing a new lane to its domain would not: no recipient, no
        connection, no pause, suspension, backoff, rate wait or per-IP spacing still ahead,
        and no mail queued to it for ``LANE_KEEP``."""
        now = self.clock.time()
        return (lane.touched < self.clock.monotonic() - LANE_KEEP
                and not lane.depth() and not lane.workers and not lane.idle and not lane.paused
                and not lane.paging and not lane.rate_wait and lane.suspended_until <= now
                and lane.backoff_until <= now
                and all(t <= now for t in lane.next_send.values()))

    def _retire(self, lane: Lane) -> None:
        """Forget an idle lane (``_idle``): lanes were kept for every destination domain ever
        sent to, so memory, ``GET /api/v1/status`` and every walk of the lanes grew with the
        domains a node had seen since its start. A new message makes it again."""
        if self.lanes.get(lane.key) is lane:
            del self.lanes[lane.key]
            self._ready.discard(lane)

    def _sweep_lanes(self) -> None:
        """Retire every idle lane (``_idle``); the next sweep comes when the lanes double
        (amortised O(1) per lane made): the lanes held stay within twice those served in the
        last ``LANE_KEEP`` or ``LANE_SWEEP``, whatever the domains seen since the start."""
        for lane in [ln for ln in self.lanes.values() if self._idle(ln)]:
            self._retire(lane)
        self._sweep_at = max(LANE_SWEEP, 2 * len(self.lanes))

    def set_rule(self, lane: Lane, name: str) -> None:
        lane.rule_name, lane.rule = name, self.config.destinations[name]

    def _order(self, msg: Message) -> tuple[int, float]:
        return (0, msg.queued_at) if self.fifo else (msg.priority, msg.deadline)

    def add(self, rcpt: Recipient, fresh: bool = False) -> None:
        """Make a recipient ready now (or at its retry time if that is still ahead); ``fresh``:
        just accepted (a deep lane may leave it in the spool, see ``paging.py``)."""
        if rcpt.open_attempt is not None:
            self._outcome_unknown(rcpt)
        if rcpt.pending and self.apply_pending(rcpt):  # asked during a delivery: ended now
            return
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
        if rcpt.next_attempt > self.clock.time():
            rcpt.state = State.DEFERRED  # the timer only fires deferred recipients
            lane.deferred += 1
            self.timers.add(rcpt)
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
        if len(lane.heap) == 1 and not lane.blocked(self.clock.time()) and lane.wake_one():
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
        now = self.clock.time()
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
                slot = self._slots.acquire(lane, now)
                if slot is None:
                    if lane.pool not in waiting:
                        waiting[lane.pool] = lane.top()
                        self._waiting_workers[lane.pool] = lane.workers
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
        dormant = self.clock.monotonic() - DORMANT
        soon = False
        for lane in self.lanes.values():
            if lane.pool == pool and lane.idle:
                if lane.rate_wait or (not lane.heap and lane.touched < dormant):
                    while lane.wake_one():
                        pass
                elif not lane.heap:
                    soon = True
        if soon and self._recheck is None:
            # lanes emptied less than DORMANT ago: look again once they count as dormant. The
            # waiting lane waited for their idle timeout instead (a message to 50 domains
            # through 8 slots went out one domain every ``relay.idle_timeout``, 2 s)
            self._recheck = asyncio.get_running_loop().call_later(DORMANT, self._look_again)

    def _look_again(self) -> None:
        self._recheck = None
        self.kick()

    def _lane_cap(self, lane: Lane) -> int:
        return self._slots.lane_cap(lane, self.clock.time())

    async def _run_worker(self, lane: Lane, slot: SourceSlot) -> None:
        try:
            await self.serve(lane, slot)
        except Exception:  # a worker bug must not leak its slot or kill the node
            log.exception("delivery worker for %s/%s failed", lane.pool, lane.domain)
        finally:
            lane.workers -= 1
            self._slots.release(lane, slot)
            if lane.heap:
                self._ready.add(lane)
            self.kick()

    def next_batch(self, lane: Lane, sent: int = 0) -> list[Recipient]:
        """Called by a worker between transactions: more work for its connection, or nothing:
        lane empty or paused, a lane of higher priority in the pool needs the slot, or (after
        ``FAIR_SHARE`` messages on this connection, or at once if this lane holds two
        connections more than it) an equally urgent lane with an earlier deadline does.
        Without the last rule, busy lanes of a campaign keep their connections and one
        destination's mail can wait for the whole campaign; without "at once", a lane that
        found the pool's slots taken waited for 50 messages of another lane's connection (over
        a second in a campaign: the campaign's p95 was 0.7-0.9 s against a p50 of 30 ms)."""
        if self._stopping or self.fenced or lane.blocked(self.clock.time()) or not lane.heap:
            return []
        waiting = self._waiting.get(lane.pool)
        if waiting is not None:
            top = lane.top()
            richer = lane.workers >= self._waiting_workers.get(lane.pool, 0) + 2
            if (waiting[0] < top[0] or lane.rate_wait
                    or ((sent >= FAIR_SHARE or richer) and waiting < top)):
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
        now = self.clock.time()
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
                elif self.screen is not None and (stop := self.screen(rcpt)) is not None:
                    self._suppress(rcpt, *stop, lane=lane)
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
        if lane.pool in self._waiting:  # a lane of the pool waits for a slot: this connection
            timeout = min(timeout, DORMANT)  # keeps it only while its lane may get more mail
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
        lane.suspended_until = self.clock.time() + seconds
        lane.suspend_reason = reason
        self._ready.add(lane)
        asyncio.get_running_loop().call_later(seconds, self.kick)

    def _due(self, rcpt: Recipient) -> None:
        """A deferred recipient's retry time has come: queue it."""
        self.lane(rcpt.msg.pool, rcpt.domain).deferred -= 1
        rcpt.next_attempt = 0.0
        self.add(rcpt)

    def requeue(self, rcpt: Recipient) -> None:
        """Put back a recipient that was taken but never attempted (connection lost first)."""
        lane = self.lane(rcpt.msg.pool, rcpt.domain)
        lane.inflight -= 1
        self.add(rcpt)

    def recipients(self) -> Iterator[Recipient]:
        """Every queued, deferred and held (not in-flight) recipient held in memory."""
        for lane in self.lanes.values():
            for item in lane.heap:
                yield item[3]
        yield from self.timers
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
        if rcpt.idx not in held:
            self._by_class[msg.cls] += 1
        held[rcpt.idx] = rcpt

    def _unindex(self, rcpt: Recipient) -> None:
        msg = rcpt.msg
        held = self._by_msg.get(msg.id)
        if held is None or held.pop(rcpt.idx, None) is None:
            return
        self._by_class[msg.cls] -= 1
        if held:
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

    def in_flight(self, msg_id: str) -> int:
        """How many of one message's recipients are being delivered now."""
        return len(self.on_the_wire(msg_id))

    def on_the_wire(self, msg_id: str) -> list[Recipient]:
        """One message's recipients being delivered now."""
        held = self._by_msg.get(msg_id) or {}
        return [r for _, r in sorted(held.items()) if r.state is State.INFLIGHT]

    def pending_on_the_wire(self, msg_ids: Iterable[str] | None = None) -> list[Recipient]:
        """Recipients being delivered now with an operator's hold or delete pending (of the
        messages ``msg_ids``, or all): the listings show them, else the operator who asked
        sees nothing of the action waiting (``recipients`` leaves in-flight ones out)."""
        ids = self._by_msg if msg_ids is None else dict.fromkeys(msg_ids)
        return [r for qid in ids for _, r in sorted((self._by_msg.get(qid) or {}).items())
                if r.state is State.INFLIGHT and r.pending]

    def with_correlation_id(self, correlation_id: str) -> list[str]:
        """The ids of the messages held with this correlation id."""
        return sorted(self._by_corr.get(correlation_id, ()))

    def held_by_class(self) -> dict[str, int]:
        """Per class, the recipients held in memory and not yet final (in flight included),
        from a counter kept as they come and go: O(classes)."""
        return {cls: n for cls, n in self._by_class.items() if n}

    def oldest(self, now: float) -> dict[tuple[str, str], float]:
        """Per lane with recipients not yet final, the age of its oldest (``Lane.oldest``:
        kept as recipients come and go, so this is O(lanes))."""
        return {lane.key: lane.oldest(now) for lane in self.lanes.values() if lane.depth()}

    # -- lifecycle ------------------------------------------------------------------------------

    def fence(self, on: bool) -> None:
        """Start no transaction (transactions under way finish), or start again."""
        self.fenced = on
        if not on:
            self.kick()

    async def drain(self, timeout: float) -> None:
        """Stop taking new work; let in-flight transactions finish (up to ``timeout``)."""
        self._stopping = True
        self.timers.stop()
        if self._recheck is not None:
            self._recheck.cancel()
        if isinstance(self.rates, SharedRate):
            self.rates.close()
        for lane in self.lanes.values():
            for fut in lane.idle:
                if not fut.done():
                    fut.set_result(None)
        if self._tasks:
            _, pending = await asyncio.wait(set(self._tasks), timeout=timeout)
            if pending:  # else only the next start's "outcome unknown" would tell
                cut = sum(lane.inflight for lane in self.lanes.values())
                log.warning("drain_timeout (%gs) ran out: the deliveries to %d recipient(s)"
                            " still on the wire are cut off; they are delivered again at the"
                            " next start (a duplicate if a receiver had taken one)", timeout, cut)
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
