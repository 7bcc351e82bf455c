"""VERP envelope senders: one return path per message and recipient, so that a bounce names the
recipient it is about with certainty, whatever the remote MTA writes (or fails to write) in it.

``b.<queue id>.<recipient index>.<mac>.<local>=<domain>@<bounce domain>``: stateless (no table
to keep for the life of the bounce window) and signed, so that forged bounces cannot suppress
addresses. The recipient is spelled in the address, as classic VERP does; local parts may then
exceed RFC 5321's 64 octets, which receiving MTAs accept in practice.

A recipient that is not ASCII (a UTF-8 local part, a U-label domain) is spelled in Punycode
(RFC 3492) instead: ``u.<queue id>.<index>.<mac>.<punycode of local=domain>@<bounce domain>``.
The return path then stays ASCII, so a report about it comes back without SMTPUTF8 (Exim
4.96 sends its DSNs without it, and a U-label recipient can be downgraded to its A-label for a
server without SMTPUTF8, which a UTF-8 return path cannot).
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
_ULOCAL = re.compile(r"^u\.([0-9A-Fa-f]{8,40})\.(\d{1,6})\.([0-9a-f]{" + str(_MAC_LEN) +
                     r"})\.(.+)$")
_DOT_ATOM = re.compile(r"[\w!#$%&'*+/=?^`{|}~-]+(?:\.[\w!#$%&'*+/=?^`{|}~-]+)*")


def _unquote(local: str) -> str:
    """``"john doe"`` -> ``john doe`` (RFC 5321 quoted-string); a dot-atom as it is."""
    if len(local) >= 2 and local[0] == local[-1] == '"':
        return re.sub(r"\\(.)", r"\1", local[1:-1])
    return local


def _quote(local: str) -> str:
    """A local part that is not a dot-atom as a quoted-string: the VERP of a recipient such as
    ``"john doe"@x`` must itself be a valid address (a next hop refuses ``MAIL FROM:<b.…
    "john doe"=x@…>`` with 553 5.1.3, and that reply then counted as the recipient's hard
    bounce)."""
    if _DOT_ATOM.fullmatch(local):
        return local
    return '"' + local.replace("\\", "\\\\").replace('"', '\\"') + '"'


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
        local = _unquote(local)  # a dot-atom is signed as before: addresses in flight stay valid
        mac = self._mac(queue_id, index, f"{local}@{domain}")
        spelled = f"{local}={domain}"
        if not spelled.isascii():
            coded = spelled.encode("punycode").decode("ascii")
            return f"{_quote(f'u.{queue_id}.{index}.{mac}.{coded}')}@{bounce_domain}"
        return f"{_quote(f'b.{queue_id}.{index}.{mac}.{spelled}')}@{bounce_domain}"

    def decode(self, address: str) -> VerpAddress | None:
        """The message and recipient a VERP address stands for; None if it is not one of ours
        (or its signature does not match)."""
        local = _unquote(address.strip("<>").rpartition("@")[0])
        found = _LOCAL.match(local)
        if found:
            qid, index, mac, rlocal, rdomain = found.groups()
        else:
            coded = _ULOCAL.match(local)
            if not coded:
                return None
            qid, index, mac, text = coded.groups()
            try:
                spelled = text.encode("ascii").decode("punycode")
            except (UnicodeError, ValueError):
                return None
            rlocal, _, rdomain = spelled.rpartition("=")
            if not rlocal or not rdomain or "@" in rdomain:
                return None
        recipient = f"{rlocal}@{rdomain}"
        if not hmac.compare_digest(mac.lower(), self._mac(qid, int(index), recipient)):
            return None
        return VerpAddress(qid.upper(), int(index), f"{_quote(rlocal)}@{rdomain}")
