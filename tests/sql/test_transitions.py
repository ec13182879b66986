"""The typed seam (lifecycle_dagster.store.transitions) pinned to the SQL it calls, on real Postgres.

- Each status enum lists exactly the codes its SQL function can return, read from ``sql/schema``:
  ``RETURN '<code>'`` and ``RETURN QUERY SELECT '<code>'::text``, the codes of a helper whose
  result is returned (``RETURN v_x`` with ``v_x := lifecycle.helper(...)``, ``RETURN
  lifecycle.f(...)``), and, for a returned column, the values listed below with their reason (a
  new kind of RETURN expression fails the test until it is listed).
- The row enums (execution and task statuses, agent kinds, breaker states, alert kinds) equal the CHECK
  constraints of the migrated database.
- An unknown code raises an error naming the function and the code, from a real SQL function too.
- No module but the seam runs a named query that changes state (a volatile ``lifecycle`` function,
  or an INSERT/UPDATE/DELETE), except the ones listed in ``OUTSIDE_THE_SEAM`` with their reason.
"""

from __future__ import annotations

import re
from pathlib import Path

import psycopg
import pytest

from lifecycle_dagster.store import transitions as t
from lifecycle_dagster.store.db import Connection, connect
from lifecycle_dagster.store.sqlfiles import queries, sql_dir

from helpers import install

PACKAGE = Path(t.__file__).resolve().parent.parent

_FUNCTION = re.compile(r"CREATE OR REPLACE FUNCTION lifecycle\.(\w+)\(.*?\bAS \$(\w*)\$\n(.*?)\n\$\2\$;", re.DOTALL)
_RETURN = re.compile(r"\bRETURN\b(?!\s+(?:NEXT|QUERY)\b)\s*([^;]*);")
_RETURN_QUERY = re.compile(r"\bRETURN QUERY SELECT\s+([^,;]+)")
_LITERAL = re.compile(r"^'([a-z_]+)'(?:::text)?$")
_HELPER_CALL = re.compile(r"^lifecycle\.(\w+)\(")

#: returned expressions that are not a literal or a helper call, per function: the values they can
#: have there, and why
COLUMNS: dict[tuple[str, str], tuple[set[str], str]] = {
    ("stage_complete", "v_exec.status"): (
        {"in_progress"},
        "stage_refuse_late_result refused every execution that is not in_progress before this RETURN",
    ),
    ("task_abandon", "v_task.status"): (
        {"pending", "in_progress", "completed", "failed", "cancelled"},
        "the task's status before: any task_queue status (test_row_enums_equal_the_check_constraints)",
    ),
    ("execution_end", "v_exec.status"): (
        set(),
        "every caller (stage_complete, approval_settle) holds an in_progress or waiting execution",
    ),
    ("execution_advance", "v_exec.status"): (
        {"in_progress", "waiting"},
        "the first RETURN is unreachable for its callers (an in_progress or waiting execution); the last "
        "returns the status it found",
    ),
    ("stage_readiness", "v_status"): (
        {"completed", "skipped", "waiting"},
        "returned only when the stage log's status is one of these",
    ),
    ("breaker_reset", "v_b.state"): (
        {"open", "half_open"},
        "a missing or closed breaker returned 'closed' before this RETURN",
    ),
}

#: codes a helper can return that the caller's guard never lets through (pinned by
#: test_a_deadline_that_passed_refuses_a_completion_only)
UNREACHABLE: dict[str, set[str]] = {
    # stage_fail and stage_schedule_retry call stage_refuse_late_result only when the attempt is
    # stale, the stage is not running or the execution stopped: its first three checks
    "stage_fail": {"refused_timed_out"},
    "stage_schedule_retry": {"refused_timed_out"},
}

#: state-changing named queries run outside the seam, by query: (the module running it, why)
OUTSIDE_THE_SEAM: dict[str, tuple[str, str]] = {
    "publish_definition": ("store/versions.py", "versions.publish is typed already (PublishResult)"),
    "activate_definition": ("store/versions.py", "versions.activate is typed already (ActivationResult)"),
    "adopt_move_aside": ("store/adopt.py", "schema management (db upgrade), not a workflow transition"),
    "adopt_rows": ("store/adopt.py", "schema management (db upgrade), not a workflow transition"),
}


