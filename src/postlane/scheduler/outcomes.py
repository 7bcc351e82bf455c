"""Outcome recording: what a delivery's result does to a recipient (final, or deferred to its
next retry time, or expired), the accounting record that goes with each state change in the
same spool write, the failures reported in a DSN, and the switch of a lane into and out of
backoff that a reply can cause."""

from __future__ import annotations

import contextlib
import logging
import random
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import orjson

from ..accounting.records import Record, format_time
from ..config import Config
from ..spool import Message, Recipient, RecipientUpdate, Spool, State
from .clock import Clock
from .lanes import Lane
from .pacing import wants_backoff

if TYPE_CHECKING:
    from ..health import Health
    from .timers import RetryTimers

log = logging.getLogger("postlane.scheduler")


class Failure:
    """A recipient that failed for good, waiting to be reported in a bounce."""

    __slots__ = ("rcpt", "status", "diag", "remote_mta", "action", "write", "final")

    def __init__(self, rcpt: Recipient, status: str, diag: str, remote_mta: str,
                 action: str = "failed") -> None:
        self.rcpt, self.status, self.diag = rcpt, status, diag
        self.remote_mta, self.action = remote_mta, action
        self.write: Callable[[bool], None] | None = None
        """The recipient's final state and record, for the spool once the bounce is queued
        (whoever sends the bounce calls it, whatever became of the bounce); called with True
        when the bounce's own commit carried ``final``: only the node's memory is left."""
        self.final: tuple[RecipientUpdate, Record] | None = None
        """The final state and its record, for the bounce's commit to carry (one commit: a
        node killed after it neither delivers the recipient again nor sends a second bounce);
        None: ``write`` alone writes them (a cluster's delete that leased them)."""


def base_record(kind: str, rcpt: Recipient, now: float) -> Record:
    """The fields every record of a recipient carries."""
    msg = rcpt.msg
    return Record(type=kind, time_logged=now, time_queued=msg.queued_at, orig=msg.mail_from,
                  rcpt=rcpt.address, queue_id=msg.id, cls=msg.cls, vmta_pool=msg.pool,
                  orcpt=rcpt.orcpt, env_id=msg.envid, correlation_id=msg.correlation_id,
                  message_id=msg.message_id, job_id=msg.correlation_id, dlv_size=msg.size,
                  attempt=rcpt.attempts, total_seconds_queued=now - msg.queued_at,
                  listener=msg.listener, auth_user=msg.auth_user)


def fill_conn(rec: Record, conn: dict[str, str]) -> None:
    """The connection's facts (addresses, MX, TLS) on a record."""
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


