"""What the chaos suite found, pinned down one by one without the chaos (fast, deterministic):

* a queue stage that times out after the reaper took its task back records its retry against the
  attempt the stage is at (it was refused as stale, failing the run);
* a stage served by an http or queue agent has nothing to undo (its undo looked the agent up in the
  code location's registry and failed: compensation_failed).

(A worker's result after its lease expired is refused: tests/test_invariants.py. A run worker killed
before its first op, and a lost database connection: the scenarios of test_chaos.py.)
"""

from __future__ import annotations

import sys
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from psycopg.types.json import Jsonb

from lifecycle_dagster.agents import AgentRegistry
from lifecycle_dagster.core.retry import RetryPolicy
from lifecycle_dagster.engine.stage import StageError, StageRetry, StageSpec, run_stage
from lifecycle_dagster.store.db import connect
from lifecycle_dagster.store.invariants import check

from helpers import create_execution, install, rows

pytestmark = pytest.mark.chaos


def test_a_queue_stage_timing_out_after_its_task_was_reaped_retries(db: str) -> None:
    install(db, "wf", {"stages": [{"id": "a", "capability": "q"}]}, {"q": "Queue Agent"})
    with connect(db) as conn:
        conn.execute("UPDATE agents SET kind = 'queue' WHERE name = 'Queue Agent'")
    row, eid = create_execution(db, "wf")
    spec = StageSpec(
        definition_id=row["id"], stage_id="a", capability="q", policy=RetryPolicy(max_attempts=3), timeout_s=3
    )
    outcome: dict[str, Any] = {}

    def stage() -> None:
        with connect(db) as conn:
            try:
                run_stage(conn, spec, run_id="run-1", attempt=1, registry=AgentRegistry(), execution_id=eid)
            except StageError as exc:
                outcome["error"] = exc

    op = threading.Thread(target=stage)
    op.start()
    try:
        deadline = time.monotonic() + 10
        while not rows(db, "SELECT 1 FROM task_queue WHERE status = 'pending'") and time.monotonic() < deadline:
            time.sleep(0.05)
        with connect(db) as conn:  # a worker claims it and dies: its lease expires, the reaper takes it back
            [claim] = conn.execute("SELECT * FROM lifecycle.task_claim('w1', 'Queue Agent', 1, 0.2)").fetchall()
            assert claim["attempt"] == 1
            later = datetime.now(UTC) + timedelta(seconds=1)
            assert conn.execute("SELECT lifecycle.task_reap(%s) AS n", (later,)).fetchone() == {"n": 1}
    finally:
        op.join(30)
    error = outcome["error"]
    assert isinstance(error, StageRetry), error  # was StageStopped: "attempt 1 is not the current attempt 2"
    assert error.attempt == 2 and error.code == "timeout"
    [log] = rows(db, "SELECT status, attempt_number FROM workflow_execution_logs")
    assert log == {"status": "pending", "attempt_number": 2}


@pytest.mark.parametrize("kind", ["queue", "http"])
def test_stages_of_http_and_queue_agents_have_nothing_to_undo(db: str, instance: Any, kind: str) -> None:
    sys.path.append(str(Path(__file__).resolve().parents[1] / "integration"))  # when run on its own
    from test_compensation import _compensate

    dag = {
        "stages": [{"id": "a", "capability": "remote", "next": ["b"]}, {"id": "b", "capability": "last"}],
        "defaults": {"retry": {"max_attempts": 1, "base_delay_s": 0.01, "max_delay_s": 0.02}},
    }
    install(db, "wf", dag, {"remote": "Remote", "last": "Last"})
    row, eid = create_execution(db, "wf")
    with connect(db) as conn:  # a is done by a queue worker, b fails: compensation is due
        conn.execute("UPDATE agents SET kind = 'queue' WHERE name = 'Remote'")
        conn.execute("SELECT lifecycle.execution_ensure(%s, 'run-0', %s)", (row["id"], eid))
        conn.execute("SELECT * FROM lifecycle.stage_start(%s, 'a', 'remote')", (eid,))
        [claim] = conn.execute("SELECT * FROM lifecycle.task_claim('w1', 'Remote', 1, 30)").fetchall()
        done = conn.execute(
            "SELECT lifecycle.task_complete(%s, %s, %s) AS s",
            (claim["task_id"], claim["lease_token"], Jsonb({"summary": "done remotely"})),
        ).fetchone()
        assert done == {"s": "in_progress"}
        conn.execute("UPDATE agents SET kind = %s WHERE name = 'Remote'", (kind,))
        b = conn.execute(
            "SELECT log_id, task_id FROM lifecycle.stage_start(%s, 'b', 'last', '{\"a\": \"remote\"}')", (eid,)
        ).fetchone()
        assert b is not None
        conn.execute("SELECT lifecycle.stage_fail(%s, %s, 'no', 'bad_request')", (b["log_id"], b["task_id"]))
        conn.execute("SELECT perform_workflow_compensation(%s, 'b failed')", (eid,))
    [comp] = _compensate(db, instance, AgentRegistry())  # no agent registered here: Remote is not python
    assert comp.success
    assert rows(db, "SELECT status FROM workflow_executions") == [{"status": "rolled_back"}]
    [undo] = rows(db, "SELECT metadata FROM workflow_events WHERE event_type = 'stage_compensated'")
    assert undo["metadata"]["summary"] == f"nothing to undo (Remote is a {kind} agent)"
    with connect(db) as conn:
        assert check(conn) == []


