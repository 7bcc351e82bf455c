"""``postlane audit``: evidence, verification, export, SLA report and retention."""

from __future__ import annotations

import json
import sqlite3
import time
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from ..audit.backend import open_audit_store, open_store_at
from ..audit.store import AuditStore, Query, StoreMissing

if TYPE_CHECKING:
    from ..config import Config

app = typer.Typer(no_args_is_help=True,
                  help="The regulatory audit trail: evidence, verification, retention.")

_CONFIG = typer.Option(None, "-c", "--config", help="node config (finds the store, SLAs)")
_DB = typer.Option(None, "--db", help="audit store instead of --config: a SQLite file or a "
                   "PostgreSQL DSN")
_SCHEMA = typer.Option("postlane", "--schema", help="PostgreSQL schema, with a DSN in --db")


class Format(StrEnum):
    text = "text"
    json = "json"
    csv = "csv"


def parse_when(text: str | None) -> float | None:
    """Epoch seconds, or ISO 8601 (a date or date-time; UTC unless an offset is given)."""
    if text is None:
        return None
    try:
        return float(text)
    except ValueError:
        pass
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise typer.BadParameter(f"not a time: {text!r} (use e.g. 2026-11-27 or "
                                 "2026-11-27T18:00:00Z or epoch seconds)") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when.timestamp()


def _open(config: Path | None, db: str | None, schema: str = "postlane", *,
          write: bool = False) -> AuditStore:
    """The store ``--db`` names, else the one the node config uses (SQLite or PostgreSQL)."""
    try:
        if db is not None:
            return open_store_at(db, schema, readonly=not write)
        if config is None:
            raise typer.BadParameter("give --config or --db")
        from . import _load

        return open_audit_store(_load(config), readonly=not write)
    except (StoreMissing, ConnectionError) as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(2) from None
    except sqlite3.DatabaseError as exc:  # --db names some other file
        typer.echo(f"{db or config}: not an audit store ({exc})", err=True)
        raise typer.Exit(2) from None


def _pseudonyms(config: Path | None, recipient: str | None) -> list[str]:
    """The pseudonyms retention gave the recipient's records, one per spelling it may be
    stored in (``rcpt_spellings``: the hash is of the address as stored, so the pseudonym of
    ``jörg@exämple.com`` is not that of ``jörg@xn--exmple-cua.com``)."""
    if config is None or recipient is None:
        return []
    from ..audit.chain import pseudonym
    from ..audit.queries import rcpt_spellings
    from ..audit.service import load_key
    from . import _load

    key_file = _load(config).audit.pseudonymisation_key
    if not key_file:
        return []
    key = load_key(key_file)
    return list(dict.fromkeys(pseudonym(key, s) for s in rcpt_spellings(recipient)))


@app.command()
def show(config: Path | None = _CONFIG, db: str | None = _DB, schema: str = _SCHEMA,
         correlation_id: str | None = typer.Option(None, "--correlation-id"),
         message_id: str | None = typer.Option(None, "--message-id"),
         recipient: str | None = typer.Option(None, "--recipient"),
         queue_id: str | None = typer.Option(None, "--queue-id"),
         envid: str | None = typer.Option(None, "--envid"),
         since: str | None = typer.Option(None, help="messages queued at or after"),
         until: str | None = typer.Option(None, help="messages queued before"),
         fmt: Format = typer.Option(Format.text, "--format")) -> None:
    """The full trail of each matching message and recipient."""
    from ..audit.evidence import render_csv, render_json, render_text, trails

    query = Query(queue_id=queue_id, message_id=message_id, correlation_id=correlation_id,
                  env_id=envid, rcpt=recipient, since=parse_when(since), until=parse_when(until))
    if not any((queue_id, message_id, correlation_id, envid, recipient)):
        raise typer.BadParameter("give at least one of --correlation-id, --message-id, "
                                 "--recipient, --queue-id, --envid")
    store = _open(config, db, schema)
    try:
        rows = store.find(query)
        for alias in _pseudonyms(config, recipient):  # records retention pseudonymised
            query.rcpt = alias
            rows += store.find(query)
        rows = sorted({r["seq"]: r for r in rows}.values(), key=lambda r: r["seq"])
        items = trails(rows)
    finally:
        store.close()
    now = time.time()
    if fmt is Format.json:
        typer.echo(render_json(items, now), nl=False)
    elif fmt is Format.csv:
        typer.echo(render_csv(items), nl=False)
    elif items:
        typer.echo(render_text(items, now))
    if not items:  # on stderr: a script reading the trail gets no line that looks like one
        if fmt is Format.text:
            typer.echo("no records found", err=True)
        raise typer.Exit(1)


