"""Cancellation (compare-and-set, fenced results, racing completion through real runs) and the
runbook's retry_stage, fixed."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.types.json import Jsonb

from lifecycle_dagster.agents import AgentRegistry, Task
from lifecycle_dagster.store.db import connect
from lifecycle_dagster.store.sqlfiles import query

from agents_for_tests import SlowMarker
from helpers import create_execution, events, install, rows, run

REPO = Path(__file__).resolve().parents[2]
CHAIN = {
    "stages": [
        {"id": "a", "capability": "a", "next": ["b"]},
        {"id": "b", "capability": "b", "next": ["c"]},
        {"id": "c", "capability": "c"},
    ],
    "defaults": {"retry": {"max_attempts": 1}},
}


class Ok:
    def __init__(self, name: str) -> None:
        self.name = name

    def run(self, task: Task) -> dict[str, Any]:
        return {"summary": f"{task.stage_id} done"}


class AtBarrier(Ok):
    """Meets the canceller at a barrier, then returns at once."""

    def __init__(self, name: str, barrier: threading.Barrier) -> None:
        super().__init__(name)
        self.barrier = barrier

    def run(self, task: Task) -> dict[str, Any]:
        self.barrier.wait(timeout=30)
        return super().run(task)


def _cancel(dsn: str, eid: str, compensate: bool = True) -> dict[str, Any]:
    with connect(dsn) as conn:
        row = conn.execute(
            query("cancel_execution"), {"execution_id": eid, "reason": "test", "compensate": compensate}
        ).fetchone()
    assert row is not None
    return dict(row)


def test_cancel_is_compare_and_set(db: str) -> None:
    install(db, "wf", CHAIN, {"a": "A", "b": "B", "c": "C"})
    _, eid = create_execution(db, "wf")
    with connect(db) as conn:  # a pending stage log and a pending task, as the runbook's section 7 makes
        conn.execute(
            "INSERT INTO workflow_execution_logs (execution_id, stage_id, status) VALUES (%s, 'a', 'pending')", (eid,)
        )
        conn.execute("INSERT INTO task_queue (workflow_execution_id, task_type) VALUES (%s, 'a')", (eid,))
    first = _cancel(db, eid, compensate=False)
    assert first == {"cancelled": True, "status": "cancelled", "previous_status": "pending", "dagster_run_id": None}
    second = _cancel(db, eid)
    assert second["cancelled"] is False and second["status"] == "cancelled"
    assert rows(db, "SELECT status FROM workflow_execution_logs WHERE execution_id = %(e)s", e=eid) == [
        {"status": "skipped"}
    ]
    assert rows(db, "SELECT status FROM task_queue WHERE workflow_execution_id = %(e)s", e=eid) == [
        {"status": "cancelled"}
    ]
    evs = events(db, eid)
    # the stage log inserted by hand records its event (the stage-log trigger); the cancel its own
    assert [t for t, _, _ in evs] == ["stage_pending", "workflow_cancelled"]
    assert evs[1][2]["compensate"] is False and evs[1][2]["previous_status"] == "pending"


def test_cancel_after_completion_loses(db: str, instance: Any) -> None:
    install(db, "wf", CHAIN, {"a": "A", "b": "B", "c": "C"})
    result, eid = run(db, instance, "wf", AgentRegistry([Ok("A"), Ok("B"), Ok("C")]))
    assert result.success
    assert _cancel(db, eid) == {
        "cancelled": False,
        "status": "completed",
        "previous_status": "completed",
        "dagster_run_id": result.run_id,
    }
    assert "workflow_cancelled" not in [t for t, _, _ in events(db, eid)]


def test_cancel_unknown_execution_is_a_clear_error(db: str) -> None:
    with pytest.raises(psycopg.errors.NoDataFound, match="unknown workflow execution"):
        _cancel(db, "00000000-0000-0000-0000-000000000099")


def test_cancel_racing_completion_50_times(db: str, instance: Any) -> None:
    install(db, "wf", CHAIN, {"a": "A", "b": "B", "c": "C"})
    outcomes: dict[str, int] = {"cancelled": 0, "completed": 0}
    for i in range(50):
        barrier = threading.Barrier(2)
        lag = i * 0.004  # the cancel lands from "at once" to ~0.2 s after b's agent returns
        said: dict[str, Any] = {}
        registry = AgentRegistry([Ok("A"), AtBarrier("B", barrier), Ok("C")])
        row, eid = create_execution(db, "wf")

        def canceller(
            eid: str = eid, barrier: threading.Barrier = barrier, said: dict[str, Any] = said, lag: float = lag
        ) -> None:
            barrier.wait(timeout=30)
            time.sleep(lag)
            said.update(_cancel(db, eid))

        t = threading.Thread(target=canceller)
        t.start()
        from lifecycle_dagster.location.job_factory import EXECUTION_ID_TAG, build_job
        from lifecycle_dagster.location.resources import agents_resource

        result = build_job(row).execute_in_process(
            instance=instance,
            tags={EXECUTION_ID_TAG: eid},
            raise_on_error=False,
            resources={"lifecycle_agents": agents_resource(registry)},
        )
        t.join(30)
        [ex] = rows(db, "SELECT status FROM workflow_executions WHERE id = %(e)s", e=eid)
        kinds = [k for k, _, _ in events(db, eid)]
        logs = {
            r["stage_id"]: r["status"]
            for r in rows(db, "SELECT stage_id, status FROM workflow_execution_logs WHERE execution_id = %(e)s", e=eid)
        }
        assert ex["status"] in ("cancelled", "completed")
        assert not ("workflow_completed" in kinds and "workflow_cancelled" in kinds)
        # the caller was told which side won
        assert said["cancelled"] is (ex["status"] == "cancelled")
        assert result.success is (ex["status"] == "completed")
        if ex["status"] == "cancelled":
            # after the cancel no stage started or completed; a stage caught running was refused
            after = kinds[kinds.index("workflow_cancelled") + 1 :]
            assert "stage_started" not in after and "stage_completed" not in after
            running = [s for s, st in logs.items() if st != "completed"]
            assert all(logs[s] == "skipped" for s in running)
            assert after.count("stage_result_refused") == len(running)
        else:
            assert logs == {"a": "completed", "b": "completed", "c": "completed"}
        outcomes[ex["status"]] += 1
    assert sum(outcomes.values()) == 50
    assert outcomes["cancelled"] > 0 and outcomes["completed"] > 0, outcomes  # both sides won sometimes


def test_cancel_stops_a_running_agent(db: str, instance: Any, tmp_path: Path) -> None:
    dag = {"stages": [{"id": "a", "capability": "a", "timeout_s": 30}], "defaults": {"retry": {"max_attempts": 1}}}
    install(db, "wf", dag, {"a": "A"})
    marker = tmp_path / "marker"
    row, eid = create_execution(db, "wf")
    threading.Timer(0.8, lambda: _cancel(db, eid)).start()
    t0 = time.monotonic()
    from lifecycle_dagster.location.job_factory import EXECUTION_ID_TAG, build_job
    from lifecycle_dagster.location.resources import agents_resource

    result = build_job(row).execute_in_process(
        instance=instance,
        tags={EXECUTION_ID_TAG: eid},
        raise_on_error=False,
        resources={"lifecycle_agents": agents_resource(AgentRegistry([SlowMarker("A", marker)]))},
    )
    assert not result.success
    assert time.monotonic() - t0 < 2.5
    [log] = rows(db, "SELECT status, error_message FROM workflow_execution_logs WHERE execution_id = %(e)s", e=eid)
    assert log["status"] == "skipped"
    assert "execution is cancelled" in log["error_message"]
    assert [k for k, _, _ in events(db, eid)][-1] == "stage_result_refused"
    time.sleep(3)
    assert not marker.exists()


def test_cli_cancel_says_who_won(db: str, tmp_path: Path) -> None:
    install(db, "wf", CHAIN, {"a": "A", "b": "B", "c": "C"})
    _, eid = create_execution(db, "wf")
    env_bin = Path(sys.executable).parent / "lifecycle-dagster"
    env = {"DATABASE_URL": db, "DAGSTER_HOME": str(tmp_path), "PATH": "/usr/bin:/bin"}
    ok = subprocess.run([str(env_bin), "cancel", eid, "--no-compensate"], env=env, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.strip() == f"cancelled execution {eid} (was pending)"
    again = subprocess.run([str(env_bin), "cancel", eid], env=env, capture_output=True, text=True)
    assert again.returncode == 1
    assert again.stdout.strip() == f"not cancelled: execution {eid} is already cancelled"
    bad = subprocess.run([str(env_bin), "cancel", "not-a-uuid"], env=env, capture_output=True, text=True)
    assert bad.returncode == 1 and "invalid input syntax for type uuid" in bad.stderr


# ------------------------------------------------------------------------------------------------
# retry_stage


NOW = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)


def _failed_stage(db: str, attempt: int = 1) -> tuple[str, str]:
    """An execution whose stage 'a' failed on ``attempt``: (execution id, log id)."""
    install(db, "wf", CHAIN, {"a": "A", "b": "B", "c": "C"})
    row, eid = create_execution(db, "wf")
    with connect(db) as conn:
        conn.execute("SELECT lifecycle.execution_ensure(%s, 'run-1', %s)", (row["id"], eid))
        log = conn.execute(
            "SELECT log_id FROM lifecycle.stage_start(%s, 'a', 'a', '{}'::jsonb, %s)", (eid, attempt)
        ).fetchone()
        assert log is not None
        conn.execute("SELECT lifecycle.stage_fail(%s, NULL, 'boom', 'x')", (log["log_id"],))
    return eid, str(log["log_id"])


def test_retry_stage_is_the_only_overload_and_callable_as_before(db: str) -> None:
    assert rows(db, "SELECT count(*) AS n FROM pg_proc WHERE proname = 'retry_stage'") == [{"n": 1}]
    _, log_id = _failed_stage(db)
    with connect(db) as conn:
        conn.execute("SELECT retry_stage(%s)", (log_id,))  # the runbook's call, positional
        conn.execute("UPDATE workflow_execution_logs SET status = 'in_progress' WHERE id = %s", (log_id,))
        conn.execute("SELECT retry_stage(%s, 5)", (log_id,))
    [log] = rows(db, "SELECT attempt_number, status FROM workflow_execution_logs WHERE id = %(l)s", l=log_id)
    assert log == {"attempt_number": 3, "status": "pending"}


def test_retry_stage_sets_not_before_and_keeps_started_at(db: str) -> None:
    eid, log_id = _failed_stage(db)
    [before] = rows(db, "SELECT started_at FROM workflow_execution_logs WHERE id = %(l)s", l=log_id)
    with connect(db) as conn:
        conn.execute("SELECT lifecycle.stage_retry(%s, 3, %s)", (log_id, NOW))
    [log] = rows(
        db,
        "SELECT status, attempt_number, started_at, not_before, completed_at, error_message"
        " FROM workflow_execution_logs WHERE id = %(l)s",
        l=log_id,
    )
    assert (log["status"], log["attempt_number"], log["completed_at"], log["error_message"]) == (
        "pending",
        2,
        None,
        None,
    )
    assert log["started_at"] == before["started_at"]
    # default policy: base 1 s, multiplier 2, full jitter -> a delay in [0, 1] s after attempt 1
    assert NOW <= log["not_before"] <= NOW + timedelta(seconds=1)
    [ex] = rows(db, "SELECT status FROM workflow_executions WHERE id = %(e)s", e=eid)
    assert ex["status"] == "in_progress"  # an explicit retry resumes the failed execution
    retrying = [m for t, _, m in events(db, eid) if t == "stage_retrying"]
    assert len(retrying) == 1
    assert retrying[0]["attempt"] == 2 and 0 <= retrying[0]["delay_s"] <= 1


def test_retry_stage_delay_is_capped_at_huge_attempt_numbers(db: str) -> None:
    _, log_id = _failed_stage(db)
    with connect(db) as conn:
        conn.execute("UPDATE workflow_execution_logs SET attempt_number = 2147483646 WHERE id = %s", (log_id,))
        conn.execute("SELECT lifecycle.stage_retry(%s, 2147483647, %s)", (log_id, NOW))
    [log] = rows(db, "SELECT attempt_number, not_before FROM workflow_execution_logs WHERE id = %(l)s", l=log_id)
    assert log["attempt_number"] == 2147483647
    assert NOW <= log["not_before"] <= NOW + timedelta(seconds=60)


def test_retry_stage_at_the_limit_fails_the_stage_with_an_event(db: str) -> None:
    install(db, "wf", CHAIN, {"a": "A", "b": "B", "c": "C"})
    eid, log_id = _failed_stage_in_progress(db)
    with connect(db) as conn:
        conn.execute("UPDATE workflow_execution_logs SET attempt_number = 3 WHERE id = %s", (log_id,))
        conn.execute("SELECT retry_stage(%s, 3)", (log_id,))
    [log] = rows(db, "SELECT status, attempt_number FROM workflow_execution_logs WHERE id = %(l)s", l=log_id)
    assert log == {"status": "failed", "attempt_number": 3}
    kinds = [(t, m.get("error_code")) for t, _, m in events(db, eid)]
    assert kinds[-2:] == [("stage_failed", "attempts_exhausted"), ("workflow_failed", "attempts_exhausted")]
    [ex] = rows(db, "SELECT status FROM workflow_executions WHERE id = %(e)s", e=eid)
    assert ex["status"] == "failed"


def test_retry_stage_refuses_a_cancelled_execution(db: str) -> None:
    install(db, "wf", CHAIN, {"a": "A", "b": "B", "c": "C"})
    eid, log_id = _failed_stage_in_progress(db)
    _cancel(db, eid)
    with connect(db) as conn, pytest.raises(psycopg.errors.ObjectNotInPrerequisiteState, match="is cancelled; its"):
        conn.execute("SELECT retry_stage(%s)", (log_id,))


def _failed_stage_in_progress(db: str) -> tuple[str, str]:
    row, eid = create_execution(db, "wf")
    with connect(db) as conn:
        conn.execute("SELECT lifecycle.execution_ensure(%s, %s, %s)", (row["id"], f"run-{eid}", eid))
        log = conn.execute("SELECT log_id FROM lifecycle.stage_start(%s, 'a', 'a')", (eid,)).fetchone()
    assert log is not None
    return eid, str(log["log_id"])


def test_retry_stage_refuses_unknown_and_completed(db: str) -> None:
    with connect(db) as conn, pytest.raises(psycopg.errors.NoDataFound, match="retry_stage: unknown stage log"):
        conn.execute("SELECT retry_stage('00000000-0000-0000-0000-000000000001')")
    install(db, "wf", CHAIN, {"a": "A", "b": "B", "c": "C"})
    _, log_id = _failed_stage_in_progress(db)
    with connect(db) as conn:
        conn.execute("SELECT lifecycle.stage_complete(%s, NULL, %s)", (log_id, Jsonb({"summary": "ok"})))
        with pytest.raises(psycopg.errors.ObjectNotInPrerequisiteState, match="is completed and cannot be retried"):
            conn.execute("SELECT retry_stage(%s)", (log_id,))


def test_retry_stage_concurrent_calls_serialise(db: str) -> None:
    """Two operators retry the same failed stage at once: one retry is scheduled, the other is told
    the stage is already waiting to retry (and a repeat afterwards says the same)."""
    eid, log_id = _failed_stage(db)
    barrier = threading.Barrier(2)
    errors: list[BaseException] = []

    def call() -> None:
        try:
            with connect(db) as conn:
                barrier.wait(timeout=10)
                conn.execute("SELECT retry_stage(%s, 10)", (log_id,))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=call) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(errors) == 1 and isinstance(errors[0], psycopg.errors.ObjectNotInPrerequisiteState)
    assert "is already waiting to retry (attempt 3 not before" in str(errors[0])
    [log] = rows(db, "SELECT attempt_number, status FROM workflow_execution_logs WHERE id = %(l)s", l=log_id)
    assert log == {"attempt_number": 2, "status": "pending"}
    assert [m["attempt"] for t, _, m in events(db, eid) if t == "stage_retrying"] == [2]


def test_retry_stage_with_a_huge_policy_waits_at_most_a_year(db: str) -> None:
    dag = {
        "stages": [
            {"id": "a", "capability": "a", "retry": {"base_delay_s": 1e300, "max_delay_s": 1e308, "jitter": "none"}}
        ],
    }
    install(db, "huge", dag, {"a": "A"})
    row, eid = create_execution(db, "huge")
    with connect(db) as conn:
        conn.execute("SELECT lifecycle.execution_ensure(%s, 'run-h', %s)", (row["id"], eid))
        log = conn.execute("SELECT log_id FROM lifecycle.stage_start(%s, 'a', 'a')", (eid,)).fetchone()
        assert log is not None
        conn.execute("SELECT lifecycle.stage_fail(%s, NULL, 'boom', 'x')", (log["log_id"],))
        conn.execute("SELECT lifecycle.stage_retry(%s, 3, %s)", (log["log_id"], NOW))
    [r] = rows(db, "SELECT not_before FROM workflow_execution_logs WHERE execution_id = %(e)s", e=eid)
    assert r["not_before"] == NOW + timedelta(days=365)
