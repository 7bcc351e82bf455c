"""Cluster mode: a node's share of the shared queue, claimed from PostgreSQL a little at a time.

Why claim a little at a time rather than load everything: priority must hold across nodes. A node
keeps only about ``claim_ahead`` ready recipients per outbound connection slot of each pool; it
tops up from the shared queue, most urgent first, as its slots free up. A policy notice accepted
by any node is therefore next in line for whichever node has a slot free, and a 200,000-message
campaign stays in the shared queue, not in one node's memory.

Each node keeps its own source IPs and ``max_smtp_out`` (IPs belong to machines); what it shares
is the queue, the pause state and the list of live nodes. Leases are renewed every third of
``cluster.lease``; a node that dies stops renewing, and its recipients become claimable by the
others once their leases run out. A node that cannot renew for most of a lease (cut off from the
database) stops itself before the others may take its work, so that only what is on the wire at
that moment can be delivered twice (or, after a stall of the whole process, what it held).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import Callable

import asyncpg

from ..config import Config
from ..spool import PostgresSpool, Recipient
from .scheduler import Scheduler

log = logging.getLogger("postlane.cluster")

FENCE = 0.8
"""Fraction of ``cluster.lease`` without a successful renewal after which a node stops: the
leases it last renewed lapse at 1.0, when other nodes may claim that work."""


class Claimer:
    """Keeps one node's scheduler fed with work claimed from the shared spool."""

    def __init__(self, config: Config, spool: PostgresSpool, scheduler: Scheduler,
                 on_drain: Callable[[], None] | None = None) -> None:
        self.config = config
        self.spool = spool
        self.scheduler = scheduler
        self.on_drain = on_drain
        self.name = config.node.name
        self.lease = config.cluster.lease
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
        self._listener: asyncpg.Connection | None = None
        self._claiming = False
        self._pause_changed = False
        self._takeover_after = 0.0
        """After this node lost the database, it takes over no lapsed lease for one lease
        period: after a failover every lease looks lapsed, and their owners are alive and about
        to renew them."""
        self._fence: asyncio.TimerHandle | None = None
        self.fenced = False

    # -- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        """Join the cluster, adopt its pause state, and start claiming."""
        await self.spool.register(self.name, socket.gethostname(), os.getpid(), self.lease)
        self._listener = await self.spool.listen(
            [self.spool.work_channel, self.spool.pause_channel], self._notified)
        await self._sync_paused()
        await self.spool.sweep()  # messages a crash left with every recipient final
        self.scheduler.on_final = lambda _rcpt: self._wake.set()
        self._claiming = True
        self._arm_fence()
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._claim_loop(), name="claim"),
                       loop.create_task(self._heartbeat_loop(), name="heartbeat")]

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
        if self._listener is not None:
            self._listener.terminate()
            self._listener = None
        try:
            released = await self.spool.release(self.name)
            await self.spool.deregister(self.name)
        except Exception as exc:  # database away: our leases lapse by themselves
            log.warning("could not release leases (they lapse after %.0fs): %s", self.lease, exc)
            return
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
            if time.monotonic() - polled >= poll:  # due retries and lapsed leases of dead
                polled = time.monotonic()           # nodes are not notified: look anyway
                self._dirty.update(self.targets)
            try:
                if self._pause_changed:
                    self._pause_changed = False
                    await self._sync_paused()
                if self._claiming:
                    more = await self.claim_once()
            except Exception as exc:  # the database may be failing over: keep trying
                log.warning("claiming work failed: %s", exc)
                self._takeover_after = time.monotonic() + self.lease
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

    def _arm_fence(self) -> None:
        if self._fence is not None:
            self._fence.cancel()
        self._fence = asyncio.get_running_loop().call_later(FENCE * self.lease, self._fenced)

    def _fenced(self) -> None:
        """Leases not renewed for most of their life: other nodes may take this node's work any
        moment. Stop (drain and exit; the supervisor restarts it, and on restart it claims
        afresh) rather than deliver what may become another node's."""
        self.fenced = True
        log.error("leases not renewed for %.0fs (database unreachable?): stopping this node so"
                  " that no message is delivered by two nodes", FENCE * self.lease)
        self.stop_claiming()
        if self.on_drain is not None:
            self.on_drain()

    async def _heartbeat_loop(self) -> None:
        interval = self.lease / 3
        while True:
            await asyncio.sleep(interval)
            interval = self.lease / 3
            try:
                drain = await asyncio.wait_for(self.spool.heartbeat(self.name), interval)
                await asyncio.wait_for(self.spool.renew(self.name, self.lease), interval)
                self._arm_fence()
                if self._listener is None or self._listener.is_closed():
                    # the database restarted or failed over: notifications resume on a new
                    # connection; meanwhile polling found the work, and pause state is re-read
                    self._listener = await self.spool.listen(
                        [self.spool.work_channel, self.spool.pause_channel], self._notified)
                    self._pause_changed = True
                    self._wake.set()
            except Exception as exc:  # the database may be failing over: keep trying
                log.warning("renewing leases failed: %s", exc)
                self._takeover_after = time.monotonic() + self.lease
                interval = min(1.0, interval)
                continue
            if drain and not self.draining:
                self.draining = True
                log.info("drain requested by an operator")
                self.stop_claiming()
                if self.on_drain is not None:
                    self.on_drain()