@app.command()
def verify(config: Path | None = _CONFIG, db: str | None = _DB, schema: str = _SCHEMA,
           since: str | None = typer.Option(None, help="first day to check (YYYY-MM-DD)"),
           export_dir: Path | None = typer.Option(None, "--export",
                                                  help="check an export directory instead"),
           public_key: Path | None = typer.Option(
               None, "--public-key", help="the seal key's public half: check every day's seal"),
           tsa_ca: Path | None = typer.Option(
               None, "--tsa-ca", help="the time-stamp authority's root certificate (PEM): check"
               " the seals' time-stamps too"),
           files: bool = typer.Option(
               False, "--files", help="compare the accounting files (rotated ones too) with the"
               " store: lines missing, not in the store, doubled or cut (needs -c CONFIG)"),
           as_json: bool = typer.Option(False, "--json")) -> None:
    """Walk the hash chain and check the trail is complete; exit 1 and name the first altered,
    inserted, removed or reordered record, then every missing one (with -c CONFIG the spool is
    read too: recipients still queued are not missing their final record)."""
    public, roots = _seal_checkers(public_key, tsa_ca)
    if files and (config is None or db is not None or export_dir is not None):
        raise typer.BadParameter("--files compares the accounting files of -c CONFIG with its"
                                 " store: give -c CONFIG, without --db or --export")
    if export_dir is not None:
        from ..audit.evidence import verify_export

        try:
            problems = verify_export(export_dir, public, roots)
        except OSError as exc:
            typer.echo(f"{export_dir}: cannot read the export: {exc.strerror or exc}"
                       f"{': ' + exc.filename if exc.filename else ''}", err=True)
            raise typer.Exit(2) from None
        for line in problems or ["ok: export files, record hashes and links check"]:
            typer.echo(line)
        raise typer.Exit(1 if problems else 0)
    day = None
    if since is not None:
        stamp = parse_when(since)
        assert stamp is not None
        day = time.strftime("%Y-%m-%d", time.gmtime(stamp))
    store = _open(config, db, schema)
    try:
        result = store.verify(day)
        # without --db the store is the config's (_open refused neither being given)
        spool = _spool_view(config) if db is None and config is not None else None
        try:
            complete = store.completeness(spool, _filed(config) if spool is not None else None)
        finally:
            if spool is not None:
                spool.close()
        seal_problems: list[str] = []
        if public is not None:
            from ..audit.seal import check_seals

            seal_problems = check_seals(store.seals(), store.days(), store.row_at, public,
                                        roots, time.strftime("%Y-%m-%d", time.gmtime()))
        filecheck = _check_files(store, config) if files and config is not None else None
    finally:
        store.close()
    if as_json:
        typer.echo(json.dumps({**result.as_dict(), "completeness": complete.as_dict(),
                               "seals": None if public is None else seal_problems,
                               **({"files": filecheck.as_dict()} if filecheck else {})},
                              indent=2))
    else:
        if result.ok:
            typer.echo(f"ok: {result.checked} records (seq {result.first_seq}.."
                       f"{result.last_seq}, {result.pseudonymised} pseudonymised,"
                       f" {result.purged} purged), head {result.head}")
        else:
            typer.echo(f"FAILED after {result.checked} good records: {result.problem}")
        if complete.ok:
            typer.echo(f"complete: {complete.checked_events} events of {complete.writers}"
                       f" spool writer(s), every received recipient has its final record or"
                       + (" is still queued" if spool is not None else
                          " is open (give -c CONFIG to check those against the spool)"))
        for problem in complete.problems:
            typer.echo(f"INCOMPLETE: {problem}")
        if public is not None and not seal_problems:
            typer.echo("sealed: every closed day's seal verifies and matches the chain")
        for problem in seal_problems:
            typer.echo(f"SEAL: {problem}")
        for line in filecheck.report() if filecheck else []:
            typer.echo(line)
    if not (result.ok and complete.ok) or seal_problems or (filecheck and not filecheck.ok):
        raise typer.Exit(1)


