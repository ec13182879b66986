"""Conditional edges, clean early ends and approval stages (docs/branches.md), run as Dagster
jobs in process on a real database: what the rows say, and what Dagster ran or skipped."""

from __future__ import annotations

import json
import threading
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import dagster as dg
import psycopg
import pytest

from lifecycle_dagster.agents import AgentRegistry, Task
from lifecycle_dagster.location.definitions import definitions_from_snapshot, fetch_snapshot
from lifecycle_dagster.location.job_factory import CONTINUES_TAG, EXECUTION_ID_TAG, RESUME_TAG, build_job
from lifecycle_dagster.location.resources import agents_resource
from lifecycle_dagster.location.sensors import resume_requests
from lifecycle_dagster.store import invariants
from lifecycle_dagster.store.db import connect
from lifecycle_dagster.store.sqlfiles import query

from helpers import as_role, install, rows, run

GO = {"output": {"go": True}}


class Agent:
    """Returns ``output`` (a copy, with the stage id) and counts its calls."""

    def __init__(self, name: str, output: dict[str, Any] | None = None) -> None:
        self.name = name
        self.output = output or {}
        self.calls = 0

    def run(self, task: Task) -> dict[str, Any]:
        self.calls += 1
        return {"summary": f"{task.stage_id} done", **self.output}


def _agents(**outputs: dict[str, Any]) -> tuple[AgentRegistry, dict[str, Agent]]:
    agents = {name: Agent(name, out) for name, out in outputs.items()}
    return AgentRegistry(agents.values()), agents


def _stages(db: str, eid: str) -> dict[str, str]:
    found = rows(db, "SELECT stage_id, status FROM workflow_execution_logs WHERE execution_id = %(e)s", e=eid)
    return {r["stage_id"]: r["status"] for r in found}


def _execution(db: str, eid: str) -> dict[str, Any]:
    [row] = rows(
        db, "SELECT status, outcome, outcome_reason, dagster_run_id FROM workflow_executions WHERE id = %(e)s", e=eid
    )
    return row


def _events(db: str, eid: str, kind: str) -> list[dict[str, Any]]:
    return rows(
        db,
        "SELECT stage_id, metadata FROM workflow_events WHERE execution_id = %(e)s AND event_type = %(k)s ORDER BY id",
        e=eid,
        k=kind,
    )


def _steps(result: Any, kind: str) -> set[str]:
    return {e.step_key for e in result.all_events if e.event_type_value == kind}


def _no_violations(db: str) -> None:
    with connect(db) as conn:
        assert invariants.check(conn) == []


DIAMOND = {
    "stages": [
        {
            "id": "a",
            "capability": "a",
            "next": [{"to": "b", "when": GO}, {"to": "c", "unless": GO}],
        },
        {"id": "b", "capability": "b", "next": ["d"]},
        {"id": "c", "capability": "c", "next": ["e"]},
        {"id": "e", "capability": "e", "next": ["d"]},
        {"id": "d", "capability": "d"},
    ]
}


@pytest.mark.parametrize("go", [True, False])
def test_a_branch_runs_the_other_is_skipped_cascading_and_the_join_runs(db: str, instance: Any, go: bool) -> None:
    install(db, "wf", DIAMOND, {s: s.upper() for s in "abcde"})
    registry, agents = _agents(A={"go": go}, B={}, C={}, D={}, E={})
    result, eid = run(db, instance, "wf", registry)

    assert result.success
    taken, not_taken = (["b"], ["c", "e"]) if go else (["c", "e"], ["b"])
    assert _stages(db, eid) == {"a": "completed", "d": "completed"} | {s: "completed" for s in taken} | {
        s: "skipped" for s in not_taken
    }
    assert _execution(db, eid)["status"] == "completed"
    assert _execution(db, eid)["outcome"] == "completed"
    assert [agents[s.upper()].calls for s in "abcde"] == [1, int(go), int(not go), 1, int(not go)]
    assert _steps(result, "STEP_SKIPPED") == set(not_taken)  # Dagster shows the branch not taken
    skipped = _events(db, eid, "stage_skipped")
    assert sorted(e["stage_id"] for e in skipped) == sorted(not_taken)
    assert all(e["metadata"]["reason"] == "no_edge_fired" for e in skipped)
    first = next(e for e in skipped if e["stage_id"] == not_taken[0])
    assert first["metadata"]["edges"] == [{"from": "a", "parent": "completed", "fired": False}]
    [done] = _events(db, eid, "workflow_completed")
    assert done["metadata"] == {"stages": 2 + len(taken), "skipped": len(not_taken), "outcome": "completed"}
    _no_violations(db)


