"""The audit store contract: SQLite and PostgreSQL stores pass the same tests.

What evidence, verification, retention and webhooks rely on: every look-up key finds a
message's whole trail, the chain stays one chain across reopens and with two appenders at once,
cursors are durable, pauses are read from the operators' records. Tampering and retention are
in test_audit_chain.py (also on both stores); a cluster end to end is in test_audit_cluster.py.
"""

from __future__ import annotations

import threading

import psycopg
import pytest

from postlane.accounting.records import Record
from postlane.audit.evidence import trails
from postlane.audit.postgres import MIGRATIONS, PostgresAuditStore
from postlane.audit.store import COLUMNS, Query, Retention, StoreMissing
from tests.support.audit import AuditBackend
from tests.support.pg import PG_DSN

T0 = 1_795_000_000.0  # 2026-11-18 11:06 UTC


def message(n: int, *, at: float = T0, cls: str = "policy", pool: str = "critical",
            rcpts: tuple[str, ...] = ("a@example.com",)) -> list[Record]:
    """The records of message ``n``: per recipient an "r" with every key, a "t", then a "d"."""
    out = []
    for rcpt in rcpts:
        base = dict(orig="s@insurer.test", rcpt=rcpt, queue_id=f"Q{n}", cls=cls, vmta_pool=pool,
                    time_queued=at, correlation_id=f"corr-{n}", message_id=f"<m{n}@test>",
                    env_id=f"env-{n}" if n % 2 == 0 else "", job_id=f"corr-{n}")
        out.append(Record(type="r", time_logged=at, dlv_size=123, listener="in", **base))
        out.append(Record(type="t", time_logged=at + 1, attempt=1, dsn_status="4.2.1",
                          dsn_diag="smtp;450 4.2.1 busy", total_seconds_queued=1.0, **base))
        out.append(Record(type="d", time_logged=at + 2, attempt=2, dsn_status="2.0.0",
                          dsn_diag="smtp;250 ok", dlv_source_ip="127.0.0.20",
                          total_seconds_queued=2.0, **base))
    return out


def fill(backend: AuditBackend, records: list[Record]) -> None:
    store = backend.open()
    try:
        store.append([(r, 120.0 if r.cls == "policy" else None) for r in records])
    finally:
        store.close()


@pytest.fixture
def store(audit_backend):
    fill(audit_backend, message(1, rcpts=("a@example.com", "b@example.com"))
         + message(2, at=T0 + 60, cls="marketing", pool="bulk")
         + message(3, at=T0 + 86_400))
    reader = audit_backend.open(readonly=True)
    yield reader
    reader.close()


def keys(rows: list[dict]) -> set[tuple[str, str]]:
    return {(t.queue_id, t.rcpt) for t in trails(rows)}


def test_every_key_finds_the_whole_trail(store):
    for query in (Query(queue_id="Q1"), Query(message_id="<m1@test>"),
                  Query(correlation_id="corr-1"), Query(cls="policy", until=T0 + 1)):
        rows = store.find(query)
        assert keys(rows) == {("Q1", "a@example.com"), ("Q1", "b@example.com")}, query
        assert [r["type"] for r in rows if r["rcpt"] == "a@example.com"] == ["r", "t", "d"]
        assert [r["seq"] for r in rows] == sorted(r["seq"] for r in rows)  # chain order
    assert keys(store.find(Query(env_id="env-2"))) == {("Q2", "a@example.com")}
    assert store.find(Query(env_id="")) == []  # an empty ENVID is no key
    assert keys(store.find(Query(rcpt="B@Example.COM"))) == {("Q1", "b@example.com")}
    assert keys(store.find(Query(pool="bulk", since=T0, until=T0 + 3600))) == \
        {("Q2", "a@example.com")}
    assert keys(store.find(Query(since=T0 + 3600, until=T0 + 2 * 86_400))) == \
        {("Q3", "a@example.com")}
    assert store.find(Query(correlation_id="nope")) == []
    with pytest.raises(ValueError):
        store.find(Query())
    [d] = [r for r in store.find(Query(queue_id="Q2")) if r["type"] == "d"]
    assert (d["sla"], d["dlv_size"], d["attempt"], d["total_seconds_queued"]) == (
        None, 0, 2, 2.0)
    assert store.find(Query(queue_id="Q1"))[0]["sla"] == 120.0


def test_reading_by_time_and_class(store):
    assert [r["seq"] for r in store.rows_between(None, None)] == list(range(1, 13))
    day2 = list(store.rows_between(T0 + 86_400, None))
    assert {r["queue_id"] for r in day2} == {"Q3"}
    assert {r["queue_id"] for r in store.rows_between(None, None, "marketing")} == {"Q2"}
    assert store.classes() == ["marketing", "policy"]
    assert [(d["day"], d["first_seq"], d["last_seq"], d["records"]) for d in store.days()] == [
        ("2026-11-18", 1, 9, 9), ("2026-11-19", 10, 12, 3)]
    result = store.verify()
    assert result.ok and result.checked == 12
    assert store.verify("2026-11-19").checked == 3


