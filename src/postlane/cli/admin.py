"""``postlane init``, ``dns checklist|check``, ``backup``, ``restore`` and ``upgrade``."""

from __future__ import annotations

import json
from pathlib import Path

import typer

__all__ = ["backup", "dns_app", "init", "restore", "upgrade"]

dns_app = typer.Typer(no_args_is_help=True, help="The DNS records a node needs, and a check of"
                                                 " what is published.")
_CONFIG = typer.Option(..., "-c", "--config", help="TOML config file")
_JSON = typer.Option(False, "--json", help="one JSON object")


def _config(path: Path):
    from . import _load  # the one place config errors are printed

    return _load(path)


def init(directory: Path = typer.Argument(..., help="new folder for the node's files"),
         hostname: str = typer.Option(..., help="the node's name: greeting, MX target"),
         domain: str = typer.Option(..., help="the sending domain (From, DKIM d=)"),
         ip: list[str] = typer.Option(
             [], "--ip", help="a dedicated source IP (repeat; at least 4, dealt to the four"
                              " pools in turn); default loopback placeholders 127.0.0.10-17"),
         listen: str = typer.Option("0.0.0.0:587", help="submission listener ADDRESS:PORT"),
         inbound: str = typer.Option("0.0.0.0:25", help="listener for bounces and reports"),
         api: str = typer.Option("127.0.0.1:8025", help="HTTP API and dashboard"),
         smarthost: str | None = typer.Option(None, help="send all mail to HOST:PORT"),
         state_dir: str = typer.Option("var", help="spool and accounting files (relative:"
                                                   " inside DIRECTORY)"),
         node_name: str = typer.Option("postlane-1", help="unique in a cluster"),
         as_json: bool = _JSON) -> None:
    """Write a commented config (the four classes of the case study), DKIM keys, a self-signed
    TLS certificate and the API token into DIRECTORY, and print the DNS checklist."""
    from ..admin.dnsrecords import checklist
    from ..admin.firstrun import DEFAULT_IPS, InitError, InitOptions, write_node
    from ..startup import ConfigError, load_config

    opts = InitOptions(directory=directory, hostname=hostname.lower().rstrip("."),
                       domain=domain.lower().rstrip("."), ips=ip or list(DEFAULT_IPS),
                       listen=listen, inbound=inbound, api=api, smarthost=smarthost,
                       state_dir=state_dir, node_name=node_name)
    try:
        written = write_node(opts)
        cfg = load_config(directory / "postlane.toml")
    except (InitError, ConfigError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    except OSError as exc:
        typer.echo(f"error: {exc.filename or directory}: {exc.strerror}", err=True)
        raise typer.Exit(1) from None
    if as_json:
        typer.echo(json.dumps({"config": str(directory / "postlane.toml"),
                               "files": [str(p) for p in written],
                               "dns": _records(cfg)}, indent=2))
        return
    typer.echo(f"wrote {directory}:")
    for path in written:
        typer.echo(f"  {path.relative_to(directory)}"
                   + ("   (0600)" if path.stat().st_mode & 0o077 == 0 else ""))
    typer.echo(f"\n{checklist(cfg)}\n")
    config = directory / "postlane.toml"
    typer.echo(f"Next: read {config}, then\n"
               f"  postlane config check {config}\n"
               f"  postlane serve -c {config}\n"
               f"  postlane dns check -c {config}     # once the records are published")


def _records(cfg) -> list[dict]:
    from ..admin.dnsrecords import expected

    return [{"name": r.name, "type": r.rtype, "value": r.value, "kind": r.kind, "note": r.note}
            for r in expected(cfg)]


@dns_app.command("checklist")
def dns_checklist(config: Path = _CONFIG, as_json: bool = _JSON) -> None:
    """Print the records to publish: A/AAAA and PTR of every pool IP, SPF, DKIM, DMARC, MX,
    MTA-STS and TLS-RPT."""
    from ..admin.dnsrecords import checklist, mta_sts_policy

    cfg = _config(config)
    if as_json:
        typer.echo(json.dumps({"records": _records(cfg), "mta_sts_policy": mta_sts_policy(cfg)},
                              indent=2))
        return
    typer.echo(checklist(cfg))


@dns_app.command("check")
def dns_check(config: Path = _CONFIG,
              nameserver: str | None = typer.Option(
                  None, help="ask this resolver (IP or IP:PORT) instead of \\[dns] or the"
                             " system's"),
              as_json: bool = _JSON) -> None:
    """Look every record up and say what is missing or wrong; exit 1 unless all are ok."""
    from ..admin.dnsrecords import check, make_resolver

    cfg = _config(config)
    try:
        resolver = make_resolver(cfg, nameserver)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--nameserver") from None
    results = check(cfg, resolver)
    bad = [r for r in results if r.status != "ok"]
    if as_json:
        typer.echo(json.dumps({"ok": not bad, "records": [
            {"name": r.record.name, "type": r.record.rtype, "kind": r.record.kind,
             "expected": r.record.value, "status": r.status, "detail": r.detail}
            for r in results]}, indent=2))
    else:
        for r in results:
            typer.echo(f"{r.status:<8} {r.record.name} {r.record.rtype}: {r.detail}"
                       + (f"\n         publish: {r.record.value}" if r.status != "ok" else ""))
        typer.echo(f"{len(results) - len(bad)} of {len(results)} records ok")
    raise typer.Exit(1 if bad else 0)


def backup(dest: Path = typer.Argument(..., help="new folder for the copy"),
           config: Path = _CONFIG, as_json: bool = _JSON) -> None:
    """Copy what must survive (spool, audit store, suppression list, reputation store, keys,
    feedback key, accounting files and position, config) while the node runs."""
    from ..admin.backup import BackupError
    from ..admin.backup import backup as run

    _config(config)  # a broken config is reported as such
    try:
        manifest = run(config, dest)
    except (BackupError, OSError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    if as_json:
        typer.echo(json.dumps(manifest, indent=2))
        return
    kinds: dict[str, int] = {}
    for item in manifest["items"]:
        kinds[item["kind"]] = kinds.get(item["kind"], 0) + 1
    size = sum(i["size"] for i in manifest["items"])
    typer.echo(f"backup of node {manifest['node']} in {dest}: {len(manifest['items'])} files,"
               f" {size / 1e6:.1f} MB ({kinds.get('sqlite', 0)} SQLite databases copied"
               f" online); manifest {dest / 'manifest.json'}")
    if "postgresql" in manifest:
        schema = manifest["postgresql"]["schema"]
        typer.echo("The spool, audit store and reputation store are in PostgreSQL: back them"
                   " up there, e.g.\n  pg_dump --format=custom --schema=" + schema
                   + f" --file={dest}/postgresql.dump \"$DSN\"   (docs/operations.md)")


def restore(source: Path = typer.Argument(..., help="a folder written by postlane backup"),
            directory: Path = typer.Argument(..., help="new folder for the config (and for"
                                                       " every file it names by a relative"
                                                       " path)"),
            as_json: bool = _JSON) -> None:
    """Put a backup back: the config into DIRECTORY, each file where the config names it.
    Refuses to overwrite anything; checks every file against the manifest first."""
    from ..admin.backup import BackupError
    from ..admin.backup import restore as run

    try:
        config, written = run(source, directory)
    except (BackupError, OSError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    if as_json:
        typer.echo(json.dumps({"config": str(config), "files": [str(p) for p in written]}))
        return
    typer.echo(f"restored {len(written)} files; next:\n"
               f"  postlane audit verify -c {config}\n"
               f"  postlane serve -c {config}        # delivers what was queued")


def upgrade(config: Path = _CONFIG,
            check: bool = typer.Option(False, "--check", help="only say what would change"),
            as_json: bool = _JSON) -> None:
    """Compare each store's schema with this release. --check: exit 0 when nothing is to do, 1
    when migrations are pending (the node applies them at start), 2 when a store is newer than
    this release. Without --check, migrate the SQLite stores now (with the node stopped)."""
    from ..admin.upgrade import UnreadableStore, apply, states

    cfg = _config(config)
    try:
        found = states(cfg)
        done = [] if check or any(s.status == "newer" for s in found) else apply(cfg)
    except UnreadableStore as exc:  # it names the store and its file
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    except Exception as exc:  # an unreadable store: say which, exit 2
        typer.echo(f"error: {exc.__class__.__name__}: {exc}", err=True)
        raise typer.Exit(2) from None
    if done:
        found = states(cfg)
    if as_json:
        typer.echo(json.dumps([{"store": s.store, "location": s.location, "current": s.current,
                                "latest": s.latest, "status": s.status} for s in found]))
    else:
        for s in found:
            typer.echo(f"{s.store:<17} {s.status:<8} version {s.current or '-'} of {s.latest}"
                       f"   {s.location}")
        for s in done:
            typer.echo(f"migrated {s.store}")
    if any(s.status == "newer" for s in found):
        typer.echo("a store is newer than this Postlane: install the release that wrote it, or"
                   " restore the backup taken before the upgrade", err=True)
        raise typer.Exit(2)
    raise typer.Exit(1 if any(s.status == "pending" for s in found) else 0)
