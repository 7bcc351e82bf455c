"""``postlane queue list|show|hold|release|retry|delete|deferrals|shape``: message-level queue
control over the node's API (mailq, postcat, postsuper and qshape in one place)."""

from __future__ import annotations

import json
import os
import time
from typing import Annotated

import typer
from rich.table import Table
from rich.text import Text

from ..audit.evidence import visible
from .ops import (
    PAUSED_NOTE,
    ConfigOpt,
    JSONOpt,
    TokenOpt,
    URLOpt,
    _age,
    _call,
    _fail,
    _seg,
    _target,
    console,
)

app = typer.Typer(no_args_is_help=True, add_completion=False,
                  help="Message-level queue control: list, show, hold, release, retry, delete,"
                       " deferrals by reason, qshape.")

IdsArg = Annotated[list[str] | None, typer.Argument(help="queue ids", show_default=False)]
PoolOpt = Annotated[str | None, typer.Option("--pool", help="pool")]
DomainOpt = Annotated[str | None, typer.Option("--domain", "-d", help="recipient domain")]
ClassOpt = Annotated[str | None, typer.Option("--class", help="traffic class")]
StateOpt = Annotated[str | None, typer.Option("--state", help="queued, deferred or held")]
OlderOpt = Annotated[str | None, typer.Option("--older-than", help="age, e.g. 10m")]
YoungerOpt = Annotated[str | None, typer.Option("--younger-than", help="age, e.g. 1h")]
SenderOpt = Annotated[str | None, typer.Option("--sender", help="envelope sender, * wildcard")]
RcptOpt = Annotated[str | None, typer.Option("--recipient", help="address, * wildcard")]
CorrOpt = Annotated[str | None, typer.Option("--correlation-id", help="correlation id")]
AllOpt = Annotated[bool, typer.Option("--all", help="every message in the queue")]
DryOpt = Annotated[bool, typer.Option("--dry-run", help="count what would change, change"
                                                        " nothing")]


def _cells(*values: str) -> list[Text]:
    """Table cells as they are: text, not rich markup (a reply's ``[mx.example.net]``
    vanished, its ``[/ip]`` failed the command), with control characters escaped (a stranger's
    reply or header field must not move the operator's cursor or retitle the terminal)."""
    return [Text(visible(value)) for value in values]


def _selector(ids, pool, domain, cls, state, older, younger, sender, rcpt, corr,
              everything: bool = False) -> dict:
    body = {"queue_ids": ids or [], "pool": pool, "domain": domain, "class": cls,
            "state": state, "older_than": older, "younger_than": younger, "sender": sender,
            "recipient": rcpt, "correlation_id": corr, "all": everything}
    return {k: v for k, v in body.items() if v not in (None, [], False)}


IDS_PER_GET = 200
"""Queue ids asked in one listing: they go in the query string, which HTTP clients and
servers bound (3000 ids failed with httpx's ``InvalidURL: … 'query' too long``)."""


def _listed_in_parts(target: tuple[str, str], ids: list[str], limit: int,
                     params: dict) -> dict:
    """One listing of many queue ids, asked ``IDS_PER_GET`` at a time: each message is in one
    part only, so the totals add up, and the oldest ``limit`` of all parts are kept."""
    total_msgs = total_rcpts = 0
    messages: list[dict] = []
    for start in range(0, len(ids), IDS_PER_GET):
        part = _call(target, "GET", "/api/v1/queue/messages", limit=limit,
                     queue_id=ids[start:start + IDS_PER_GET], **params)
        total_msgs += part["total_messages"]
        total_rcpts += part["total_recipients"]
        messages += part["messages"]
    messages.sort(key=lambda m: (m["queued_at"], m["queue_id"]))
    return {"total_messages": total_msgs, "total_recipients": total_rcpts,
            "messages": messages[:limit]}


