"""One Postlane node: wires edge, policy, spool, scheduler, relay and accounting together."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import gc
import logging
import os
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Collection, Coroutine, Sequence
from typing import Any, TypeVar

from .accounting.records import Record
from .api.parts import NodeParts
from .api.server import APIServer
from .audit.recorder import Recorder
from .audit.service import AuditService
from .config import Config
from .edge.auth import Authenticator
from .edge.smtp import Listener
from .edge.tls import Certificates, ServerCertificate
from .feedback.categories import Classifier
from .feedback.complaints import ComplaintRates, SharedRates
from .feedback.dsn import FailedRecipient, build_bounce, should_bounce
from .feedback.service import FeedbackService
from .feedback.shared_suppression import SuppressionSync
from .health import Health
from .monitor.activity import Activity
from .monitor.monitor import Monitor
from .operations import Operations, Suppressions
from .policy.dkim import KeyRing, Signer
from .policy.intake import Intake, RcptIn, Rejection
from .relay.deliver import Relay
from .relay.mx import MXResolver
from .relay.tlsrpt import TLSReports
from .reputation.metrics import ReputationCollector
from .reputation.service import ReputationService
from .scheduler.claim import Claimer
from .scheduler.control import QueueControl
from .scheduler.paging import Pager
from .scheduler.scheduler import Failure, Scheduler
from .scheduler.view import QueueView
from .spool import (
    Message,
    PostgresSpool,
    SpoolUnavailable,
    SQLiteSpool,
    local_dir,
    make_spool,
)
from .workers.pool import WorkerPool, worker_count

log = logging.getLogger("postlane.node")

T = TypeVar("T")


class Node:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.health = Health()
        """Degraded states (low disk, database away, key missing, destination down)."""
        self.spool = make_spool(config.node.spool, config.cluster.schema_name, config.node.name,
                                self.health)
        self.audit = AuditService(config) if config.audit.enabled else None
        self.recorder = Recorder(config, self.spool,
                                 self.audit.location if self.audit is not None else None,
                                 self.audit.stored if self.audit is not None else None,
                                 self.health)
        complaints = ComplaintRates.for_config(config.feedback)
        self.reputation = ReputationService(config, complaints)
        self.feedback = FeedbackService(config, self.persist, rates=complaints,
                                        dmarc=self.reputation,
                                        origin=self.audit.received if self.audit else None,
                                        reported=self._reported, sent_as=self._sent_as)
        self.resolver = MXResolver(config.dns.nameserver, config.dns.port, config.dns.timeout,
                                   dnssec=config.dns.dnssec)
        # the relay counts TLS sessions for the reports, the scheduler drives the relay and the
        # intake feeds the scheduler: the reports mail through the intake built after them
        self.tls_reports = (TLSReports(config, self.resolver, local_dir(config) / "tlsrpt.sqlite3",
                                       submit=self._submit)
                            if config.tlsrpt.enabled else None)
        self.relay = Relay(config, self.spool, self.resolver, self.tls_reports,
                           envelope_sender=self.feedback.envelope_sender)
        self.scheduler = Scheduler(config, self.spool, self.emit, self._on_failures,
                                   relay=self.relay, health=self.health,
                                   classify=self.feedback.classify,
                                   screen=self.feedback.at_delivery)
        self.queue = QueueControl(self.scheduler, config.pools, config.classes,
                                  self.spool if isinstance(self.spool, PostgresSpool) else None)
        self.stop_requested = asyncio.Event()
        """Set by a signal or by an operator's cluster drain: ``run`` then drains and exits."""
        self.claimer = (Claimer(config, self.spool, self.scheduler, self.stop_requested.set,
                                feedback_key=self.feedback.key_id)
                        if isinstance(self.spool, PostgresSpool) else None)
        self.suppression_sync = (SuppressionSync(self.spool, self.feedback.writes)
                                 if isinstance(self.spool, PostgresSpool) else None)
        """One suppression list for the cluster: this node's copy follows the shared log."""
        self.shared_rates = (SharedRates(self.spool, complaints, config.node.name,
                                         config.cluster.dead_after)
                             if isinstance(self.spool, PostgresSpool) else None)
        """Complaint rates counted over the cluster's live nodes."""
        self.signer = (Signer(config, self.persist, health=self.health) if config.dkim.keys
                       else None)
        self.intake = Intake(config, self.spool, self.claimer or self.scheduler, self.emit,
                             self.signer, self.health, feedback=self.feedback,
                             audit_behind=self.recorder.behind)
        self.certificates = Certificates(config)
        self.auth = Authenticator.of(self.intake.users, config.security)
        """SMTP AUTH, shared by the listeners: its cap on password checks is node-wide."""
        self.listeners = [Listener(name, lc, self.intake, config.node.hostname,
                                   self.certificates.for_listener(name), self.auth)
                          for name, lc in config.listeners.items()]
        self.view = QueueView(self.scheduler)
        """The queue, read-only (monitor, API, status)."""
        self.workers = (WorkerPool(self, worker_count(config.node.workers))
                        if worker_count(config.node.workers) > 1 else None)
        """SMTP intake in worker processes (``[node] workers`` > 1); None: in this process."""
        self.monitor = Monitor(config, self.spool, self.view, self.intake.submit, self.status,
                               self.health, conditions=[self.reputation.conditions],
                               collectors=[ReputationCollector(self.reputation)])
        self.activity = Activity()
        self._listeners: list[Callable[[Record], None]] = [
            self.feedback.on_record, self.monitor.on_record, self.reputation.on_record,
            self.activity.on_record]
        """In-memory observers of every record, told in this order at once, on the loop; the
        durable copy goes through the spool and the recorder."""
        self.operations = Operations(config, self.scheduler, self.queue, self.spool,
                                     Suppressions(self.feedback.suppression, self.persist),
                                     self.feedback.writes, self.emit, self.bounces_pending,
                                     self.holds)
        """Every operator action goes through here, on the record (the API calls it)."""
        if self.claimer is not None:  # "retry now" sent to another node: this node's share
            self.claimer.retries_by(self.operations.retry_asked)
        self.api = APIServer(NodeParts(
            config, self.intake.submit, self.status, self.monitor, self.operations,
            self.activity, self.view, self.queue, self.spool, self.feedback, self.reputation,
            self.audit is not None)) if config.api.enabled else None
        self.started_at = 0.0
        self._failures: dict[str, tuple[Message, list[Failure]]] = {}
        self._bounces: dict[str, set[asyncio.Task[bool]]] = {}
        """Per queue id, its DSNs being queued (``_send_bounce``): a delete with a DSN is
        answered once they are done (``Operations.queue``)."""
        self._background: set[asyncio.Task] = set()
        self._disk_watch: asyncio.Task | None = None
        self._orphan_pools: set[str] = set()
        """Pools the resumed queue has mail for and the config no longer has (``_orphans``)."""
        self._tls_tasks: list[asyncio.Task] = []
        self.stopped = asyncio.Event()
        self._stopping = False

    def emit(self, rec: Record) -> None:
        """Tell the in-memory observers about a record whose event the caller has put into a
        spool write (with the state change it describes)."""
        for fn in self._listeners:
            try:
                fn(rec)
            except Exception:  # a broken observer must not stop mail or its evidence
                log.exception("record observer %r failed", fn)

    def _submit(self, *args: Any, **kwargs: Any) -> Awaitable[str]:
        """``Intake.submit``, for a part built before the intake (the TLS reports)."""
        return self.intake.submit(*args, **kwargs)

    def persist(self, rec: Record) -> None:
        """A record that goes with no state change of the spool (a complaint, a refusal):
        an event of its own, durable at the next commit."""
        self.spool.record([rec])
        self.emit(rec)

    async def start(self) -> None:
        """Open the spool, resume every queued message, then open the listeners. If a part
        cannot start (a listener's port is taken, the database is away), what was opened is
        closed again, in reverse order, before the error is raised."""
        async with contextlib.AsyncExitStack() as opened:
            opened.push_async_callback(asyncio.to_thread, self.feedback.close)  # its thread
            await self.spool.open()
            opened.push_async_callback(self.spool.close)
            if self.audit is not None:
                await self.audit.start()
                opened.push_async_callback(self.audit.stop)
            await self.recorder.start()
            opened.push_async_callback(self.recorder.stop)
            if self.signer is not None:
                await self.signer.start()
                opened.push_async_callback(self.signer.stop)
            self.scheduler.resume_paused(await self.spool.paused())
            await self.operations.record_pending()  # a list change killed before its record
            resumed = 0
            if self.claimer is not None:
                await self.claimer.start()
                opened.push_async_callback(self.claimer.close)
            if self.suppression_sync is not None:  # before the listeners: the list is current
                await self.suppression_sync.start()
                opened.push_async_callback(self.suppression_sync.stop)
            if self.shared_rates is not None:
                await self.shared_rates.start()
                opened.push_async_callback(self.shared_rates.stop)
            elif isinstance(self.spool, SQLiteSpool) and not self.scheduler.fifo:
                # deep lanes stay in the spool: deferred and held recipients come into memory,
                # queued ones are counted and read in as their lanes drain (scheduler/paging.py)
                pager = Pager(self.scheduler, self.spool)
                self.scheduler.use_pager(pager)
                sla = [name for name, cls in self.config.classes.items() if cls.sla is not None]
                found = await self.spool.resume(sla)
                resumed = pager.resume(found)
                self.monitor.seed(found.classes, found.outstanding, time.time())
            else:
                pending = await self.spool.pending()
                resumed = len(pending.recipients)
                for rcpt in pending.recipients:
                    self.scheduler.add(rcpt)
            await self.reputation.start()
            opened.push_async_callback(self.reputation.stop)
            await self.monitor.start()
            opened.push_async_callback(self.monitor.stop)
            if self.api is not None:
                await self.api.start()
                opened.push_async_callback(self.api.stop)
            if self.workers is not None:  # the workers accept; this process binds
                for listener in self.listeners:
                    opened.push_async_callback(listener.stop, 0.0)
                await self.workers.start()
                opened.push_async_callback(self.workers.stop, self.config.node.drain_timeout)
            # Everything made so far lives as long as the node (modules, config, parts, a
            # resumed queue): out of the cyclic collector's full walks. A full collection walks
            # every tracked object with the loop stopped: 62 ms for an empty node's 110,000,
            # 300 ms with 200,000 recipients in memory (benchmarks/deep_queue.py, 2026-12-06).
            gc.collect()
            gc.freeze()
            for listener in self.listeners if self.workers is None else ():
                try:
                    await listener.start()
                except OSError as exc:  # say which listener of the config, not a traceback
                    lc = listener.config
                    raise OSError(exc.errno, f"listener {listener.name!r} (listeners."
                                             f"{listener.name} in the config) cannot listen on"
                                             f" {lc.address}:{lc.port}:"
                                             f" {os.strerror(exc.errno or 0)}") from None
                opened.push_async_callback(listener.stop, 0.0)
            opened.pop_all()  # all open: ``stop`` closes them from now on
        self.started_at = time.time()
        loop = asyncio.get_running_loop()
        self._disk_watch = loop.create_task(self._watch_disk())
        self._tls_tasks.append(loop.create_task(self.certificates.watch()))
        if self.tls_reports is not None:
            self._tls_tasks.append(loop.create_task(self.tls_reports.run()))
        log.info("node started", extra={"resumed": resumed})
        # pools are fixed until a restart (a reload keeps them): only a resumed queue has these
        self._orphan_pools = {pool for pool, _ in self.scheduler.lanes} - set(self.config.pools)
        self._orphans()
        if isinstance(self.spool, SQLiteSpool) and self.spool.unclean:
            log.warning("recovered after an unclean stop (crash, SIGKILL or power loss):"
                        " %d recipients not yet final queued again, %d records of the stopped"
                        " run written on to the audit store and accounting files; each attempt"
                        " whose outcome is unknown is logged ('outcome unknown') and delivered"
                        " again", resumed, self.spool.backlog)

    def reload(self, new: Config, *, certificates: Sequence[ServerCertificate],
               keyring: KeyRing | None, classifier: Classifier) -> None:
        """Take over what a reload changes in place (admin/service.py): from ``new``, and from
        the parts already built and checked from it, so nothing here fails half-way: the
        listeners' ``certificates`` (re-read if their files changed), the DKIM ``keyring``
        (None: signing keeps its keys), the bounce rules' ``classifier``; classes (same pool),
        destination rules, routes and classification go into the running config."""
        cfg = self.config
        for entry in certificates:
            entry.reload_if_changed()  # new handshakes get it; open sessions keep theirs
        if keyring is not None and self.signer is not None:
            self.signer.use_keyring(keyring)
            cfg.dkim.keys = new.dkim.keys  # the rest waits for a restart (reload says so)
        for name, cls in new.classes.items():
            if name in cfg.classes and cls.pool == cfg.classes[name].pool:
                cfg.classes[name] = cls
        cfg.destinations, cfg.default_destinations = new.destinations, new.default_destinations
        self.scheduler.apply_rules(new.destinations)
        cfg.routes, cfg.classification = new.routes, new.classification
        cfg.default_class, cfg.correlation_header = new.default_class, new.correlation_header
        self.feedback.use_classifier(classifier)  # the scheduler's records follow it
        cfg.feedback.bounce_rules = new.feedback.bounce_rules

    async def _watch_disk(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            self.intake.disk.ok()  # low disk ends (and is logged) when space returns, mail or not
            if self._orphan_pools:
                self._orphans()

    def _orphans(self) -> None:
        """Mail queued for a pool the config no longer has cannot go anywhere (its source IPs
        are gone, and another pool's would break the separation): a degraded state for each
        such pool while it holds mail, so it is told and seen (log, status, metrics), and
        the queue commands may name the pool to remove it."""
        depth: Counter[str] = Counter()
        for (pool, _), lane in self.scheduler.lanes.items():
            if pool in self._orphan_pools:
                depth[pool] += lane.depth()
        for pool, n in depth.items():
            key = f"orphan-pool:{pool}"
            if n and key not in self.health.active:
                self.queue.pools.add(pool)
                self.health.begin(
                    key, "queue", f"{n} recipients queued for pool {pool!r}, which the config"
                    " no longer has", cause="the pool was removed from the config",
                    effect=f"they wait until the pool is back (restart with it), or are removed"
                    f" (postlane purge {pool} DOMAIN, postlane queue delete --pool {pool})",
                    unit=None)
        for key in [k for k in self.health.active if k.startswith("orphan-pool:")]:
            if not depth[key.partition(":")[2]]:
                self.health.end(key)

    async def stop(self) -> None:
        """Drain: refuse new mail with 421, let in-flight deliveries finish, close the spool.
        A second call (a signal during a drain) waits for the first instead of closing twice."""
        if self._stopping:
            await self.stopped.wait()
            return
        self._stopping = True
        clock = asyncio.get_running_loop().time
        deadline = clock() + self.config.node.drain_timeout

        def left() -> float:  # one drain_timeout for the whole drain (TimeoutStopSec follows
            return max(deadline - clock(), 1.0)  # it), deliveries running all along

        await asyncio.gather(*(listener.stop(left()) for listener in self.listeners))
        if self.workers is not None:  # they finish their transfers, committed here
            await self.workers.stop(left())
        if self.api is not None:
            await self.api.stop()
        if self.claimer is not None:
            self.claimer.stop_claiming()
        await self.scheduler.drain(left())
        if self.scheduler.pager is not None:
            self.scheduler.pager.close()
        if self._background:
            await asyncio.wait(set(self._background), timeout=10)
        if self._disk_watch is not None:
            self._disk_watch.cancel()
        for task in self._tls_tasks:
            task.cancel()
        if self.tls_reports is not None:
            await asyncio.to_thread(self.tls_reports.close)
        if self.signer is not None:
            await self.signer.stop()
        await self.monitor.stop()
        await self.reputation.stop()
        try:
            await self.spool.flush()
        except RuntimeError as exc:  # the database is away: a crash would lose the same writes
            log.error("last spool writes failed: %s", exc)
        await self.recorder.stop()  # writes every event on, then reports what to trim
        if self.suppression_sync is not None:  # pushes this node's last changes
            await self.suppression_sync.stop()
        if self.shared_rates is not None:
            await self.shared_rates.stop()
        if self.claimer is not None:
            await self.claimer.close()
        await self.spool.close()
        await asyncio.to_thread(self.feedback.close)  # waits for the list's writer thread
        if self.audit is not None:
            await self.audit.stop()
        self.stopped.set()

    async def flush_evidence(self) -> None:
        """Wait until every record so far is in the audit store and the accounting files (and
        the spool has dropped the events they hold), and their suppressions are written."""
        await self.feedback.flush()
        await self.spool.flush()
        await self.recorder.flush()
        await self.spool.flush()  # the trim the recorder's last progress asked for

    # -- bounces --------------------------------------------------------------------------------

    def _on_failures(self, msg: Message, failures: list[Failure]) -> bool:
        """Collect a message's failed recipients; one DSN per message per loop turn. Whether
        a DSN will be sent."""
        if not should_bounce(msg.mail_from):
            return False
        entry = self._failures.get(msg.id)
        if entry is None:
            self._failures[msg.id] = (msg, list(failures))
            task = self._spawn(self._send_bounce(msg.id))
            self._bounces.setdefault(msg.id, set()).add(task)
            task.add_done_callback(functools.partial(self._bounce_done, msg.id))
        else:
            entry[1].extend(failures)
        return True

    def _bounce_done(self, msg_id: str, task: asyncio.Task[bool]) -> None:
        tasks = self._bounces.get(msg_id)
        if tasks is not None:
            tasks.discard(task)
            if not tasks:
                del self._bounces[msg_id]

    async def holds(self, rec: Record, data: bytes) -> bool:
        """Whether ``rec`` (packed: ``data``) is on the record already. The spool is asked
        first: it lets an event go only once the store (and the files) hold it, so one not
        found there and not in the store was never committed. Without an audit store, only
        the spool can tell."""
        if await self.spool.has_event(data):
            return True
        return self.audit is not None and await self.audit.holds(rec)

    async def _reported(self, queue_id: str) -> set[tuple[str, str]]:
        """(recipient, action) of the remote reports ("rb", "rd") and complaints ("f": the
        feedback type) of ``queue_id`` on the record: the outbox first, then the store (the
        recorder lets an event go only once the store holds it, so one read between the two
        is in one of them). In a cluster the outbox is every node's: a killed node's records
        wait there for adoption."""
        found = {(rec.rcpt.lower(), rec.dsn_action)
                 for rec in await self.spool.events_naming(queue_id)
                 if rec.type in ("rb", "rd", "f") and rec.queue_id == queue_id}
        if self.audit is not None:
            found.update((row["rcpt"].lower(), row["dsn_action"])
                         for row in await self.audit.records(queue_id)
                         if row["type"] in ("rb", "rd", "f"))
        return found

    async def _sent_as(self, message_id: str, rcpts: Sequence[str]) -> list[dict]:
        """The "r" records (audit store columns) of the messages whose Message-ID is
        ``message_id``, oldest first: the outbox, then the store, as ``_reported`` (a
        complaint without our VERP names its message by that alone). The store is asked for
        those to ``rcpts`` first (``AuditService.sent_as``)."""
        found = {(rec.queue_id, rec.rcpt.lower()): dataclasses.asdict(rec)
                 for rec in await self.spool.events_naming(message_id)
                 if rec.type == "r" and rec.message_id == message_id}
        if self.audit is not None:
            found.update(((row["queue_id"], (row["rcpt"] or "").lower()), row)
                         for row in await self.audit.sent_as(message_id, rcpts))
        return sorted(found.values(), key=lambda row: (row["time_logged"], row["queue_id"]))

    def bounces_pending(self, msg_ids: Collection[str]) -> list[asyncio.Future[bool]]:
        """The DSNs of these messages being queued (their final states are handed to the
        spool after them): ``Operations`` waits for them before it answers a delete."""
        return [task for qid in msg_ids for task in self._bounces.get(qid, ())]

    async def _send_bounce(self, msg_id: str) -> bool:
        """Queue the DSN, then write its recipients' final states. A DSN the intake cannot
        take now (the spool failing, a 4xx) is tried again, 1 s, 2 s ... 60 s apart: written
        final without it, the sender would never be told. A node stopping meanwhile leaves
        them not final (delivered, and so bounced, again after its restart): False."""
        msg, failures = self._failures.pop(msg_id)
        delay = 1.0
        carried = False
        """Whether the DSN's commit carried the final states (one commit: a node killed after
        it sends no second DSN; written after it, a kill between delivered the recipients
        again and bounced them again)."""
        while True:
            try:
                await self._bounce(msg, failures)
                carried = True
                break
            except (SpoolUnavailable, Rejection) as exc:
                if isinstance(exc, Rejection) and exc.code >= 500:
                    log.error("bounce for queue id %s refused (%s): its sender is not told",
                              msg.id, exc)
                    break
                if self._stopping:
                    log.warning("bounce for queue id %s not queued before the stop (%s): its"
                                " recipients stay not final and are tried again", msg.id, exc)
                    return False
                log.warning("bounce for queue id %s not queued (%s); trying again in %gs",
                            msg.id, exc, delay)
                await asyncio.sleep(delay)
                delay = min(60.0, delay * 2)
            except Exception:  # a report that cannot be built: said, not a task's traceback
                log.exception("bounce for queue id %s could not be built: its sender is not"
                              " told", msg.id)
                break
        for failure in failures:  # the DSN is durable (or refused): the final states now
            if failure.write is not None:
                failure.write(carried and failure.final is not None)
        return True

    async def _bounce(self, msg: Message, failures: list[Failure]) -> None:
        try:
            body = await self.spool.load_body(msg.id)  # read off the loop if not cached
        except KeyError:
            body = b""
        report = build_bounce(
            reporting_mta=self.config.node.hostname, sender=msg.mail_from,
            recipients=[FailedRecipient(address=f.rcpt.address, action=f.action, status=f.status,
                                        diagnostic=f.diag, remote_mta=f.remote_mta,
                                        orcpt=f.rcpt.orcpt, last_attempt=time.time())
                        for f in failures],
            original=body, arrival_date=msg.queued_at, envid=msg.envid, ret=msg.ret or "HDRS",
            queue_id=msg.id, postmaster=self.config.node.postmaster)
        await self.intake.submit(
            "", [RcptIn(msg.mail_from, "NEVER")], report, listener="dsn",
            src_type="dsn", forced_class=msg.cls,
            finals=[f.final for f in failures if f.final is not None])

    def _spawn(self, work: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
        """Run ``work`` beside the node; a drain waits for it."""
        task = asyncio.get_running_loop().create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    # -- introspection --------------------------------------------------------------------------

    def status(self) -> dict:
        now = time.time()
        lanes = self.view.lane_rows(now)
        pools = self.view.pool_rows(lambda name: self.config.pools[name].pausable)
        listeners = []
        for listener in self.listeners:
            lc, cert = listener.config, listener.handler.guard.certificate
            listeners.append({
                "name": listener.name, "address": lc.address, "tls": lc.tls,
                "port": listener.port if listener.server is not None else lc.port,
                "require_tls": lc.require_tls, "require_auth": lc.require_auth,
                "relay_without_auth": [] if lc.require_auth else list(lc.relay_from),
                "connections": listener.handler.guard.connections.open,
                "certificate": cert.describe() if cert is not None else None})
        # queued: what this node holds (on one node its whole queue; in a cluster what it has
        # claimed - the shared queue is under "cluster")
        # the API answers before the listeners are open (with intake workers, seconds before):
        # "starting" until they are, so that waiting for `postlane status` waits for SMTP too
        out = {"node": self.config.node.name, "starting": not self.started_at,
               "uptime_s": round(now - self.started_at, 1) if self.started_at else 0.0,
               "queued": self.scheduler.queued(), "accepted": self.intake.accepted,
               "listeners": listeners, "pools": pools, "lanes": lanes,
               "degraded": self.health.states(),
               "dkim": dataclasses.asdict(self.signer.stats if self.workers is None
                                          else self.workers.signer_stats(self.signer.stats))
               if self.signer else None}
        if self.claimer is not None:
            out["cluster"] = {"schema": self.config.cluster.schema_name,
                              "claimed_total": self.claimer.claimed,
                              "taken_over_total": self.claimer.taken_over,
                              "draining": self.claimer.draining,
                              "fenced": self.claimer.fenced,
                              "paused": sorted(f"{p}/{d}" for p, d in self.scheduler.paused),
                              "evaluator": self.monitor.cluster is not None
                              and self.monitor.cluster.leader}
        return out