def _queue_stage(db: str) -> tuple[str, str]:
    """A manual execution of wf (one stage a, served by a queue agent) and its stage log."""
    install(db, "wf", {"stages": [{"id": "a", "capability": "q"}]}, {"q": "Queue Agent"})
    row, eid = create_execution(db, "wf")
    with connect(db) as conn:
        conn.execute("UPDATE agents SET kind = 'queue' WHERE name = 'Queue Agent'")
        conn.execute("SELECT lifecycle.execution_ensure(%s, 'run-1', %s)", (row["id"], eid))
        started = conn.execute("SELECT log_id FROM lifecycle.stage_start(%s, 'a', 'q')", (eid,)).fetchone()
        assert started is not None
    return eid, str(started["log_id"])


def test_a_restarted_stage_adopts_the_open_task_of_its_attempt(db: str) -> None:
    """Issue 14: the op run again after a lost connection does not start a second attempt (it
    counted one attempt twice and, against a reaped task, failed on task_queue_one_per_stage_attempt):
    it adopts the attempt's task, still held by its worker, whose completion is then accepted."""
    eid, _ = _queue_stage(db)
    with connect(db) as conn:
        [old] = conn.execute("SELECT * FROM lifecycle.task_claim('w1', 'Queue Agent', 1, 30)").fetchall()
        # the stage op runs the stage again (its connection was lost), as Dagster's retry 2
        again = conn.execute(
            "SELECT task_id, attempt_number FROM lifecycle.stage_start(%s, 'a', 'q', '{}', 2, p_resume => true)",
            (eid,),
        ).fetchone()
        assert again == {"task_id": old["task_id"], "attempt_number": 1}
        tasks = conn.execute("SELECT attempt, status FROM task_queue ORDER BY attempt").fetchall()
        assert [(t["attempt"], t["status"]) for t in tasks] == [(1, "in_progress")]
        done = conn.execute(
            "SELECT lifecycle.task_complete(%s, %s, '{}') AS s", (old["task_id"], old["lease_token"])
        ).fetchone()
        assert done == {"s": "completed"}
        later = datetime.now(UTC) + timedelta(seconds=60)
        assert conn.execute("SELECT lifecycle.task_reap(%s) AS n", (later,)).fetchone() == {"n": 0}


def test_the_reaper_cancels_a_superseded_task_instead_of_failing(db: str) -> None:
    """Before 0013 the reaper moved such a task onto an attempt another task held: a unique violation
    that failed every reap (and with it the reconciler's tick and every worker's claim loop)."""
    eid, log_id = _queue_stage(db)
    with connect(db) as conn:  # an attempt-1 task still held by a worker, beside the attempt-2 task
        conn.execute("UPDATE workflow_execution_logs SET attempt_number = 2 WHERE id = %s", (log_id,))
        conn.execute("UPDATE task_queue SET attempt = 2")
        conn.execute(
            "INSERT INTO task_queue (workflow_execution_id, task_type, capability, stage_log_id, attempt, status,"
            " claimed_by, lease_token, lease_expires_at, started_at) VALUES (%s, 'a', 'q', %s, 1, 'in_progress',"
            " 'w1', 1, now() - interval '1 s', now() - interval '5 s')",
            (eid, log_id),
        )
        assert conn.execute("SELECT lifecycle.task_reap() AS n").fetchone() == {"n": 1}
        tasks = conn.execute("SELECT attempt, status, error_message FROM task_queue ORDER BY attempt").fetchall()
        assert [(t["attempt"], t["status"]) for t in tasks] == [(1, "cancelled"), (2, "pending")]
        assert "superseded" in tasks[0]["error_message"]
        [reaped] = conn.execute("SELECT metadata FROM workflow_events WHERE event_type = 'task_reaped'").fetchall()
        assert reaped["metadata"]["superseded"] is True and reaped["metadata"]["requeued"] is False


