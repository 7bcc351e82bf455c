"""A test certificate authority (``cryptography``): a root, intermediates, and server
certificates for given names, valid, expired or for the wrong name, written to PEM files."""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import ssl
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

_NOW = datetime.datetime.now(datetime.UTC)


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


class TestCA:
    """A CA (the root, or an intermediate when ``parent`` is given) issuing server
    certificates into ``folder``."""

    __test__ = False  # not a pytest class

    def __init__(self, folder: Path, name: str = "Postlane Test Root",
                 parent: TestCA | None = None) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.parent = parent
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        issuer = parent.cert.subject if parent else subject
        signer = parent.key if parent else self.key
        builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer)
                   .public_key(self.key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(_NOW - datetime.timedelta(days=1))
                   .not_valid_after(_NOW + datetime.timedelta(days=365))
                   .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                   .add_extension(x509.KeyUsage(False, False, False, False, False, True, True,
                                                False, False), critical=True)
                   .add_extension(x509.SubjectKeyIdentifier.from_public_key(
                       self.key.public_key()), critical=False))
        if parent is not None:
            builder = builder.add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(parent.key.public_key()),
                critical=False)
        self.cert = builder.sign(signer, hashes.SHA256())
        self.ca_file = folder / f"{name.replace(' ', '-')}.pem"
        self.ca_file.write_bytes(_pem(self.cert))

    @property
    def der(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.DER)

    def intermediate(self, name: str = "Postlane Test Intermediate") -> TestCA:
        return TestCA(self.folder, name, parent=self)

    def issue(self, names: list[str], *, expired: bool = False,
              file_name: str | None = None) -> tuple[Path, Path]:
        """(cert chain file, key file) of a server certificate for ``names`` (DNS names or
        IPs), signed by this CA; the chain file holds the intermediates up to the root."""
        key = ec.generate_private_key(ec.SECP256R1())
        alt: list[x509.GeneralName] = []
        for n in names:
            try:
                alt.append(x509.IPAddress(ipaddress.ip_address(n)))
            except ValueError:
                alt.append(x509.DNSName(n))
        start = _NOW - datetime.timedelta(days=30 if expired else 1)
        end = _NOW - datetime.timedelta(days=1) if expired else _NOW + datetime.timedelta(days=90)
        cert = (x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
                .issuer_name(self.cert.subject).public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(start).not_valid_after(end)
                .add_extension(x509.SubjectAlternativeName(alt), critical=False)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(x509.KeyUsage(True, False, False, False, False, False, False,
                                             False, False), critical=True)
                .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                               critical=False)
                .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                    self.key.public_key()), critical=False)
                .sign(self.key, hashes.SHA256()))
        stem = file_name or names[0].replace("*", "_")
        cert_path, key_path = self.folder / f"{stem}.crt", self.folder / f"{stem}.key"
        chain = _pem(cert)
        ca = self
        while ca.parent is not None:  # the server sends its intermediates
            chain += _pem(ca.cert)
            ca = ca.parent
        cert_path.write_bytes(chain)
        key_path.write_bytes(_key_pem(key))
        return cert_path, key_path

    def server_context(self, names: list[str], *, expired: bool = False) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(*self.issue(names, expired=expired))
        return ctx


def leaf_der(cert_file: Path) -> bytes:
    """The DER of the first certificate in a PEM chain file (``ssl.PEM_cert_to_DER_cert``
    reads one certificate only: given a chain, it decoded the END and BEGIN lines too)."""
    first = x509.load_pem_x509_certificates(cert_file.read_bytes())[0]
    return first.public_bytes(serialization.Encoding.DER)


def tlsa_sha256(der: bytes, selector: int) -> str:
    """The hex association data of ``x selector 1`` (SHA-256) for a certificate."""
    if selector == 1:
        der = x509.load_der_x509_certificate(der).public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).hexdigest()


def _der_length(n: int) -> bytes:
    if n < 128:
        return bytes([n])
    raw = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(raw)]) + raw


def explicit_version_one(folder: Path, name: str) -> tuple[Path, Path, bytes]:
    """(cert file, key file, SubjectPublicKeyInfo DER) of a self-signed certificate whose
    version field spells out its default (v1 = 0, which DER leaves out): OpenSSL serves it,
    ``cryptography`` refuses to parse it. A stand-in for any certificate a peer's TLS stack
    accepts and ours is stricter about."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(_NOW - datetime.timedelta(days=1))
            .not_valid_after(_NOW + datetime.timedelta(days=90))
            .sign(key, hashes.SHA256()))
    tbs = bytearray(cert.tbs_certificate_bytes)
    at = tbs.index(b"\xa0\x03\x02\x01\x02")  # [0] EXPLICIT INTEGER 2 (v3) ...
    tbs[at + 4] = 0  # ... as v1, encoded although it is the default
    signature = key.sign(bytes(tbs), ec.ECDSA(hashes.SHA256()))
    body = (bytes(tbs) + bytes.fromhex("300a06082a8648ce3d040302")  # ecdsa-with-SHA256
            + b"\x03" + _der_length(len(signature) + 1) + b"\x00" + signature)
    der = b"\x30" + _der_length(len(body)) + body
    folder.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = folder / f"{name}.crt", folder / f"{name}.key"
    cert_path.write_text(ssl.DER_cert_to_PEM_cert(der))
    key_path.write_bytes(_key_pem(key))
    spki = key.public_key().public_bytes(serialization.Encoding.DER,
                                         serialization.PublicFormat.SubjectPublicKeyInfo)
    return cert_path, key_path, spki