def test_conditions_may_test_the_context(db: str, instance: Any) -> None:
    dag = {
        "stages": [
            {"id": "a", "capability": "a"},
            {"id": "eu", "capability": "b"},
            {"id": "us", "capability": "c"},
        ],
        "edges": [
            {"from": "a", "to": "eu", "when": {"context": {"region": "eu"}}},
            {"from": "a", "to": "us", "when": {"context": {"region": "us"}, "output": {"ok": True}}},
        ],
    }
    install(db, "wf", dag, {"a": "A", "b": "B", "c": "C"})
    registry, _ = _agents(A={"ok": True}, B={}, C={})
    result, eid = run(db, instance, "wf", registry, {"region": "us"})
    assert result.success
    assert _stages(db, eid) == {"a": "completed", "eu": "skipped", "us": "completed"}


def test_an_output_with_end_completes_the_execution_early_without_compensation(db: str, instance: Any) -> None:
    dag = {
        "stages": [
            {"id": "a", "capability": "a", "next": ["b"]},
            {"id": "b", "capability": "b", "next": ["c"]},
            {"id": "c", "capability": "c"},
        ]
    }
    install(db, "wf", dag, {"a": "A", "b": "B", "c": "C"})
    end = {"end": {"outcome": "not_qualified", "reason": "nothing scored above 0.05"}}
    registry, agents = _agents(A={}, B=end, C={})
    result, eid = run(db, instance, "wf", registry)

    assert result.success
    assert _stages(db, eid) == {"a": "completed", "b": "completed", "c": "skipped"}
    assert _execution(db, eid) | {"dagster_run_id": None} == {
        "status": "completed",
        "outcome": "not_qualified",
        "outcome_reason": "nothing scored above 0.05",
        "dagster_run_id": None,
    }
    assert agents["C"].calls == 0
    assert _steps(result, "STEP_SKIPPED") == {"c"}
    [done] = _events(db, eid, "workflow_completed")
    assert done["metadata"]["outcome"] == "not_qualified" and done["metadata"]["ended_by"] == "b"
    [skipped] = _events(db, eid, "stage_skipped")
    assert skipped["metadata"] == {"reason": "ended", "by": "b", "outcome": "not_qualified"}
    with connect(db) as conn:
        assert conn.execute("SELECT count(*) AS n FROM lifecycle.compensation_due()").fetchone() == {"n": 0}
    _no_violations(db)


def test_a_malformed_end_is_a_bad_output_and_the_attempt_fails(db: str, instance: Any) -> None:
    dag = {"stages": [{"id": "a", "capability": "a"}], "defaults": {"retry": {"max_attempts": 1}}}
    install(db, "wf", dag, {"a": "A"})
    registry, _ = _agents(A={"end": {"outcome": "Not Qualified"}})
    result, eid = run(db, instance, "wf", registry)
    assert not result.success
    assert _execution(db, eid)["status"] == "failed"
    [failed] = _events(db, eid, "stage_failed")
    assert failed["metadata"]["error_code"] == "bad_output"
    assert "output.end.outcome must be a name" in failed["metadata"]["error"]


SIGN_OFF = {
    "stages": [
        {"id": "design", "capability": "design", "next": ["sign_off"]},
        {
            "id": "sign_off",
            "kind": "approval",
            "approvers": ["role:finance_approver"],
            "timeout_s": 3600,
            "on_timeout": "reject",
            "next": [{"to": "realise", "when": {"output": {"decision": "approve"}}}],
        },
        {"id": "realise", "capability": "execution"},
    ]
}


def _reach_sign_off(db: str, instance: Any, dag: dict[str, Any] | None = None) -> tuple[str, Any, dict[str, Agent]]:
    install(db, "wf", dag or SIGN_OFF, {"design": "Designer", "execution": "Realiser"})
    registry, agents = _agents(Designer={"target": 100}, Realiser={})
    result, eid = run(db, instance, "wf", registry)
    assert result.success  # the run ends successfully at the approval
    assert _stages(db, eid) == {"design": "completed", "sign_off": "waiting"}
    assert _execution(db, eid)["status"] == "waiting"
    return eid, result, agents


