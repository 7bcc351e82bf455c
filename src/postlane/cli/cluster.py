"""Operating a cluster: who is alive, who holds which work, and draining a node.

``cluster_status`` (monitor/membership.py) returns plain data (the HTTP API can serve it as is);
``postlane cluster`` prints it and asks a node to drain (through ``operations.request_drain``,
on the record as the local user). Both use the shared PostgreSQL spool directly, so they work
from any machine that reaches the database, with no node running there.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from pathlib import Path

import typer

from ..accounting.records import Record
from ..config import Config
from ..monitor.membership import cluster_status, node_state, summarize
from ..operations import Operator, forget_node, request_drain
from ..spool import PostgresSpool, is_dsn
from ..spool.membership import NodeNotForgotten, NodeNotRunning
from ..spool.outbox import post

__all__ = ["cluster_app", "cluster_status", "node_state", "summarize"]

cluster_app = typer.Typer(no_args_is_help=True,
                          help="Cluster mode (node.spool is a PostgreSQL DSN): status, drain.")


def _spool(config: Config) -> PostgresSpool:
    if not is_dsn(config.node.spool):
        typer.echo("node.spool is not a PostgreSQL DSN: this node does not run in cluster mode",
                   err=True)
        raise typer.Exit(2)
    return PostgresSpool(config.node.spool, config.cluster.schema_name)


async def _with_spool(config: Config, work):
    spool = _spool(config)
    await spool.open()
    try:
        return await work(spool)
    finally:
        await spool.close()


def _on_record(cfg: Config, node: str, act: Callable[..., Awaitable[bool]],
               refused: type[Exception], done: str) -> None:
    """``act`` on ``node`` as the local user, then its record onto the audit trail; a refusal
    (``refused``), an unknown node or a record that could not be written exits 1."""
    made: list[Record] = []
    try:
        found = asyncio.run(_with_spool(cfg, lambda s: act(
            s, node, who=Operator.local(), record=made.append)))
    except refused as exc:
        typer.echo(f"postlane: {exc}", err=True)
        raise typer.Exit(1) from None
    if not found:
        typer.echo(f"no node named {node!r} in the cluster", err=True)
        raise typer.Exit(1)
    try:  # the action is taken: its record follows it onto the audit trail
        post(cfg.node.spool, cfg.cluster.schema_name, cfg.node.name, made)
    except Exception as exc:  # noqa: BLE001 - say it, do not hide what was done
        typer.echo(f"postlane: {done} but its record could not be written to the spool: {exc}",
                   err=True)
        raise typer.Exit(1) from None


@cluster_app.command("status")
def status(config: Path = typer.Option(..., "-c", "--config", help="TOML config file"),
           as_json: bool = typer.Option(False, "--json", help="print one JSON object")) -> None:
    """Show the cluster's nodes, their heartbeats and claimed work, and the shared queue."""
    from . import _load

    cfg = _load(config)
    out = asyncio.run(_with_spool(cfg, lambda s: cluster_status(s, cfg.cluster)))
    if as_json:
        typer.echo(json.dumps(out))
        return
    typer.echo(f"cluster schema {out['schema']}: {len(out['nodes'])} node(s)")
    for n in out["nodes"]:
        state = n["state"].upper() if n["state"] in ("suspect", "dead") else n["state"]
        line = (f"  {n['name']:<20} {state:<8} heartbeat {n['heartbeat_age_s']:>6}s ago"
                f"  session {'open' if n['session'] else 'CLOSED':<6}  claimed {n['claimed']:>6}"
                f"  {n['hostname']} pid {n['pid']}")
        if n["takeover_in_s"] is not None and n["claimed"]:
            when = (f"in {n['takeover_in_s']:.1f}s" if n["takeover_in_s"] else
                    "at the next poll")
            line += f"  -> {n['claimed']} unowned, taken over {when}"
        typer.echo(line)
    for name, p in sorted(out["pools"].items()):
        typer.echo(f"  pool {name:<15} queued {p['queued']:>7}  deferred {p['deferred']:>7}"
                   f"  claimed {p['claimed']:>6}  unowned {p['unowned']:>6}"
                   f"  on hold {p.get('on_hold', 0):>6}")
    if out["paused"]:
        typer.echo(f"  paused: {', '.join(out['paused'])}")


@cluster_app.command("forget")
def forget(node: str = typer.Argument(..., help="name of the dead node to remove"),
           config: Path = typer.Option(..., "-c", "--config", help="TOML config file"),
           as_json: bool = typer.Option(False, "--json", help="print one JSON object")) -> None:
    """Remove a dead node that will not come back from the cluster's list (it stays listed
    DEAD, and counted as dead in /metrics, until it comes back under its name)."""
    from . import _load

    _on_record(_load(config), node, forget_node, NodeNotForgotten, f"{node} is forgotten")
    typer.echo(json.dumps({"node": node, "forgotten": True}) if as_json
               else f"{node}: removed from the cluster's nodes")


@cluster_app.command("drain")
def drain(node: str = typer.Argument(..., help="name of the node to drain"),
          config: Path = typer.Option(..., "-c", "--config", help="TOML config file"),
          as_json: bool = typer.Option(False, "--json", help="print one JSON object")) -> None:
    """Ask a node to stop claiming, finish what it holds, give the rest back and exit."""
    from . import _load

    cfg = _load(config)
    _on_record(cfg, node, request_drain, NodeNotRunning, "the drain is requested")
    within = round(cfg.cluster.lease / 3)
    typer.echo(json.dumps({"node": node, "drain_requested": True, "within_s": within})
               if as_json else f"{node}: drain requested (it stops within {within}s)")
