"""``postlane feedback parse`` and ``postlane suppress ...``.

The suppress commands open the node's suppression database directly (SQLite WAL allows it while
the node runs), so they work whether or not the node is up. Changes go through
``operations.Suppressions`` as the local user, and their records into the spool's outbox, so
the audit trail has them (given ``--config``, which says where the spool is).
"""

from __future__ import annotations

import contextlib
import io
import json
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import typer

from ..accounting.records import Record
from ..config import Config
from ..feedback.categories import RulesError, load_classifier
from ..feedback.parse import parse_report
from ..feedback.suppression import (
    SCOPES,
    SuppressionError,
    SuppressionList,
    SuppressionOutdated,
    csv_text,
)
from ..operations import Operator, Suppressions
from ..secretfile import NotTheOwner, as_the_owner, private_open
from ..spool import is_dsn, local_dir
from ..spool.hold import locked
from ..spool.outbox import post

feedback_app = typer.Typer(no_args_is_help=True, help="Bounce, DSN and complaint reports.")
suppress_app = typer.Typer(no_args_is_help=True,
                           help="The suppression list (scope all, best-effort or marketing).")

_CONFIG = typer.Option(None, "-c", "--config", help="node config (locates the database)")
_DB = typer.Option(None, "--db", help="suppression database file (instead of --config)")
_JSON = typer.Option(False, "--json", help="JSON (one object per line)")


@feedback_app.command("parse")
def parse(files: list[Path] = typer.Argument(..., help="messages (.eml), '-' for stdin"),
          rules: Path | None = typer.Option(None, help="extra bounce rules (TOML)")) -> None:
    """Print one JSON object per message: kind and, per recipient, address, action, status,
    permanent/temporary and category."""
    try:
        classifier = load_classifier(rules)
    except RulesError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(2) from None
    failed = 0
    for path in files:
        try:
            data = sys.stdin.buffer.read() if str(path) == "-" else path.read_bytes()
        except OSError as exc:
            typer.echo(f"{path}: cannot read: {exc.strerror}", err=True)
            failed += 1
            continue
        out = {"file": str(path), **parse_report(data, classifier).as_dict()}
        typer.echo(json.dumps(out, ensure_ascii=False))
    raise typer.Exit(1 if failed else 0)


def _config(config: Path | None) -> Config | None:
    from . import _load  # the one place config errors are printed

    return None if config is None else _load(config)


def _open(config: Path | None, db: Path | None) -> SuppressionList:
    return _list(_config(config) if db is None else None, db)


def _list(cfg: Config | None, db: Path | None, write: bool = False) -> SuppressionList:
    if db is None:
        if cfg is None:
            typer.echo("give --config FILE or --db FILE", err=True)
            raise typer.Exit(2)
        db = Path(cfg.feedback.suppression_db or local_dir(cfg) / "suppression.sqlite3")
    if write:  # the list and the spool's outbox are the node's files
        try:
            as_the_owner(db.parent)
            if cfg is not None and not is_dsn(cfg.node.spool):
                as_the_owner(local_dir(cfg))
        except NotTheOwner as exc:
            typer.echo(f"postlane: {exc}", err=True)
            raise typer.Exit(1) from None
    # A list of the previous release is migrated only while no node runs on it: between
    # ``pip install --upgrade`` and the restart the old node still writes to it, and its
    # writes fail on the new schema. Without the config, whose node it is is unknown.
    running = cfg is None or locked(Path(cfg.accounting.directory))
    try:
        return SuppressionList(db, migrate=not running)
    except SuppressionOutdated as exc:
        typer.echo(f"postlane: {exc}" + (
            ": start the node on it, or run `postlane upgrade`, first" if cfg is None else
            " and a node runs on it: restart the node on this release (it migrates the list"
            " as it opens it), then try again"), err=True)
        raise typer.Exit(1) from None


@contextlib.contextmanager
def _changing(config: Path | None, db: Path | None) -> Iterator[Suppressions]:
    """The list, to change on the record as the local user: the records go into the spool's
    outbox when the command ends (even after an error, for the changes made before it), and
    wait in the list until then."""
    cfg = _config(config)
    store = _list(cfg, db, write=True)
    made: list[Record] = []
    # each change with its record waiting in the list: killed before the post, the node's
    # next start writes them (``Operations.record_pending``); --db alone has no spool
    waiting: list[int] | None = [] if cfg is not None else None
    try:
        yield Suppressions(store, made.append, waiting)
    finally:
        try:
            if made and cfg is None:
                typer.echo("postlane: not on the audit trail: give -c CONFIG (it says where"
                           " the spool is) so that the change is recorded", err=True)
            elif made and cfg is not None:
                try:
                    post(cfg.node.spool, cfg.cluster.schema_name, cfg.node.name, made)
                except Exception as exc:  # noqa: BLE001 - say it, do not hide the change made
                    typer.echo(f"postlane: the change is made but its record could not be"
                               f" written to the spool now ({exc}): the node writes it at"
                               " its next start", err=True)
                    raise typer.Exit(1) from None
                if waiting:
                    store.settle(waiting)
        finally:
            store.close()


