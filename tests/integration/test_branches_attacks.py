"""Adversarial tests of issue 17 (docs/branches.md): races on decisions, early ends against a
claimed queue task, odd DAG shapes, client-session security and the durability of a waiting
execution, on a real database (separate connections and a barrier for the races)."""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import dagster as dg
import psycopg
import pytest
from psycopg.types.json import Jsonb
from test_branches import SIGN_OFF, _agents, _events, _execution, _stages

from lifecycle_dagster.agents import AgentRegistry
from lifecycle_dagster.location.definitions import definitions_from_snapshot, fetch_snapshot
from lifecycle_dagster.location.job_factory import EXECUTION_ID_TAG, build_job
from lifecycle_dagster.location.resources import agents_resource
from lifecycle_dagster.location.sensors import reconcile, resume_requests
from lifecycle_dagster.store import invariants
from lifecycle_dagster.store.db import connect
from lifecycle_dagster.store.sqlfiles import query

from helpers import as_role, create_execution, install, run

GO = {"output": {"go": True}}


def _no_violations(db: str, *, at_rest: bool = True) -> None:
    """No invariant violated (``at_rest`` False: executions left mid-way on purpose may be busy)."""
    with connect(db) as conn:
        found = invariants.check(conn)
    assert [v for v in found if at_rest or v.rule != "not_quiesced"] == []


def _repo_jobs(db: str) -> list[str]:
    repo = definitions_from_snapshot(fetch_snapshot(db)).get_repository_def()
    return [j.name for j in repo.get_all_jobs()]


def _requests(instance: Any, db: str, eid: str) -> list[dg.RunRequest]:
    return [
        r
        for r in resume_requests(instance, _repo_jobs(db), db)
        if isinstance(r, dg.RunRequest) and r.tags[EXECUTION_ID_TAG] == eid
    ]


def _execute(db: str, instance: Any, tags: dict[str, str], registry: AgentRegistry) -> Any:
    with connect(db) as conn:
        row = conn.execute(query("active_definition_by_name"), {"name": "wf"}).fetchone()
    assert row is not None
    return build_job(row).execute_in_process(
        instance=instance, tags=tags, raise_on_error=False, resources={"lifecycle_agents": agents_resource(registry)}
    )


def _decide_op(db: str, eid: str, stage: str, decision: str) -> str:
    with connect(db) as conn:
        row = conn.execute(
            "SELECT lifecycle.approval_decide(%s, %s, %s, p_actor => 'cli:ops', p_operator => true) AS s",
            (eid, stage, decision),
        ).fetchone()
    assert row is not None
    return str(row["s"])


# --- durability: a decision after the run that reached the approval was reported failed ---------


def test_a_decision_after_the_first_run_was_reported_failed_continues(db: str, instance: Any) -> None:
    """The run worker of the first run is killed right after approval_wait: the execution waits
    (not stale, not failed) and the reconciler reports the STARTED run failed after its silence
    (_fail_released_runs: the execution is no longer in progress under it). Days later an approver
    decides: the execution is in progress again, still bound to that failed run, until the
    continuation run binds it. The reconciler must not fail it for its old run's failure."""
    install(db, "wf", SIGN_OFF, {"design": "Designer", "execution": "Realiser"})
    registry, agents = _agents(Designer={}, Realiser={})
    first, eid = run(db, instance, "wf", registry)
    assert first.success and _execution(db, eid)["status"] == "waiting"
    # the lost first run, as the reconciler leaves it: failed in Dagster
    instance.report_run_failed(instance.get_run_by_id(first.run_id), "run worker lost")
    assert instance.get_run_by_id(first.run_id).status == dg.DagsterRunStatus.FAILURE
    list(reconcile(instance, [], db, timeout_s=120))  # a waiting execution is left alone
    assert _execution(db, eid)["status"] == "waiting"

    assert _decide_op(db, eid, "sign_off", "approve") == "continuing"
    list(reconcile(instance, [], db, timeout_s=120))  # a reconciler tick before the resume sensor's
    assert _execution(db, eid)["status"] == "in_progress"
    [request] = _requests(instance, db, eid)
    second = _execute(db, instance, dict(request.tags), registry)
    assert second.success
    assert _execution(db, eid)["status"] == "completed"
    assert agents["Realiser"].calls == 1