def _state(rcpt: dict) -> str:
    """A recipient's state, and the hold or delete waiting for its delivery to end, if any
    (``inflight (hold pending)``): else the operator who asked sees nothing of it."""
    pending = rcpt.get("pending")  # absent from an older node's answer
    return f"{rcpt['state']} ({pending} pending)" if pending else rcpt["state"]


@app.command("list")
def list_(ids: IdsArg = None, pool: PoolOpt = None, domain: DomainOpt = None,
          cls: ClassOpt = None, state: StateOpt = None, older_than: OlderOpt = None,
          younger_than: YoungerOpt = None, sender: SenderOpt = None, recipient: RcptOpt = None,
          correlation_id: CorrOpt = None,
          limit: Annotated[int, typer.Option(help="messages shown")] = 1000,
          config: ConfigOpt = None, url: URLOpt = None, token_file: TokenOpt = None,
          as_json: JSONOpt = False) -> None:
    """Queued, deferred and held messages, oldest first (like mailq)."""
    sel = _selector(ids, pool, domain, cls, state, older_than, younger_than, sender, recipient,
                    correlation_id)
    params = {k: v for k, v in sel.items() if k != "queue_ids"}
    target = _target(config, url, token_file)
    ids = list(dict.fromkeys(sel.get("queue_ids") or []))
    if len(ids) <= IDS_PER_GET:
        out = _call(target, "GET", "/api/v1/queue/messages", limit=limit, queue_id=ids or None,
                    **params)
    else:
        out = _listed_in_parts(target, ids, limit, params)
    if as_json:
        typer.echo(json.dumps(out, indent=2))
        return
    table = Table(title=f"{out['total_messages']} messages, {out['total_recipients']}"
                        " recipients")
    for col in ("queue id", "class", "pool", "age", "size", "sender", "recipient", "state",
                "attempts", "last reply"):
        table.add_column(col, justify="right" if col in ("age", "size", "attempts") else "left",
                         no_wrap=col in ("queue id", "recipient"))
    for msg in out["messages"]:
        for i, r in enumerate(msg["recipients"]):
            head = [msg["queue_id"], msg["class"], msg["pool"], _age(msg["age_s"]),
                    str(msg["size"]), msg["sender"] or "<>"] if i == 0 else [""] * 6
            table.add_row(*_cells(*head, r["address"], _state(r), str(r["attempts"]),
                                  r["reply"]))
    if len(out["messages"]) < out["total_messages"]:  # the title counts them all
        table.caption = (f"the oldest {len(out['messages'])} of {out['total_messages']}"
                         " messages shown (--limit)")
    console().print(table)


@app.command()
def show(queue_id: str, config: ConfigOpt = None, url: URLOpt = None,
         token_file: TokenOpt = None, as_json: JSONOpt = False) -> None:
    """One message: envelope, header fields, recipients, every attempt and its reply."""
    if not queue_id.strip():
        raise _fail("give a queue id (postlane queue list shows them)")
    out = _call(_target(config, url, token_file), "GET", f"/api/v1/queue/messages/{_seg(queue_id)}")
    if as_json:
        typer.echo(json.dumps(out, indent=2))
        return
    typer.echo(f"queue id {visible(out['queue_id'])}  class {out['class']}  pool {out['pool']}  "
               f"age {_age(out['age_s'])}  {out['size']} bytes")
    typer.echo(f"sender <{visible(out['sender'])}>  Message-ID"
               f" {visible(out['message_id'] or '-')}  correlation"
               f" {visible(out['correlation_id'] or '-')}")
    typer.echo("\nheader fields:")
    for name, value in out["headers"]:
        typer.echo(f"  {visible(name)}: {visible(value)}")
    typer.echo("\nrecipients:")
    for r in out["recipients"]:
        nxt = f", next attempt in {_age(r['next_attempt'] - time.time())}" \
            if r["next_attempt"] else ""
        typer.echo(f"  {visible(r['address'])}: {_state(r)}, {r['attempts']} attempt(s){nxt}"
                   + (f"; last reply: {visible(r['reply'])}" if r["reply"] else ""))
    typer.echo("\nattempts:")
    if out["attempts"] is None:
        typer.echo("  (the audit store is off: only each recipient's last reply is known)")
    for a in out["attempts"] or []:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(a["time"]))
        typer.echo(f"  {when}  {visible(a['recipient'])}  from {a['source_ip'] or '-'} to "
                   f"{visible(a['destination'] or '-')} {a['tls'] or ''}:"
                   f" {visible(a['reply'] or '')}")