def _scope(value: str) -> str:
    if value not in SCOPES:
        typer.echo(f"unknown scope {value!r} (use one of: {', '.join(SCOPES)})", err=True)
        raise typer.Exit(2)
    return value


@suppress_app.command("add")
def add(addresses: list[str] = typer.Argument(...),
        scope: str = typer.Option("marketing", help="all | best-effort | marketing"),
        reason: str = typer.Option("", help="why (shown in the 550 reply and the export)"),
        config: Path | None = _CONFIG, db: Path | None = _DB, as_json: bool = _JSON) -> None:
    """Suppress addresses."""
    who = Operator.local()
    try:
        with _changing(config, db) as lst:
            for address in addresses:
                entry = lst.add(address, _scope(scope), reason, who=who)
                typer.echo(json.dumps(entry.as_dict()) if as_json else
                           f"suppressed {entry.address} ({entry.scope})")
    except SuppressionError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(2) from None


@suppress_app.command("remove")
def remove(addresses: list[str] = typer.Argument(...),
           scope: str | None = typer.Option(None, help="all | best-effort | marketing"
                                                       " (default: every scope)"),
           config: Path | None = _CONFIG, db: Path | None = _DB, as_json: bool = _JSON) -> None:
    """Lift suppressions."""
    who = Operator.local()
    missing = 0
    try:
        with _changing(config, db) as lst:
            for address in addresses:
                n = lst.remove(address, _scope(scope) if scope else None, who=who)
                typer.echo(json.dumps({"address": address, "removed": n}) if as_json else
                           f"{address}: {n} entr{'y' if n == 1 else 'ies'} removed")
                missing += n == 0
    except SuppressionError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(2) from None
    raise typer.Exit(1 if missing else 0)


@suppress_app.command("list")
def list_(scope: str | None = typer.Option(None), like: str | None = typer.Option(
              None, help="address pattern, * as wildcard"),
          limit: int = typer.Option(100), offset: int = typer.Option(0),
          as_json: bool = _JSON, config: Path | None = _CONFIG, db: Path | None = _DB) -> None:
    """Show entries in force (address order): scope, source, since when, until when, why."""
    store = _open(config, db)
    try:
        entries = store.list(_scope(scope) if scope else None, like, limit, offset)
    finally:
        store.close()
    if not entries and not as_json:  # on stderr: a script reading the lines gets none
        typer.echo("no entries" + (" at this offset" if offset else "")
                   + (" match" if scope or like else " in force"), err=True)
    for e in entries:
        if as_json:
            typer.echo(json.dumps(e.as_dict()))
        else:
            typer.echo(f"{e.address}\t{e.scope}\t{e.source}\tsince {_when(e.created)}\t"
                       f"until {_when(e.expires) if e.expires else 'removed'}\t{e.reason}")


def _when(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S")


@suppress_app.command("import")
def import_(file: Path = typer.Argument(
        ..., help="CSV: address\\[,scope,reason,source,created,expires]"),
            scope: str = typer.Option("marketing", help="scope of rows that name none"),
            config: Path | None = _CONFIG, db: Path | None = _DB, as_json: bool = _JSON) -> None:
    """Import a CSV file (all rows or none)."""
    try:
        text = csv_text(file.read_bytes())
        with _changing(config, db) as lst:
            n = lst.import_csv(io.StringIO(text, newline=""), _scope(scope),
                               who=Operator.local())
    except (OSError, SuppressionError) as exc:
        typer.echo(f"{file}: {exc}", err=True)
        raise typer.Exit(2) from None
    typer.echo(json.dumps({"imported": n}) if as_json else f"imported {n} entries")


@suppress_app.command("export")
def export(file: Path | None = typer.Argument(None, help="CSV file (default: stdout)"),
           config: Path | None = _CONFIG, db: Path | None = _DB, as_json: bool = _JSON) -> None:
    """Export every entry in force as CSV (address,scope,reason,source,created,expires)."""
    store = _open(config, db)
    try:
        if file is None:
            store.export_csv(sys.stdout)
        else:
            try:
                with private_open(file, newline="", encoding="utf-8") as out:
                    n = store.export_csv(out)
            except OSError as exc:
                typer.echo(f"{file}: cannot write: {exc.strerror or exc}", err=True)
                raise typer.Exit(1) from None
            if as_json:
                typer.echo(json.dumps({"exported": n, "file": str(file)}))
            else:
                typer.echo(f"exported {n} entries to {file}", err=True)
    finally:
        store.close()
