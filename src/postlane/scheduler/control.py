"""Message-level queue control, in the spirit of Postfix's mailq/postsuper/qshape and KumoMTA's
kcli: select queued mail by pool, lane, class, state, age, sender, recipient or correlation id;
hold, release, retry now or delete it (with a DSN or silently); see deferrals grouped by reason
and the queue's age shape per domain or class.

It works on the node's in-memory queue (the scheduler's lanes, retry timers and held set) and,
where deep lanes left recipients in the spool (``paging.py``), on those too (read off the loop);
every action takes effect at once and is written to the spool through the scheduler. Recipients
in flight finish their transaction and are not selected; a hold or delete naming their queue id
waits for that transaction to end (``Scheduler.pend``), unless it delivers.
"""

from __future__ import annotations

import contextlib
import difflib
import json
import re
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Protocol

from ..accounting.operators import DONE
from ..address import address_key, domain_key, spellings
from ..spool import PostgresSpool, Recipient, State
from .operator import PENDING

if TYPE_CHECKING:
    from ..accounting.operators import Operator
    from .scheduler import Scheduler

__all__ = ["AGE_BUCKETS", "STATES", "QueueControl", "QueueSelections", "SelectionError", "Selector",
           "reason_key"]

STATES = ("queued", "deferred", "held")
AGE_BUCKETS = (300, 600, 1200, 2400, 4800, 9600, 19200)
"""Upper bounds in seconds of qshape's age columns (5, 10, 20 … 320 minutes; the last is
open-ended)."""


class SelectionError(ValueError):
    """A selector that names something that does not exist (a mistyped pool, class or lane),
    or an action with no selector at all."""

    def __init__(self, message: str, status: int = 404) -> None:
        super().__init__(message)
        self.status = status


@dataclass(slots=True)
class Selector:
    """Which queued recipients an operator means; every field given must match."""

    queue_ids: tuple[str, ...] = ()
    pool: str | None = None
    domain: str | None = None
    """Recipient domain (with ``pool``: that lane)."""
    cls: str | None = None
    state: str | None = None
    older_than: float | None = None
    """Seconds since queueing."""
    younger_than: float | None = None
    sender: str | None = None
    """Envelope sender (``*`` wildcards)."""
    recipient: str | None = None
    """Recipient address (``*`` wildcards)."""
    correlation_id: str | None = None
    all: bool = False
    """Say so to act on the whole queue."""

    def __post_init__(self) -> None:
        # what an operator may write two ways, in the one form the queue has: a domain in
        # A-labels as lanes are named (``bücher.example`` was "no lane"), a sender without
        # its angle brackets (the listing's ``<>`` is the null sender, "")
        if self.domain is not None:
            self.domain = domain_key(self.domain)
        if self.sender is not None and self.sender.startswith("<") \
                and self.sender.endswith(">"):
            self.sender = self.sender[1:-1]

    def empty(self) -> bool:
        # an empty sender is a filter: the null sender's (bounces), not "no filter"
        return self.sender is None and not any(
            getattr(self, f.name) for f in fields(self) if f.name not in ("all", "sender"))

    def matcher(self, now: float):
        """A predicate on recipients; patterns are compiled once."""
        ids = set(self.queue_ids)
        sender = _pattern(self.sender)
        null_sender = self.sender == ""
        rcpt = _pattern(self.recipient)
        state = State(self.state) if self.state else None
        domain = self.domain.lower() if self.domain else None

        def match(r: Recipient) -> bool:
            msg = r.msg
            age = now - msg.queued_at
            return ((not ids or msg.id in ids) and (self.pool is None or msg.pool == self.pool)
                    and (domain is None or r.domain == domain)
                    and (self.cls is None or msg.cls == self.cls)
                    and (state is None or r.state is state)
                    and (self.older_than is None or age >= self.older_than)
                    and (self.younger_than is None or age < self.younger_than)
                    and (sender is None or sender.fullmatch(msg.mail_from.lower()) is not None)
                    and (not null_sender or msg.mail_from == "")
                    and (rcpt is None or any(  # any spelling: its domain in U- or A-labels
                        rcpt.fullmatch(a) is not None for a in spellings(r.address.lower())))
                    and (self.correlation_id is None
                         or msg.correlation_id == self.correlation_id))
        return match


