"""Supabase security (0011_security) on real Postgres: RLS per role, the client's insert, what anon
and authenticated may not do, SECURITY DEFINER state changes, and migrating a database that already
has Supabase's auth schema and roles.

Each check connects as the superuser and switches role inside a transaction (SET LOCAL ROLE), with
the JWT claims PostgREST would set (request.jwt.claims).
"""

from __future__ import annotations

from typing import Any

import psycopg
import pytest
from psycopg import sql
from psycopg.types.json import Jsonb

from lifecycle_dagster.store import migrate
from lifecycle_dagster.store.db import Connection, connect

from helpers import as_role, install

USER_A = "aaaaaaaa-0000-4000-8000-000000000001"
USER_B = "bbbbbbbb-0000-4000-8000-000000000002"
DAG = {"stages": [{"id": "a", "capability": "cap_a", "next": ["b"]}, {"id": "b", "capability": "cap_b"}]}
OUR_TABLES = [
    "agent_ontologies",
    "agents",
    "lifecycle.adoption_rejects",
    "lifecycle.alerts",
    "lifecycle.artifacts",
    "lifecycle.audit_checkpoints",
    "lifecycle.audit_heads",
    "lifecycle.audit_retention_marks",
    "lifecycle.batch_members",
    "lifecycle.batches",
    "lifecycle.breaker_outcomes",
    "lifecycle.breakers",
    "lifecycle.capability_limits",
    "lifecycle.rate_buckets",
    "lifecycle.schema_files",
    "lifecycle.schema_fingerprints",
    "lifecycle.schema_migrations",
    "lifecycle.transitions",
    "task_queue",
    "workflow_definitions",
    "workflow_events",
    "workflow_execution_logs",
    "workflow_executions",
]
VIEWS = ["lifecycle.breaker_status", "lifecycle.rate_limit_status", "workflow_audit_feed", "audit_feed"]


def _rel(name: str) -> sql.Composable:
    """A table or view name, schema-qualified or not, as an identifier."""
    return sql.Identifier(*name.split("."))


def _ids(conn: Connection, query: Any, params: Any = None) -> list[str]:
    return sorted(str(next(iter(r.values()))) for r in conn.execute(query, params).fetchall())


def _execution(conn: Connection, definition_id: str, user: str | None, run_id: str) -> str:
    """An execution created by ``user`` that ran its first stage: a stage log, a task, events."""
    row = conn.execute(
        "INSERT INTO workflow_executions (workflow_definition_id, created_by) VALUES (%s, %s) RETURNING id",
        (definition_id, user),
    ).fetchone()
    assert row is not None
    eid = str(row["id"])
    conn.execute("SELECT lifecycle.execution_ensure(%s, %s, %s)", (definition_id, run_id, eid))
    conn.execute("SELECT * FROM lifecycle.stage_start(%s, 'a', 'cap_a')", (eid,))
    return eid


@pytest.fixture
def world(db: str) -> dict[str, Any]:
    """wf v1 (active) and v2 (inactive), two agents; one execution of user A, one of user B, one of
    no one (the engine's); a global event (the v2 publish)."""
    install(db, "wf", DAG, {"cap_a": "Agent A", "cap_b": "Agent B"})
    with connect(db) as conn:
        v1 = conn.execute("SELECT id::text AS id FROM workflow_definitions WHERE name = 'wf'").fetchone()
        assert v1 is not None
        v2 = conn.execute(
            "SELECT definition_id::text AS id FROM lifecycle.definition_publish('wf', 'second', %s, false)",
            (Jsonb({**DAG, "on_failure": "hold"}),),
        ).fetchone()
        assert v2 is not None
        a = _execution(conn, v1["id"], USER_A, "run-a")
        b = _execution(conn, v1["id"], USER_B, "run-b")
        engine = _execution(conn, v1["id"], None, "run-engine")
    return {"db": db, "v1": v1["id"], "v2": v2["id"], "a": a, "b": b, "engine": engine}


# ---------------------------------------------------------------------------------------------
# authenticated


