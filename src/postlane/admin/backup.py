"""``postlane backup`` and ``postlane restore``: a consistent copy of a running node.

What must survive a lost machine is more than the queue: the audit store is the regulator's
evidence, the suppression list is what keeps a complaint from being mailed again, the feedback
key signs the VERP addresses that bounces come back to, and the DKIM keys are published in DNS.
A backup holds:

- the node's state folder (``node.spool`` for SQLite, else ``state/`` beside the accounting
  folder): every SQLite database in it (spool, audit store, suppression list, reputation
  store, and whatever a later release keeps there) through SQLite's online backup API, which
  copies one consistent snapshot while the node goes on writing; every other file (feedback
  key, generated certificates …) as it is;
- the accounting files, each cut to the size its position file names, with that position
  file: the copy holds exactly the events the position says it does;
- every file the config names: DKIM keys, TLS certificates and keys, the API token, users,
  the pseudonymisation and seal keys, the Postmaster Tools key, bounce rules; and the config.

Order matters: the audit store and the accounting files are copied first and the spool after
them (so is an audit store, suppression list or reputation store the config keeps outside the
state folder: a list copied after the spool could hold an operator's change whose record,
settled meanwhile, the spool copy lacks), while the backup holds the spool's events
(``spool/hold.py``: the node trims none meanwhile). Each consumer keeps its position (the
audit store its last event per spool writer, the files their position file), and the spool
copy holds every event after those positions, so a restored node's recorder writes on from
there: the restored evidence is complete, and each event reaches it once. Mail accepted after
the spool copy was taken is not in the backup; the records of it are not either.

On a PostgreSQL spool the shared database is the cluster's to back up (``pg_dump``); the
command copies the node's own files and says what to run.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import socket
import sqlite3
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

from ..config import Config
from ..secretfile import private_dir
from ..spool import is_dsn, local_dir
from ..spool.hold import HOLD, holding
from ..startup import load_config

__all__ = ["BackupError", "backup", "restore"]

MANIFEST = "manifest.json"
FORMAT = 1
_SQLITE_MAGIC = b"SQLite format 3\x00"
_SIDE_FILES = ("-wal", "-shm", "-journal")
POSITION_SUFFIX = ".position.json"


class BackupError(Exception):
    """A backup or restore that cannot be done (the message says why; nothing was changed in
    a restore's target)."""


@dataclass(frozen=True)
class Named:
    role: str
    """The config field that names the file (the key restore uses to find its new place)."""
    path: Path


STORES = ("audit.path", "feedback.suppression_db", "reputation.store")
"""Roles of the databases a config may keep outside the state folder: copied before the
spool, like those in it."""


def named_files(cfg: Config) -> list[Named]:
    """The files the config names that are not in the state folder, one per path."""
    fields: list[tuple[str, str | None]] = [
        ("api.token_file", cfg.api.token_file),
        ("api.tokens_file", cfg.api.named_tokens_file()),
        ("security.users_file", cfg.security.users_file),
        ("feedback.key_file", cfg.feedback.key_file),
        ("feedback.suppression_db", cfg.feedback.suppression_db),
        ("feedback.bounce_rules", cfg.feedback.bounce_rules),
        ("audit.path", cfg.audit.path),
        ("audit.pseudonymisation_key", cfg.audit.pseudonymisation_key),
        ("audit.seal_key", cfg.audit.seal_key),
        ("reputation.store", cfg.reputation.store),
        ("reputation.postmaster.key_file", cfg.reputation.postmaster.key_file)]
    fields += [("tls.cert_file", cfg.tls.cert_file), ("tls.key_file", cfg.tls.key_file)]
    for name, lc in cfg.listeners.items():
        fields += [(f"listeners.{name}.tls_cert", lc.tls_cert),
                   (f"listeners.{name}.tls_key", lc.tls_key)]
    fields += [(f"dkim.keys[{i}].key_file", k.key_file) for i, k in enumerate(cfg.dkim.keys)]
    state = local_dir(cfg).resolve()
    out: dict[Path, Named] = {}
    for role, value in fields:
        if not value or is_dsn(str(value)):
            continue
        path = Path(value).resolve()
        if not path.is_relative_to(state):
            out.setdefault(path, Named(role, path))
    return list(out.values())


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _is_sqlite(path: Path) -> bool:
    with open(path, "rb") as fh:
        return fh.read(16) == _SQLITE_MAGIC


def _copy_sqlite(source: Path, target: Path) -> None:
    """One consistent snapshot through the online backup API (readers and the node's writer
    go on meanwhile), checked, as a self-contained file (no -wal beside it)."""
    os.close(_new_file(target))  # 0600 before SQLite creates it with the umask's mode
    src = sqlite3.connect(source, timeout=30)
    dst = sqlite3.connect(target)
    try:
        src.backup(dst)
        dst.execute("PRAGMA journal_mode=DELETE")
        result = dst.execute("PRAGMA quick_check").fetchone()[0]
    finally:
        src.close()
        dst.close()
    if result != "ok":
        raise BackupError(f"{source}: the copy fails SQLite's check: {result}")


def _new_file(path: Path, mode: int = 0o600) -> int:
    private_dir(path.parent)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    os.fchmod(fd, mode)
    return fd


def _copy_file(source: Path, target: Path, limit: int | None = None, mode: int = 0o600,
               made: list[Path] | None = None) -> None:
    """``made`` gets ``target`` as soon as it exists (a restore takes it back if it fails)."""
    fd = _new_file(target, mode)
    if made is not None:
        made.append(target)
    with open(source, "rb") as src, os.fdopen(fd, "wb") as dst:
        if limit is None:
            shutil.copyfileobj(src, dst, 1 << 20)
        else:
            dst.write(src.read(limit))
        dst.flush()
        os.fsync(dst.fileno())


def _state_files(folder: Path) -> Iterator[Path]:
    for path in sorted(folder.rglob("*")):
        if path.is_file() and not path.name.endswith(_SIDE_FILES):
            yield path


def _copy_accounting(cfg: Config, add: Callable[..., None]) -> None:
    """The accounting files, each cut to what its position file names, with that file."""
    acct = Path(cfg.accounting.directory)
    if acct.is_dir():
        limits, positions, files = _accounting(acct)
        for path in positions:
            add("position", f"accounting:{path.name}", path, f"accounting/{path.name}",
                mode=0o640)
        for path in files:
            add("file", f"accounting:{path.name}", path, f"accounting/{path.name}",
                limits.get(path.name), 0o640)


def _accounting(folder: Path) -> tuple[dict[str, int], list[Path], list[Path]]:
    """(the size each position file names per file, the position files, the other files),
    read in that order: a file rotated meanwhile is complete, a file created meanwhile is after
    the position and left out."""
    positions = sorted(folder.glob(f"*{POSITION_SUFFIX}"))
    limits: dict[str, int] = {}
    for pos in positions:
        for name, size in json.loads(pos.read_bytes()).get("files", {}).values():
            limits[Path(name).name] = size
    files = [p for p in sorted(folder.iterdir()) if p.is_file() and p not in positions
             and not p.name.endswith(".tmp")]
    return limits, positions, files


def backup(config_path: Path, dest: Path) -> dict:
    """Copy everything of the node at ``config_path`` into ``dest`` (absent or empty); returns
    the manifest."""
    cfg = load_config(config_path)
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise BackupError(f"{dest} exists and is not empty")
    for what, folder in (("state folder", local_dir(cfg)),
                         ("accounting folder", Path(cfg.accounting.directory))):
        # the next backup would copy this one; and it is lost with the machine it is for
        if dest.resolve().is_relative_to(folder.resolve()):
            raise BackupError(f"{dest} is inside the node's {what} {folder}: back up to a"
                              f" folder outside it")
    private_dir(dest)
    items: list[dict] = []

    def add(kind: str, role: str, source: Path, rel: str, limit: int | None = None,
            mode: int = 0o600) -> None:
        target = dest / rel
        try:
            if kind == "sqlite":
                _copy_sqlite(source, target)
            else:
                _copy_file(source, target, limit, mode)
        except FileNotFoundError:
            return  # gone meanwhile (a temporary file, a rotated-away accounting file)
        items.append({"kind": kind, "role": role, "file": rel, "source": str(source),
                      "size": target.stat().st_size, "sha256": _sha256(target)})

    def add_named(named: Named) -> None:
        kind = "sqlite" if _is_sqlite(named.path) else "file"
        add(kind, named.role, named.path, f"files/{named.role}/{named.path.name}")

    state = local_dir(cfg)
    named = [n for n in named_files(cfg) if n.path.is_file()]
    # stores the config keeps outside the state folder go before the spool as well, the audit
    # store first: the same order as in it (module docstring)
    stores = sorted((n for n in named if n.role in STORES), key=lambda n: n.role != "audit.path")
    with contextlib.ExitStack() as hold:
        if state.is_dir():
            hold.enter_context(holding(state))
            for store in stores:
                add_named(store)
            # the audit store, then the accounting files, then the spool (module docstring)
            files = [p for p in _state_files(state) if p.name != HOLD]
            files.sort(key=lambda p: (p.name == "spool.sqlite", p.name != "audit.sqlite", str(p)))
            for path in files:
                if path.name == "spool.sqlite":
                    _copy_accounting(cfg, add)
                rel = path.relative_to(state).as_posix()
                add("sqlite" if _is_sqlite(path) else "file", f"state:{rel}", path,
                    f"state/{rel}")
            if not any(p.name == "spool.sqlite" for p in files):
                _copy_accounting(cfg, add)
        else:
            for store in stores:
                add_named(store)
            _copy_accounting(cfg, add)
    for other in named:
        if other not in stores:
            add_named(other)
    add("file", "config", config_path.resolve(), f"config/{config_path.name}")
    manifest = {"format": FORMAT, "postlane": version("postlane"), "created": time.time(),
                "host": socket.gethostname(), "node": cfg.node.name,
                "config": config_path.name, "items": items}
    if is_dsn(cfg.node.spool):
        manifest["postgresql"] = {"schema": cfg.cluster.schema_name}
    fd = _new_file(dest / MANIFEST)
    with os.fdopen(fd, "w") as fh:
        json.dump(manifest, fh, indent=1)
        fh.flush()
        os.fsync(fh.fileno())
    return manifest


def _manifest(source: Path) -> dict:
    """The backup's manifest, checked to be what ``backup`` writes: a manifest damaged or
    made by hand is refused, never half-followed."""
    try:
        manifest = json.loads((source / MANIFEST).read_text())
    except (OSError, ValueError) as exc:
        raise BackupError(f"{source}: not a Postlane backup ({exc})") from None
    if not isinstance(manifest, dict):
        raise BackupError(f"{source}: {MANIFEST} is damaged (not a JSON object)")
    if manifest.get("format") != FORMAT:
        raise BackupError(f"{source}: backup format {manifest.get('format')} is not {FORMAT}")
    items, config = manifest.get("items"), manifest.get("config")
    if not isinstance(items, list) or not all(
            isinstance(i, dict) and all(isinstance(i.get(k), str)
                                        for k in ("kind", "role", "file", "sha256"))
            for i in items):
        raise BackupError(f"{source}: {MANIFEST} is damaged (its list of files is not what"
                          f" postlane backup writes)")
    if not isinstance(config, str) or Path(config).name != config or config in ("", ".", ".."):
        raise BackupError(f"{source}: {MANIFEST} is damaged (no config file name)")
    if not any(i["role"] == "config" for i in items):
        raise BackupError(f"{source}: {MANIFEST} lists no config: not a whole backup")
    for item in items:  # a role names where restore writes the file: never outside its folder
        kind, _, rel = item["role"].partition(":")
        if kind in ("state", "accounting") and (
                not rel or Path(rel).is_absolute() or ".." in Path(rel).parts
                or (kind == "accounting" and Path(rel).name != rel)):
            raise BackupError(f"{source}: {MANIFEST} is damaged (it names {item['role']!r},"
                              f" outside the {kind} folder)")
    return manifest


def _check_item(source: Path, item: dict) -> None:
    """The file is inside the backup, whole (its SHA-256), and a database SQLite can read."""
    path = source / item["file"]
    rel = Path(item["file"])
    if rel.is_absolute() or ".." in rel.parts:
        raise BackupError(f"{source}: {MANIFEST} is damaged (it names {item['file']!r},"
                          f" outside the backup)")
    try:
        digest = _sha256(path)
    except FileNotFoundError:
        raise BackupError(f"{path}: missing: the backup is incomplete (cut short while it"
                          f" was copied?)") from None
    if digest != item["sha256"]:
        raise BackupError(f"{path}: damaged (its SHA-256 differs from the manifest's)")
    if item["kind"] == "sqlite":
        conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro&immutable=1", uri=True)
        try:
            result = conn.execute("PRAGMA quick_check").fetchone()[0]
        except sqlite3.Error as exc:
            result = str(exc)
        finally:
            conn.close()
        if result != "ok":
            raise BackupError(f"{path}: damaged (SQLite's check: {result})")


def restore(source: Path, directory: Path) -> tuple[Path, list[Path]]:
    """Restore the backup in ``source`` with its config in ``directory`` (absent or empty);
    returns the config's path and the files written. Nothing is overwritten: a target that
    exists stops the restore before anything is written; a write that fails (a folder that
    cannot be made, a full disk) takes back every file the restore wrote."""
    manifest = _manifest(source)
    for item in manifest["items"]:
        _check_item(source, item)
    if directory.exists() and (not directory.is_dir() or any(directory.iterdir())):
        raise BackupError(f"{directory} exists and is not empty")
    made = not directory.exists()
    written: list[Path] = []
    try:
        return _restore(source, manifest, directory, written)
    except BaseException:  # nothing half written: take back what this restore wrote
        for path in reversed(written):
            with contextlib.suppress(OSError):
                path.unlink()
        if made:
            shutil.rmtree(directory, ignore_errors=True)
        raise


def _restore(source: Path, manifest: dict, directory: Path,
             written: list[Path]) -> tuple[Path, list[Path]]:
    """``restore`` once the backup is checked; ``written`` gets each file as it is made."""
    config_item = next(i for i in manifest["items"] if i["role"] == "config")
    config_path = directory / manifest["config"]
    private_dir(directory)
    _copy_file(source / config_item["file"], config_path, mode=0o640, made=written)
    cfg = load_config(config_path, check_files=False)
    state, acct = local_dir(cfg), Path(cfg.accounting.directory)
    named = {n.role: n.path for n in named_files(cfg)}
    plan: list[tuple[dict, Path]] = []
    for item in manifest["items"]:
        role = item["role"]
        if role == "config":
            continue
        if role.startswith("state:"):
            target = state / role.removeprefix("state:")
        elif role.startswith("accounting:"):
            target = acct / role.removeprefix("accounting:")
        elif role in named:
            target = named[role]
        else:
            raise BackupError(f"the restored config does not name {role} any more")
        plan.append((item, target))
    taken = [str(t) for _, t in plan if t.exists()]
    if taken:
        raise BackupError("these files exist already (restore never overwrites): "
                          + ", ".join(taken))
    # missing parents (the state folder on a new machine) 0700, as init makes them
    private_dir(acct.parent)
    acct.mkdir(mode=0o750, exist_ok=True)  # log shippers in the group read it
    for item, target in plan:
        if item["kind"] == "position":  # it names the accounting files where they now are
            data = json.loads((source / item["file"]).read_bytes())
            data["files"] = {fmt: [str(acct / Path(name).name), size]
                             for fmt, (name, size) in data.get("files", {}).items()}
            fd = _new_file(target, 0o640)
            written.append(target)
            with os.fdopen(fd, "w") as fh:
                json.dump(data, fh)
        else:
            mode = 0o640 if item["role"].startswith("accounting:") else 0o600
            _copy_file(source / item["file"], target, mode=mode, made=written)
    return config_path, list(written)