class OutcomeRecording:
    """The scheduler's outcome half (a mixin of ``Scheduler``)."""

    config: Config
    spool: Spool
    clock: Clock
    health: Health
    timers: RetryTimers
    record: Callable[[Record], None]
    classify: Callable[[str, str], str]
    on_failures: Callable[[Message, list[Failure]], bool] | None
    owing: dict[str, int]
    """Per message, final states held back until their bounce is queued (``_final``)."""
    unwritten: set[tuple[str, int]]
    """Recipients final in memory whose final state is held back: a page read skips them."""
    on_final: Callable[[Recipient], None] | None
    _ready: set[Lane]
    _gathered: tuple[list[RecipientUpdate], list[Record], list[str]] | None = None
    """While ``one_write`` gathers: the final states, their records, the messages ended."""

    if TYPE_CHECKING:  # the Scheduler's
        def lane(self, pool: str, domain: str) -> Lane: ...
        def kick(self) -> None: ...
        def suspend(self, lane: Lane, seconds: float, reason: str) -> None: ...
        def outage_key(self, lane: Lane) -> str: ...
        def _unindex(self, rcpt: Recipient) -> None: ...
        def _left(self, rcpt: Recipient) -> None: ...
        def apply_pending(self, rcpt: Recipient) -> bool: ...
        def pending_void(self, rcpt: Recipient, state: State) -> None: ...

    @contextlib.contextmanager
    def one_write(self) -> Iterator[None]:
        """The final states ``_final`` writes meanwhile (with their records) go to the spool
        as one write, so in one commit, and the messages they end are forgotten after it: an
        operator's purge or delete of many recipients is on disk whole or not at all. One
        write per recipient spanned several commits (``BATCH_MAX``), and a node killed between
        them had done a part of an action it never answered."""
        assert self._gathered is None, "one_write does not nest"
        gathered: tuple[list[RecipientUpdate], list[Record], list[str]] = ([], [], [])
        self._gathered = gathered
        try:
            yield
        finally:
            self._gathered = None
            updates, recs, ended = gathered
            if updates:
                self.spool.update(updates, recs)
            for msg_id in ended:
                self.spool.finish(msg_id)

    def _write_final(self, update: RecipientUpdate, rec: Record) -> None:
        if self._gathered is None:
            self.spool.update([update], (rec,))
        else:
            self._gathered[0].append(update)
            self._gathered[1].append(rec)

    def _finish(self, msg_id: str) -> None:
        if self._gathered is None:
            self.spool.finish(msg_id)
        else:
            self._gathered[2].append(msg_id)

    def _outcome_unknown(self, rcpt: Recipient) -> None:
        """A recipient comes back (restart, or another node's work taken over) with an attempt
        that was marked as started and never settled: its final dot may have been sent and
        taken. Say so in its trail (a "u" record), count the attempt, and deliver it again."""
        attempt, rcpt.open_attempt = rcpt.open_attempt, None
        assert attempt is not None
        now = self.clock.time()
        rcpt.attempts += 1
        rec = base_record("u", rcpt, now)
        rec.total_seconds_queued = attempt.started - rcpt.msg.queued_at  # delivered no sooner
        rec.dsn_diag = (f"attempt started {format_time(attempt.started)}; outcome unknown: the"
                        " node stopped before recording the reply (it may have been delivered)")
        with contextlib.suppress(ValueError):
            fill_conn(rec, orjson.loads(attempt.info or "{}"))
        log.warning("outcome unknown: attempt %d to %s (queue id %s) from %s started %s and the"
                    " node stopped before its reply was recorded; recorded as such ('u') and"
                    " delivered again", rcpt.attempts, rcpt.address, rcpt.msg.id,
                    rec.dlv_source_ip or "?", format_time(attempt.started))
        self.record(rec)
        self.spool.update([RecipientUpdate(rcpt.msg.id, rcpt.idx, rcpt.state, rcpt.attempts,
                                           rcpt.next_attempt, rcpt.last_reply)], (rec,))

    def delivered(self, rcpt: Recipient, reply: str, status: str, conn: dict[str, str]) -> None:
        now = self.clock.time()
        rcpt.attempts += 1
        rec = base_record("d", rcpt, now)
        rec.dsn_action, rec.dsn_status, rec.dsn_diag = "relayed", status, f"smtp;{reply}"
        fill_conn(rec, conn)
        lane = self.lane(rcpt.msg.pool, rcpt.domain)
        # a "relayed" DSN owed: the final state waits for its commit, as a failure's does (it
        # was written first: a node killed before the DSN's commit never sent it)
        owed = self._relayed(rcpt, status, reply, conn) if "SUCCESS" in rcpt.notify.upper() \
            else None
        self._final(rcpt, State.DELIVERED, reply, rec, lane=lane, owed=owed)
        if self.health.active:
            self.health.end(self.outage_key(lane))
        if lane.in_backoff(now) and lane.rule is not None and lane.rule.backoff_until_success:
            self._end_backoff(lane, "delivery succeeded")

    def bounced(self, rcpt: Recipient, reply: str, status: str, conn: dict[str, str],
                category: str = "") -> None:
        now = self.clock.time()
        rcpt.attempts += 1
        rec = base_record("b", rcpt, now)
        rec.dsn_action, rec.dsn_status, rec.dsn_diag = "failed", status, f"smtp;{reply}"
        rec.bounce_cat = category or self.classify(status, reply)
        fill_conn(rec, conn)
        owed = self._fail(rcpt, status, reply, conn.get("mx", ""))
        self._final(rcpt, State.BOUNCED, reply, rec, owed=owed)

    def deferred(self, rcpt: Recipient, reply: str, status: str, conn: dict[str, str]) -> None:
        """A temporary failure: retry per the class schedule, or expire past the class expiry."""
        now = self.clock.time()
        rcpt.attempts += 1
        lane = self.lane(rcpt.msg.pool, rcpt.domain)
        cls = self.config.classes.get(rcpt.msg.cls)
        schedule = cls.retry if cls else [300.0]
        delay = schedule[min(rcpt.attempts - 1, len(schedule) - 1)] * random.uniform(0.9, 1.1)
        if wants_backoff(lane.rule, reply):
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
        rec = base_record("t", rcpt, now)
        rec.dsn_action, rec.dsn_status, rec.dsn_diag = "delayed", status, f"smtp;{reply}"
        rec.bounce_cat = self.classify(status, reply)
        fill_conn(rec, conn)
        self.record(rec)
        # a pending action applies next: its records (a delete's DSN commit is urgent) come
        # after this "t" in the trail
        self.spool.update([RecipientUpdate(rcpt.msg.id, rcpt.idx, State.DEFERRED, rcpt.attempts,
                                           rcpt.next_attempt, reply)], (rec,),
                          urgent=bool(rcpt.pending))
        lane.inflight -= 1
        if self.apply_pending(rcpt):  # held or deleted during the delivery: it is now
            return
        lane.deferred += 1
        self.timers.add(rcpt)

    # -- backoff mode ---------------------------------------------------------------------------

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

    # -- final states ---------------------------------------------------------------------------

    def _expire(self, rcpt: Recipient, reply: str, mx: str,
                conn: dict[str, str] | None = None) -> None:
        now = self.clock.time()
        rec = base_record("b", rcpt, now)
        rec.dsn_action, rec.dsn_status, rec.bounce_cat = "failed", "4.4.7", "message-expired"
        rec.dsn_diag = f"smtp;{reply}" if reply else "message expired"
        if conn:
            fill_conn(rec, conn)
        owed = self._fail(rcpt, "4.4.7", reply or "message expired", mx)
        self._final(rcpt, State.EXPIRED, reply, rec, from_heap=False, owed=owed)

    def _suppress(self, rcpt: Recipient, scope: str, diag: str, lane: Lane) -> None:
        """The suppression list stops a recipient intake let through (the entry came while
        the message waited: a complaint, an unsubscribe, another message's hard bounce): an
        "s" record, as at intake, and a DSN to the sender unless only marketing is stopped -
        a notice it was told was accepted went nowhere, and it must learn so (RFC 5321 6.1)."""
        rec = base_record("s", rcpt, self.clock.time())
        rec.dsn_action, rec.dsn_status, rec.dsn_diag = "failed", "5.7.1", diag
        owed = self._fail(rcpt, "5.7.1", diag, "") if scope != "marketing" else None
        self._final(rcpt, State.SUPPRESSED, diag, rec, lane=lane, owed=owed)

    def _final(self, rcpt: Recipient, state: State, reply: str, rec: Record,
               from_heap: bool = True, lane: Lane | None = None,
               owed: Failure | None = None) -> None:
        """``lane``: the recipient's, when the caller has it already; ``owed``: the bounce
        this recipient is reported in. Its final state goes to the spool only once that bounce
        is queued (``Failure.write``): a crash in between delivers it again (its attempt
        journaled, so "outcome unknown" first), never leaves it bounced without its bounce."""
        rcpt.state = state
        rcpt.last_reply = reply
        if from_heap:
            (lane or self.lane(rcpt.msg.pool, rcpt.domain)).inflight -= 1
        self.record(rec)
        msg = rcpt.msg
        update = RecipientUpdate(msg.id, rcpt.idx, state, rcpt.attempts, 0.0, reply)
        if owed is None:
            self._write_final(update, rec)
        else:
            key = (msg.id, rcpt.idx)
            self.unwritten.add(key)
            self.owing[msg.id] = self.owing.get(msg.id, 0) + 1

            def write(spooled: bool = False) -> None:
                if not spooled:
                    self.spool.update([update], (rec,))
                self.unwritten.discard(key)
                self.owing[msg.id] -= 1
                if not self.owing[msg.id]:
                    del self.owing[msg.id]
                    if msg.remaining <= 0:
                        self.spool.finish(msg.id)

            owed.write = write
            owed.final = (update, rec)
        if rcpt.pending:  # after the final state: the trail says why the action did nothing
            self.pending_void(rcpt, state)
        self._unindex(rcpt)
        msg.remaining -= 1
        if msg.remaining <= 0 and msg.id not in self.owing:
            self._finish(msg.id)
        self._left(rcpt)
        if self.on_final is not None:
            self.on_final(rcpt)

    def _relayed(self, rcpt: Recipient, status: str, reply: str,
                 conn: dict[str, str]) -> Failure | None:
        """NOTIFY=SUCCESS (RFC 3461 5.2.2): a "relayed" DSN to the sender when nobody beyond
        will report the delivery to it: the receiver does not offer DSN (the parameters were
        dropped), or its report comes back to this node's VERP return path (recorded "rd").
        The report's entry if one will be sent (the delivery's final state goes with it)."""
        msg = rcpt.msg
        pool = self.config.pools.get(msg.pool)
        if self.on_failures is None or (conn.get("dsn") and not (
                pool is not None and pool.bounce_domain and msg.mail_from)):
            return None
        report = Failure(rcpt, status if status.startswith("2") else "2.0.0", reply,
                         conn.get("mx", ""), action="relayed")
        return report if self.on_failures(msg, [report]) else None

    def _fail(self, rcpt: Recipient, status: str, diag: str, mx: str) -> Failure | None:
        """Report a recipient in a bounce; the ``Failure`` if a bounce will be sent."""
        if self.on_failures is not None and "NEVER" not in rcpt.notify.upper() and (
                not rcpt.notify or "FAILURE" in rcpt.notify.upper()):
            failure = Failure(rcpt, status, diag, mx)
            if self.on_failures(rcpt.msg, [failure]):
                return failure
        return None