@pytest.mark.parametrize(("user", "key"), [(USER_A, "a"), (USER_B, "b")])
def test_a_user_sees_only_their_own_executions_logs_events_and_tasks(
    world: dict[str, Any], user: str, key: str
) -> None:
    mine = world[key]
    with as_role(world["db"], "authenticated", user) as conn:
        assert _ids(conn, "SELECT id FROM workflow_executions") == [mine]
        assert _ids(conn, "SELECT execution_id FROM workflow_execution_logs") == [mine]
        assert _ids(conn, "SELECT workflow_execution_id FROM task_queue") == [mine]
        events = conn.execute("SELECT execution_id::text AS e, event_type FROM workflow_events ORDER BY id").fetchall()
        assert [(r["e"], r["event_type"]) for r in events] == [(mine, "workflow_started"), (mine, "stage_started")]
        feed = conn.execute("SELECT execution_id::text AS e, event_type FROM audit_feed").fetchall()
        assert sorted((r["e"], r["event_type"]) for r in feed) == [(mine, "stage_started"), (mine, "workflow_started")]
        # active definitions only; agents, ontologies, breakers and the rest are service_role's
        assert _ids(conn, "SELECT id FROM workflow_definitions") == [world["v1"]]
        for table in ("agents", "agent_ontologies"):
            assert _ids(conn, sql.SQL("SELECT 1 FROM {}").format(_rel(table))) == [], table
    for table in ("lifecycle.breakers", "lifecycle.transitions", "lifecycle.artifacts"):
        with (
            as_role(world["db"], "authenticated", user) as conn,
            pytest.raises(psycopg.errors.InsufficientPrivilege, match="permission denied for schema lifecycle"),
        ):
            conn.execute(sql.SQL("SELECT 1 FROM {}").format(_rel(table)))


def test_without_claims_an_authenticated_session_sees_no_execution(world: dict[str, Any]) -> None:
    with as_role(world["db"], "authenticated") as conn:
        assert _ids(conn, "SELECT id FROM workflow_executions") == []
        assert _ids(conn, "SELECT id FROM workflow_events") == []


def test_a_user_starts_an_execution_of_an_active_definition_as_themselves(world: dict[str, Any]) -> None:
    with as_role(world["db"], "authenticated", USER_A) as conn:
        row = conn.execute(
            "INSERT INTO workflow_executions (workflow_definition_id, context) VALUES (%s, %s)"
            " RETURNING created_by::text AS created_by, status, dagster_run_id",
            (world["v1"], Jsonb({"customer": "ACME"})),
        ).fetchone()
        assert row == {"created_by": USER_A, "status": "pending", "dagster_run_id": None}
        assert len(_ids(conn, "SELECT id FROM workflow_executions")) == 2


@pytest.mark.parametrize(
    ("columns", "values", "error", "message"),
    [
        # an inactive version
        ("workflow_definition_id", ["v2"], psycopg.errors.InsufficientPrivilege, "row-level security policy"),
        # for someone else
        (
            "workflow_definition_id, created_by",
            ["v1", USER_B],
            psycopg.errors.InsufficientPrivilege,
            "row-level security policy",
        ),
        # statuses, runs and the rest are the engine's
        (
            "workflow_definition_id, status",
            ["v1", "in_progress"],
            psycopg.errors.InsufficientPrivilege,
            "permission denied for table workflow_executions",
        ),
        (
            "workflow_definition_id, dagster_run_id",
            ["v1", "run-x"],
            psycopg.errors.InsufficientPrivilege,
            "permission denied for table workflow_executions",
        ),
    ],
)
def test_a_user_cannot_insert_other_executions(
    world: dict[str, Any], columns: str, values: list[str], error: type[Exception], message: str
) -> None:
    params = [world.get(v, v) for v in values]
    with as_role(world["db"], "authenticated", USER_A) as conn:
        with pytest.raises(error) as caught:
            conn.execute(
                sql.SQL("INSERT INTO workflow_executions ({}) VALUES ({})").format(
                    sql.SQL(columns), sql.SQL(", ").join(sql.Placeholder() * len(params))
                ),
                params,
            )
        assert message in str(caught.value)


