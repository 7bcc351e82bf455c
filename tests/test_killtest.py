"""The crash-safety harness, small: SIGKILL the node 3 times during a 300-message campaign, and
on PostgreSQL kill two nodes, restarted, then one of them for good. Nothing acknowledged is
lost, and every message has its evidence in the audit store and the accounting files."""

from __future__ import annotations

import asyncio

from postlane.harness.killtest import run
from tests.support.pg import PG_DSN


async def test_nothing_acknowledged_is_lost_across_sigkills(tmp_path):
    result = await asyncio.to_thread(run, tmp_path, messages=300, kills=3, seed=7)
    assert result.kills == 3
    assert result.acknowledged == 300
    assert result.lost == 0
    assert result.delivered == 300
    assert result.evidence_ok, result.problems


async def test_a_cluster_node_killed_for_good_loses_neither_mail_nor_evidence(tmp_path,
                                                                              pg_schema):
    # pg_schema: skips with the reason when PostgreSQL is away (the harness makes its own)
    result = await asyncio.to_thread(run, tmp_path, messages=200, kills=1, seed=11,
                                     spool=PG_DSN)
    assert result.kills == 1 and result.acknowledged == 200
    assert result.lost == 0 and result.delivered == 200
    assert result.evidence_ok, result.problems


async def test_cluster_nodes_killed_and_restarted_then_one_for_good(tmp_path, pg_schema):
    """Two nodes on one schema, SIGKILLed at random and restarted three times (each comes back
    to the claims it held or finds them taken over), then one for good: nothing acknowledged
    is lost and the trail of every message is complete."""
    result = await asyncio.to_thread(run, tmp_path, messages=300, kills=4, seed=17,
                                     spool=PG_DSN)
    assert result.kills == 4 and result.acknowledged == 300
    assert result.lost == 0 and result.delivered == 300
    assert result.evidence_ok, result.problems


async def test_a_cluster_node_with_intake_workers_killed_for_good(tmp_path, pg_schema):
    """Two nodes on one schema, each with ``workers = 2``: mail taken by any worker of either
    node is delivered once the victim's main process is SIGKILLed; its workers die with it
    (its port is released), the survivor takes over what it had claimed, the trail verifies."""
    result = await asyncio.to_thread(run, tmp_path, messages=200, kills=1, seed=13,
                                     spool=PG_DSN, workers="2")
    assert result.kills == 1 and result.acknowledged == 200
    assert result.outlived == 0, "an intake worker outlived its main process"
    assert result.lost == 0 and result.delivered == 200
    assert result.evidence_ok, result.problems


async def test_a_foreign_server_on_the_nodes_port_acknowledges_nothing():
    """The node's port is free when the harness picks it, but another program may take it
    before the node binds it (or while the node restarts after a kill): a sink that answers
    250 to anything there must not count as the node's acknowledgement (seed 405 once counted
    221 messages another test's sink took as "acknowledged and lost")."""
    import threading

    from postlane.harness.killtest import _submit, _takes_mail
    from postlane.harness.sink import Sink

    foreign = await Sink().start()
    try:
        assert not await asyncio.to_thread(_takes_mail, foreign.port, "killtest-0123abcd.local")
        acked: set[int] = set()
        stop = threading.Event()
        threading.Timer(1.0, stop.set).start()
        await asyncio.to_thread(_submit, [foreign.port], [0, 1], acked, threading.Lock(), stop,
                                "killtest-0123abcd.local")
        assert acked == set()
        assert foreign.arrivals == []
    finally:
        await foreign.stop()


async def test_a_sink_port_taken_by_another_program_stops_the_run(tmp_path, monkeypatch):
    """The sink's port taken meanwhile: the run stops saying so, rather than have the node
    deliver to whatever listens there and report the mail lost."""
    import socket

    import pytest

    from postlane.harness import killtest

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        monkeypatch.setattr(killtest, "_free_port", lambda: taken.getsockname()[1])
        with pytest.raises(RuntimeError, match="sink could not listen"):
            await asyncio.to_thread(killtest.run, tmp_path, messages=2, kills=0, seed=5)
