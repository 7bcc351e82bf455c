"""``postlane dmarc parse|import|report`` and ``postlane rules review|reviewed``.

The commands open the reputation store the node's config names (SQLite WAL or PostgreSQL), so
they work whether or not the node runs.
"""

from __future__ import annotations

import json
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import typer

from ..config import Config
from ..feedback.dmarc import DEFAULT_MAX_SIZE, DMARCError, parse_aggregate
from ..reputation.alignment import GROUPS, summarise
from ..reputation.review import PERIOD, review
from ..reputation.service import import_report, open_store
from ..reputation.store import ReputationStore

dmarc_app = typer.Typer(no_args_is_help=True, help="DMARC aggregate (rua) reports.")
rules_app = typer.Typer(no_args_is_help=True, help="The monthly review of destination rules.")

_CONFIG = typer.Option(..., "-c", "--config", envvar="POSTLANE_CONFIG",
                       help="the node's config (locates the reputation store)")
_JSON = typer.Option(False, "--json", help="JSON output")


def _config(path: Path) -> Config:
    from . import _load  # the one place config errors are printed

    cfg: Config = _load(path)
    return cfg


def _store(cfg: Config) -> ReputationStore:
    try:
        return open_store(cfg)
    except (ConnectionError, OSError) as exc:
        typer.echo(f"cannot open the reputation store: {exc}", err=True)
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
    """Store reports (a report already stored, same reporter and report id, is skipped).
    Exit 1 if any file was not a readable report."""
    cfg = _config(config)
    store = _store(cfg)
    failed = 0
    try:
        for path in files:
            try:
                result = import_report(store, _read(path), f"file:{path.name}",
                                       cfg.reputation.dmarc.max_report_size)
            except OSError as exc:
                result = {"ok": False, "error": f"cannot read: {exc.strerror}"}
            if not result["ok"]:
                failed += 1
            if as_json:
                typer.echo(json.dumps({"file": str(path), **result}, ensure_ascii=False))
            elif not result["ok"]:
                typer.echo(f"{path}: refused: {result['error']}")
            else:
                state = "stored" if result["stored"] else "already stored, skipped"
                typer.echo(f"{path}: {state} ({result['reporter']} {result['report_id']},"
                           f" {result['records']} records, {result['messages']} messages)")
    finally:
        store.close()
    raise typer.Exit(1 if failed else 0)


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
        reports = store.dmarc_report_count(time.time() - days * 86400)
    finally:
        store.close()
    pool_ips = {ip.address: name for name, p in cfg.pools.items() for ip in p.ips}
    summary = summarise(rows, pool_ips, top)
    if as_json:
        typer.echo(json.dumps({"days": days, "reports": reports, **summary}))
        return
    typer.echo(f"{reports} reports in the last {days:g} days")
    for dom in summary["domains"]:
        typer.echo(f"\n{dom['domain']}: {dom['messages']} messages, DMARC pass"
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

    store = _store(cfg)
    now, who = time.time(), by or getpass.getuser()
    try:
        store.add_review(rule, who, note, now)
    finally:
        store.close()
    typer.echo(json.dumps({"rule": rule, "reviewed": now, "by": who, "note": note})
               if as_json else f"{rule}: reviewed {_day(now)}")


def _day(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M")


def _pct(rate: float | None) -> str:
    return "-" if rate is None else f"{rate:.1%}"