_DONE = {"hold": "held", "release": "released", "retry": "retried", "delete": "deleted"}


def _act(action: str, sel: dict, dry_run: bool, target: tuple[str, str], as_json: bool,
         **extra: object) -> None:
    out = _call(target, "POST", f"/api/v1/queue/{action}",
                body={**sel, "dry_run": dry_run, **extra})
    untouched = out.get("untouched") or {}
    for qid, why in untouched.items():  # named, left alone: say why, exit 1
        typer.echo(f"{qid}: {why}", err=True)
    # a filter or --all that matched nothing the action takes is exit 1, as a named id left
    # alone is: a script must not read a mistyped pattern as done (matches on other nodes of
    # a cluster are not nothing: the answer says where they are)
    pending = out.get("pending") or {}  # on the wire: done when their delivery ends
    idle = not dry_run and not out["recipients"] and not untouched and not out.get("elsewhere") \
        and not pending
    if as_json:
        typer.echo(json.dumps(out, indent=2))
        raise typer.Exit(1 if untouched or idle else 0)
    if idle:
        wanted = {"hold": "queued or deferred", "release": "held", "retry": "deferred",
                  "delete": "queued, deferred or held"}[action]
        raise _fail(f"nothing {_DONE[action]}: no {wanted} recipient matches")
    done = {**_DONE, "retry": "retried now"}[action]
    if out["recipients"] or not pending:
        typer.echo(f"{'would be ' if dry_run else ''}{done}: {out['recipients']} recipients of"
                   f" {out['messages']} messages")
    for qid, what in pending.items():
        typer.echo(f"{qid}: {what}")
    if out.get("paused"):
        typer.echo(PAUSED_NOTE.format(out["paused"]))
    if out.get("elsewhere") and action == "retry" and not dry_run:
        typer.echo(f"{out['elsewhere']} more match on other nodes of the cluster, which have"
                   f" claimed them: those nodes retry them now")
    elif out.get("elsewhere"):
        typer.echo(f"{out['elsewhere']} more match on other nodes of the cluster, which have"
                   f" claimed them: run it on those nodes' APIs too (postlane cluster status)")
    if untouched:
        raise typer.Exit(1)


def _action(action: str, help_text: str):
    def command(ids: IdsArg = None, pool: PoolOpt = None, domain: DomainOpt = None,
                cls: ClassOpt = None, state: StateOpt = None, older_than: OlderOpt = None,
                younger_than: YoungerOpt = None, sender: SenderOpt = None,
                recipient: RcptOpt = None, correlation_id: CorrOpt = None,
                everything: AllOpt = False, dry_run: DryOpt = False,
                config: ConfigOpt = None, url: URLOpt = None, token_file: TokenOpt = None,
                as_json: JSONOpt = False) -> None:
        sel = _selector(ids, pool, domain, cls, state, older_than, younger_than, sender,
                        recipient, correlation_id, everything)
        _act(action, sel, dry_run, _target(config, url, token_file), as_json)

    command.__doc__ = help_text
    app.command(action)(command)


_action("hold", "Keep messages from delivery until released (survives a restart).")
_action("release", "Let held messages be delivered again, now.")
_action("retry", "Make deferred messages due now.")


