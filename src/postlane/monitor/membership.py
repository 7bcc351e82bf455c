"""A cluster's membership as plain data: each node's state (alive, draining, suspect, dead) and
the time until its work is taken over, and the shared queue per pool. The cluster monitor, the
API and ``postlane cluster status`` all read it from here."""

from __future__ import annotations

from ..config.model import ClusterConfig
from ..spool import PostgresSpool
from ..spool.postgres import NodeInfo


def node_state(info: NodeInfo, age: float, cluster: ClusterConfig) -> tuple[str, float | None]:
    """``alive``, ``draining``, ``suspect`` or ``dead``, and the seconds until the others take
    its work over (None while alive; 0 for a dead node whose work waits for the next look of a
    live node, within ``cluster.poll``; ``summarize`` makes it None when it holds nothing).

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
    lapsed lease (work about to be taken over), ``on_hold`` by nobody (``queue hold``)."""
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
                                              "unowned": 0, "on_hold": 0})
        pool["on_hold" if row["state"] == "held" else row["state"]] += row["n"]
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
    for node in nodes.values():
        if not node["claimed"]:  # nothing left to take over (a dead node stays listed)
            node["takeover_in_s"] = None
    return {"nodes": list(nodes.values()), "pools": pools}