def _decide(db: str, eid: str, decision: str, comment: str | None = None, **kw: Any) -> str:
    with connect(db) as conn:
        row = conn.execute(
            "SELECT lifecycle.approval_decide(%s, 'sign_off', %s, %s, %s, p_operator => true, p_now => %s) AS s",
            (eid, decision, comment, kw.get("actor", "cli:ops"), kw.get("now", datetime.now(UTC))),
        ).fetchone()
    assert row is not None
    return str(row["s"])


def _continue(db: str, instance: Any, eid: str, registry: AgentRegistry) -> Any:
    """What the daemon's resume sensor does after a decision: one run request, executed here."""
    repo = definitions_from_snapshot(fetch_snapshot(db)).get_repository_def()
    [request] = [
        r for r in resume_requests(instance, [j.name for j in repo.get_all_jobs()], db) if isinstance(r, dg.RunRequest)
    ]
    assert request.tags[EXECUTION_ID_TAG] == eid and request.tags[RESUME_TAG] == "realise"
    with connect(db) as conn:
        row = conn.execute(query("active_definition_by_name"), {"name": "wf"}).fetchone()
    assert row is not None
    return build_job(row).execute_in_process(
        instance=instance,
        tags=dict(request.tags),
        raise_on_error=False,
        resources={"lifecycle_agents": agents_resource(registry)},
    )


def test_an_approval_waits_with_no_run_open_then_a_continuation_run_finishes(db: str, instance: Any) -> None:
    eid, first, agents = _reach_sign_off(db, instance)
    assert _steps(first, "STEP_SKIPPED") == {"realise"}
    [asked] = _events(db, eid, "approval_requested")
    assert asked["metadata"]["approvers"] == ["role:finance_approver"] and asked["metadata"]["wait_until"]
    waited = [e for e in first.all_events if e.event_type_value == "STEP_OUTPUT" and e.step_key == "sign_off"]
    assert waited[0].event_specific_data.metadata["state"].value == "waiting"

    assert _decide(db, eid, "approve", "within budget") == "continuing"
    assert _stages(db, eid)["realise"] == "pending"
    registry = AgentRegistry(agents.values())
    second = _continue(db, instance, eid, registry)

    assert second.success
    assert second.dagster_run.tags[CONTINUES_TAG] == first.run_id
    assert _stages(db, eid) == {"design": "completed", "sign_off": "completed", "realise": "completed"}
    assert _execution(db, eid)["status"] == "completed"
    assert (agents["Designer"].calls, agents["Realiser"].calls) == (1, 1)  # design is not run again
    [decided] = _events(db, eid, "approval_decided")
    assert decided["metadata"]["decision"] == "approve" and decided["metadata"]["decided_by"] == "cli:ops"
    [output] = rows(
        db,
        "SELECT output_data FROM workflow_execution_logs WHERE execution_id = %(e)s AND stage_id = 'sign_off'",
        e=eid,
    )
    assert output["output_data"]["decision"] == "approve" and output["output_data"]["comment"] == "within budget"
    _no_violations(db)


def test_a_rejection_ends_the_execution_with_outcome_rejected(db: str, instance: Any) -> None:
    eid, _, agents = _reach_sign_off(db, instance)
    assert _decide(db, eid, "reject", "too expensive") == "completed"
    assert _stages(db, eid) == {"design": "completed", "sign_off": "completed", "realise": "skipped"}
    assert _execution(db, eid) | {"dagster_run_id": None} == {
        "status": "completed",
        "outcome": "rejected",
        "outcome_reason": "too expensive",
        "dagster_run_id": None,
    }
    assert agents["Realiser"].calls == 0
    _no_violations(db)


def test_a_rejection_that_fails_compensates_the_completed_stages_only(db: str, instance: Any) -> None:
    dag = json.loads(json.dumps(SIGN_OFF))
    dag["stages"][1]["on_reject"] = "fail"
    eid, _, _ = _reach_sign_off(db, instance, dag)
    assert _decide(db, eid, "reject") == "failed"
    assert _execution(db, eid)["status"] == "failed"
    assert _stages(db, eid) == {"design": "completed", "sign_off": "failed"}
    with connect(db) as conn:
        assert conn.execute("SELECT lifecycle.compensation_stages(%s) AS s", (eid,)).fetchone() == {"s": ["design"]}
        [due] = conn.execute("SELECT reason FROM lifecycle.compensation_due() WHERE execution_id = %s", (eid,))
    assert due["reason"] == "rejected by cli:ops"


