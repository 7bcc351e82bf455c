"""Deep lanes stay in the spool: each lane keeps a bounded head in memory and reads the rest in
pages, in its own order (class priority, deadline, then queue id and index), as the head drains.

Why: a recipient in memory costs about 1.3 KB (its message, its recipient, their heap entries),
so a million queued behind a paused pool took 1.4 GB; in the spool it costs nothing but disk.
The SQLite spool keeps each queued recipient's lane and order key beside it (index
``recipients_lane``), so a page is one index range read (``SQLiteSpool.page``), off the loop.

The rules that keep it exact:

- A lane pages once its head holds ``WINDOW`` recipients: its ``cursor`` is then the last of
  them in the lane's order; a *new* recipient (from intake) after the cursor stays in the spool
  only (``Lane.spooled`` counts it), one before it joins the head (an urgent class is never
  kept waiting behind the spool), and so does one that comes while the lane reads a page (it
  may be committed after the read). Recipients already in memory (retries, releases) stay.
- A page starts by waiting for the spool's writer to commit what was submitted before (so every
  outcome decided in memory is on disk), skips what is in memory (``known``) or became final
  while it read (``_gone``), and moves the cursor to its last row. A short page with nothing
  spilled meanwhile means the whole lane is in memory again (``cursor`` None).
- A message's ``remaining`` count stays right: a message with a recipient in memory is kept in
  ``messages`` until its last recipient is final, and a message read from the spool otherwise
  gets the spool's count of its recipients not yet final.

The PostgreSQL spool needs none of this: a cluster node claims a bounded share of the shared
queue (``claim.py``). ``scheduler = "fifo"`` (the bench's baseline) keeps everything in memory.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, TypeVar

from ..spool import Attempt, Message, Recipient, State
from .lanes import Lane

if TYPE_CHECKING:
    from ..spool.sqlite import Resumed, SQLiteSpool
    from .scheduler import Scheduler

log = logging.getLogger("postlane.scheduler")

WINDOW = 1000
"""Ready recipients a lane keeps in memory before the rest stays in the spool."""
LOW = WINDOW // 4
"""A lane reads its next page when its head drops below this."""
START = (-(2 ** 62), -1e308, "", -1)
"""A cursor before every recipient: the lane's first page starts at its beginning."""

T = TypeVar("T")


