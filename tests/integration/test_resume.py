"""A stage set back to pending after its run ended is dispatched again (resume sensor), and a
re-execution of a failed run resumes its execution: completed stages are not run again."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import dagster as dg
from psycopg.types.json import Jsonb

from lifecycle_dagster.agents import AgentBadRequest, AgentRegistry, Task
from lifecycle_dagster.location.definitions import definitions_from_snapshot, fetch_snapshot
from lifecycle_dagster.location.job_factory import (
    EXECUTION_ID_TAG,
    PARENT_RUN_TAG,
    RESUME_TAG,
    ROOT_RUN_TAG,
    build_job,
)
from lifecycle_dagster.location.resources import agents_resource
from lifecycle_dagster.location.sensors import resume_requests
from lifecycle_dagster.store.db import connect

from helpers import create_execution, events, install, rows, run

CHAIN = {
    "stages": [
        {"id": "a", "capability": "a", "next": ["b"]},
        {"id": "b", "capability": "b", "next": ["c"]},
        {"id": "c", "capability": "c"},
    ],
    "defaults": {"retry": {"max_attempts": 1}},
}


class Counting:
    def __init__(self, name: str, fail_times: int = 0) -> None:
        self.name = name
        self.calls: list[int] = []
        self.fail_times = fail_times

    def run(self, task: Task) -> dict[str, Any]:
        self.calls.append(task.attempt)
        if len(self.calls) <= self.fail_times:
            raise AgentBadRequest("upstream system said no")
        return {"summary": f"{task.stage_id} ok", "attempt": task.attempt}


def _failed_at_b(db: str, instance: Any) -> tuple[str, dict[str, Counting], Any]:
    install(db, "wf", CHAIN, {"a": "A", "b": "B", "c": "C"})
    agents = {"A": Counting("A"), "B": Counting("B", fail_times=1), "C": Counting("C")}
    registry = AgentRegistry(agents.values())
    result, eid = run(db, instance, "wf", registry)
    assert not result.success
    assert rows(db, "SELECT status FROM workflow_executions WHERE id = %(e)s", e=eid) == [{"status": "failed"}]
    return eid, agents, result


def _log_id(db: str, eid: str, stage: str) -> str:
    [r] = rows(
        db,
        "SELECT id::text AS id FROM workflow_execution_logs WHERE execution_id = %(e)s AND stage_id = %(s)s",
        e=eid,
        s=stage,
    )
    return str(r["id"])


def test_retry_stage_then_resume_sensor_finishes_the_execution(db: str, instance: Any) -> None:
    eid, agents, first = _failed_at_b(db, instance)
    past = datetime.now(UTC) - timedelta(minutes=5)
    with connect(db) as conn:  # the operator retries b (the runbook's call); its delay has passed
        conn.execute("SELECT lifecycle.stage_retry(%s, 3, %s)", (_log_id(db, eid, "b"), past))

    defs = definitions_from_snapshot(fetch_snapshot(db))
    repo = defs.get_repository_def()
    sensor = repo.get_sensor_def("lifecycle_resume_sensor")
    data = sensor.evaluate_tick(dg.build_sensor_context(instance=instance, repository_def=repo))
    assert [(r.run_key, r.job_name, r.tags[EXECUTION_ID_TAG], r.tags[RESUME_TAG]) for r in data.run_requests] == [
        (f"resume:{eid}:b:2", "wf__v1", eid, "b")
    ]

    [request] = data.run_requests
    job = build_job(
        rows(db, "SELECT id::text AS id, name, version, description, dag_schema FROM workflow_definitions")[0]
    )
    second = job.execute_in_process(
        instance=instance,
        tags=dict(request.tags),
        raise_on_error=False,
        resources={"lifecycle_agents": agents_resource(AgentRegistry(agents.values()))},
    )
    assert second.success
    assert agents["A"].calls == [1]  # a completed in the first run: not run again
    assert agents["B"].calls == [1, 2]
    assert agents["C"].calls == [1]
    logs = {
        r["stage_id"]: (r["status"], r["attempt_number"])
        for r in rows(
            db, "SELECT stage_id, status, attempt_number FROM workflow_execution_logs WHERE execution_id = %(e)s", e=eid
        )
    }
    assert logs == {"a": ("completed", 1), "b": ("completed", 2), "c": ("completed", 1)}
    [ex] = rows(db, "SELECT status, dagster_run_id FROM workflow_executions WHERE id = %(e)s", e=eid)
    assert ex == {"status": "completed", "dagster_run_id": second.run_id}
    kinds = [t for t, _, _ in events(db, eid)]
    assert kinds.count("workflow_resumed") == 1
    assert kinds[-1] == "workflow_completed"
    resumed = next(m for t, _, m in events(db, eid) if t == "workflow_resumed")
    assert resumed == {"dagster_run_id": second.run_id, "previous_dagster_run_id": first.run_id}
    # nothing left to resume
    assert list(resume_requests(instance, ["wf__v1"], db)) == []


def test_resume_waits_for_not_before_and_for_a_running_run(db: str, instance: Any) -> None:
    eid, _, _ = _failed_at_b(db, instance)
    future = datetime.now(UTC) + timedelta(hours=1)
    with connect(db) as conn:
        conn.execute("SELECT lifecycle.stage_retry(%s, 3, %s)", (_log_id(db, eid, "b"), future))
    assert list(resume_requests(instance, ["wf__v1"], db)) == []  # not before its time
    later = future + timedelta(minutes=2)
    [req] = list(resume_requests(instance, ["wf__v1"], db, now=later))
    assert isinstance(req, dg.RunRequest)
    skipped = list(resume_requests(instance, ["other__v1"], db, now=later))
    assert len(skipped) == 1 and isinstance(skipped[0], dg.SkipReason)
    assert "job wf__v1 is not loaded" in (skipped[0].skip_message or "")


def test_reexecution_of_a_failed_run_resumes_its_execution(db: str, instance: Any) -> None:
    """Dagster's re-execution carries dagster/parent_run_id: the failed stage gets its next attempt."""
    eid, agents, first = _failed_at_b(db, instance)
    job = build_job(
        rows(db, "SELECT id::text AS id, name, version, description, dag_schema FROM workflow_definitions")[0]
    )
    second = job.execute_in_process(
        instance=instance,
        tags={EXECUTION_ID_TAG: eid, PARENT_RUN_TAG: first.run_id},
        raise_on_error=False,
        resources={"lifecycle_agents": agents_resource(AgentRegistry(agents.values()))},
    )
    assert second.success
    assert agents["A"].calls == [1] and agents["B"].calls == [1, 2]
    assert rows(db, "SELECT status FROM workflow_executions WHERE id = %(e)s", e=eid) == [{"status": "completed"}]