@pytest.mark.parametrize(
    "statement",
    [
        "UPDATE workflow_executions SET status = 'cancelled' WHERE id = %(a)s",
        "UPDATE workflow_executions SET context = '{}' WHERE id = %(a)s",
        "DELETE FROM workflow_executions WHERE id = %(a)s",
        "UPDATE workflow_execution_logs SET status = 'completed' WHERE execution_id = %(a)s",
        "INSERT INTO workflow_events (execution_id, event_type) VALUES (%(a)s, 'forged')",
        "UPDATE task_queue SET status = 'completed' WHERE workflow_execution_id = %(a)s",
        "INSERT INTO workflow_definitions (name, dag_schema) VALUES ('mine', '{}')",
        "UPDATE agents SET is_active = false",
    ],
)
def test_an_authenticated_user_cannot_change_state_directly(world: dict[str, Any], statement: str) -> None:
    with as_role(world["db"], "authenticated", USER_A) as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege) as caught:
            conn.execute(statement, {"a": world["a"]})
        assert "permission denied for table" in str(caught.value)
    with connect(world["db"]) as conn:
        row = conn.execute("SELECT status FROM workflow_executions WHERE id = %s", (world["a"],)).fetchone()
    assert row == {"status": "in_progress"}


# ---------------------------------------------------------------------------------------------
# anon, service_role


@pytest.mark.parametrize("table", [*OUR_TABLES, *VIEWS])
def test_anon_sees_nothing(world: dict[str, Any], table: str) -> None:
    with as_role(world["db"], "anon", USER_A) as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege) as caught:
            conn.execute(sql.SQL("SELECT * FROM {}").format(_rel(table)))
        expected = (
            "permission denied for schema lifecycle"  # anon has no usage on it at all
            if table.startswith("lifecycle.")
            else f"permission denied for {'view' if table in VIEWS else 'table'} {table}"
        )
        assert str(caught.value).startswith(expected)


def test_anon_cannot_insert_an_execution(world: dict[str, Any]) -> None:
    with as_role(world["db"], "anon", USER_A) as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege) as caught:
            conn.execute("INSERT INTO workflow_executions (workflow_definition_id) VALUES (%s)", (world["v1"],))
        assert str(caught.value).startswith("permission denied for table workflow_executions")


def test_service_role_sees_and_does_everything(world: dict[str, Any]) -> None:
    with connect(world["db"]) as conn:
        owner = {
            t: conn.execute(sql.SQL("SELECT count(*) AS n FROM {}").format(_rel(t))).fetchone()
            for t in OUR_TABLES
        }
    with as_role(world["db"], "service_role") as conn:
        seen = {
            t: conn.execute(sql.SQL("SELECT count(*) AS n FROM {}").format(_rel(t))).fetchone()
            for t in OUR_TABLES
        }
        assert seen == owner
        assert _ids(conn, "SELECT id FROM workflow_executions") == sorted([world["a"], world["b"], world["engine"]])
        assert _ids(conn, "SELECT id FROM workflow_definitions") == sorted([world["v1"], world["v2"]])
        assert [
            r["event_type"] for r in conn.execute("SELECT event_type FROM workflow_events WHERE execution_id IS NULL")
        ] == ["definition_published"]
        # state changes: through the functions, and directly
        conn.execute("SELECT trip_circuit_breaker(%s, 'operator')", (world["a"],))
        conn.execute("UPDATE agents SET description = 'by service_role' WHERE name = 'Agent B'")
        row = conn.execute("SELECT status FROM workflow_executions WHERE id = %s", (world["a"],)).fetchone()
        assert row == {"status": "failed"}


