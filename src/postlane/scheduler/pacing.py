"""Per-IP spacing and backoff: how fast a destination lets one source IP send, and when its
replies ask the lane to slow down."""

from __future__ import annotations

from ..config.model import DestinationRule
from .lanes import Lane, SourceSlot


def send_delay(lane: Lane, slot: SourceSlot, now: float) -> float:
    """Seconds the next transaction on ``slot`` must wait under the destination's per-IP rate
    (booking its turn: the following one waits one interval more)."""
    rate = lane.rate_per_ip(now)
    if not rate:
        return 0.0
    at = max(now, lane.next_send.get(slot.address, 0.0))
    lane.next_send[slot.address] = at + 1.0 / rate
    return at - now


def wants_backoff(rule: DestinationRule | None, reply: str) -> bool:
    """Whether a deferral ``reply`` matches one of the rule's ``backoff_on`` fragments."""
    if rule is None or not rule.backoff_on:
        return False
    text = reply.lower()
    return any(text.startswith(p) or (len(p) > 3 and p.lower() in text)
               for p in rule.backoff_on)
