"""The delivery loop (a mixin of ``Scheduler``): the scheduler owns each worker - one connection
from one source slot to one lane's destination, reused for as many transactions as the lane has
ready - and asks the relay to open it and to perform each transaction; the relay answers with
one outcome per recipient, which the scheduler records."""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from ..config import Config
from ..relay.deliver import (
    BOUNCED,
    DEFERRED,
    DELIVERED,
    Failed,
    Hosts,
    Outcome,
    Relay,
    SessionLost,
    families,
)
from ..relay.tlsrpt import is_report
from ..spool import Recipient, State
from .clock import Clock
from .lanes import Lane, SourceSlot
from .pacing import send_delay
from .rules import RuleBook

if TYPE_CHECKING:
    from ..health import Health

log = logging.getLogger("postlane.scheduler")


class DeliveryLoop:
    config: Config
    clock: Clock
    relay: Relay | None
    rules: RuleBook
    health: Health

    if TYPE_CHECKING:  # the Scheduler's
        def next_batch(self, lane: Lane, sent: int = 0) -> list[Recipient]: ...
        async def wait_for_work(self, lane: Lane, timeout: float,
                                sent: int = 0) -> list[Recipient]: ...
        def admit(self, lane: Lane) -> bool: ...
        def requeue(self, rcpt: Recipient) -> None: ...
        @property
        def slots(self) -> dict[str, list[SourceSlot]]: ...
        def set_rule(self, lane: Lane, name: str) -> None: ...
        def suspend(self, lane: Lane, seconds: float, reason: str) -> None: ...
        def outage_key(self, lane: Lane) -> str: ...
        def delivered(self, rcpt: Recipient, reply: str, status: str,
                      conn: dict[str, str]) -> None: ...
        def bounced(self, rcpt: Recipient, reply: str, status: str, conn: dict[str, str],
                    category: str = "") -> None: ...
        def deferred(self, rcpt: Recipient, reply: str, status: str,
                     conn: dict[str, str]) -> None: ...

    async def serve(self, lane: Lane, slot: SourceSlot) -> None:
        """Run one connection's life: connect, deliver batches while the lane has them, QUIT."""
        relay = self.relay
        assert relay is not None
        had_rule = lane.rule is not None
        batch = self.next_batch(lane)
        if not batch:
            return
        # a mailed TLS-RPT report gets a connection of its own, under its relaxed TLS policy,
        # and goes alone on it: no other message is sent on a relaxed connection
        report = is_report(batch[0].msg)
        try:
            hosts = await self._open(relay, lane, slot, batch, report)
        except Exception:  # never strand a taken batch in memory (as for a transaction below)
            log.exception("connecting for %s failed unexpectedly", batch[0].msg.id)
            self._defer_inflight(batch, {"source_ip": slot.address, "vmta": slot.ehlo})
            return
        if hosts is None:
            return
        conn = hosts.conn
        assert conn is not None
        if not had_rule and lane.rate_key is not None and not self.admit(lane):
            # the rule came with the MX lookup: this first message needs a rate token too
            for rcpt in batch:
                self.requeue(rcpt)
            await conn.quit()
            return
        info = relay.facts(conn, slot)
        limit = self.max_messages_per_connection(lane)
        try:
            while batch:
                await self.throttle(lane, slot)
                try:
                    self.settle(batch, await relay.transact(conn, batch, info), info)
                except SessionLost as lost:  # the server's fault: the batch tries the next host
                    if lost.settled:  # recipients a transaction before the loss settled
                        done = sorted(lost.settled)
                        self.settle([batch[i] for i in done], [lost.settled[i] for i in done],
                                    info)
                        batch = [r for i, r in enumerate(batch) if i not in lost.settled]
                    try:
                        opened = await hosts.lost(lost)
                    except Exception:  # never strand the batch (as below)
                        log.exception("fallback of %s failed unexpectedly", batch[0].msg.id)
                        opened = Failed(Outcome(DEFERRED, "451 4.3.0 internal error during"
                                                          " delivery", "4.3.0"), info)
                    if isinstance(opened, Failed):
                        self._failed(lane, batch, opened)
                        return
                    conn = opened
                    info = relay.facts(conn, slot)
                    continue
                except Exception:  # never strand a taken batch in memory: retry it later
                    log.exception("delivery of %s failed unexpectedly", batch[0].msg.id)
                    self._defer_inflight(batch, info)
                    break
                if report or not conn.usable or conn.messages_sent >= limit:
                    break
                batch = await self.wait_for_work(lane, self.config.relay.idle_timeout,
                                                 conn.messages_sent)
        finally:
            if hosts.conn is not None:
                await hosts.conn.quit()

    def _defer_inflight(self, batch: list[Recipient], info: dict[str, str]) -> None:
        """Defer what of ``batch`` is still in flight after an unexpected error (a bug)."""
        for rcpt in batch:
            if rcpt.state is State.INFLIGHT:
                self.deferred(rcpt, "451 4.3.0 internal error during delivery", "4.3.0", info)

    async def _open(self, relay: Relay, lane: Lane, slot: SourceSlot,
                    batch: list[Recipient], report: bool = False) -> Hosts | None:
        """The attempt's hosts, one connected, for ``batch``, or None with the batch's
        outcome recorded."""
        dests = await relay.resolve(lane.domain)
        if isinstance(dests, Failed):
            self._failed(lane, batch, dests)
            return None
        if lane.rule is None:
            name = self.rules.for_mx([d.host for d in dests])
            if name:
                self.set_rule(lane, name)
        lane.families = families(dests)
        if lane.families and slot.version not in lane.families and any(
                s.version in lane.families for s in self.slots[lane.pool]):
            # a slot of the other family, taken before the lookup: not an attempt, the
            # batch goes back and the lane takes a slot that reaches the destination
            for rcpt in batch:
                self.requeue(rcpt)
            return None
        hosts = await relay.connect(lane, slot, dests, relaxed=report)
        if isinstance(hosts, Failed):
            self._failed(lane, batch, hosts)
            return None
        return hosts

    def settle(self, batch: list[Recipient], outcomes: list[Outcome],
               info: dict[str, str]) -> None:
        """Record one outcome per recipient of a transaction."""
        for rcpt, out in zip(batch, outcomes, strict=True):
            if out.kind == DELIVERED:
                self.delivered(rcpt, out.reply, out.status, info)
            elif out.kind == BOUNCED:
                self.bounced(rcpt, out.reply, out.status, info, out.category)
            else:
                self.deferred(rcpt, out.reply, out.status, info)

    def _failed(self, lane: Lane, batch: list[Recipient], failed: Failed) -> None:
        """No connection for ``batch``. An unreachable destination: defer the batch and
        suspend the lane, so the rest of its queue waits without spending attempts."""
        if not failed.unreachable:
            self.settle(batch, [failed.outcome] * len(batch), failed.info)
            return
        reply = failed.outcome.reply
        for rcpt in batch:
            self.deferred(rcpt, reply, failed.outcome.status, failed.info)
        cls = self.config.classes.get(batch[0].msg.cls)
        pause = min(cls.retry[0] if cls else 60.0, 60.0)
        key = self.outage_key(lane)
        self.health.begin(key, "destination", f"destination {lane.domain} unreachable from pool"
                          f" {lane.pool}", cause=reply, unit="deferrals",
                          effect=f"its mail is deferred; the lane waits {pause:.0f}s between"
                                 " tries")
        self.health.count(key, len(batch))
        self.suspend(lane, pause, reply)

    async def throttle(self, lane: Lane, slot: SourceSlot) -> None:
        """Hold the next transaction until the destination's per-IP rate allows it."""
        delay = send_delay(lane, slot, self.clock.time())
        if delay > 0:
            await asyncio.sleep(delay)

    def max_messages_per_connection(self, lane: Lane) -> int:
        limit = self.config.pools[lane.pool].max_messages_per_connection
        if lane.rule is not None:
            limit = min(limit, lane.rule.max_messages_per_connection)
        return limit
