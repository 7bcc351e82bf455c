"""The suppression list's writes while another process holds its write lock (a ``postlane
suppress import``): the CLI gives up after its patience, the node's writer thread waits and
writes everything in order, and a stop writes what is queued."""

from __future__ import annotations

import sqlite3

import pytest

from postlane.feedback.suppression import SuppressionBusy, SuppressionList
from postlane.feedback.suppression_writer import SuppressionWriter
from tests.support.waiting import until


def _hold(path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("BEGIN IMMEDIATE")
    return conn


def test_a_cli_write_gives_up_after_its_patience(tmp_path) -> None:
    store = SuppressionList(tmp_path / "s.sqlite3", patience=0.2)
    other = _hold(store.path)
    try:
        with pytest.raises(SuppressionBusy, match="locked by another process"):
            store.add("a@example.com", "all")
        assert store.check(["a@example.com"]) == {}  # a read does not wait for the lock
    finally:
        other.execute("ROLLBACK")
        other.close()
    store.add("a@example.com", "all")
    assert "a@example.com" in store.check(["a@example.com"])
    store.close()


async def test_the_writer_waits_for_the_lock_and_keeps_the_order(tmp_path) -> None:
    store = SuppressionList(tmp_path / "s.sqlite3")
    writes = SuppressionWriter(store)
    other = _hold(store.path)
    try:
        writes.submit(store.add, "b@example.com", "marketing", "first")
        writes.submit(store.add, "b@example.com", "marketing", "second")
        writes.submit(store.bounced, "c@example.com", 1000.0, 3600.0, "550 5.1.1")
        # waiting in its thread, not failing: for 0.3 s of real time (several of its retries)
        await until(lambda: writes.waiting >= 0.3, what="the writer waiting 0.3 s for the lock")
    finally:
        other.execute("COMMIT")
        other.close()
    await writes.flush()
    assert store.check(["b@example.com"])["b@example.com"].reason == "second"  # in order
    assert await writes.call(store.bounced, "c@example.com", 1001.0, 3600.0, "again") == 2
    with pytest.raises(Exception, match="not an email address"):  # bad input: told, not retried
        await writes.call(store.add, "nobody", "all")
    writes.submit(store.add, "d@example.com", "all")
    writes.close()  # writes what is queued first
    assert "d@example.com" in store.check(["d@example.com"])
    store.close()


async def test_a_write_the_database_refuses_is_not_tried_for_ever(tmp_path) -> None:
    """A constraint failure (a NaN time stored as NULL in a NOT NULL column) was tried again
    like a disk error, for ever: its caller never had an answer and every write after it (a
    hard bounce, an unsubscribe) waited behind it. No retry can cure it: it is the caller's."""
    from postlane.feedback.suppression import Entry, adding

    store = SuppressionList(tmp_path / "s.sqlite3")
    writes = SuppressionWriter(store)
    try:
        bad = Entry("a@example.com", "all", "", "test", float("nan"), 0.0)
        with pytest.raises(sqlite3.IntegrityError):
            await writes.call(store.write, adding([bad]))
        store_entry = await writes.call(store.add, "b@example.com", "all")
        assert store_entry.address == "b@example.com"
        assert store.check(["a@example.com", "b@example.com"]).keys() == {"b@example.com"}
    finally:
        writes.close()
        store.close()