def _pattern(text: str | None) -> re.Pattern[str] | None:
    """``*`` wildcards as a regex for ``fullmatch`` that does not backtrack: each part between
    two ``*`` is taken at its first place (an atomic group; the first place is always the best),
    so the time is linear, not exponential in the ``*`` (``*a*a*a…*b`` froze the loop)."""
    if not text:
        return None
    parts = [re.escape(part) for part in text.lower().split("*")]
    if len(parts) == 1:
        return re.compile(parts[0])
    first, *middle, last = parts
    return re.compile(first + "".join(f"(?>.*?{part})" for part in middle) + f".*{last}")


_VARIABLE = re.compile(r"<[^<>\s]*@[^<>\s]*>|[\w.+-]+@[\w.-]+|\b[0-9A-Fa-f]{8,}\b|\b\d{5,}\b")


def reason_key(reply: str) -> str:
    """A deferral reply with what varies per message (addresses, ids, long numbers) taken out,
    so that the same refusal of many recipients groups into one line."""
    return _VARIABLE.sub("…", reply.strip())[:200]


WANTED = {"hold": (State.QUEUED, State.DEFERRED), "release": (State.HELD,),
          "retry": (State.DEFERRED,), "delete": (State.QUEUED, State.DEFERRED, State.HELD),
          "purge": (State.QUEUED, State.DEFERRED, State.HELD)}
"""The states each action takes recipients from."""


class QueueSelections(Protocol):
    """What the API reads through ``QueueControl``: selections, listings and views. No action
    (hold, release, retry, delete): those go through ``operations.py``, on the record."""

    shared: PostgresSpool | None

    async def select(self, sel: Selector, now: float | None = None) -> list[Recipient]: ...

    def pending_here(self, sel: Selector, now: float | None = None) -> list[Recipient]: ...

    async def messages(self, sel: Selector, limit: int = 1000) -> dict: ...

    def spooled(self, sel: Selector | None = None
                ) -> contextlib.AbstractAsyncContextManager[list[Recipient]]: ...

    async def deferrals(self, classify: Callable[[str, str], str], top: int = 50
                        ) -> list[dict]: ...

    async def shape(self, by: str = "domain", top: int = 20) -> dict: ...


