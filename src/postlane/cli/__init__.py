"""The ``postlane`` command."""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import sys
import time
from importlib.metadata import version as package_version
from pathlib import Path

import typer

from ..schema import DOWNGRADE_ADVICE, NewerSchema
from ..secretfile import UnusableFile
from ..startup import ConfigError, load_config
from .admin import backup, dns_app, init, restore, upgrade
from .api import app as api_app
from .audit import app as audit_app
from .cluster import cluster_app
from .dkim import app as dkim_app
from .edge import killtest, tls_app, users_app
from .feedback import feedback_app, suppress_app
from .ops import app as ops_app
from .queue import app as queue_app
from .reputation import dmarc_app, reputation_app, rules_app

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Postlane: a priority-aware MTA for regulated transactional email.")
config_app = typer.Typer(no_args_is_help=True, help="Check configuration files.")
app.add_typer(config_app, name="config")
app.add_typer(feedback_app, name="feedback")
app.add_typer(suppress_app, name="suppress")
app.add_typer(dkim_app, name="dkim")
app.add_typer(users_app, name="users")
app.add_typer(tls_app, name="tls")
app.command("killtest")(killtest)
app.add_typer(ops_app)  # status, queues, pause, resume, retry, purge, alerts (over the HTTP API)
app.add_typer(queue_app, name="queue")
app.add_typer(api_app, name="api")
app.add_typer(audit_app, name="audit")
app.add_typer(cluster_app, name="cluster")
app.add_typer(dmarc_app, name="dmarc")
app.add_typer(rules_app, name="rules")
app.add_typer(reputation_app, name="reputation")
app.command("init")(init)
app.command("backup")(backup)
app.command("restore")(restore)
app.command("upgrade")(upgrade)
app.add_typer(dns_app, name="dns")


def _version(value: bool) -> None:
    if value:
        typer.echo(f"postlane {package_version('postlane')}")
        raise typer.Exit()


@app.callback()
def _options(show_version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True,
        help="Print the version and exit.")) -> None:
    pass


def _load(path: Path, as_json: bool = False):
    try:
        return load_config(path)
    except ConfigError as exc:
        if as_json:
            typer.echo(json.dumps({"file": str(path), "ok": False, "errors": exc.errors}))
            raise typer.Exit(2) from None
        typer.echo(f"{exc.source}: configuration is not valid:", err=True)
        for line in exc.errors:
            typer.echo(f"  {line}", err=True)
        raise typer.Exit(2) from None


@config_app.command("check")
def config_check(path: Path = typer.Argument(..., help="TOML config file"),
                 as_json: bool = typer.Option(False, "--json", help="one JSON object")) -> None:
    """Validate a config file; print every error with the field it is about."""
    cfg = _load(path, as_json)
    counts = {"classes": len(cfg.classes), "pools": len(cfg.pools),
              "source_ips": sum(len(p.ips) for p in cfg.pools.values()),
              "listeners": len(cfg.listeners)}
    if as_json:
        typer.echo(json.dumps({"file": str(path), "ok": True, "errors": [], **counts}))
        return
    typer.echo(f"{path}: ok ({counts['classes']} classes, {counts['pools']} pools,"
               f" {counts['source_ips']} source IPs, {counts['listeners']} listeners)")


@app.command()
def serve(config: Path = typer.Option(..., "-c", "--config", help="TOML config file"),
          log_level: str = typer.Option("INFO", help="DEBUG, INFO, WARNING or ERROR")) -> None:
    """Run a node until SIGTERM (which drains: 421 to new mail, in-flight deliveries finish);
    SIGHUP reloads keys, certificates, rules and class settings without dropping mail."""
    from ..admin.service import run
    from ..logsetup import setup_logging

    if log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise typer.BadParameter("must be DEBUG, INFO, WARNING or ERROR", param_hint="--log-level")
    cfg = _load(config)
    setup_logging(log_level.upper(), cfg.node.name)
    run(cfg, config)


@app.command()
def demo(workdir: Path = typer.Option(Path("demo-run"), help="where the demo keeps its spool"),
         marketing: int = typer.Option(20000, min=1, help="size of the marketing campaign"),
         quick: bool = typer.Option(False, help="a few messages per class only")) -> None:
    """The case study end to end on this machine, with a per-class report."""
    from ..harness.demo import run_demo

    raise typer.Exit(run_demo(workdir, marketing=marketing, quick=quick))


