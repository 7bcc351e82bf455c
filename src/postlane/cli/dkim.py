"""``postlane dkim``: make keys, plan rotations, see key states, check DNS, measure signing."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import NotRequired, TypedDict

import dns.exception
import dns.resolver
import typer

from ..config.model import Config, DKIMConfig, DKIMKeyConfig, parse_instant
from ..policy.dkim import (
    DKIMError,
    dns_record,
    generate_key,
    in_force,
    public_key_b64,
    read_key,
    record_name,
    write_key,
)
from ..secretfile import NotTheOwner, as_the_owner

app = typer.Typer(no_args_is_help=True, help="DKIM keys: generate, rotate, status, DNS check.")

_ALGORITHMS = {"rsa": "rsa-sha256", "ed25519": "ed25519-sha256"}
_JSON = typer.Option(False, "--json", help="one JSON object")


def _load(path: Path) -> Config:
    from . import _load as load_checked  # the one place config errors are printed

    return load_checked(path)


class _KeyRow(TypedDict):
    """One key in ``dkim status`` (the --json shape, and what the table prints)."""
    domain: str
    selector: str
    algorithm: str
    not_before: float | None
    retire_after: float | None
    state: str
    dns: str
    record_name: str
    record: str
    zone_line: str


class _Rotation(TypedDict):
    """A domain's next rotation: ``scheduled`` to a pending ``selector``, or ``due`` (and
    whether it is ``overdue``) when none is pending."""
    domain: str
    algorithm: str
    scheduled: NotRequired[float | None]
    selector: NotRequired[str]
    due: NotRequired[float]
    overdue: NotRequired[bool]


def _day(ts: float | None) -> str:
    return "-" if ts is None else time.strftime("%Y-%m-%d %H:%M", time.gmtime(ts))


def _zone_line(selector: str, domain: str, record: str) -> str:
    """A zone-file TXT line; strings longer than 255 bytes are split as DNS requires."""
    parts = " ".join(f'"{record[i:i + 250]}"' for i in range(0, len(record), 250))
    return f"{record_name(selector, domain)}. IN TXT ( {parts} )"


def _key_toml(domain: str, selector: str, algorithm: str, key_file: Path,
              not_before: float | None = None) -> str:
    lines = ["[[dkim.keys]]", f'domain = "{domain}"', f'selector = "{selector}"',
             f'algorithm = "{algorithm}"', f'key_file = "{key_file}"']
    if not_before is not None:
        lines.append(f"not_before = {datetime.fromtimestamp(not_before, UTC):%Y-%m-%dT%H:%M:%SZ}")
    return "\n".join(lines)


def _new_key(algorithm: str, bits: int, key_file: Path, quiet: bool = False) -> str:
    if key_file.exists():
        typer.echo(f"error: {key_file} already exists (keys are never overwritten)", err=True)
        raise typer.Exit(1)
    try:
        as_the_owner(key_file.parent)
    except NotTheOwner as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    try:
        key = generate_key(algorithm, bits)
    except DKIMError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    write_key(key_file, key)
    if not quiet:
        typer.echo(f"wrote {key_file} (mode 0600)")
    return dns_record(key)


def _check_bits(algorithm: str, bits: int, force: bool) -> None:
    """RSA below 2048 bits is refused by Gmail-class verifiers' policies and factorable for
    money (RFC 8301 requires verifiers to accept 1024 only for old keys): only with --force."""
    if algorithm == "rsa-sha256" and bits < 2048:
        typer.echo(f"warning: a {bits}-bit RSA key is weak; RFC 8301 and the mailbox providers"
                   " ask for 2048 bits", err=True)
        if not force:
            typer.echo("error: use --bits 2048 (or more), or --force to make it anyway",
                       err=True)
            raise typer.Exit(2)


@app.command()
def keygen(domain: str = typer.Argument(..., help="signing domain (d=)"),
           selector: str = typer.Option(..., "--selector", "-s", help="e.g. 2026q4"),
           algorithm: str = typer.Option("rsa", help="rsa or ed25519"),
           bits: int = typer.Option(2048, help="RSA key size (below 2048 needs --force)"),
           key_file: Path | None = typer.Option(None, help="default: keys/DOMAIN.SELECTOR.pem"
                                                           " (keys/ is created 0700)"),
           force: bool = typer.Option(False, "--force", help="allow an RSA key below 2048 bits"),
           as_json: bool = _JSON) -> None:
    """Write a new private key (mode 0600) and print its DNS TXT record and config entry."""
    if algorithm not in _ALGORITHMS:
        typer.echo(f"error: --algorithm must be rsa or ed25519, not {algorithm!r}", err=True)
        raise typer.Exit(2)
    _check_bits(_ALGORITHMS[algorithm], bits, force)
    domain = domain.lower().rstrip(".")
    path = key_file or Path("keys") / f"{domain}.{selector}.pem"
    record = _new_key(_ALGORITHMS[algorithm], bits, path, as_json)
    entry = _key_toml(domain, selector, _ALGORITHMS[algorithm], path.resolve())
    if as_json:
        typer.echo(json.dumps({"key_file": str(path.resolve()), "domain": domain,
                               "selector": selector, "algorithm": _ALGORITHMS[algorithm],
                               "record_name": record_name(selector, domain), "record": record,
                               "config": entry}, indent=2))
        return
    typer.echo("\nPublish this DNS record:\n" + _zone_line(selector, domain, record))
    typer.echo("\nAdd to the config:\n" + entry)


def _quarter_after(ts: float) -> datetime:
    """The first day of the quarter that follows ``ts``."""
    day = datetime.fromtimestamp(ts, UTC)
    month = (day.month - 1) // 3 * 3 + 4
    return datetime(day.year + (month > 12), (month - 1) % 12 + 1, 1, tzinfo=UTC)


@app.command()
def rotate(domain: str = typer.Argument(..., help="signing domain whose keys to rotate"),
           config: Path = typer.Option(..., "-c", "--config", help="TOML config file"),
           algorithm: str | None = typer.Option(
               None, help="rsa or ed25519: only this key (default: every algorithm the domain"
                          " signs with, e.g. both keys of a dual-signing domain)"),
           selector: str | None = typer.Option(
               None, help="default: YYYYqN of the start (YYYYqNe for the Ed25519 key of a"
                          " domain that also has RSA keys)"),
           at: str | None = typer.Option(None, help="start date (default: next quarter)"),
           bits: int = typer.Option(2048, help="RSA key size (below 2048 needs --force)"),
           force: bool = typer.Option(False, "--force", help="allow an RSA key below 2048 bits"),
           as_json: bool = _JSON) -> None:
    """Prepare the next key of each algorithm: write it, print its DNS record and the config
    changes (the new key's not_before, the old key's retire_after after the longest message
    lifetime)."""
    cfg = _load(config)
    domain = domain.lower().rstrip(".")
    keys = [k for k in cfg.dkim.keys if k.domain == domain and not k.pools and not k.classes]
    algorithms = sorted({k.algorithm for k in keys}, reverse=True)  # rsa-sha256 first
    if not keys:
        typer.echo(f"error: no unscoped key for {domain} in {config}; use keygen", err=True)
        raise typer.Exit(1)
    if algorithm is not None:
        wanted = _ALGORITHMS.get(algorithm)
        if wanted not in algorithms:
            typer.echo(f"error: --algorithm must be one {domain} signs with:"
                       f" {', '.join(a.split('-')[0] for a in algorithms)}", err=True)
            raise typer.Exit(2)
        algorithms = [wanted]
    if selector is not None and len(algorithms) > 1:
        typer.echo(f"error: {domain} signs with {len(algorithms)} keys; --selector names one:"
                   " add --algorithm", err=True)
        raise typer.Exit(2)
    if "rsa-sha256" in algorithms:
        _check_bits("rsa-sha256", bits, force)
    current = {a: max((k for k in keys if k.algorithm == a), key=lambda k: k.not_before or 0.0)
               for a in algorithms}
    try:
        start = parse_instant(at) if at else _quarter_after(
            max(time.time(), *(k.not_before or 0.0 for k in current.values()))).timestamp()
    except ValueError as exc:
        typer.echo(f"error: --at: {exc}", err=True)
        raise typer.Exit(2) from None
    begin = datetime.fromtimestamp(start, UTC)
    dual = any(k.algorithm == "rsa-sha256" for k in keys)
    planned = {a: selector or f"{begin.year}q{(begin.month - 1) // 3 + 1}"
               + ("e" if a == "ed25519-sha256" and dual else "") for a in algorithms}
    taken = [s for s in planned.values() if any(k.selector == s for k in keys)]
    if taken:
        typer.echo(f"error: selector {taken[0]} is already used for {domain}", err=True)
        raise typer.Exit(1)
    lifetime = max(c.expiry for c in cfg.classes.values())
    retire = start + lifetime + 86400  # a day's margin for clock skew and slow verifiers
    retire_at = f"{datetime.fromtimestamp(retire, UTC):%Y-%m-%dT%H:%M:%SZ}"
    done = []
    for algo, sel in planned.items():
        old = current[algo]
        path = Path(old.key_file).parent / f"{domain}.{sel}.pem"
        if not as_json:
            typer.echo(f"\n== {algo}: {old.selector} -> {sel}")
        record = _new_key(algo, bits, path, as_json)
        entry = _key_toml(domain, sel, algo, path.resolve(), start)
        done.append({"algorithm": algo, "current_selector": old.selector, "selector": sel,
                     "key_file": str(path.resolve()), "record_name": record_name(sel, domain),
                     "record": record, "not_before": start, "config": entry,
                     "current_retire_after": retire})
        if as_json:
            continue
        typer.echo("\n1. Publish this DNS record now (before the switch):\n"
                   + _zone_line(sel, domain, record))
        typer.echo("\n2. Add to the config:\n" + entry)
        typer.echo(f"\n3. Set on the current key ({old.selector}):\nretire_after = {retire_at}")
        typer.echo(f"\n4. Remove {record_name(old.selector, domain)} from DNS after"
                   f" {_day(retire)} UTC (longest message lifetime {lifetime / 86400:g} days).")
    if as_json:
        typer.echo(json.dumps({"domain": domain, "keys": done}, indent=2))


def _states(dkim: DKIMConfig, now: float) -> list[tuple[DKIMKeyConfig, str]]:
    """Each key's state; key files are already checked by loading the config."""
    out = []
    for key in dkim.keys:
        scope = [k for k in dkim.keys if k.domain == key.domain and k.algorithm == key.algorithm
                 and k.pools == key.pools and k.classes == key.classes and in_force(k, now)]
        current = max(scope, key=lambda k: k.not_before or 0.0, default=None)
        if key.retire_after is not None and now >= key.retire_after:
            state = "retired (remove the DNS record)"
        elif (key.not_before or 0.0) > now:
            state = "pending (publish the DNS record)"
        elif key is current:
            state = "active"
        else:
            state = "superseded (keep the DNS record published)"
        out.append((key, state))
    return out