def test_cursor_moves_past_filtered_records_and_survives_reopen(audit_backend, store):
    rows, upto = store.rows_after(0, ["d"], ["policy"], limit=2)
    assert [(r["queue_id"], r["type"]) for r in rows] == [("Q1", "d"), ("Q1", "d")]
    assert upto == rows[-1]["seq"]  # a full batch: more may follow
    rows, upto = store.rows_after(upto, ["d"], ["policy"], limit=10)
    assert [r["queue_id"] for r in rows] == ["Q3"] and upto == 12
    assert store.rows_after(12, [], [], 10) == ([], 12)
    writer = audit_backend.open()
    assert writer.cursor("hook") == 0
    assert writer.hold_cursor("hook")
    writer.set_cursor("hook", 9)
    writer.set_cursor("hook", 12)
    writer.close()
    again = audit_backend.open()
    assert again.cursor("hook") == 12 and again.cursor("other") == 0
    again.close()


def pause_record(action: str, at: float, pool: str, domain: str | None = None) -> Record:
    """An operator's pause or resume as the node writes it (operations.action_record)."""
    return Record(type="o", time_logged=at, time_queued=at, orig="",
                  rcpt=f"*@{domain}" if domain else "", queue_id="", cls="", vmta_pool=pool,
                  dsn_action=action, operator="alice", src_type="api",
                  dsn_diag=f"pool {pool} {action}d by operator alice")


def test_chained_operator_records_explain_pauses(audit_backend):
    """Pauses come from the operators' chained "o" records, and, for a store written before
    those existed, from its unchained operations table."""
    fill(audit_backend, [pause_record("pause", T0, "bulk"),
                         pause_record("pause", T0 + 5, "bulk", "example.com"),
                         pause_record("resume", T0 + 10, "bulk"),
                         pause_record("pause", T0 + 20, "critical")])
    audit_backend.sql(("INSERT INTO audit_operations (time, action, pool, domain)"
                       " VALUES (?, ?, ?, ?)", [T0 - 50, "pause", "bulk", "old.example"]),
                      ("INSERT INTO audit_operations (time, action, pool, domain)"
                       " VALUES (?, ?, ?, ?)", [T0 - 40, "resume", "bulk", "old.example"]))
    store = audit_backend.open(readonly=True)
    try:
        assert store.pauses("bulk", T0 + 100) == [(T0 - 50, T0 - 40, "old.example"),
                                                  (T0, T0 + 10, "*"),
                                                  (T0 + 5, T0 + 100, "example.com")]
        assert store.pauses("critical", T0 + 15) == []
        assert store.classes() == []  # the records of actions on a pool have no class
        assert store.verify().ok
    finally:
        store.close()


def test_chain_continues_across_reopen(audit_backend):
    fill(audit_backend, message(1))
    fill(audit_backend, message(2, at=T0 + 10))
    store = audit_backend.open(readonly=True)
    try:
        result = store.verify()
        assert result.ok and result.checked == 6 and store.days()[0]["records"] == 6
    finally:
        store.close()


def test_events_appended_again_are_stored_once(audit_backend):
    """The recorder's replay after a crash (it cannot know whether its last append committed)
    finds the events stored and does not chain them again; each writer's numbers are its own,
    and the store says how far it holds each writer."""
    store = audit_backend.open()
    try:
        first = [(r, 120.0, "node-a/1", n) for n, r in enumerate(message(1), 1)]
        seq = store.append(first)
        assert store.append(first) == seq  # the replay: nothing added
        other = store.append([(r, 120.0, "node-b/7", n) for n, r in enumerate(message(2), 1)])
        assert other == seq + 3  # another writer's events 1..3 are its own
        replay = first[1:] + [(r, 120.0, "node-a/1", n) for n, r in enumerate(message(3), 4)]
        seq = store.append(replay)  # half old, half new: the new half is appended
        assert seq == other + 3
        assert store.append([(r, 120.0) for r in message(4)]) == seq + 3  # no event: appended
        assert store.feed_cursors() == {"node-a/1": 6, "node-b/7": 3}
        result = store.verify()
        assert result.ok and result.checked == 12
        assert [len(store.find(Query(queue_id=f"Q{n}"))) for n in (1, 2, 3, 4)] == [3] * 4
    finally:
        store.close()


