"""The client API (sql/schema/11_client_api.sql) on real Postgres, called as PostgREST would: as
role ``authenticated`` (or ``anon``, ``service_role``) with a user's JWT claims, by argument name.

start_workflow and cancel_execution, the execution_artifacts view, the Realtime publication, and
what anon and authenticated may execute at all.
"""

from __future__ import annotations

from typing import Any

import psycopg
import pytest
from psycopg.types.json import Jsonb

from lifecycle_dagster.core.payload import json_path
from lifecycle_dagster.store.db import Connection, connect
from lifecycle_dagster.store.migrate import run_upgrade

from helpers import as_role

USER_A = "aaaaaaaa-0000-4000-8000-00000000000a"
USER_B = "bbbbbbbb-0000-4000-8000-00000000000b"
WORKFLOW = "lifecycle_v1"
DAG = {"stages": [{"id": "only", "capability": "opportunity"}]}
REALTIME_TABLES = ["workflow_events", "workflow_execution_logs", "workflow_executions"]
CLIENT_FUNCTIONS = ["cancel_execution", "start_workflow"]
OUR_PUBLIC_FUNCTIONS = ["perform_workflow_compensation", "retry_stage", "trip_circuit_breaker", *CLIENT_FUNCTIONS]


def _start(dsn: str, user: str, workflow: str = WORKFLOW, context: dict[str, Any] | None = None) -> str:
    """start_workflow as ``user``, committed; the new execution's id."""
    with as_role(dsn, "authenticated", user, commit=True) as conn:
        row = conn.execute(
            "SELECT public.start_workflow(workflow => %s, context => %s) AS id", (workflow, Jsonb(context or {}))
        ).fetchone()
    assert row is not None
    return str(row["id"])


def _cancel(dsn: str, user: str, eid: str, reason: str | None = None) -> str:
    """cancel_execution as ``user``, committed; its answer."""
    with as_role(dsn, "authenticated", user, commit=True) as conn:
        if reason is None:
            row = conn.execute("SELECT public.cancel_execution(execution_id => %s) AS r", (eid,)).fetchone()
        else:
            row = conn.execute(
                "SELECT public.cancel_execution(execution_id => %s, reason => %s) AS r", (eid, reason)
            ).fetchone()
    assert row is not None
    return str(row["r"])


def _execution(dsn: str, eid: str) -> dict[str, Any]:
    with connect(dsn) as conn:
        row = conn.execute(
            "SELECT e.status, e.created_by::text AS created_by, e.error_message, d.name, d.version, d.is_active"
            " FROM workflow_executions e JOIN workflow_definitions d ON d.id = e.workflow_definition_id"
            " WHERE e.id = %s",
            (eid,),
        ).fetchone()
    assert row is not None
    return dict(row)


def _count_executions(dsn: str) -> int:
    with connect(dsn) as conn:
        row = conn.execute("SELECT count(*) AS n FROM workflow_executions").fetchone()
    assert row is not None
    return int(row["n"])


def _publish(dsn: str, name: str, dag: dict[str, Any], activate: bool) -> int:
    with connect(dsn) as conn:
        row = conn.execute(
            "SELECT version FROM lifecycle.definition_publish(%s, 'test', %s, %s)", (name, Jsonb(dag), activate)
        ).fetchone()
    assert row is not None
    return int(row["version"])


def _call_fails(dsn: str, role: str, user: str | None, stmt: Any, params: Any, error: type[Exception]) -> str:
    """Run ``stmt`` as ``role``/``user``; it must raise ``error``. Its primary message."""
    with as_role(dsn, role, user) as conn, pytest.raises(error) as caught:
        conn.execute(stmt, params)
    exc = caught.value
    assert isinstance(exc, psycopg.Error)
    return str(exc.diag.message_primary)


# ---------------------------------------------------------------------------------------------
# start_workflow


