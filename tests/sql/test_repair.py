"""db upgrade --repair against hostile drift (found by review): what it restores, what it drops by
the exact catalog name, what it refuses to record as shipped; and the runbook's section 5 cannot
open the audit feed to other users."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import psycopg
import pytest

from lifecycle_dagster.store import migrate
from lifecycle_dagster.store.db import connect
from lifecycle_dagster.store.sqlfiles import seed_sql

from helpers import as_role, runbook_section

USER_A = "aaaaaaaa-0000-4000-8000-00000000000a"
USER_B = "bbbbbbbb-0000-4000-8000-00000000000b"


def _drift(dsn: str) -> list[tuple[str, str, str]]:
    with psycopg.connect(dsn) as conn:
        return [(str(k), str(o), str(p)) for k, o, p in conn.execute("SELECT * FROM lifecycle.schema_drift()")]


def _sql(dsn: str, *statements: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        for s in statements:
            conn.execute(s)  # type: ignore[arg-type]


@pytest.fixture
def role() -> Iterator[str]:
    """A role of its own (roles are the cluster's: a unique name, dropped after the test)."""
    name = f"ld_role_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(migrate_dsn := _server(), autocommit=True) as conn:
        conn.execute(f"CREATE ROLE {name} NOLOGIN")  # type: ignore[arg-type]
    yield name
    with psycopg.connect(migrate_dsn, autocommit=True) as conn:
        conn.execute(f"DROP ROLE IF EXISTS {name}")  # type: ignore[arg-type]


def _server() -> str:
    import os

    return os.environ["DATABASE_URL"]


def test_section_5_does_not_open_the_feed_to_other_users(seeded_db: str) -> None:
    with connect(seeded_db) as conn:
        conn.execute("SELECT set_config('request.jwt.claims', %s, false)", (f'{{"sub": "{USER_A}"}}',))
        row = conn.execute("SELECT start_workflow('lifecycle_v1', '{\"secret\": \"x\"}') AS id").fetchone()
        assert row is not None
        eid = row["id"]
        conn.execute(
            "INSERT INTO workflow_events (execution_id, event_type, metadata) VALUES (%s, 'note', '{}')", (eid,)
        )
    _sql(seeded_db, runbook_section(5))  # replaces workflow_audit_feed: no longer security_invoker
    with as_role(seeded_db, "authenticated", USER_B) as conn:
        assert conn.execute("SELECT count(*) AS n FROM audit_feed").fetchone() == {"n": 0}
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("SELECT context FROM workflow_audit_feed")
    with as_role(seeded_db, "authenticated", USER_A) as conn:
        rows = conn.execute("SELECT context FROM audit_feed").fetchall()
        assert rows and all(r["context"] == {"secret": "x"} for r in rows)


def test_repair_re_creates_what_was_dropped(db: str) -> None:
    _sql(
        db,
        "DROP FUNCTION lifecycle.task_heartbeat(uuid, bigint, double precision, timestamptz)",
        "DROP VIEW public.execution_artifacts",
        "DROP FUNCTION public.retry_stage(uuid, integer)",
    )
    assert {(k, p) for k, _, p in _drift(db)} >= {("function", "missing"), ("view", "missing")}
    migrate.run_upgrade(db, repair=True)
    assert _drift(db) == []


def test_repair_drops_extras_by_their_exact_name(db: str) -> None:
    _sql(
        db,
        'CREATE POLICY "leak on all" ON public.workflow_executions FOR SELECT TO authenticated USING (true)',
        "CREATE FUNCTION lifecycle.\"evil(\"() RETURNS int LANGUAGE sql AS $$ SELECT 1 $$",
        "CREATE RULE no_events AS ON INSERT TO public.workflow_events DO INSTEAD NOTHING",
        "CREATE MATERIALIZED VIEW lifecycle.mv AS SELECT 1 AS one",
    )
    assert sorted((k, p) for k, _, p in _drift(db) if k != "privileges") == [
        ("function", "extra"),
        ("policy", "extra"),
        ("rule", "extra"),
        ("view", "extra"),
    ]
    report = migrate.run_upgrade(db, repair=True)
    assert sorted(k for k, _, a in report.repaired if a == "dropped") == ["function", "policy", "rule", "view"]
    assert _drift(db) == []
    with psycopg.connect(db) as conn:
        assert conn.execute("SELECT count(*) FROM pg_policy WHERE polname = 'leak on all'").fetchone() == (0,)
        assert conn.execute("SELECT count(*) FROM pg_rewrite WHERE rulename = 'no_events'").fetchone() == (0,)


def test_repair_takes_back_owners_and_grants_to_any_role(db: str, role: str) -> None:
    fn = "lifecycle.execution_cancel(uuid, text, boolean, timestamptz)"
    _sql(
        db,
        f"ALTER FUNCTION {fn} OWNER TO {role}",
        f"GRANT SELECT ON public.workflow_executions TO {role}",
        f"GRANT UPDATE (status) ON public.workflow_executions TO {role}",
        f"GRANT USAGE ON SCHEMA lifecycle TO {role}",
        "ALTER TABLE public.workflow_executions DISABLE TRIGGER workflow_executions_transition",
    )
    kinds = {(k, p) for k, _, p in _drift(db)}
    assert {("privileges", "changed"), ("schema", "changed"), ("trigger", "changed")} <= kinds
    migrate.run_upgrade(db, repair=True)
    assert _drift(db) == []
    with psycopg.connect(db) as conn:
        checks = conn.execute(
            "SELECT pg_get_userbyid(p.proowner) = current_user,"
            " has_table_privilege(%(r)s, 'public.workflow_executions', 'SELECT'),"
            " has_column_privilege(%(r)s, 'public.workflow_executions', 'status', 'UPDATE'),"
            " has_schema_privilege(%(r)s, 'lifecycle', 'USAGE'),"
            " (SELECT tgenabled FROM pg_trigger WHERE tgname = 'workflow_executions_transition')"
            f" FROM pg_proc p WHERE p.oid = '{fn}'::regprocedure",
            {"r": role},
        ).fetchone()
    assert checks == (True, False, False, False, "O")


def test_repair_refuses_what_only_migrations_restore(db: str) -> None:
    _sql(
        db,
        "CREATE TABLE lifecycle.t_evil (x int)",
        "ALTER TABLE public.workflow_executions DROP CONSTRAINT workflow_executions_context_is_object",
        "DELETE FROM lifecycle.transitions WHERE entity = 'execution' AND to_status = 'cancelled'",
    )
    with pytest.raises(migrate.MigrationError, match=r"--repair cannot restore .*nothing was repaired"):
        migrate.run_upgrade(db, repair=True)
    kinds = {(k, p) for k, _, p in _drift(db)}  # still reported, not recorded as shipped
    assert {("table", "extra"), ("constraint", "missing"), ("data", "changed")} <= kinds


def test_the_seed_does_not_drift_the_schema(db: str) -> None:
    with connect(db) as conn:
        conn.execute(seed_sql())
    assert _drift(db) == []


def test_a_function_in_public_named_like_a_builtin_is_not_called_by_the_guards(seeded_db: str) -> None:
    """The payload guard runs as the owner (inside SECURITY DEFINER triggers): a look-alike of
    jsonb_path_exists in a writable public must not run."""
    _sql(
        seeded_db,
        "CREATE FUNCTION public.jsonb_path_exists(jsonb, text) RETURNS boolean LANGUAGE plpgsql AS"
        " $$ BEGIN RAISE EXCEPTION 'look-alike called'; END $$",
    )
    try:
        with connect(seeded_db) as conn:
            conn.execute("SELECT set_config('request.jwt.claims', %s, false)", (f'{{"sub": "{USER_A}"}}',))
            row = conn.execute("SELECT start_workflow('lifecycle_v1', '{\"customer\": \"x\"}') AS id").fetchone()
        assert row is not None and row["id"]
    finally:
        _sql(seeded_db, "DROP FUNCTION public.jsonb_path_exists(jsonb, text)")
