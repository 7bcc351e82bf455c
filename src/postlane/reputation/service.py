"""The reputation side of a node: DMARC reports arriving at the ``rua`` addresses, the
Postmaster Tools and SNDS importers, the one reputation view per pool and IP and its alerts
(its gauges are ``metrics.py``).

Everything here is off the delivery path: reports are parsed in a thread, the importers run
every ``interval`` in a thread and never raise (an outage is recorded and shown as the age of
the last good import), and the view and alert conditions are computed after each change and
once a minute, then served from memory (the monitor asks for conditions every second).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import time
from collections import Counter
from collections.abc import Callable, Container
from typing import TYPE_CHECKING

from ..accounting.records import Record
from ..config import Config
from ..feedback.dmarc import DMARCError, parse_aggregate
from ..monitor.alerts import Condition
from ..spool import is_dsn, local_dir
from .alignment import summarise
from .domains import OurDomains
from .postmaster import ImportFailed, fetch_postmaster
from .review import stale_rules
from .snds import fetch_snds
from .store import ReputationStore

if TYPE_CHECKING:
    from ..feedback.complaints import ComplaintRates

__all__ = ["LEVELS", "ReputationService", "import_report", "marketing_pools", "open_store",
           "store_location", "store_view"]

log = logging.getLogger("postlane.reputation")

REFRESH_EVERY = 60.0
RECENT = 5 * 86400.0
"""Postmaster and SNDS data older than this no longer raises alerts (the sources lag a day or
two; older figures describe a state that has passed)."""
VIEW_DOMAINS = 100
"""Header From domains in the view, its gauges and alerts (``postlane dmarc report`` and
``GET /dmarc/report`` list them all)."""
LEVELS = {"BAD": 0, "LOW": 1, "MEDIUM": 2, "HIGH": 3}
"""Gmail's reputation categories in order: the alerts compare them, the gauges (``metrics.py``)
show them."""


def store_location(config: Config) -> str:
    """``reputation.store`` if set; else the spool's PostgreSQL database in cluster mode (the
    cluster's schema); else reputation.sqlite3 in the node's folder."""
    return config.reputation.store or (
        config.node.spool if is_dsn(config.node.spool)
        else str(local_dir(config) / "reputation.sqlite3"))


def open_store(config: Config) -> ReputationStore:
    """The store at ``store_location``."""
    return ReputationStore(store_location(config), config.cluster.schema_name)


def import_report(store: ReputationStore, data: bytes, source: str, max_size: int,
                  ours: Container[str] | None = None) -> dict:
    """Parse and store one report (mail, .xml, .xml.gz or .zip): ``{"ok", "stored"
    (False: a duplicate), "conflict" (another report of this reporter, address and id says
    something else: both kept, flagged), ...}`` or ``{"ok": False, "error"}``. Store failures
    raise. With ``ours``, a report whose policy domain is not in it is not stored: ``{"ok": False,
    "not_ours": True, "policy_domain", ...}``."""
    try:
        report = parse_aggregate(data, max_size)
    except DMARCError as exc:
        return {"ok": False, "error": str(exc)}
    except Exception as exc:  # a parser bug: the same bytes would fail again, so no 451 (the
        # reporter would resend for days); the store's failures below still raise
        log.exception("DMARC report parser failed", extra={"source": source})
        return {"ok": False, "error": f"the parser failed: {type(exc).__name__}"}
    if ours is not None and report.policy_domain not in ours:
        return {"ok": False, "not_ours": True, "policy_domain": report.policy_domain,
                "reporter": report.reporter, "report_id": report.report_id,
                "error": f"the policy domain {report.policy_domain} is not one of this node's"}
    outcome = store.store_report(report, source, time.time())
    return {"ok": True, "stored": outcome != "duplicate", "conflict": outcome == "conflict",
            "reporter": report.reporter, "email": report.email,
            "report_id": report.report_id, "policy_domain": report.policy_domain,
            "records": len(report.rows), "messages": report.messages}


def store_view(config: Config, store: ReputationStore, now: float) -> tuple[dict,
                                                                          list[Condition]]:
    """The view and alert conditions a node would compute from ``store``, without the node
    (``postlane reputation show``): our own complaint and bounce rates are counted by a running
    node since it started, so they are unknown (None) here."""
    from ..feedback.complaints import ComplaintRates

    service = ReputationService(config, ComplaintRates.for_config(config.feedback))
    service.store = store
    view, conditions, _ = service._compute(service._read(now), now)
    return view, conditions


def marketing_pools(config: Config) -> set[str]:
    """Pools that may be paused for reputation: pausable, and every class sent from them is
    marketing (``feedback.classes.X.marketing``). A pool with a transactional class is never
    offered."""
    out = set()
    for name, pool in config.pools.items():
        classes = [c for c, cls in config.classes.items() if cls.pool == name]
        fb = config.feedback.classes
        if pool.pausable and classes and all(fb.get(c) and fb[c].marketing for c in classes):
            out.add(name)
    return out


def _pool_domains(config: Config) -> dict[str, list[str]]:
    return {name: list(dict.fromkeys(d.lower() for d in (
        p.signing_domain, p.return_path_domain, p.bounce_domain) if d))
        for name, p in config.pools.items()}


class ReputationService:
    def __init__(self, config: Config, complaints: ComplaintRates) -> None:
        self.config = config
        self.complaints = complaints
        """The feedback loop's complaint rates (part of the reputation view)."""
        self.store: ReputationStore | None = None
        self.addresses = {a.lower() for a in self.config.reputation.dmarc.addresses}
        self.pool_ips = {ip.address: name for name, p in self.config.pools.items()
                         for ip in p.ips}
        self.marketing = marketing_pools(self.config)
        self.domains = _pool_domains(self.config)
        self.ours = OurDomains(self.config)
        """Policy domains whose reports arriving by mail are kept (``domains.py``)."""
        self.outcomes: Counter[tuple[str, str]] = Counter()
        self.view: dict = {}
        self.offers: dict[str, str] = {}
        self._conditions: list[Condition] = []
        self._tasks: list[asyncio.Task] = []
        self._refreshing = asyncio.Lock()
        self._refresh_asked = 0
        self._refresh_covered = 0
        self._importing = {"postmaster": asyncio.Lock(), "snds": asyncio.Lock()}

    # -- life cycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        self.store = await asyncio.to_thread(open_store, self.config)
        await self.refresh()
        rep = self.config.reputation
        loop = asyncio.get_running_loop()
        if rep.postmaster.key_file:
            self._tasks.append(loop.create_task(self._every(rep.postmaster.interval,
                                                            "postmaster")))
        if rep.snds.url:
            self._tasks.append(loop.create_task(self._every(rep.snds.interval, "snds")))
        self._tasks.append(loop.create_task(self._every(REFRESH_EVERY, None)))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self.store is not None:  # in a thread: an import's write may still hold its lock
            await asyncio.to_thread(self.store.close)

    async def _every(self, interval: float, source: str | None) -> None:
        while True:
            if source is None:
                await asyncio.sleep(interval)
                await self.refresh()
            else:
                await self.import_now(source)
                await asyncio.sleep(interval)

    # -- DMARC reports by mail ------------------------------------------------------------------

    def is_rua(self, address: str) -> bool:
        return address.lower() in self.addresses

    async def receive(self, data: bytes, client: str = "", via: str = "smtp") -> dict:
        """A mail to a ``rua`` address (or a report posted to the API, ``via`` "api"): stored
        once; a report that cannot be read, or is about a policy domain not ours, is logged and
        dropped (the reporter resending it would not help). A store failure raises, so the SMTP
        client gets a 451 and tries again."""
        assert self.store is not None
        result = await asyncio.to_thread(import_report, self.store, data, f"{via}:{client}",
                                         self.config.reputation.dmarc.max_report_size,
                                         self.ours)
        if result.get("not_ours"):
            log.warning("DMARC report for a domain not ours dropped", extra={
                "client": client, **{k: result[k] for k in ("policy_domain", "reporter",
                                                             "report_id")}})
        elif not result["ok"]:
            log.warning("DMARC report refused", extra={"client": client,
                                                      "reason": result["error"]})
        elif result["conflict"]:
            log.warning("DMARC report conflicts with one stored (same reporter, address and"
                        " report id, other content): both kept, flagged", extra={
                            "client": client, **{k: result[k] for k in (
                                "reporter", "email", "report_id", "records")}})
        else:
            log.info("DMARC report" + (" stored" if result["stored"] else " already stored"),
                     extra={k: result[k] for k in ("reporter", "report_id", "records")})
        if result["ok"] and result["stored"]:
            await self.refresh()
        return result

    # -- importers ------------------------------------------------------------------------------

    async def import_now(self, source: str) -> dict:
        """Run one importer now (after the one running, if any); never raises (an outage is
        recorded with its reason)."""
        async with self._importing[source]:
            return await self._import(source)

    async def _import(self, source: str) -> dict:
        assert self.store is not None
        rep = self.config.reputation
        fetch: Callable[[], list[dict]]
        if source == "postmaster":
            def fetch() -> list[dict]:
                return fetch_postmaster(rep.postmaster, dt.datetime.now(dt.UTC).date())
            put = self.store.put_postmaster
        else:
            def fetch() -> list[dict]:
                return fetch_snds(rep.snds)
            put = self.store.put_snds
        now = time.time()
        error, rows = "", []
        try:
            rows = await asyncio.to_thread(fetch)
            await asyncio.to_thread(put, rows, now)
        except ImportFailed as exc:
            error = str(exc)
        except Exception as exc:  # an importer must never take the node down
            log.exception("reputation import crashed", extra={"source": source})
            error = f"{type(exc).__name__}"
        if error:
            log.warning("reputation import failed", extra={"source": source, "error": error})
        try:
            await asyncio.to_thread(self.store.record_import, source, now, error, len(rows))
        except Exception:
            log.exception("cannot record the import", extra={"source": source})
        await self.refresh()
        return {"source": source, "ok": not error, "error": error, "rows": len(rows)}

    # -- accounting listener: our own bounce rate -------------------------------------------------

    def on_record(self, rec: Record) -> None:
        if rec.type == "d":
            self.outcomes[(rec.vmta_pool, "delivered")] += 1
        elif (rec.type == "b" and rec.bounce_cat not in ("message-expired", "purged")) or \
                rec.type == "rb":
            self.outcomes[(rec.vmta_pool, "bounced")] += 1

    def bounce_rate(self, pool: str) -> float | None:
        done = self.outcomes[(pool, "delivered")] + self.outcomes[(pool, "bounced")]
        return round(self.outcomes[(pool, "bounced")] / done, 6) if done else None

    # -- the view and the alerts ----------------------------------------------------------------

    def conditions(self, now: float) -> list[Condition]:
        """For the monitor's alert manager (computed by ``refresh``)."""
        return self._conditions

    async def refresh(self) -> None:
        """Recompute the view. Callers that arrive while a run is going share the next run: a
        burst of report mails (each waits for the view before its 250) cost one read of the
        whole window each, one after the other."""
        if self.store is None:
            return
        self._refresh_asked += 1
        ticket = self._refresh_asked
        async with self._refreshing:
            if self._refresh_covered >= ticket:
                return  # a run that started after this request has finished
            covered = self._refresh_asked
            try:
                data = await asyncio.to_thread(self._read, time.time())
                self.view, self._conditions, self.offers = self._compute(data, time.time())
            except Exception:  # the store is away, or holds what this version cannot show:
                # keep the last view and try again later (raising here ended the refresh
                # task for good, and made POST /reputation/import answer 500)
                log.exception("reputation view not refreshed")
            self._refresh_covered = covered

    def _read(self, now: float) -> dict:
        assert self.store is not None
        rep = self.config.reputation
        since_day = time.strftime("%Y-%m-%d", time.gmtime(now - RECENT))
        return {"dmarc": self._bounded(summarise(self.store.dmarc_sources(now - rep.dmarc.window),
                                                 self.pool_ips)),
                "reports": self.store.dmarc_report_count(now - rep.dmarc.window),
                "conflicts": self.store.dmarc_conflicts(now - rep.dmarc.window),
                "postmaster": self.store.postmaster(since_day),
                "snds": self.store.snds(now - RECENT), "imports": self.store.imports(),
                "reviews": self.store.last_reviews()}

    def _bounded(self, summary: dict) -> dict:
        """At most ``VIEW_DOMAINS`` header From domains, the pools' own (and their subdomains)
        first, then those with the most messages: anyone can mail the rua address a report
        naming thousands of domains, and each became gauges, an alert and a dashboard row."""
        domains = summary["domains"]
        if len(domains) <= VIEW_DOMAINS:
            return {**summary, "domains_omitted": 0}
        ours = {d for doms in self.domains.values() for d in doms}

        def rank(dom: dict) -> tuple[bool, int, str]:
            name = dom["domain"]
            own = name in ours or any(name.endswith("." + d) for d in ours)
            return (not own, -dom["messages"], name)

        kept = {d["domain"] for d in sorted(domains, key=rank)[:VIEW_DOMAINS]}
        return {**summary, "domains": [d for d in domains if d["domain"] in kept],
                "domains_omitted": len(domains) - len(kept)}

    def _compute(self, data: dict, now: float) -> tuple[dict, list[Condition], dict[str, str]]:
        rep = self.config.reputation
        gmail: dict[str, dict] = {}
        for row in data["postmaster"]:  # newest first: keep each domain's latest day
            gmail.setdefault(row["domain"], row)
        ip_rep: dict[str, str] = {}
        for row in sorted(gmail.values(), key=lambda r: r["day"]):
            for bucket in row["ip_reputations"]:
                for ip in bucket["sample_ips"]:
                    ip_rep[ip] = bucket["reputation"]
        snds: dict[str, dict] = {}
        for row in data["snds"]:
            snds.setdefault(row["ip"], row)
        dmarc = data["dmarc"]
        dmarc_pools = {p["pool"]: p for p in dmarc["pools"]}
        pools = []
        for name, pool in self.config.pools.items():
            domain = next((d for d in self.domains[name] if d in gmail), None)
            g = gmail.get(domain or "")
            pools.append({
                "pool": name, "marketing": name in self.marketing, "pausable": pool.pausable,
                "domains": self.domains[name],
                "gmail": None if g is None else {
                    "domain": g["domain"], "day": g["day"],
                    "domain_reputation": g["domain_reputation"], "spam_ratio": g["spam_ratio"]},
                "dmarc": dmarc_pools.get(name),
                "complaint_rate": self._complaint_rate(name),
                "bounce_rate": self.bounce_rate(name),
                "ips": [{"address": ip.address, "gmail_reputation": ip_rep.get(ip.address),
                         "snds": _snds_view(snds.get(ip.address)),
                         "dmarc": dmarc["ips"].get(ip.address)} for ip in pool.ips]})
        imports = {}
        for source, enabled in (("postmaster", bool(rep.postmaster.key_file)),
                                ("snds", bool(rep.snds.url))):
            state = data["imports"].get(source, {})
            success = state.get("last_success")
            imports[source] = {"enabled": enabled, **state,
                               "age_s": None if success is None else round(now - success, 1)}
        view = {"pools": pools, "dmarc": {"window_s": rep.dmarc.window,
                                          "reports": data["reports"],
                                          "conflicting_reports": data["conflicts"], **dmarc},
                "imports": imports, "stale_rules": stale_rules(self.config, data["reviews"], now),
                "thresholds": {"spam_ratio_warning": rep.spam_ratio_warning,
                               "spam_ratio_critical": rep.spam_ratio_critical,
                               "dkim_alignment": rep.dmarc.dkim_alignment_alert}}
        conditions = self._alerts(gmail, ip_rep, snds, dmarc, now)
        offers = {}
        for cond in conditions:
            pause = [p for p in cond.pool.split(",") if p in self.marketing]
            if pause:
                offers[f"{cond.rule}:{cond.cls}"] = pause[0]
        view["offers"] = offers
        return view, conditions, offers

    def _complaint_rate(self, pool: str) -> float | None:
        rates = self.complaints
        return round(rates.rate(pool), 6) if rates.sent(pool) else None

    def _pools_of_domain(self, domain: str) -> str:
        return ",".join(p for p, doms in self.domains.items() if domain in doms)

    def _alerts(self, gmail: dict, ip_rep: dict, snds: dict, dmarc: dict,
                now: float) -> list[Condition]:
        rep = self.config.reputation
        out = []
        recent = time.strftime("%Y-%m-%d", time.gmtime(now - RECENT))
        for domain, row in sorted(gmail.items()):
            if row["day"] < recent:
                continue
            pools = self._pools_of_domain(domain)
            level = row["domain_reputation"]
            if level in ("LOW", "BAD"):
                out.append(Condition("gmail-domain-reputation", domain, pools, LEVELS[level],
                                     LEVELS["MEDIUM"], f"Gmail domain reputation of {domain} is"
                                     f" {level} ({row['day']})"))
            ratio = row["spam_ratio"]
            if ratio is not None and ratio > rep.spam_ratio_warning:
                critical = ratio > rep.spam_ratio_critical
                limit = rep.spam_ratio_critical if critical else rep.spam_ratio_warning
                out.append(Condition(
                    f"gmail-spam-{'critical' if critical else 'warning'}", domain, pools, ratio,
                    limit, f"Gmail user-reported spam ratio of {domain} is {ratio:.2%}"
                    f" ({row['day']}), above {limit:.2%}"))
        for ip, level in sorted(ip_rep.items()):
            if ip in self.pool_ips and level in ("LOW", "BAD"):
                out.append(Condition("gmail-ip-reputation", ip, self.pool_ips[ip],
                                     LEVELS[level], LEVELS["MEDIUM"],
                                     f"Gmail IP reputation of {ip} (pool {self.pool_ips[ip]}) is"
                                     f" {level}"))
        for ip, row in sorted(snds.items()):
            if ip in self.pool_ips and row["filter"] == "RED":
                out.append(Condition("snds-red", ip, self.pool_ips[ip], 2, 2,
                                     f"SNDS filter result RED for {ip} (pool"
                                     f" {self.pool_ips[ip]}), complaint rate"
                                     f" {row['complaint_rate'] or '-'}, {row['trap_hits']} trap"
                                     f" hits"))
        dm = rep.dmarc
        for pool in dmarc["pools"]:
            if pool["messages"] >= dm.min_messages and pool["dkim_rate"] is not None and \
                    pool["dkim_rate"] < dm.dkim_alignment_alert:
                out.append(Condition("dmarc-dkim-alignment", pool["pool"], pool["pool"],
                                     pool["dkim_rate"], dm.dkim_alignment_alert,
                                     f"DKIM alignment of pool {pool['pool']} is"
                                     f" {pool['dkim_rate']:.1%} in DMARC reports"
                                     f" ({pool['messages']} messages), below"
                                     f" {dm.dkim_alignment_alert:.0%}"))
        for domain in dmarc["domains"]:
            unknown = domain["groups"]["unknown"]
            if unknown["messages"] >= dm.unknown_alert:
                top = ", ".join(s["source_ip"] for s in unknown["top"][:3])
                out.append(Condition("dmarc-unknown-senders", domain["domain"],
                                     self._pools_of_domain(domain["domain"]),
                                     unknown["messages"], dm.unknown_alert,
                                     f"{unknown['messages']} messages as {domain['domain']} from"
                                     f" unknown senders (neither SPF nor DKIM aligned), e.g."
                                     f" {top}"))
        return out


def _snds_view(row: dict | None) -> dict | None:
    if row is None:
        return None
    return {k: row[k] for k in ("filter", "complaint_rate", "complaint_ratio", "trap_hits",
                                "period_start", "period_end", "recipients")}