def test_a_side_effect_after_its_attempt_was_taken_back_is_a_violation(
    db: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The rule that replaced ``completed_after_lease`` (which re-checked what task_complete refuses)
    can fire: a worker whose task the reaper took back and whose agent still does its side effect
    (a zombie: fencing refused its result but did not stop its work) is reported; an effect done
    before the attempt ended, or within the grace a worker needs to learn of it, is not."""
    from chaos_agents import record_effect
    from chaos_world import EFFECT_GRACE_S, EFFECTS_TABLE, effects_after_attempt

    eid, _ = _queue_stage(db)
    monkeypatch.setenv("DATABASE_URL", db)
    with connect(db) as conn:
        conn.execute(EFFECTS_TABLE)
        # the worker claimed attempt 1 ten seconds ago on a 1 s lease; the reaper took it back 5 s ago
        [claim] = conn.execute(
            "SELECT * FROM lifecycle.task_claim('w1', 'Queue Agent', 1, 1, now() - interval '10 s')"
        ).fetchall()
        reaped = conn.execute("SELECT lifecycle.task_reap(now() - interval '5 s') AS n").fetchone()
        assert claim["attempt"] == 1 and reaped == {"n": 1}
        conn.execute(  # an effect done in time
            "INSERT INTO chaos_effects (execution_id, stage_id, attempt, agent, pid, at)"
            " VALUES (%s, 'a', 1, 'w1', 1, now() - interval '9 s')",
            (eid,),
        )
        assert effects_after_attempt(conn) == []
        record_effect(eid, "a", 1, "Queue Agent")  # the zombie's effect, now: 5 s after its attempt ended
        record_effect(eid, "a", 2, "Queue Agent")  # attempt 2's own effect
        [v] = effects_after_attempt(conn)
        assert (v.rule, v.execution_id, v.stage_id) == ("effect_after_attempt", eid, "a")
        assert "attempt 1" in v.message and "(task_reaped)" in v.message
        assert effects_after_attempt(conn, grace_s=EFFECT_GRACE_S + 10) == []


def test_quiesce_fails_when_no_check_could_run(server_dsn: str, tmp_path: Path) -> None:
    """Every check losing its connection used to end quiesce with no findings, and the scenario passed."""
    from chaos_world import World

    world = World(server_dsn, tmp_path, template=None)  # its database was never created: every connect fails
    took, [v] = world.quiesce(2.5)
    assert took is None and v.rule == "not_checked"
    assert "no invariant check completed in 2 s" in v.message and "OperationalError" in v.message


def test_a_batch_member_waiting_for_its_resume_run_is_not_failed_as_lost(db: str, instance: Any) -> None:
    """Found by the batch_runs scenario of test_chaos.py, fixed since (the reconciler waits for a
    queued or starting run tagged with the execution: location/sensors.py _run_waits_for). A member
    that left its batch to retry (attempts left) is resumed alone by a run the resume sensor
    launches. Until that run's first op takes it over, nothing beats for it: the batch run's
    heartbeat stops with the run, and the resume run may wait in Dagster's run queue
    (``max_concurrent_runs``). The reconciler's stale check (``lifecycle.executions_stale``) used to
    fail it as lost once the heartbeat timeout had passed ("no heartbeat from Dagster run <batch
    run>") and roll it back, though nothing was lost; its resume run then stopped on a
    ``compensating`` execution. Here: the resume run is queued, the reconciler ticks after a
    heartbeat timeout of 1 s; the member must still wait for its resume run, and complete when that
    run executes (before the fix the member was ``compensating`` at the first assertion)."""
    import dagster as dg

    sys.path.append(str(Path(__file__).resolve().parents[1] / "integration"))  # when run on its own
    from test_batches import AGENTS, DAG, _resources, _run_batched

    from lifecycle_dagster.location.job_factory import EXECUTION_ID_TAG, build_job
    from lifecycle_dagster.location.sensors import reconcile, resume_requests

    install(db, "wf", DAG, AGENTS)
    res, _batch, ids = _run_batched(db, instance, [{"n": 0}, {"n": 1, "script": {"d": "flaky"}}])
    assert res.success
    member = ids[1]
    [left] = rows(db, "SELECT left_reason FROM lifecycle.batch_members WHERE execution_id = %(e)s", e=member)
    assert left == {"left_reason": "retry"}
    row = rows(db, "SELECT id::text AS id, name, version, description, dag_schema FROM workflow_definitions")[0]
    job = build_job(row)
    [req] = [r for r in resume_requests(instance, [job.name], db) if isinstance(r, dg.RunRequest)]
    assert req.tags[EXECUTION_ID_TAG] == member
    # the sensor's run, not started yet (queued behind other runs: a queued run needs the code
    # location's origin, so here it is created NOT_STARTED)
    queued = instance.create_run_for_job(job, tags=dict(req.tags))

    time.sleep(1.5)  # the resume run waits in the queue past the heartbeat timeout
    list(reconcile(instance, [], db, timeout_s=1.0))
    [e] = rows(db, "SELECT status, error_message FROM workflow_executions WHERE id = %(e)s", e=member)
    # before the fix: {'status': 'compensating', 'error_message': 'no heartbeat from Dagster run <batch run> ...'}
    assert e == {"status": "in_progress", "error_message": None}, f"resume run {queued.run_id} still queued"

    again = job.execute_in_process(instance=instance, tags=dict(req.tags), raise_on_error=False, resources=_resources())
    assert again.success
    assert rows(db, "SELECT status FROM workflow_executions WHERE id = %(e)s", e=member) == [{"status": "completed"}]
