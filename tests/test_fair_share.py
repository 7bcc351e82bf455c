"""Connection slots move between a campaign's lanes: a lane that found its pool's slots taken
gets one at once from a lane holding two connections more than it, and otherwise after
``FAIR_SHARE`` messages (on the scheduler's clock, no sockets)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from postlane.scheduler.lanes import Lane, SourceSlot
from postlane.scheduler.scheduler import FAIR_SHARE, Scheduler
from postlane.startup import parse_config
from tests.conftest import config_text
from tests.test_scheduler_unit import FakeClock, NoRelay, NoSpool, _rcpt


class Holding(Scheduler):
    """The real dispatcher; each worker takes one batch and holds its connection until the test
    ends."""

    def __init__(self, *args: object, **kw: object) -> None:
        super().__init__(*args, **kw)  # type: ignore[arg-type]
        self.release = asyncio.Event()

    async def serve(self, lane: Lane, slot: SourceSlot) -> None:
        if self.next_batch(lane):
            await self.release.wait()


async def _campaign(tmp_path: Path, busy: int) -> tuple[Holding, Lane, Lane]:
    """Lane a holds ``busy`` connections of the pool's three; lane b, more urgent, has none."""
    clock = FakeClock()
    cfg = parse_config(config_text(tmp_path, 2525, marketing_max_out=3))
    sched = Holding(cfg, NoSpool(), lambda rec: None, relay=NoRelay(), clock=clock)
    for i in range(busy):
        sched.add(_rcpt(clock, "a.test", deadline=clock.now + 100 + i, mid=f"a{i}"))
    await asyncio.sleep(0)  # the dispatch opens a's connections
    for i in range(3 - busy):  # the pool's other slots go to a third, more urgent lane
        sched.add(_rcpt(clock, "c.test", deadline=clock.now + 50, mid=f"c{i}"))
    await asyncio.sleep(0)
    for i in range(busy, 10):
        sched.add(_rcpt(clock, "a.test", deadline=clock.now + 100 + i, mid=f"a{i}"))
    await asyncio.sleep(0)
    sched.add(_rcpt(clock, "b.test", deadline=clock.now + 10, mid="b"))
    await asyncio.sleep(0)  # no slot left: b waits
    a, b = sched.lane("bulk", "a.test"), sched.lane("bulk", "b.test")
    assert a.workers == busy and b.workers == 0 and sched._waiting["bulk"] == b.top()
    return sched, a, b


async def test_a_lane_two_connections_richer_gives_one_up_at_once(tmp_path: Path) -> None:
    sched, a, b = await _campaign(tmp_path, busy=3)
    assert sched.next_batch(a, sent=1) == []  # this connection goes to b
    assert sched.next_batch(a, sent=1)  # one per waiting lane: the others keep serving a
    await _end(sched)


async def test_a_lane_with_one_connection_keeps_it_for_its_fair_share(tmp_path: Path) -> None:
    sched, a, b = await _campaign(tmp_path, busy=1)
    assert sched.next_batch(a, sent=1)  # one connection against none: not worth a reconnect
    assert sched.next_batch(a, sent=FAIR_SHARE) == []  # then it makes room
    await _end(sched)


async def _end(sched: Holding) -> None:
    sched.release.set()
    while sched._tasks:  # the held workers end and give their slots back
        await asyncio.sleep(0)
