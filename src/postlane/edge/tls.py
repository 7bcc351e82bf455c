"""The listeners' TLS certificates: the configured files, or a self-signed one made at first
start (like the API token: a file, key mode 0600, logged by path), reloaded when the files change.

A listening socket and every aiosmtpd session are given one fixed ``SSLContext``; its SNI
callback (OpenSSL calls it for every handshake, with or without SNI) hands each new handshake the
context of the certificate loaded last, so a renewed certificate is served without a restart
and sessions already open keep theirs.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import fcntl
import hashlib
import ipaddress
import logging
import os
import ssl
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from ..config import Config
from ..secretfile import create_secret, private_dir, private_open
from ..spool import local_dir

log = logging.getLogger("postlane.tls")

# Forward secrecy and AEAD only (TLS 1.2); TLS 1.3 suites are all of that kind already.
CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:DHE+AESGCM:DHE+CHACHA20:!aNULL"


def server_context(cert: str, key: str) -> ssl.SSLContext:
    """TLS 1.2+ server context with modern suites (clients are not asked for certificates)."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(CIPHERS)
    ctx.options |= ssl.OP_CIPHER_SERVER_PREFERENCE | ssl.OP_NO_RENEGOTIATION
    ctx.load_cert_chain(cert, key)
    return ctx


def describe_certificate(der: bytes) -> dict:
    """What an operator checks on a certificate: names, issuer, validity, fingerprint."""
    cert = x509.load_der_x509_certificate(der)
    try:
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        sans = [str(n.value) for n in names]
    except x509.ExtensionNotFound:
        sans = []
    now = datetime.datetime.now(datetime.UTC)
    return {"subject": cert.subject.rfc4514_string(), "issuer": cert.issuer.rfc4514_string(),
            "names": sans, "not_before": cert.not_valid_before_utc.isoformat(),
            "not_after": cert.not_valid_after_utc.isoformat(),
            "days_left": (cert.not_valid_after_utc - now).days,
            "self_signed": cert.issuer == cert.subject,
            "sha256": hashlib.sha256(der).hexdigest()}


def _stamp(*paths: str) -> tuple:
    out = []
    for path in paths:
        try:
            st = os.stat(path)
        except OSError:
            return ()
        out.append((st.st_mtime_ns, st.st_size, st.st_ino))
    return tuple(out)


@dataclass
class ServerCertificate:
    """One certificate/key pair served by one or more listeners."""

    cert_file: str
    key_file: str
    generated: bool = False

    def __post_init__(self) -> None:
        self._stamp = _stamp(self.cert_file, self.key_file)  # before: a change is seen later
        self._current, self._der = _load_pair(self.cert_file, self.key_file)
        mode = os.stat(self.key_file).st_mode & 0o777
        if mode & 0o007:  # told, not refused: a web server beside it may share the key
            log.warning("TLS private key %s is readable by every user of the machine (mode"
                        " %04o): chmod 640 (group of the node's user) or 600", self.key_file,
                        mode, extra={"key": self.key_file})
        self.context = server_context(self.cert_file, self.key_file)
        self.context.sni_callback = self._select
        self.loaded_at = datetime.datetime.now(datetime.UTC)

    def _select(self, sslobj: ssl.SSLObject, name: str | None, ctx: ssl.SSLContext) -> None:
        sslobj.context = self._current

    def reload_if_changed(self) -> bool:
        """Load the files again if they changed; a pair that does not load (half-written, key
        not matching) is logged and the previous one stays in use."""
        stamp = _stamp(self.cert_file, self.key_file)
        if not stamp or stamp == self._stamp:
            return False
        try:
            context, der = _load_pair(self.cert_file, self.key_file)
        except (OSError, ssl.SSLError, ValueError) as exc:
            log.error("TLS certificate not reloaded, keeping the previous one: %s", exc,
                      extra={"cert": self.cert_file, "key": self.key_file})
            return False
        self._current, self._der, self._stamp = context, der, stamp
        self.loaded_at = datetime.datetime.now(datetime.UTC)
        log.info("TLS certificate reloaded", extra={"cert": self.cert_file})
        return True

    def describe(self) -> dict:
        """The certificate served (the pair loaded last), not the file as it is now: a file
        that did not load (half-written, its key not matching) is not what clients get."""
        return {"cert_file": self.cert_file, "key_file": self.key_file,
                "generated": self.generated, "loaded_at": self.loaded_at.isoformat(),
                **describe_certificate(self._der)}