@app.command()
def sink(host: str = typer.Option("127.0.0.1", help="address to listen on"),
         port: int = typer.Option(2600, min=0, max=65535),
         delay_ms: float = typer.Option(0.0, min=0, help="time each message takes")) -> None:
    """A recording SMTP sink that accepts every message and prints one line per arrival: the
    recipients' servers for a try-out (route mail to it with \\[routes])."""
    import asyncio

    from ..harness.sink import run_sink

    try:
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(run_sink(host, port, delay_ms / 1000, typer.echo))
    except OSError as exc:  # the port is taken, the address is not this machine's
        why = os.strerror(exc.errno) if exc.errno and exc.errno > 0 else exc.strerror or exc
        typer.echo(f"postlane sink: cannot listen on {host}:{port}: {why}", err=True)
        raise typer.Exit(1) from None


@app.command()
def bench(marketing: int | None = typer.Option(
              None, help="messages in the marketing campaign (default 20000; with"
                         " --queued-behind 0: the campaign waits behind its paused pool)"),
          transactional_rate: float = typer.Option(10.0, help="transactional messages per second"),
          sink_delay_ms: float = typer.Option(0.0, help="time the sink takes per message"),
          message_kb: float = typer.Option(10.0, help="message size in KB (fractions allowed)"),
          baseline: str = typer.Option("lanes", help="lanes (Postlane) or fifo (one queue)"),
          dkim: str = typer.Option("none", help="sign every message: none, rsa (2048) or ed25519"),
          audit: bool = typer.Option(True, help="write the audit store (--no-audit to compare)"),
          sink_tls: str = typer.Option(
              "none", help="none (the sink offers no STARTTLS: every class sends in clear), "
                           "starttls (the classes' own TLS policies) or verified (every class "
                           "verifies the sink's certificate)"),
          spool: str | None = typer.Option(None, help="a PostgreSQL DSN: run the node on it"),
          nodes: int | None = typer.Option(
              None, help="with --spool: this many nodes on one schema, each with its own "
                         "listener and pool IPs; load spread over them"),
          config: Path | None = typer.Option(None, "--config", "-c",
                                             help="base config (default examples/insurance.toml)"),
          connections: int = typer.Option(16, help="SMTP connections submitting the campaign"),
          workers: str = typer.Option("1", help="the node's \\[node] workers: SMTP intake "
                                                "processes, a number or auto (one per core)"),
          no_pipelining: bool = typer.Option(
              False, "--no-pipelining", help="the load generator sends each SMTP command and"
                                             " waits for its reply (a plain client)"),
          reconnect_every: int = typer.Option(
              0, help="each submitting connection QUITs and reconnects every N messages"
                      " (0: never)"),
          domains: int = typer.Option(20, help="recipient domains of the campaign (1 allowed)"),
          sink_no_pipelining: bool = typer.Option(
              False, "--sink-no-pipelining", help="the sink does not advertise PIPELINING"),
          queued_behind: int = typer.Option(
              0, help="first pause the marketing pool and queue N campaign messages behind it;"
                      " report RSS and the time of /metrics and /api/v1/status"),
          seed_queue: bool = typer.Option(
              False, "--seed-queue", help="with --queued-behind: write the queue into the spool"
                                          " before the node starts (as after a restart)"),
          transactional_seconds: float = typer.Option(
              0.0, help="run the transactional stream at least this long"),
          node_from: Path | None = typer.Option(
              None, help="run the node from this checkout's .venv (its own bench config); the"
                         " load, sink and measurements stay this one's"),
          as_json: bool = typer.Option(False, "--json", help="print only the JSON line")) -> None:
    """The case study as a benchmark: prints one JSON line (docs/design.md, section 8)."""
    from ..harness.bench import BenchOptions, BenchSetupError, result_json, run_bench

    if baseline not in ("lanes", "fifo"):
        raise typer.BadParameter("must be 'lanes' or 'fifo'", param_hint="--baseline")
    if spool is not None and not spool.startswith(("postgresql://", "postgres://")):
        raise typer.BadParameter("must be a postgresql:// DSN", param_hint="--spool")
    if nodes is not None and spool is None:
        raise typer.BadParameter("needs --spool postgresql://…: the nodes share one queue there",
                                 param_hint="--nodes")
    if nodes is not None and not 1 <= nodes <= 8:
        raise typer.BadParameter("must be 1 to 8", param_hint="--nodes")
    if dkim not in ("none", "rsa", "ed25519"):
        raise typer.BadParameter("must be 'none', 'rsa' or 'ed25519'", param_hint="--dkim")
    if sink_tls not in ("none", "starttls", "verified"):
        raise typer.BadParameter("must be 'none', 'starttls' or 'verified'",
                                 param_hint="--sink-tls")
    if marketing is None:
        marketing = 0 if queued_behind else 20000
    if marketing and queued_behind:
        raise typer.BadParameter("the campaign's pool is paused with --queued-behind: its"
                                 " messages would wait too", param_hint="--marketing")
    if marketing < 0 or transactional_rate < 0 or message_kb <= 0 or connections < 1 \
            or reconnect_every < 0 or domains < 1 or queued_behind < 0 \
            or transactional_seconds < 0:
        raise typer.BadParameter("counts and rates must be positive")
    if (queued_behind or node_from is not None) and nodes is not None:
        raise typer.BadParameter("--queued-behind and --node-from run one node",
                                 param_hint="--nodes")
    if workers != "auto" and not (workers.isdigit() and 1 <= int(workers) <= 256):
        raise typer.BadParameter("must be a number from 1 to 256 or auto", param_hint="--workers")
    if config is not None:
        _load(config)
    opts = BenchOptions(workers=workers, marketing=marketing, transactional_rate=transactional_rate,
                        sink_delay_ms=sink_delay_ms, message_kb=message_kb, baseline=baseline,
                        dkim=dkim, audit=audit, spool=spool, nodes=nodes,
                        config=config, connections=connections, sink_tls=sink_tls,
                        pipelining=not no_pipelining, reconnect_every=reconnect_every,
                        domains=domains, sink_pipelining=not sink_no_pipelining,
                        queued_behind=queued_behind, seed_queue=seed_queue,
                        transactional_seconds=(
                            transactional_seconds or (20.0 if queued_behind else 0.0)),
                        node_from=node_from.resolve() if node_from else None)

    last = [0.0]

    def tick(p) -> None:
        if as_json or time.monotonic() - last[0] < 2:
            return
        last[0] = time.monotonic()
        typer.echo(f"[{p.phase}] queued {p.queued_behind}, "
                   f"accepted {p.marketing_accepted}/{p.marketing_total} marketing,"
                   f" {p.transactional_sent} transactional, delivered {p.delivered}", err=True)

    try:
        result = run_bench(opts, tick)
    except BenchSetupError as exc:  # e.g. --nodes with pool IPs not on loopback
        raise typer.BadParameter(str(exc), param_hint="--nodes") from None
    typer.echo(result_json(result))


