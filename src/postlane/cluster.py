"""Operating a cluster: who is alive, who holds which work, and draining a node.

``cluster_status`` returns plain data (the HTTP API can serve it as is); ``postlane cluster``
prints it and asks a node to drain. Both read the shared PostgreSQL spool directly, so they work
from any machine that reaches the database, with no node running there.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import typer

from .config import Config
from .spool import PostgresSpool, is_dsn

cluster_app = typer.Typer(no_args_is_help=True,
                          help="Cluster mode (node.spool is a PostgreSQL DSN): status, drain.")


async def cluster_status(spool: PostgresSpool, lease: float = 30.0) -> dict:
    """Nodes with their heartbeats and claimed work, and the shared queue per pool.

    A node is ``alive`` while its last heartbeat is younger than ``lease``; ``unowned`` counts
    recipients still marked with a lease that ran out (a dead node's work not yet taken over).
    """
    now = await spool.now()
    nodes = {n.name: {"name": n.name, "hostname": n.hostname, "pid": n.pid,
                      "started_at": n.started_at,
                      "heartbeat_age_s": round(now - n.heartbeat, 1),
                      "alive": now - n.heartbeat < lease, "draining": n.draining,
                      "claimed": 0, "claimed_by_pool": {}}
             for n in await spool.nodes()}
    pools: dict[str, dict] = {}
    for row in await spool.queue_summary():
        pool = pools.setdefault(row["pool"], {"queued": 0, "deferred": 0, "claimed": 0,
                                              "unowned": 0})
        pool[row["state"]] += row["n"]
        owner = row["lease_owner"]
        if owner is None:
            continue
        if not row["held"]:
            pool["unowned"] += row["n"]
            continue
        pool["claimed"] += row["n"]
        node = nodes.get(owner)
        if node is not None:
            node["claimed"] += row["n"]
            node["claimed_by_pool"][row["pool"]] = (node["claimed_by_pool"].get(row["pool"], 0)
                                                    + row["n"])
    return {"schema": spool.schema, "time": now, "nodes": list(nodes.values()), "pools": pools,
            "paused": sorted(f"{p}/{d}" for p, d in await spool.paused())}


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


@cluster_app.command("status")
def status(config: Path = typer.Option(..., "-c", "--config", help="TOML config file"),
           as_json: bool = typer.Option(False, "--json", help="print one JSON object")) -> None:
    """Show the cluster's nodes, their heartbeats and claimed work, and the shared queue."""
    from .cli import _load

    cfg = _load(config)
    out = asyncio.run(_with_spool(cfg, lambda s: cluster_status(s, cfg.cluster.lease)))
    if as_json:
        typer.echo(json.dumps(out))
        return
    typer.echo(f"cluster schema {out['schema']}: {len(out['nodes'])} node(s)")
    for n in out["nodes"]:
        state = "draining" if n["draining"] else "alive" if n["alive"] else "DEAD"
        typer.echo(f"  {n['name']:<20} {state:<8} heartbeat {n['heartbeat_age_s']:>6}s ago"
                   f"  claimed {n['claimed']:>6}  {n['hostname']} pid {n['pid']}")
    for name, p in sorted(out["pools"].items()):
        typer.echo(f"  pool {name:<15} queued {p['queued']:>7}  deferred {p['deferred']:>7}"
                   f"  claimed {p['claimed']:>6}  unowned {p['unowned']:>6}")
    if out["paused"]:
        typer.echo(f"  paused: {', '.join(out['paused'])}")


@cluster_app.command("drain")
def drain(node: str = typer.Argument(..., help="name of the node to drain"),
          config: Path = typer.Option(..., "-c", "--config", help="TOML config file"),
          as_json: bool = typer.Option(False, "--json", help="print one JSON object")) -> None:
    """Ask a node to stop claiming, finish what it holds, give the rest back and exit."""
    from .cli import _load

    cfg = _load(config)
    if not asyncio.run(_with_spool(cfg, lambda s: s.request_drain(node))):
        typer.echo(f"no node named {node!r} in the cluster", err=True)
        raise typer.Exit(1)
    within = round(cfg.cluster.lease / 3)
    typer.echo(json.dumps({"node": node, "drain_requested": True, "within_s": within})
               if as_json else f"{node}: drain requested (it stops within {within}s)")
