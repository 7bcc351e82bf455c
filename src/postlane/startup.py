"""Startup validation: reading a config with the checks that need other parts - addresses parsed
the way the edge parses them, the SMTP users file, the DKIM keys. ``config/`` is data and
validation of data and imports none of them; every way to start, reload or check a node reads
its config through here (``load_config``, ``parse_config``)."""

from __future__ import annotations

import os
import ssl
from collections.abc import Callable
from pathlib import Path

from .address import PathError, parse_path
from .config import Config, ConfigError
from .config.load import PartChecks, file_problem, parse_config_text, read_config_file
from .config.locations import is_dsn
from .policy.dkim import DKIMError, read_key
from .policy.users import UsersError, load_users

__all__ = ["CHECKS", "ConfigError", "load_config", "parse_config"]


def _mailbox(addr: str) -> bool:
    try:
        return parse_path(f"<{addr}>", utf8=True)[1] == ""
    except PathError:
        return False


def _users_file(path: str, cfg: Config) -> list[str]:
    """The users file loads, and names only classes that exist."""
    try:
        users = load_users(path)
    except UsersError as exc:
        return [f"security.users_file: {e}" for e in exc.errors]
    errors = []
    for uname, user in users.items():
        for cls in [*user.classes, *([user.default_class] if user.default_class else [])]:
            if cls not in cfg.classes:
                errors.append(f"security.users_file: user {uname!r}: no class named {cls!r}")
    return errors


def _dkim_key(path: str, algorithm: str) -> str | None:
    try:
        read_key(path, algorithm)
    except DKIMError as exc:
        return str(exc)
    return None