def _bodies() -> dict[str, str]:
    """``{function name: plpgsql body}`` of every ``lifecycle.*`` function in sql/schema."""
    bodies: dict[str, str] = {}
    for path in sorted((sql_dir() / "schema").glob("*.sql")):
        for m in _FUNCTION.finditer(path.read_text(encoding="utf-8")):
            assert m.group(1) not in bodies, f"lifecycle.{m.group(1)} is defined twice"
            bodies[m.group(1)] = re.sub(r"--[^\n]*", "", m.group(3))
    return bodies


def _assigned(body: str, variable: str) -> list[str]:
    """The expressions assigned to a plpgsql variable (``v := expr;``)."""
    return [e.strip() for e in re.findall(rf"\b{re.escape(variable)}\s*:=\s*([^;]*);", body)]


def _codes(bodies: dict[str, str], name: str, *, helper: bool = False) -> set[str]:
    """The status codes function ``name`` can return (see the module docstring)."""
    body = bodies[name]
    exprs = [e.strip() for e in _RETURN.findall(body)] + [e.strip() for e in _RETURN_QUERY.findall(body)]
    codes: set[str] = set()
    for expr in exprs:
        codes |= _expression_codes(bodies, name, body, expr, helper=helper)
    return codes - UNREACHABLE.get(name, set())


def _expression_codes(bodies: dict[str, str], name: str, body: str, expr: str, *, helper: bool) -> set[str]:
    if expr == "" or expr == "NULL":  # RETURN; after RETURN QUERY, or a helper's "nothing to refuse"
        assert helper or expr == "", f"lifecycle.{name} returns NULL: not a status code"
        return set()
    if m := _LITERAL.match(expr):
        return {m.group(1)}
    if m := _HELPER_CALL.match(expr):
        return _codes(bodies, m.group(1), helper=True)
    if re.fullmatch(r"v_\w+", expr) and (assigned := _assigned(body, expr)):
        found: set[str] = set()
        for value in assigned:
            found |= _expression_codes(bodies, name, body, value, helper=True)
        return found
    assert (name, expr) in COLUMNS, f"lifecycle.{name}: RETURN {expr} is not accounted for (add it to COLUMNS)"
    return COLUMNS[(name, expr)][0]


@pytest.mark.parametrize("function", sorted(t.STATUS_ENUMS))
def test_each_status_enum_lists_exactly_the_codes_its_sql_function_returns(function: str) -> None:
    name = function.removeprefix("lifecycle.")
    in_sql = _codes(_bodies(), name)
    assert in_sql, f"{function}: no status code found in sql/schema"
    assert {m.value for m in t.STATUS_ENUMS[function]} == in_sql


def test_the_reader_of_sql_bodies_sees_what_the_sql_says() -> None:
    bodies = _bodies()
    assert _codes(bodies, "stage_refuse_late_result", helper=True) == {
        "refused_stale_attempt",
        "refused_stage_not_running",
        "refused_execution_stopped",
        "refused_timed_out",
    }
    assert _codes(bodies, "task_refusal", helper=True) == {
        "refused_stale_token",
        "refused_task_finished",
        "refused_lease_expired",
    }
    assert _codes(bodies, "undo_start") == {"skip", "done", "compensate"}


def test_refusals_are_the_refused_codes() -> None:
    refused = {m for enum in t.STATUS_ENUMS.values() for m in enum if isinstance(m, t.StatusCode) and m.refused}
    assert {m.value for m in refused} == {
        "refused_stale_attempt",
        "refused_stage_not_running",
        "refused_execution_stopped",
        "refused_timed_out",
        "refused_stale_token",
        "refused_task_finished",
        "refused_lease_expired",
        "refused_bad_output",
        "refused_unknown_stage",
        "refused_not_approval",
        "refused_not_waiting",
        "refused_not_approver",
    }
    assert not t.StageCompleteStatus.IN_PROGRESS.refused
    assert [s for s in t.TaskStatus if s.final] == [t.TaskStatus.COMPLETED, t.TaskStatus.FAILED, t.TaskStatus.CANCELLED]


