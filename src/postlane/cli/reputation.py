"""``postlane dmarc parse|import|report``, ``postlane reputation import|show`` and
``postlane rules review|reviewed``.

The commands open the reputation store the node's config names (SQLite WAL or PostgreSQL), so
they work whether or not the node runs; a running node reads what they wrote at its next view
refresh (once a minute).
"""

from __future__ import annotations

import json
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import typer

from ..audit.evidence import visible
from ..config import Config
from ..feedback.dmarc import DEFAULT_MAX_SIZE, DMARCError, parse_aggregate
from ..reputation.alignment import GROUPS, summarise
from ..reputation.domains import OurDomains
from ..reputation.postmaster import ImportFailed, drop_future_days, parse_traffic_stats
from ..reputation.review import PERIOD, review
from ..reputation.service import RECENT, import_report, open_store, store_location, store_view
from ..reputation.snds import drop_future, parse_snds
from ..reputation.store import ReputationStore
from ..secretfile import NotTheOwner, as_the_owner
from ..spool import is_dsn

dmarc_app = typer.Typer(no_args_is_help=True, help="DMARC aggregate (rua) reports.")
rules_app = typer.Typer(no_args_is_help=True, help="The monthly review of destination rules.")
reputation_app = typer.Typer(no_args_is_help=True, help="The daily review: Microsoft SNDS and"
                             " Google Postmaster Tools data beside each pool and IP.")

_CONFIG = typer.Option(..., "-c", "--config", envvar="POSTLANE_CONFIG",
                       help="the node's config (locates the reputation store)")
_JSON = typer.Option(False, "--json", help="JSON output")


def _config(path: Path) -> Config:
    from . import _load  # the one place config errors are printed

    cfg: Config = _load(path)
    return cfg


def _store(cfg: Config, write: bool = False) -> ReputationStore:
    """The store; as root, a SQLite store in another user's folder only to read one that exists:
    a file root makes there (opening creates it) is one the node cannot open."""
    location = store_location(cfg)
    try:
        if not is_dsn(location) and (write or not Path(location).exists()):
            as_the_owner(Path(location).parent)
        return open_store(cfg)
    except NotTheOwner as exc:
        typer.echo(f"postlane: {exc}", err=True)
        raise typer.Exit(1) from None
    except (ConnectionError, OSError) as exc:  # one line (libpq's reasons take two)
        why = str(exc) if isinstance(exc, ConnectionError) else \
            f"cannot open the reputation store: {exc}"
        typer.echo(" ".join(why.split()), err=True)
        raise typer.Exit(1) from None


def _read(path: Path) -> bytes:
    return sys.stdin.buffer.read() if str(path) == "-" else path.read_bytes()


@dmarc_app.command("parse")
def parse(files: list[Path] = typer.Argument(..., help=".xml, .xml.gz, .zip or .eml; '-' stdin"),
          as_json: bool = _JSON,
          max_size: int = typer.Option(DEFAULT_MAX_SIZE, help="bytes of XML a report may"
                                       " decompress to")) -> None:
    """Parse reports without storing them: one line per file (exit 1 if any is unreadable)."""
    failed = 0
    for path in files:
        out: dict = {"file": str(path)}
        try:
            out.update(ok=True, **parse_aggregate(_read(path), max_size).as_json())
        except OSError as exc:
            out.update(ok=False, error=f"cannot read: {exc.strerror}")
        except DMARCError as exc:
            out.update(ok=False, error=str(exc))
        failed += not out["ok"]
        if as_json:
            typer.echo(json.dumps(out, ensure_ascii=False))
        elif out["ok"]:
            msgs = sum(r["count"] for r in out["records"])
            typer.echo(f"{path}: {out['org_name'] or '-'} report {out['report_id']} for"
                       f" {out['policy_domain']}, {_day(out['begin'])} .. {_day(out['end'])},"
                       f" {len(out['records'])} records, {msgs} messages")
        else:
            typer.echo(f"{path}: not a readable report: {out['error']}")
    raise typer.Exit(1 if failed else 0)


