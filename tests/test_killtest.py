"""The crash-safety harness, small: SIGKILL the node 3 times during a 300-message campaign."""

from __future__ import annotations

import asyncio

from postlane.killtest import run


async def test_nothing_acknowledged_is_lost_across_sigkills(tmp_path):
    result = await asyncio.to_thread(run, tmp_path, messages=300, kills=3, seed=7)
    assert result.kills == 3
    assert result.acknowledged == 300
    assert result.lost == 0
    assert result.delivered == 300
