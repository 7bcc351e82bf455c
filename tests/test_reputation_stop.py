"""Stopping the reputation service never waits on the event loop for its store: an import's
write (run in a thread) may hold the store's lock when the node stops, so ``stop`` closes the
store in a thread too (issue 21, item 7)."""

from __future__ import annotations

import asyncio
import threading

from postlane.feedback.complaints import ComplaintRates
from postlane.monitor.loopwatch import LoopWatch
from postlane.reputation.service import ReputationService
from postlane.startup import parse_config
from tests.conftest import config_text
from tests.test_loop import BLOCKED


async def test_stop_waits_for_a_write_in_progress_off_the_loop(tmp_path) -> None:
    service = ReputationService(parse_config(config_text(tmp_path, 2525)),
                                ComplaintRates(0.003, 1000))
    await service.start()
    store = service.store
    assert store is not None
    held, done = threading.Event(), threading.Event()

    def importing() -> None:  # an import's transaction under way in its thread
        with store._lock:
            held.set()
            done.wait(10)

    writer = threading.Thread(target=importing)
    writer.start()
    held.wait(10)
    asyncio.get_running_loop().call_later(0.5, done.set)  # it ends - if the loop runs on
    watch = LoopWatch()
    watch.start()
    try:
        with watch.track() as stalls:
            await asyncio.wait_for(service.stop(), 10)
            await asyncio.sleep(0.1)
    finally:
        watch.stop()
    writer.join()
    assert stalls.max_blocked < BLOCKED, stalls
