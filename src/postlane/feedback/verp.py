"""VERP envelope senders: one return path per message and recipient, so that a bounce names the
recipient it is about with certainty, whatever the remote MTA writes (or fails to write) in it.

``b.<queue id>.<recipient index>.<mac>.<local>=<domain>@<bounce domain>``: stateless (no table
to keep for the life of the bounce window) and signed, so that forged bounces cannot suppress
addresses. The recipient is spelled in the address, as classic VERP does; local parts may then
exceed RFC 5321's 64 octets, which receiving MTAs accept in practice.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from dataclasses import dataclass

__all__ = ["VERP", "VerpAddress"]

_MAC_LEN = 10
_LOCAL = re.compile(r"^b\.([0-9A-Fa-f]{8,40})\.(\d{1,6})\.([0-9a-f]{" + str(_MAC_LEN) +
                    r"})\.(.+)=([^=@]+)$")


@dataclass(frozen=True, slots=True)
class VerpAddress:
    queue_id: str
    index: int
    recipient: str


class VERP:
    def __init__(self, key: bytes) -> None:
        self._key = key

    def _mac(self, queue_id: str, index: int, recipient: str) -> str:
        text = f"{queue_id.upper()}.{index}.{recipient.lower()}".encode()
        return hmac.new(self._key, text, hashlib.sha256).hexdigest()[:_MAC_LEN]

    def encode(self, queue_id: str, index: int, recipient: str, bounce_domain: str) -> str:
        local, _, domain = recipient.rpartition("@")
        mac = self._mac(queue_id, index, recipient)
        return f"b.{queue_id}.{index}.{mac}.{local}={domain}@{bounce_domain}"

    def decode(self, address: str) -> VerpAddress | None:
        """The message and recipient a VERP address stands for; None if it is not one of ours
        (or its signature does not match)."""
        local = address.strip("<>").rpartition("@")[0]
        found = _LOCAL.match(local)
        if not found:
            return None
        qid, index, mac, rlocal, rdomain = found.groups()
        recipient = f"{rlocal}@{rdomain}"
        if not hmac.compare_digest(mac.lower(), self._mac(qid, int(index), recipient)):
            return None
        return VerpAddress(qid.upper(), int(index), recipient)