# --- continuation: an approval with two children -------------------------------------------------

FORK = {
    "stages": [
        {"id": "design", "capability": "design", "next": ["sign_off"]},
        {
            "id": "sign_off",
            "kind": "approval",
            "approvers": ["role:finance_approver"],
            "next": [
                {"to": "x", "when": {"output": {"decision": "approve"}}},
                {"to": "y", "when": {"output": {"decision": "approve"}}},
            ],
        },
        {"id": "x", "capability": "x"},
        {"id": "y", "capability": "y"},
    ]
}


def test_a_decision_that_makes_two_stages_pending_starts_one_continuation_run(db: str, instance: Any) -> None:
    install(db, "wf", FORK, {"design": "Designer", "x": "X", "y": "Y"})
    registry, agents = _agents(Designer={}, X={}, Y={})
    first, eid = run(db, instance, "wf", registry)
    assert first.success and _execution(db, eid)["status"] == "waiting"
    assert _decide_op(db, eid, "sign_off", "approve") == "continuing"
    assert _stages(db, eid) == {"design": "completed", "sign_off": "completed", "x": "pending", "y": "pending"}
    requests = _requests(instance, db, eid)
    # the daemon launches every request of a tick at once: two runs of one execution would race
    # for its binding (each resume takes it over from the other)
    assert len(requests) == 1, [r.run_key for r in requests]
    second = _execute(db, instance, dict(requests[0].tags), registry)
    assert second.success and _execution(db, eid)["status"] == "completed"
    assert (agents["X"].calls, agents["Y"].calls) == (1, 1)
    _no_violations(db)


# --- driving an execution in SQL (fast, for races) -------------------------------------------


class Driver:
    """An execution of the active 'wf' driven stage by stage as a run's ops would, run id ``run``."""

    def __init__(self, db: str, context: dict[str, Any] | None = None) -> None:
        self.db = db
        self.run = f"run-{uuid.uuid4()}"
        definition, self.eid = create_execution(db, "wf", context)
        self.definition = str(definition["id"])
        with connect(db) as conn:
            conn.execute("SELECT * FROM lifecycle.execution_ensure(%s, %s, %s)", (self.definition, self.run, self.eid))

    def start(self, stage: str, capability: str, ancestors: dict[str, str] | None = None) -> tuple[str, str | None]:
        with connect(self.db) as conn:
            row = conn.execute(
                "SELECT log_id::text, task_id::text FROM lifecycle.stage_start(%s, %s, %s, %s, p_run_id => %s)",
                (self.eid, stage, capability, Jsonb(ancestors or {}), self.run),
            ).fetchone()
        assert row is not None
        return row["log_id"], row["task_id"]

    def complete(self, log_id: str, task_id: str | None, output: str = "{}") -> str:
        with connect(self.db) as conn:
            row = conn.execute(
                "SELECT lifecycle.stage_complete(%s, %s, %s::jsonb) AS s", (log_id, task_id, output)
            ).fetchone()
        assert row is not None
        return str(row["s"])

    def do(self, stage: str, capability: str, ancestors: dict[str, str] | None = None, output: str = "{}") -> str:
        return self.complete(*self.start(stage, capability, ancestors), output)

    def wait(self, stage: str, ancestors: dict[str, str] | None = None) -> str:
        with connect(self.db) as conn:
            row = conn.execute(
                "SELECT status FROM lifecycle.approval_wait(%s, %s, %s, %s)",
                (self.eid, stage, Jsonb(ancestors or {}), self.run),
            ).fetchone()
        assert row is not None
        return str(row["status"])


