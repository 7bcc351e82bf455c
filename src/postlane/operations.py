"""Operator actions, on the record: the one door through which the HTTP API (and so the CLI
and the dashboard, which use it) pauses, resumes, retries, purges, holds, releases, deletes,
suppresses and unsuppresses, and through which the CLI's suppress commands change the list and
``postlane cluster drain`` asks a node to drain.

Each action names its operator (an API token's name, or the local user of a CLI command that
works on the stores directly) in accounting records written through the spool like every other
record, so the recorder chains them into the audit store: one record per recipient it changed,
in the spool transaction that changes it (purge and delete: the recipient's final ``b`` record;
hold, release and retry: an ``o`` record), and one ``o`` record for an action on a pool, a lane
or the suppression list. ``audit show`` then says "purged by operator alice", ``audit verify``
covers it, and the SLA report reads pauses from it (docs/audit.md, "Operator actions").
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import sqlite3
from collections.abc import Awaitable, Callable, Collection
from typing import TYPE_CHECKING, TextIO

from .accounting.operators import DONE, Operator, action_record, stamp
from .accounting.records import Record, pack, unpack
from .address import PathError, alabel_domain, check_domain
from .feedback.suppression import Entry, SuppressionList, adding, normalize, parse_csv, removing
from .feedback.suppression_writer import SuppressionWriter
from .scheduler.control import SelectionError, Selector
from .spool import PostgresSpool, SpoolUnavailable
from .spool.requests import RetryRequest

if TYPE_CHECKING:
    from .config import Config
    from .scheduler.control import QueueControl
    from .scheduler.scheduler import Scheduler
    from .spool import Spool

__all__ = ["DONE", "OperationError", "Operations", "Operator", "Suppressions",
           "action_record", "request_drain", "stamp"]

log = logging.getLogger("postlane.operations")

DSN_WAIT = 10.0
"""Seconds a delete with a DSN waits for its DSNs to be queued (the final states of the
removed recipients are written after them) before it answers 503 instead of "deleted"."""

Held = Callable[[Record, bytes], Awaitable[bool]]
"""Whether a record (and its packed bytes) is on the record already: in the spool's outbox or
in the audit store (``Node.holds``)."""
Bounces = Callable[[Collection[str]], list["asyncio.Future[bool]"]]
"""The node's DSNs still being queued for these queue ids; each one's result: whether the
final states it owes were written (False: the node stopped first)."""


class OperationError(Exception):
    """An operator request that cannot be carried out; ``status`` is the HTTP status to use."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def _packing(make: Callable[[int], Record | None]
             ) -> tuple[Callable[[int], bytes | None], list[Record]]:
    """For ``SuppressionList.recorded``: the function that makes a change's record from its
    result and packs it (None: nothing to record), and the list it keeps that record in (the
    last try's: the list's writer may run the change more than once)."""
    made: list[Record] = []

    def packed(result: int) -> bytes | None:
        made.clear()
        rec = make(result)
        if rec is None:
            return None
        made.append(rec)
        return pack(rec)

    return packed, made


class Suppressions:
    """The suppression list changed on the record: by a node (``record`` writes through its
    spool), or by the CLI on the list's file (``record`` collects for ``outbox.post``). The
    list and the spool are two stores: with ``waiting`` (a list), each change is committed
    with its record waiting beside it in the list (``SuppressionList.recorded``), the ids
    collected there for ``settle`` once the spool holds the records; a process killed before
    that leaves them to the node's next start (``Operations.record_pending``). Without it (the
    CLI with ``--db`` only: no spool to reach), the record follows the change."""

    def __init__(self, store: SuppressionList, record: Callable[[Record], None],
                 waiting: list[int] | None = None) -> None:
        self.store = store
        self.record = record
        self.waiting = waiting

    def _change(self, change: Callable[[sqlite3.Connection], int],
                make: Callable[[int], Record | None]) -> int:
        packed, made = _packing(make)
        if self.waiting is None:
            result = self.store.write(change)
            packed(result)
        else:
            result, pending = self.store.recorded(change, packed)
            if pending is not None:
                self.waiting.append(pending)
        for rec in made:
            self.record(rec)
        return result

    def add(self, address: str, scope: str, reason: str, *, who: Operator) -> Entry:
        entry = SuppressionList.entry(address, scope, reason, "operator")
        self._change(adding([entry]), lambda n: self.added_record(entry, who))
        return entry

    def remove(self, address: str, scope: str | None, *, who: Operator) -> int:
        return self._change(removing(address, scope),
                            lambda n: self.removed_record(address, scope, n, who))

    def import_csv(self, src: TextIO, scope: str, *, who: Operator) -> int:
        return self._change(adding(parse_csv(src, scope)),
                            lambda n: self.imported_record(n, scope, who))

    @staticmethod
    def added_record(entry: Entry, who: Operator) -> Record:
        return action_record("suppress", who, target=entry.address,
                             note=f" (scope {entry.scope})" + (f": {entry.reason}"
                                                               if entry.reason else ""))

    @staticmethod
    def removed_record(address: str, scope: str | None, removed: int,
                       who: Operator) -> Record | None:
        if not removed:
            return None
        where = f"scope {scope}" if scope else "every scope"
        return action_record("unsuppress", who, target=normalize(address),
                             note=f" ({where}, {removed}"
                                  f" entr{'y' if removed == 1 else 'ies'})")

    @staticmethod
    def imported_record(count: int, scope: str, who: Operator) -> Record:
        return action_record("suppress-import", who, what=f"{count} addresses",
                             note=f" (scope {scope} where a row names none)")


