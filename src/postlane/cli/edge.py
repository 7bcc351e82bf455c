"""``postlane users ...`` and ``postlane tls ...``: SMTP AUTH users, the listeners'
certificates (``tls check`` shows what a client sees), and test certificates."""

from __future__ import annotations

import asyncio
import json
import os
import ssl
from pathlib import Path

import typer

from ..edge.tls import selfsigned
from ..policy.users import User, UsersError, hash_password, load_users, save_user, valid_user_name
from ..secretfile import NotTheOwner, as_the_owner, private_dir

users_app = typer.Typer(no_args_is_help=True, help="SMTP AUTH users (the security.users_file).")
tls_app = typer.Typer(no_args_is_help=True, help="TLS certificates for the listeners.")


@users_app.command("add")
def users_add(
    name: str = typer.Argument(..., help="login name"),
    file: Path = typer.Option(Path("users.toml"), "--file", "-f", help="users file"),
    password_file: Path | None = typer.Option(
        None, help="read the password from this file's first line (else prompt)"),
    classes: list[str] = typer.Option([], "--class", help="allowed traffic class (repeat)"),
    default_class: str | None = typer.Option(None, help="class of mail without a class header"),
    sender_domains: list[str] = typer.Option(
        [], "--sender-domain", help="domain the user may send from (repeat; '*' = any)"),
    as_json: bool = typer.Option(False, "--json", help="one JSON object"),
) -> None:
    """Add or replace a user; only a salted scrypt hash of the password is stored."""
    if not valid_user_name(name):
        typer.echo(f"not a valid user name: {name!r}", err=True)
        raise typer.Exit(2)
    try:
        as_the_owner(file.parent)
    except NotTheOwner as exc:
        typer.echo(f"{file}: {exc}", err=True)
        raise typer.Exit(1) from None
    if password_file is not None:
        try:
            lines = password_file.read_text(encoding="utf-8").splitlines()
        except OSError as exc:
            typer.echo(f"{password_file}: cannot read: {exc.strerror}", err=True)
            raise typer.Exit(2) from None
        password = lines[0] if lines else ""
    else:
        password = typer.prompt("Password", hide_input=True, confirmation_prompt=True)
    if len(password) < 8:
        typer.echo("the password needs at least 8 characters", err=True)
        raise typer.Exit(2)
    if default_class and classes and default_class not in classes:
        typer.echo(f"--default-class {default_class!r} is not one of the allowed classes",
                   err=True)
        raise typer.Exit(2)
    try:
        save_user(file, User(name, hash_password(password), list(classes), default_class,
                             [d.lower() for d in sender_domains]))
    except UsersError as exc:
        typer.echo(f"{file}: {exc}", err=True)
        raise typer.Exit(2) from None
    except OSError as exc:
        typer.echo(f"{file}: cannot write: {exc.strerror}", err=True)
        raise typer.Exit(2) from None
    typer.echo(json.dumps({"file": str(file), "user": name, "saved": True}) if as_json
               else f"{file}: user {name!r} saved")


@users_app.command("list")
def users_list(file: Path = typer.Option(Path("users.toml"), "--file", "-f"),
               as_json: bool = typer.Option(False, "--json", help="one JSON object per user"),
               ) -> None:
    """Show users and what they may do (never the hashes)."""
    try:
        users = load_users(file)
    except UsersError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(2) from None
    for user in users.values():
        if as_json:
            typer.echo(json.dumps({"name": user.name, "classes": user.classes,
                                   "default_class": user.default_class,
                                   "sender_domains": user.sender_domains}))
            continue
        typer.echo(f"{user.name}: classes={','.join(user.classes) or '*'}"
                   f" default={user.default_class or '-'}"
                   f" sender_domains={','.join(user.sender_domains) or '(none)'}")