def _race(db: str, *calls: Callable[[psycopg.Connection[Any]], Any]) -> list[Any]:
    """Each call on its own connection, released together by a barrier; its result or exception."""
    barrier = threading.Barrier(len(calls))
    out: list[Any] = [None] * len(calls)

    def go(i: int) -> None:
        try:
            with connect(db) as conn:
                barrier.wait()
                out[i] = calls[i](conn)
        except Exception as exc:
            out[i] = exc

    threads = [threading.Thread(target=go, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def _one(conn: psycopg.Connection[Any], sql: str, *params: Any) -> Any:
    row = conn.execute(sql, params).fetchone()
    assert row is not None
    return next(iter(dict(row).values()))


SIGN_OFF_T = json.loads(json.dumps(SIGN_OFF))
SIGN_OFF_T["stages"][1]["timeout_s"] = 60


def _waiting(db: str) -> Driver:
    d = Driver(db)
    assert d.do("design", "design") == "in_progress"
    assert d.wait("sign_off", {"design": "design"}) == "waiting"
    return d


RACES = 30


def test_races_decide_vs_cancel_vs_expire(db: str) -> None:
    """Per race: an operator's approval, a cancel and the reconciler's expiry at the deadline, at
    once. Exactly one decision (or none, when the cancel won) and one final status."""
    install(db, "wf", SIGN_OFF_T, {"design": "Designer", "execution": "Realiser"})
    outcomes: dict[tuple[str, ...], int] = {}
    for _ in range(RACES):
        d = _waiting(db)
        late = datetime.now(UTC) + timedelta(seconds=61)
        got = _race(
            db,
            lambda c, d=d: _one(
                c, "SELECT lifecycle.approval_decide(%s, 'sign_off', 'approve', p_operator => true)", d.eid
            ),
            lambda c, d=d: _one(c, "SELECT cancelled FROM lifecycle.execution_cancel(%s, 'race')", d.eid),
            lambda c, late=late: c.execute("SELECT * FROM lifecycle.approvals_expire(100, %s)", (late,)).fetchall(),
        )
        assert not any(isinstance(g, Exception) for g in got), got
        decided = _events(db, d.eid, "approval_decided")
        assert len(decided) <= 1
        key = (str(got[0]), str(got[1]), str(len(got[2])), _execution(db, d.eid)["status"])
        outcomes[key] = outcomes.get(key, 0) + 1
        if got[0] != "refused_not_waiting":
            assert len(got[2]) == 0
    _no_violations(db, at_rest=False)
    print(outcomes)
    assert sum(outcomes.values()) == RACES, outcomes


def test_races_two_client_sessions_decide_at_once(db: str) -> None:
    install(db, "wf", SIGN_OFF, {"design": "Designer", "execution": "Realiser"})
    users = [str(uuid.uuid4()), str(uuid.uuid4())]

    def client(decision: str, sub: str, eid: str) -> Callable[[psycopg.Connection[Any]], Any]:
        def call(conn: psycopg.Connection[Any]) -> Any:
            claims = {"sub": sub, "role": "authenticated", "app_metadata": {"roles": ["finance_approver"]}}
            with conn.transaction():
                conn.execute("SET LOCAL ROLE authenticated")
                conn.execute("SELECT set_config('request.jwt.claims', %s, true)", (json.dumps(claims),))
                return _one(conn, "SELECT public.decide(%s, 'sign_off', %s, 'race')", eid, decision)

        return call

    wins = 0
    for _ in range(RACES):
        d = _waiting(db)
        got = _race(db, client("approve", users[0], d.eid), client("reject", users[1], d.eid))
        assert sorted(map(str, got)) in (["continuing", "refused_not_waiting"], ["completed", "refused_not_waiting"])
        assert len(_events(db, d.eid, "approval_decided")) == 1
        wins += 1
    assert wins == RACES
    _no_violations(db, at_rest=False)


BRANCHES_END = {
    "stages": [
        {"id": "a", "capability": "a", "next": ["b", "q"]},
        {"id": "b", "capability": "b", "next": ["c"]},
        {"id": "q", "capability": "q", "next": ["c"]},
        {"id": "c", "capability": "c"},
    ]
}


def test_races_an_early_end_against_a_claimed_queue_task(db: str) -> None:
    """Branch b ends the execution while q's queue task, claimed by a worker, completes at the
    same moment: whichever wins, the execution is completed with b's outcome, nothing is
    compensated, a refused completion leaves q skipped."""
    install(db, "wf", BRANCHES_END, {"a": "A", "b": "B", "q": "Q", "c": "C"})
    with connect(db) as conn:
        conn.execute("UPDATE agents SET kind = 'queue' WHERE name = 'Q'")
    seen: dict[tuple[str, str], int] = {}
    end = '{"end": {"outcome": "not_qualified", "reason": "b says so"}}'
    for _ in range(RACES):
        d = Driver(db)
        d.do("a", "a")
        d.start("q", "q", {"a": "a"})
        with connect(db) as conn:
            [claimed] = conn.execute("SELECT * FROM lifecycle.task_claim('w1', 'Q', 1, 30)").fetchall()
        assert str(claimed["execution_id"]) == d.eid
        b_log, b_task = d.start("b", "b", {"a": "a"})
        got = _race(
            db,
            lambda c, b_log=b_log, b_task=b_task: _one(
                c, "SELECT lifecycle.stage_complete(%s, %s, %s::jsonb)", b_log, b_task, end
            ),
            lambda c, claimed=claimed: _one(
                c,
                "SELECT lifecycle.task_complete(%s, %s, '{\"q\": 1}'::jsonb)",
                claimed["task_id"],
                claimed["lease_token"],
            ),
        )
        assert not any(isinstance(g, Exception) for g in got), got
        ex = _execution(db, d.eid)
        assert (ex["status"], ex["outcome"]) == ("completed", "not_qualified")
        stages = _stages(db, d.eid)
        assert stages["c"] == "skipped" and stages["b"] == "completed" and stages["q"] in ("completed", "skipped")
        seen[(str(got[1]), stages["q"])] = seen.get((str(got[1]), stages["q"]), 0) + 1
        with connect(db) as conn:
            assert conn.execute(
                "SELECT count(*) AS n FROM lifecycle.compensation_due() WHERE execution_id = %s", (d.eid,)
            ).fetchone() == {"n": 0}
            open_tasks = conn.execute(
                "SELECT count(*) AS n FROM task_queue WHERE workflow_execution_id = %s"
                " AND status IN ('pending', 'in_progress')",
                (d.eid,),
            ).fetchone()
        assert open_tasks == {"n": 0}
    _no_violations(db)
    print(seen)
    assert sum(seen.values()) == RACES, seen


# --- shapes ----------------------------------------------------------------------------------


def test_a_join_whose_parents_are_both_skipped_is_skipped_cascading(db: str) -> None:
    dag = {
        "stages": [
            {"id": "a", "capability": "a", "next": [{"to": "b", "when": GO}, {"to": "c", "when": GO}]},
            {"id": "b", "capability": "b", "next": ["d"]},
            {"id": "c", "capability": "c", "next": ["d"]},
            {"id": "d", "capability": "d", "next": ["e"]},
            {"id": "e", "capability": "e"},
        ]
    }
    install(db, "wf", dag, {s: s.upper() for s in "abcde"})
    d = Driver(db)
    assert d.do("a", "a", output='{"go": false}') == "completed"
    assert _stages(db, d.eid) == {"a": "completed"} | {s: "skipped" for s in "bcde"}
    assert _execution(db, d.eid)["outcome"] == "completed"
    _no_violations(db)


def test_two_parallel_approvals_wait_for_both_and_continue_once_each(db: str) -> None:
    approval = {"kind": "approval", "approvers": ["role:finance_approver"]}
    dag = {
        "stages": [
            {"id": "a", "capability": "a", "next": ["p1", "p2"]},
            {"id": "p1", **approval, "next": ["x", "j"]},
            {"id": "p2", **approval, "next": ["j"]},
            {"id": "x", "capability": "x"},
            {"id": "j", "capability": "j"},
        ]
    }
    install(db, "wf", dag, {s: s.upper() for s in "ajx"})
    d = Driver(db)
    d.do("a", "a")
    assert d.wait("p1", {"a": "a"}) == "waiting"
    assert _execution(db, d.eid)["status"] == "in_progress"  # p2 may still be reached
    assert d.wait("p2", {"a": "a"}) == "waiting"
    assert _execution(db, d.eid)["status"] == "waiting"
    assert _decide_op(db, d.eid, "p1", "approve") == "continuing"
    assert _stages(db, d.eid)["x"] == "pending" and "j" not in _stages(db, d.eid)
    d.run = "continuation-1"
    with connect(db) as conn:
        conn.execute(
            "SELECT * FROM lifecycle.execution_ensure(%s, %s, %s, p_resume => true)", (d.definition, d.run, d.eid)
        )
    d.do("x", "x", {"a": "a", "p1": "p1"})
    assert _execution(db, d.eid)["status"] == "waiting"  # p2 still waits
    assert _decide_op(db, d.eid, "p2", "approve") == "continuing"
    assert _stages(db, d.eid)["j"] == "pending"
    assert [e["metadata"]["stages"] for e in _events(db, d.eid, "workflow_continued")] == [["x"], ["j"]]


def test_an_approval_as_the_first_stage(db: str, instance: Any) -> None:
    dag = {
        "stages": [
            {"id": "sign_off", "kind": "approval", "approvers": ["role:finance_approver"], "next": ["realise"]},
            {"id": "realise", "capability": "execution"},
        ]
    }
    install(db, "wf", dag, {"execution": "Realiser"})
    registry, agents = _agents(Realiser={})
    first, eid = run(db, instance, "wf", registry)
    assert first.success and _execution(db, eid)["status"] == "waiting"
    assert _decide_op(db, eid, "sign_off", "approve") == "continuing"
    [request] = _requests(instance, db, eid)
    assert _execute(db, instance, dict(request.tags), registry).success
    assert _execution(db, eid)["status"] == "completed" and agents["Realiser"].calls == 1
    _no_violations(db)


# --- security --------------------------------------------------------------------------------


def _session(db: str, sub: str, roles: list[str], role: str = "authenticated") -> Any:
    ctx = as_role(db, "authenticated")
    conn = ctx.__enter__()
    claims = {"sub": sub, "role": role, "app_metadata": {"roles": roles}}
    conn.execute("SELECT set_config('request.jwt.claims', %s, true)", (json.dumps(claims),))
    return ctx, conn


def _error(conn: Any, sql: str, *params: Any) -> tuple[str | None, str]:
    with pytest.raises(psycopg.Error) as caught, conn.transaction():
        conn.execute(sql, params)
    return caught.value.sqlstate, str(caught.value.diag.message_primary).replace(str(params[0]), "<id>")


def test_a_stranger_learns_nothing_of_an_execution_it_cannot_see(db: str) -> None:
    """public.decide on an execution the caller cannot read answers exactly as on one that does not
    exist (as public.cancel_execution does): no existence, stage-name or state oracle."""
    install(db, "wf", SIGN_OFF, {"design": "Designer", "execution": "Realiser"})
    d = _waiting(db)
    ctx, conn = _session(db, str(uuid.uuid4()), ["sales"], role="service_role")  # a forged role claim
    try:
        for table in ("workflow_executions", "workflow_execution_logs", "workflow_events", "task_queue"):
            assert conn.execute(f"SELECT count(*) AS n FROM {table}").fetchone() == {"n": 0}, table
        assert conn.execute("SELECT count(*) AS n FROM execution_artifacts").fetchone() == {"n": 0}
        unknown = _error(conn, "SELECT public.decide(%s, 'sign_off', 'approve')", str(uuid.uuid4()))
        for stage in ("sign_off", "design", "nope'; DROP TABLE agents; --"):
            assert _error(conn, "SELECT public.decide(%s, %s, 'approve')", d.eid, stage) == unknown, stage
    finally:
        ctx.__exit__(None, None, None)
    assert _execution(db, d.eid)["status"] == "waiting"
    assert _events(db, d.eid, "approval_decided") == []


def test_an_approver_of_one_execution_sees_no_other(db: str) -> None:
    install(db, "wf", SIGN_OFF, {"design": "Designer", "execution": "Realiser"})
    mine = _waiting(db)
    legal = json.loads(json.dumps(SIGN_OFF))
    legal["stages"][1]["approvers"] = ["role:legal"]
    with connect(db) as conn:
        conn.execute("UPDATE workflow_definitions SET is_active = false")
        conn.execute(
            "INSERT INTO workflow_definitions (name, version, dag_schema, is_active) VALUES ('wf', 2, %s, true)",
            (Jsonb(legal),),
        )
    other = _waiting(db)
    ctx, conn = _session(db, str(uuid.uuid4()), ["finance_approver"])
    try:
        ids = {str(r["execution_id"]) for r in conn.execute("SELECT execution_id FROM workflow_execution_logs")}
        assert ids == {mine.eid}
        assert {str(r["id"]) for r in conn.execute("SELECT id FROM workflow_executions")} == {mine.eid}
        assert conn.execute("SELECT count(*) AS n FROM task_queue").fetchone() == {"n": 0}
        assert conn.execute("SELECT count(*) AS n FROM execution_artifacts").fetchone() == {"n": 0}
    finally:
        ctx.__exit__(None, None, None)
    assert other.eid != mine.eid


def test_anon_cannot_decide_and_comments_are_bounded(db: str) -> None:
    install(db, "wf", SIGN_OFF, {"design": "Designer", "execution": "Realiser"})
    d = _waiting(db)
    with as_role(db, "anon") as conn, pytest.raises(psycopg.errors.InsufficientPrivilege):
        conn.execute("SELECT public.decide(%s, 'sign_off', 'approve')", (d.eid,))
    ctx, conn = _session(db, str(uuid.uuid4()), ["finance_approver"])
    try:
        assert _error(conn, "SELECT public.decide(%s, 'sign_off', 'approve', %s)", d.eid, "x" * 4001)[0] == "22023"
        with pytest.raises(psycopg.DataError):  # NUL: refused before it reaches the server
            conn.execute("SELECT public.decide(%s, 'sign_off', 'approve', %s)", (d.eid, "a\x00b"))
        evil = "'); UPDATE workflow_executions SET status = 'failed'; --"
        assert _one(conn, "SELECT public.decide(%s, 'sign_off', 'approve', %s)", d.eid, evil) == "continuing"
        conn.commit()
    finally:
        ctx.__exit__(None, None, None)
    [decided] = _events(db, d.eid, "approval_decided")
    assert decided["metadata"]["comment"] == "'); UPDATE workflow_executions SET status = 'failed'; --"
    assert _execution(db, d.eid)["status"] == "in_progress"


# --- conditions: the Python mirror on stored outputs ------------------------------------------


@pytest.mark.parametrize(
    ("pattern", "output"),
    [("0.3", "0.30000000000000001"), ("0.30000000000000001", "0.3"), ("1e400", "1e401")],
)
def test_the_invariant_checker_agrees_with_the_database_on_numbers_beyond_a_double(
    db: str, pattern: str, output: str
) -> None:
    dag = (
        '{"stages": [{"id": "a", "capability": "a", "next": [{"to": "b", "when": {"output": {"x": %s}}}]},'
        ' {"id": "b", "capability": "b"}]}'.replace("%s", pattern)
    )
    with connect(db) as conn:
        conn.execute(
            "INSERT INTO workflow_definitions (name, version, dag_schema, is_active) VALUES ('wf', 1, %s::jsonb, true)",
            (dag,),
        )
    install(db, "other", {"stages": [{"id": "z", "capability": "z"}]}, {"a": "A", "b": "B"})
    d = Driver(db)
    assert d.do("a", "a", output='{"x": ' + output + "}") == "completed"
    assert _stages(db, d.eid) == {"a": "completed", "b": "skipped"}  # the database: no edge fired
    _no_violations(db)