def _other_key(cert: str, key: str) -> bool:
    """Whether both files load and the key is not the certificate's: OpenSSL says so as
    NO_CERTIFICATE_ASSIGNED for RSA, which reads like a format problem."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    try:
        with open(cert, "rb") as fh:
            public = x509.load_pem_x509_certificate(fh.read()).public_key()
        with open(key, "rb") as fh:
            private = serialization.load_pem_private_key(fh.read(), password=None)
    except (OSError, ValueError, TypeError):
        return False
    spki = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return public.public_bytes(*spki) != private.public_key().public_bytes(*spki)


def _tls_pair(field: str, cert: str, key: str) -> str | None:
    from .edge.tls import server_context

    try:
        for path in (cert, key):
            with open(path, "rb"):
                pass
        server_context(cert, key)
    except ssl.SSLError as exc:
        if _other_key(cert, key):
            return f"{field}: the key {key} is not the key of the certificate {cert}"
        return (f"{field}: {cert} and {key} are not a PEM certificate and its private key"
                f" ({exc.reason or exc})")
    except OSError as exc:
        return f"{field}: cannot read {exc.filename}: {exc.strerror}"
    return None


def _loads(field: str, path: str, load: Callable[[str], object]) -> str | None:
    try:
        load(path)
    except OSError as exc:
        return f"{field}: cannot read {path}: {exc.strerror}" if exc.strerror else \
            f"{field}: {exc}"
    except (ValueError, TypeError) as exc:
        return f"{field}: {exc}"
    return None


def _folder(field: str, path: str) -> str | None:
    """A folder the node creates at start: it is one, or can be made."""
    wanted = Path(path)
    try:
        for found in (wanted, *wanted.parents):
            if found.exists():
                if not found.is_dir():
                    return f"{field}: {found} is not a directory"
                if not os.access(found, os.W_OK | os.X_OK):
                    return f"{field}: {found} is not writable"
                return None
    except OSError as exc:  # a folder on the way this user may not enter
        return f"{field}: cannot look at {exc.filename or path}: {exc.strerror or exc}"
    return None


_STORES = ("spool.sqlite", "audit.sqlite", "suppression.sqlite3", "reputation.sqlite3")


def _user(uid: int) -> str:
    import pwd

    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


def _stores(field: str, folder: Path) -> list[str]:
    """The databases in the state folder are this user's to write: a restore or an upgrade
    run as root leaves them root's, and SQLite then says only `unable to open database
    file`."""
    out: list[str] = []
    for name in _STORES:
        for path in (folder / name, folder / f"{name}-wal", folder / f"{name}-shm"):
            try:
                if not path.exists() or os.access(path, os.R_OK | os.W_OK):
                    continue
                owner = _user(path.stat().st_uid)
            except OSError:  # a folder this user cannot enter: _folder says so
                return out
            out.append(f"{field}: {path} is not readable and writable by this user"
                       f" ({_user(os.geteuid())}; it belongs to {owner}): chown the state"
                       f" folder's files to the node's user")
            break
    return out


def _file(field: str, path: str) -> str | None:
    """A file the node opens at start: not a folder; one still to be made, in a folder that
    can be written (one that exists may sit in a read-only /etc, as under systemd)."""
    try:
        if Path(path).is_dir():
            return f"{field}: {path} is a directory"
        exists = Path(path).exists()
    except OSError as exc:  # a folder on the way this user may not enter
        return f"{field}: cannot look at {path}: {exc.strerror or exc}"
    return None if exists else _folder(field, str(Path(path).parent))


def _files(cfg: Config) -> list[str]:
    """What ``serve`` opens at start beyond the DKIM keys and the users file."""
    from .audit.seal import load_private
    from .audit.service import load_key, retention_policies
    from .feedback.categories import RulesError, load_classifier

    pairs = [("tls.cert_file/key_file", cfg.tls.cert_file, cfg.tls.key_file)]
    pairs += [(f"listeners.{name}.tls_cert/tls_key", lst.tls_cert, lst.tls_key)
              for name, lst in cfg.listeners.items() if lst.tls != "none"]
    errors = [_tls_pair(field, cert, key) for field, cert, key in pairs
              if cert and key and not file_problem(cert) and not file_problem(key)]
    if cfg.feedback.bounce_rules:
        try:
            load_classifier(cfg.feedback.bounce_rules)
        except RulesError as exc:
            errors.append(f"feedback.bounce_rules: {exc}")
    if cfg.audit.seal_key:
        errors.append(_loads("audit.seal_key", cfg.audit.seal_key, load_private))
    if cfg.audit.pseudonymisation_key and retention_policies(cfg):  # only then does it load
        errors.append(_loads("audit.pseudonymisation_key", cfg.audit.pseudonymisation_key,
                             load_key))
    if not is_dsn(cfg.node.spool):
        errors.append(_folder("node.spool", cfg.node.spool))
        errors += _stores("node.spool", Path(cfg.node.spool))
    errors.append(_folder("accounting.directory", cfg.accounting.directory))
    files = {"reputation.store": cfg.reputation.store,
             "feedback.suppression_db": cfg.feedback.suppression_db,
             "feedback.key_file": cfg.feedback.key_file}
    if cfg.api.enabled:
        files |= {"api.token_file": cfg.api.token_file, "api.tokens_file": cfg.api.tokens_file}
    if cfg.audit.enabled:
        files["audit.path"] = cfg.audit.path
    errors += [_file(field, path) for field, path in files.items() if path and not is_dsn(path)]
    return [e for e in errors if e is not None]


CHECKS = PartChecks(mailbox=_mailbox, users_file=_users_file, dkim_key=_dkim_key, files=_files)
"""The checks of a config that need the edge and policy parts."""


def parse_config(text: str, source: str = "<config>") -> Config:
    """Parse TOML text into a Config, raising ConfigError with every problem found."""
    return parse_config_text(text, source, CHECKS)


def load_config(path: str | Path, *, check_files: bool = True) -> Config:
    """Read a config file; relative paths inside it are taken relative to the file's folder.
    ``check_files=False`` resolves the paths without opening the keys and certificates they
    name (``postlane restore`` learns from it where to put them)."""
    return read_config_file(path, CHECKS, check_files=check_files)