@pytest.mark.parametrize(
    ("constraint", "enum"),
    [
        ("workflow_executions_status_valid", t.ExecutionStatus),
        ("task_queue_status_valid", t.TaskStatus),
        ("agents_kind_valid", t.AgentKind),
        ("lifecycle_breakers_state_valid", t.BreakerState),
        ("lifecycle_alerts_kind_valid", t.AlertKind),
    ],
)
def test_row_enums_equal_the_check_constraints(db: str, constraint: str, enum: type[t.StatusCode]) -> None:
    with connect(db) as conn:
        row = conn.execute(
            "SELECT pg_get_constraintdef(oid) AS def FROM pg_constraint WHERE conname = %s", (constraint,)
        ).fetchone()
    assert row is not None, constraint
    assert set(re.findall(r"'(\w+)'::text", row["def"])) == {m.value for m in enum}


def test_an_unknown_code_raises_naming_the_function_and_the_code() -> None:
    with pytest.raises(t.UnknownStatusError, match=r"lifecycle\.stage_fail returned the unknown status code 'gone'"):
        t.parse_status(t.StageFailStatus, "lifecycle.stage_fail", "gone")
    with pytest.raises(t.UnknownStatusError, match=r"lifecycle\.undo_fail returned the unknown status code None"):
        t.parse_status(t.UndoFailStatus, "lifecycle.undo_fail", None)
    assert t.parse_status(t.StageFailStatus, "lifecycle.stage_fail", "failed") is t.StageFailStatus.FAILED


def test_an_unknown_code_from_the_database_raises(seeded_db: str) -> None:
    with connect(seeded_db) as conn:
        conn.execute(
            "CREATE OR REPLACE FUNCTION lifecycle.breaker_reset(p_agent_name text, p_now timestamptz DEFAULT now())"
            " RETURNS text LANGUAGE sql AS $$ SELECT 'half_closed'::text $$"
        )
        with pytest.raises(t.UnknownStatusError) as caught:
            t.breaker_reset(conn, agent="anyone")
    assert caught.value.function == "lifecycle.breaker_reset"
    assert caught.value.code == "half_closed"
    assert "closed, open, half_open" in str(caught.value)


def _running_stage(conn: Connection, run_id: str, *, timeout_s: float) -> tuple[str, t.StartedStage]:
    """A new execution of ``wf`` under ``run_id`` with its only stage started: (its id, the stage)."""
    definition = conn.execute("SELECT id::text AS id FROM workflow_definitions WHERE name = 'wf'").fetchone()
    assert definition is not None
    execution_id = t.execution_create(conn, definition_id=definition["id"], context={}, created_by=None)
    ensured = t.execution_ensure(
        conn, definition_id=definition["id"], run_id=run_id, execution_id=execution_id, context={}, resume=False
    )
    assert (ensured.id, ensured.status) == (execution_id, t.ExecutionStatus.IN_PROGRESS)
    return execution_id, t.stage_start(
        conn,
        execution_id=execution_id,
        stage_id="work",
        capability="work",
        ancestors={},
        attempt=1,
        timeout_s=timeout_s,
        max_attempts=3,
        resume=False,
        run_id=run_id,
    )


def _past_deadline(conn: Connection, started: t.StartedStage) -> None:
    conn.execute("UPDATE task_queue SET deadline_at = now() - interval '1 second' WHERE id = %s", (started.task_id,))


def test_a_deadline_that_passed_refuses_a_completion_only(db: str) -> None:
    install(db, "wf", {"stages": [{"id": "work", "capability": "work"}]}, {"work": "worker"})
    with connect(db) as conn:
        _, late = _running_stage(conn, "run-complete", timeout_s=30)
        assert (late.agent_name, late.agent_kind, late.attempt) == ("worker", t.AgentKind.PYTHON, 1)
        _past_deadline(conn, late)
        status = t.stage_complete(conn, log_id=late.log_id, task_id=late.task_id, output={}, attempt=1)
        assert status is t.StageCompleteStatus.REFUSED_TIMED_OUT

        _, failing = _running_stage(conn, "run-fail", timeout_s=30)
        _past_deadline(conn, failing)
        status_f = t.stage_fail(
            conn, log_id=failing.log_id, task_id=failing.task_id, error="boom", error_code="x", attempt=1
        )
        assert status_f is t.StageFailStatus.FAILED

        _, retrying = _running_stage(conn, "run-retry", timeout_s=30)
        _past_deadline(conn, retrying)
        status_r = t.stage_schedule_retry(
            conn,
            log_id=retrying.log_id,
            task_id=retrying.task_id,
            attempt=1,
            error="boom",
            error_code="x",
            error_class="X",
            delay_s=0,
        )
        assert status_r is t.StageRetryStatus.RETRYING
        stale = t.stage_fail(
            conn, log_id=retrying.log_id, task_id=retrying.task_id, error="late", error_code="x", attempt=1
        )
        assert stale is t.StageFailStatus.REFUSED_STAGE_NOT_RUNNING


