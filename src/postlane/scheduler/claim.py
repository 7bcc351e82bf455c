"""Cluster mode: a node's share of the shared queue, claimed from PostgreSQL a little at a time.

Why claim a little at a time rather than load everything: priority must hold across nodes. A node
keeps only about ``claim_ahead`` ready recipients per outbound connection slot of each pool; it
tops up from the shared queue, most urgent first, as its slots free up. A policy notice accepted
by any node is therefore next in line for whichever node has a slot free, and a 200,000-message
campaign stays in the shared queue, not in one node's memory.

Each node keeps its own source IPs and ``max_smtp_out`` (IPs belong to machines); what it shares
is the queue, the pause state and the list of live nodes. A node heartbeats every quarter of
``cluster.dead_after`` (renewing its leases every third of ``cluster.lease``) and holds a
database session whose advisory lock names it. When that session closes (the process died, the
machine vanished) and the heartbeat is ``dead_after`` old, any other node gives the dead node's
work back to the queue (``reap``) and the claims take it at once; a node that stalls with its
session open keeps its work until its leases run out. A node that misses heartbeats for three
quarters of ``dead_after`` stops starting deliveries before anyone may take its work (the
fence); when the database answers again it goes on if nothing was taken, or else stops, so
that only what was on the wire at the fence can be delivered twice. docs/cluster.md has the
arithmetic.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import socket
import time
from collections.abc import Awaitable, Callable

import asyncpg

from ..config import Config
from ..spool import PostgresSpool, Recipient
from ..spool.postgres import UNREACHABLE, NodeConflict
from ..spool.requests import RetryRequest
from .scheduler import Scheduler

log = logging.getLogger("postlane.cluster")

FENCE_KEY = "fence"
KEY_CHECK = 30.0
"""Seconds between comparisons of the nodes' feedback keys (a node restarted with another key)."""