def _check_files(store: AuditStore, config: Path):
    """The accounting files of ``config`` against ``store`` (``audit.filecheck``)."""
    from ..audit.filecheck import check_files
    from . import _load

    cfg = _load(config)
    acc = cfg.accounting
    return check_files(store, Path(acc.directory), list(acc.formats), list(acc.fields),
                       _published(cfg))


def _published(cfg: Config) -> dict | None:
    """The accounting position a cluster's database holds for the node of ``cfg`` (the newer
    of it and the position file says what the files hold: ``read_position``)."""
    from ..spool.outbox import cluster_position

    return cluster_position(cfg.node.spool, cfg.cluster.schema_name, cfg.node.name)


def _seal_checkers(public_key: Path | None, tsa_ca: Path | None) -> tuple:
    """The public key and TSA roots to check seals with (None, None: seals not checked)."""
    if public_key is None:
        if tsa_ca is not None:
            raise typer.BadParameter("--tsa-ca checks the seals' time-stamps: give --public-key")
        return None, None
    from cryptography import x509

    from ..audit.seal import load_public

    try:
        public = load_public(public_key)
        roots = x509.load_pem_x509_certificates(tsa_ca.read_bytes()) if tsa_ca else None
    except (OSError, ValueError) as exc:
        raise typer.BadParameter(str(exc)) from None
    return public, roots


@app.command("seal-key")
def seal_key(out: Path = typer.Option(..., "--out", help="the private key file to create (0600);"
                                      " its public half goes to OUT.pub"),
             as_json: bool = typer.Option(False, "--json")) -> None:
    """Make the Ed25519 key that seals each day's head. Keep the private file apart from the
    store (set audit.seal_key); give the .pub file to whoever verifies."""
    from ..audit.seal import generate_key, key_id, load_public

    try:
        public = generate_key(out)
    except FileExistsError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(2) from None
    kid = key_id(load_public(public))
    typer.echo(json.dumps({"key": str(out), "public_key": str(public), "key_id": kid})
               if as_json else f"seal key {out} (0600), public key {public} (key id {kid})")


@app.command()
def seal(config: Path | None = _CONFIG, db: str | None = _DB, schema: str = _SCHEMA,
         key: Path | None = typer.Option(None, "--key", help="seal key (default: audit.seal_key)"),
         open_day: bool = typer.Option(False, "--open-day",
                                       help="also seal today's records so far (a checkpoint)"),
         tsa_url: str | None = typer.Option(None, "--tsa-url",
                                            help="RFC 3161 TSA (default: audit.tsa_url)"),
         as_json: bool = typer.Option(False, "--json")) -> None:
    """Seal every closed (UTC) day that has no seal yet (a node with audit.seal_key does this
    by itself every audit.seal_interval)."""
    from ..audit.seal import load_private, seal_days

    timeout = 10.0
    if config is not None:
        from . import _load

        cfg = _load(config).audit
        key = key or (Path(cfg.seal_key) if cfg.seal_key else None)
        tsa_url = tsa_url or cfg.tsa_url
        timeout = cfg.tsa_timeout
    if key is None:
        raise typer.BadParameter("no seal key: give --key or set audit.seal_key")
    try:
        private = load_private(key)
    except (OSError, ValueError) as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(2) from None
    store = _open(config, db, schema, write=True)
    try:
        made = seal_days(store, private, time.time(), open_day=open_day, tsa_url=tsa_url,
                         tsa_timeout=timeout)
    except Exception as exc:  # noqa: BLE001 - a TSA that refuses or is away: say so
        typer.echo(f"sealing failed: {exc}", err=True)
        raise typer.Exit(1) from None
    finally:
        store.close()
    if as_json:
        typer.echo(json.dumps([m.as_dict() for m in made]))
        return
    for m in made:
        typer.echo(f"sealed {m.day} up to seq {m.last_seq} ({m.records} records)"
                   + (", time-stamped" if m.tsa else ""))
    if not made:
        typer.echo("nothing to seal")


def _filed(config: Path | None) -> dict[str, int] | None:
    """Each spool writer's last event in the node's accounting files (their position file),
    to find records the store lost that the files hold."""
    from ..accounting.log import read_position
    from . import _load

    if config is None:
        return None
    cfg = _load(config)
    feed = read_position(Path(cfg.accounting.directory), published=_published(cfg)).get("feed")
    try:
        return {str(w): int(n) for w, n in feed.items()} if feed is not None else None
    except (ValueError, TypeError, AttributeError):
        return None


