"""The scheduler's decisions on a clock the test sets: lane selection, earliest-deadline order and
retry timers, in milliseconds, with no sockets and no storage (the spool must not be touched)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from postlane.scheduler.lanes import Lane, SourceSlot
from postlane.scheduler.scheduler import Scheduler
from postlane.spool import Message, Recipient, State
from postlane.startup import parse_config
from tests.conftest import config_text


class FakeClock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def time(self) -> float:
        return self.now

    def monotonic(self) -> float:
        return self.now


class NoSpool:
    """These decisions write nothing: any use of the spool fails the test."""

    def __getattr__(self, name: str) -> object:
        raise AssertionError(f"the spool was used: {name}")


class NoRelay:
    """A relay is there (dispatch starts workers), but these workers never call it."""

    def __getattr__(self, name: str) -> object:
        raise AssertionError(f"the relay was used: {name}")


class Served(Scheduler):
    """The real dispatcher; a worker only notes which lane got a connection slot, and keeps it
    (as a connection would) until the test ends: what the test sees is the first dispatch's
    choice, however many turns of the event loop it takes to get there."""

    def __init__(self, *args: object, **kw: object) -> None:
        super().__init__(*args, **kw)  # type: ignore[arg-type]
        self.served: list[str] = []
        self.started = asyncio.Event()
        self._done = asyncio.Event()

    async def serve(self, lane: Lane, slot: SourceSlot) -> None:
        self.served.append(lane.domain)
        self.started.set()
        await self._done.wait()

    async def first_served(self) -> list[str]:
        """The lanes served once a worker has started."""
        await asyncio.wait_for(self.started.wait(), 10)
        return self.served

    async def stop(self) -> None:
        """Let the workers go; the scheduler starts no more."""
        self._done.set()
        await self.drain(10)


def _sched(tmp_path: Path, clock: FakeClock, cls: type[Scheduler] = Scheduler,
           **kw: object) -> Scheduler:
    cfg = parse_config(config_text(tmp_path, 2525, marketing_max_out=1, **kw))
    return cls(cfg, NoSpool(), lambda rec: None, relay=NoRelay(),  # type: ignore[arg-type]
               clock=clock)


def _rcpt(clock: FakeClock, domain: str, *, priority: int = 3, deadline: float = 0.0,
          pool: str = "bulk", mid: str = "m") -> Recipient:
    msg = Message(mid, "marketing", pool, "a@b.test", clock.now, deadline or clock.now + 3600,
                  clock.now + 3600, priority, remaining=1)
    return Recipient(msg, 0, f"x@{domain}", domain)


async def test_a_lane_is_ordered_by_priority_then_deadline(tmp_path: Path) -> None:
    clock = FakeClock()
    sched = _sched(tmp_path, clock)
    late = _rcpt(clock, "d.test", priority=3, deadline=clock.now + 50, mid="late")
    early = _rcpt(clock, "d.test", priority=3, deadline=clock.now + 10, mid="early")
    urgent = _rcpt(clock, "d.test", priority=0, deadline=clock.now + 99, mid="urgent")
    for rcpt in (late, early, urgent):
        sched.add(rcpt)
    lane = sched.lane("bulk", "d.test")
    order = [sched.next_batch(lane)[0].msg.id for _ in range(3)]
    assert order == ["urgent", "early", "late"]
    assert lane.inflight == 3 and sched.next_batch(lane) == []


async def test_the_one_free_slot_goes_to_the_most_urgent_lane(tmp_path: Path) -> None:
    clock = FakeClock()
    sched = _sched(tmp_path, clock, Served)
    assert isinstance(sched, Served)
    sched.add(_rcpt(clock, "later.test", deadline=clock.now + 500, mid="a"))
    sched.add(_rcpt(clock, "sooner.test", deadline=clock.now + 5, mid="b"))
    sched.add(_rcpt(clock, "middle.test", deadline=clock.now + 50, mid="c"))
    # the pool has one IP with max_smtp_out = 1
    assert await sched.first_served() == ["sooner.test"]
    assert sched._waiting["bulk"] == (3, clock.now + 50)  # the next most urgent waits
    await sched.stop()


async def test_a_paused_or_suspended_lane_gets_no_slot(tmp_path: Path) -> None:
    clock = FakeClock()
    sched = _sched(tmp_path, clock, Served)
    assert isinstance(sched, Served)
    sched.apply_paused("bulk", "held.test", True)
    sched.suspend(sched.lane("bulk", "down.test"), 60, "451 try later")
    sched.add(_rcpt(clock, "held.test", deadline=clock.now + 1, mid="a"))
    sched.add(_rcpt(clock, "down.test", deadline=clock.now + 2, mid="b"))
    sched.add(_rcpt(clock, "open.test", deadline=clock.now + 3, mid="c"))
    assert await sched.first_served() == ["open.test"]
    clock.now += 61  # the suspension is over: the lane is ready again on the next kick
    assert not sched.lane("bulk", "down.test").blocked(clock.now)
    await sched.stop()


async def test_a_deferred_recipient_waits_for_its_timer(tmp_path: Path) -> None:
    clock = FakeClock()
    sched = _sched(tmp_path, clock)
    rcpt = _rcpt(clock, "d.test")
    rcpt.next_attempt = clock.now + 30
    sched.add(rcpt)
    lane = sched.lane("bulk", "d.test")
    assert rcpt.state is State.DEFERRED and lane.deferred == 1 and not lane.heap
    assert list(sched.recipients()) == [rcpt]
    sched.timers.fire()  # too early: nothing moves
    assert rcpt.state is State.DEFERRED
    clock.now += 30
    sched.timers.fire()
    assert rcpt.state is State.QUEUED and lane.deferred == 0 and rcpt.next_attempt == 0.0
    assert sched.next_batch(lane) == [rcpt]


async def test_timers_fire_in_retry_order_and_take_removes(tmp_path: Path) -> None:
    clock = FakeClock()
    sched = _sched(tmp_path, clock)
    rcpts = []
    for i, delay in enumerate((30, 10, 20)):
        rcpt = _rcpt(clock, "d.test", mid=f"m{i}")
        rcpt.next_attempt = clock.now + delay
        sched.add(rcpt)
        rcpts.append(rcpt)
    taken = sched.take(lambda r: r.msg.id == "m2")  # the 20 s one
    assert taken == [rcpts[2]] and len(sched.timers) == 2
    assert sched.lane("bulk", "d.test").deferred == 2
    clock.now += 15
    sched.timers.fire()
    assert [r.msg.id for r in rcpts if r.state is State.QUEUED] == ["m1"]
    clock.now += 15
    sched.timers.fire()
    assert [r.msg.id for r in rcpts if r.state is State.QUEUED] == ["m0", "m1"]
    assert len(sched.timers) == 0


async def test_what_the_node_holds_per_class_is_counted_not_walked(tmp_path: Path) -> None:
    """``held_by_class`` (a cluster node's /metrics and SLA view) follows the recipients in
    memory - queued, deferred, in flight - and a recipient added again is not counted twice (a
final outcome: tests/test_queue_view.py)."""
    clock = FakeClock()
    sched = _sched(tmp_path, clock)
    queued = _rcpt(clock, "d.test", mid="q")
    later = _rcpt(clock, "d.test", mid="later")
    later.next_attempt = clock.now + 600  # waits for its retry time
    notice = _rcpt(clock, "e.test", pool="critical", mid="n")
    notice.msg.cls = "policy-documents"
    for rcpt in (queued, later, notice):
        sched.add(rcpt)
    assert later.state is State.DEFERRED
    assert sched.held_by_class() == {"marketing": 2, "policy-documents": 1}
    [taken] = sched.next_batch(sched.lane("bulk", "d.test"))
    assert taken is queued and taken.state is State.INFLIGHT
    assert sched.held_by_class() == {"marketing": 2, "policy-documents": 1}  # in flight: held
    sched.requeue(taken)  # its connection was lost before the transaction: queued again
    assert sched.held_by_class() == {"marketing": 2, "policy-documents": 1}
    assert sum(sched.held_by_class().values()) == len(list(sched.recipients()))  # none in flight