@app.command()
def delete(ids: IdsArg = None, pool: PoolOpt = None, domain: DomainOpt = None,
           cls: ClassOpt = None, state: StateOpt = None, older_than: OlderOpt = None,
           younger_than: YoungerOpt = None, sender: SenderOpt = None, recipient: RcptOpt = None,
           correlation_id: CorrOpt = None, everything: AllOpt = False, dry_run: DryOpt = False,
           dsn: Annotated[bool, typer.Option("--dsn", help="bounce to the sender (default:"
                                                          " silently)")] = False,
           yes: Annotated[bool, typer.Option("--yes", help="do not ask")] = False,
           config: ConfigOpt = None, url: URLOpt = None, token_file: TokenOpt = None,
           as_json: JSONOpt = False) -> None:
    """Remove messages (a "b" record each, bounceCat purged); counts first and asks."""
    sel = _selector(ids, pool, domain, cls, state, older_than, younger_than, sender,
                    recipient, correlation_id, everything)
    target = _target(config, url, token_file)
    if not dry_run and not yes:
        count = _call(target, "POST", "/api/v1/queue/delete",
                      body={**sel, "dry_run": True})
        waiting = count.get("pending_recipients", 0)  # on the wire: deleted once it ends
        if not count["recipients"] and not waiting:  # nothing to ask about: say why
            for qid, why in (count.get("untouched") or {}).items():
                typer.echo(f"{qid}: {why}", err=True)
            if as_json:  # the count, as a delete that found nothing answers with --json
                typer.echo(json.dumps(count, indent=2))
            if count.get("elsewhere"):  # it matches, where this node cannot delete it
                raise _fail(f"nothing to delete on this node: {count['elsewhere']} more match"
                            " on other nodes of the cluster, which have claimed them: run it"
                            " on those nodes' APIs (postlane cluster status)")
            raise _fail("nothing to delete: no queued recipient matches")
        if not (os.isatty(0) and typer.confirm(
                f"delete {count['recipients']} recipients of {count['messages']} messages"
                + (f" (and {waiting} being delivered now, when that ends unless it delivers)"
                   if waiting else "")
                + f"{' with a DSN to each sender' if dsn else ' silently'}?")):
            raise _fail(f"nothing deleted ({count['recipients'] + waiting} recipients match;"
                        " confirm, or pass --yes)")
    _act("delete", sel, dry_run, target, as_json, dsn=dsn)


@app.command()
def deferrals(top: Annotated[int, typer.Option(help="reasons shown")] = 50,
              config: ConfigOpt = None, url: URLOpt = None, token_file: TokenOpt = None,
              as_json: JSONOpt = False) -> None:
    """Deferred mail grouped by the reply that deferred it."""
    out = _call(_target(config, url, token_file), "GET", "/api/v1/queue/deferrals", top=top)
    if as_json:
        typer.echo(json.dumps(out, indent=2))
        return
    table = Table(title="deferred recipients by reason")
    for col in ("recipients", "oldest", "category", "top domains", "reason"):
        table.add_column(col, justify="right" if col in ("recipients", "oldest") else "left")
    for g in out["reasons"]:
        table.add_row(*_cells(str(g["recipients"]), _age(g["oldest_age_s"]), g["category"],
                              ", ".join(f"{d} ({n})" for d, n in g["domains"].items()),
                              g["reason"]))
    console().print(table)


@app.command()
def shape(by: Annotated[str, typer.Option(help="domain or class")] = "domain",
          top: Annotated[int, typer.Option(help="rows before the rest is summed")] = 20,
          config: ConfigOpt = None, url: URLOpt = None, token_file: TokenOpt = None,
          as_json: JSONOpt = False) -> None:
    """Recipients not yet final by age (like qshape), per domain or class."""
    if by not in ("domain", "class"):
        raise _fail("--by must be domain or class")
    out = _call(_target(config, url, token_file), "GET", "/api/v1/queue/shape", by=by, top=top)
    if as_json:
        typer.echo(json.dumps(out, indent=2))
        return
    table = Table(title=f"queue age by {by}")
    table.add_column(by, no_wrap=True)
    table.add_column("total", justify="right")
    for label in out["buckets"]:
        table.add_column(label, justify="right")
    for row in out["rows"]:
        table.add_row(*_cells(row["key"], str(row["total"]), *map(str, row["counts"])))
    console().print(table)