@dmarc_app.command("import")
def import_(files: list[Path] = typer.Argument(..., help=".xml, .xml.gz, .zip or .eml files"),
            config: Path = _CONFIG, as_json: bool = _JSON) -> None:
    """Store reports about this node's domains, as the rua address does (a report already
    stored, same reporter, address, report id and content, is skipped; one about a policy
    domain not ours is left out and counted). Exit 1 if any file was not a readable report."""
    cfg = _config(config)
    ours = OurDomains(cfg)
    store = _store(cfg, write=True)
    counts = {"stored": 0, "already": 0, "foreign": 0, "refused": 0}
    try:
        for path in files:
            try:
                result = import_report(store, _read(path), f"file:{path.name}",
                                       cfg.reputation.dmarc.max_report_size, ours)
            except OSError as exc:
                result = {"ok": False, "error": f"cannot read: {exc.strerror}"}
            counts["foreign" if result.get("not_ours") else "refused" if not result["ok"]
                   else "stored" if result["stored"] else "already"] += 1
            if as_json:
                typer.echo(json.dumps({"file": str(path), **result}, ensure_ascii=False))
            elif result.get("not_ours"):
                typer.echo(f"{path}: not ours, skipped: {visible(result['error'])} (list it in"
                           f" reputation.dmarc.domains if it is)")
            elif not result["ok"]:
                typer.echo(f"{path}: refused: {result['error']}")
            else:
                state = "already stored, skipped" if not result["stored"] else (
                    "stored, conflicting with a stored report of the same reporter, address"
                    " and id (both kept, flagged)" if result["conflict"] else "stored")
                typer.echo(f"{path}: {state} ({result['reporter']} {result['report_id']},"
                           f" {result['records']} records, {result['messages']} messages)")
    finally:
        store.close()
    if not as_json:
        typer.echo(f"{counts['stored']} stored, {counts['already']} already stored,"
                   f" {counts['foreign']} not ours (skipped), {counts['refused']} refused")
    raise typer.Exit(1 if counts["refused"] else 0)


@dmarc_app.command("report")
def report(config: Path = _CONFIG,
           domain: str | None = typer.Option(None, help="only this header From domain"),
           days: float = typer.Option(7, min=0.01, max=3660, help="reports that ended this"
                                      " many days ago or later (at most ten years, as the"
                                      " API)"),
           top: int = typer.Option(5, min=1, help="top sources per group"),
           as_json: bool = _JSON) -> None:
    """Alignment per sending domain; sources split into our pools, known forwarders (DKIM
    aligned, SPF not: forwarding), other SPF-authorised senders and unknown senders."""
    cfg = _config(config)
    store = _store(cfg)
    try:
        rows = store.dmarc_sources(time.time() - days * 86400, domain)
        reports = store.dmarc_report_count(time.time() - days * 86400, domain)
        conflicts = store.dmarc_conflicts(time.time() - days * 86400)
    finally:
        store.close()
    pool_ips = {ip.address: name for name, p in cfg.pools.items() for ip in p.ips}
    summary = summarise(rows, pool_ips, top)
    if as_json:
        typer.echo(json.dumps({"days": days, "reports": reports,
                               "conflicting_reports": conflicts, **summary}))
        return
    about = f" about {visible(domain.lower())}" if domain else ""
    typer.echo(f"{reports} reports{about} in the last {days:g} days")
    if conflicts:
        typer.echo(f"{conflicts} reports conflict with another of the same reporter, address"
                   " and report id (a forgery or a reused id: both kept and counted)")
    for dom in summary["domains"]:
        typer.echo(f"\n{visible(dom['domain'])}: {dom['messages']} messages, DMARC pass"
                   f" {_pct(dom['pass_rate'])}, DKIM aligned {_pct(dom['dkim_rate'])}")
        for group in GROUPS:
            part = dom["groups"][group]
            typer.echo(f"  {group:<11} {part['messages']:>9} messages")
            for src in part["top"]:
                who = f" (pool {src['pool']})" if src["pool"] else ""
                typer.echo(f"    {src['source_ip']:<39} {src['messages']:>9}  DKIM aligned"
                           f" {src['dkim_aligned']:>7}  SPF aligned {src['spf_aligned']:>7}{who}")
    if summary["pools"]:
        typer.echo("\npools:")
        for pool in summary["pools"]:
            typer.echo(f"  {pool['pool']:<24} {pool['messages']:>9} messages, DMARC pass"
                       f" {_pct(pool['pass_rate'])}, DKIM aligned {_pct(pool['dkim_rate'])}")


