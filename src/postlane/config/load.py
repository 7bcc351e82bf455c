"""Load and check a TOML config, reporting every error with the path of the field it is about."""

from __future__ import annotations

import difflib
import ipaddress
import re
import time
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import UnionType
from typing import TYPE_CHECKING, Union, get_args, get_origin

from pydantic import BaseModel, ValidationError

from .destinations import default_rules
from .locations import is_dsn
from .model import PATTERN_WORDS, Config

if TYPE_CHECKING:
    from pydantic_core import ErrorDetails


def _any_mailbox(addr: str) -> bool:
    return True


@dataclass(frozen=True)
class PartChecks:
    """The checks of a config that need other parts (``postlane/startup.py`` supplies them, so
    config imports none of those parts); the defaults skip them."""

    mailbox: Callable[[str], bool] = _any_mailbox
    """Whether a string is an e-mail address, as the edge parses them."""
    users_file: Callable[[str, Config], list[str]] | None = None
    """The errors of an SMTP users file (it loads, its classes exist)."""
    dkim_key: Callable[[str, str], str | None] | None = None
    """Why a DKIM key file of an algorithm cannot be used (None: it can)."""
    files: Callable[[Config], list[str]] | None = None
    """The errors of the other files and folders the node opens at start (TLS pairs, bounce
    rules, audit keys, the spool and accounting folders), its paths resolved."""


NO_PART_CHECKS = PartChecks()


class ConfigError(Exception):
    """A config file that cannot run; ``errors`` lists ``path: message`` lines, one per problem."""

    def __init__(self, source: str, errors: list[str]) -> None:
        super().__init__(f"{source}: {len(errors)} error(s)\n" + "\n".join(errors))
        self.source = source
        self.errors = errors