class Pager:
    """Moves the ready recipients of deep lanes between the spool and their heads."""

    def __init__(self, scheduler: Scheduler, spool: SQLiteSpool) -> None:
        self.scheduler = scheduler
        self.spool = spool
        self.known: dict[tuple[str, int], Recipient] = {}
        """Every recipient in memory (heads, retry timers, held, in flight), by (queue id,
        index): a page never brings one in twice."""
        self.messages: dict[str, Message] = {}
        """Messages with a recipient in memory and recipients not yet final."""
        self._reads = 0
        self._gone: set[tuple[str, int]] = set()
        """Recipients that became final while a read was under way (its rows may predate it)."""
        self.journaled: dict = {}
        """Attempts journaled before a restart, for recipients still in the spool."""
        self.pages = 0
        self._tasks: set[asyncio.Task] = set()

    # -- the scheduler's hooks ------------------------------------------------------------------

    def keep(self, rcpt: Recipient) -> None:
        """A recipient is (or stays) in memory (its journaled attempt, if any, is its own now:
        ``open_attempt``)."""
        key = (rcpt.msg.id, rcpt.idx)
        self.known[key] = rcpt
        if self.journaled:
            self.journaled.pop(key, None)
        if rcpt.msg.id not in self.messages:
            self.messages[rcpt.msg.id] = rcpt.msg

    def gone(self, rcpt: Recipient) -> None:
        """A recipient in memory became final (or left this node)."""
        key = (rcpt.msg.id, rcpt.idx)
        self.known.pop(key, None)
        if self._reads:
            self._gone.add(key)
        if rcpt.msg.remaining <= 0:
            self.messages.pop(rcpt.msg.id, None)

    def spill(self, lane: Lane, rcpt: Recipient, prio: int, deadline: float) -> bool:
        """Whether a new recipient stays in the spool only (its lane's head is full and it
        comes after the head in the lane's order)."""
        if lane.cursor is None:
            if len(lane.heap) < WINDOW:
                return False
            last = max(lane.heap, key=lambda e: (e[0], e[1], e[3].msg.id, e[3].idx))
            lane.cursor = (last[0], last[1], last[3].msg.id, last[3].idx)
        if lane.paging or (prio, deadline, rcpt.msg.id, rcpt.idx) <= lane.cursor:
            return False  # during a read it may be committed after the read's snapshot
        lane.spooled += 1
        lane.spills += 1
        self.low(lane)
        return True

    def low(self, lane: Lane) -> None:
        """A lane's head drained a little: read its next page if it has one and is low."""
        if lane.cursor is not None and not lane.paging and len(lane.heap) < LOW:
            self._spawn(self._page(lane))

    def close(self) -> None:
        """The node stops: page reads under way are abandoned (the spool keeps the rows)."""
        for task in self._tasks:
            task.cancel()

    # -- reads ----------------------------------------------------------------------------------

    def _spawn(self, work: Awaitable[None]) -> None:
        task: asyncio.Task[None] = asyncio.get_running_loop().create_task(
            work)  # type: ignore[arg-type]
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def read(self, fetch: Callable[..., Awaitable[T]], *args: object) -> T:
        """Run a read of spool rows that the caller will match against memory: what was
        decided in memory before is committed first, and what becomes final while it reads
        is remembered (``_gone``) until the caller has used the rows (``done_reading``)."""
        self._reads += 1
        try:
            await self.spool.flush()
            return await fetch(*args)
        except BaseException:
            self.done_reading()
            raise

    def done_reading(self) -> None:
        self._reads -= 1
        if not self._reads:
            self._gone.clear()

    async def _page(self, lane: Lane) -> None:
        lane.paging = True
        try:
            sched = self.scheduler
            while lane.cursor is not None and len(lane.heap) < LOW and not sched.stopping():
                want = WINDOW - len(lane.heap)
                spills = lane.spills
                rows = await self.read(self.spool.page, lane.pool, lane.domain, lane.cursor,
                                       want)
                try:
                    self.pages += 1
                    pushed = 0
                    for rcpt in self.recipients(rows, skip_known=True):
                        if rcpt.open_attempt is not None:
                            self.scheduler.outcome_unknown(rcpt)
                        rcpt.state = State.QUEUED
                        prio, deadline = rcpt.msg.priority, rcpt.msg.deadline
                        lane.push(rcpt, prio, deadline)
                        sched.index(rcpt)
                        self.keep(rcpt)
                        pushed += 1
                    lane.spooled = max(0, lane.spooled - pushed)
                    if rows:
                        last = rows[-1]
                        lane.cursor = (last[7], last[5], last[0], last[16])
                    if len(rows) < want and lane.spills == spills:
                        lane.cursor, lane.spooled = None, 0  # the whole lane is here again
                finally:
                    self.done_reading()
                if pushed:
                    self.scheduler.wake(lane)
                if not rows:
                    break
        except Exception:  # a failed read: the lane keeps its head, the next drain retries
            log.exception("reading a page of lane %s/%s failed", lane.pool, lane.domain)
        finally:
            lane.paging = False

    def recipients(self, rows: list[tuple], skip_known: bool) -> list[Recipient]:
        """Objects for ``SQLiteSpool.ROW`` rows, sharing the message objects in memory;
        ``skip_known``: leave out recipients in memory or just final."""
        out = []
        made: dict[str, Message] = {}
        for row in rows:
            key = (row[0], row[16])
            if skip_known and (key in self.known or key in self._gone
                               or key in self.scheduler.unwritten):
                continue
            msg = self.messages.get(row[0]) or made.get(row[0])
            if msg is None:
                msg = Message(id=row[0], cls=row[1], pool=row[2], mail_from=row[3],
                              queued_at=row[4], deadline=row[5], expire_at=row[6],
                              priority=row[7], size=row[8], envid=row[9] or "", ret=row[10] or "",
                              correlation_id=row[11] or "", message_id=row[12] or "",
                              listener=row[13] or "", auth_user=row[14] or "",
                              client=row[15] or "", remaining=row[25],
                              smtputf8=bool(row[26]))
                made[msg.id] = msg
            state = State(row[21])
            out.append(Recipient(
                msg=msg, idx=row[16], address=row[17], domain=row[18], orcpt=row[19] or "",
                notify=row[20] or "", state=State.QUEUED if state is State.INFLIGHT else state,
                attempts=row[22], next_attempt=row[23], last_reply=row[24] or "",
                open_attempt=self._unsettled(key, row[22]), counted=True,
                pending=row[27]))
        return out

    def _unsettled(self, key: tuple[str, int], attempts: int) -> Attempt | None:
        """The journaled attempt a row's recipient never got an outcome for; kept until the
        recipient comes into memory (``keep``): an operator's look at the queue reads rows too."""
        last = self.journaled.get(key) if self.journaled else None
        return last[1] if last is not None and last[0] > attempts else None

    # -- start and the operator's views -------------------------------------------------------

    def resume(self, resumed: Resumed) -> int:
        """Load a restart's spool: deferred and held recipients into memory, queued ones counted
        in their lanes (read in as the lanes drain). Returns the recipients not yet final."""
        sched = self.scheduler
        self.journaled = resumed.journaled
        total = 0
        for pool, domain, _second, n, earliest in resumed.lanes:
            lane = sched.lane(pool, domain)
            lane.spooled += n
            lane.cursor = START
            lane.ages.enter(earliest, n)
            total += n
        loaded = self.recipients(resumed.rows, skip_known=False)
        for rcpt in loaded:
            rcpt.counted = False  # counted now, by the scheduler
            sched.add(rcpt)
        for lane in list(sched.lanes.values()):
            if lane.spooled:
                self.low(lane)
        return total + len(loaded)

    async def spooled(self, where: str = "", params: tuple = ()) -> list[Recipient]:
        """Queued recipients that are only in the spool (matching ``where`` on ``r`` and
        ``m``), as objects not yet in memory. Call ``done_reading`` once they are used."""
        rows = await self.read(self.spool.scan,
                               f"r.state = 'queued'{f' AND ({where})' if where else ''}", params)
        return self.recipients(rows, skip_known=True)

    def take_in(self, rcpts: list[Recipient]) -> None:
        """Spooled recipients an operator acts on come into memory (their lanes count them
        no longer as spooled)."""
        for rcpt in rcpts:
            if rcpt.open_attempt is not None:  # its "u" first, as when a page reads it in
                self.scheduler.outcome_unknown(rcpt)
            lane = self.scheduler.lane(rcpt.msg.pool, rcpt.domain)
            lane.spooled = max(0, lane.spooled - 1)
            self.keep(rcpt)