MAX_FILE = 64 * 1024 * 1024
"""Bytes of one file ``reputation import`` reads: months of SNDS lines for hundreds of IPs, or
of Postmaster days for dozens of domains, are a few megabytes."""
SOURCES = ("snds", "postmaster")


def _rows_of(source: str, path: Path, now: float) -> tuple[list[dict], int]:
    """The file's rows to store, and how many it dated more than a day ahead (left out).
    Raises ``ImportFailed`` (the reason, naming the line) or ``OSError``."""
    data = sys.stdin.buffer.read(MAX_FILE + 1) if str(path) == "-" else _head(path)
    if len(data) > MAX_FILE:
        raise ImportFailed(f"larger than {MAX_FILE // 2**20} MB: not an SNDS export nor"
                           " Postmaster Tools answers")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise ImportFailed(f"line {line}: not UTF-8 text (byte 0x{data[exc.start]:02x})")\
            from None
    if source == "snds":
        if text.lstrip("\ufeff \t\r\n").startswith(("<", "{", "[")):
            raise ImportFailed("line 1: not SNDS CSV data (an HTML page or JSON); the SNDS"
                               " export has one line per IP and day: IP, activity start, end,"
                               " RCPT, DATA, recipients, filter result, complaint rate, …")
        rows = parse_snds(text)
        kept = drop_future(rows, now)
        what = "no SNDS data lines (one line per IP and day: IP, activity start, end, …)"
    else:
        rows = parse_traffic_stats(text)
        kept = drop_future_days(rows, datetime.fromtimestamp(now, UTC).date())
        what = "no traffic stats (a trafficStats.list answer: {\"trafficStats\": [...]})"
    if not rows:
        raise ImportFailed(what)
    if not kept:
        raise ImportFailed(f"every row is dated more than a day ahead (from"
                           f" {_first_day(source, rows)}): is the file or this clock wrong?")
    return kept, len(rows) - len(kept)


def _head(path: Path) -> bytes:
    with path.open("rb") as fh:
        return fh.read(MAX_FILE + 1)


def _first_day(source: str, rows: list[dict]) -> str:
    if source == "snds":
        return _day(min(r["period_start"] for r in rows))[:10]
    return str(min(r["day"] for r in rows))


@reputation_app.command("import")
def rep_import(source: str = typer.Argument(..., metavar="SOURCE",
                                            help="snds (the per-IP CSV SNDS exports) or"
                                            " postmaster (trafficStats JSON answers)"),
               files: list[Path] = typer.Argument(..., metavar="FILE",
                                                  help="files; '-' stdin"),
               config: Path = _CONFIG, as_json: bool = _JSON) -> None:
    """Store SNDS or Postmaster Tools data downloaded by hand.

    As the scheduled importers would: each file whole or not at all; a row already stored (same
    IP and period, or domain and day) is stored once, with the file's figures. Exit 1 if any
    file was refused."""
    if source not in SOURCES:
        raise typer.BadParameter("must be snds or postmaster", param_hint="SOURCE")
    cfg = _config(config)
    store = _store(cfg, write=True)
    failed = 0
    try:
        for path in files:
            now = time.time()
            try:
                rows, future = _rows_of(source, path, now)
            except OSError as exc:
                result: dict = {"ok": False, "error": f"cannot read: {exc.strerror}"}
            except ImportFailed as exc:
                result = {"ok": False, "error": str(exc)}
            else:
                put = store.put_snds if source == "snds" else store.put_postmaster
                new = put(rows, now)
                result = {"ok": True, **_summary(source, rows, now), "new": new}
                result["already_stored"] = result["rows"] - new
                result["future_skipped"] = future
            failed += not result["ok"]
            if as_json:
                typer.echo(json.dumps({"file": str(path), "source": source, **result}))
            elif not result["ok"]:
                typer.echo(f"{path}: refused: {visible(result['error'])}")
            else:
                typer.echo(_import_line(path, result))
    finally:
        store.close()
    raise typer.Exit(1 if failed else 0)


