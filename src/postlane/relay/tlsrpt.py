"""SMTP TLS Reporting (RFC 8460): what every delivery session's TLS came to, per recipient
domain and day, sent once a day to the domains that ask for it.

Each session is counted under the policy that applied to it (``sts``, ``tlsa`` or
``no-policy-found``) as a success or a failure of one result type (``certificate-expired``,
``starttls-not-supported``, ``tlsa-invalid`` ...). Counts live in memory and are added to a
small SQLite file in the node's folder every minute and at stop, so a restart keeps the day.
Shortly after a UTC day ends (at a random moment within ``tlsrpt.send_delay``, as the RFC asks,
so that senders do not all report at once) the node looks up each domain's ``_smtp._tls`` TXT
record and sends its report, gzip JSON, to every ``rua``: ``mailto:`` through the node's own
queue and pools (class ``tlsrpt.class``), ``https:`` as a POST. Domains without the record get
no report; their counts are dropped with the day.
"""

from __future__ import annotations

import asyncio
import datetime
import gzip
import json
import logging
import random
import re
import sqlite3
import ssl
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from email.mime.application import MIMEApplication
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText
from email.utils import make_msgid
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import unquote, urlsplit

import httpx

from ..address import PathError, parse_path
from ..config import Config
from ..maildate import header_date
from ..secretfile import private_file
from .mx import DNSTempError, MXResolver, txt_strings

if TYPE_CHECKING:
    from ..spool import Message

log = logging.getLogger("postlane.tlsrpt")

REPORT_LISTENER = "tlsrpt"
"""The ``listener`` of the messages this module queues: the mark, kept in the spool with the
message, by which the relay sends a mailed report under its relaxed TLS policy (``is_report``);
no configured listener may take the name (config/load.py)."""


def is_report(msg: Message) -> bool:
    """Whether ``msg`` is a TLS-RPT report this node queued (RFC 8460 3: delivered despite
    TLS failures, its sessions not counted; relay/tlspolicy.py)."""
    return msg.listener == REPORT_LISTENER

__all__ = ["NO_POLICY", "PolicyRef", "TLSReports"]

FLUSH_EVERY = 60.0
POST_TIMEOUT = 30.0
"""Seconds an HTTPS ``rua`` has to take a report and answer, all told."""
MAX_RUA = 10
"""The ``rua`` targets of a domain that get its report: RFC 8460 sets no limit, and a
record listing hundreds of anyone's addresses had the node mail each of them daily."""
_VERSION = re.compile(r"v=TLSRPTv1[ \t]*;")  # RFC 8460 3: "v=TLSRPTv1" then field-delim


@dataclass(frozen=True, slots=True)
class PolicyRef:
    """The policy a session was made under, as RFC 8460 names it."""

    type: str  # sts | tlsa | no-policy-found
    strings: tuple[str, ...] = ()
    mx: tuple[str, ...] = ()


NO_POLICY = PolicyRef("no-policy-found")

# (day, domain, policy type, policy strings, policy mx, result ("" = success), sending IP,
#  MX host, receiving IP, reason)
_Key = tuple[str, str, str, str, str, str, str, str, str, str]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
  day TEXT, domain TEXT, policy_type TEXT, policy_strings TEXT, policy_mx TEXT, result TEXT,
  sending_ip TEXT, mx_host TEXT, receiving_ip TEXT, reason TEXT, count INTEGER,
  PRIMARY KEY (day, domain, policy_type, policy_strings, policy_mx, result, sending_ip,
               mx_host, receiving_ip, reason));