@pytest.mark.parametrize(
    ("on_timeout", "status", "outcome"),
    [("reject", "completed", "rejected"), ("approve", "in_progress", None), ("fail", "failed", None)],
)
def test_the_reconciler_applies_on_timeout_after_the_deadline(
    db: str, instance: Any, on_timeout: str, status: str, outcome: str | None
) -> None:
    dag = json.loads(json.dumps(SIGN_OFF))
    dag["stages"][1]["on_timeout"] = on_timeout
    eid, _, _ = _reach_sign_off(db, instance, dag)
    with connect(db) as conn:
        early = conn.execute("SELECT * FROM lifecycle.approvals_expire(100, now() + interval '59 minutes')").fetchall()
        late = conn.execute("SELECT * FROM lifecycle.approvals_expire(100, now() + interval '61 minutes')").fetchall()
        again = conn.execute("SELECT * FROM lifecycle.approvals_expire(100, now() + interval '62 minutes')").fetchall()
    assert early == [] and again == []
    assert [(str(r["execution_id"]), r["stage_id"]) for r in late] == [(eid, "sign_off")]
    assert late[0]["status"] == {"approve": "continuing"}.get(on_timeout, status)
    assert _execution(db, eid)["status"] == status
    assert _execution(db, eid)["outcome"] == outcome
    [decided] = _events(db, eid, "approval_decided")
    assert decided["metadata"]["decided_by"] == "timeout"


def test_cancel_works_on_a_waiting_execution(db: str, instance: Any) -> None:
    eid, _, _ = _reach_sign_off(db, instance)
    with connect(db) as conn:
        row = conn.execute("SELECT * FROM lifecycle.execution_cancel(%s, 'no longer needed')", (eid,)).fetchone()
    assert row is not None and row["cancelled"] and row["previous_status"] == "waiting"
    assert _stages(db, eid) == {"design": "completed", "sign_off": "skipped"}
    assert _decide(db, eid, "approve") == "refused_not_waiting"
    with connect(db) as conn:
        assert conn.execute("SELECT lifecycle.compensation_stages(%s) AS s", (eid,)).fetchone() == {"s": ["design"]}


def test_of_two_concurrent_decisions_exactly_one_wins(db: str, instance: Any) -> None:
    eid, _, _ = _reach_sign_off(db, instance)
    barrier = threading.Barrier(2)
    results: list[str] = []

    def decide(decision: str) -> None:
        with connect(db) as conn:
            barrier.wait()
            row = conn.execute(
                "SELECT lifecycle.approval_decide(%s, 'sign_off', %s, p_actor => %s, p_operator => true) AS s",
                (eid, decision, decision),
            ).fetchone()
            assert row is not None
            results.append(str(row["s"]))

    threads = [threading.Thread(target=decide, args=(d,)) for d in ("approve", "reject")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) in (["continuing", "refused_not_waiting"], ["completed", "refused_not_waiting"])
    assert len(_events(db, eid, "approval_decided")) == 1


def _client(db: str, sub: str, roles: list[str]) -> Any:
    """A Supabase client session: role authenticated, a JWT with ``sub`` and app_metadata roles."""
    ctx = as_role(db, "authenticated", commit=True)
    conn = ctx.__enter__()
    claims = {"sub": sub, "role": "authenticated", "app_metadata": {"roles": roles}}
    conn.execute("SELECT set_config('request.jwt.claims', %s, true)", (json.dumps(claims),))
    return ctx, conn


def test_only_an_approver_decides_from_a_client_session_and_reads_what_it_decides(db: str, instance: Any) -> None:
    eid, _, _ = _reach_sign_off(db, instance)
    stranger, approver = str(uuid.uuid4()), str(uuid.uuid4())

    ctx, conn = _client(db, stranger, ["sales"])
    assert conn.execute("SELECT count(*) AS n FROM workflow_executions").fetchone() == {"n": 0}
    # a stranger is told what an unknown execution's id tells (tests/integration/test_branches_attacks.py)
    with pytest.raises(psycopg.errors.NoDataFound):
        conn.execute("SELECT public.decide(%s, 'sign_off', 'approve', 'ok') AS s", (eid,))
    ctx.__exit__(None, None, None)

    ctx, conn = _client(db, approver, ["finance_approver"])
    seen = conn.execute("SELECT id::text AS id, status FROM workflow_executions").fetchall()
    assert seen == [{"id": eid, "status": "waiting"}]
    logs = conn.execute("SELECT stage_id FROM workflow_execution_logs ORDER BY stage_id").fetchall()
    assert [r["stage_id"] for r in logs] == ["design", "sign_off"]
    assert conn.execute("SELECT public.decide(%s, 'sign_off', 'reject', 'no') AS s", (eid,)).fetchone() == {
        "s": "completed"
    }
    ctx.__exit__(None, None, None)
    [decided] = _events(db, eid, "approval_decided")
    assert decided["metadata"]["decided_by"] == approver
    # decided: it no longer waits for the approver, who reads it no more
    ctx, conn = _client(db, approver, ["finance_approver"])
    assert conn.execute("SELECT count(*) AS n FROM workflow_executions").fetchone() == {"n": 0}
    ctx.__exit__(None, None, None)