def _load_pair(cert: str, key: str) -> tuple[ssl.SSLContext, bytes]:
    """The server context of a pair and the DER of the certificate it serves (the first of
    the chain file), read from the same bytes: a file replaced while it was being loaded raises
    ValueError, and the pair is loaded again at the next check."""
    before = Path(cert).read_bytes()
    context = server_context(cert, key)
    if Path(cert).read_bytes() != before:
        raise ValueError(f"{cert} changed while it was being loaded")
    der = x509.load_pem_x509_certificate(before).public_bytes(serialization.Encoding.DER)
    return context, der


def generated_pair(config: Config) -> tuple[str, str]:
    """The self-signed pair in ``<spool>/tls/``, made now if missing (key written 0600).
    Nodes of a cluster may share the state folder and start at once: a lock on the folder
    makes one of them make the pair, and the others use it (else one could delete the
    other's half-made pair, or pair its key with the other's certificate)."""
    folder = local_dir(config) / "tls"
    cert, key = folder / "cert.pem", folder / "key.pem"
    if cert.is_file() and key.is_file():
        return str(cert), str(key)
    private_dir(folder)
    with private_open(folder / ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if cert.is_file() and key.is_file():  # made by another node meanwhile
            return str(cert), str(key)
        for stray in (cert, key):  # a half-made pair (a crash in between) is made again
            with contextlib.suppress(FileNotFoundError):
                stray.unlink()
        cert_pem, key_pem = selfsigned(config.node.hostname, days=3650)
        create_secret(key, key_pem)
        create_secret(cert, cert_pem)
    log.warning("no TLS certificate configured: made a self-signed one (set tls.cert_file and"
                " tls.key_file for a real one)", extra={"cert": str(cert), "key": str(key)})
    return str(cert), str(key)


class Certificates:
    """Every certificate the node's listeners serve, by (cert, key) path."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.by_files: dict[tuple[str, str], ServerCertificate] = {}

    def for_listener(self, name: str) -> ServerCertificate | None:
        lst = self.config.listeners[name]
        if lst.tls == "none":
            return None
        cert, key, generated = lst.tls_cert, lst.tls_key, False
        if cert is None or key is None:
            cert, key = self.config.tls.cert_file, self.config.tls.key_file
        if cert is None or key is None:
            cert, key = generated_pair(self.config)
            generated = True
        entry = self.by_files.get((cert, key))
        if entry is None:
            entry = self.by_files[(cert, key)] = ServerCertificate(cert, key, generated)
        return entry

    async def watch(self) -> None:
        """Reload changed files every ``tls.reload_interval`` until cancelled."""
        while True:
            await asyncio.sleep(self.config.tls.reload_interval)
            for entry in self.by_files.values():
                entry.reload_if_changed()


def selfsigned(hostname: str, days: int = 365) -> tuple[bytes, bytes]:
    """(certificate PEM, private key PEM) of a fresh P-256 self-signed certificate."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    now = datetime.datetime.now(datetime.UTC)
    alt: list[x509.GeneralName] = [x509.DNSName(hostname)]
    with contextlib.suppress(ValueError):
        alt.append(x509.IPAddress(ipaddress.ip_address(hostname)))
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.SubjectAlternativeName(alt), critical=False)
            .sign(key, hashes.SHA256()))
    return (cert.public_bytes(serialization.Encoding.PEM),
            key.private_bytes(serialization.Encoding.PEM,
                              serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption()))
