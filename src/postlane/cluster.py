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
from .config.model import ClusterConfig
from .spool import PostgresSpool, is_dsn
from .spool.postgres import NodeInfo

cluster_app = typer.Typer(no_args_is_help=True,
                          help="Cluster mode (node.spool is a PostgreSQL DSN): status, drain.")


def node_state(info: NodeInfo, age: float, cluster: ClusterConfig) -> tuple[str, float | None]:
    """``alive``, ``draining``, ``suspect`` or ``dead``, and the seconds until the others take
    its work over (None while alive; 0 for a dead node whose work waits for the next look of a
    live node, within ``cluster.poll``).

    Dead: its session is closed and its heartbeat is ``dead_after`` old, or its heartbeat is
    ``lease`` old. Suspect: on the way there - its session closed, or its heartbeats are late
    (stalled, or cut off while the database still sees its session)."""
    if (not info.session and age >= cluster.dead_after) or age >= cluster.lease:
        return "dead", 0.0
    if not info.session:
        return "suspect", cluster.dead_after - age
    if age >= 2 * cluster.heartbeat:
        return "suspect", cluster.lease - age
    return ("draining" if info.draining else "alive"), None


async def cluster_status(spool: PostgresSpool, cluster: ClusterConfig) -> dict:
    """Nodes (state, heartbeat, session, work held, time until takeover) and the shared queue
    per pool: ``claimed`` is held by live nodes, ``unowned`` by suspect or dead ones or under a
    lapsed lease (work about to be taken over)."""
    now = await spool.now()
    out = summarize(await spool.nodes(), await spool.queue_summary(), now, cluster)
    return {"schema": spool.schema, "time": now, **out,
            "paused": sorted(f"{p}/{d}" for p, d in await spool.paused())}


def summarize(infos: list[NodeInfo], summary: list[dict], now: float,
              cluster: ClusterConfig) -> dict:
    """``nodes`` and ``pools`` of ``cluster_status`` from the nodes and ``queue_summary`` rows
    (the cluster monitor builds the same from its own queue query)."""
    nodes: dict[str, dict] = {}
    for n in infos:
        age = now - n.heartbeat
        state, takeover = node_state(n, age, cluster)
        nodes[n.name] = {
            "name": n.name, "hostname": n.hostname, "pid": n.pid, "started_at": n.started_at,
            "heartbeat_age_s": round(age, 1), "state": state,
            "alive": state in ("alive", "draining"), "session": n.session,
            "draining": n.draining, "claimed": 0, "claimed_by_pool": {},
            "takeover_in_s": None if takeover is None else round(max(0.0, takeover), 1)}
    pools: dict[str, dict] = {}
    for row in summary:
        pool = pools.setdefault(row["pool"], {"queued": 0, "deferred": 0, "claimed": 0,
                                              "unowned": 0})
        pool[row["state"]] += row["n"]
        if row["lease_owner"] is None:
            continue
        owner = nodes.get(row["lease_owner"])
        if owner is not None:
            owner["claimed"] += row["n"]
            by_pool = owner["claimed_by_pool"]
            by_pool[row["pool"]] = by_pool.get(row["pool"], 0) + row["n"]
        if row["held"] and owner is not None and owner["alive"]:
            pool["claimed"] += row["n"]
            continue
        pool["unowned"] += row["n"]
        if owner is not None and owner["state"] == "suspect" and row["held"]:
            # a stalled node's work goes when its leases lapse, if that comes first
            lapse = max(0.0, row["lease_until"] - now)
            owner["takeover_in_s"] = round(min(owner["takeover_in_s"], lapse), 1)
    return {"nodes": list(nodes.values()), "pools": pools}


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