"""


def _day(ts: float) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(ts))


class TLSReports:
    """Counts sessions and sends the daily reports."""

    def __init__(self, config: Config, resolver: MXResolver, path: Path,
                 submit: Callable[..., Awaitable[str]] | None = None) -> None:
        self.config = config
        self.resolver = resolver
        self.path = path
        self.submit = submit
        """``Intake.submit``: mailed reports go through the node's own queue."""
        self._counts: Counter[_Key] = Counter()
        self._down = False
        """The file could not be written at the last round (told once)."""
        host = config.node.hostname
        rpt = config.tlsrpt
        self.organization = rpt.organization or host
        self.contact = rpt.contact or f"postmaster@{host}"
        self.mail_from = rpt.mail_from or f"noreply-tlsrpt@{host}"
        self._ssl = ssl.create_default_context(cafile=config.relay.ca_file)

    # -- counting ---------------------------------------------------------------------------

    def session(self, domain: str, policy: PolicyRef, mx: str, sending_ip: str,
                receiving_ip: str, failure: str = "", reason: str = "") -> None:
        """Count one session: a success (``failure`` "") or a failure of that result type."""
        self._counts[(_day(time.time()), domain, policy.type, json.dumps(policy.strings),
                      json.dumps(policy.mx), failure, sending_ip if failure else "",
                      mx if failure else "", receiving_ip if failure else "",
                      reason[:200] if failure else "")] += 1

    def fetch_error(self, domain: str, result: str, message: str) -> None:
        """An MTA-STS policy that could not be fetched or used (``mtasts.py``)."""
        self.session(domain, PolicyRef("sts"), "", "", "", result, message)

    def _db(self) -> sqlite3.Connection:
        db = sqlite3.connect(private_file(self.path))  # recipient domains: 0600, as all state
        db.executescript(_SCHEMA)
        return db

    def flush(self) -> None:
        """Add the counts in memory to the file (blocking: call it in a thread). If the file
        cannot take them (the disk full) they stay in memory for the next flush."""
        counts, self._counts = self._counts, Counter()
        if not counts:
            return
        try:
            db = self._db()
            try:
                with db:
                    db.executemany(
                        "INSERT INTO sessions VALUES (?,?,?,?,?,?,?,?,?,?,?) ON CONFLICT DO"
                        " UPDATE SET count = count + excluded.count",
                        [(*key, n) for key, n in counts.items()])
            finally:
                db.close()
        except BaseException:
            self._counts.update(counts)  # with what was counted meanwhile
            raise

    def close(self) -> None:
        """The last flush, at stop (blocking): a file that cannot be written (the disk full)
        costs the counts since the last flush, told in one line - the node still stops."""
        try:
            self.flush()
        except (OSError, sqlite3.OperationalError) as exc:
            log.error("TLS report counts since the last minute not saved to %s (%s): the"
                      " reports of today miss them", self.path, exc)

    # -- reports ----------------------------------------------------------------------------

    def report(self, day: str, domain: str) -> dict | None:
        """The RFC 8460 report of one domain and UTC day, from the counts flushed so far."""
        db = self._db()
        rows = db.execute(
            "SELECT policy_type, policy_strings, policy_mx, result, sending_ip, mx_host,"
            " receiving_ip, reason, count FROM sessions WHERE day = ? AND domain = ?"
            " ORDER BY policy_type, policy_strings, result", (day, domain)).fetchall()
        db.close()
        if not rows:
            return None
        policies: dict[tuple[str, str, str], dict] = {}
        for ptype, strings, mx, result, sip, host, rip, reason, count in rows:
            entry = policies.get((ptype, strings, mx))
            if entry is None:
                policy = {"policy-type": ptype, "policy-domain": domain}
                if json.loads(strings):
                    policy["policy-string"] = json.loads(strings)
                if json.loads(mx):
                    policy["mx-host"] = json.loads(mx)
                entry = policies[(ptype, strings, mx)] = {
                    "policy": policy, "summary": {"total-successful-session-count": 0,
                                                  "total-failure-session-count": 0},
                    "failure-details": []}
            if not result:
                entry["summary"]["total-successful-session-count"] += count
                continue
            entry["summary"]["total-failure-session-count"] += count
            detail = {"result-type": result, "failed-session-count": count}
            for field, value in (("sending-mta-ip", sip), ("receiving-mx-hostname", host),
                                 ("receiving-ip", rip), ("failure-reason-code", reason)):
                if value:
                    detail[field] = value
            entry["failure-details"].append(detail)
        for entry in policies.values():
            if not entry["failure-details"]:
                del entry["failure-details"]
        return {"organization-name": self.organization,
                "date-range": {"start-datetime": f"{day}T00:00:00Z",
                               "end-datetime": f"{day}T23:59:59Z"},
                "contact-info": self.contact,
                "report-id": f"{day}_{domain}@{self.config.node.hostname}",
                "policies": list(policies.values())}

    async def send_due(self, before: str | None = None) -> int:
        """Send the reports of every day before ``before`` (default: today, UTC) and forget
        those days; returns the number of reports sent."""
        await asyncio.to_thread(self.flush)
        before = before or _day(time.time())

        def pending() -> list[tuple[str, str]]:
            db = self._db()
            rows = db.execute("SELECT DISTINCT day, domain FROM sessions WHERE day < ?",
                              (before,)).fetchall()
            db.close()
            return rows

        sent = 0
        for day, domain in await asyncio.to_thread(pending):
            report = await asyncio.to_thread(self.report, day, domain)
            try:
                targets = await self._rua(domain)
            except DNSTempError as exc:
                log.warning("TLS report for %s not sent, retried later: %s", domain, exc)
                continue
            if report is not None and targets:
                sent += await self._send(day, domain, report, targets)
            await asyncio.to_thread(self._forget, day, domain)
        return sent

    def _forget(self, day: str, domain: str) -> None:
        with self._db() as db:
            db.execute("DELETE FROM sessions WHERE day = ? AND domain = ?", (day, domain))
        db.close()

    async def _rua(self, domain: str) -> list[str]:
        """The ``rua`` URIs of ``_smtp._tls.DOMAIN`` (RFC 8460 3)."""
        records, _ = await self.resolver.records(f"_smtp._tls.{domain}", "TXT")
        texts = [text.decode("utf-8", "replace") for text in txt_strings(records)]
        ours = [t for t in texts if _VERSION.match(t)]  # not "v=TLSRPTv10", a later version
        if len(ours) != 1:
            return []
        fields = dict(part.strip().partition("=")[::2] for part in ours[0].split(";"))
        uris = [uri.strip() for uri in fields.get("rua", "").split(",") if uri.strip()]
        if len(uris) > MAX_RUA:
            log.warning("TLS report for %s: %d rua targets, only the first %d used", domain,
                        len(uris), MAX_RUA)
        return uris[:MAX_RUA]

    async def _send(self, day: str, domain: str, report: dict, targets: list[str]) -> int:
        data = gzip.compress(json.dumps(report).encode())
        start = int(datetime.datetime.fromisoformat(f"{day}T00:00:00+00:00").timestamp())
        filename = (f"{self.config.node.hostname}!{domain}!{start}!{start + 86399}"
                    f".json.gz")
        sent = 0
        for uri in targets:
            try:  # urlsplit too: it raises ValueError for "https://[::1"
                scheme = urlsplit(uri).scheme.lower()
                if scheme == "mailto":
                    address = _mailto(uri)
                    if address is None:
                        log.warning("TLS report for %s: rua %r is not an address", domain,
                                    uri[:300])
                        continue
                    await self._mail(address, domain, report, data, filename)
                elif scheme == "https":
                    await self._post(uri, data)
                else:
                    log.warning("TLS report for %s: unsupported rua %r", domain, uri[:300])
                    continue
            except Exception as exc:  # one failed target does not stop the others
                log.warning("TLS report for %s to %r failed: %s", domain, uri[:300], exc)
                continue
            log.info("TLS report sent", extra={"domain": domain, "day": day, "to": uri})
            sent += 1
        return sent

    async def _mail(self, address: str, domain: str, report: dict, data: bytes,
                    filename: str) -> None:
        """RFC 8460 5.3: multipart/report; report-type="tlsrpt", gzip JSON attached."""
        if self.submit is None:
            raise RuntimeError("no intake to mail reports through")
        submitter = self.config.node.hostname
        msg = MIMEMultipart("report", report_type="tlsrpt")
        msg["From"] = self.mail_from
        msg["To"] = address
        msg["Date"] = header_date()
        msg["Message-ID"] = make_msgid(domain=submitter)
        msg["Subject"] = (f"Report Domain: {domain} Submitter: {submitter}"
                          f" Report-ID: <{report['report-id']}>")
        msg["TLS-Report-Domain"] = domain
        msg["TLS-Report-Submitter"] = submitter
        msg.attach(MIMEText(f"This is an aggregate TLS report (RFC 8460) from {submitter}"
                            f" for {domain}.\n"))
        part = MIMEApplication(data, "tlsrpt+gzip")
        part.add_header("Content-Disposition", "attachment", filename=filename)
        msg.attach(part)
        from ..policy.intake import RcptIn  # here: policy imports relay's neighbours

        await self.submit(self.mail_from, [RcptIn(address, "NEVER")],
                          msg.as_bytes().replace(b"\n", b"\r\n"), listener=REPORT_LISTENER,
                          src_type="tlsrpt",
                          forced_class=self.config.tlsrpt.report_class or self.config.default_class)

    async def _post(self, url: str, data: bytes) -> None:
        """POST one report (RFC 8460 3: a 2xx status is success). The answer's body is never
        read, and the whole exchange has ``POST_TIMEOUT`` seconds: httpx's timeout is per
        read, and an endpoint dripping an endless body held the reports of every domain after
        it (and filled the memory with the body)."""
        try:
            async with asyncio.timeout(POST_TIMEOUT), \
                    httpx.AsyncClient(verify=self._ssl, timeout=POST_TIMEOUT,
                                      follow_redirects=False) as client, \
                    client.stream("POST", url, content=data,
                                  headers={"Content-Type": "application/tlsrpt+gzip"}) as resp:
                if not resp.is_success:
                    raise RuntimeError(f"HTTP {resp.status_code}")
        except TimeoutError:
            raise RuntimeError(f"no answer within {POST_TIMEOUT:g} s") from None

    async def run(self) -> None:
        """Flush every minute; after each UTC midnight (plus a random delay) send the reports
        of the day before. Cancel to stop (then call ``flush``)."""
        # first, soon after start: days the node was down for at their midnight
        due = time.time() + random.uniform(0, min(300.0, self.config.tlsrpt.send_delay))
        while True:
            await asyncio.sleep(min(FLUSH_EVERY, max(0.0, due - time.time())))
            if await self.tick(send=time.time() >= due):
                due = _next_send(time.time(), self.config.tlsrpt.send_delay)

    async def tick(self, send: bool) -> bool:
        """One round of ``run``: flush, and with ``send`` send what is due. False if the file
        could not be written (the disk full): the counts stay in memory and the reports due
        are sent at the next round. That is told once when it starts and once when it ends,
        not a traceback a minute; anything else is a bug, logged with its traceback."""
        try:
            await asyncio.to_thread(self.flush)
            if send:
                await self.send_due()
        except (OSError, sqlite3.OperationalError) as exc:
            if not self._down:
                self._down = True
                log.error("TLS report counts cannot be saved to %s (%s): kept in memory,"
                          " saved and reported once it can be written", self.path, exc)
            return False
        except Exception:
            log.exception("sending TLS reports failed")
            return True
        if self._down:
            self._down = False
            log.warning("TLS report counts saved again", extra={"file": str(self.path)})
        return True


def _mailto(uri: str) -> str | None:
    """The address of a ``mailto:`` rua (its header fields ignored), or None when it is not
    one mailbox the SMTP door would take as a RCPT path: the record is the recipient domain's
    word, and its percent-decoded address carried CR LF, SMTP parameters, or nothing at all
    into the queue."""
    address = unquote(urlsplit(uri).path)
    try:
        path, params = parse_path(f"<{address}>", utf8=True)
    except PathError:
        return None
    return path if path and not params else None


def _next_send(now: float, spread: float) -> float:
    midnight = (int(now) // 86400 + 1) * 86400
    return midnight + random.uniform(0, spread)
