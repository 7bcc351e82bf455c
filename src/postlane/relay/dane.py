"""DANE for SMTP (RFC 7672, with RFC 7671): the TLSA records of an MX host, and whether the
chain a server presented matches them.

DANE-EE (usage 3) pins the server's own certificate or public key: no name or date checks apply
(RFC 7672 3.1.1). DANE-TA (usage 2) names a trust anchor: the chain must lead from the server's
certificate to it, valid today and for one of the reference identifiers - the MX host name
and, when its TLSA records were found at the end of a secure CNAME chain, that name too (RFC
7672 3.1.2, 3.2.2); that path check is ``cryptography``'s X.509 verifier with the anchor as its
only root. PKIX-TA/PKIX-EE (0, 1)
are not for SMTP and are unusable (RFC 7672 3.1.3).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from cryptography import x509
from cryptography.x509 import verification

__all__ = ["TLSA", "match", "parse", "subject_public_key_info", "tlsa_name"]

DANE_TA, DANE_EE = 2, 3
_DIGEST_SIZE = {1: 32, 2: 64}  # RFC 6698 2.1.3: SHA-256, SHA-512


@dataclass(frozen=True, slots=True)
class TLSA:
    usage: int
    selector: int
    mtype: int
    data: bytes

    def __str__(self) -> str:
        return f"{self.usage} {self.selector} {self.mtype} {self.data.hex()}"

    @property
    def usable(self) -> bool:
        """RFC 7672 2.2: a record of a usage, selector or matching type not for SMTP or not
        known, or malformed (a digest not of its matching type's length), is unusable."""
        size = _DIGEST_SIZE.get(self.mtype)
        return self.usage in (DANE_TA, DANE_EE) and self.selector in (0, 1) and \
            self.mtype in (0, 1, 2) and bool(self.data) and size in (None, len(self.data))


def tlsa_name(host: str, port: int) -> str:
    return f"_{port}._tcp.{host}"


def parse(rdatas: list[bytes]) -> list[TLSA]:
    """TLSA rdata as on the wire (``MXResolver.raw_records``) -> TLSA records, a malformed
    one included, as unusable (one too short for its three fields: 255 for each missing)."""
    heads = [r[:3] + b"\xff" * (3 - len(r[:3])) for r in rdatas]
    return [TLSA(h[0], h[1], h[2], r[3:]) for h, r in zip(heads, rdatas, strict=True)]


def _tlv(der: bytes, pos: int) -> tuple[int, int]:
    """(start of the value, end) of the DER element at ``pos`` (raises ValueError)."""
    if pos + 2 > len(der):
        raise ValueError("truncated DER")
    length, pos = der[pos + 1], pos + 2
    if length & 0x80:
        size = length & 0x7F
        if not 0 < size <= 4 or pos + size > len(der):
            raise ValueError("bad DER length")
        length, pos = int.from_bytes(der[pos:pos + size], "big"), pos + size
    if pos + length > len(der):
        raise ValueError("truncated DER")
    return pos, pos + length


def subject_public_key_info(der: bytes) -> bytes:
    """The SubjectPublicKeyInfo of a certificate, its bytes as the certificate carries them
    (RFC 6698 2.1.1's selector 1): read from the DER, not rebuilt from a parsed key, which
    ``cryptography`` re-encodes (an RSA-PSS key as rsaEncryption) or refuses (a certificate
    that OpenSSL took, an algorithm it does not know)."""
    tbs, _ = _tlv(der, _tlv(der, 0)[0])  # Certificate -> tbsCertificate
    pos = tbs
    if der[pos] == 0xA0:  # [0] version
        pos = _tlv(der, pos)[1]
    for _ in range(5):  # serialNumber, signature, issuer, validity, subject
        pos = _tlv(der, pos)[1]
    if der[pos] != 0x30:
        raise ValueError("no SubjectPublicKeyInfo")
    return der[pos:_tlv(der, pos)[1]]


def _associated(der: bytes, selector: int, mtype: int) -> bytes | None:
    """The certificate association data of one certificate (RFC 6698 2.1); None for bytes
    that are not a certificate."""
    data = der
    if selector == 1:
        try:
            data = subject_public_key_info(der)
        except (ValueError, IndexError):
            return None
    if mtype == 1:
        return hashlib.sha256(data).digest()
    if mtype == 2:
        return hashlib.sha512(data).digest()
    return data


def _path_to(anchor: x509.Certificate, chain: list[bytes], names: tuple[str, ...]) -> bool:
    """Whether ``chain`` leads to ``anchor`` and its first certificate is valid for one of
    ``names``."""
    store = verification.Store([anchor])
    try:  # a certificate ``cryptography`` cannot parse is a chain that does not verify
        certs = [x509.load_der_x509_certificate(der) for der in chain]
    except ValueError:
        return False
    for name in names:
        try:
            verifier = (verification.PolicyBuilder().store(store)
                        .build_server_verifier(verification.DNSName(name)))
            verifier.verify(certs[0], certs[1:])
        except (verification.VerificationError, ValueError):
            continue
        return True
    return False


def match(records: list[TLSA], chain: list[bytes], names: tuple[str, ...]) -> str | None:
    """"dane-ee" or "dane-ta" when the server's chain (DER, its own certificate first) matches
    a usable record, else None. ``names``: the reference identifiers a DANE-TA chain's
    certificate may be for (RFC 7672 3.2.2: the MX host name and its secure CNAME
    expansion)."""
    if not chain:
        return None
    usable = [r for r in records if r.usable]
    for r in usable:
        if r.usage == DANE_EE and _associated(chain[0], r.selector, r.mtype) == r.data:
            return "dane-ee"
    for r in usable:
        if r.usage != DANE_TA:
            continue
        anchors = [der for der in chain[1:] if _associated(der, r.selector, r.mtype) == r.data]
        if r.selector == 0 and r.mtype == 0:  # the full anchor is in DNS; the server may omit it
            anchors.append(r.data)
        for der in anchors:
            try:
                anchor = x509.load_der_x509_certificate(der)
            except ValueError:
                continue
            if _path_to(anchor, chain, names):
                return "dane-ta"
    return None
