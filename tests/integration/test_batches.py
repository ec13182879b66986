"""Batch runs (docs/batches.md) in process on a real database and a real Dagster instance: one run
carries many executions, each stage op handles them all, one execution's failure never touches the
others, and every row is what one run per execution writes (the same contexts run both ways)."""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

import dagster as dg
import psycopg
import pytest

from lifecycle_dagster.agents import AgentError, AgentRegistry, RetryableAgentError, Task
from lifecycle_dagster.location.job_factory import BATCH_TAG, EXECUTION_ID_TAG, build_compensation_job, build_job
from lifecycle_dagster.location.resources import agents_resource
from lifecycle_dagster.location.sensors import mirror_run_failure, reconcile, resume_requests
from lifecycle_dagster.store import invariants
from lifecycle_dagster.store.audit import verify
from lifecycle_dagster.store.db import connect
from lifecycle_dagster.store.sqlfiles import query
from lifecycle_dagster.store.transitions import batch_form

from helpers import create_execution, install, rows

FAST = {"max_attempts": 3, "base_delay_s": 0.05, "max_delay_s": 0.1, "multiplier": 2, "jitter": "none"}

#: a: branches on `go`; b or c; d joins; e last. Every stage's agent does what the execution's
#: context says for that stage (ScriptAgent).
DAG: dict[str, Any] = {
    "defaults": {"retry": FAST},
    "stages": [
        {
            "id": "a",
            "capability": "a",
            "next": [{"to": "b", "when": {"output": {"go": True}}}, {"to": "c", "unless": {"output": {"go": True}}}],
        },
        {"id": "b", "capability": "b", "next": ["d"]},
        {"id": "c", "capability": "c", "next": ["d"]},
        {"id": "d", "capability": "d", "next": ["e"]},
        {"id": "e", "capability": "e"},
    ],
}
AGENTS = {s: s.upper() for s in "abcde"}