@tls_app.command("selfsigned")
def tls_selfsigned(
    out: Path = typer.Option(..., "--out", help="folder for cert.pem and key.pem"),
    hostname: str = typer.Option("localhost", help="subject and DNS name"),
    days: int = typer.Option(365, min=1, max=3650),
    as_json: bool = typer.Option(False, "--json", help="one JSON object"),
) -> None:
    """A self-signed certificate for tests and demos (key file written 0600)."""
    cert, key = selfsigned(hostname, days)
    try:
        private_dir(out)
        (out / "cert.pem").write_bytes(cert)
        fd = os.open(out / "key.pem", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(key)
    except OSError as exc:
        typer.echo(f"{out}: cannot write: {exc.strerror}", err=True)
        raise typer.Exit(2) from None
    typer.echo(json.dumps({"cert": str(out / "cert.pem"), "key": str(out / "key.pem"),
                           "hostname": hostname, "days": days}) if as_json else
               f"{out}/cert.pem and {out}/key.pem for {hostname}, valid {days} days")


@tls_app.command("check")
def tls_check(
    config: Path = typer.Option(..., "-c", "--config", envvar="POSTLANE_CONFIG",
                                help="the node's TOML config"),
    listener: str | None = typer.Option(None, help="only this listener (default: all with TLS)"),
    name: str | None = typer.Option(None, help="name to verify the certificate for "
                                               "(default: node.hostname)"),
    ca_file: Path | None = typer.Option(None, help="CA bundle to verify against "
                                                   "(default: the system's)"),
    as_json: bool = typer.Option(False, "--json", help="one JSON object per listener, in a list"),
) -> None:
    """Connect to the running node's listeners as a client would and show the TLS it gets:
    protocol, cipher, certificate names, issuer, validity, and whether it verifies."""
    from . import _load

    cfg = _load(config)
    if listener and listener not in cfg.listeners:
        typer.echo(f"no listener named {listener!r}", err=True)
        raise typer.Exit(2)
    if ca_file is not None:
        try:
            ssl.create_default_context(cafile=str(ca_file))
        except (OSError, ssl.SSLError) as exc:
            typer.echo(f"--ca-file: cannot load {ca_file}: {exc.strerror or exc}", err=True)
            raise typer.Exit(2) from None
    names = [listener] if listener else [n for n, lc in cfg.listeners.items() if lc.tls != "none"]
    results = [_check_listener(cfg.listeners[n], n, name or cfg.node.hostname, ca_file)
               for n in names]
    if as_json:
        typer.echo(json.dumps(results, indent=2))
    else:
        for r in results:
            typer.echo(_check_text(r))
    if any(r.get("error") for r in results):
        raise typer.Exit(1)


def _check_listener(lc, lname: str, subject: str, ca_file: Path | None) -> dict:
    """What one listener's TLS looks like to a client (``tls check``)."""
    from ..edge.tls import describe_certificate

    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(lc.address, lc.address)
    out: dict = {"listener": lname, "address": host, "port": lc.port, "tls": lc.tls}
    if lc.tls == "none":
        return out
    implicit = lc.tls == "implicit"
    try:
        out["protocol"], out["cipher"], der = asyncio.run(_probe(host, lc.port, implicit,
                                                                 subject, None))
    except (OSError, ssl.SSLError, TimeoutError, ValueError) as exc:
        out["error"] = str(exc)
        return out
    out["certificate"] = describe_certificate(der)
    verify = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
    out["verified_for"] = subject
    out["verified_with"] = str(ca_file) if ca_file else "system CAs"
    try:
        asyncio.run(_probe(host, lc.port, implicit, subject, verify))
    except ssl.SSLCertVerificationError as exc:
        out["verified"], out["verify_error"] = False, exc.verify_message
    except (OSError, ssl.SSLError, TimeoutError, ValueError) as exc:
        out["verified"], out["verify_error"] = False, str(exc)
    else:
        out["verified"] = True
    return out


def _check_text(r: dict) -> str:
    lines = [f"listener {r['listener']} {r['address']}:{r['port']} ({r['tls'].upper()})"]
    if r["tls"] == "none":
        return "\n".join(lines + ["  no TLS"])
    if "error" in r:
        return "\n".join(lines + [f"  TLS failed: {r['error']}"])
    info = r["certificate"]
    lines += [f"  protocol   {r['protocol']}, {r['cipher']}",
              f"  subject    {info['subject']}",
              f"  names      {', '.join(info['names']) or '-'}",
              f"  issuer     {info['issuer']}" + (" (self-signed)" if info["self_signed"] else ""),
              f"  valid      {info['not_before']} to {info['not_after']}"
              f" ({info['days_left']} days left)",
              f"  sha256     {info['sha256']}",
              f"  verified   yes, for {r['verified_for']} ({r['verified_with']})" if r["verified"]
              else f"  verified   no, for {r['verified_for']}: {r['verify_error']}"]
    return "\n".join(lines)


async def _probe(host: str, port: int, implicit: bool, name: str,
                 context: ssl.SSLContext | None) -> tuple[str, str, bytes]:
    """(protocol, cipher, certificate DER) of one TLS session with a listener; ``context``
    None: no verification."""
    from ..relay.client import SMTPConnection, SMTPError, Timeouts, unverified_context

    context = context or unverified_context()
    if implicit:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(
            host, port, ssl=context, server_hostname=name), 10)
        try:
            await asyncio.wait_for(reader.readline(), 10)
            ssl_object = writer.get_extra_info("ssl_object")
            cipher = ssl_object.cipher()
            return ssl_object.version(), cipher[0], ssl_object.getpeercert(binary_form=True)
        finally:
            writer.close()
    try:
        conn = await SMTPConnection.open(host, port, server_name=name, source_ip=None,
                                         ehlo_name="tls-check.local", tls="required",
                                         timeouts=Timeouts(10, 10, 10, 10, 10),
                                         ssl_context=context)
    except SMTPError as exc:
        cause = exc.__cause__
        raise cause if isinstance(cause, ssl.SSLError) else OSError(str(exc)) from None
    try:
        return conn.tls_version or "", conn.tls_cipher or "", conn.peer_chain()[0]
    finally:
        await conn.quit()


def killtest(
    workdir: Path = typer.Option(Path("killtest-run"), help="spool, logs and arrivals"),
    messages: int = typer.Option(300, min=2),
    kills: int = typer.Option(3, min=0),
    seed: int | None = typer.Option(None, help="random seed (default: the process id)"),
    spool: str | None = typer.Option(None, help="a PostgreSQL DSN: two nodes share it; each"
                                     " kill but the last restarts its victim, the last"
                                     " victim stays dead (taken over)"),
    workers: str = typer.Option("1", help="the node's \\[node] workers (a number or auto)"),
) -> None:
    """SIGKILL a node at random moments of a campaign; check nothing acknowledged is lost and
    the evidence of every message is complete (audit store and accounting files)."""
    from ..harness.killtest import command

    if workers != "auto" and not (workers.isdigit() and 1 <= int(workers) <= 256):
        raise typer.BadParameter("must be a number from 1 to 256 or auto", param_hint="--workers")
    raise typer.Exit(command(workdir, messages, kills, seed, spool, workers))
