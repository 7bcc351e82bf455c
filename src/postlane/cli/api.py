"""``postlane api token add|list|revoke``: the named API tokens (tokens.py) in the node's
``api.tokens_file``. They act on the file, node running or not; a running node reads it again
when it changes, so a token added or revoked counts at once."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from ..api.tokens import TokenError, add_token, list_tokens, revoke_token
from ..secretfile import NotTheOwner, as_the_owner, private_open
from .ops import ConfigOpt, JSONOpt, _fail

app = typer.Typer(no_args_is_help=True, add_completion=False, help="The management API.")
token_app = typer.Typer(no_args_is_help=True, add_completion=False,
                        help="Named API tokens: each caller's name goes on the record of what"
                             " it does; read-only tokens may only read.")
app.add_typer(token_app, name="token")

TokensOpt = Annotated[Path | None, typer.Option(
    "--tokens-file", help="the tokens file (default: the config's api.tokens_file)")]


def _path(config: Path | None, tokens_file: Path | None) -> Path:
    if tokens_file is not None:
        return tokens_file
    if config is None:
        raise _fail("say which tokens file: -c CONFIG (or POSTLANE_CONFIG), or --tokens-file")
    from . import _load

    return Path(_load(config).api.named_tokens_file())


@token_app.command("add")
def add(name: str,
        read_only: Annotated[bool, typer.Option("--read-only", help="GET only: status,"
                                                                    " metrics, lists")] = False,
        out: Annotated[Path | None, typer.Option(
            "--out", help="write the token to this file (0600) instead of printing it")] = None,
        config: ConfigOpt = None, tokens_file: TokensOpt = None,
        as_json: JSONOpt = False) -> None:
    """Make a token named NAME and print it, once: only its hash is kept."""
    path = _path(config, tokens_file)
    try:
        as_the_owner(path.parent)
        token = add_token(path, name, read_only)
    except (TokenError, NotTheOwner) as exc:
        raise _fail(str(exc)) from None
    kind = "read-only token" if read_only else "token"
    if out is not None:
        with private_open(out, encoding="utf-8") as fh:
            fh.write(token + "\n")
        shown = {"name": name, "read_only": read_only, "file": str(out)}
        typer.echo(json.dumps(shown) if as_json else f"{kind} {name!r} written to {out}")
        return
    if as_json:
        typer.echo(json.dumps({"name": name, "read_only": read_only, "token": token}))
        return
    typer.echo(token)  # alone on stdout: TOKEN=$(postlane api token add …) works
    typer.echo(f"{kind} {name!r} added to {path}; it is shown only now", err=True)


@token_app.command("list")
def list_(config: ConfigOpt = None, tokens_file: TokensOpt = None,
          as_json: JSONOpt = False) -> None:
    """The named tokens (never the tokens themselves), besides "admin" (api.token_file)."""
    try:
        tokens = list_tokens(_path(config, tokens_file))
    except TokenError as exc:
        raise _fail(str(exc)) from None
    for entry in tokens:
        typer.echo(json.dumps(entry) if as_json else
                   f"{entry['name']}\t{'read-only' if entry['read_only'] else 'read-write'}\t"
                   f"created {entry['created']}")


@token_app.command("revoke")
def revoke(name: str, config: ConfigOpt = None, tokens_file: TokensOpt = None,
           as_json: JSONOpt = False) -> None:
    """Remove the token named NAME; a running node refuses it from its next request."""
    path = _path(config, tokens_file)
    try:
        as_the_owner(path.parent)
        removed = revoke_token(path, name)
    except (TokenError, NotTheOwner) as exc:
        raise _fail(str(exc)) from None
    if not removed:
        raise _fail(f"no token named {name!r}")
    typer.echo(json.dumps({"name": name, "revoked": True}) if as_json else f"revoked {name!r}")
