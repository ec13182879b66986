"""One stage attempt, one task (issue 14, items 1, 2, 8, 11): a restarted start adopts the attempt
and its task, whoever created it; a stopped execution hands out no work; counters at their
largest value stop no one. A real Postgres; the races use separate connections in threads."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
from psycopg.types.json import Jsonb

from lifecycle_dagster.store.db import Connection, connect
from lifecycle_dagster.store.sqlfiles import query

from helpers import install, rows

DAG = {"stages": [{"id": "a", "capability": "q"}, {"id": "b", "capability": "q"}]}
AGENT = "Queue Agent"
INT_MAX = 2147483647
BIGINT_MAX = 9223372036854775807


def _setup(db: str, *, kind: str = "queue", dag: dict[str, Any] = DAG) -> str:
    install(db, "wf", dag, {"q": AGENT})
    with connect(db) as conn:
        conn.execute("UPDATE agents SET kind = %s WHERE name = %s", (kind, AGENT))
    return _execution(db)


def _execution(db: str, run_id: str = "run-1") -> str:
    with connect(db) as conn:
        definition = conn.execute("SELECT id FROM workflow_definitions WHERE name = 'wf'").fetchone()
        assert definition is not None
        eid = conn.execute(
            query("create_execution"), {"definition_id": definition["id"], "context": Jsonb({}), "created_by": None}
        ).fetchone()["id"]  # type: ignore[index]
        conn.execute("SELECT lifecycle.execution_ensure(%s, %s, %s)", (definition["id"], run_id, eid))
    return str(eid)


def _start(conn: Connection, eid: str, stage: str = "a", attempt: int = 1, capability: str = "q") -> dict[str, Any]:
    row = conn.execute(
        "SELECT * FROM lifecycle.stage_start(%s, %s, %s, '{}'::jsonb, %s, p_max_attempts => 5)",
        (eid, stage, capability, attempt),
    ).fetchone()
    assert row is not None
    return dict(row)


def _claim(conn: Connection, worker: str, later_s: float = 0, limit: int = 5) -> list[dict[str, Any]]:
    """Claim as ``worker``, ``later_s`` seconds after the database's now (30 s leases)."""
    sql = "SELECT * FROM lifecycle.task_claim(%s, %s, %s, 30, now() + make_interval(secs => %s))"
    return [dict(r) for r in conn.execute(sql, (worker, AGENT, limit, later_s)).fetchall()]


def _reap(conn: Connection, later_s: float = 300) -> int:
    """Reap ``later_s`` seconds after the database's now: the number of tasks reaped."""
    return int(
        conn.execute("SELECT lifecycle.task_reap(now() + make_interval(secs => %s)) AS n", (later_s,)).fetchone()["n"]
    )  # type: ignore[index]


def _count(db: str, sql: str, **params: Any) -> int:
    return int(rows(db, sql, **params)[0]["n"])


# -- item 1: a restarted op adopts the requeued task of its attempt -------------------------------


def test_a_restarted_start_adopts_the_task_the_reaper_requeued(db: str) -> None:
    eid = _setup(db)
    with connect(db) as conn:
        first = _start(conn, eid)
        [held] = _claim(conn, "w1")
        assert held["task_id"] == first["task_id"] and held["attempt"] == 1
        # the worker dies: its lease expires and the reaper requeues the task as attempt 2
        assert _reap(conn) == 1
        # the op lost its connection and Dagster runs it again: the same stage, started again (as
        # the op passed it before, attempt = its retry number + 1, and as it passes it now, 1)
        for attempt in (2, 1, 3):
            again = _start(conn, eid, attempt=attempt)
            assert (again["log_id"], again["task_id"], again["attempt_number"]) == (
                first["log_id"],
                first["task_id"],
                2,
            )
            assert again["agent_kind"] == "queue" and again["agent_name"] == AGENT
    # one task for the stage, pending for its attempt 2; the attempt counted once
    tasks = rows(db, "SELECT id, status, attempt FROM task_queue WHERE workflow_execution_id = %(e)s", e=eid)
    assert tasks == [{"id": first["task_id"], "status": "pending", "attempt": 2}]
    assert rows(db, "SELECT attempt_number, status FROM workflow_execution_logs WHERE execution_id = %(e)s", e=eid) == [
        {"attempt_number": 2, "status": "in_progress"}
    ]
    assert (
        _count(
            db,
            "SELECT count(*) AS n FROM workflow_events WHERE execution_id = %(e)s AND event_type = 'stage_started'",
            e=eid,
        )
        == 1
    )
    # a worker takes the adopted task and completes it: the stage completes
    with connect(db) as conn:
        [again] = _claim(conn, "w2", 360)
        assert (again["task_id"], again["attempt"]) == (first["task_id"], 2)
        done = conn.execute(
            "SELECT lifecycle.task_complete(%s, %s, %s, now() + interval '361 seconds') AS s",
            (again["task_id"], again["lease_token"], Jsonb({"ok": 1})),
        ).fetchone()
        assert done == {"s": "in_progress"}