@pytest.mark.parametrize("role", ["anon", "authenticated"])
@pytest.mark.parametrize(
    ("call", "function"),
    [
        ("SELECT perform_workflow_compensation(%(a)s, 'x')", "perform_workflow_compensation"),
        ("SELECT * FROM lifecycle.task_claim('w', 'Agent A', 1, 30)", "lifecycle.task_claim"),
        ("SELECT retry_stage(%(a)s)", "retry_stage"),
        ("SELECT trip_circuit_breaker(%(a)s, 'x')", "trip_circuit_breaker"),
        ("SELECT lifecycle.execution_cancel(%(a)s, 'x', true)", "lifecycle.execution_cancel"),
        ("SELECT lifecycle.breaker_reset('Agent A')", "lifecycle.breaker_reset"),
    ],
)
def test_clients_cannot_execute_state_changes(world: dict[str, Any], role: str, call: str, function: str) -> None:
    with as_role(world["db"], role, USER_A) as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege) as caught:
            conn.execute(call, {"a": world["a"]})
        expected = (
            "permission denied for schema lifecycle"
            if function.startswith("lifecycle.")
            else f"permission denied for function {function}"
        )
        assert str(caught.value).startswith(expected)


def test_service_role_executes_them_with_the_owners_rights(world: dict[str, Any]) -> None:
    with connect(world["db"]) as conn:
        conn.execute("UPDATE agents SET kind = 'queue' WHERE name = 'Agent B'")
        conn.execute(
            "INSERT INTO task_queue (workflow_execution_id, task_type, status) VALUES (%s, 'b', 'pending')",
            (world["b"],),
        )
    with as_role(world["db"], "service_role") as conn:
        claimed = conn.execute(
            "SELECT execution_id::text AS e, stage_id FROM lifecycle.task_claim('w', 'Agent B', 5, 30)"
        ).fetchall()
        assert [dict(r) for r in claimed] == [{"e": world["b"], "stage_id": "b"}]


# ---------------------------------------------------------------------------------------------
# the catalog


def test_every_table_has_rls_and_every_state_change_is_security_definer(db: str) -> None:
    with connect(db) as conn:
        tables = conn.execute(
            "SELECT n.nspname || '.' || c.relname AS rel, c.relrowsecurity, c.relforcerowsecurity"
            " FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
            " WHERE n.nspname IN ('public', 'lifecycle') AND c.relkind IN ('r', 'p') ORDER BY 1"
        ).fetchall()
        assert [(t["rel"], t["relrowsecurity"], t["relforcerowsecurity"]) for t in tables] == sorted(
            (t if "." in t else f"public.{t}", True, False) for t in OUR_TABLES
        )
        functions = conn.execute(
            "SELECT n.nspname || '.' || p.proname AS name, p.prosecdef, p.proconfig,"
            "       has_function_privilege('anon', p.oid, 'EXECUTE') AS anon,"
            "       has_function_privilege('authenticated', p.oid, 'EXECUTE') AS authenticated,"
            "       has_function_privilege('service_role', p.oid, 'EXECUTE') AS service_role"
            " FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace"
            " WHERE n.nspname IN ('public', 'lifecycle') AND p.provolatile = 'v' ORDER BY 1"
        ).fetchall()
        assert len(functions) > 40
        client_api = {"public.start_workflow", "public.cancel_execution", "public.decide"}
        for f in functions:
            assert f["prosecdef"], f["name"]
            assert [c for c in f["proconfig"] if c.startswith("search_path=")] == [
                "search_path=pg_catalog, pg_temp"
            ], f["name"]
            assert (f["anon"], f["authenticated"], f["service_role"]) == (False, f["name"] in client_api, True), f[
                "name"
            ]
        names = {f["name"] for f in functions}
        assert {
            "public.perform_workflow_compensation",
            "public.retry_stage",
            "public.trip_circuit_breaker",
            "lifecycle.task_claim",
            "lifecycle.breaker_reset",
            "lifecycle.audit_chain",
        } | client_api <= names
        # the read-only functions stay SECURITY INVOKER (RLS applies to what they read), but for the
        # policies' helper public.is_approver_of: a policy on the executions that read the stage logs
        # through their own policy (which reads the executions) would recurse
        row = conn.execute(
            "SELECT array_agg(p.oid::regprocedure::text) FILTER (WHERE p.prosecdef) AS definers FROM pg_proc p"
            " WHERE p.pronamespace IN ('public'::regnamespace, 'lifecycle'::regnamespace) AND p.provolatile <> 'v'"
        ).fetchone()
        assert row == {"definers": ["is_approver_of(uuid)"]}
        views = conn.execute(
            "SELECT n.nspname || '.' || c.relname AS relname, c.reloptions"
            " FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
            " WHERE n.nspname IN ('public', 'lifecycle') AND c.relkind = 'v' ORDER BY 1"
        ).fetchall()
        assert [dict(v) for v in views] == [
            {"relname": "lifecycle.breaker_status", "reloptions": ["security_invoker=true"]},
            {"relname": "lifecycle.rate_limit_status", "reloptions": ["security_invoker=true"]},
            {"relname": "public.audit_feed", "reloptions": ["security_invoker=true"]},
            # the client's own artifacts: filtered by auth.uid() in the view (clients cannot reach lifecycle)
            {
                "relname": "public.execution_artifacts",
                "reloptions": ["security_invoker=false", "security_barrier=true"],
            },
            {"relname": "public.workflow_audit_feed", "reloptions": ["security_invoker=true"]},
        ]
        assert conn.execute("SELECT has_schema_privilege('authenticated', 'lifecycle', 'USAGE')").fetchone() == {
            "has_schema_privilege": False
        }


