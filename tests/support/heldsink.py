"""A sink that holds each DATA reply until the test releases it.

A test that needs a message "still on the wire" while it does something else (queues more
mail, signals a drain) held it with ``Sink(delay=...)``: a window its own steps had to fit in,
which a loaded machine's slower steps overran. Held until released, the message is on the wire
for exactly as long as the test needs.
"""

from __future__ import annotations

import asyncio

from aiosmtpd.smtp import SMTP, Envelope, Session

from postlane.harness.sink import Sink
from tests.support.waiting import until


class HeldSink(Sink):
    """Replies to DATA only once ``release`` is set; ``held`` counts the DATA phases that
    reached it."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.release = asyncio.Event()
        self.held = 0

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        self.held += 1
        await self.release.wait()
        return await super().handle_DATA(server, session, envelope)

    async def on_the_wire(self, count: int = 1) -> None:
        """Wait until ``count`` messages are held at DATA."""
        await until(lambda: self.held >= count, what=f"{count} message(s) on the wire, held")