def _path(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if part == "[key]":  # a table's name: the path ends at it
            continue
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out or "(top level)"


def _message(err: ErrorDetails) -> str:
    msg = str(err.get("msg", "invalid"))
    msg = msg.removeprefix("Value error, ")
    if err.get("type") == "extra_forbidden":
        hint = _did_you_mean(err["loc"])
        return "unknown field" + (f" (did you mean {hint!r}?)" if hint else "")
    if err.get("type") == "missing":
        return "required field is missing"
    if err.get("type") in ("model_type", "model_attributes_type", "dict_type"):
        if isinstance(err["loc"][-1], int):  # an item of an array: an inline table
            return "must be a table ({ ... })"
        return f"must be a table ([{_path(tuple(err['loc']))}] or {{ ... }})"
    if err.get("type") == "string_pattern_mismatch":
        return PATTERN_WORDS.get(str(err.get("ctx", {}).get("pattern")), msg)
    return msg


def _fields_at(loc: tuple[int | str, ...]) -> list[str]:
    """The field names the model at ``loc`` (a path into Config) accepts, aliases included."""
    annotation: object = Config
    for part in loc:
        while get_origin(annotation) in (Union, UnionType):  # Optional[...] and friends
            annotation = next(a for a in get_args(annotation) if a is not type(None))
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            field = annotation.model_fields.get(str(part)) or next(
                (f for f in annotation.model_fields.values() if f.alias == part), None)
            if field is None:
                return []
            annotation = field.annotation
        elif get_origin(annotation) in (dict, list):
            annotation = get_args(annotation)[-1]
        else:
            return []
    while get_origin(annotation) in (Union, UnionType):
        annotation = next(a for a in get_args(annotation) if a is not type(None))
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [f.alias or name for name, f in annotation.model_fields.items()]
    return []


def _did_you_mean(loc: tuple[int | str, ...]) -> str | None:
    close = difflib.get_close_matches(str(loc[-1]), _fields_at(loc[:-1]), n=1, cutoff=0.6)
    return close[0] if close else None


def _covers(a: str, a_v6only: bool, b: str) -> bool:
    """Whether a socket bound to ``a`` takes connections to ``b``. A listener on ``::`` is
    IPv6 only (asyncio sets ``IPV6_V6ONLY``), so ``0.0.0.0`` and ``::`` on one port is how a
    node listens on both families; the API binds ``::`` dual-stack (``api/server.py``): its
    ``::`` takes IPv4 too."""
    ip_a, ip_b = ipaddress.ip_address(a), ipaddress.ip_address(b)
    if ip_a == ip_b:
        return True
    if not ip_a.is_unspecified:
        return False
    return ip_a.version == ip_b.version or (ip_a.version == 6 and not a_v6only)


def _listener_checks(cfg: Config) -> list[str]:
    """Two sockets on one port: ``serve`` would fail to bind the second."""
    errors: list[str] = []
    ports: dict[int, list[tuple[str, str, bool]]] = {}  # port -> (owner, address, v6 only)
    sockets = [(f"listener {name!r}", lc.address, lc.port, f"listeners.{name}.port", True)
               for name, lc in cfg.listeners.items()]
    if cfg.api.enabled:
        sockets.append(("the API", cfg.api.address, cfg.api.port, "api.port", False))
    for owner, address, port, field, v6only in sockets:
        if port == 0:
            continue  # any free port
        taken = ports.setdefault(port, [])
        clash = next((o for o, a, only in taken
                      if _covers(a, only, address) or _covers(address, v6only, a)), None)
        if clash:
            errors.append(f"{field}: {address}:{port} is already where {clash} listens")
        taken.append((owner, address, v6only))
    return errors


def _cross_checks(cfg: Config, checks: PartChecks) -> list[str]:
    """Checks that span sections (a class names a pool that exists, ...)."""
    errors: list[str] = []
    for name, cls in cfg.classes.items():
        if cls.pool not in cfg.pools:
            errors.append(f"classes.{name}.pool: no pool named {cls.pool!r}"
                          f" (pools: {', '.join(sorted(cfg.pools))})")
    for name, lst in cfg.listeners.items():
        if lst.default_class and lst.default_class not in cfg.classes:
            errors.append(f"listeners.{name}.default_class: no class named {lst.default_class!r}")
    if cfg.default_class and cfg.default_class not in cfg.classes:
        errors.append(f"default_class: no class named {cfg.default_class!r}")
    seen: dict[str, str] = {}
    for pname, pool in cfg.pools.items():
        for i, ip in enumerate(pool.ips):
            if ip.address in seen:
                errors.append(f"pools.{pname}.ips[{i}].address: {ip.address} already belongs to"
                          f" pool {seen[ip.address]!r} (an IP serves one pool)")
            seen[ip.address] = pname
    for i, rule in enumerate(cfg.classification.rules):
        if rule.cls not in cfg.classes:
            errors.append(f"classification.rules[{i}].class: no class named {rule.cls!r}")
    for key, name in cfg.classification.mt_priority.items():
        if not key.lstrip("-").isdigit() or not -9 <= int(key) <= 9:
            errors.append(f"classification.mt_priority.{key}: not a priority from -9 to 9")
        if name not in cfg.classes:
            errors.append(f"classification.mt_priority.{key}: no class named {name!r}")
    for domain, target in cfg.routes.items():
        host, _, port = target.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            errors.append(f"routes.{domain}: {target!r} is not host:port")
    for name in cfg.monitor.sla:
        if name not in cfg.classes:
            errors.append(f"monitor.sla.{name}: no class named {name!r}")
        elif cfg.classes[name].sla is None:
            errors.append(f"monitor.sla.{name}: class {name!r} has no sla to monitor")
    if cfg.node.postmaster is not None and not checks.mailbox(cfg.node.postmaster):
        errors.append(f"node.postmaster: {cfg.node.postmaster!r} is not an e-mail address")
    rpt = cfg.tlsrpt
    if rpt.report_class and rpt.report_class not in cfg.classes:
        errors.append(f"tlsrpt.class: no class named {rpt.report_class!r}")
    for field in ("contact", "mail_from"):
        addr = getattr(rpt, field)
        if addr is not None and not checks.mailbox(addr):
            errors.append(f"tlsrpt.{field}: {addr!r} is not an e-mail address")
    url = cfg.monitor.webhook_url
    if url is not None and not url.startswith(("http://", "https://")):
        errors.append("monitor.webhook_url: not an http(s) URL")  # never echoed: a secret
    for field in ("ops_address", "ops_from"):
        addr = getattr(cfg.monitor, field)
        if addr is not None and not checks.mailbox(addr):
            errors.append(f"monitor.{field}: {addr!r} is not an e-mail address")
    return (errors + _listener_checks(cfg) + _feedback_checks(cfg) + _dkim_checks(cfg)
            + _audit_checks(cfg) + _reputation_checks(cfg))


def _feedback_checks(cfg: Config) -> list[str]:
    errors = []
    fb = cfg.feedback
    for name, cls in fb.classes.items():
        if name not in cfg.classes:
            errors.append(f"feedback.classes.{name}: no class named {name!r}")
        if cls.marketing and not fb.unsubscribe_url:
            errors.append(f"feedback.unsubscribe_url: required because class {name!r} is"
                          f" marketing (RFC 8058 one-click unsubscribe)")
    url = fb.unsubscribe_url or ""
    if url and not (url.startswith("https://") or url.startswith(("http://127.",
                                                                   "http://localhost"))):
        errors.append("feedback.unsubscribe_url: must be an https:// URL (RFC 8058)")
    for i, addr in enumerate(fb.fbl_addresses):
        if "@" not in addr.strip("@"):
            errors.append(f"feedback.fbl_addresses[{i}]: not an address: {addr!r}")
    return errors


def _reputation_checks(cfg: Config) -> list[str]:
    rep = cfg.reputation
    errors = [f"reputation.dmarc.addresses[{i}]: not an address: {addr!r}"
              for i, addr in enumerate(rep.dmarc.addresses) if "@" not in addr.strip("@")]
    for field, url in (("postmaster.base_url", rep.postmaster.base_url),
                       ("snds.url", rep.snds.url)):
        if url is not None and not url.startswith(("https://", "http://")):
            errors.append(f"reputation.{field}: not an http(s) URL")
    if rep.spam_ratio_warning > rep.spam_ratio_critical:
        errors.append("reputation.spam_ratio_warning: must not exceed spam_ratio_critical")
    return errors


def _dkim_checks(cfg: Config) -> list[str]:
    """Keys scoped to pools/classes that exist, rotation windows that keep the old DNS record
    published for as long as a message signed with it can still be in the queue."""
    errors: list[str] = []
    lifetime = max(c.expiry for c in cfg.classes.values())
    for i, key in enumerate(cfg.dkim.keys):
        where = f"dkim.keys[{i}]"
        errors += [f"{where}.pools: no pool named {p!r}" for p in key.pools if p not in cfg.pools]
        errors += [f"{where}.classes: no class named {c!r}" for c in key.classes
                   if c not in cfg.classes]
        if key.not_before is not None and key.retire_after is not None \
                and key.retire_after <= key.not_before:
            errors.append(f"{where}.retire_after: must be later than not_before")
        later = [k.not_before for k in cfg.dkim.keys if k is not key and k.domain == key.domain
                 and k.algorithm == key.algorithm and k.pools == key.pools
                 and k.classes == key.classes and k.not_before is not None
                 and k.not_before > (key.not_before or 0.0)]
        if later and key.retire_after is not None and key.retire_after < min(later) + lifetime:
            errors.append(f"{where}.retire_after: selector {key.selector} retires before mail"
                          f" signed with it can have left the queue (successor starts"
                          f" {_day(min(later))}, longest class expiry {lifetime / 86400:g} days:"
                          f" keep it until at least {_day(min(later) + lifetime)})")
    for name in cfg.dkim.class_on_missing_key:
        if name not in cfg.classes:
            errors.append(f"dkim.class_on_missing_key.{name}: no class named {name!r}")
    domains = {k.domain for k in cfg.dkim.keys}
    for name, pool in cfg.pools.items():
        if pool.signing_domain and pool.signing_domain not in domains:
            errors.append(f"pools.{name}.signing_domain: no key in [dkim] for"
                          f" {pool.signing_domain}")
    return errors


def _day(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(ts))


def file_problem(path: str) -> str | None:
    """Why ``path`` cannot be the file a field names, or None: "no such file", or that it
    cannot be looked at (a folder on the way the user may not enter: init makes tls/ and
    keys/ 0700, and a service user other than the one who ran it got a traceback)."""
    try:
        return None if Path(path).is_file() else f"no such file: {path}"
    except OSError as exc:
        return f"cannot read {path}: {exc.strerror or exc}"


def _security_checks(cfg: Config, base: Path | None, checks: PartChecks) -> list[str]:
    """Resolve the security section's relative paths against ``base`` (the config file's folder;
    None when parsing text) and check the TLS files and the users file that absolute paths name."""
    errors: list[str] = []

    def resolve(value: str | None) -> str | None:
        if value is None or base is None or Path(value).is_absolute():
            return value
        return str(base / value)

    def pair(where: str, cert: str | None, key: str | None) -> None:
        if (cert is None) != (key is None):
            errors.append(f"{where}: give both the certificate and the key file, or neither")
        for path in (cert, key):
            if path and Path(path).is_absolute() and (problem := file_problem(path)):
                errors.append(f"{where}: {problem}")

    sec = cfg.security
    sec.users_file = resolve(sec.users_file)
    cfg.tls.cert_file, cfg.tls.key_file = resolve(cfg.tls.cert_file), resolve(cfg.tls.key_file)
    pair("tls.cert_file/key_file", cfg.tls.cert_file, cfg.tls.key_file)
    cfg.relay.ca_file = resolve(cfg.relay.ca_file)
    ca = cfg.relay.ca_file
    if ca and Path(ca).is_absolute() and (problem := file_problem(ca)):
        errors.append(f"relay.ca_file: {problem}")
    for name, lst in cfg.listeners.items():
        lst.tls_cert, lst.tls_key = resolve(lst.tls_cert), resolve(lst.tls_key)
        where = f"listeners.{name}"
        if name == "tlsrpt":  # relay/tlsrpt.py REPORT_LISTENER: its mail would be relaxed
            errors.append(f"{where}: the name is the node's own, for its TLS reports")
        if lst.tls != "none":
            pair(f"{where}.tls_cert/tls_key", lst.tls_cert, lst.tls_key)
        else:
            for field in ("require_auth", "require_tls"):
                if getattr(lst, field):
                    errors.append(f"{where}.{field}: needs TLS; set tls = \"starttls\" or"
                                  f" \"implicit\"")
        if lst.require_auth and not sec.users_file:
            errors.append(f"{where}.require_auth: needs security.users_file")
    if sec.users_file and Path(sec.users_file).is_absolute() and checks.users_file:
        errors += checks.users_file(sec.users_file, cfg)
    return errors


def _audit_checks(cfg: Config) -> list[str]:
    errors: list[str] = []
    audit = cfg.audit
    for name, ret in audit.retention.items():
        if name != "*" and name not in cfg.classes:
            errors.append(f"audit.retention.{name}: no class named {name!r}")
        if ret.pseudonymise is not None and not audit.pseudonymisation_key:
            errors.append(f"audit.retention.{name}.pseudonymise: needs"
                          " audit.pseudonymisation_key")
        if ret.pseudonymise is not None and ret.delete is not None and \
                ret.delete <= ret.pseudonymise:
            errors.append(f"audit.retention.{name}.delete: must be later than pseudonymise")
    names: set[str] = set()
    for i, hook in enumerate(audit.webhooks):
        for cls in hook.classes:
            if cls not in cfg.classes:
                errors.append(f"audit.webhooks[{i}].classes: no class named {cls!r}")
        key = hook.name or hook.url
        if key in names:
            errors.append(f"audit.webhooks[{i}]: another webhook has the same name/url"
                          " (each needs its own cursor; set name)")
        names.add(key)
    if audit.tsa_url and not audit.seal_key:
        errors.append("audit.tsa_url: time-stamps are taken of seals: needs audit.seal_key")
    if audit.tsa_url and not audit.tsa_url.startswith(("https://", "http://")):
        errors.append("audit.tsa_url: must be an http(s):// URL (RFC 3161 over HTTP)")
    return errors


def _drop_value(data: dict, loc: tuple[int | str, ...]) -> object:
    """The raw value at ``loc``."""
    node: object = data
    for part in loc:
        node = node[part]  # type: ignore[index]
    return node


def _drop(data: dict, loc: tuple[int | str, ...], dropped: set[str]) -> bool:
    """Remove what ``loc`` points at from the raw TOML data, so that the rest can still be
    validated and cross-checked; a named entry (a pool, a class ...) removed whole is noted in
    ``dropped``. False if there is nothing left to remove."""
    node: object = data
    for part in loc[:-1]:
        try:
            node = node[part]  # type: ignore[index]
        except (KeyError, IndexError, TypeError):
            return False
    last = loc[-1] if loc else None
    if isinstance(node, dict) and last in node:
        if len(loc) == 2 and (isinstance(node[last], dict) or not _fields_at(loc[:1])):
            dropped.add(str(last))  # a named entry (a pool, a class ...), whatever its value
        del node[last]
        return True
    if isinstance(node, list) and isinstance(last, int) and last < len(node):
        del node[last]
        return True
    # a required field is missing: drop the entry that lacks it
    return len(loc) > 1 and _drop(data, loc[:-1], dropped)


_INT64 = range(-(2**63), 2**63)


def _too_long_ints(data: object, loc: tuple[int | str, ...] = ()) -> list[tuple[int | str, ...]]:
    """Where the raw TOML has an integer outside TOML's 64-bit range (tomllib reads them)."""
    if isinstance(data, dict):
        return [bad for key, value in data.items() for bad in _too_long_ints(value, (*loc, key))]
    if isinstance(data, list):
        return [bad for i, value in enumerate(data) for bad in _too_long_ints(value, (*loc, i))]
    if isinstance(data, int) and not isinstance(data, bool) and data not in _INT64:
        return [loc]
    return []


def _validate(text: str, source: str, checks: PartChecks) -> tuple[Config | None, list[str]]:
    """Every error in the file, and a Config of what is valid in it (None if nothing is).

    Pydantic reports the field-level errors of the whole file at once; the parts they are about
    are then left out and the rest validated again, so that the cross-section checks (a class
    naming a pool that does not exist, two listeners on one port ...) still run, and a file
    with five mistakes gets five errors. Cross-check errors about an entry that was left out
    are not reported: they would only echo its first error."""
    try:
        data = tomllib.loads(text.removeprefix("\ufeff"))  # a BOM is not content
    except tomllib.TOMLDecodeError as exc:
        return None, [f"not valid TOML: {exc}"]
    errors: list[str] = []
    dropped: set[str] = set()
    removed: list[tuple[int | str, ...]] = []
    for loc in _too_long_ints(data):
        errors.append(f"{_path(loc)}: {_drop_value(data, loc)} is not a 64-bit integer"
                      " (TOML's range)")
        _drop(data, loc, dropped)
        removed.append(loc)
    for _ in range(20):  # each round removes at least one broken part
        try:
            cfg = Config.model_validate(data)
        except ValidationError as exc:
            found = [tuple(e["loc"]) for e in exc.errors()]
            # not errors the removals caused (a required field now missing)
            errors += [f"{_path(loc)}: {_message(e)}" for loc, e in zip(found, exc.errors(),
                                                                      strict=True)
                       if not any(loc[:len(r)] == r or r[:len(loc)] == loc for r in removed)]
            progress = False
            for loc in found:
                if _drop(data, loc, dropped):
                    removed.append(loc)
                    progress = True
            if not progress:
                return None, errors
            continue
        cross = _cross_checks(cfg, checks) + _security_checks(cfg, None, checks)
        # an entry's field left out: what needs that field of it (class 'x' has no sla)
        fields = {(str(loc[1]), str(loc[2])) for loc in removed if len(loc) >= 3}
        errors += [e for e in cross if not any(repr(name) in e for name in dropped)
                   and not any(repr(name) in e and re.search(rf"\b{re.escape(field)}\b", e)
                               for name, field in fields)]
        return cfg, errors
    return None, errors


def parse_config_text(text: str, source: str = "<config>",
                      checks: PartChecks = NO_PART_CHECKS) -> Config:
    """Parse TOML text into a Config, raising ConfigError with every problem found (the checks
    that need other parts only as ``checks`` gives them: use ``startup.parse_config``)."""
    cfg, errors = _validate(text, source, checks)
    if errors or cfg is None:
        raise ConfigError(source, errors)
    return _with_defaults(cfg)


def _with_defaults(cfg: Config) -> Config:
    if cfg.default_destinations:
        for name, rule in default_rules().items():
            cfg.destinations.setdefault(name, rule)
    return cfg


def _tilde_paths(cfg: Config) -> list[str]:
    """Paths written ``~/...``: no shell expands them here, so the node would make a folder
    named ``~`` beside the config (they are relative paths, taken from its folder)."""
    fields: list[tuple[str, str | None]] = [
        ("node.spool", cfg.node.spool), ("accounting.directory", cfg.accounting.directory),
        ("api.token_file", cfg.api.token_file), ("api.tokens_file", cfg.api.tokens_file),
        ("security.users_file", cfg.security.users_file), ("tls.cert_file", cfg.tls.cert_file),
        ("tls.key_file", cfg.tls.key_file), ("relay.ca_file", cfg.relay.ca_file),
        ("feedback.bounce_rules", cfg.feedback.bounce_rules),
        ("feedback.suppression_db", cfg.feedback.suppression_db),
        ("feedback.key_file", cfg.feedback.key_file), ("audit.path", cfg.audit.path),
        ("audit.pseudonymisation_key", cfg.audit.pseudonymisation_key),
        ("audit.seal_key", cfg.audit.seal_key), ("reputation.store", cfg.reputation.store),
        ("reputation.postmaster.key_file", cfg.reputation.postmaster.key_file)]
    fields += [(f"listeners.{name}.{attr}", getattr(lst, attr))
               for name, lst in cfg.listeners.items() for attr in ("tls_cert", "tls_key")]
    fields += [(f"dkim.keys[{i}].key_file", key.key_file) for i, key in enumerate(cfg.dkim.keys)]
    return [f"{name}: {value!r}: '~' is not expanded here; give the full path (or one relative"
            f" to the config file's folder)" for name, value in fields
            if value and value.startswith("~")]


def read_config_file(path: str | Path, checks: PartChecks = NO_PART_CHECKS, *,
                     check_files: bool = True) -> Config:
    """Read a config file; relative paths inside it are taken relative to the file's folder.
    ``check_files=False`` resolves the paths without opening the keys and certificates they
    name (``postlane restore`` learns from it where to put them). Use ``startup.load_config``:
    it passes the ``checks`` that need other parts."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(str(path), [f"cannot read: {exc.strerror}"]) from None
    except UnicodeDecodeError as exc:
        line = exc.object[:exc.start].count(b"\n") + 1
        raise ConfigError(str(path), [f"not UTF-8 text: byte {exc.object[exc.start]:#04x} on"
                                      f" line {line}"]) from None
    cfg, errors = _validate(text, str(path), checks)
    if cfg is None:
        raise ConfigError(str(path), errors)
    errors += _tilde_paths(cfg)
    base = path.resolve().parent
    if not is_dsn(cfg.node.spool) and not Path(cfg.node.spool).is_absolute():
        cfg.node.spool = str(base / cfg.node.spool)
    if not Path(cfg.accounting.directory).is_absolute():
        cfg.accounting.directory = str(base / cfg.accounting.directory)
    for name in ("token_file", "tokens_file"):
        value = getattr(cfg.api, name)
        if value and not Path(value).is_absolute():
            setattr(cfg.api, name, str(base / value))
    fb = cfg.feedback
    for name in ("bounce_rules", "suppression_db", "key_file"):
        value = getattr(fb, name)
        if value and not Path(value).is_absolute():
            setattr(fb, name, str(base / value))
    file_errors = [e for e in _security_checks(cfg, base, checks) if e not in errors]
    for i, key in enumerate(cfg.dkim.keys):
        if not Path(key.key_file).is_absolute():
            key.key_file = str(base / key.key_file)
        why = checks.dkim_key(key.key_file, key.algorithm) if checks.dkim_key else None
        if why is not None:
            file_errors.append(f"dkim.keys[{i}].key_file: {why}")
    rep = cfg.reputation
    if rep.store and not is_dsn(rep.store) and not Path(rep.store).is_absolute():
        rep.store = str(base / rep.store)
    if rep.postmaster.key_file and not Path(rep.postmaster.key_file).is_absolute():
        rep.postmaster.key_file = str(base / rep.postmaster.key_file)
    for attr in ("path", "pseudonymisation_key", "seal_key"):
        value = getattr(cfg.audit, attr)
        if value and not Path(value).is_absolute() and not is_dsn(value):
            setattr(cfg.audit, attr, str(base / value))
    if checks.files:
        file_errors += [e for e in checks.files(cfg) if e not in file_errors]
    errors += file_errors if check_files else []
    if errors:
        raise ConfigError(str(path), errors)
    return _with_defaults(cfg)
