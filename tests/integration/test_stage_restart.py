"""A stage op that loses its connection, and a waiting stage's outcome (issue 14, items 1 and 4):
a real Postgres and a real Dagster run. A restarted op adopts the task its attempt has (the one
the reaper requeued); a completion is never read as a stopped execution."""

from __future__ import annotations

import threading
import time
from typing import Any

from psycopg.types.json import Jsonb

import lifecycle_dagster.queue.wait as wait_module
from lifecycle_dagster.agents import AgentRegistry
from lifecycle_dagster.core.retry import RetryPolicy
from lifecycle_dagster.engine.stage import StageSpec, run_stage
from lifecycle_dagster.store.db import connect

from helpers import create_execution, events, install, rows, run

AGENT = "Queue Agent"
ONE_STAGE = {"stages": [{"id": "a", "capability": "q"}], "defaults": {"retry": {"max_attempts": 5}}}


def _queue_agent(db: str) -> None:
    install(db, "wf", ONE_STAGE, {"q": AGENT})
    with connect(db) as conn:
        conn.execute("UPDATE agents SET kind = 'queue' WHERE name = %s", (AGENT,))


def _wait_for(db: str, sql: str, timeout_s: float = 30, **params: Any) -> dict[str, Any] | None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = rows(db, sql, **params)
        if found:
            return found[0]
        time.sleep(0.05)
    return None


def test_an_op_that_lost_its_connection_adopts_the_task_the_reaper_requeued(db: str, instance: Any) -> None:
    """A worker dies holding the task; the stage op loses its connection; the reaper requeues the
    task as attempt 2; Dagster runs the op again, which waits for that same task; a second worker
    completes it. The run succeeds and the execution completes, its attempt counted once."""
    _queue_agent(db)
    seen: dict[str, Any] = {}

    def worker_dies_then_op_loses_connection() -> None:
        task = _wait_for(db, "SELECT id FROM task_queue WHERE status = 'pending'")
        assert task is not None
        with connect(db) as conn:
            [held] = conn.execute("SELECT * FROM lifecycle.task_claim('w1', %s, 1, 30)", (AGENT,)).fetchall()
            old = conn.execute(
                "SELECT pid FROM pg_stat_activity WHERE datname = current_database()"
                " AND application_name LIKE 'lifecycle-dagster op%%'"
            ).fetchall()
            conn.execute("SELECT pg_terminate_backend(%s)", (old[0]["pid"],))
            seen["killed"] = len(old)
            seen["reaped"] = conn.execute("SELECT lifecycle.task_reap(now() + interval '1 hour') AS n").fetchone()
        # the restarted op waits for the task (a new op connection that reads it)
        seen["restarted"] = _wait_for(
            db,
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database()"
            " AND application_name LIKE 'lifecycle-dagster op%%' AND pid <> %(old)s"
            " AND query LIKE '%%lifecycle_task_done%%'",
            old=old[0]["pid"],
        )
        with connect(db) as conn:
            [again] = conn.execute("SELECT * FROM lifecycle.task_claim('w2', %s, 1, 30)", (AGENT,)).fetchall()
            seen["again"] = (again["task_id"] == held["task_id"], again["attempt"])
            seen["done"] = conn.execute(
                "SELECT lifecycle.task_complete(%s, %s, %s) AS s",
                (again["task_id"], again["lease_token"], Jsonb({"summary": "done"})),
            ).fetchone()

    side = threading.Thread(target=worker_dies_then_op_loses_connection)
    side.start()
    try:
        result, eid = run(db, instance, "wf", AgentRegistry())
    finally:
        side.join(60)
    assert seen["killed"] == 1 and seen["reaped"] == {"n": 1}
    assert seen["restarted"] is not None  # the op came back and waited for the task
    assert seen["again"] == (True, 2) and seen["done"] == {"s": "completed"}
    assert result.success
    assert rows(db, "SELECT status FROM workflow_executions WHERE id = %(e)s", e=eid) == [{"status": "completed"}]
    tasks = rows(db, "SELECT status, attempt FROM task_queue WHERE workflow_execution_id = %(e)s", e=eid)
    assert tasks == [{"status": "completed", "attempt": 2}]
    kinds = [t for t, _, _ in events(db, eid)]
    assert kinds.count("stage_started") == 1 and "stage_result_refused" not in kinds


def test_a_completion_between_two_reads_of_a_waiting_stage_is_a_completion(db: str, monkeypatch: Any) -> None:
    """The worker's completion (which completes the execution: its last stage) commits right after
    the waiting op read the task as pending. The op's next look must see a completion, not an
    execution that stopped: the stage's outcome is the task's, the execution stays completed."""
    _queue_agent(db)
    row, eid = create_execution(db, "wf")
    original = wait_module.fetch_one
    completed: list[str] = []

    def read_then_complete(conn: Any, name: str, params: Any) -> Any:
        found = original(conn, name, params)
        if name == "task_state" and not completed and found["status"] == "pending":
            with connect(db) as other:  # a worker, on its own connection, between the op's reads
                [claimed] = other.execute("SELECT * FROM lifecycle.task_claim('w1', %s, 1, 30)", (AGENT,)).fetchall()
                done = other.execute(
                    "SELECT lifecycle.task_complete(%s, %s, %s) AS s",
                    (claimed["task_id"], claimed["lease_token"], Jsonb({"summary": "done"})),
                ).fetchone()
                completed.append(done["s"])  # type: ignore[index]
        return found

    monkeypatch.setattr(wait_module, "fetch_one", read_then_complete)
    spec = StageSpec(definition_id=str(row["id"]), stage_id="a", capability="q", policy=RetryPolicy(max_attempts=5))
    with connect(db) as conn:
        outcome = run_stage(conn, spec, run_id="run-1", attempt=1, registry=AgentRegistry(), execution_id=eid)
    assert completed == ["completed"]
    assert (outcome.execution_status, outcome.output) == ("completed", {"summary": "done"})
    assert rows(db, "SELECT status FROM workflow_executions WHERE id = %(e)s", e=eid) == [{"status": "completed"}]
    assert "stage_result_refused" not in [t for t, _, _ in events(db, eid)]