class ScriptAgent:
    """Does what ``context.script[stage]`` says: ``fail`` (non-retryable), ``flaky`` (retryable on
    attempt 1), ``end`` (ends the execution early), ``nogo`` (a: the other branch), else succeeds."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.calls = 0

    def run(self, task: Task) -> dict[str, Any]:
        self.calls += 1
        what = dict(task.context.get("script") or {}).get(task.stage_id, "ok")
        if what == "fail":
            raise AgentError("integrity", f"{task.stage_id}: bad data for {task.context['n']}")
        if what == "flaky" and task.attempt == 1:
            raise RetryableAgentError("overloaded", f"{task.stage_id}: busy")
        if what == "end":
            return {"summary": "nothing to do", "end": {"outcome": "not_qualified", "reason": "no fit"}}
        out: dict[str, Any] = {"summary": f"{task.stage_id} for {task.context['n']}", "n": task.context["n"]}
        if task.stage_id == "a":
            out["go"] = what != "nogo"
        return out


def _registry() -> AgentRegistry:
    return AgentRegistry([ScriptAgent(n) for n in AGENTS.values()])


def _resources() -> dict[str, Any]:
    return {"lifecycle_agents": agents_resource(_registry())}


#: the contexts run both ways: plain, the other branch, an early end, a failure (compensated),
#: a late failure, a retried stage
CONTEXTS = [
    {"n": 0},
    {"n": 1, "script": {"a": "nogo"}},
    {"n": 2, "script": {"b": "end"}},
    {"n": 3, "script": {"b": "fail"}},
    {"n": 4, "script": {"a": "nogo", "e": "fail"}},
    {"n": 5, "script": {"d": "flaky"}},
    {"n": 6},
    {"n": 7, "script": {"c": "end", "a": "nogo"}},
]


def _pending(db: str, contexts: list[dict[str, Any]]) -> tuple[dict[str, Any], list[str]]:
    ids = []
    row: dict[str, Any] = {}
    for ctx in contexts:
        row, eid = create_execution(db, "wf", ctx)
        ids.append(eid)
    return row, ids


def _compensate_all(db: str, instance: Any, row: dict[str, Any]) -> None:
    """Run the compensation job of every compensating execution (what the reconciler launches)."""
    job = build_compensation_job(row)
    for r in rows(db, "SELECT id::text AS id FROM workflow_executions WHERE status = 'compensating' ORDER BY id"):
        res = job.execute_in_process(
            instance=instance, tags={EXECUTION_ID_TAG: r["id"]}, raise_on_error=False, resources=_resources()
        )
        assert res.success


def _run_one_by_one(db: str, instance: Any) -> None:
    row, ids = _pending(db, CONTEXTS)
    job = build_job(row)
    for eid in ids:
        res = job.execute_in_process(
            instance=instance, tags={EXECUTION_ID_TAG: eid}, raise_on_error=False, resources=_resources()
        )
        if not res.success:  # what the failure sensor does
            with connect(db) as conn:
                mirror_run_failure(conn, res.run_id, eid, f"Dagster run {res.run_id} failed")
    _compensate_all(db, instance, row)


def _run_resumes(db: str, instance: Any, job: dg.JobDefinition) -> int:
    """Launch what the resume sensor asks for, in process, until it asks for nothing; how many."""
    launched = 0
    for _ in range(20):
        reqs = [r for r in resume_requests(instance, [job.name], db) if isinstance(r, dg.RunRequest)]
        if not reqs:
            pending = rows(db, "SELECT count(*) AS n FROM workflow_execution_logs WHERE status = 'pending'")[0]["n"]
            if not pending:
                return launched
            time.sleep(0.1)
            continue
        for req in reqs:
            res = job.execute_in_process(
                instance=instance, tags=dict(req.tags), raise_on_error=False, resources=_resources()
            )
            assert res.success, req.tags
            launched += 1
    raise AssertionError("the resume sensor kept asking")


def _run_batched(db: str, instance: Any, contexts: list[dict[str, Any]] = CONTEXTS) -> tuple[Any, str, list[str]]:
    row, ids = _pending(db, contexts)
    with connect(db) as conn:
        formed = batch_form(conn, definition_id=row["id"], max_executions=len(ids), max_wait_s=0)
    assert formed is not None and formed.size == len(ids)
    job = build_job(row)
    res = job.execute_in_process(
        instance=instance, tags={BATCH_TAG: formed.id}, raise_on_error=False, resources=_resources()
    )
    return res, formed.id, ids


_DROP = {
    "not_before",
    "task_id",
    "dagster_run_id",
    "previous_dagster_run_id",
    "duration_ms",
    "log_id",
    "run_id",
    "execution_id",
}


def _clean(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in sorted(value.items()) if k not in _DROP}
    if isinstance(value, list):
        return [_clean(v) for v in value]
    return value


def _truth(db: str) -> dict[int, dict[str, Any]]:
    """Everything the database says of each execution, by its context's ``n``, ids and times aside."""
    out: dict[int, dict[str, Any]] = {}
    for e in rows(db, "SELECT * FROM workflow_executions ORDER BY (context->>'n')::int"):
        n = int(e["context"]["n"])
        eid = e["id"]
        logs = rows(
            db,
            "SELECT stage_id, status, attempt_number, input_data, output_data, error_message"
            " FROM workflow_execution_logs WHERE execution_id = %(e)s ORDER BY stage_id",
            e=eid,
        )
        events = rows(
            db,
            "SELECT event_type, stage_id, metadata FROM workflow_events WHERE execution_id = %(e)s"
            " AND event_type <> 'workflow_resumed' ORDER BY id",
            e=eid,
        )
        tasks = rows(
            db,
            "SELECT t.task_type, t.capability, t.status, t.attempt, t.input_data, t.output_data, t.error_message,"
            " a.name AS agent FROM task_queue t LEFT JOIN agents a ON a.id = t.agent_id"
            " WHERE t.workflow_execution_id = %(e)s ORDER BY t.task_type, t.attempt",
            e=eid,
        )
        outcomes = rows(
            db,
            "SELECT o.scope, coalesce(a.name, o.key) AS name, o.success, o.error_code"
            " FROM lifecycle.breaker_outcomes o LEFT JOIN agents a ON o.scope = 'agent' AND a.id::text = o.key"
            " WHERE o.task_id IN (SELECT id FROM task_queue WHERE workflow_execution_id = %(e)s)"
            " ORDER BY 1, 2, 3, 4",
            e=eid,
        )
        out[n] = _clean(
            {
                "execution": {
                    k: e[k]
                    for k in ("status", "outcome", "outcome_reason", "error_message", "current_stage", "context")
                },
                "logs": logs,
                "events": [dict(ev, metadata=_clean(ev["metadata"])) for ev in events],
                "tasks": tasks,
                "breaker_outcomes": outcomes,
            }
        )
    return out