async def request_drain(spool: PostgresSpool, node: str, *, who: Operator,
                        record: Callable[[Record], None]) -> bool:
    """Ask a cluster node to drain (``postlane cluster drain``, from any machine that reaches
    the shared spool): its flag in the spool, then the ``o`` record of ``who``'s request to
    ``record`` (the CLI posts it to the spool's outbox, as ``Suppressions`` does). False: no
    node of that name, nothing done, nothing recorded."""
    if not await spool.request_drain(node):
        return False
    record(action_record("drain", who, what=f"node {node}"))
    Operations._log("drain", who, 1, node=node)
    return True


async def forget_node(spool: PostgresSpool, node: str, *, who: Operator,
                      record: Callable[[Record], None]) -> bool:
    """Remove a dead cluster node from the nodes table (``postlane cluster forget``), then the
    ``o`` record of ``who``'s action to ``record``. False: no node of that name; refused
    (``NodeNotForgotten``) while it runs or holds work: nothing done, nothing recorded."""
    if not await spool.forget(node):
        return False
    record(action_record("forget", who, what=f"node {node}"))
    Operations._log("forget", who, 1, node=node)
    return True


class Operations:
    """A node's operator actions. Every method takes ``who``; the records are written where
    the state changes (scheduler, spool), so no path changes the queue without them."""

    def __init__(self, config: Config, scheduler: Scheduler, control: QueueControl,
                 spool: Spool, suppressions: Suppressions, writes: SuppressionWriter,
                 emit: Callable[[Record], None], bounces: Bounces | None = None,
                 held: Held | None = None) -> None:
        self.config = config
        self.scheduler = scheduler
        self.control = control
        self.spool = spool
        self.suppressions = suppressions
        self.writes = writes
        """The suppression list's writer (its writes, off the loop)."""
        self.emit = emit
        """Tells the node's in-memory observers of a record the spool write carries."""
        self.bounces = bounces
        """The DSNs being queued per message (``Node``); None: nothing sends DSNs here."""
        self.held = held
        """Whether the spool or the audit store has a record already (``record_pending``);
        None: nothing to look in."""

    async def pause(self, pool: str, domain: str | None = None, *, who: Operator) -> int:
        """Hold a pool's mail (or its lane to one domain) in the queue; survives a restart.
        Returns the recipients queued there now."""
        await self._check(Selector(pool=pool))
        if pool not in self.config.pools:  # mail left in a pool the config no longer has
            raise OperationError(f"pool {pool!r} is no longer in the config: its mail waits"
                                 " already; purge or delete it", 409)
        if not self.config.pools[pool].pausable:
            raise OperationError(f"pool {pool!r} is marked pausable = false and cannot be paused",
                                 409)
        return await self._set_paused(pool, domain, True, who)

    async def resume(self, pool: str, domain: str | None = None, *, who: Operator) -> int:
        await self._check(Selector(pool=pool))
        return await self._set_paused(pool, domain, False, who)

    def still_paused(self, pool: str, domain: str | None = None) -> list[str]:
        """After a resume of ``pool`` (or of its lane to ``domain``): the pauses still holding
        that mail, which a resume does not lift ("*": the whole pool's, else lanes' domains).
        A lane paused on its own stays paused when its pool resumes: "resumed bulk" and a
        pool shown running read as "the mail flows" while it waited."""
        if domain:
            return ["*"] if (pool, "*") in self.scheduler.paused else []
        return sorted(d for p, d in self.scheduler.paused if p == pool and d != "*")

    async def _set_paused(self, pool: str, domain: str | None, paused: bool,
                          who: Operator) -> int:
        if domain:  # a lane with no mail yet may be paused, but only one that could have some
            try:
                check_domain(domain)
                domain = alabel_domain(domain)  # as lanes name it (``intake.domain_of``)
            except PathError as exc:
                raise OperationError(f"{domain!r} is not a domain: {exc}", 422) from None
        domain = domain or None
        if isinstance(self.spool, PostgresSpool):  # a cluster: its queue, not this node's share
            try:
                queued = await self.spool.open_count(pool, domain)
            except SpoolUnavailable as exc:
                raise OperationError(f"not done: {exc}", 503) from None
        else:
            queued = sum(lane.depth() for lane in self.scheduler.lanes.values()
                         if lane.pool == pool and domain in (None, lane.domain))
        action = "pause" if paused else "resume"
        rec = action_record(action, who, pool=pool, target=f"*@{domain}" if domain else "",
                            what=f"lane {pool}/{domain}" if domain else f"pool {pool}",
                            note=f" ({queued} recipients queued)")
        await self.scheduler.set_paused(pool, domain, paused, (rec,))
        self.emit(rec)
        self._log(action, who, queued, pool=pool, domain=domain or "*")
        return queued

    async def retry(self, pool: str, domain: str | None = None, *, who: Operator) -> dict:
        """Deferred recipients of a pool (or lane) due now; lifts the lanes' backoff (in a
        cluster on every node). ``recipients``: retried here (with the shared queue's
        unclaimed ones); ``elsewhere``: those other nodes hold, which they retry now."""
        out = await self.queue("retry", Selector(pool=pool, domain=domain), who=who, lift=True)
        return {"recipients": out["recipients"], "elsewhere": out.get("elsewhere", 0),
                "paused": out.get("paused", 0)}

    async def retry_asked(self, request: RetryRequest) -> None:
        """Another node was sent ``request`` (retry now): the same on what this node holds,
        as the same operator's action (its records name them; logged with the asked node)."""
        who = Operator(request.operator, request.via)
        sel = Selector(**{**request.selector,
                          "queue_ids": tuple(request.selector.get("queue_ids", ()))})
        try:
            out = await self.control.act("retry", sel, who)
        except SelectionError:  # names nothing here (a lane this node never had): nothing to do
            return
        if request.lift and sel.pool is not None:
            self.scheduler.lift(sel.pool, sel.domain.lower() if sel.domain else None)
        if out["recipients"]:
            log.info("retried now by operator %s (%s), asked of node %s: %d", who.name, who.via,
                     request.node, out["recipients"],
                     extra={"operator": who.name, "via": who.via, "action": "retry",
                            "count": out["recipients"], "asked_node": request.node,
                            "pool": sel.pool or "*", "domain": sel.domain or "*"})

    async def purge(self, pool: str, domain: str, *, who: Operator) -> int:
        """Drop a lane's queued, deferred and held mail (no DSN)."""
        return (await self.queue("purge", Selector(pool=pool, domain=domain),
                                 who=who))["recipients"]

    async def queue(self, action: str, sel: Selector, *, who: Operator, dry_run: bool = False,
                    dsn: bool = False, lift: bool = False) -> dict:
        """hold, release, retry, delete or purge the selected messages (``postlane queue …``;
        in a cluster, those of the shared spool too, and a retry is asked of every node: a
        deferred recipient stays with the node that deferred it). ``lift``: a retry also ends
        the backoff of the selector's pool (or lane)."""
        touched: set[str] = set()
        try:
            out = await self.control.act(action, sel, who, dry_run=dry_run, dsn=dsn,
                                         touched=touched)
        except SelectionError as exc:
            raise OperationError(str(exc), exc.status) from None
        except SpoolUnavailable as exc:
            raise OperationError(f"not done: {exc}", 503) from None
        if lift and sel.pool is not None:
            self.scheduler.lift(sel.pool, sel.domain.lower() if sel.domain else None)
        if dsn and not dry_run:  # the DSNs first: the final states are written after them
            await self._dsns_queued(touched)
        if not dry_run:  # durable, with its records, before the answer says it is done
            try:
                await self.spool.flush()
            except SpoolUnavailable as exc:  # the writer keeps the change and commits it later
                raise OperationError(f"done on the running node, not yet on disk ({exc}): it"
                                     " is written once the spool commits again", 503) from None
        if action == "retry" and not dry_run and isinstance(self.spool, PostgresSpool):
            try:
                await self.spool.request_retry(dataclasses.asdict(sel), lift,
                                               self.config.node.name, who.name, who.via)
            except SpoolUnavailable as exc:
                raise OperationError(f"retried {out['recipients']} here, but the other nodes"
                                     f" could not be asked: {exc}", 503) from None
        if not dry_run:
            self._log(action, who, out["recipients"], messages=out["messages"],
                      pool=sel.pool or "*", domain=sel.domain or "*")
        return out

    async def _dsns_queued(self, ids: Collection[str]) -> None:
        """Wait (``DSN_WAIT`` at most) until the DSNs owed for the messages ``ids`` are
        queued and the final states that wait for them handed to the spool (the flush after
        commits them). A DSN the node cannot queue now (the spool failing, the intake
        refusing with a 4xx) is tried again in the background: 503, never "deleted" while a
        SIGKILL would leave the message queued (in a cluster, leased to this node until the
        DSN is queued, then delivered by another node after the lease)."""
        waits = self.bounces(ids) if self.bounces is not None and ids else []
        if not waits:
            return
        done, pending = await asyncio.wait(waits, timeout=DSN_WAIT)  # never cancels them
        if pending or not all(not t.cancelled() and t.exception() is None and t.result()
                              for t in done):
            raise OperationError("removed on the running node; the DSN is not yet queued,"
                                 " their final states are written once it is", 503)

    # The list is written in the feedback service's writer thread (a lock held by a
    # ``postlane suppress import`` must not stall the event loop), the record on the loop.
    # The list and the spool are two stores: each change is committed with its record kept
    # in the list's own transaction (``SuppressionList.recorded``), which the spool then takes
    # and, once it holds it, the list lets go; a node killed in between writes it at its
    # next start (``record_pending``). The record is never lost and never made up.

    async def suppress(self, address: str, scope: str, reason: str, *, who: Operator) -> Entry:
        entry = SuppressionList.entry(address, scope, reason, "operator")
        await self._recorded(adding([entry]), lambda n: self.suppressions.added_record(
            entry, who))
        self._log("suppress", who, 1, scope=scope)
        return entry

    async def unsuppress(self, address: str, scope: str | None, *, who: Operator) -> int:
        removed = await self._recorded(removing(address, scope), lambda n: (
            self.suppressions.removed_record(address, scope, n, who)))
        self._log("unsuppress", who, removed, scope=scope or "*")
        return removed

    async def import_suppressions(self, src: TextIO, scope: str, *, who: Operator) -> int:
        # parsed once, in a thread; the writer may try the write more than once (a lock)
        entries = await asyncio.to_thread(parse_csv, src, scope)
        count = await self._recorded(adding(entries), lambda n: (
            self.suppressions.imported_record(n, scope, who)))
        self._log("suppress-import", who, count, scope=scope)
        return count

    async def _recorded(self, change: Callable[[sqlite3.Connection], int],
                        record: Callable[[int], Record | None]) -> int:
        """``change`` to the list with its record: committed together in the list, then in
        the spool (durable before the answer), then let go by the list."""
        packed, made = _packing(record)
        result, pending = await self.writes.call(self.suppressions.store.recorded, change,
                                                 packed)
        if pending is not None:
            self.suppressions.record(made[0])
            await self.spool.flush()  # on the record before the answer
            await self.writes.call(self.suppressions.store.settle, (pending,))
        return result

    async def record_pending(self) -> int:
        """At a start, before the API answers: the records of list changes whose node died
        before its spool committed them, written now; those it had committed (``held``) are
        not written again. Returns how many it wrote."""
        store = self.suppressions.store
        pending = await asyncio.to_thread(store.pending)
        if not pending:
            return 0
        written = 0
        for _, data in pending:
            rec = Record(*unpack(data))
            # killed after the spool's commit and before the list let the record go: it is
            # on the record once already
            if self.held is None or not await self.held(rec, data):
                self.suppressions.record(rec)
                written += 1
        await self.spool.flush()
        await self.writes.call(store.settle, [i for i, _ in pending])
        if written:
            log.warning("%d suppression-list change(s) recorded at this start: the node had"
                        " stopped before its spool committed their record", written)
        return written

    async def _check(self, sel: Selector) -> None:
        """A mistyped pool is an error, not "paused"."""
        try:
            await self.control.check(sel)
        except SelectionError as exc:
            raise OperationError(str(exc), exc.status) from None

    @staticmethod
    def _log(action: str, who: Operator, count: int, **what: object) -> None:
        log.info("%s by operator %s (%s): %d", DONE[action], who.name, who.via, count,
                 extra={"operator": who.name, "via": who.via, "action": action,
                        "count": count, **what})
