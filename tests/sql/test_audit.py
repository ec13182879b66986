"""The tamper-evident audit feed (0009_audit, lifecycle_dagster.store.audit, `lifecycle-dagster audit`):
append-only events, per-stream hash chains (also under concurrency), retention, the one-row-per-event
feed and its indexes, and verification in Python with the database's canonical form.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import threading
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import psycopg
import pytest
from click.testing import CliRunner
from psycopg.types.json import Jsonb

from lifecycle_dagster.cli.main import main
from lifecycle_dagster.core.canonical import CANONICAL_FORM_VERSION, canonical_event, canonical_json, event_hash
from lifecycle_dagster.store.audit import GENESIS, verify
from lifecycle_dagster.store.db import connect
from lifecycle_dagster.store.sqlfiles import query

from helpers import as_role, create_execution, install, rows

STAGES = ["s1", "s2", "s3", "s4", "s5"]
DAG = {
    "stages": [{"id": s, "capability": "work"} for s in STAGES],
    "edges": [{"from": a, "to": b} for a, b in itertools.pairwise(STAGES)],
}
CHAIN_TRIGGER = "workflow_events_zz_audit_chain"
GUARD_TRIGGER = "workflow_events_append_only"
LOG_EVENT_TRIGGER = "workflow_execution_logs_zz_event"


def _cli(*args: str) -> Any:
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def _execution(db: str) -> str:
    """A new pending execution of the five-stage workflow ``wf`` (installed on first use)."""
    if not rows(db, "SELECT 1 FROM workflow_definitions WHERE name = 'wf'"):
        install(db, "wf", DAG, {"work": "worker"})
    return create_execution(db, "wf")[1]


def _event(
    conn: Any,
    eid: str | None,
    event_type: str,
    stage_id: str | None = None,
    metadata: Any = None,
    ts: str | None = None,
) -> int:
    row = conn.execute(
        'INSERT INTO workflow_events (execution_id, event_type, stage_id, metadata, "timestamp")'
        " VALUES (%s, %s, %s, coalesce(%s, '{}'::jsonb), coalesce(%s::timestamptz, now())) RETURNING id",
        (eid, event_type, stage_id, None if metadata is None else Jsonb(metadata), ts),
    ).fetchone()
    return int(row["id"])


def _complete(db: str, eid: str) -> None:
    """Drive an execution to completed by hand (the runbook's section 8 way): every log completed.
    The stage events such hand changes record (lifecycle.stage_log_event) are left out here: these
    tests choose every event of the streams themselves."""
    with connect(db) as conn, conn.transaction():
        conn.execute(f"ALTER TABLE workflow_execution_logs DISABLE TRIGGER {LOG_EVENT_TRIGGER}")
        conn.execute("UPDATE workflow_executions SET status = 'in_progress' WHERE id = %s", (eid,))
        for s in STAGES:
            conn.execute(
                "INSERT INTO workflow_execution_logs (execution_id, stage_id, status, started_at, completed_at)"
                " VALUES (%s, %s, 'completed', now(), now())",
                (eid, s),
            )
        conn.execute("UPDATE workflow_executions SET status = 'completed' WHERE id = %s", (eid,))
        conn.execute(f"ALTER TABLE workflow_execution_logs ENABLE TRIGGER {LOG_EVENT_TRIGGER}")


def _chain(db: str, eid: str | None) -> list[dict[str, Any]]:
    where = "execution_id IS NULL" if eid is None else "execution_id = %(e)s"
    return rows(db, f"SELECT id, prev_hash, hash FROM workflow_events WHERE {where} ORDER BY id", e=eid)


def _assert_linked(chain: list[dict[str, Any]], first_prev: str = GENESIS) -> None:
    """Each event's prev_hash is the hash of the event before it (id order): no fork, no gap."""
    prev = first_prev
    for link in chain:
        assert link["prev_hash"] == prev, f"event {link['id']}"
        prev = link["hash"]
    assert len({link["prev_hash"] for link in chain}) == len(chain)


# ---------------------------------------------------------------------------------------------
# append-only


@pytest.mark.parametrize(
    ("statement", "op"),
    [
        ("UPDATE workflow_events SET metadata = '{\"x\": 1}'", "UPDATE"),
        ("DELETE FROM workflow_events", "DELETE"),
        ("TRUNCATE workflow_events", "TRUNCATE"),
        ("TRUNCATE workflow_events, workflow_executions CASCADE", "TRUNCATE"),
        ("UPDATE lifecycle.audit_checkpoints SET last_hash = 'x'", "UPDATE"),
    ],
)
def test_events_are_append_only_even_for_a_superuser(db: str, statement: str, op: str) -> None:
    eid = _execution(db)
    with connect(db) as conn:
        _event(conn, eid, "something")
        conn.execute(
            "INSERT INTO lifecycle.audit_checkpoints (last_event_id, events_pruned, cutoff) VALUES (0, 0, now())"
        )
        assert conn.execute("SELECT rolsuper FROM pg_roles WHERE rolname = current_user").fetchone() == {
            "rolsuper": True
        }
        table = "lifecycle.audit_checkpoints" if "checkpoints" in statement else "workflow_events"
        with pytest.raises(psycopg.errors.InsufficientPrivilege) as err:
            conn.execute(statement)  # type: ignore[arg-type]
    assert err.value.diag.message_primary == (
        f"{table} is append-only: {op} refused (old rows are removed only by lifecycle.audit_prune(before))"
    )
    assert rows(db, "SELECT event_type FROM workflow_events") == [{"event_type": "something"}]


@pytest.mark.parametrize("role", [None, "service_role"])
def test_no_role_can_switch_retention_on_by_itself(db: str, role: str | None) -> None:
    """The setting lifecycle.audit_retention once let any role holding DELETE (the owner,
    service_role) delete whole streams; only lifecycle.audit_prune's own mark does now."""
    done = _execution(db)
    _complete(db, done)
    with connect(db) as conn:
        _event(conn, done, "something", ts="2020-01-01 00:00:00+00")
        _event(conn, None, "global_thing", ts="2020-01-01 00:00:00+00")
    with as_role(db, role or "postgres") as conn:
        for statement in (
            "DELETE FROM workflow_events",
            "DELETE FROM workflow_events WHERE execution_id IS NULL",
            "UPDATE workflow_events SET metadata = '{}'",
        ):
            with pytest.raises(psycopg.errors.InsufficientPrivilege) as err, conn.transaction():
                conn.execute("SELECT set_config('lifecycle.audit_retention', 'on', true)")
                conn.execute(statement)  # type: ignore[arg-type]
            assert err.value.diag.message_primary.startswith("workflow_events is append-only:"), statement
        if role is not None:  # the mark audit_prune sets is the owner's alone
            with pytest.raises(psycopg.errors.InsufficientPrivilege), conn.transaction():
                conn.execute("INSERT INTO lifecycle.audit_retention_marks (txid) VALUES (pg_current_xact_id())")
            with pytest.raises(psycopg.errors.InsufficientPrivilege), conn.transaction():
                conn.execute("DELETE FROM lifecycle.audit_heads")
    assert len(rows(db, "SELECT id FROM workflow_events")) == 2
    with connect(db) as conn:  # the retention function still removes the finished stream
        got = conn.execute(query("audit_prune"), {"before": "2021-01-01T00:00:00Z", "max_streams": 10}).fetchone()
    assert got == {"executions": 1, "events": 1, "global_events": 1}
    assert rows(db, "SELECT count(*) AS n FROM lifecycle.audit_retention_marks") == [{"n": 0}]
    assert (_cli("audit", "verify").exit_code, _cli("audit", "verify").output) == (
        0,
        "1 events in 1 streams verified\n",  # audit_pruned
    )


def _bypass_delete(db: str, where: str) -> None:
    """Delete events as a superuser who turned the append-only guard off (what no role can prevent)."""
    with connect(db) as conn, conn.transaction():
        conn.execute(f"ALTER TABLE workflow_events DISABLE TRIGGER {GUARD_TRIGGER}")
        conn.execute(f"DELETE FROM workflow_events WHERE {where}")  # type: ignore[arg-type]
        conn.execute(f"ALTER TABLE workflow_events ENABLE TRIGGER {GUARD_TRIGGER}")


def test_verify_finds_a_stream_removed_outside_retention(db: str) -> None:
    gone, kept = _execution(db), _execution(db)
    with connect(db) as conn:
        ids = [_event(conn, gone, "step", metadata={"i": i}) for i in range(3)]
        _event(conn, kept, "step")
    _bypass_delete(db, f"execution_id = '{gone}'")
    result = _cli("audit", "verify")
    assert result.exit_code == 1
    head = _head(db, gone)
    assert head["last_event_id"] == ids[-1]
    assert result.output == (
        f"broken: stream {gone}: event {ids[-1]}: events removed (the stream's head is not its newest stored"
        f" event): expected {head['last_hash']}, stored none\n"
        "1 of 2 stream(s) broken; 1 events read\n"
    )
    one = _cli("audit", "verify", gone)
    assert one.exit_code == 1 and f"stream {gone}: event {ids[-1]}: events removed" in one.output
    assert _cli("audit", "verify", kept).exit_code == 0


def test_verify_finds_global_events_removed_outside_retention(db: str) -> None:
    with connect(db) as conn:
        ids = [_event(conn, None, "global_thing", metadata={"i": i}) for i in range(3)]
    _bypass_delete(db, f"id = {ids[-1]}")  # the newest: no later event's prev_hash names it
    chain = _chain(db, None)
    result = _cli("audit", "verify", "--json")
    assert result.exit_code == 1
    assert json.loads(result.output)["broken"] == [
        {
            "stream": "global",
            "event_id": ids[-1],
            "field": "head",
            "expected": _head(db, None)["last_hash"],
            "stored": chain[-1]["hash"],
        }
    ]
    _bypass_delete(db, "execution_id IS NULL")  # all of them
    result = _cli("audit", "verify")
    assert result.exit_code == 1 and "stream global: event" in result.output


def _head(db: str, eid: str | None) -> dict[str, Any]:
    where = "execution_id IS NULL" if eid is None else "execution_id = %(e)s"
    [head] = rows(db, f"SELECT last_event_id, last_hash FROM lifecycle.audit_heads WHERE {where}", e=eid)
    return head


# ---------------------------------------------------------------------------------------------
# the chain


def test_new_events_are_chained_per_stream(db: str) -> None:
    a, b = _execution(db), _execution(db)
    with connect(db) as conn:
        for i in range(3):
            _event(conn, a, "step", metadata={"i": i})
            _event(conn, b, "step", metadata={"i": i})
            _event(conn, None, "global_thing", metadata={"i": i})
        # one statement, several rows of one stream: each row sees the ones before it
        conn.execute(
            "INSERT INTO workflow_events (execution_id, event_type, metadata)"
            " SELECT %s, 'bulk', jsonb_build_object('n', g) FROM generate_series(1, 5) g",
            (a,),
        )
    for stream, n in ((a, 8), (b, 3), (None, 3)):
        chain = _chain(db, stream)
        assert len(chain) == n
        _assert_linked(chain)
    with connect(db) as conn:
        report = verify(conn)
    assert (report.events, report.streams, report.unchained, report.broken) == (14, 3, 0, [])


def test_the_chain_is_the_hash_of_prev_and_the_canonical_event(db: str) -> None:
    eid = _execution(db)
    with connect(db) as conn:
        event_id = _event(conn, eid, "stage_started", "s1", {"b": [1, 2.5], "a": "é"}, "2024-02-29 23:59:59.5+02")
        row = conn.execute(
            'SELECT id, execution_id, event_type, stage_id, metadata::text AS metadata, "timestamp", prev_hash, hash'
            " FROM workflow_events WHERE id = %s",
            (event_id,),
        ).fetchone()
    canonical = (
        '{"event_type":"stage_started","execution_id":"'
        + eid
        + '","id":'
        + str(event_id)
        + ',"metadata":{"a":"é","b":[1,2.5]},"stage_id":"s1","timestamp":"2024-02-29T21:59:59.500000Z"}'
    )
    assert canonical_event(row) == canonical.encode()
    assert row["prev_hash"] == GENESIS
    assert row["hash"] == hashlib.sha256((GENESIS + "\n" + canonical).encode()).hexdigest()


def test_supplied_hashes_and_stale_ids_are_overridden(db: str) -> None:
    """prev_hash/hash are always the trigger's; an id below the stream's head is replaced, so id
    order stays chain order."""
    eid = _execution(db)
    with connect(db) as conn:
        first = _event(conn, eid, "one")
        second = _event(conn, eid, "two")
        row = conn.execute(
            "INSERT INTO workflow_events (id, execution_id, event_type, prev_hash, hash) OVERRIDING SYSTEM VALUE"
            " VALUES (%s, %s, 'three', 'forged', 'forged') RETURNING id",
            (first, eid),
        ).fetchone()
    assert row["id"] > second
    chain = _chain(db, eid)
    assert [c["id"] for c in chain] == [first, second, row["id"]]
    _assert_linked(chain)


def test_concurrent_inserts_into_one_stream_never_fork_the_chain(db: str) -> None:
    eid = _execution(db)
    threads, per_thread = 8, 25
    barrier = threading.Barrier(threads)
    errors: list[BaseException] = []

    def worker(n: int) -> None:
        try:
            with connect(db) as conn:
                barrier.wait(timeout=30)
                for i in range(per_thread):
                    with conn.transaction():
                        _event(conn, eid, "concurrent", metadata={"thread": n, "i": i})
                        if i % 5 == 0:  # hold the stream's lock a moment: others queue behind it
                            conn.execute("SELECT pg_sleep(0.002)")
        except BaseException as exc:
            errors.append(exc)

    pool = [threading.Thread(target=worker, args=(n,)) for n in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join(timeout=120)
    assert errors == []
    chain = _chain(db, eid)
    assert len(chain) == threads * per_thread
    _assert_linked(chain)
    with connect(db) as conn:
        report = verify(conn, eid)
    assert (report.events, report.streams, report.broken) == (200, 1, [])


def test_concurrent_global_events_from_publishes_are_chained(db: str) -> None:
    """Publishes (execution_id NULL) from 8 connections at once land in one unforked global chain."""
    threads = 8
    barrier = threading.Barrier(threads)
    errors: list[BaseException] = []

    def worker(n: int) -> None:
        try:
            with connect(db) as conn:
                barrier.wait(timeout=30)
                conn.execute(
                    "SELECT * FROM lifecycle.definition_publish(%s, NULL, %s, true)",
                    (f"wf_{n}", Jsonb({"stages": [{"id": "a", "capability": "work"}]})),
                )
        except BaseException as exc:
            errors.append(exc)

    pool = [threading.Thread(target=worker, args=(n,)) for n in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join(timeout=60)
    assert errors == []
    chain = _chain(db, None)
    assert len(chain) == 16  # definition_published + definition_activated each
    _assert_linked(chain)


def test_events_are_chained_only_under_read_committed(db: str) -> None:
    eid = _execution(db)
    with connect(db) as conn:
        conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
        with pytest.raises(psycopg.errors.InvalidTransactionState) as err, conn.transaction():
            _event(conn, eid, "x")
    assert err.value.diag.message_primary == (
        "workflow_events can only be inserted in a READ COMMITTED transaction, not REPEATABLE READ "
        "(the audit hash chain reads the stream head after locking it)"
    )


def test_infinite_timestamps_are_refused(db: str) -> None:
    with connect(db) as conn, pytest.raises(psycopg.errors.DatetimeFieldOverflow, match="must be a finite time"):
        _event(conn, None, "x", ts="infinity")


# ---------------------------------------------------------------------------------------------
# the canonical form: Python == SQL

METADATA_CASES = [
    "{}",
    "[]",
    '{"b": 1, "a": 2, "A": 3, "_": 4, "aa": 5, "é": 6, "😀": 7, "\\uffff": 8, "": 9}',
    '{"big": 1e300, "tenth": 0.1, "negzero": -0, "negzerof": -0.0, "one": 1.0, "tiny": 1.5e-10,'
    ' "neg": -12.3400, "huge_int": 123456789012345678901234567890123456789, "exp": 2E+3}',
    '{"s": "quote \\" backslash \\\\ slash / tab \\t nl \\n cr \\r bs \\b ff \\f ctl \\u0001 \\u001f del \\u007f"}',
    '{"u": "unicode é ü 中文 😀 \\u2028 \\u2029 \\ufeff"}',
    '{"nested": {"z": [1, {"y": [true, false, null], "x": {}}, []], "a": {"c": {"b": {"a": [[[]]]}}}}}',
    '{"arr": [3, 1, 2, "b", "a", {"k": "v", "j": "w"}]}',
    '{"t": true, "f": false, "n": null, "empty": "", "spaces": " a  b "}',
    '"just a string"',
    "42",
    "[1e-7, 100, 0.000, 5e-324, 1.7976931348623157e308]",
]


@pytest.mark.parametrize(
    "timestamp",
    [
        "2024-01-02 03:04:05.678901+00",
        "0005-06-07 08:09:10+00",
        "9999-12-31 23:59:59.999999+00",
        "2023-03-26 02:30:00+05:45",
    ],
)
def test_python_canonical_form_equals_the_database_s(db: str, timestamp: str) -> None:
    eid = _execution(db)
    with connect(db) as conn:
        ids = []
        for i, doc in enumerate(METADATA_CASES):
            for stream, stage in ((eid, f"s{i % 5 + 1}"), (None, None)):
                row = conn.execute(
                    'INSERT INTO workflow_events (execution_id, event_type, stage_id, metadata, "timestamp")'
                    " VALUES (%s, 'case', %s, %s::jsonb, %s::timestamptz) RETURNING id",
                    (stream, stage, doc, timestamp),
                ).fetchone()
                ids.append(row["id"])
        checked = 0
        for event_id in ids:
            row = conn.execute(
                "SELECT id, execution_id, event_type, stage_id, metadata::text AS metadata, metadata AS decoded,"
                ' "timestamp", prev_hash, hash FROM workflow_events WHERE id = %s',
                (event_id,),
            ).fetchone()
            sql = conn.execute(query("audit_canonical_event"), {"id": event_id}).fetchone()
            assert canonical_event(row).decode() == sql["canonical"]
            assert event_hash(row["prev_hash"], row) == sql["hash"] == row["hash"]
            checked += 1
        # canonical_json of decoded metadata agrees with lifecycle.canonical_json where floats are exact
        for doc in METADATA_CASES:
            if doc in (METADATA_CASES[3], METADATA_CASES[-1]):  # numbers a float cannot hold exactly
                continue
            db_text = conn.execute("SELECT lifecycle.canonical_json(%s::jsonb) AS c", (doc,)).fetchone()["c"]
            assert canonical_json(json.loads(doc)) == db_text
        report = verify(conn)
    assert checked == 2 * len(METADATA_CASES)
    assert (report.events, report.streams, report.broken) == (len(ids), 2, [])


def test_canonical_json_exact_values(db: str) -> None:
    with connect(db) as conn:
        got = conn.execute(
            "SELECT lifecycle.canonical_json(%s::jsonb) AS c",
            ('{"b": [1, 2.50, {"a": null, "A": "é\\u0001"}], "a": {}, "n": -0, "x": 1e3, "y": 0.1}',),
        ).fetchone()["c"]
    assert got == '{"a":{},"b":[1,2.50,{"A":"é\\u0001","a":null}],"n":0,"x":1000,"y":0.1}'
    assert canonical_json({"y": 0.1, "x": 1e3, "n": -0.0, "big": 10**40}) == (
        '{"big":10000000000000000000000000000000000000000,"n":0.0,"x":1000.0,"y":0.1}'
    )
    with pytest.raises(ValueError, match="not a JSON number"):
        canonical_json(float("nan"))
    with pytest.raises(TypeError, match="set is not a JSON value"):
        canonical_json({1, 2})


def test_canonical_form_version_1_known_answer() -> None:
    """Version 1 of the canonical form, pinned: a change to it must come with a new version."""
    row = {
        "id": 7,
        "execution_id": None,
        "event_type": "x",
        "stage_id": "a\n",
        "metadata": '{"b": 1.50, "a": [-0, "é", 1e2]}',
        "timestamp": datetime(2024, 1, 2, 4, 4, 5, 6, tzinfo=timezone(timedelta(hours=1))),
    }
    expected = (
        '{"event_type":"x","execution_id":null,"id":7,"metadata":{"a":[0,"é",100],"b":1.50},'
        '"stage_id":"a\\n","timestamp":"2024-01-02T03:04:05.000006Z"}'
    ).encode()
    assert CANONICAL_FORM_VERSION == 1
    assert canonical_event(row) == expected
    assert event_hash(GENESIS, row) == hashlib.sha256(GENESIS.encode() + b"\n" + expected).hexdigest()
    assert event_hash(GENESIS, row) == "ca7490c1dcd24dddbb5bd453c225193b9fa223669f16a1115270a5796ffccc78"


# ---------------------------------------------------------------------------------------------
# the feed


def test_the_feed_has_one_row_per_event_with_that_event_s_stage(db: str) -> None:
    eid = _execution(db)
    other = _execution(db)
    with connect(db) as conn:
        conn.execute("UPDATE workflow_executions SET status = 'in_progress' WHERE id = %s", (eid,))
        for n, s in enumerate(STAGES):
            conn.execute(
                "INSERT INTO workflow_execution_logs (execution_id, stage_id, status, attempt_number, error_message)"
                " VALUES (%s, %s, %s, %s, %s)",
                (eid, s, "failed" if s == "s3" else "pending", n + 1, "boom" if s == "s3" else None),
            )
        for i in range(20):
            _event(conn, eid, f"e{i:02d}", STAGES[i % 5], {"i": i}, f"2024-01-01 00:00:{i:02d}+00")
        _event(conn, other, "elsewhere")
        _event(conn, None, "global_thing")
        feed = conn.execute(query("audit_feed"), {"execution_id": eid}).fetchall()
        runbook_rows = conn.execute(
            "SELECT count(*) AS n FROM workflow_executions we"
            " JOIN workflow_definitions wd ON wd.id = we.workflow_definition_id"
            " LEFT JOIN workflow_execution_logs wel ON wel.execution_id = we.id"
            " LEFT JOIN workflow_events e ON e.execution_id = we.id WHERE we.id = %s",
            (eid,),
        ).fetchone()
    assert runbook_rows == {"n": 125}  # the runbook's section 5 join: logs x events
    # the logs inserted by hand recorded their own events (newest: written now, after the 2024 ones)
    hand, feed = feed[:5], feed[5:]
    assert sorted((r["event_type"], r["stage_id"], r["metadata"]["attempt"]) for r in hand) == [
        ("stage_failed", "s3", 3),
        ("stage_pending", "s1", 1),
        ("stage_pending", "s2", 2),
        ("stage_pending", "s4", 4),
        ("stage_pending", "s5", 5),
    ]
    assert len(feed) == 20
    assert [
        (r["event_type"], r["stage_id"], r["stage_status"], r["attempt_number"], r["error_message"]) for r in feed[:6]
    ] == [
        ("e19", "s5", "pending", 5, None),
        ("e18", "s4", "pending", 4, None),
        ("e17", "s3", "failed", 3, "boom"),
        ("e16", "s2", "pending", 2, None),
        ("e15", "s1", "pending", 1, None),
        ("e14", "s5", "pending", 5, None),
    ]
    assert [r["event_type"] for r in feed] == [f"e{i:02d}" for i in range(19, -1, -1)]
    assert {(r["execution_id"], r["workflow_name"], r["version"], r["workflow_status"]) for r in feed} == {
        (eid, "wf", 1, "in_progress")
    }
    assert feed[0]["metadata"] == {"i": 19}
    assert feed[0]["event_timestamp"] == datetime(2024, 1, 1, 0, 0, 19, tzinfo=UTC)
    columns = rows(
        db,
        "SELECT column_name FROM information_schema.columns WHERE table_name = 'workflow_audit_feed'"
        " ORDER BY ordinal_position",
    )
    assert [c["column_name"] for c in columns] == [
        "execution_id",
        "workflow_name",
        "version",
        "stage_id",
        "stage_status",
        "attempt_number",
        "started_at",
        "completed_at",
        "error_message",
        "workflow_status",
        "circuit_breaker_state",
        "context",
        "event_type",
        "metadata",
        "event_timestamp",
    ]


def _plan_nodes(plan: dict[str, Any]) -> list[dict[str, Any]]:
    found = [plan]
    for child in plan.get("Plans", []):
        found += _plan_nodes(child)
    return found


def test_the_feed_uses_indexes_at_scale(db: str) -> None:
    """120k events over 1,000 executions (hash trigger disabled for the bulk insert only: EXPLAIN is
    what is tested); no planner setting is changed."""
    eid = _execution(db)
    with connect(db) as conn:
        conn.execute(
            "INSERT INTO workflow_executions (workflow_definition_id, status)"
            " SELECT workflow_definition_id, 'pending' FROM workflow_executions, generate_series(1, 999)"
        )
        conn.execute(f"ALTER TABLE workflow_events DISABLE TRIGGER {CHAIN_TRIGGER}")
        try:
            conn.execute(
                'INSERT INTO workflow_events (execution_id, event_type, stage_id, metadata, "timestamp")'
                " SELECT e.id, 'bulk', 's1', jsonb_build_object('n', g),"
                "        timestamptz '2024-01-01' + (g * interval '1 second') + (e.n * interval '1 ms')"
                " FROM (SELECT id, row_number() OVER (ORDER BY id) AS n FROM workflow_executions) e,"
                "      generate_series(1, 120) g"
            )
        finally:
            conn.execute(f"ALTER TABLE workflow_events ENABLE TRIGGER {CHAIN_TRIGGER}")
        conn.execute("ANALYZE")
        assert conn.execute("SELECT count(*) AS n FROM workflow_events").fetchone() == {"n": 120_000}
        plans = {
            "feed of one execution": conn.execute(
                "EXPLAIN (FORMAT JSON) " + query("audit_feed"), {"execution_id": eid}
            ).fetchone(),
            "latest 50": conn.execute("EXPLAIN (FORMAT JSON) " + query("audit_latest"), {"limit": 50}).fetchone(),
            "latest 50 events": conn.execute(
                'EXPLAIN (FORMAT JSON) SELECT * FROM workflow_events ORDER BY "timestamp" DESC, id DESC LIMIT 50'
            ).fetchone(),
        }
        assert len(conn.execute(query("audit_feed"), {"execution_id": eid}).fetchall()) == 120
    for name, plan in plans.items():
        assert plan is not None
        nodes = _plan_nodes(plan["QUERY PLAN"][0]["Plan"])
        on_events = [n for n in nodes if n.get("Relation Name") == "workflow_events"]
        assert on_events, name
        assert all(n["Node Type"] in ("Index Scan", "Index Only Scan", "Bitmap Heap Scan") for n in on_events), (
            name,
            [(n["Node Type"], n.get("Index Name")) for n in on_events],
        )


# ---------------------------------------------------------------------------------------------
# retention


def test_prune_removes_whole_finished_streams_and_the_old_global_prefix(db: str) -> None:
    done, running, recent = _execution(db), _execution(db), _execution(db)
    _complete(db, done)
    _complete(db, recent)
    with connect(db) as conn:
        conn.execute("UPDATE workflow_executions SET status = 'in_progress' WHERE id = %s", (running,))
        for i in range(3):
            _event(conn, done, "old", metadata={"i": i}, ts="2020-01-01 00:00:00+00")
            _event(conn, running, "old", metadata={"i": i}, ts="2020-01-01 00:00:00+00")
            _event(conn, recent, "old", metadata={"i": i}, ts="2020-01-01 00:00:00+00")
        _event(conn, recent, "new")  # a recent event keeps the whole stream
        old_global = [_event(conn, None, "g", metadata={"i": i}, ts="2020-01-01 00:00:00+00") for i in range(3)]
        kept_global = _event(conn, None, "g_new")
        _event(conn, None, "g_old_after_new", ts="2020-01-01 00:00:00+00")  # after a newer one: kept
        last_done = _chain(db, done)[-1]
        last_old_global = _chain(db, None)[2]
        got = conn.execute(query("audit_prune"), {"before": "2021-01-01T00:00:00Z", "max_streams": 1000}).fetchone()
        assert got == {"executions": 1, "events": 3, "global_events": 3}
        # its mark is gone with it: later DELETEs of the transaction are refused again
        assert conn.execute("SELECT count(*) AS n FROM lifecycle.audit_retention_marks").fetchone() == {"n": 0}
        # nothing left to prune: a no-op
        again = conn.execute(query("audit_prune"), {"before": "2021-01-01T00:00:00Z", "max_streams": 1000}).fetchone()
        assert again == {"executions": 0, "events": 0, "global_events": 0}
    assert rows(db, "SELECT count(*) AS n FROM workflow_events WHERE execution_id = %(e)s", e=done) == [{"n": 0}]
    assert rows(db, "SELECT count(*) AS n FROM workflow_events WHERE execution_id = %(e)s", e=running) == [{"n": 3}]
    assert rows(db, "SELECT count(*) AS n FROM workflow_events WHERE execution_id = %(e)s", e=recent) == [{"n": 4}]
    global_left = rows(
        db, "SELECT id, event_type, metadata FROM workflow_events WHERE execution_id IS NULL ORDER BY id"
    )
    assert [g["event_type"] for g in global_left] == ["g_new", "g_old_after_new", "audit_pruned"]
    assert global_left[0]["id"] == kept_global and old_global[-1] < kept_global
    assert global_left[2]["metadata"] == {
        "before": "2021-01-01T00:00:00.000000Z",
        "executions": 1,
        "events": 3,
        "global_events": 3,
    }
    checkpoints = rows(
        db,
        "SELECT execution_id::text AS execution_id, last_event_id, last_hash, events_pruned"
        " FROM lifecycle.audit_checkpoints ORDER BY id",
    )
    assert checkpoints == [
        {"execution_id": done, "last_event_id": last_done["id"], "last_hash": last_done["hash"], "events_pruned": 3},
        {
            "execution_id": None,
            "last_event_id": last_old_global["id"],
            "last_hash": last_old_global["hash"],
            "events_pruned": 3,
        },
    ]
    # the global chain continues from its checkpoint; a late event of a pruned stream too
    _assert_linked(_chain(db, None), first_prev=last_old_global["hash"])
    with connect(db) as conn:
        _event(conn, done, "circuit_breaker_tripped")
    _assert_linked(_chain(db, done), first_prev=last_done["hash"])
    result = _cli("audit", "verify")
    assert result.exit_code == 0, result.output
    assert result.output == "11 events in 4 streams verified\n"  # 3 + 4 + 3 global + 1 late


def test_prune_refuses_bad_arguments(db: str) -> None:
    with connect(db) as conn:
        with pytest.raises(psycopg.errors.InvalidParameterValue, match="p_before must be a finite timestamp"):
            conn.execute("SELECT * FROM lifecycle.audit_prune('infinity')")
        with pytest.raises(psycopg.errors.InvalidParameterValue, match="p_max_streams must be >= 1, got 0"):
            conn.execute("SELECT * FROM lifecycle.audit_prune(now(), 0)")


# ---------------------------------------------------------------------------------------------
# the command line


def test_verify_names_an_event_altered_behind_the_guard(db: str) -> None:
    eid, intact = _execution(db), _execution(db)
    with connect(db) as conn:
        ids = [_event(conn, eid, "step", f"s{i + 1}", {"i": i}) for i in range(4)]
        for i in range(2):
            _event(conn, intact, "step", metadata={"i": i})
        _event(conn, None, "global_thing")
    ok = _cli("audit", "verify")
    assert (ok.exit_code, ok.output) == (0, "7 events in 3 streams verified\n")

    victim = ids[1]
    stored = rows(db, "SELECT hash FROM workflow_events WHERE id = %(i)s", i=victim)[0]["hash"]
    with connect(db) as conn:  # a superuser going around the guard
        conn.execute(f"ALTER TABLE workflow_events DISABLE TRIGGER {GUARD_TRIGGER}")
        try:
            conn.execute("UPDATE workflow_events SET metadata = '{\"i\": 99}' WHERE id = %s", (victim,))
        finally:
            conn.execute(f"ALTER TABLE workflow_events ENABLE TRIGGER {GUARD_TRIGGER}")
        row = conn.execute(
            "SELECT id, execution_id::text AS execution_id, event_type, stage_id, metadata::text AS metadata,"
            ' "timestamp", prev_hash FROM workflow_events WHERE id = %s',
            (victim,),
        ).fetchone()
    expected = event_hash(row["prev_hash"], row)
    bad = CliRunner().invoke(main, ["audit", "verify"], catch_exceptions=False)
    assert bad.exit_code == 1
    assert bad.output == (
        f"broken: stream {eid}: event {victim}: hash mismatch: expected {expected}, stored {stored}\n"
        "1 of 3 stream(s) broken; 7 events read\n"
    )
    one = _cli("audit", "verify", eid)
    assert one.exit_code == 1 and f"event {victim}: hash mismatch" in one.output
    other = _cli("audit", "verify", intact)
    assert (other.exit_code, other.output) == (0, "2 events in 1 streams verified\n")
    as_json = _cli("audit", "verify", "--json")
    assert as_json.exit_code == 1
    assert json.loads(as_json.output) == {
        "ok": False,
        "events": 7,
        "streams": 3,
        "unchained": 0,
        "broken": [{"stream": eid, "event_id": victim, "field": "hash", "expected": expected, "stored": stored}],
    }


def test_verify_names_a_removed_event(db: str) -> None:
    eid = _execution(db)
    with connect(db) as conn:
        ids = [_event(conn, eid, "step", metadata={"i": i}) for i in range(3)]
        conn.execute(f"ALTER TABLE workflow_events DISABLE TRIGGER {GUARD_TRIGGER}")
        try:
            conn.execute("DELETE FROM workflow_events WHERE id = %s", (ids[1],))
        finally:
            conn.execute(f"ALTER TABLE workflow_events ENABLE TRIGGER {GUARD_TRIGGER}")
    chain = {c["id"]: c for c in _chain(db, eid)}
    result = _cli("audit", "verify", eid)
    assert result.exit_code == 1
    assert result.output.splitlines()[0] == (
        f"broken: stream {eid}: event {ids[2]}: prev_hash mismatch: expected {chain[ids[0]]['hash']}, "
        f"stored {chain[ids[2]]['prev_hash']}"
    )


def test_show_prints_the_feed_as_a_table_or_one_json_document(db: str) -> None:
    eid = _execution(db)
    with connect(db) as conn:
        _event(conn, eid, "stage_started", "s1", {"k": "v"}, "2024-01-01 00:00:01+00")
        _event(conn, eid, "stage_completed", "s1", {"n": 1}, "2024-01-01 00:00:02+00")
    table = _cli("audit", "show", eid)
    assert table.exit_code == 0
    lines = table.output.splitlines()
    assert lines[0] == f"execution {eid}  wf v1  status pending"
    assert lines[1].split() == ["time", "(UTC)", "event", "stage", "stage", "status", "attempt", "metadata"]
    assert lines[2].split() == ["2024-01-01T00:00:02.000000Z", "stage_completed", "s1", '{"n":1}']
    assert lines[3].split() == ["2024-01-01T00:00:01.000000Z", "stage_started", "s1", '{"k":"v"}']
    assert lines[4] == "2 event(s)"
    as_json = _cli("audit", "show", eid, "--json")
    assert as_json.exit_code == 0
    document = json.loads(as_json.output)
    assert set(document) == {"execution_id", "events"} and document["execution_id"] == eid
    docs = document["events"]
    assert [(d["event_type"], d["metadata"], d["event_timestamp"]) for d in docs] == [
        ("stage_completed", {"n": 1}, "2024-01-01T00:00:02+00:00"),
        ("stage_started", {"k": "v"}, "2024-01-01T00:00:01+00:00"),
    ]
    assert set(docs[0]) == {
        "execution_id",
        "workflow_name",
        "version",
        "stage_id",
        "stage_status",
        "attempt_number",
        "started_at",
        "completed_at",
        "error_message",
        "workflow_status",
        "circuit_breaker_state",
        "context",
        "event_type",
        "metadata",
        "event_timestamp",
    }


@pytest.mark.parametrize("command", ["show", "verify"])
def test_unknown_or_malformed_execution_ids_are_clear_errors(db: str, command: str) -> None:
    missing = "00000000-0000-0000-0000-000000000001"
    result = _cli("audit", command, missing)
    assert (result.exit_code, result.output) == (1, f"Error: no execution {missing}\n")
    result = _cli("audit", command, "nope")
    assert (result.exit_code, result.output) == (1, "Error: not an execution id (a UUID): 'nope'\n")


def test_engine_events_are_chained(db: str) -> None:
    """Events written by the engine's functions (cancel, publish) join their streams' chains."""
    eid = _execution(db)
    with connect(db) as conn:
        conn.execute(query("cancel_execution"), {"execution_id": eid, "reason": "test", "compensate": False})
        conn.execute(
            query("publish_definition"),
            {
                "name": "wf",
                "description": None,
                "dag": Jsonb(DAG | {"on_failure": "hold"}),
                "activate": True,
                "created_by": None,
            },
        )
    assert [e["event_type"] for e in rows(db, "SELECT event_type FROM workflow_events ORDER BY id")] == [
        "workflow_cancelled",
        "definition_published",
        "definition_activated",
    ]
    for stream in (eid, None):
        _assert_linked(_chain(db, stream))
    result = _cli("audit", "verify")
    assert (result.exit_code, result.output) == (0, "3 events in 2 streams verified\n")