def test_two_appenders_at_once_keep_one_chain(audit_backend):
    """Two store instances (two nodes) append batches at the same time while a third verifies:
    every record lands once, seq stays dense, and the chain verifies at every moment."""
    batches = 40
    errors: list[BaseException] = []
    done = threading.Event()

    def append(node: str) -> None:
        try:
            store = audit_backend.open()
        except BaseException as exc:
            errors.append(exc)
            return
        try:
            for i in range(batches):
                recs = message(i, at=T0 + i)
                for r in recs:
                    r.queue_id = f"{node}-{i}"
                store.append([(r, None) for r in recs])
        except BaseException as exc:  # reported by the test thread
            errors.append(exc)
        finally:
            store.close()

    def check() -> None:
        store = audit_backend.open(readonly=True)
        try:
            while not done.is_set():
                result = store.verify()
                if not result.ok:
                    errors.append(AssertionError(f"verify during appends: {result.problem}"))
                    return
        finally:
            store.close()

    audit_backend.open().close()  # created (and migrated) once, as the first node does
    nodes = [threading.Thread(target=append, args=(n,)) for n in ("node-a", "node-b")]
    checker = threading.Thread(target=check)
    checker.start()
    for t in nodes:
        t.start()
    for t in nodes:
        t.join(60)
    done.set()
    checker.join(60)
    assert not errors, errors
    store = audit_backend.open(readonly=True)
    try:
        rows = list(store.rows_between(None, None))
        assert [r["seq"] for r in rows] == list(range(1, 2 * batches * 3 + 1))
        assert {r["queue_id"] for r in rows} == {f"node-{n}-{i}" for n in "ab"
                                                 for i in range(batches)}
        result = store.verify()
        assert result.ok and result.checked == len(rows), result.problem
    finally:
        store.close()


def test_text_postgresql_cannot_store_is_kept_verifiable(audit_backend):
    """A remote reply with a NUL byte (PostgreSQL text refuses it) must not jam the writer."""
    [rec] = message(1)[:1]
    rec.dsn_diag = "smtp;550 bad\x00reply"
    fill(audit_backend, [rec])
    store = audit_backend.open(readonly=True)
    try:
        [row] = store.find(Query(queue_id="Q1"))
        assert row["dsn_diag"] in ("smtp;550 bad\x00reply", "smtp;550 bad\ufffdreply")
        assert store.verify().ok
    finally:
        store.close()


# -- PostgreSQL only: migrations and read-only opening --------------------------------------------


def test_postgres_migrations_match_the_columns_and_refuse_a_newer_schema(pg_schema):
    store = PostgresAuditStore(PG_DSN, pg_schema)
    store.close()
    store = PostgresAuditStore(PG_DSN, pg_schema)  # applying them again is a no-op
    store.close()
    with psycopg.connect(PG_DSN, autocommit=True) as conn:
        cols = [r[0] for r in conn.execute(
            "SELECT column_name FROM information_schema.columns WHERE table_schema = %s"
            " AND table_name = 'audit_records' ORDER BY ordinal_position", (pg_schema,))]
        assert sorted(cols) == sorted(COLUMNS)  # scheme 2 added its columns at the end
        versions = [r[0] for r in conn.execute(
            f'SELECT version FROM "{pg_schema}".audit_migrations ORDER BY version')]
        assert versions == [v for v, _ in MIGRATIONS]
        conn.execute(f'INSERT INTO "{pg_schema}".audit_migrations (version) VALUES (999)')
    with pytest.raises(RuntimeError, match="newer than this Postlane"):
        PostgresAuditStore(PG_DSN, pg_schema)


def test_postgres_read_only_open_needs_an_existing_store(pg_schema):
    with pytest.raises(StoreMissing, match="no audit store in schema"):
        PostgresAuditStore(PG_DSN, pg_schema, readonly=True)
    PostgresAuditStore(PG_DSN, pg_schema).close()
    reader = PostgresAuditStore(PG_DSN, pg_schema, readonly=True)
    try:
        with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
            reader.set_cursor("hook", 1)
    finally:
        reader.close()


def test_postgres_unreachable_is_a_clear_error():
    with pytest.raises(ConnectionError, match="cannot open the PostgreSQL audit store"):
        PostgresAuditStore("postgresql://postgres@127.0.0.1:1/test")


def test_postgres_retention_runs_on_one_node_at_a_time(pg_schema):
    store = PostgresAuditStore(PG_DSN, pg_schema)
    try:
        store.append([(r, None) for r in message(1)])
        policy = {"policy": Retention(delete=1)}
        key = (f"postlane-audit-purge:{pg_schema}",)
        with psycopg.connect(PG_DSN, autocommit=True) as other:  # another node, mid-purge
            other.execute("SELECT pg_advisory_lock(hashtext(%s))", key)
            assert store.purge(policy, None, T0 + 86_400) == {}
            other.execute("SELECT pg_advisory_unlock(hashtext(%s))", key)
        assert store.purge(policy, None, T0 + 86_400)["policy"]["purged"] == 3
        assert store.verify().ok
    finally:
        store.close()


def test_records_of_spool_events_come_back_in_event_order(audit_backend):
    """What the accounting files write again when a torn file lost lines (``records_of``)."""
    recs = message(7)
    store = audit_backend.open()
    try:
        store.append([(r, 120.0, "node-a/1", n) for n, r in enumerate(recs, 1)]
                     + [(message(8)[0], 120.0, "node-b/1", 1)])
        got = store.records_of("node-a/1", 2, 9)
    finally:
        store.close()
    assert [n for n, _ in got] == [2, 3]
    assert got == [(2, recs[1]), (3, recs[2])]
