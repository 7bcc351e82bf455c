"""Seals: each day's head signed with an Ed25519 key kept apart from the store, optionally
time-stamped by an RFC 3161 authority, so that history cannot be rewritten by someone who can
write the store.

The hash chain alone proves integrity only against edits that do not recompute every later hash;
whoever can write the store can rewrite it whole. A seal is a signature over a day's head - the
day, the seq and hash of its last record, how many records it holds - made with a private key the
store never sees. Rewriting any sealed record changes that hash, and the seal no longer matches;
forging a new seal needs the key. A time-stamp token from an independent authority (TSA) over the
seal proves it existed at that time, so even the key's holder cannot back-date a new history.
Anyone can check with the public key alone (``audit verify --public-key``), also on an export.
"""

from __future__ import annotations

import hashlib
import json
import stat
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from ..secretfile import create_secret

__all__ = ["Seal", "check_seals", "generate_key", "key_id", "load_private", "load_public",
           "payload", "seal_days", "timestamp", "verify_timestamp"]

FORMAT = "postlane-seal/1"


@dataclass(slots=True)
class Seal:
    day: str
    last_seq: int
    records: int
    head: bytes
    sealed_at: float
    key_id: str
    signature: bytes
    tsa: bytes | None = None
    """The RFC 3161 TimeStampResp (DER) over ``payload + signature``, if a TSA is configured."""

    def as_dict(self) -> dict:
        return {"day": self.day, "last_seq": self.last_seq, "records": self.records,
                "head": self.head.hex(), "sealed_at": self.sealed_at, "key_id": self.key_id,
                "signature": self.signature.hex(),
                "tsa": self.tsa.hex() if self.tsa is not None else None}

    @classmethod
    def from_dict(cls, d: Mapping) -> Seal:
        return cls(d["day"], d["last_seq"], d["records"], bytes.fromhex(d["head"]),
                   d["sealed_at"], d["key_id"], bytes.fromhex(d["signature"]),
                   bytes.fromhex(d["tsa"]) if d.get("tsa") else None)


def payload(day: str, last_seq: int, records: int, head: bytes) -> bytes:
    """What a seal signs: a fixed text form another implementation can rebuild."""
    return json.dumps([FORMAT, day, last_seq, records, head.hex()],
                      separators=(",", ":")).encode()


