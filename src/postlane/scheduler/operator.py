"""Operator actions on the in-memory queue (a mixin of ``Scheduler``): take recipients out,
queue them again, hold, remove, pause and resume, each written with the record naming the
operator in the same spool write. ``operations.py`` is the door to these (it logs and audits)."""

from __future__ import annotations

import asyncio
import heapq
import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import orjson

from ..accounting.operators import DONE, Operator, stamp
from ..accounting.records import Record
from ..spool import PostgresSpool, Recipient, RecipientUpdate, Spool, State
from .clock import Clock
from .lanes import Lane
from .outcomes import Failure, base_record

if TYPE_CHECKING:
    import contextlib

    from ..config import Config
    from .paging import Pager
    from .timers import RetryTimers

log = logging.getLogger("postlane.scheduler")

ANY_DOMAIN = "*"
PENDING = ("hold", "delete")
"""The actions that, asked of a recipient being delivered, wait for that delivery to end
(``pend``); a release or retry of it has nothing to do (it is neither held nor deferred)."""


class OperatorActions:
    spool: Spool
    clock: Clock
    timers: RetryTimers
    lanes: dict[tuple[str, str], Lane]
    config: Config
    held: dict[tuple[str, int], Recipient]
    paused: set[tuple[str, str]]
    record: Callable[[Record], None]
    on_final: Callable[[Recipient], None] | None
    pager: Pager | None
    _ready: set[Lane]
    _pending_tasks: set[asyncio.Task]
    """Cluster mode: pending actions being written to the shared spool (``_pending_shared``)."""

    if TYPE_CHECKING:  # the Scheduler's
        def lane(self, pool: str, domain: str) -> Lane: ...
        def kick(self) -> None: ...
        def add(self, rcpt: Recipient, fresh: bool = False) -> None: ...
        def _unindex(self, rcpt: Recipient) -> None: ...
        def _left(self, rcpt: Recipient) -> None: ...
        def _fail(self, rcpt: Recipient, status: str, diag: str,
                  mx: str) -> Failure | None: ...
        def _final(self, rcpt: Recipient, state: State, reply: str, rec: Record,
                   from_heap: bool = True, lane: Lane | None = None,
                   owed: Failure | None = None) -> None: ...
        def one_write(self) -> contextlib.AbstractContextManager[None]: ...

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
        for rcpt in self.timers.take(chosen):
            self.lane(rcpt.msg.pool, rcpt.domain).deferred -= 1
            taken.append(rcpt)
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
        now = self.clock.time()
        final = action in ("purge", "delete")
        recs = [stamp(base_record("b" if final else "o", r, now), action, who) for r in rcpts]
        if final:
            for rec in recs:
                rec.dsn_action, rec.dsn_status, rec.bounce_cat = "failed", "5.0.0", "purged"
        return recs

    def remove(self, rcpts: list[Recipient], action: str, who: Operator,
               dsn: bool = False) -> None:
        """Bounce recipients taken out of the queue on an operator's decision (``action``
        purge or delete): a "b" record each, naming the operator, and a DSN to the sender only
        if ``dsn``."""
        with self.one_write():  # the whole action in one commit (those owed a DSN: after it)
            for rcpt, rec in zip(rcpts, self.operator_records(rcpts, action, who),
                                 strict=True):
                owed = self._told(rcpt, action) if dsn else None
                self._final(rcpt, State.BOUNCED, rec.dsn_diag, rec, from_heap=False, owed=owed)

    def _told(self, rcpt: Recipient, action: str) -> Failure | None:
        """A DSN for a recipient an operator removed: it says what happened, not who did it."""
        return self._fail(rcpt, "5.0.0", f"{DONE[action]} by operator", "")

    # -- actions asked during a delivery ---------------------------------------------------------

    def pend(self, rcpts: list[Recipient], action: str, who: Operator, dsn: bool = False
             ) -> None:
        """``who``'s hold or delete of recipients being delivered now, kept as pending (in the
        spool with its "o" record, one commit: a SIGKILL after the answer cannot lose it) and
        applied when the delivery ends (``apply_pending``), unless it delivered: as Postfix's
        ``postsuper -h/-d`` of a message in delivery takes effect once the agent returns. A
        delivery that deferred put the recipient back in the queue, retried later."""
        rcpts = [r for r in rcpts if r.state is State.INFLIGHT]
        if not rcpts:
            return
        value = orjson.dumps({"action": action, "dsn": dsn, "operator": who.name,
                              "via": who.via}).decode()
        now = self.clock.time()
        recs = []
        for rcpt in rcpts:
            rcpt.pending = value
            rec = base_record("o", rcpt, now)
            rec.operator, rec.dsn_action, rec.src_type = who.name, f"{action}-pending", who.via
            rec.dsn_diag = (f"{action} asked by operator {who.name} during a delivery: to be"
                            f" {DONE[action]} when it ends, unless it delivers")
            self.record(rec)
            recs.append(rec)
        self.spool.pend([(value, r.msg.id, r.idx) for r in rcpts], recs)

    def apply_pending(self, rcpt: Recipient) -> bool:
        """A recipient with a pending action is back in the queue (its delivery deferred, or
        never started, or the node restarted meanwhile): hold or delete it now, with the
        records and DSN of the action on a queued recipient. False if none is pending."""
        if not rcpt.pending:
            return False
        asked = orjson.loads(rcpt.pending)
        who = Operator(asked["operator"], asked["via"])
        if isinstance(self.spool, PostgresSpool):
            self._pending_shared(rcpt, asked["action"], who, asked["dsn"])
            return True
        rcpt.pending = ""
        if asked["action"] != "hold":  # the row's final state ends it (a DSN's commit too)
            self.remove([rcpt], asked["action"], who, dsn=asked["dsn"])
            return True
        if rcpt.state is State.HELD:  # held before a restart; only the clearing was lost
            self.add(rcpt)
        else:
            self.hold([rcpt], who)
        self.spool.pend([("", rcpt.msg.id, rcpt.idx)])
        return True

    def _pending_shared(self, rcpt: Recipient, action: str, who: Operator, dsn: bool) -> None:
        """Cluster mode: the recipient leaves this node's queue and the shared spool takes the
        action, as an operator's on a recipient this node holds (``operate_shared``: held ones
        are nobody's; a delete with a DSN is leased here until its DSN is queued). The spool
        keeps it pending until then: a spool that fails retries it at the recipient's next
        retry time, a node that dies leaves it to the node that claims the recipient."""
        async def run() -> None:
            try:
                # the delivery's outcome first: the action's write is urgent, and an outcome
                # committed after it would make the held recipient deferred (claimable) again
                await self.spool.flush()
                await self.operate_shared([rcpt], action, who, (State.QUEUED, State.DEFERRED),
                                          dsn)
            except Exception:
                log.exception("the %s asked during the delivery of %s (queue id %s) is not"
                              " written yet: tried again at its retry time", action,
                              rcpt.address, rcpt.msg.id)
                rcpt.state = State.DEFERRED
                rcpt.next_attempt = max(rcpt.next_attempt, self.clock.time() + 60.0)
                self.lane(rcpt.msg.pool, rcpt.domain).deferred += 1
                self.timers.add(rcpt)  # due: ``add`` applies it again
                return
            rcpt.pending = ""
            self.let_go([rcpt])

        task = asyncio.get_running_loop().create_task(run())
        self._pending_tasks.add(task)
        task.add_done_callback(self._pending_tasks.discard)

    def pending_void(self, rcpt: Recipient, state: State) -> None:
        """The delivery of a recipient with a pending action ended it (delivered, bounced,
        expired): the action has nothing left to do, and its trail says so."""
        asked = orjson.loads(rcpt.pending)
        rcpt.pending = ""
        rec = base_record("o", rcpt, self.clock.time())
        rec.operator, rec.src_type = asked["operator"], asked["via"]
        rec.dsn_action = f"{asked['action']}-void"
        rec.dsn_diag = (f"{asked['action']} asked by operator {asked['operator']} not applied:"
                        f" the delivery in progress ended it ({state.value}, final)")
        self.record(rec)
        self.spool.record([rec])

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
        with their records in one guarded transaction (a delete with DSNs: after them,
        ``_delete_telling``); returns those it changed. Nothing of them stays in this node's
        memory: held ones are nobody's, released and retried ones are claimed afresh by
        whichever node has a slot."""
        assert isinstance(self.spool, PostgresSpool)
        if dsn:
            return await self._delete_telling(rcpts, action, who, states)
        state = {"hold": State.HELD, "release": State.QUEUED, "retry": State.QUEUED}.get(
            action, State.BOUNCED)
        made: dict[int, Record] = {}

        def records(moved: list[Recipient]) -> list[Record]:
            made.update(zip(map(id, moved), self.operator_records(moved, action, who),
                            strict=True))
            return [made[id(r)] for r in moved]

        moved = await self.spool.operate(rcpts, state, states, records)
        for rcpt in moved:
            self.record(made[id(rcpt)])
        return moved

    async def _delete_telling(self, rcpts: list[Recipient], action: str, who: Operator,
                              states: tuple[State, ...]) -> list[Recipient]:
        """Cluster mode, a delete with DSNs: as on one node, each final state and "b" record
        is committed with its DSN (``Failure.final``, in the DSN's transaction). Until then
        the recipients are leased to this node, so no other node delivers them meanwhile; a
        node that dies before leaves them to be delivered after its lease, never bounced
        untold. (They were written in a commit after the DSN's: a node killed between had its
        recipients delivered by the node taking over, and their sender told twice.)"""
        spool = self.spool
        assert isinstance(spool, PostgresSpool)
        leased = await spool.reserve(spool.node, rcpts, states, self.config.cluster.lease)
        for rcpt, rec in zip(leased, self.operator_records(leased, action, who), strict=True):
            self.record(rec)
            update = RecipientUpdate(rcpt.msg.id, rcpt.idx, State.BOUNCED, rcpt.attempts, 0.0,
                                     rec.dsn_diag)

            def write(spooled: bool = False, update: RecipientUpdate = update,
                      rec: Record = rec) -> None:
                if not spooled:  # the DSN's commit did not carry it (none, or refused)
                    spool.update([update], (rec,))
                spool.finish_shared(update.msg_id)

            owed = self._told(rcpt, action)
            if owed is None:  # a null sender, or NOTIFY=NEVER: nobody to tell
                write(False)
            else:
                owed.write = write
                owed.final = (update, rec)
        return leased

    # -- pause ----------------------------------------------------------------------------------

    async def set_paused(self, pool: str, domain: str | None, paused: bool,
                         events: Sequence[Record] = ()) -> None:
        """Pause or resume, with the record of it (``events``) in the same spool write."""
        await self.spool.set_paused(pool, domain or ANY_DOMAIN, paused, events)
        self.apply_paused(pool, domain, paused)

    def pause_holds(self, pool: str, domain: str) -> bool:
        """Whether a pause (the pool's or its lane's) holds mail of ``pool`` to ``domain``."""
        return (pool, ANY_DOMAIN) in self.paused or (pool, domain) in self.paused

    def apply_paused(self, pool: str, domain: str | None, paused: bool) -> None:
        """Apply a pause already stored (by this node, or by another node of a cluster)."""
        key = (pool, domain or ANY_DOMAIN)
        (self.paused.add if paused else self.paused.discard)(key)
        if paused and domain not in (None, ANY_DOMAIN) and pool in self.config.pools:
            self.lane(pool, domain)  # a lane paused before its first mail is seen as paused
        for lane in self.lanes.values():
            if lane.pool == pool:
                lane.paused = bool({(pool, ANY_DOMAIN), (pool, lane.domain)} & self.paused)
                if lane.heap:
                    self._ready.add(lane)
                if self.pager is not None and lane.cursor is not None:
                    self.pager.low(lane)
        self.kick()