def test_the_engine_inserting_without_claims_records_no_user(db: str) -> None:
    install(db, "wf", DAG, {"cap_a": "Agent A", "cap_b": "Agent B"})
    with connect(db) as conn:
        row = conn.execute(
            "INSERT INTO workflow_executions (workflow_definition_id)"
            " SELECT id FROM workflow_definitions WHERE name = 'wf' RETURNING created_by"
        ).fetchone()
    assert row == {"created_by": None}


# ---------------------------------------------------------------------------------------------
# a Supabase-like database: the roles exist, and auth.uid() is Supabase's own


SUPABASE_UID = "5b5b5b5b-0000-4000-8000-00000000abcd"


def test_migrates_a_database_with_supabase_auth_and_keeps_its_auth_uid(new_db: Any) -> None:
    dsn: str = new_db()
    with psycopg.connect(dsn, autocommit=True) as conn:
        for role in ("anon", "authenticated", "service_role"):  # the earlier migrations made them (cluster-wide)
            row = conn.execute("SELECT count(*) FROM pg_roles WHERE rolname = %s", (role,)).fetchone()
            assert row == (1,)
        conn.execute("CREATE SCHEMA auth")
        conn.execute(
            f"CREATE FUNCTION auth.uid() RETURNS uuid LANGUAGE sql STABLE AS $$ SELECT '{SUPABASE_UID}'::uuid $$"
        )
        conn.execute("GRANT USAGE ON SCHEMA auth TO anon, authenticated, service_role")
        before = conn.execute("SELECT pg_get_functiondef('auth.uid()'::regprocedure)").fetchone()
    applied = migrate.upgrade(dsn)
    assert [m.name for m in applied] == [m.name for m in migrate.discover()]
    with psycopg.connect(dsn, autocommit=True) as conn:
        after = conn.execute("SELECT pg_get_functiondef('auth.uid()'::regprocedure)").fetchone()
        assert after == before
        assert conn.execute("SELECT obj_description('auth.uid()'::regprocedure, 'pg_proc')").fetchone() == (None,)
    install(dsn, "wf", DAG, {"cap_a": "Agent A", "cap_b": "Agent B"})
    with as_role(dsn, "authenticated") as conn:
        row = conn.execute(
            "INSERT INTO workflow_executions (workflow_definition_id)"
            " SELECT id FROM workflow_definitions WHERE name = 'wf' RETURNING created_by::text AS created_by"
        ).fetchone()
        assert row == {"created_by": SUPABASE_UID}
        assert len(_ids(conn, "SELECT id FROM workflow_executions")) == 1
    assert migrate.upgrade(dsn) == []