def test_a_waiting_execution_is_not_stale_and_a_late_continuation_is_not_lost(db: str, instance: Any) -> None:
    eid, _, agents = _reach_sign_off(db, instance)
    with connect(db) as conn:
        later = datetime.now(UTC) + timedelta(hours=5)
        stale = conn.execute("SELECT * FROM lifecycle.executions_stale(60, %s)", (later,)).fetchall()
    assert stale == []
    assert _decide(db, eid, "approve") == "continuing"
    second = _continue(db, instance, eid, AgentRegistry(agents.values()))
    assert second.success and _execution(db, eid)["status"] == "completed"


def test_the_invariant_checker_reevaluates_the_branches_in_python(db: str, instance: Any) -> None:
    install(db, "wf", DIAMOND, {s: s.upper() for s in "abcde"})
    registry, _ = _agents(A={"go": True}, B={}, C={}, D={}, E={})
    result, eid = run(db, instance, "wf", registry)
    assert result.success
    _no_violations(db)
    with connect(db) as conn:  # a's output rewritten after the fact: the branches no longer agree with it
        conn.execute(
            "UPDATE workflow_execution_logs SET output_data = %s WHERE execution_id = %s AND stage_id = 'a'",
            ('{"go": false}', eid),
        )
        found = invariants.check(conn)
    assert sorted((v.rule, v.stage_id) for v in found) == [("ran_without_edge", "b"), ("skipped_with_edge", "c")]


def test_a_retry_after_a_rejection_that_failed_asks_again(db: str, instance: Any) -> None:
    dag = json.loads(json.dumps(SIGN_OFF))
    dag["stages"][1]["on_reject"] = "fail"
    dag["on_failure"] = "hold"
    eid, first, agents = _reach_sign_off(db, instance, dag)
    assert _decide(db, eid, "reject", "not yet") == "failed"
    with connect(db) as conn:
        row = conn.execute(query("active_definition_by_name"), {"name": "wf"}).fetchone()
    assert row is not None
    again = build_job(row).execute_in_process(
        instance=instance,
        tags={EXECUTION_ID_TAG: eid, RESUME_TAG: "sign_off", CONTINUES_TAG: first.run_id},
        raise_on_error=False,
        resources={"lifecycle_agents": agents_resource(AgentRegistry(agents.values()))},
    )
    assert again.success
    assert _stages(db, eid) == {"design": "completed", "sign_off": "waiting"}
    assert _execution(db, eid)["status"] == "waiting"
    assert agents["Designer"].calls == 1
    assert len(_events(db, eid, "approval_requested")) == 2


def test_a_run_whose_part_a_decision_continued_is_released_not_its_execution(db: str, instance: Any) -> None:
    """The run that reached the approval dies before Dagster marks it finished, and the approver
    decides meanwhile: the reconciler does not fail the execution for that run's silence (it would
    be compensated); it reports the silent run failed, and the resume sensor then continues."""
    eid, first, _ = _reach_sign_off(db, instance)
    assert _decide(db, eid, "approve") == "continuing"
    with connect(db) as conn:
        conn.execute(
            "UPDATE workflow_executions SET heartbeat_at = now() - interval '1 hour',"
            " updated_at = now() - interval '1 hour' WHERE id = %s",
            (eid,),
        )
        stale = conn.execute(query("stale_executions"), {"timeout_s": 60}).fetchall()
        running = conn.execute(query("running_executions"), {"limit": 100}).fetchall()
        released = conn.execute(
            query("released_runs"),
            {"run_ids": [first.run_id], "execution_ids": [eid], "compensation": [False], "timeout_s": 60},
        ).fetchall()
    assert stale == [] and running == []
    assert [(r["run_id"], r["execution_id"], r["status"]) for r in released] == [(first.run_id, eid, "in_progress")]