class Claimer:
    """Keeps one node's scheduler fed with work claimed from the shared spool."""

    def __init__(self, config: Config, spool: PostgresSpool, scheduler: Scheduler,
                 on_drain: Callable[[], None] | None = None, feedback_key: str = "") -> None:
        self.config = config
        self.spool = spool
        self.scheduler = scheduler
        self.on_drain = on_drain
        self.name = config.node.name
        self.lease = config.cluster.lease
        self.dead_after = config.cluster.dead_after
        self.targets = {name: sum(ip.max_smtp_out for ip in pool.ips) * config.cluster.claim_ahead
                        for name, pool in config.pools.items()}
        self.claimed = 0
        self.draining = False
        self._wake = asyncio.Event()
        self._dirty: set[str] = set(self.targets)
        """Pools that may have claimable work: new mail was notified, the last claim came back
        full, or the poll interval passed. Others are not queried (an empty pool costs
        nothing)."""
        self._tasks: list[asyncio.Task] = []
        self._session: asyncpg.Connection | None = None
        self._claiming = False
        self._pause_changed = False
        self._takeover_after = 0.0
        """After this node lost the database, it takes over no work of other nodes for one
        lease period: after a failover every node looks dead, and they are about to renew."""
        self._fence: asyncio.TimerHandle | None = None
        self.fenced = False
        """No heartbeat for ``cluster.fence``: no delivery starts until one succeeds."""
        self.taken_over = 0
        """Recipients this node gave back from dead nodes (each logged with the node)."""
        self.on_retry: Callable[[RetryRequest], Awaitable[None]] | None = None
        """Carries out an operator's "retry now" asked of another node, on this node's share
        (``retries_by``)."""
        self._retry_seen = 0
        """The last retry request read (``spool.requests``)."""
        self._retry_asked = False
        self.feedback_key = feedback_key
        """The fingerprint of this node's feedback key: compared with the other nodes' at the
        start and every ``KEY_CHECK`` seconds."""

    # -- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        """Join the cluster, adopt its pause state, and start claiming."""
        self.spool.notify_reachability(lambda _up: self._hold())
        self._session = await self.spool.session(self.name, self._notified)
        try:
            await self.spool.register(self.name, socket.gethostname(), os.getpid(),
                                      self.feedback_key)
        except BaseException:
            self._session.terminate()
            raise
        await self._check_key()
        await self._sync_paused()
        self._retry_seen = await self.spool.last_retry_request()
        await self.spool.sweep()  # messages a crash left with every recipient final
        self.scheduler.notify_final(lambda _rcpt: self._wake.set())
        self._claiming = True
        self._arm_fence(time.monotonic())
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._claim_loop(), name="claim"),
                       loop.create_task(self._heartbeat_loop(), name="heartbeat")]

    def retries_by(self, fn: Callable[[RetryRequest], Awaitable[None]]) -> None:
        """Carry out the "retry now" requests sent to other nodes with ``fn`` (the node's
        ``Operations.retry_asked``, built after the claimer)."""
        self.on_retry = fn

    def stop_claiming(self) -> None:
        """First step of a drain: take no new work (leases keep being renewed)."""
        self._claiming = False
        self._wake.set()

    async def close(self) -> None:
        """Last step of a drain, after the scheduler finished and the spool flushed: give back
        whatever is still claimed so other nodes deliver it at once, and leave the cluster."""
        self._claiming = False
        if self._fence is not None:
            self._fence.cancel()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        try:
            released = await self.spool.release(self.name)
            await self.spool.deregister(self.name)
        except Exception as exc:  # database away: our leases are taken over without us
            log.warning("could not release leases (others take them over %.0fs after the last"
                        " heartbeat): %s", self.dead_after, exc)
            return
        finally:
            if self._session is not None:  # closed last: others see this node gone
                self._session.terminate()
                self._session = None
        log.info("left the cluster", extra={"released": released})

    # -- intake hands new messages here instead of to the scheduler -----------------------------

    def add_message(self, rcpts: list[Recipient]) -> None:
        """A message was committed to the shared queue: look for work now (this node may not
        be the one that delivers it; the most urgent work goes to whoever has a slot)."""
        if rcpts:
            self._dirty.add(rcpts[0].msg.pool)
        self._wake.set()

    # -- loops ----------------------------------------------------------------------------------

    def _notified(self, channel: str, payload: str) -> None:
        if channel == self.spool.retry_channel:
            self._retry_asked = True
            self._wake.set()
            return
        if channel == self.spool.pause_channel:
            self._pause_changed = True  # a resume makes skipped work claimable
        self._dirty.update(payload.split(",") if payload else self.targets)
        self._wake.set()

    async def _sync_paused(self) -> None:
        stored = await self.spool.paused()
        local = set(self.scheduler.paused)
        for pool, domain in stored - local:
            self.scheduler.apply_paused(pool, domain, True)
        for pool, domain in local - stored:
            self.scheduler.apply_paused(pool, domain, False)

    async def _claim_loop(self) -> None:
        poll = self.config.cluster.poll
        polled = time.monotonic()
        while True:
            self._wake.clear()
            more = False
            look = time.monotonic() - polled >= poll
            if look:  # due retries, lapsed leases and dead nodes are not notified: look anyway
                polled = time.monotonic()
                self._dirty.update(self.targets)
            try:
                if self._pause_changed:
                    self._pause_changed = False
                    await self._sync_paused()
                if self._retry_asked:
                    self._retry_asked = False
                    await self._retry_requests()
                if self._claiming:
                    if look:
                        await self._reap()
                    more = await self.claim_once()
            except UNREACHABLE:  # the database is away (told once by the spool): retried
                self._takeover_after = time.monotonic() + self.lease
            except Exception:  # a bug: say so, and keep the node running
                log.exception("claiming work failed")
            if more:
                continue
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), poll)

    async def claim_once(self) -> bool:
        """Top up every pool below half its target; returns whether a pool may have more."""
        now = time.time()
        more = False
        for pool, target in self.targets.items():
            if pool not in self._dirty or (pool, "*") in self.scheduler.paused:
                continue
            ready, blocked = 0, []
            for lane in self.scheduler.lanes.values():
                if lane.pool != pool:
                    continue
                if lane.blocked(now) or lane.rate_wait:
                    # held work it cannot send now must not stop the node claiming other
                    # destinations of the pool (a rate-limited one would hold them all back)
                    blocked.append(lane.domain)
                else:
                    ready += len(lane.heap)
            if ready > target // 2:
                continue
            want = target - ready
            self._dirty.discard(pool)  # before the query: news arriving meanwhile re-marks it
            rcpts = await self.spool.claim(self.name, pool, want, self.lease, blocked,
                                           takeover=time.monotonic() >= self._takeover_after)
            if len(rcpts) == want:
                self._dirty.add(pool)
            for rcpt in rcpts:
                self.scheduler.add(rcpt)
            self.claimed += len(rcpts)
            more = more or len(rcpts) == want
        return more

    async def _retry_requests(self) -> None:
        """Carry out the "retry now" requests other nodes were sent, on what this node holds
        (a deferred recipient stays with the node that deferred it): read when notified, and
        after the session reconnects (notifications may have been missed meanwhile). A request
        that fails is read again with the next (a second retry of the same recipients finds
        none)."""
        try:
            for request in await self.spool.retry_requests(self._retry_seen):
                if request.node != self.name and self.on_retry is not None:
                    await self.on_retry(request)
                self._retry_seen = request.id
        except BaseException:
            self._retry_asked = True  # read again at the next turn
            raise

    async def _reap(self) -> None:
        """Give the work of dead nodes back to the queue (whichever node looks first does)."""
        if time.monotonic() < self._takeover_after:
            return
        released = await self.spool.reap(self.name, self.dead_after, self.lease)
        for node, count in released.items():
            self.taken_over += count
            log.warning("node %s is dead: its %d recipients go back to the queue", node, count,
                        extra={"dead_node": node, "released": count})
        if released:
            self._dirty.update(self.targets)

    def _arm_fence(self, sent: float) -> None:
        """A heartbeat sent at ``sent`` (monotonic) succeeded: the fence moves to
        ``cluster.fence`` after it (the others count from when the database wrote it, later)."""
        if self._fence is not None:
            self._fence.cancel()
        delay = self.config.cluster.fence - (time.monotonic() - sent)
        self._fence = asyncio.get_running_loop().call_later(max(0.0, delay), self._fenced)

    def _fenced(self) -> None:
        """No heartbeat for ``cluster.fence``: one heartbeat later the others may call this node
        dead and take its work. Start no delivery until the database answers again."""
        self.fenced = True
        self._hold()
        self.spool.health.begin(
            FENCE_KEY, "fence", "cluster heartbeat late", level=logging.ERROR, unit=None,
            cause=f"no heartbeat for {self.config.cluster.fence:g}s",
            effect=f"no delivery starts until the database answers (the others take this node's"
                   f" work {self.dead_after:g}s after its last heartbeat if its session closed)")

    async def _unfence(self, gap: float) -> None:
        """The database answers again, ``gap`` seconds (its clock) after the last heartbeat
        before. Shorter than ``dead_after``: nobody can have taken anything, deliver on. Longer:
        go on only if this node still owns all it holds, else stop (the supervisor restarts it
        and it claims afresh): what it holds may be on its way out from another node."""
        if gap >= self.dead_after:
            held = {(r.msg.id, r.idx) for r in self.scheduler.recipients()}
            lost = held - await self.spool.owned(self.name)
            if lost:
                log.error("%d recipients this node held were taken over while it was cut off:"
                          " stopping it (the supervisor restarts it)", len(lost))
                self.stop_claiming()
                if self.on_drain is not None:
                    self.on_drain()
                return
        self.fenced = False
        self._hold()
        self.spool.health.end(FENCE_KEY)

    def _hold(self) -> None:
        """Start no delivery while the database is away or the node is fenced: the outcome
        of a delivery that cannot be recorded is lost if the node's work is then taken over,
        and that recipient would be delivered twice."""
        self.scheduler.fence(self.spool.down or self.fenced)

    async def _check_key(self) -> None:
        """A degraded state while a live node has another feedback key: a bounce, complaint or
        unsubscribe click for mail one node sent may reach any node, which then finds no
        recipient in its VERP address or link."""
        if not self.feedback_key:
            return
        others = await self.spool.other_keys(self.name, self.feedback_key, self.dead_after)
        if not others:
            self.spool.health.end("feedback-key")
            return
        self.spool.health.begin(
            "feedback-key", "config", f"feedback key differs from node(s) {', '.join(others)}",
            cause="feedback.key_file is not one file copied to every node",
            effect="bounces, complaints and unsubscribe clicks for mail another node sent find"
            " no recipient here, and the reverse", unit=None, level=logging.ERROR)

    async def _heartbeat_loop(self) -> None:
        beat = self.config.cluster.heartbeat
        renewed = checked = time.monotonic()
        while True:
            await asyncio.sleep(beat)
            sent = time.monotonic()
            if sent - checked >= KEY_CHECK:
                checked = sent
                with contextlib.suppress(*UNREACHABLE):  # the heartbeat below tells an outage
                    await self._check_key()
            renew = sent - renewed >= self.lease / 3
            try:
                got = await asyncio.wait_for(
                    self.spool.heartbeat(self.name, self.lease if renew else None), 2 * beat)
                if renew:
                    renewed = sent
                draining, gap = got if got is not None else (False, math.inf)
                self._arm_fence(sent)
                if self.fenced:
                    await self._unfence(gap)
                if self._session is None or self._session.is_closed():
                    # the database restarted or failed over: the name lock and notifications
                    # come back with a new session; meanwhile polling found the work
                    self._session = await self.spool.session(self.name, self._notified)
                    self._pause_changed = self._retry_asked = True  # missed notifications
                    self._wake.set()
            except NodeConflict as exc:  # our name was taken while our session was gone
                log.error("stopping: %s", exc)
                self.stop_claiming()
                if self.on_drain is not None:
                    self.on_drain()
                return
            except TimeoutError:  # slow, not necessarily away: the fence decides, not this
                self._takeover_after = time.monotonic() + self.lease
                continue
            except UNREACHABLE as exc:  # the database is away (told once): retried
                self.spool.unreachable(exc)  # the session's connect, if not the spool's
                self._takeover_after = time.monotonic() + self.lease
                continue
            except Exception:  # a bug: say so, and keep trying
                log.exception("heartbeat failed")
                continue
            if draining and not self.draining:
                self.draining = True
                log.info("drain requested by an operator")
                self.stop_claiming()
                if self.on_drain is not None:
                    self.on_drain()