def test_start_workflow_makes_a_pending_execution_of_the_active_version_owned_by_the_caller(seeded_db: str) -> None:
    # a newer, inactive version must not be the one started
    assert _publish(seeded_db, WORKFLOW, DAG, activate=False) == 2
    eid = _start(seeded_db, USER_A, context={"customer": "acme"})
    row = _execution(seeded_db, eid)
    assert row == {
        "status": "pending",
        "created_by": USER_A,
        "error_message": None,
        "name": WORKFLOW,
        "version": 1,
        "is_active": True,
    }
    with connect(seeded_db) as conn:
        ctx = conn.execute("SELECT context FROM workflow_executions WHERE id = %s", (eid,)).fetchone()
    assert ctx is not None and ctx["context"] == {"customer": "acme"}
    # the caller sees it through its own policies; another user does not
    with as_role(seeded_db, "authenticated", USER_A) as conn:
        assert [str(r["id"]) for r in conn.execute("SELECT id FROM workflow_executions").fetchall()] == [eid]
    with as_role(seeded_db, "authenticated", USER_B) as conn:
        assert conn.execute("SELECT id FROM workflow_executions").fetchall() == []


def test_start_workflow_follows_the_activated_version_and_defaults_the_context(seeded_db: str) -> None:
    _publish(seeded_db, WORKFLOW, DAG, activate=True)
    with as_role(seeded_db, "authenticated", USER_A, commit=True) as conn:
        row = conn.execute("SELECT public.start_workflow(workflow => %s) AS id", (WORKFLOW,)).fetchone()
    assert row is not None
    assert _execution(seeded_db, str(row["id"]))["version"] == 2
    with connect(seeded_db) as conn:
        ctx = conn.execute("SELECT context FROM workflow_executions WHERE id = %s", (row["id"],)).fetchone()
    assert ctx is not None and ctx["context"] == {}


def test_start_workflow_of_an_unknown_workflow_names_it_and_writes_nothing(seeded_db: str) -> None:
    message = _call_fails(
        seeded_db,
        "authenticated",
        USER_A,
        "SELECT public.start_workflow(workflow => %s)",
        ("no_such_flow",),
        psycopg.errors.NoDataFound,
    )
    assert message == "no workflow named 'no_such_flow'"
    assert _count_executions(seeded_db) == 0


def test_start_workflow_of_a_workflow_without_an_active_version_says_so(seeded_db: str) -> None:
    with connect(seeded_db) as conn:
        conn.execute(
            "INSERT INTO workflow_definitions (name, version, dag_schema, is_active) VALUES ('dormant', 1, %s, false)",
            (Jsonb(DAG),),
        )
    message = _call_fails(
        seeded_db,
        "authenticated",
        USER_A,
        "SELECT public.start_workflow(workflow => %s)",
        ("dormant",),
        psycopg.errors.ObjectNotInPrerequisiteState,
    )
    assert message == "workflow 'dormant' has no active version"
    assert _count_executions(seeded_db) == 0


def _nested(levels: int) -> Any:
    """An object holding arrays nested ``levels`` deep."""
    value: Any = []
    for _ in range(levels - 1):
        value = [value]
    return {"deep": value}


@pytest.mark.parametrize(
    ("context", "problem"),
    [
        (None, "context must be a JSON object, got NULL"),
        (Jsonb([1, 2]), "context must be a JSON object, got array"),
        (Jsonb("text"), "context must be a JSON object, got string"),
        (Jsonb(None), "context must be a JSON object, got null"),
        (
            Jsonb(_nested(120)),  # the path as Python's payload check names it (core/payload.py json_path)
            "the context is nested more than 100 levels deep (objects and arrays) at "
            + json_path(["deep", *[0] * 99]),
        ),
    ],
    ids=["sql_null", "array", "string", "json_null", "too_deep"],
)
def test_start_workflow_refuses_a_bad_context_naming_the_workflow(seeded_db: str, context: Any, problem: str) -> None:
    message = _call_fails(
        seeded_db,
        "authenticated",
        USER_A,
        "SELECT public.start_workflow(workflow => %s, context => %s::jsonb)",
        (WORKFLOW, context),
        psycopg.errors.InvalidParameterValue,
    )
    assert message == f"start_workflow('{WORKFLOW}'): {problem}"
    assert _count_executions(seeded_db) == 0