def main() -> None:
    """The ``postlane`` command. An error no command foresaw (a path that cannot be made, a
    file that is not what it should be) is one line on stderr and exit 1: a traceback in an
    operator's terminal reads as a crash and hides the one fact that matters. A store newer
    than this release (a downgrade) is refused with the advice ``serve`` gives, exit 2.
    ``serve`` keeps its tracebacks (a node that dies needs them in the journal), as does
    POSTLANE_DEBUG=1."""
    try:
        app()
    except NewerSchema as exc:  # a downgrade: a refusal with its advice, as serve gives it
        if os.environ.get("POSTLANE_DEBUG"):
            raise
        typer.echo(f"postlane: {exc}: {DOWNGRADE_ADVICE}", err=True)
        raise SystemExit(2) from None
    except Exception as exc:
        if os.environ.get("POSTLANE_DEBUG") or sys.argv[1:2] == ["serve"]:
            raise
        typer.echo(f"postlane: {_unforeseen(exc)}", err=True)
        raise SystemExit(1) from None


def _unforeseen(exc: Exception) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.filename}: {exc.strerror}" if exc.filename else exc.strerror
    if isinstance(exc, sqlite3.Error):
        return f"SQLite: {exc}"
    if isinstance(exc, UnusableFile):
        return str(exc)
    return (f"{type(exc).__name__}: {exc} (unexpected; POSTLANE_DEBUG=1 shows where, for a bug"
            " report)")


if __name__ == "__main__":
    main()