def test_completion_and_cancel_return_typed_results(db: str) -> None:
    install(db, "wf", {"stages": [{"id": "work", "capability": "work"}]}, {"work": "worker"})
    with connect(db) as conn:
        _, done = _running_stage(conn, "run-done", timeout_s=30)
        status = t.stage_complete(conn, log_id=done.log_id, task_id=done.task_id, output={"ok": 1}, attempt=1)
        assert status is t.StageCompleteStatus.COMPLETED
        execution_id, _ = _running_stage(conn, "run-cancel", timeout_s=30)
        first = t.execution_cancel(conn, execution_id=execution_id, reason="test", compensate=False)
        again = t.execution_cancel(conn, execution_id=execution_id, reason="test", compensate=False)
        with pytest.raises(psycopg.errors.NoDataFound):
            t.execution_cancel(conn, execution_id="00000000-0000-0000-0000-000000000000", reason="x", compensate=False)
    assert first == t.CancelResult(True, t.ExecutionStatus.CANCELLED, t.ExecutionStatus.IN_PROGRESS, "run-cancel")
    assert again == t.CancelResult(False, t.ExecutionStatus.CANCELLED, t.ExecutionStatus.CANCELLED, "run-cancel")


def _volatile(db: str) -> set[str]:
    """The ``lifecycle`` functions that may change state (declared neither STABLE nor IMMUTABLE)."""
    with connect(db) as conn:
        rows = conn.execute(
            "SELECT proname FROM pg_proc WHERE pronamespace = 'lifecycle'::regnamespace AND provolatile = 'v'"
        ).fetchall()
    return {str(r["proname"]) for r in rows}


def _state_changing_queries(db: str) -> set[str]:
    """Named queries that call a volatile ``lifecycle`` function or write a table."""
    volatile = _volatile(db)
    changing = set()
    for name, text in queries().items():
        sql = re.sub(r"--[^\n]*", "", text)
        called = set(re.findall(r"\blifecycle\.(\w+)\s*\(", sql))
        if called & volatile or re.search(r"\b(INSERT|UPDATE|DELETE|ALTER|DROP)\b|^DO\b", sql):
            changing.add(name)
    return changing


def test_state_changing_queries_run_only_through_the_seam(db: str) -> None:
    changing = _state_changing_queries(db)
    assert {"complete_stage", "task_claim", "perform_compensation", "create_execution", "breaker_reset"} <= changing
    assert "task_state" not in changing and "capability_breakers" not in changing
    seam = Path(t.__file__).resolve()
    outside: dict[str, set[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        for name in re.findall(r"""\bquery\(\s*["'](\w+)["']""", path.read_text(encoding="utf-8")):
            if name in changing and path.resolve() != seam:
                outside.setdefault(name, set()).add(path.relative_to(PACKAGE).as_posix())
    allowed = {name: {where} for name, (where, _why) in OUTSIDE_THE_SEAM.items()}
    assert {name: where for name, where in outside.items() if allowed.get(name) != where} == {}


def test_no_module_but_the_seam_calls_a_volatile_function_in_its_own_sql(db: str) -> None:
    volatile = _volatile(db)
    calls = {
        (path.relative_to(PACKAGE).as_posix(), name)
        for path in sorted(PACKAGE.rglob("*.py"))
        if path.name != "transitions.py"
        for name in re.findall(r"\blifecycle\.(\w+)\(", path.read_text(encoding="utf-8"))
        if name in volatile
    }
    # db upgrade records the fingerprints of the schema it applied and adopts existing rows: schema
    # management, not transitions
    assert calls == {("store/migrate.py", "schema_fingerprints_record"), ("store/adopt.py", "adopt_rows")}


def test_the_seam_runs_each_state_changing_query(db: str) -> None:
    source = Path(t.__file__).read_text(encoding="utf-8")
    used = set(re.findall(r"""\b(?:query|_row)\(\s*(?:conn,\s*)?["'](\w+)["']""", source))
    not_in_package = {"audit_prune"}  # run by operators and tests only (lifecycle.audit_prune)
    missing = _state_changing_queries(db) - used - set(OUTSIDE_THE_SEAM) - not_in_package
    assert missing == set()