@pytest.mark.parametrize("name", [None, "", "  "])
def test_start_workflow_refuses_a_missing_name(seeded_db: str, name: str | None) -> None:
    message = _call_fails(
        seeded_db,
        "authenticated",
        USER_A,
        "SELECT public.start_workflow(workflow => %s)",
        (name,),
        psycopg.errors.InvalidParameterValue,
    )
    assert message.startswith("start_workflow: the workflow name is ")
    assert _count_executions(seeded_db) == 0


def test_start_workflow_needs_a_user_in_the_request(seeded_db: str) -> None:
    for role in ("authenticated", "service_role"):
        message = _call_fails(
            seeded_db,
            role,
            None,
            "SELECT public.start_workflow(workflow => %s)",
            (WORKFLOW,),
            psycopg.errors.InsufficientPrivilege,
        )
        assert "auth.uid() is NULL" in message
    assert _count_executions(seeded_db) == 0


def test_service_role_starts_for_the_user_of_its_claims(seeded_db: str) -> None:
    with as_role(seeded_db, "service_role", USER_B, commit=True) as conn:
        row = conn.execute("SELECT public.start_workflow(workflow => %s) AS id", (WORKFLOW,)).fetchone()
    assert row is not None
    assert _execution(seeded_db, str(row["id"]))["created_by"] == USER_B


# ---------------------------------------------------------------------------------------------
# anon


@pytest.mark.parametrize(
    ("stmt", "function"),
    [
        ("SELECT public.start_workflow(workflow => 'lifecycle_v1')", "start_workflow"),
        ("SELECT public.cancel_execution(execution_id => gen_random_uuid())", "cancel_execution"),
    ],
)
def test_anon_may_not_call_the_client_api(seeded_db: str, stmt: Any, function: str) -> None:
    message = _call_fails(seeded_db, "anon", USER_A, stmt, None, psycopg.errors.InsufficientPrivilege)
    assert message == f"permission denied for function {function}"
    assert _count_executions(seeded_db) == 0


def test_anon_may_not_read_execution_artifacts(seeded_db: str) -> None:
    message = _call_fails(
        seeded_db,
        "anon",
        USER_A,
        "SELECT * FROM public.execution_artifacts",
        None,
        psycopg.errors.InsufficientPrivilege,
    )
    assert message == "permission denied for view execution_artifacts"


# ---------------------------------------------------------------------------------------------
# cancel_execution


def test_the_owner_cancels_and_a_second_cancel_is_not_cancellable(seeded_db: str) -> None:
    eid = _start(seeded_db, USER_A)
    assert _cancel(seeded_db, USER_A, eid, "changed my mind") == "cancelled"
    row = _execution(seeded_db, eid)
    assert (row["status"], row["error_message"]) == ("cancelled", "changed my mind")
    with connect(seeded_db) as conn:
        events = conn.execute(
            "SELECT metadata FROM workflow_events WHERE execution_id = %s AND event_type = 'workflow_cancelled'", (eid,)
        ).fetchall()
    assert [e["metadata"]["reason"] for e in events] == ["changed my mind"]
    assert _cancel(seeded_db, USER_A, eid) == "not_cancellable"
    assert _execution(seeded_db, eid)["status"] == "cancelled"


def test_cancel_without_a_reason_records_the_default_one(seeded_db: str) -> None:
    eid = _start(seeded_db, USER_A)
    assert _cancel(seeded_db, USER_A, eid) == "cancelled"
    assert _execution(seeded_db, eid)["error_message"] == "cancelled by its owner"