def _dns_action(key: DKIMKeyConfig, state: str) -> str:
    """What to do with the key's DNS record in this state."""
    if state.startswith("retired"):
        return "remove"
    if state.startswith("pending"):
        return "publish"
    if key.retire_after is not None:
        return f"keep until {_day(key.retire_after)} UTC"
    return "keep"


@app.command()
def status(config: Path = typer.Option(..., "-c", "--config", help="TOML config file"),
           now: str | None = typer.Option(None, help="evaluate at this time (default: now)"),
           as_json: bool = _JSON) -> None:
    """List keys, their state, the DNS records to publish, keep or remove, and when each
    domain's next rotation is due."""
    cfg = _load(config)
    at = parse_instant(now) if now else time.time()
    states = _states(cfg.dkim, at)
    rows: list[_KeyRow] = []
    due: list[_Rotation] = []
    for key, state in states:
        record = dns_record(read_key(key.key_file, key.algorithm))
        rows.append({"domain": key.domain, "selector": key.selector, "algorithm": key.algorithm,
                     "not_before": key.not_before, "retire_after": key.retire_after,
                     "state": state, "dns": _dns_action(key, state),
                     "record_name": record_name(key.selector, key.domain), "record": record,
                     "zone_line": _zone_line(key.selector, key.domain, record)})
    for key, state in states:
        if not state.endswith("active"):
            continue
        pending = [k for k, s in states if k.domain == key.domain
                   and k.algorithm == key.algorithm and s.startswith("pending")]
        if pending:
            nxt = min(pending, key=lambda k: k.not_before or 0.0)
            due.append({"domain": key.domain, "algorithm": key.algorithm,
                        "scheduled": nxt.not_before, "selector": nxt.selector})
            continue
        since = key.not_before or Path(key.key_file).stat().st_mtime
        when = since + cfg.dkim.rotation_period
        due.append({"domain": key.domain, "algorithm": key.algorithm, "due": when,
                    "overdue": when <= at})
    if as_json:
        typer.echo(json.dumps({"keys": rows, "rotations": due}, indent=2))
        return
    if not rows:
        typer.echo("DKIM signing is off: no keys in [dkim]")
        return
    typer.echo(f"{'domain':<24} {'selector':<12} {'algorithm':<15} {'not_before':<17}"
               f" {'retire_after':<17} state")
    for row in rows:
        typer.echo(f"{row['domain']:<24} {row['selector']:<12} {row['algorithm']:<15}"
                   f" {_day(row['not_before']):<17} {_day(row['retire_after']):<17}"
                   f" {row['state']}")
    for item in due:
        head = f"next rotation {item['domain']} {item['algorithm']}:"
        if "scheduled" in item:
            typer.echo(f"{head} scheduled {_day(item['scheduled'])} to {item['selector']}")
        else:
            typer.echo(f"{head} due {_day(item['due'])}" + (
                f" (OVERDUE: run postlane dkim rotate {item['domain']} --algorithm"
                f" {item['algorithm'].split('-')[0]})" if item["overdue"] else ""))
    typer.echo("\nDNS records:")
    for row in rows:
        if row["dns"] == "remove":
            typer.echo(f"remove: {row['record_name']} (retired)")
        else:
            typer.echo(f"{row['dns']}: {row['zone_line']}")


