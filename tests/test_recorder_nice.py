"""The recorder yields the cores to the mail path: it runs nicer than the node."""

from __future__ import annotations

import os

from postlane.audit.recorder import NICE
from tests.conftest import config_text


async def test_the_recorder_runs_nicer_than_the_node(tmp_path, sink, make_node) -> None:
    node = await make_node(config_text(tmp_path, sink.port))
    assert node.recorder.pid is not None
    mine = os.getpriority(os.PRIO_PROCESS, 0)
    assert os.getpriority(os.PRIO_PROCESS, node.recorder.pid) == min(19, mine + NICE)