def test_another_user_cannot_cancel_and_learns_nothing(seeded_db: str) -> None:
    eid = _start(seeded_db, USER_A)
    stmt = "SELECT public.cancel_execution(execution_id => %s)"
    theirs = _call_fails(seeded_db, "authenticated", USER_B, stmt, (eid,), psycopg.errors.NoDataFound)
    assert theirs == f"unknown workflow execution {eid}"
    # exactly what an id that does not exist gets
    ghost = "00000000-0000-4000-8000-000000000000"
    unknown = _call_fails(seeded_db, "authenticated", USER_B, stmt, (ghost,), psycopg.errors.NoDataFound)
    assert unknown == theirs.replace(eid, ghost)
    # nor can a request without a user
    _call_fails(seeded_db, "authenticated", None, stmt, (eid,), psycopg.errors.InsufficientPrivilege)
    assert _execution(seeded_db, eid)["status"] == "pending"
    with connect(seeded_db) as conn:
        assert conn.execute("SELECT 1 FROM workflow_events WHERE execution_id = %s", (eid,)).fetchall() == []


def test_cancel_refuses_an_oversized_reason(seeded_db: str) -> None:
    eid = _start(seeded_db, USER_A)
    message = _call_fails(
        seeded_db,
        "authenticated",
        USER_A,
        "SELECT public.cancel_execution(execution_id => %s, reason => %s)",
        (eid, "x" * 1001),
        psycopg.errors.InvalidParameterValue,
    )
    assert message == "cancel_execution: the reason is 1001 characters, over the limit of 1000"
    assert _execution(seeded_db, eid)["status"] == "pending"


# ---------------------------------------------------------------------------------------------
# execution_artifacts


def _artifacts(conn: Connection) -> list[tuple[str, str, str, str | None]]:
    return [
        (str(r["execution_id"]), r["stage_id"], r["key"], r["voided_reason"])
        for r in conn.execute("SELECT * FROM public.execution_artifacts ORDER BY key").fetchall()
    ]


def test_execution_artifacts_lists_only_the_callers_own(seeded_db: str) -> None:
    a = _start(seeded_db, USER_A)
    b = _start(seeded_db, USER_B)
    with connect(seeded_db) as conn:
        conn.execute(
            "INSERT INTO lifecycle.artifacts (execution_id, stage_id, kind, key, data, voided_at, voided_reason)"
            " VALUES (%(a)s, 'discover', 'file', 'a1', '{\"n\": 1}', NULL, NULL),"
            "        (%(a)s, 'qualify', 'file', 'a2', '{}', now(), 'compensated'),"
            "        (%(b)s, 'discover', 'file', 'b1', '{}', NULL, NULL)",
            {"a": a, "b": b},
        )
    with as_role(seeded_db, "authenticated", USER_A) as conn:
        assert _artifacts(conn) == [(a, "discover", "a1", None), (a, "qualify", "a2", "compensated")]
        cols = conn.execute("SELECT * FROM public.execution_artifacts WHERE key = 'a1'").fetchone()
        assert cols is not None
        assert list(cols) == [
            "id",
            "execution_id",
            "stage_id",
            "kind",
            "key",
            "data",
            "created_at",
            "voided_at",
            "voided_reason",
        ]
        assert cols["data"] == {"n": 1}
        # the table itself stays out of reach
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("SELECT 1 FROM lifecycle.artifacts")
    with as_role(seeded_db, "authenticated", USER_B) as conn:
        assert _artifacts(conn) == [(b, "discover", "b1", None)]
    with as_role(seeded_db, "authenticated") as conn:
        assert _artifacts(conn) == []
    with as_role(seeded_db, "service_role") as conn:
        assert [k for _, _, k, _ in _artifacts(conn)] == ["a1", "a2", "b1"]


# ---------------------------------------------------------------------------------------------
# Realtime


def _published(dsn: str) -> list[str]:
    with connect(dsn) as conn:
        rows = conn.execute(
            "SELECT tablename FROM pg_publication_tables WHERE pubname = 'supabase_realtime' AND schemaname = 'public'"
            " AND tablename = ANY(%s) ORDER BY tablename",
            (REALTIME_TABLES,),
        ).fetchall()
    return [str(r["tablename"]) for r in rows]


def test_realtime_publishes_executions_logs_and_events_where_supabase_realtime_exists(db: str) -> None:
    with connect(db) as conn:
        conn.execute("CREATE PUBLICATION supabase_realtime")
        conn.execute("ALTER PUBLICATION supabase_realtime ADD TABLE public.workflow_events")  # one already there
    run_upgrade(db, repair=True)
    assert _published(db) == REALTIME_TABLES
    run_upgrade(db, repair=True)  # re-applied: no error, nothing doubled
    assert _published(db) == REALTIME_TABLES