def _spool_view(config: Path):
    """The node's spool, read-only, for completeness (None if it cannot be opened)."""
    from ..spool.outbox import open_outbox
    from . import _load

    cfg = _load(config)
    try:
        return open_outbox(cfg.node.spool, cfg.cluster.schema_name, "")
    except Exception as exc:  # noqa: BLE001 - verify the store without it, and say so
        typer.echo(f"spool not readable ({exc}): completeness checked without it", err=True)
        return None


@app.command("export")
def export_cmd(out: Path = typer.Option(..., "--out", help="directory for the evidence files"),
               config: Path | None = _CONFIG, db: str | None = _DB, schema: str = _SCHEMA,
               since: str | None = typer.Option(None, help="records logged at or after"),
               until: str | None = typer.Option(None, help="records logged before"),
               cls: str | None = typer.Option(None, "--class"),
               as_json: bool = typer.Option(False, "--json", help="print the manifest")) -> None:
    """An evidence file set for a regulator: records.csv, chain.jsonl, manifest.json."""
    from ..audit.evidence import export

    if out.exists() and (not out.is_dir() or any(out.iterdir())):  # never over evidence
        typer.echo(f"error: {out} exists and is not empty: an export goes into a new folder",
                   err=True)
        raise typer.Exit(1)
    store = _open(config, db, schema)
    try:
        manifest = export(store, out, parse_when(since), parse_when(until), cls)
    except OSError as exc:  # a folder it cannot make or write
        typer.echo(f"error: cannot write the export to {out}: {exc.strerror or exc}", err=True)
        raise typer.Exit(1) from None
    finally:
        store.close()
    if as_json:
        typer.echo(json.dumps(manifest, indent=2))
        return
    verdict = "chain verified" if manifest["store_verification"]["ok"] else \
        f"CHAIN BROKEN: {manifest['store_verification']['problem']}"
    typer.echo(f"{out}: {manifest['records']} records; {verdict}")


@app.command()
def sla(config: Path | None = _CONFIG, db: str | None = _DB, schema: str = _SCHEMA,
        start: str = typer.Option(..., "--from", help="messages queued at or after"),
        end: str = typer.Option(..., "--to", help="messages queued before"),
        cls: str | None = typer.Option(None, "--class"),
        fmt: Format = typer.Option(Format.text, "--format",
                                   help="text, json, or csv (one summary row per class)")) -> None:
    """SLA compliance per class over deliverable messages, p50/p95/p99, every breach and
    non-delivery with its cause."""
    from ..audit.sla import render_sla, render_sla_csv, sla_report

    since, until = parse_when(start), parse_when(end)
    assert since is not None and until is not None
    store = _open(config, db, schema)
    try:
        report = sla_report(store, since, until, cls)
    finally:
        store.close()
    if fmt is Format.json:
        typer.echo(json.dumps(report, indent=2))
    elif fmt is Format.csv:
        typer.echo(render_sla_csv(report), nl=False)
    else:
        typer.echo(render_sla(report), nl=False)


@app.command()
def purge(config: Path = typer.Option(..., "-c", "--config", help="node config (retention)"),
          db: str | None = _DB, schema: str = _SCHEMA,
          as_json: bool = typer.Option(False, "--json", help="one JSON object")) -> None:
    """Apply the retention policy now (a running node also does so every purge_interval)."""
    from ..audit.service import load_key, retention_policies
    from . import _load

    cfg = _load(config)
    policies = retention_policies(cfg)
    if not policies:
        typer.echo("{}" if as_json else
                   "no retention configured in [audit.retention]; nothing to do")
        return
    key = load_key(cfg.audit.pseudonymisation_key) if cfg.audit.pseudonymisation_key else None
    store = _open(config, db, schema, write=True)
    try:
        report = store.purge(policies, key, time.time())
    finally:
        store.close()
    if not report:  # PostgresAuditStore: one node purges at a time
        typer.echo("another node is applying retention to this store right now; nothing done")
        raise typer.Exit(1)
    if as_json:
        typer.echo(json.dumps(report))
        return
    for cls, counts in report.items():
        typer.echo(f"{cls}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
