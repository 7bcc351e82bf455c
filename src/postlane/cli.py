"""The ``postlane`` command."""

from __future__ import annotations

from pathlib import Path

import typer

from .cluster import cluster_app
from .config import ConfigError, load_config

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Postlane: a priority-aware MTA for regulated transactional email.")
config_app = typer.Typer(no_args_is_help=True, help="Check configuration files.")
app.add_typer(config_app, name="config")
app.add_typer(cluster_app, name="cluster")


def _load(path: Path):
    try:
        return load_config(path)
    except ConfigError as exc:
        typer.echo(f"{exc.source}: configuration is not valid:", err=True)
        for line in exc.errors:
            typer.echo(f"  {line}", err=True)
        raise typer.Exit(2) from None


@config_app.command("check")
def config_check(path: Path = typer.Argument(..., help="TOML config file")) -> None:
    """Validate a config file; print every error with the field it is about."""
    cfg = _load(path)
    typer.echo(f"{path}: ok ({len(cfg.classes)} classes, {len(cfg.pools)} pools,"
               f" {sum(len(p.ips) for p in cfg.pools.values())} source IPs,"
               f" {len(cfg.listeners)} listeners)")


@app.command()
def serve(config: Path = typer.Option(..., "-c", "--config", help="TOML config file"),
          log_level: str = typer.Option("INFO", help="DEBUG, INFO, WARNING")) -> None:
    """Run a node until SIGTERM (which drains: 421 to new mail, in-flight deliveries finish)."""
    from .node import run, setup_logging

    cfg = _load(config)
    setup_logging(log_level.upper())
    run(cfg)


@app.command()
def demo(workdir: Path = typer.Option(Path("demo-run"), help="where the demo keeps its spool"),
         marketing: int = typer.Option(20000, help="size of the marketing campaign"),
         quick: bool = typer.Option(False, help="a few messages per class only")) -> None:
    """The case study end to end on this machine, with a per-class report."""
    from .demo import run_demo

    raise typer.Exit(run_demo(workdir, marketing=marketing, quick=quick))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