def _restart_and_reap_together(db: str, eid: str) -> dict[str, Any]:
    """The op's restart (``stage_start`` again) and the reaper, each on its own connection and
    thread, released together by a barrier: what each returned (or raised)."""
    barrier = threading.Barrier(2)
    out: dict[str, Any] = {}

    def restart() -> None:
        with connect(db) as conn:
            barrier.wait(10)
            try:
                out["start"] = _start(conn, eid, attempt=2)
            except psycopg.Error as exc:
                out["start"] = exc

    def reap() -> None:
        with connect(db) as conn:
            barrier.wait(10)
            out["reap"] = _reap(conn, 3600)

    threads = [threading.Thread(target=restart), threading.Thread(target=reap)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return out


def test_a_restart_racing_the_reaper_never_makes_a_second_task(db: str) -> None:
    """The op's restart and the reaper, released together by a barrier, 30 rounds: whichever
    comes first, the attempt has one task, and the start never fails."""
    install(db, "wf", DAG, {"q": AGENT})
    with connect(db) as conn:
        conn.execute("UPDATE agents SET kind = 'queue' WHERE name = %s", (AGENT,))
    problems: list[str] = []
    for i in range(30):
        eid = _execution(db, f"run-{i}")
        with connect(db) as conn:
            _start(conn, eid)
            _claim(conn, "w1")
        out = _restart_and_reap_together(db, eid)
        if isinstance(out["start"], BaseException):
            problems.append(f"round {i}: the restart failed: {out['start']}")
            continue
        # one task, the one the start returned (the reaper may move its attempt on after the start:
        # the op follows the task's attempt as it waits)
        tasks = rows(db, "SELECT id, attempt, status FROM task_queue WHERE workflow_execution_id = %(e)s", e=eid)
        if (
            len(tasks) != 1
            or tasks[0]["id"] != out["start"]["task_id"]
            or tasks[0]["status"] not in ("pending", "in_progress")
        ):
            problems.append(f"round {i}: tasks {tasks}, start gave task {out['start']['task_id']}")
    assert problems == []


# -- item 11: starting a started attempt is idempotent ----------------------------------------------


def test_starting_an_in_progress_stage_with_no_agent_twice_records_one_start(db: str) -> None:
    eid = _setup(db)
    with connect(db) as conn:
        conn.execute("UPDATE agents SET is_active = false WHERE name = %s", (AGENT,))
        first = _start(conn, eid)
        second = _start(conn, eid)
    assert first["agent_id"] is None and first["task_id"] is None
    assert (second["log_id"], second["attempt_number"], second["agent_id"]) == (first["log_id"], 1, None)
    assert (
        _count(
            db,
            "SELECT count(*) AS n FROM workflow_events WHERE execution_id = %(e)s AND event_type = 'stage_started'",
            e=eid,
        )
        == 1
    )


def test_a_restarted_op_attempt_keeps_its_number_and_task(db: str) -> None:
    eid = _setup(db, kind="python")
    with connect(db) as conn:
        first = _start(conn, eid)
        again = _start(conn, eid, attempt=2)  # Dagster's retry after a lost connection
    assert (again["task_id"], again["attempt_number"]) == (first["task_id"], 1)
    [task] = rows(db, "SELECT status, lease_token, attempt FROM task_queue WHERE workflow_execution_id = %(e)s", e=eid)
    assert task == {"status": "in_progress", "lease_token": 2, "attempt": 1}  # a new lease for the new call
    assert (
        _count(
            db,
            "SELECT count(*) AS n FROM workflow_events WHERE execution_id = %(e)s AND event_type = 'stage_started'",
            e=eid,
        )
        == 1
    )


# -- item 2: a stopped execution hands out no work ----------------------------------------------------


@pytest.mark.parametrize("how", ["execution_fail", "stage_fail", "cancel"])
def test_stopping_an_execution_cancels_its_pending_tasks_and_claims_skip_it(db: str, how: str) -> None:
    eid = _setup(db)
    with connect(db) as conn:
        a = _start(conn, eid, "a")
        b = _start(conn, eid, "b")
        [held] = _claim(conn, "w1", limit=1)  # a's task is held; b's is pending
        assert held["task_id"] == a["task_id"]
        if how == "execution_fail":
            conn.execute("SELECT lifecycle.execution_fail(%s, 'run lost')", (eid,))
        elif how == "stage_fail":
            conn.execute("SELECT lifecycle.stage_fail(%s, %s, 'boom', 'x')", (a["log_id"], a["task_id"]))
        else:
            conn.execute("SELECT * FROM lifecycle.execution_cancel(%s, 'stop', false)", (eid,))
        [task_b] = rows(
            db,
            "SELECT t.status, t.completed_at = e.updated_at AS at_stop FROM task_queue t"
            " JOIN workflow_executions e ON e.id = t.workflow_execution_id WHERE t.id = %(t)s",
            t=b["task_id"],
        )
        assert task_b == {"status": "cancelled", "at_stop": True}  # in the transaction that stopped it
        assert _claim(conn, "w2") == []
    assert (
        _count(
            db, "SELECT count(*) AS n FROM task_queue WHERE workflow_execution_id = %(e)s AND status = 'pending'", e=eid
        )
        == 0
    )


def test_a_claim_never_hands_out_a_task_of_a_stopped_execution_but_manual_tasks_still_run(db: str) -> None:
    eid = _setup(db)
    with connect(db) as conn:
        conn.execute("SELECT lifecycle.execution_fail(%s, 'run lost')", (eid,))
        # a task enqueued by hand after the execution failed (the runbook's section 7 style)
        conn.execute(
            "INSERT INTO task_queue (workflow_execution_id, task_type, input_data) VALUES (%s, 'a', '{}')", (eid,)
        )
        manual = conn.execute(
            "INSERT INTO task_queue (task_type, capability, input_data) VALUES ('manual', 'q', '{}') RETURNING id"
        ).fetchone()
        assert manual is not None
        got = _claim(conn, "w1")
    assert [str(g["task_id"]) for g in got] == [str(manual["id"])]


# -- item 8: counters at their largest value ----------------------------------------------------------


def test_one_expired_task_at_the_largest_attempt_does_not_stop_the_reaper(db: str) -> None:
    eid = _setup(db)
    other = _execution(db, "run-2")
    with connect(db) as conn:
        a = _start(conn, eid, "a")
        b = _start(conn, other, "a")
        assert len(_claim(conn, "w1")) == 2
        conn.execute("UPDATE task_queue SET attempt = %s, max_attempts = NULL WHERE id = %s", (INT_MAX, a["task_id"]))
        conn.execute("UPDATE task_queue SET max_attempts = NULL WHERE id = %s", (b["task_id"],))
        n = _reap(conn)
    assert n == 2
    state = {
        str(r["id"]): (r["status"], r["attempt"], r["error_code"])
        for r in rows(db, "SELECT id, status, attempt, error_code FROM task_queue")
    }
    assert state[str(a["task_id"])] == ("failed", INT_MAX, "lease_expired")  # no attempt after it
    assert state[str(b["task_id"])] == ("pending", 2, None)  # the other task is requeued


def test_a_task_whose_lease_token_is_at_its_largest_value_stops_no_claim_and_no_reap(db: str) -> None:
    eid = _setup(db)
    with connect(db) as conn:
        a = _start(conn, eid, "a")
        b = _start(conn, eid, "b")
        conn.execute("UPDATE task_queue SET lease_token = %s WHERE id = %s", (BIGINT_MAX, a["task_id"]))
        got = _claim(conn, "w1")
        assert [g["task_id"] for g in got] == [b["task_id"]]
        # b's lease expires while a newer attempt supersedes it: the reaper cancels it
        conn.execute("UPDATE task_queue SET lease_token = %s WHERE id = %s", (BIGINT_MAX, b["task_id"]))
        conn.execute("UPDATE workflow_execution_logs SET attempt_number = 2 WHERE id = %s", (b["log_id"],))
        assert _reap(conn) == 1
    assert rows(db, "SELECT status FROM task_queue WHERE id = %(t)s", t=b["task_id"]) == [{"status": "cancelled"}]


def test_retry_stage_at_the_largest_attempt_says_so(db: str) -> None:
    eid = _setup(db)
    with connect(db) as conn:
        a = _start(conn, eid, "a")
        conn.execute(
            "UPDATE workflow_execution_logs SET status = 'pending', attempt_number = %s, not_before = %s WHERE id = %s",
            (INT_MAX, datetime.now(UTC) + timedelta(hours=1), a["log_id"]),
        )
        with pytest.raises(psycopg.errors.ObjectNotInPrerequisiteState) as err:
            conn.execute("SELECT retry_stage(%s, %s)", (a["log_id"], INT_MAX))
    assert "already waiting to retry" in str(err.value) and str(INT_MAX + 1) in str(err.value)


def test_starting_a_stage_past_the_largest_attempt_is_refused_clearly(db: str) -> None:
    eid = _setup(db)
    with connect(db) as conn:
        a = _start(conn, eid, "a")
        conn.execute("UPDATE task_queue SET attempt = %s, status = 'cancelled' WHERE id = %s", (INT_MAX, a["task_id"]))
        conn.execute("UPDATE workflow_execution_logs SET status = 'pending' WHERE id = %s", (a["log_id"],))
        with pytest.raises(psycopg.errors.ObjectNotInPrerequisiteState) as err:
            _start(conn, eid, "a")
    assert "largest attempt number" in str(err.value)


def test_an_undo_failing_at_the_largest_attempt_records_its_retry_without_overflow(db: str) -> None:
    """undo_fail's event counted the next attempt as ``p_attempt + 1`` in integer: at the largest
    attempt it raised ``integer out of range`` and the failure was not recorded."""
    eid = _setup(db, kind="python")
    with connect(db) as conn:
        a = _start(conn, eid, "a")
        done = conn.execute("SELECT lifecycle.stage_complete(%s) AS s", (a["log_id"],)).fetchone()
        assert done is not None and done["s"] == "in_progress"  # the execution's status: b is left
        conn.execute("SELECT lifecycle.execution_fail(%s, 'b failed')", (eid,))
        conn.execute("SELECT lifecycle.compensation_start(%s, 'b failed')", (eid,))
        status = conn.execute(
            "SELECT lifecycle.undo_fail(%s, 'agent down', false, %s) AS s", (a["log_id"], INT_MAX)
        ).fetchone()
        assert status is not None and status["s"] == "compensating"
        with pytest.raises(psycopg.errors.InvalidParameterValue, match="attempt must be >= 1, got 0"):
            conn.execute("SELECT lifecycle.undo_fail(%s, 'agent down', false, 0)", (a["log_id"],))
    [event] = rows(
        db,
        "SELECT metadata FROM workflow_events"
        " WHERE event_type = 'stage_compensation_retrying' AND execution_id = %(e)s",
        e=eid,
    )
    assert event["metadata"]["attempt"] == INT_MAX + 1 and event["metadata"]["failed_attempt"] == INT_MAX


def test_a_requeued_attempt_gets_the_whole_stage_timeout_again(db: str) -> None:
    """The reaper gives the next attempt the stage's time limit from the requeue, never the rest of
    a dead worker's (the chaos suite saw attempt 3 left with half a second)."""
    eid = _setup(db)
    with connect(db) as conn:
        started = conn.execute(
            "SELECT * FROM lifecycle.stage_start(%s, 'a', 'q', '{}'::jsonb, 1, p_timeout_s => 10, p_max_attempts => 5)",
            (eid,),
        ).fetchone()
        assert started is not None
        for attempt, later_s in ((2, 300), (3, 700)):
            assert len(_claim(conn, f"w{attempt}", later_s=later_s - 300)) == 1
            assert _reap(conn, later_s=later_s) == 1  # the worker died; long past any deadline
            row = conn.execute(
                "SELECT attempt, extract(epoch FROM deadline_at - now()) AS left_s FROM task_queue WHERE id = %s",
                (started["task_id"],),
            ).fetchone()
            assert row is not None and row["attempt"] == attempt
            assert later_s + 9 <= float(row["left_s"]) <= later_s + 10.5  # 10 s from the requeue