def test_a_second_run_without_resume_is_refused(db: str, instance: Any) -> None:
    eid, agents, _ = _failed_at_b(db, instance)
    job = build_job(
        rows(db, "SELECT id::text AS id, name, version, description, dag_schema FROM workflow_definitions")[0]
    )
    again = job.execute_in_process(
        instance=instance,
        tags={EXECUTION_ID_TAG: eid},
        raise_on_error=False,
        resources={"lifecycle_agents": agents_resource(AgentRegistry(agents.values()))},
    )
    assert not again.success
    failure = next(e for e in again.all_events if e.event_type_value == "STEP_FAILURE")
    assert "is already bound to Dagster run" in failure.event_specific_data.error.message
    assert failure.event_specific_data.user_failure_data.metadata["error_code"].value == "not_runnable"
    assert agents["A"].calls == [1]


def test_a_run_adopts_an_execution_driven_by_hand(seeded_db: str, instance: Any) -> None:
    """The runbook's section 8: an in_progress execution whose first stage was completed by hand.
    A run that adopts it skips that stage and runs the rest."""
    from lifecycle_dagster.agents import default_registry

    context = json.loads((Path(__file__).resolve().parents[2] / "examples/acme.json").read_text())
    with connect(seeded_db) as conn:
        row = conn.execute(
            "SELECT id::text AS id, name, version, description, dag_schema FROM workflow_definitions"
        ).fetchone()
        assert row is not None
        eid = conn.execute(
            "INSERT INTO workflow_executions (workflow_definition_id, status, current_stage, context)"
            " VALUES (%s, 'in_progress', 'discover', %s) RETURNING id::text AS id",
            (row["id"], Jsonb(context)),
        ).fetchone()["id"]  # type: ignore[index]
        discover = default_registry().get("Opportunity Agent").run(Task(eid, "discover", "opportunity", 1, context, {}))
        conn.execute(
            "INSERT INTO workflow_execution_logs (execution_id, stage_id, status, started_at, completed_at,"
            " attempt_number, output_data) VALUES (%s, 'discover', 'completed', now(), now(), 1, %s)",
            (eid, Jsonb(discover)),
        )
        conn.execute("UPDATE workflow_executions SET current_stage = 'qualify' WHERE id = %s", (eid,))
    result = build_job(dict(row)).execute_in_process(instance=instance, tags={EXECUTION_ID_TAG: eid})
    assert result.success
    logs = {
        r["stage_id"]: r["status"]
        for r in rows(
            seeded_db, "SELECT stage_id, status FROM workflow_execution_logs WHERE execution_id = %(e)s", e=eid
        )
    }
    assert set(logs.values()) == {"completed"} and len(logs) == 5
    assert rows(seeded_db, "SELECT count(*) AS n FROM task_queue WHERE task_type = 'discover'") == [{"n": 0}]
    assert rows(seeded_db, "SELECT status FROM workflow_executions") == [{"status": "completed"}]


