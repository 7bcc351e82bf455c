"""Connection slots: each pool owns its source IPs and each IP its ``max_smtp_out``; a lane takes
the least busy IP of its pool within the destination's per-IP connection limit, of a family
(IPv4, IPv6) the destination has addresses of."""

from __future__ import annotations

import itertools

from ..config import Config
from .lanes import Lane, SourceSlot


class Slots:
    def __init__(self, config: Config) -> None:
        self.by_pool: dict[str, list[SourceSlot]] = {
            name: [SourceSlot(name, ip.address, ip.ehlo, ip.max_smtp_out) for ip in pool.ips]
            for name, pool in config.pools.items()
        }
        self._rotation = itertools.count()
        self._versions = {name: frozenset(s.version for s in slots)
                          for name, slots in self.by_pool.items()}

    def usable(self, lane: Lane) -> list[SourceSlot]:
        """The slots of the lane's pool whose family reaches the destination's addresses: an
        IPv4 slot's attempt at an IPv6-only MX is deferred without connecting (451 4.4.4) and
        suspends the lane, and with more IPv4 than IPv6 addresses in the pool the IPv6 one got
        its turn by chance. All of them while the families are not known, or when none fits
        (the attempt then says why)."""
        slots = self.by_pool[lane.pool]
        if not lane.families or self._versions[lane.pool] <= lane.families:
            return slots  # the common case, a pool of one family: nothing to filter
        fit = [s for s in slots if s.version in lane.families]
        return fit or slots

    def lane_cap(self, lane: Lane, now: float) -> int:
        """How many connections the lane may hold at once over its pool's IPs."""
        slots = self.usable(lane)
        per_ip = lane.max_connections_per_ip(now)
        if per_ip is None:
            return sum(s.max_smtp_out for s in slots)
        return sum(min(s.max_smtp_out, per_ip) for s in slots)

    def acquire(self, lane: Lane, now: float) -> SourceSlot | None:
        """The least busy IP of the lane's pool with a free slot, within the destination's
        per-IP connection limit."""
        per_ip = lane.max_connections_per_ip(now)
        key = lane.dest_key
        best: SourceSlot | None = None
        slots = self.usable(lane)
        start = next(self._rotation) % len(slots)  # ties go round the pool's IPs
        for slot in slots[start:] + slots[:start]:
            if slot.free <= 0 or (per_ip is not None and slot.per_dest.get(key, 0) >= per_ip):
                continue
            if best is None or slot.in_use < best.in_use:
                best = slot
        if best is not None:
            best.in_use += 1
            best.per_dest[key] = best.per_dest.get(key, 0) + 1
        return best

    @staticmethod
    def release(lane: Lane, slot: SourceSlot) -> None:
        slot.in_use -= 1
        key = lane.dest_key
        left = slot.per_dest.get(key, 1) - 1
        if left:
            slot.per_dest[key] = left
        else:
            slot.per_dest.pop(key, None)
