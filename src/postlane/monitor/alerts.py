"""Alerts: fire once, stay active while the condition holds, resolve with a record.

Every fire and resolve is appended to ``alerts.jsonl`` beside the accounting files (the audit
trail of what operators were told, and when) and handed to each notifier: the log, a webhook, and
an e-mail to the operations address sent through the node's own highest-priority class.

Telling is at least once: each notifier is retried with backoff until it succeeds, and only then
is the event marked told on the alert (``notified``; in a cluster also in the ``alerts`` table),
so whichever node evaluates next tells again what its predecessor stored but never told.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import time
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import asdict, dataclass, field
from email.message import EmailMessage
from email.utils import formatdate
from pathlib import Path
from typing import Any

import httpx

from ..maildate import header_date

log = logging.getLogger("postlane.monitor")


@dataclass(slots=True)
class Condition:
    """A rule that currently holds for one class."""

    rule: str
    cls: str
    pool: str
    value: float
    threshold: float
    message: str


@dataclass(slots=True)
class Alert:
    id: str
    rule: str
    cls: str
    pool: str
    message: str
    value: float
    threshold: float
    fired_at: float
    last_seen: float
    resolved_at: float | None = None
    notified: list[str] = field(default_factory=list)
    """The events ("fired", "resolved") every notifier has been told of."""

    def pending(self) -> list[str]:
        """The events decided but not yet told, in order."""
        events = ["fired"] if self.resolved_at is None else ["fired", "resolved"]
        return [e for e in events if e not in self.notified]

    def as_dict(self) -> dict:
        out = asdict(self)
        out["class"] = out.pop("cls")
        out["state"] = "resolved" if self.resolved_at is not None else "active"
        return out


Notifier = Callable[[str, Alert], Coroutine[Any, Any, None]]
"""Called with ("fired" | "resolved", alert); may take its time (runs as its own task). Raises
when the event did not get through: it is called again later."""

Told = Callable[[str, Alert], Awaitable[None]]
"""Records that every notifier has been told ``event`` of ``alert`` (the cluster's store)."""

RETRY_MAX = 600.0
"""The longest wait between two tries of a notifier that keeps failing."""


class Undelivered(Exception):
    """A notifier could not tell its event (for now)."""


class AlertManager:
    def __init__(self, notifiers: list[Notifier], resolve_after: float,
                 journal: Path | None = None, retry_backoff: float = 2.0,
                 state: Path | None = None) -> None:
        self.notifiers = notifiers
        self.resolve_after = resolve_after
        self.journal = journal
        self.state = state
        """On one node: the alerts and what was told of them, kept across a restart (``load``);
        a cluster keeps them in its ``alerts`` table instead."""
        self._unwritable: set[str] = set()
        """Files that could not be written (the disk full): told once until they can."""
        self.retry_backoff = retry_backoff
        """First wait before a failed notifier is tried again (doubled up to ``RETRY_MAX``)."""
        self.told: Told | None = None
        self.active: dict[str, Alert] = {}
        self.history: deque[Alert] = deque(maxlen=200)
        self._tasks: set[asyncio.Task] = set()
        self._telling: dict[tuple[str, float], asyncio.Task] = {}

    def update(self, conditions: list[Condition], now: float) -> list[tuple[str, Alert]]:
        """Fire new conditions, refresh held ones, resolve those clear for ``resolve_after``.
        Returns the ("fired" | "resolved", alert) events for ``emit`` (in a cluster, once they
        are stored: only the evaluating node may tell them)."""
        events: list[tuple[str, Alert]] = []
        seen = set()
        for cond in conditions:
            key = f"{cond.rule}:{cond.cls}"
            seen.add(key)
            alert = self.active.get(key)
            if alert is None:
                alert = Alert(key, cond.rule, cond.cls, cond.pool, cond.message, cond.value,
                              cond.threshold, fired_at=now, last_seen=now)
                self.active[key] = alert
                events.append(("fired", alert))
            else:
                alert.value, alert.message, alert.last_seen = cond.value, cond.message, now
        for key, alert in list(self.active.items()):
            if key not in seen and now - alert.last_seen >= self.resolve_after:
                alert.resolved_at = now
                del self.active[key]
                self.history.append(alert)
                events.append(("resolved", alert))
        return events

    def emit(self, event: str, alert: Alert) -> None:
        """Journal the event and have every notifier told of it (at least once)."""
        if self.journal is not None:
            line = json.dumps({"event": event, "at": time.time(), **alert.as_dict()}) + "\n"
            try:
                fd = os.open(self.journal, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o640)
                try:
                    os.write(fd, line.encode())
                finally:
                    os.close(fd)
            except OSError as exc:  # the page matters more than its journal line
                self._cannot_write(self.journal, exc)
            else:
                self._written(self.journal)
        self.save()
        self._tell(alert)

    def save(self) -> None:
        """Keep the alerts in ``state`` (written aside, synced, renamed): after a restart the
        node tells what it had not told, and resolves what is active no longer."""
        if self.state is None:
            return
        data = json.dumps({"active": [asdict(a) for a in self.active.values()],
                           "history": [asdict(a) for a in self.history]}).encode()
        tmp = self.state.with_name(self.state.name + ".tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                os.write(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, self.state)
        except OSError as exc:  # told once; written again at the next change
            self._cannot_write(self.state, exc)
        else:
            self._written(self.state)

    def load(self, now: float) -> None:
        """The alerts ``save`` kept (one node, at start). An active one counts as seen now: it
        resolves ``resolve_after`` from now if its condition does not hold any more."""
        if self.state is None:
            return
        try:
            saved = json.loads(self.state.read_bytes())
        except FileNotFoundError:
            return
        except (OSError, ValueError) as exc:
            log.error("alert state unreadable, starting without it",
                      extra={"file": str(self.state), "problem": str(exc)})
            return
        for raw in saved.get("active", []):
            alert = Alert(**raw)
            alert.last_seen = now
            self.active[alert.id] = alert
        for raw in saved.get("history", []):
            self.history.append(Alert(**raw))

    def _cannot_write(self, path: Path, exc: OSError) -> None:
        if str(path) not in self._unwritable:
            self._unwritable.add(str(path))
            log.error("alert file cannot be written; alerts are told all the same",
                      extra={"file": str(path), "problem": f"{type(exc).__name__}: {exc}"})

    def _written(self, path: Path) -> None:
        if str(path) in self._unwritable:
            self._unwritable.discard(str(path))
            log.warning("alert file written again", extra={"file": str(path)})

    def resend(self) -> None:
        """Tell what the alerts (adopted from a store) say was decided but never told."""
        for alert in [*self.active.values(), *self.history]:
            for event in alert.pending():
                log.warning("alert event not told yet: telling it now",
                            extra={"alert": alert.id, "event": event})
                self.emit(event, alert)

    def _tell(self, alert: Alert) -> None:
        key = (alert.id, alert.fired_at)
        task = self._telling.get(key)
        if task is not None and not task.done():
            return  # it tells what is pending when it gets there, in order
        task = asyncio.get_running_loop().create_task(self._telling_task(alert))
        self._telling[key] = task
        self._tasks.add(task)
        task.add_done_callback(self._done)

    async def _telling_task(self, alert: Alert) -> None:
        while pending := alert.pending():
            event = pending[0]
            for notify in self.notifiers:
                tries = 0
                while True:
                    try:
                        await notify(event, alert)
                        break
                    except Exception as exc:  # told again later, whatever failed
                        delay = min(self.retry_backoff * 2 ** tries, RETRY_MAX)
                        tries += 1
                        log.warning("alert notification failed, trying again later",
                                    extra={"alert": alert.id, "event": event,
                                           "problem": f"{type(exc).__name__}: {exc}",
                                           "retry_in_s": round(delay, 1), "tries": tries})
                        await asyncio.sleep(delay)
            if self.told is not None:
                try:
                    await self.told(event, alert)
                except Exception as exc:  # told all the same; the next evaluator may retell
                    log.warning("could not record an alert event as told",
                                extra={"alert": alert.id, "event": event,
                                       "problem": f"{type(exc).__name__}: {exc}"})
            alert.notified.append(event)
            self.save()

    def _done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        for key, t in list(self._telling.items()):
            if t is task:
                del self._telling[key]
        if not task.cancelled() and task.exception() is not None:
            log.error("alert notifier failed", exc_info=task.exception())

    async def close(self, timeout: float = 5.0) -> None:
        """Give notifications in flight a moment to go out, then drop them."""
        if self._tasks:
            _, pending = await asyncio.wait(set(self._tasks), timeout=timeout)
            for task in pending:
                task.cancel()


async def log_notifier(event: str, alert: Alert) -> None:
    level = logging.WARNING if event == "fired" else logging.INFO
    log.log(level, f"alert {event}: {alert.message}",
            extra={"alert": alert.id, "class": alert.cls, "value": round(alert.value, 3)})


def webhook_notifier(url: str, node: str, retries: int, backoff: float,
                     timeout: float, cluster: str | None = None) -> Notifier:
    """JSON POST; retried with exponential backoff on errors and non-2xx answers. ``cluster``
    (its schema): the alert is the cluster's, and ``node`` only the one that told it."""

    async def notify(event: str, alert: Alert) -> None:
        payload = {"event": event, "node": node, "cluster": cluster, "alert": alert.as_dict()}
        async with httpx.AsyncClient(timeout=timeout) as client:
            for attempt in range(retries + 1):
                try:
                    resp = await client.post(url, json=payload)
                    if resp.is_success:
                        return
                    problem = f"HTTP {resp.status_code}"
                except httpx.HTTPError as exc:
                    problem = f"{type(exc).__name__}: {exc}"
                if attempt < retries:
                    log.warning("alert webhook failed, retrying",
                                extra={"problem": problem, "attempt": attempt + 1})
                    await asyncio.sleep(backoff * 2 ** attempt)
        log.error("alert webhook failed after its retries", extra={"problem": problem,
                                                                   "alert": alert.id})
        raise Undelivered(problem)

    return notify


def _inert(text: str) -> str:
    """One line the email package writes as it is: an alert's text can name what a DMARC
    report (anyone's XML) calls a domain, and the package decodes RFC 2047 words in a field it
    is given, writing an encoded CR LF out as a field of its own (and raises on a raw one)."""
    text = re.sub(r"[\x00-\x1f\x7f-\x9f]", "?", " ".join(text.split()))
    return text.replace("=?", "= ?") if "=?" in text else text


def mail_notifier(submit: Callable[[bytes], Awaitable[str]], node: str, sender: str,
                  to: str, cluster: str | None = None) -> Notifier:
    """An e-mail per fire/resolve, queued through the node itself (``submit`` picks the
    highest-priority class), so it gets the same delivery guarantees as a policy notice.
    ``cluster``: the alert is that cluster's, told by ``node``."""
    where = f"cluster {cluster}" if cluster else node
    on = f"in cluster {cluster} (told by node {node})" if cluster else f"on node {node}"

    async def notify(event: str, alert: Alert) -> None:
        msg = EmailMessage()
        msg["From"] = sender
        msg["To"] = to
        msg["Date"] = header_date()
        msg["Subject"] = _inert(f"[postlane {where}] {event.upper()}: {alert.message}")
        when = alert.fired_at if event == "fired" else alert.resolved_at
        msg.set_content(
            f"Alert {alert.id} {event} {on} at {formatdate(when, usegmt=True)}.\n\n"
            f"{alert.message}\n\nclass: {alert.cls}\npool: {alert.pool}\n"
            f"value: {alert.value:.3f}\nthreshold: {alert.threshold:.3f}\n")
        await submit(msg.as_bytes())

    return notify