@pytest.mark.parametrize("chunk", [50, 4])
def test_a_batch_run_carries_every_execution_to_its_end(
    db: str, instance: Any, chunk: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """25 executions in one run, bound and run in one chunk, or in chunks of 4 (7 statements a stage)."""
    monkeypatch.setattr("lifecycle_dagster.engine.batch.CHUNK", chunk)
    install(db, "wf", DAG, AGENTS)
    contexts = [{"n": i} for i in range(25)]
    res, batch_id, _ids = _run_batched(db, instance, contexts)

    assert res.success
    done = rows(db, "SELECT status, dagster_run_id FROM workflow_executions")
    assert Counter(r["status"] for r in done) == {"completed": 25}
    assert {r["dagster_run_id"] for r in done} == {res.run_id}  # every row bound to the one run
    [batch] = rows(db, "SELECT size, run_id FROM lifecycle.batches WHERE id = %(b)s", b=batch_id)
    assert batch == {"size": 25, "run_id": res.run_id}
    assert rows(db, "SELECT count(*) AS n FROM lifecycle.batch_members WHERE left_at IS NOT NULL")[0]["n"] == 0
    # the branch not taken by any member: Dagster skipped its op
    assert {e.step_key for e in res.all_events if e.event_type_value == "STEP_SKIPPED"} == {"c"}
    with connect(db) as conn:
        assert invariants.check(conn) == []


def test_a_batch_writes_what_one_run_per_execution_writes(
    new_db: Any, template_db: str, instance: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    single, batched = new_db(template_db), new_db(template_db)
    for db in (single, batched):
        install(db, "wf", DAG, AGENTS)

    monkeypatch.setenv("DATABASE_URL", single)
    _run_one_by_one(single, instance)

    monkeypatch.setenv("DATABASE_URL", batched)
    res, _batch_id, _ids = _run_batched(batched, instance)
    assert res.success  # no member's failure fails the batch run
    left = rows(
        batched, "SELECT left_reason, count(*) AS n FROM lifecycle.batch_members WHERE left_at IS NOT NULL GROUP BY 1"
    )
    assert {r["left_reason"]: r["n"] for r in left} == {"failed": 2, "retry": 1}
    row = rows(batched, "SELECT id::text AS id, name, version, description, dag_schema FROM workflow_definitions")[0]
    job = build_job(row)
    assert _run_resumes(batched, instance, job) == 1  # the retried member, resumed alone
    _compensate_all(batched, instance, row)

    one, many = _truth(single), _truth(batched)
    assert sorted(one) == sorted(many) == list(range(len(CONTEXTS)))
    for n in one:
        for part in one[n]:
            assert many[n][part] == one[n][part], f"execution n={n}: {part} differ:\n{one[n][part]}\n{many[n][part]}"
    statuses = Counter(v["execution"]["status"] for v in many.values())
    assert statuses == {"completed": 6, "rolled_back": 2}
    resumed = rows(batched, "SELECT count(*) AS n FROM workflow_events WHERE event_type = 'workflow_resumed'")
    assert resumed[0]["n"] == 1
    for db in (single, batched):
        with connect(db) as conn:
            assert invariants.check(conn) == []
            assert verify(conn).ok


def test_a_cancel_mid_batch_stops_only_that_execution(db: str, instance: Any) -> None:
    """An execution cancelled while its batch runs leaves the batch at its next stage; the rest
    complete, the run succeeds."""
    install(db, "wf", DAG, AGENTS)
    row, ids = _pending(db, [{"n": i} for i in range(6)])
    with connect(db) as conn:
        formed = batch_form(conn, definition_id=row["id"], max_executions=6, max_wait_s=0)
    assert formed is not None

    victim = ids[2]

    class Canceller(ScriptAgent):
        def run(self, task: Task) -> dict[str, Any]:
            if task.stage_id == "a" and task.execution_id == ids[0]:
                with connect(db) as c:
                    c.execute(
                        query("cancel_execution"), {"execution_id": victim, "reason": "by test", "compensate": True}
                    )
            return super().run(task)

    registry = AgentRegistry([Canceller("A"), *(ScriptAgent(n) for n in "BCDE")])
    res = build_job(row).execute_in_process(
        instance=instance,
        tags={BATCH_TAG: formed.id},
        raise_on_error=False,
        resources={"lifecycle_agents": agents_resource(registry)},
    )
    assert res.success
    status = {r["id"]: r["status"] for r in rows(db, "SELECT id::text AS id, status FROM workflow_executions")}
    assert status.pop(victim) in ("cancelled", "compensating", "rolled_back")
    assert set(status.values()) == {"completed"}
    [m] = rows(db, "SELECT left_reason FROM lifecycle.batch_members WHERE execution_id = %(e)s", e=victim)
    assert m["left_reason"] == "stopped"


def test_a_batch_bound_to_one_run_refuses_another(db: str, instance: Any) -> None:
    install(db, "wf", DAG, AGENTS)
    res, batch_id, _ids = _run_batched(db, instance, [{"n": 1}])
    assert res.success
    row = rows(db, "SELECT id::text AS id, name, version, description, dag_schema FROM workflow_definitions")[0]
    again = build_job(row).execute_in_process(
        instance=instance, tags={BATCH_TAG: batch_id}, raise_on_error=False, resources=_resources()
    )
    assert not again.success
    failure = next(e for e in again.all_events if e.event_type_value == "STEP_FAILURE")
    assert "already bound to Dagster run" in str(failure.event_specific_data.error.message)  # type: ignore[union-attr]


def test_batch_form_waits_to_fill_then_takes_the_oldest(db: str) -> None:
    install(db, "wf", DAG, AGENTS)
    row, ids = _pending(db, [{"n": i} for i in range(5)])
    with connect(db) as conn:
        assert batch_form(conn, definition_id=row["id"], max_executions=10, max_wait_s=3600) is None  # not full
        full = batch_form(conn, definition_id=row["id"], max_executions=3, max_wait_s=3600)
        rest = batch_form(conn, definition_id=row["id"], max_executions=10, max_wait_s=0)  # waited long enough
        none = batch_form(conn, definition_id=row["id"], max_executions=10, max_wait_s=0)
        with pytest.raises(psycopg.errors.InvalidParameterValue, match="max_executions"):
            batch_form(conn, definition_id=row["id"], max_executions=0, max_wait_s=0)
    assert full is not None and full.size == 3 and rest is not None and rest.size == 2 and none is None
    members = rows(db, "SELECT batch_id::text AS b, execution_id::text AS e FROM lifecycle.batch_members")
    assert sorted(m["e"] for m in members if m["b"] == full.id) == sorted(ids[:3])


SIGN_OFF = {
    "stages": [
        {"id": "a", "capability": "a", "next": ["sign_off"]},
        {
            "id": "sign_off",
            "kind": "approval",
            "approvers": ["role:finance_approver"],
            "timeout_s": 3600,
            "on_timeout": "reject",
            "next": [{"to": "e", "when": {"output": {"decision": "approve"}}}],
        },
        {"id": "e", "capability": "e"},
    ]
}


def test_members_wait_at_an_approval_and_each_is_continued_alone(db: str, instance: Any) -> None:
    install(db, "wf", SIGN_OFF, {"a": "A", "e": "E"})
    res, _batch_id, ids = _run_batched(db, instance, [{"n": i} for i in range(3)])
    assert res.success
    assert {r["status"] for r in rows(db, "SELECT status FROM workflow_executions")} == {"waiting"}
    with connect(db) as conn:
        decided = conn.execute(
            "SELECT lifecycle.approval_decide(%s, 'sign_off', 'approve', p_actor => 'cli:ops', p_operator => true)"
            " AS s",
            (ids[1],),
        ).fetchone()
    assert decided is not None and decided["s"] == "continuing"
    row = rows(db, "SELECT id::text AS id, name, version, description, dag_schema FROM workflow_definitions")[0]
    job = build_job(row)
    reqs = [r for r in resume_requests(instance, [job.name], db) if isinstance(r, dg.RunRequest)]
    assert [r.tags[EXECUTION_ID_TAG] for r in reqs] == [ids[1]]  # only the decided one, alone
    cont = job.execute_in_process(
        instance=instance, tags=dict(reqs[0].tags), raise_on_error=False, resources=_resources()
    )
    assert cont.success
    status = {r["id"]: r["status"] for r in rows(db, "SELECT id::text AS id, status FROM workflow_executions")}
    assert status == {ids[0]: "waiting", ids[1]: "completed", ids[2]: "waiting"}
    with connect(db) as conn:
        assert invariants.check(conn) == []


def test_a_member_left_to_retry_is_not_failed_while_its_resume_run_waits_in_the_queue(db: str, instance: Any) -> None:
    """The batch run ends; the member it left to retry is silent while its resume run waits for a
    slot of the run queue past the heartbeat timeout: the reconciler waits for that run (found by
    the chaos suite's batch scenario: it used to roll the member back as lost)."""
    install(db, "wf", DAG, AGENTS)
    res, _batch_id, ids = _run_batched(db, instance, [{"n": 0, "script": {"d": "flaky"}}, {"n": 1}])
    assert res.success
    [eid] = [
        r["id"]
        for r in rows(db, "SELECT execution_id::text AS id FROM lifecycle.batch_members WHERE left_at IS NOT NULL")
    ]
    assert eid == ids[0]
    row = rows(db, "SELECT id::text AS id, name, version, description, dag_schema FROM workflow_definitions")[0]
    job = build_job(row)
    [req] = [r for r in resume_requests(instance, [job.name], db) if isinstance(r, dg.RunRequest)]
    queued = instance.create_run_for_job(job_def=job, tags=dict(req.tags), status=dg.DagsterRunStatus.NOT_STARTED)
    time.sleep(1.2)
    assert list(reconcile(instance, [], db, timeout_s=1.0)) == []
    assert rows(db, "SELECT status FROM workflow_executions WHERE id = %(e)s", e=eid) == [{"status": "in_progress"}]
    instance.report_run_failed(queued, "never started (test)")  # no run waits any more: lost after all
    list(reconcile(instance, [], db, timeout_s=1.0))
    assert rows(db, "SELECT status FROM workflow_executions WHERE id = %(e)s", e=eid)[0]["status"] in (
        "failed",
        "compensating",
    )


def test_prune_removes_a_batch_with_its_last_member_and_its_run_with_it(db: str, instance: Any) -> None:
    """Retention (docs/retention.md) removes finished members; the batch row and the batch's
    Dagster run go only when no execution of the batch is left."""
    from datetime import timedelta

    from lifecycle_dagster.engine.retention import prune

    install(db, "wf", DAG, AGENTS)
    # the third member leaves to retry: not finished when the first two are pruned
    res, batch_id, _ids = _run_batched(db, instance, [{"n": 0}, {"n": 1}, {"n": 2, "script": {"d": "flaky"}}])
    assert res.success
    day = timedelta(days=1)
    [now] = rows(db, "SELECT now() AS t")
    first = prune(db, now["t"] + day, instance=instance, now=now["t"] + 3 * day)  # breaker windows long past
    assert first.executions == 2
    assert rows(db, "SELECT count(*) AS n FROM lifecycle.batches")[0]["n"] == 1
    assert instance.get_run_by_id(res.run_id) is not None  # the third member still points at it
    row = rows(db, "SELECT id::text AS id, name, version, description, dag_schema FROM workflow_definitions")[0]
    assert _run_resumes(db, instance, build_job(row)) == 1  # it completes in a run of its own
    [now] = rows(db, "SELECT now() AS t")
    second = prune(db, now["t"] + day, instance=instance, now=now["t"] + 3 * day)
    assert second.executions == 1
    assert rows(db, "SELECT count(*) AS n FROM lifecycle.batches WHERE id = %(b)s", b=batch_id)[0]["n"] == 0
    assert instance.get_run_by_id(res.run_id) is None