def test_realtime_leaves_a_for_all_tables_publication_alone(db: str) -> None:
    with connect(db) as conn:
        conn.execute("CREATE PUBLICATION supabase_realtime FOR ALL TABLES")
    run_upgrade(db, repair=True)
    assert _published(db) == REALTIME_TABLES


def test_without_supabase_realtime_nothing_is_published(db: str) -> None:
    run_upgrade(db, repair=True)
    with connect(db) as conn:
        assert conn.execute("SELECT 1 FROM pg_publication").fetchall() == []


# ---------------------------------------------------------------------------------------------
# privileges


def _functions(conn: Connection, role: str) -> list[dict[str, Any]]:
    """Every function of ours (schema lifecycle, and the catalog's public ones) with whether
    ``role`` holds EXECUTE on it and whether it is SECURITY DEFINER."""
    return [
        dict(r)
        for r in conn.execute(
            "SELECT n.nspname AS schema, p.proname AS name, p.prosecdef AS definer,"
            " has_function_privilege(%s, p.oid, 'EXECUTE') AS can"
            " FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace"
            " WHERE n.nspname = 'lifecycle' OR (n.nspname = 'public' AND p.proname = ANY(%s))",
            (role, OUR_PUBLIC_FUNCTIONS),
        ).fetchall()
    ]


def test_anon_may_execute_nothing_of_ours(db: str) -> None:
    with connect(db) as conn:
        fns = _functions(conn, "anon")
        usage = conn.execute("SELECT has_schema_privilege('anon', 'lifecycle', 'USAGE') AS u").fetchone()
    assert usage is not None and usage["u"] is False
    assert {f["name"] for f in fns if f["schema"] == "public"} == set(OUR_PUBLIC_FUNCTIONS)
    assert [f["name"] for f in fns if f["can"] and (f["schema"] == "public" or f["definer"])] == []
    # and the schema itself is out of reach
    with as_role(db, "anon") as conn, pytest.raises(psycopg.errors.InsufficientPrivilege, match="schema lifecycle"):
        conn.execute("SELECT lifecycle.payload_max_bytes()")


def test_authenticated_may_execute_only_start_workflow_and_cancel_execution(db: str) -> None:
    with connect(db) as conn:
        fns = _functions(conn, "authenticated")
        usage = conn.execute("SELECT has_schema_privilege('authenticated', 'lifecycle', 'USAGE') AS u").fetchone()
    assert usage is not None and usage["u"] is False
    assert sorted(f["name"] for f in fns if f["can"] and f["schema"] == "public") == CLIENT_FUNCTIONS
    assert [f["name"] for f in fns if f["can"] and f["schema"] == "lifecycle" and f["definer"]] == []
    with as_role(db, "authenticated", USER_A) as conn, pytest.raises(psycopg.errors.InsufficientPrivilege):
        conn.execute("SELECT public.retry_stage(gen_random_uuid())")


@pytest.mark.parametrize("role", ["anon", "authenticated"])
def test_no_lifecycle_function_grants_execute_to_the_client_roles(db: str, role: str) -> None:
    with connect(db) as conn:
        fns = _functions(conn, role)
    assert [f["name"] for f in fns if f["can"] and f["schema"] == "lifecycle"] == []


def test_the_client_api_is_in_the_catalog_without_drift(db: str) -> None:
    with connect(db) as conn:
        objects = {(r["kind"], r["object"]) for r in conn.execute("SELECT * FROM lifecycle.schema_catalog()")}
        drift = conn.execute("SELECT * FROM lifecycle.schema_drift()").fetchall()
    assert {
        ("function", "public.start_workflow(workflow text, context jsonb)"),
        ("function", "public.cancel_execution(execution_id uuid, reason text)"),
        ("view", "public.execution_artifacts"),
        ("privileges", "view public.execution_artifacts"),
    } <= objects
    assert drift == []