class QueueControl:
    """On one node its whole queue. In a cluster (``shared``: the PostgreSQL spool) the views
    (list, show, shape, deferrals) are the cluster's queue: what this node has claimed and the
    shared spool's other open recipients; actions reach what this node claimed and what no
    node holds (``Scheduler.operate_shared``); recipients another node has claimed are that
    node's to act on."""

    def __init__(self, scheduler: Scheduler, pools: Iterable[str], classes: Iterable[str],
                 shared: PostgresSpool | None = None) -> None:
        self.scheduler = scheduler
        self.pools = set(pools)
        self.classes = set(classes)
        self.shared = shared

    # -- selection ------------------------------------------------------------------------------

    async def check(self, sel: Selector, action: bool = False) -> None:
        """Refuse a selector naming a pool, class, state or lane that does not exist (a typo
        must not read as "0 messages"), and an action without any selector."""
        if sel.pool is not None and sel.pool not in self.pools:
            raise SelectionError(f"no pool named {sel.pool!r}{_hint(sel.pool, self.pools)}")
        if sel.cls is not None and sel.cls not in self.classes:
            raise SelectionError(f"no class named {sel.cls!r}{_hint(sel.cls, self.classes)}")
        if sel.state is not None and sel.state not in STATES:
            raise SelectionError(f"state must be one of {', '.join(STATES)}", 422)
        if sel.domain is not None:
            domains = {d for p, d in self.scheduler.lanes if sel.pool in (None, p)}
            if sel.domain.lower() not in domains and self.shared is not None:
                domains |= await self.shared.domains(sel.pool)
            if sel.domain.lower() not in domains:
                where = f"pool {sel.pool!r}" if sel.pool else "any pool"
                raise SelectionError(f"no lane to {sel.domain!r} in {where}"
                                     f"{_hint(sel.domain.lower(), domains)}")
        if sel.recipient is not None and not sel.recipient.strip():
            raise SelectionError("an empty recipient (--recipient '') matches no address:"
                                 " leave it out, or give an address or a pattern", 422)
        if action and sel.empty() and not sel.all:
            raise SelectionError("say which messages (queue ids or a filter), or all", 422)

    @contextlib.asynccontextmanager
    async def spooled(self, sel: Selector | None = None) -> AsyncIterator[list[Recipient]]:
        """The queued recipients that only the spool holds (deep lanes, ``paging.py``) within
        what ``sel`` names, not yet in memory; valid inside the block (what becomes final
        meanwhile is not in it)."""
        pager = self.scheduler.pager
        if pager is None or (sel is not None and sel.state not in (None, "queued")):
            yield []
            return
        where, params = [], []
        if sel is not None:
            for column, value in (("m.pool", sel.pool), ("m.cls", sel.cls),
                                  ("r.domain", sel.domain.lower() if sel.domain else None),
                                  ("m.correlation_id", sel.correlation_id)):
                if value is not None:
                    where.append(f"{column} = ?")
                    params.append(value)
            if sel.recipient and "*" not in sel.recipient:
                # the key in Python on both sides (SQLite's lower() folds ASCII only, so
                # JÖRG@EXÄMPLE.com in the spool was not jörg@exämple.com; memory found it)
                where.append("address_key(r.address) = ?")
                params.append(address_key(sel.recipient))
            if sel.queue_ids:  # one parameter: 100,000 ids exceed SQLite's older limit
                where.append("m.id IN (SELECT value FROM json_each(?))")
                params.append(json.dumps(sel.queue_ids))
        found = await pager.spooled(" AND ".join(where), tuple(params))
        try:
            yield found
        finally:
            pager.done_reading()

    async def select(self, sel: Selector, now: float | None = None) -> list[Recipient]:
        await self.check(sel)
        match = sel.matcher(time.time() if now is None else now)
        if sel.queue_ids:  # by id: the scheduler's index, not a walk of the whole queue
            held: Iterable[Recipient] = (r for qid in dict.fromkeys(sel.queue_ids)
                                         for r in self.scheduler.message(qid))
        else:
            held = self.scheduler.recipients()
        async with self.spooled(sel) as spooled:
            found = [r for r in held if match(r)]
            found += [r for r in spooled if match(r)]
        if self.shared is not None:
            found += [r for r in await self._unowned((State.HELD,), sel) if match(r)]
            found += await self._named_elsewhere(sel, match, found)
        return found

    def pending_here(self, sel: Selector, now: float | None = None) -> list[Recipient]:
        """The recipients ``sel`` selects that this node is delivering now with a hold or
        delete pending: listed (not acted on: ``select`` leaves them out), so the operator
        sees the action waiting for the delivery to end."""
        match = sel.matcher(time.time() if now is None else now)
        return [r for r in self.scheduler.pending_on_the_wire(sel.queue_ids or None)
                if match(r)]

    async def _named_elsewhere(self, sel: Selector, match: Callable[[Recipient], bool],
                               found: list[Recipient]) -> list[Recipient]:
        """In a cluster, the recipients of the messages ``sel`` names (queue ids, correlation
        id, one address) that wait in the shared spool unclaimed or with another node: asked
        about one message, every node shows it wherever it waits."""
        assert self.shared is not None
        exact = sel.recipient if sel.recipient and "*" not in sel.recipient else None
        if not sel.queue_ids and not sel.correlation_id and not exact:
            return []
        seen = {(r.msg.id, r.idx) for r in found}
        elsewhere: list[Recipient] = []
        for spelling in spellings(exact.lower()) if exact else (None,):
            for r in await self.shared.not_held_here(sel.queue_ids, sel.correlation_id,
                                                     spelling):
                if (r.msg.id, r.idx) not in seen and match(r):
                    seen.add((r.msg.id, r.idx))
                    elsewhere.append(r)
        return elsewhere

    async def _unowned(self, states: tuple[State, ...], sel: Selector, bodies: bool = False,
                       others: bool = False) -> list[Recipient]:
        assert self.shared is not None
        return await self.shared.unowned(states, sel.pool, sel.domain.lower() if sel.domain
                                         else None, sel.cls, bodies, others)

    async def messages(self, sel: Selector, limit: int = 1000) -> dict:
        """The selected recipients grouped by message, oldest message first."""
        now = time.time()
        if self.shared is not None:
            return await self._cluster_messages(sel, limit, now)
        by_msg: dict[str, list[Recipient]] = {}
        for rcpt in [*await self.select(sel, now), *self.pending_here(sel, now)]:
            by_msg.setdefault(rcpt.msg.id, []).append(rcpt)
        ordered = sorted(by_msg.values(), key=lambda rs: (rs[0].msg.queued_at, rs[0].msg.id))
        return {"total_messages": len(ordered), "total_recipients": sum(map(len, ordered)),
                "messages": [message_view(rs, now) for rs in ordered[:limit]]}

    async def _cluster_messages(self, sel: Selector, limit: int, now: float) -> dict:
        """``messages`` of the cluster's queue, the same on every node: what this node holds
        (from memory, as it is now) and, read through a cursor, what the shared spool has
        unclaimed, on hold or with other nodes; only the first ``limit`` messages are kept."""
        assert self.shared is not None
        await self.check(sel)
        match = sel.matcher(now)
        by_msg: dict[str, list[Recipient]] = {}
        held = self.scheduler.recipients()
        async with self.spooled(sel) as spooled:
            for rcpt in (*held, *spooled):
                if match(rcpt):
                    by_msg.setdefault(rcpt.msg.id, []).append(rcpt)
        for rcpt in self.pending_here(sel, now):
            by_msg.setdefault(rcpt.msg.id, []).append(rcpt)
        mine = set(by_msg)
        total_msgs, total_rcpts = len(mine), sum(map(len, by_msg.values()))
        kept, last = 0, ""
        async for rcpt in self.shared.open_not_held_here(
                sel.pool, sel.domain.lower() if sel.domain else None, sel.cls,
                State(sel.state) if sel.state else None):
            if not match(rcpt):
                continue
            total_rcpts += 1
            qid = rcpt.msg.id
            if qid != last:
                last = qid
                if qid not in mine:
                    total_msgs += 1
                    if kept < limit:  # messages come oldest first: the rest cannot be shown
                        kept += 1
                        by_msg[qid] = []
            if qid in by_msg:
                by_msg[qid].append(rcpt)
        ordered = sorted(by_msg.values(), key=lambda rs: (rs[0].msg.queued_at, rs[0].msg.id))
        return {"total_messages": total_msgs, "total_recipients": total_rcpts,
                "messages": [message_view(rs, now) for rs in ordered[:limit]]}

    # -- actions --------------------------------------------------------------------------------

    async def act(self, action: str, sel: Selector, who: Operator, *, dry_run: bool = False,
                  dsn: bool = False, touched: set[str] | None = None) -> dict:
        """hold, release, retry, delete or purge (a delete without DSN) the selected
        recipients, on the record as ``who``'s action; a dry run only counts. ``touched``:
        gets the queue ids of the messages the action changed (a delete with a DSN waits for
        theirs, ``Operations.queue``)."""
        await self.check(sel, action=True)
        wanted = WANTED[action]
        match = sel.matcher(time.time())

        def chosen(r: Recipient) -> bool:
            return r.state in wanted and match(r)

        sched = self.scheduler
        out: dict = {"action": action, "dry_run": dry_run}
        elsewhere: Counter[str] = Counter()  # per queue id, recipients other nodes claimed
        if self.shared is not None:  # read before this node takes anything out of its queue
            unowned = [r for r in await self._unowned(wanted, sel, dsn and not dry_run)
                       if chosen(r)]
            # matching recipients other nodes have claimed: theirs to act on
            theirs = [r for r in await self._unowned(wanted, sel, others=True) if chosen(r)]
            out["elsewhere"] = len(theirs)
            elsewhere.update(Counter(r.msg.id for r in theirs))
        async with self.spooled(sel) as spooled:
            # the spool's rows first, then memory, in one loop turn: nothing moves in between
            spooled = [r for r in spooled if chosen(r)]
            # on the wire as the action takes the rest (what it releases may leave at once)
            wire = {qid: n for qid in dict.fromkeys(sel.queue_ids)
                    if (n := sched.in_flight(qid))}
            # named ones on the wire: a hold or delete waits for their delivery to end
            pend = self._pending(action, wire, match)
            if not dry_run:  # now, while they are on the wire (the shared spool awaits below)
                sched.pend([r for rs in pend.values() for r in rs], action, who, dsn)
            if dry_run:
                found = [r for r in sched.recipients() if chosen(r)]
            else:
                found = sched.take(chosen)
                if spooled and sched.pager is not None:
                    known = sched.pager.known
                    spooled = [r for r in spooled if (r.msg.id, r.idx) not in known]
                    sched.pager.take_in(spooled)
            found += spooled
        if self.shared is not None:
            mine = found
            keys = {(r.msg.id, r.idx) for r in mine}  # claimed by this node meanwhile: mine
            found = mine + [r for r in unowned if (r.msg.id, r.idx) not in keys]
            if not dry_run:
                try:
                    found = await sched.operate_shared(found, action, who, wanted, dsn)
                except BaseException:
                    for rcpt in mine:  # not done: this node goes on holding them
                        sched.add(rcpt)
                    raise
                sched.let_go(mine)
        elif not dry_run:
            self._apply(action, found, who, dsn)
        if pend:
            done = f"{'would be' if dry_run else 'will be'} {DONE[action]}"
            out["pending"] = {qid: f"{len(rs)} recipient(s) being delivered now: {done} when"
                                   " the delivery in progress ends, unless it delivers"
                              for qid, rs in pend.items()}
            out["pending_recipients"] = sum(map(len, pend.values()))
            wire = {qid: n - len(pend.get(qid, ())) for qid, n in wire.items()
                    if n > len(pend.get(qid, ()))}
        ids = {r.msg.id for r in found}
        if touched is not None and not dry_run:
            touched |= ids
        out |= {"recipients": len(found), "messages": len(ids)}
        if action in ("retry", "release"):  # due now, but a pause still holds these
            waiting = sum(1 for r in found if sched.pause_holds(r.msg.pool, r.domain))
            if waiting:
                out["paused"] = waiting
        if sel.queue_ids:
            if action == "retry":  # asked of every node: the owners retry theirs now
                out["untouched"] = await self._untouched(sel, wanted, ids | set(elsewhere),
                                                         wire, {})
            else:
                out["untouched"] = await self._untouched(sel, wanted, ids | set(pend), wire,
                                                         elsewhere)
        return out

    def _pending(self, action: str, wire: dict[str, int], match: Callable[[Recipient], bool]
                 ) -> dict[str, list[Recipient]]:
        """Per queue id named, its recipients on the wire that a hold or delete waits for
        (``Scheduler.pend``): this node's, so in a cluster those it delivers."""
        if action not in PENDING:
            return {}
        return {qid: rs for qid in wire
                if (rs := [r for r in self.scheduler.on_the_wire(qid) if match(r)])}

    async def _spooled_body(self, qid: str) -> bool:
        """Whether the spool still has the message (a deep lane's recipients are only there;
        in a cluster, those another node has claimed or that are held in the shared spool)."""
        for spool in (self.scheduler.spool, self.shared):
            if spool is None:
                continue
            try:
                await spool.load_body(qid)
                return True
            except KeyError:
                pass
        return False

    async def _untouched(self, sel: Selector, wanted: tuple[State, ...],
                         touched: set[str], wire: dict[str, int],
                         elsewhere: Counter[str] | dict[str, int]) -> dict[str, str]:
        """Each queue id named that the action left alone, or left in part, and why: a typo,
        a message just delivered and one mid-delivery must not read as done (nor one whose
        other recipients were acted on while some were on the wire: those finish their
        transaction, and may be delivered after a "deleted"). ``elsewhere``: per id, the
        recipients other nodes of a cluster have claimed (theirs to act on; a retry is asked
        of every node, so it passes none)."""
        out: dict[str, str] = {}
        there = ("claimed by another node of the cluster: run it on that node's API"
                 " (postlane cluster status)")
        for qid in dict.fromkeys(sel.queue_ids):
            if qid in touched:
                if wire.get(qid):
                    out[qid] = f"{wire[qid]} recipient(s) being delivered now"
                elif elsewhere.get(qid):
                    out[qid] = f"{elsewhere[qid]} recipient(s) {there}"
                continue
            if elsewhere.get(qid):
                out[qid] = there
                continue
            if self.scheduler.message(qid):
                waiting = True
            elif self.scheduler.in_flight(qid):
                out[qid] = "being delivered now"
                continue
            else:
                waiting = await self._spooled_body(qid)
            if not waiting:
                out[qid] = ("not in the queue (delivered, removed or never queued: see"
                            f" postlane audit show --queue-id {qid})")
            else:
                filters = any(v is not None for v in (
                    sel.pool, sel.domain, sel.cls, sel.state, sel.older_than,
                    sel.younger_than, sel.sender, sel.recipient, sel.correlation_id))
                out[qid] = (f"none of its recipients is {' or '.join(wanted)}"
                            + (" and matches the filters" if filters else ""))
        return out

    def _apply(self, action: str, rcpts: list[Recipient], who: Operator, dsn: bool) -> None:
        """One node: the action on recipients taken out of its queue."""
        if action == "hold":
            self.scheduler.hold(rcpts, who)
        elif action in ("delete", "purge"):
            self.scheduler.remove(rcpts, action, who, dsn=dsn)
        else:
            self.scheduler.requeue_now(rcpts, action, who)
            if action == "retry":  # "now": their lanes stop waiting out a failure or a 421
                # (the slower pace of a backoff stays); "retried now" meant 10 minutes later
                for pool, domain in {(r.msg.pool, r.domain) for r in rcpts}:
                    self.scheduler.lift(pool, domain)
            self.scheduler.kick()

    # -- views ----------------------------------------------------------------------------------

    async def _everyone(self, state: State | None = None) -> AsyncIterator[Recipient]:
        """Every recipient not yet final (in ``state``): this node's, and in a cluster those
        of the shared spool unclaimed, on hold or with other nodes (through a cursor), so the
        views built on it are the cluster's on every node."""
        async with self.spooled(Selector(state=state.value) if state else None) as spooled:
            mine = [*self.scheduler.recipients(), *spooled]
        for rcpt in mine:
            if state is None or rcpt.state is state:
                yield rcpt
        if self.shared is not None:
            async for rcpt in self.shared.open_not_held_here(state=state):
                yield rcpt

    async def deferrals(self, classify: Callable[[str, str], str], top: int = 50
                        ) -> list[dict]:
        """Deferred recipients grouped by the reply that deferred them (most first)."""
        now = time.time()
        groups: dict[str, dict] = {}
        async for rcpt in self._everyone(State.DEFERRED):
            key = reason_key(rcpt.last_reply)
            group = groups.get(key)
            if group is None:
                status = next(iter(re.findall(r"\b[45]\.\d{1,3}\.\d{1,3}\b", key)), "")
                group = groups[key] = {"reason": key, "category": classify(status, key),
                                       "recipients": 0, "oldest_age_s": 0.0,
                                       "domains": Counter(), "pools": Counter()}
            group["recipients"] += 1
            group["oldest_age_s"] = max(group["oldest_age_s"], now - rcpt.msg.queued_at)
            group["domains"][rcpt.domain] += 1
            group["pools"][rcpt.msg.pool] += 1
        out = sorted(groups.values(), key=lambda g: -g["recipients"])[:top]
        for group in out:
            group["oldest_age_s"] = round(group["oldest_age_s"], 1)
            group["domains"] = dict(group["domains"].most_common(5))
            group["pools"] = dict(group["pools"])
        return out

    async def shape(self, by: str = "domain", top: int = 20) -> dict:
        """qshape: recipients not yet final per domain (or class), by age bucket."""
        now = time.time()
        rows: dict[str, list[int]] = {}
        async for rcpt in self._everyone():
            key = rcpt.domain if by == "domain" else rcpt.msg.cls
            counts = rows.setdefault(key, [0] * (len(AGE_BUCKETS) + 1))
            age = now - rcpt.msg.queued_at
            counts[next((i for i, edge in enumerate(AGE_BUCKETS) if age < edge),
                        len(AGE_BUCKETS))] += 1
        ranked = sorted(rows.items(), key=lambda kv: (-sum(kv[1]), kv[0]))
        shown, rest = ranked[:top], ranked[top:]
        if rest:
            shown.append(("(other)", [sum(c) for c in zip(*(v for _, v in rest), strict=True)]))
        total = [sum(c) for c in zip(*(v for _, v in ranked), strict=True)] if ranked else \
            [0] * (len(AGE_BUCKETS) + 1)
        labels = [f"<{edge // 60}m" for edge in AGE_BUCKETS] + [f"{AGE_BUCKETS[-1] // 60}m+"]
        return {"by": by, "buckets": labels,
                "rows": [{"key": "TOTAL", "total": sum(total), "counts": total}]
                + [{"key": k, "total": sum(v), "counts": v} for k, v in shown]}


def message_view(rcpts: list[Recipient], now: float) -> dict:
    msg = rcpts[0].msg
    return {"queue_id": msg.id, "class": msg.cls, "pool": msg.pool, "sender": msg.mail_from,
            "queued_at": msg.queued_at, "age_s": round(now - msg.queued_at, 1),
            "size": msg.size, "correlation_id": msg.correlation_id,
            "message_id": msg.message_id,
            "recipients": [{"address": r.address, "state": r.state.value,
                            "attempts": r.attempts, "next_attempt": r.next_attempt or None,
                            "reply": r.last_reply, "pending": pending_action(r)}
                           for r in rcpts]}


def pending_action(rcpt: Recipient) -> str | None:
    """The operator's action waiting for this recipient's delivery to end ("hold" or
    "delete", ``Operator.pend``), or None: shown with the recipient wherever it is listed."""
    return json.loads(rcpt.pending)["action"] if rcpt.pending else None


def _hint(name: str, known: Iterable[str]) -> str:
    close = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""