def test_a_run_launched_without_the_tag_gets_it_and_its_reexecution_resumes(db: str, instance: Any) -> None:
    """A run started with only a context (the Launchpad, GraphQL, `dagster job execute`) is tagged
    with the execution it created; a re-execution carrying only Dagster's parent/root run tags
    (a parent that was never tagged, or tags not copied) finds that execution in Postgres."""
    install(db, "wf", CHAIN, {"a": "A", "b": "B", "c": "C"})
    agents = {"A": Counting("A"), "B": Counting("B", fail_times=1), "C": Counting("C")}
    resources = {"lifecycle_agents": agents_resource(AgentRegistry(agents.values()))}
    job = build_job(
        rows(db, "SELECT id::text AS id, name, version, description, dag_schema FROM workflow_definitions")[0]
    )
    config = {"resources": {"lifecycle_request": {"config": {"context": {"customer": "ACME"}}}}}
    first = job.execute_in_process(instance=instance, run_config=config, raise_on_error=False, resources=resources)
    assert not first.success
    [ex] = rows(db, "SELECT id::text AS id, dagster_run_id FROM workflow_executions")
    assert ex["dagster_run_id"] == first.run_id
    stored = instance.get_run_by_id(first.run_id)
    assert stored.tags[EXECUTION_ID_TAG] == ex["id"]
    assert [r.run_id for r in instance.get_runs(dg.RunsFilter(tags={EXECUTION_ID_TAG: ex["id"]}))] == [first.run_id]
    # step keys are the stage ids
    assert first.get_failed_step_keys() == {"b"}

    second = job.execute_in_process(
        instance=instance,
        tags={PARENT_RUN_TAG: first.run_id, ROOT_RUN_TAG: first.run_id},
        raise_on_error=False,
        resources=resources,
    )
    assert second.success
    assert agents["A"].calls == [1] and agents["B"].calls == [1, 2] and agents["C"].calls == [1]
    done = rows(db, "SELECT id::text AS id, status FROM workflow_executions")
    assert done == [{"id": ex["id"], "status": "completed"}]
    assert instance.get_run_by_id(second.run_id).tags[EXECUTION_ID_TAG] == ex["id"]


def test_a_declared_context_is_required_when_a_run_creates_its_execution(db: str, instance: Any) -> None:
    """A DAG declaring ``context``: its job's default run config is the example; a run config
    giving an empty context is refused at launch naming the key; a run given no
    lifecycle_request config at all (the example would run by accident) or a context file lacking
    a key is refused by its first op, and creates no execution; a run adopting an execution by
    its tag needs no context."""
    declared = {**CHAIN, "context": {"required": ["customer"], "example": {"customer": "ACME", "n": 1}}}
    install(db, "wf", declared, {"a": "A", "b": "B", "c": "C"})
    registry = AgentRegistry([Counting("A"), Counting("B"), Counting("C")])
    resources = {"lifecycle_agents": agents_resource(registry)}
    job = build_job(
        rows(db, "SELECT id::text AS id, name, version, description, dag_schema FROM workflow_definitions")[0]
    )
    assert job.run_config == {"resources": {"lifecycle_request": {"config": {"context": {"customer": "ACME", "n": 1}}}}}
    empty = {"resources": {"lifecycle_request": {"config": {"context": {}}}}}
    try:
        job.execute_in_process(instance=instance, run_config=empty, resources=resources)
        raise AssertionError("an empty context was accepted")
    except dg.DagsterInvalidConfigError as exc:
        assert 'Missing required config entry "customer"' in str(exc)
    nothing = job.execute_in_process(instance=instance, raise_on_error=False, resources=resources)
    assert not nothing.success
    [failure] = nothing.get_step_failure_events()
    assert "its context lacks customer: set resources.lifecycle_request.config.context" in str(
        failure.event_specific_data.error.message  # type: ignore[union-attr]
    )
    assert rows(db, "SELECT count(*) AS n FROM workflow_executions") == [{"n": 0}]
    _, eid = create_execution(db, "wf", {"customer": "Globex"})
    adopted = job.execute_in_process(
        instance=instance, tags={EXECUTION_ID_TAG: eid}, raise_on_error=False, resources=resources
    )
    assert adopted.success
    assert rows(db, "SELECT status, context FROM workflow_executions") == [
        {"status": "completed", "context": {"customer": "Globex"}}
    ]