def _tags(text: str) -> dict[str, str]:
    out = {}
    for part in text.split(";"):
        name, sep, value = part.partition("=")
        if sep:
            out[name.strip()] = "".join(value.split())
    return out


@app.command()
def check(domain: str = typer.Argument(..., help="signing domain"),
          config: Path = typer.Option(..., "-c", "--config", help="TOML config file"),
          selector: str | None = typer.Option(None, help="only this selector"),
          as_json: bool = _JSON) -> None:
    """Look up each key's TXT record through the configured resolver and compare it with the
    key; exits 1 when any record is missing or does not match."""
    cfg = _load(config)
    domain = domain.lower().rstrip(".")
    keys = [k for k in cfg.dkim.keys if k.domain == domain
            and (selector is None or k.selector == selector)]
    if not keys:
        typer.echo(f"error: no key for {domain} in {config}", err=True)
        raise typer.Exit(1)
    resolver = dns.resolver.Resolver(configure=cfg.dns.nameserver is None)
    if cfg.dns.nameserver:
        resolver.nameservers = [cfg.dns.nameserver]
        resolver.port = cfg.dns.port
    resolver.lifetime = cfg.dns.timeout
    results = []
    for key in keys:
        name = record_name(key.selector, domain)
        expected = public_key_b64(read_key(key.key_file, key.algorithm))
        kind = "ed25519" if key.algorithm == "ed25519-sha256" else "rsa"
        try:
            answer = resolver.resolve(name, "TXT")
            texts = [b"".join(r.strings).decode("ascii", "replace") for r in answer]
        except (dns.exception.DNSException, OSError) as exc:
            results.append((name, "MISSING", f"{exc.__class__.__name__}: {exc}"))
            continue
        records = [_tags(t) for t in texts if _tags(t).get("v", "DKIM1") == "DKIM1"]
        if any(r.get("p") == expected and r.get("k", "rsa") == kind for r in records):
            results.append((name, "ok", f"k={kind}, matches {key.key_file}"))
        else:
            results.append((name, "MISMATCH", f"published: {texts!r}; expected"
                                              f" p={expected[:24]}…"))
    failed = any(status != "ok" for _, status, _ in results)
    if as_json:
        typer.echo(json.dumps({"ok": not failed, "records": [
            {"name": n, "status": st, "detail": d} for n, st, d in results]}, indent=2))
    else:
        for name, status, detail in results:
            typer.echo(f"{name}: {status} ({detail})")
    raise typer.Exit(1 if failed else 0)


@app.command()
def bench(size: int = typer.Option(10240, help="message size in bytes"),
          seconds: float = typer.Option(3.0, help="run time per measurement"),
          campaign: int = typer.Option(2000, help="campaign signatures queued at once")) -> None:
    """Signatures per second (RSA-2048, Ed25519; 1 and 2 threads) and canonicalization cost
    against dkimpy's, on one message of ``size`` bytes."""
    from ..harness.dkimbench import run_dkim_bench

    run_dkim_bench(size, seconds, campaign, typer.echo)