def _summary(source: str, rows: list[dict], now: float) -> dict:
    """What a file held, once per key: rows, the IPs or domains, its first and last day, and
    how many rows are older than the view's window."""
    if source == "snds":
        keys = {(r["ip"], r["period_start"]): r for r in rows}
        names = sorted({r["ip"] for r in rows})
        days = sorted(_day(r["period_start"])[:10] for r in keys.values())
        old = sum(r["period_end"] < now - RECENT for r in keys.values())
        return {"rows": len(keys), "ips": names, "first_day": days[0], "last_day": days[-1],
                "older_than_view": old}
    keys = {(r["domain"], r["day"]): r for r in rows}
    since = time.strftime("%Y-%m-%d", time.gmtime(now - RECENT))
    days = sorted(r["day"] for r in keys.values())
    return {"rows": len(keys), "domains": sorted({r["domain"] for r in rows}),
            "first_day": days[0], "last_day": days[-1],
            "older_than_view": sum(r["day"] < since for r in keys.values())}


def _import_line(path: Path, r: dict) -> str:
    names = r.get("ips") or r.get("domains") or []
    shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
    period = r["first_day"] if r["first_day"] == r["last_day"] else \
        f"{r['first_day']} .. {r['last_day']}"
    counts = f"{r['new']} new" + (f", {r['already_stored']} already stored, updated from the"
                                  f" file" if r["already_stored"] else "")
    line = (f"{path}: stored {r['rows']} row{'s' if r['rows'] != 1 else ''} ({counts}) for"
            f" {shown}, {period}")
    if r["future_skipped"]:
        line += f"; {r['future_skipped']} dated more than a day ahead left out"
    if r["older_than_view"]:
        line += (f"; {r['older_than_view']} older than {RECENT / 86400:g} days (stored; the"
                 f" view and its alerts use the last {RECENT / 86400:g} days)")
    return line


@reputation_app.command("show")
def rep_show(config: Path = _CONFIG, as_json: bool = _JSON) -> None:
    """The reputation view per pool and IP, and its alerts.

    Computed from the store as the node computes it: Gmail domain and IP reputation and spam
    ratio, SNDS colour, complaint rate and trap hits, DMARC pass rate and DKIM alignment; the
    alerts these raise; the importers' state."""
    cfg = _config(config)
    store = _store(cfg)
    now = time.time()
    try:
        view, conditions = store_view(cfg, store, now)
    finally:
        store.close()
    alerts = [{"id": f"{c.rule}:{c.cls}", "rule": c.rule, "subject": c.cls, "pools": c.pool,
               "value": c.value, "threshold": c.threshold, "message": c.message}
              for c in conditions]
    if as_json:
        typer.echo(json.dumps({**view, "alerts": alerts}))
        return
    for line in _view_lines(view, alerts):
        typer.echo(visible(line))


def _view_lines(view: dict, alerts: list[dict]) -> list[str]:
    dmarc = view["dmarc"]
    out = [f"DMARC: {dmarc['reports']} reports in the last {dmarc['window_s'] / 86400:g} days;"
           f" Postmaster Tools and SNDS: the latest day within {RECENT / 86400:g} days"]
    for pool in view["pools"]:
        kind = "; marketing: its alerts offer a pause" if pool["marketing"] else ""
        domains = ", ".join(pool["domains"]) or "-"
        out.extend(("", f"pool {pool['pool']} (domains: {domains}{kind})"))
        g = pool["gmail"]
        out.append("  Gmail: no data" if g is None else
                   f"  Gmail {g['domain']} {g['day']}: domain reputation"
                   f" {g['domain_reputation'] or '-'}, spam ratio {_pct(g['spam_ratio'], 2)}")
        d = pool["dmarc"]
        out.append("  DMARC: no reports" if d is None else
                   f"  DMARC: {d['messages']} messages, pass {_pct(d['pass_rate'])}, DKIM aligned"
                   f" {_pct(d['dkim_rate'])}")
        for ip in pool["ips"]:
            sn = ip["snds"]
            snds = "SNDS -" if sn is None else (
                f"SNDS {sn['filter']} {_day(sn['period_start'])[:10]}, complaint rate"
                f" {_snds_rate(sn)}, {sn['trap_hits']} trap hits")
            dm = ip["dmarc"]
            out.append(f"  {ip['address']:<15}  {snds};  Gmail IP {ip['gmail_reputation'] or '-'};"
                       f"  DMARC pass {_pct(dm['pass_rate']) if dm else '-'}")
    if dmarc["domains"]:
        out.extend(("", "DMARC by header From domain:"))
        for dom in dmarc["domains"]:
            out.append(f"  {dom['domain']}: {dom['messages']} messages, pass"
                       f" {_pct(dom['pass_rate'])}, DKIM aligned {_pct(dom['dkim_rate'])},"
                       f" unknown senders {dom['groups']['unknown']['messages']}")
    out.extend(("", f"alerts: {len(alerts) or 'none'}"))
    out.extend(f"  {a['id']}: {a['message']}" for a in alerts)
    parts = []
    for source, state in view["imports"].items():
        last = state.get("last_success")
        text = f"{source}: {'scheduled' if state['enabled'] else 'not configured'}, last good" \
               f" import {'never' if last is None else _day(last)}"
        if state.get("last_error"):
            text += f" (last error: {state['last_error']})"
        parts.append(text)
    out.append("importers: " + "; ".join(parts))
    if view["stale_rules"]:
        out.append(f"stale rules (postlane rules review): "
                   f"{', '.join(r['rule'] for r in view['stale_rules'])}")
    return out


