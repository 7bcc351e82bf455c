"""``postlane status|queues|pause|resume|retry|purge|alerts``: the CLI side of the HTTP API.

These commands talk to the running node over its API (address and token from the node's config
file, or ``--url`` and ``--token-file``), so they act on the live scheduler, not on files.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote

import httpx
import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from ..audit.evidence import visible

app = typer.Typer(add_completion=False)

ConfigOpt = Annotated[Path | None, typer.Option(
    "-c", "--config", envvar="POSTLANE_CONFIG",
    help="the node's TOML config (API address and token file)")]
URLOpt = Annotated[str | None, typer.Option("--url", help="API base URL, e.g. http://127.0.0.1:8025")]
TokenOpt = Annotated[Path | None, typer.Option(
    "--token-file", envvar="POSTLANE_TOKEN_FILE",
    help="file with the API token (default: the config's api.token_file, named admin)")]
DomainOpt = Annotated[str | None, typer.Option("--domain", "-d", help="only the lane to DOMAIN")]
JSONOpt = Annotated[bool, typer.Option("--json", help="print the API's JSON answer")]


def _fail(message: str) -> typer.Exit:
    typer.echo(f"postlane: {message}", err=True)
    return typer.Exit(1)


def _target(config: Path | None, url: str | None, token_file: Path | None) -> tuple[str, str]:
    if config is not None:
        from . import _load

        cfg = _load(config)
        host = "127.0.0.1" if cfg.api.address in ("0.0.0.0", "::") else cfg.api.address
        host = f"[{host}]" if ":" in host else host
        url = url or f"http://{host}:{cfg.api.port}"
        token_file = token_file or Path(cfg.api.token_file)
    if url is not None and token_file is None:
        raise _fail(f"--url needs --token-file (or POSTLANE_TOKEN_FILE): the API token of the"
                    f" node at {url}")
    if url is None or token_file is None:
        raise _fail("say where the node is: -c CONFIG (or POSTLANE_CONFIG), or --url and"
                    " --token-file")
    try:
        token = token_file.read_text("utf-8").strip()
    except OSError as exc:
        raise _fail(f"cannot read the API token file {token_file}: {exc.strerror}") from None
    return url.rstrip("/"), token


def _seg(value: str) -> str:
    """One path segment, escaped: a "/", "..", "?" or "#" in a name must not reach another
    route. The HTTP client folds "." and ".." segments (``queue show .`` fetched the queue
    listing), and ``quote`` leaves dots: they are escaped too (the server reads them back)."""
    return quote(value, safe="").replace(".", "%2E")


def _named(value: str, what: str) -> str:
    """A pool or domain named on the command line, not empty: "" (a script's unset variable)
    made another URL, answered with a bare "Not Found"."""
    if not value.strip():
        raise _fail(f"the {what} is empty: give its name (postlane queues lists them)")
    return value


def _call(target: tuple[str, str], method: str, path: str, body: dict | None = None,
          **params: Any) -> dict:
    url, token = target
    try:
        resp = httpx.request(method, url + path, headers={"Authorization": f"Bearer {token}"},
                             params={k: v for k, v in params.items() if v is not None},
                             json=body, timeout=30)
    except httpx.HTTPError as exc:
        raise _fail(f"cannot reach the node's API at {url} ({exc}); is `postlane serve`"
                    " running with [api] enabled?") from None
    try:
        body = resp.json()
    except ValueError:
        body = {"error": resp.text}
    if not resp.is_success:
        raise _fail(f"{body.get('error') or resp.reason_phrase} (HTTP {resp.status_code})")
    return body


def console() -> Console:
    """Tables as wide as the terminal; when piped, as wide as they need (nothing cut)."""
    return Console() if sys.stdout.isatty() else Console(width=1000, soft_wrap=True)


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if abs(seconds) < 120:
        return f"{seconds:.1f}s"
    return f"{seconds / 60:.1f}m" if abs(seconds) < 7200 else f"{seconds / 3600:.1f}h"


def _count(n: int | None) -> str:
    """A count, or "-" where the cluster has no figures yet (null in ``/api/v1/sla``)."""
    return "-" if n is None else str(n)


def _lanes_table(status: dict) -> Table:
    clustered = "cluster" in status
    table = Table(title=f"lanes of this node ({status['node']}: what it has claimed)"
                  if clustered else "lanes")
    for col in ("pool", "domain", "queued", "ready", "deferred", "in flight", "oldest",
                "connections", "state"):
        table.add_column(col, justify="left" if col in ("pool", "domain", "state") else "right",
                         no_wrap=col in ("pool", "domain"))
    for lane in status["lanes"]:
        state = "paused" if lane["paused"] else (
            f"backoff {lane['suspended_s']}s" if lane["suspended_s"] else
            "rate limited" if lane.get("rate_wait") else "running")
        table.add_row(lane["pool"], lane["domain"], str(lane["depth"]), str(lane["ready"]),
                      str(lane["deferred"]), str(lane["inflight"]), _age(lane["oldest_age_s"]),
                      str(lane["connections"]), state)
    return table


def _listeners_table(listeners: list[dict]) -> Table:
    """TLS and who may relay without AUTH, per listener: what an auditor asks first."""
    table = Table(title="listeners")
    for col in ("listener", "address", "connections", "TLS", "certificate", "AUTH",
                "relay without AUTH"):
        table.add_column(col)
    for lst in listeners:
        cert = lst.get("certificate")
        if cert is None:
            cert_text = "-"
        else:
            kind = ("self-signed, generated" if cert["generated"] else
                    "self-signed" if cert["self_signed"] else f"issuer {cert['issuer']}")
            cert_text = f"{cert['subject']} ({kind}; {cert['days_left']} days left)"
        tls = lst["tls"] + (", required" if lst["require_tls"] else "")
        open_nets = ", ".join(lst["relay_without_auth"])
        table.add_row(lst["name"], f"{lst['address']}:{lst['port']}",
                      str(lst.get("connections", "-")), tls, cert_text,
                      "required" if lst["require_auth"] else "offered over TLS",
                      f"[yellow]{open_nets}[/]" if open_nets else "nobody")
    return table


@app.command()
def status(config: ConfigOpt = None, url: URLOpt = None, token_file: TokenOpt = None,
           as_json: JSONOpt = False) -> None:
    """The node, its pools (connections, state), classes against their SLA, and alerts; in a
    cluster the cluster's nodes and queue, and this node's own part."""
    target = _target(config, url, token_file)
    st = _call(target, "GET", "/api/v1/status")
    if st.get("starting"):  # the API is up, the SMTP listeners not yet: not ready (exit 1)
        if as_json:
            typer.echo(json.dumps({"status": st}, indent=2))
            raise typer.Exit(1)
        raise _fail(f"node {st['node']} is starting: its listeners are not open yet")
    sla = _call(target, "GET", "/api/v1/sla")
    alerts = _call(target, "GET", "/api/v1/alerts")
    if as_json:
        typer.echo(json.dumps({"status": st, "sla": sla, "alerts": alerts}, indent=2))
        return
    out = console()
    clustered = sla.get("scope") == "cluster"
    holds = "holds" if clustered else "queued"
    out.print(f"node [bold]{st['node']}[/] up {_age(st['uptime_s'])}, {holds} {st['queued']},"
              f" {st['accepted']} accepted, {len(alerts['active'])} active alerts")
    out.print(_listeners_table(st.get("listeners", [])))
    for state in st.get("degraded", []):
        # the cause is often a remote server's reply: text, not rich markup (its "[/ip]"
        # failed the command), with control characters escaped (an escape sequence in a
        # greeting reached the operator's terminal raw)
        out.print(Text.assemble(("DEGRADED", "red"), visible(
            f" {state['what']} for {_age(state['duration_s'])}: {state['effect']}"
            f" ({state['cause']})")))
    if clustered:
        _cluster_tables(out, st["cluster"], sla)
    pools = Table(title="pools (this node's connections)" if clustered else "pools")
    for col in ("pool", "connections", "state", "pausable"):
        pools.add_column(col)
    for p in st["pools"]:
        lanes = p.get("paused_lanes") or []  # a running pool's lanes paused on their own
        state = "paused" if p["paused"] else (
            f"running, lanes paused: {', '.join(lanes)}" if lanes else "running")
        pools.add_row(p["pool"], f"{p['connections']}/{p['cap']}", Text(state),
                      "yes" if p["pausable"] else "no")
    out.print(pools)
    scope = "the cluster's queue, " if clustered else ""
    classes = Table(title=f"classes ({scope}latency over the last 5 minutes)")
    for col in ("class", "pool", "SLA", "p50", "p95", "p99", "queued", "oldest", "breach in",
                "delivered", "failed"):
        classes.add_column(col, justify="left" if col in ("class", "pool") else "right",
                           no_wrap=col in ("class", "pool"))
    for c in sla["classes"]:
        q = c["latency_s"]["5m"] or {}
        classes.add_row(c["class"], c["pool"], _age(c["sla_s"]) if c["sla_s"] else "-",
                        _age(q.get("p50")), _age(q.get("p95")), _age(q.get("p99")),
                        _count(c["depth"]), _age(c["oldest_age_s"]), _age(c["breach_in_s"]),
                        _count(c["delivered_total"]), _count(c["failed_total"]))
    out.print(classes)
    if clustered:
        own = Table(title=f"this node's own part ({sla['node']['name']})")
        for col in ("class", "holds", "accepted", "delivered", "failed", "p95 5m", "drain/s"):
            own.add_column(col, justify="left" if col == "class" else "right")
        for c in sla["node"]["classes"]:
            q = c["latency_s"]["5m"] or {}
            own.add_row(c["class"], str(c["held"]), str(c["received_total"]),
                        str(c["delivered_total"]), str(c["failed_total"]), _age(q.get("p95")),
                        f"{c['drain_rate']:.2f}")
        out.print(own)
    for alert in alerts["active"]:
        out.print(Text.assemble(("ALERT", "red"), visible(f" {alert['id']}: {alert['message']}")))


def _cluster_tables(out: Console, cluster: dict, sla: dict) -> None:
    when = ("no figures yet" if sla["evaluated_by"] is None else
            f"figures by {sla['evaluated_by']}, {_age(sla['age_s'])} old"
            + (" [red](STALE)[/]" if sla["stale"] else ""))
    out.print(f"cluster [bold]{cluster['schema']}[/]: {len(cluster['nodes'])} nodes ({when})")
    nodes = Table(title="nodes")
    for col in ("node", "state", "heartbeat", "session", "claimed", "takeover in"):
        nodes.add_column(col, justify="left" if col in ("node", "state") else "right")
    for n in cluster["nodes"]:
        state = n["state"] if n["state"] in ("alive", "draining") else f"[red]{n['state']}[/]"
        takeover = "-" if n["takeover_in_s"] is None else _age(n["takeover_in_s"])
        nodes.add_row(n["name"], state, f"{_age(n['heartbeat_age_s'])} ago",
                      "open" if n["session"] else "[red]closed[/]", str(n["claimed"]), takeover)
    out.print(nodes)
    out.print(_shared_table(cluster))


def _shared_table(cluster: dict) -> Table:
    """The cluster's queue per pool, the same on every node."""
    queue = Table(title="shared queue (the whole cluster)")
    for col in ("pool", "queued", "deferred", "claimed", "unowned", "on hold", "drain/s"):
        queue.add_column(col, justify="left" if col == "pool" else "right")
    for name, p in sorted(cluster["pools"].items()):
        queue.add_row(name, str(p["queued"]), str(p["deferred"]), str(p["claimed"]),
                      str(p["unowned"]), str(p.get("on_hold", 0)),
                      f"{p.get('drain_rate', 0.0):.2f}")
    return queue


def _shared_lanes_table(cluster: dict) -> Table:
    """The cluster's deepest lanes, the same on every node."""
    table = Table(title="shared queue per lane (the whole cluster, deepest first)")
    for col in ("pool", "domain", "queued", "deferred", "on hold", "oldest", "state"):
        table.add_column(col, justify="left" if col in ("pool", "domain", "state") else "right")
    for lane in cluster.get("lanes", []):
        table.add_row(lane["pool"], lane["domain"], str(lane["queued"]), str(lane["deferred"]),
                      str(lane["on_hold"]), _age(lane["oldest_age_s"]),
                      "paused" if lane.get("paused") else "")
    return table


@app.command()
def queues(config: ConfigOpt = None, url: URLOpt = None, token_file: TokenOpt = None,
           as_json: JSONOpt = False) -> None:
    """Each lane: depth, oldest message age, connections in use, paused or in backoff (in a
    cluster: the shared queue per pool and per lane, then this node's lanes, which hold what it
    claimed)."""
    st = _call(_target(config, url, token_file), "GET", "/api/v1/status")
    if as_json:
        # in a cluster, as the text: the shared queue (the same on every node) beside the node's
        # own lanes - these alone left out what no node claims, e.g. a paused pool's mail
        shown: object = st["lanes"]
        if "cluster" in st:
            shared = st["cluster"]
            shown = {"cluster": {key: shared.get(key) for key in (
                "schema", "evaluated_by", "age_s", "pools", "lanes")}, "lanes": st["lanes"]}
        typer.echo(json.dumps(shown, indent=2))
        return
    out = console()
    if "cluster" in st:
        out.print(_shared_table(st["cluster"]))
        out.print(_shared_lanes_table(st["cluster"]))
    out.print(_lanes_table(st))


PAUSED_NOTE = "{} of them wait in paused lanes until a resume (postlane queues)"
"""Said of recipients a retry or release made due whose lane is paused: not "sent now"."""


def _done(out: dict, as_json: bool, text: str) -> None:
    typer.echo(json.dumps(out, indent=2) if as_json else text)


@app.command()
def pause(pool: str, domain: DomainOpt = None, config: ConfigOpt = None, url: URLOpt = None,
          token_file: TokenOpt = None, as_json: JSONOpt = False) -> None:
    """Hold a pool's mail (or its lane to one domain) in the queue; survives a restart."""
    _named(pool, "pool")
    out = _call(_target(config, url, token_file), "POST", f"/api/v1/pools/{_seg(pool)}/pause",
                domain=domain)
    _done(out, as_json, f"paused {pool}" + (f" to {domain}" if domain else ""))


@app.command()
def resume(pool: str, domain: DomainOpt = None, config: ConfigOpt = None, url: URLOpt = None,
           token_file: TokenOpt = None, as_json: JSONOpt = False) -> None:
    """Let a paused pool (or lane) deliver again."""
    _named(pool, "pool")
    out = _call(_target(config, url, token_file), "POST", f"/api/v1/pools/{_seg(pool)}/resume",
                domain=domain)
    still = out.get("still_paused") or []
    if still == ["*"]:  # a lane resumed in a paused pool
        note = f"; pool {pool} stays paused (postlane resume {pool})"
    elif still:  # a pool resumed with lanes paused on their own
        note = (f"; still paused: its lanes to {', '.join(still)}"
                f" (postlane resume {pool} --domain DOMAIN)")
    else:
        note = ""
    _done(out, as_json, f"resumed {pool}" + (f" to {domain}" if domain else "") + note)


@app.command()
def retry(pool: str, domain: DomainOpt = None, config: ConfigOpt = None, url: URLOpt = None,
          token_file: TokenOpt = None, as_json: JSONOpt = False) -> None:
    """Retry deferred mail of a pool (or lane) now, lifting a backoff (in a cluster: on every
    node)."""
    _named(pool, "pool")
    out = _call(_target(config, url, token_file), "POST", f"/api/v1/pools/{_seg(pool)}/retry",
                domain=domain)
    elsewhere = out.get("elsewhere", 0)
    _done(out, as_json, f"{out['retried']} recipients retried now" + (
        f"; {elsewhere} more held by other nodes, which retry them now" if elsewhere else "")
        + (f"; {PAUSED_NOTE.format(out['paused'])}" if out.get("paused") else ""))


@app.command()
def purge(pool: str, domain: str,
          yes: Annotated[bool, typer.Option("--yes", help="do not ask")] = False,
          config: ConfigOpt = None, url: URLOpt = None, token_file: TokenOpt = None,
          as_json: JSONOpt = False) -> None:
    """Drop every queued, deferred and held recipient of one lane (logged as purged, no DSN)."""
    _named(pool, "pool")
    _named(domain, "domain")
    target = _target(config, url, token_file)
    if not yes and not (os.isatty(0) and typer.confirm(
            f"purge all queued mail of pool {pool} to {domain}?")):
        raise _fail("not purged (confirm, or pass --yes)")
    out = _call(target, "POST", f"/api/v1/pools/{_seg(pool)}/lanes/{_seg(domain)}/purge")
    _done(out, as_json, f"{out['purged']} recipients purged")


@app.command()
def alerts(config: ConfigOpt = None, url: URLOpt = None, token_file: TokenOpt = None,
           as_json: JSONOpt = False) -> None:
    """Active alerts, then recently resolved ones."""
    out = _call(_target(config, url, token_file), "GET", "/api/v1/alerts")
    if as_json:
        typer.echo(json.dumps(out, indent=2))
        return
    for alert in out["active"]:
        typer.echo(f"ACTIVE   {alert['id']}: {alert['message']}")
    for alert in out["resolved"]:
        typer.echo(f"resolved {alert['id']}: {alert['message']}")
    if not out["active"] and not out["resolved"]:
        typer.echo("no alerts")