def key_id(public: Ed25519PublicKey) -> str:
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def generate_key(path: Path) -> Path:
    """A new private key at ``path`` (PEM, 0600) and its public key at ``path.pub``; returns
    the public key's path. Refuses to overwrite a key."""
    if path.exists():
        raise FileExistsError(f"{path} exists: a seal key is never overwritten")
    key = Ed25519PrivateKey.generate()
    create_secret(path, key.private_bytes(serialization.Encoding.PEM,
                                          serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    public = path.with_name(path.name + ".pub")
    public.write_bytes(key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return public


def load_private(path: str | Path) -> Ed25519PrivateKey:
    """The seal key; refused if others can read it."""
    mode = stat.S_IMODE(Path(path).stat().st_mode)
    if mode & 0o077:
        raise PermissionError(f"{path}: the seal key must not be readable by group or others"
                              " (chmod 600)")
    key = serialization.load_pem_private_key(Path(path).read_bytes(), None)
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"{path}: not an Ed25519 private key")
    return key


def load_public(path: str | Path) -> Ed25519PublicKey:
    key = serialization.load_pem_public_key(Path(path).read_bytes())
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError(f"{path}: not an Ed25519 public key")
    return key


def timestamp(url: str, data: bytes, timeout: float) -> bytes:
    """An RFC 3161 time-stamp of ``data`` from the TSA at ``url`` (the TimeStampResp DER)."""
    import httpx
    from rfc3161_client import HashAlgorithm, TimestampRequestBuilder, decode_timestamp_response

    request = (TimestampRequestBuilder().data(data).hash_algorithm(HashAlgorithm.SHA256)
               .nonce(nonce=True).cert_request(cert_request=True).build())
    reply = httpx.post(url, content=request.as_bytes(), timeout=timeout,
                       headers={"Content-Type": "application/timestamp-query"})
    reply.raise_for_status()
    response = decode_timestamp_response(reply.content)
    if int(response.status) not in (0, 1):  # granted, granted with modifications
        raise ValueError(f"the TSA refused: status {int(response.status)}")
    return reply.content


def verify_timestamp(token: bytes, data: bytes, roots: Iterable) -> str:
    """Check a time-stamp token over ``data`` against the TSA's root certificates; returns
    the time it states (raises ``ValueError``)."""
    from rfc3161_client import VerificationError, VerifierBuilder, decode_timestamp_response

    response = decode_timestamp_response(token)
    builder = VerifierBuilder()
    for root in roots:
        builder = builder.add_root_certificate(root)
    try:
        builder.build().verify_message(response, data)
    except VerificationError as exc:
        raise ValueError(str(exc)) from None
    return response.tst_info.gen_time.isoformat()


def seal_days(store, key: Ed25519PrivateKey, now: float, *, open_day: bool = False,
              tsa_url: str | None = None, tsa_timeout: float = 10.0) -> list[Seal]:
    """Seal every day that has closed (UTC) and has no seal of its last record yet; with
    ``open_day`` also today's records so far (a checkpoint: later records extend the day, and
    the seal still covers what it covered). Returns the new seals."""
    today = time.strftime("%Y-%m-%d", time.gmtime(now))
    done = {(s.day, s.last_seq) for s in store.seals()}
    kid = key_id(key.public_key())
    made = []
    for day in store.days():
        if (day["day"] >= today and not open_day) or (day["day"], day["last_seq"]) in done:
            continue
        head = bytes(day["head"])
        body = payload(day["day"], day["last_seq"], day["records"], head)
        signature = key.sign(body)
        token = timestamp(tsa_url, body + signature, tsa_timeout) if tsa_url else None
        seal = Seal(day["day"], day["last_seq"], day["records"], head, time.time(), kid,
                    signature, token)
        store.add_seal(seal)
        made.append(seal)
    return made


def check_seals(seals: list[Seal], days: list[dict], row_at, public: Ed25519PublicKey,
                tsa_roots: list | None = None, today: str | None = None) -> list[str]:
    """Problems with the seals: a signature that does not verify (forged), a sealed head the
    chain no longer has (rewritten after sealing), a closed day without a seal, a time-stamp
    that does not verify. ``row_at(seq)`` gives (hash, day, records of that day up to seq) of
    the stored record, or None."""
    problems = []
    kid = key_id(public)
    sealed = {s.day for s in seals}
    for seal in seals:
        body = payload(seal.day, seal.last_seq, seal.records, seal.head)
        try:
            if seal.key_id != kid:
                raise InvalidSignature
            public.verify(seal.signature, body)
        except InvalidSignature:
            problems.append(f"seal of {seal.day} (seq {seal.last_seq}): the signature does not"
                            f" verify with public key {kid} (forged, or another key's)")
            continue
        row = row_at(seal.last_seq)
        if row is None or bytes(row[0]) != seal.head or row[1] != seal.day or \
                row[2] != seal.records:
            problems.append(f"seal of {seal.day} (seq {seal.last_seq}): the chain does not"
                            " have the sealed head: records up to it were rewritten or removed"
                            " after sealing")
        if seal.tsa is not None and tsa_roots is not None:
            try:
                verify_timestamp(seal.tsa, body + seal.signature, tsa_roots)
            except ValueError as exc:
                problems.append(f"seal of {seal.day}: the time-stamp does not verify: {exc}")
    for day in days:
        if day["day"] not in sealed and (today is None or day["day"] < today):
            problems.append(f"day {day['day']} (seq {day['first_seq']}..{day['last_seq']}) has"
                            " no seal")
    return problems