def _snds_rate(row: dict) -> str:
    """SNDS's own words for a rate below what it reports (``< 0.1%``), else the ratio."""
    raw = str(row["complaint_rate"])
    return raw if raw.startswith("<") else _pct(row["complaint_ratio"])


@rules_app.command("review")
def rules_review(config: Path = _CONFIG, as_json: bool = _JSON) -> None:
    """Each destination rule in force: where it came from, when it was last reviewed, and what
    the last 30 days of deliveries and reputation data suggest."""
    from ..audit.backend import open_audit_store
    from ..audit.store import StoreMissing

    cfg = _config(config)
    store = _store(cfg)
    now = time.time()
    try:
        reviews = store.last_reviews()
        gmail = store.postmaster(time.strftime("%Y-%m-%d", time.gmtime(now - PERIOD)))
        snds = store.snds(now - PERIOD)
    finally:
        store.close()
    audit = None
    if cfg.audit.enabled:
        try:
            audit = open_audit_store(cfg, readonly=True)
        except (StoreMissing, ConnectionError):
            audit = None
    try:
        records = audit.rows_between(now - PERIOD, None) if audit is not None else None
        entries = review(cfg, reviews, records, gmail, snds, now, str(config))
    finally:
        if audit is not None:
            audit.close()
    if as_json:
        for entry in entries:
            typer.echo(json.dumps(entry))
        return
    for e in entries:
        last = "never" if e["last_reviewed"] is None else \
            f"{_day(e['last_reviewed'])} by {e['reviewer'] or '?'}"
        typer.echo(f"{e['rule']}{'  [STALE]' if e['stale'] else ''}")
        typer.echo(f"  origin: {e['origin']} ({e['file']})")
        if e["source"]:
            typer.echo(f"  source: {e['source']}")
        typer.echo(f"  domains: {', '.join(e['domains']) or '-'}; mx: {', '.join(e['mx']) or '-'}")
        typer.echo(f"  last reviewed: {last}")
        if e["traffic"]:
            t = {k: e["traffic"]["earlier"][k] + e["traffic"]["recent"][k]
                 for k in e["traffic"]["recent"]}
            typer.echo(f"  30 days: {t['delivered']} delivered, {t['deferred']} deferred"
                       f" ({t['throttled']} throttled), {t['bounced']} bounced")
        for line in e["suggestions"]:
            typer.echo(f"  - {line}")


@rules_app.command("reviewed")
def rules_reviewed(rule: str = typer.Argument(..., help="rule name (see `rules review`)"),
                   config: Path = _CONFIG,
                   by: str = typer.Option("", help="who reviewed it (default: $USER)"),
                   note: str = typer.Option("", help="what was decided"),
                   as_json: bool = _JSON) -> None:
    """Record that RULE was reviewed now."""
    cfg = _config(config)
    if rule not in cfg.destinations:
        typer.echo(f"no destination rule named {rule!r} (rules: "
                   f"{', '.join(sorted(cfg.destinations))})", err=True)
        raise typer.Exit(2)
    import getpass

    store = _store(cfg, write=True)
    now, who = time.time(), by or getpass.getuser()
    try:
        store.add_review(rule, who, note, now)
    finally:
        store.close()
    typer.echo(json.dumps({"rule": rule, "reviewed": now, "by": who, "note": note})
               if as_json else f"{rule}: reviewed {_day(now)}")


def _day(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M")


def _pct(rate: float | None, digits: int = 1) -> str:
    return "-" if rate is None else f"{rate:.{digits}%}"
