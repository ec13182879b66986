"""Adopting an existing schema (a Supabase project that already holds the runbook's tables, made
without our columns and constraints), `db upgrade --check`, and `db upgrade --repair`."""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

import psycopg
import pytest
from click.testing import CliRunner, Result
from psycopg.rows import dict_row

from lifecycle_dagster.cli.main import main
from lifecycle_dagster.cli.ops import schema_problems
from lifecycle_dagster.store import adopt, audit, migrate
from lifecycle_dagster.store.db import connect
from lifecycle_dagster.store.sqlfiles import sql_dir

from helpers import runbook_section

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "supabase_existing_schema.sql"
TABLES = adopt.ADOPTED_TABLES

# (table, id, rule) of each fixture row that breaks one of our rules
EXPECTED_REJECTS = [
    ("workflow_definitions", "d0000000-0000-4000-8000-000000000002", "workflow_definitions_name_valid"),
    ("workflow_executions", "e0000000-0000-4000-8000-000000000003", "workflow_executions_status_valid"),
    ("workflow_executions", "e0000000-0000-4000-8000-000000000004", "lifecycle.guard_execution_row"),
    ("workflow_execution_logs", "f0000000-0000-4000-8000-000000000007", "workflow_execution_logs_execution_fkey"),
    ("workflow_execution_logs", "f0000000-0000-4000-8000-000000000008", "workflow_execution_logs_attempt_positive"),
    ("workflow_events", "c0000000-0000-4000-8000-000000000002", "workflow_events_event_type_valid"),
]
EXPECTED_COUNTS = {  # table: (rows in the user's table, copied, rejected)
    "workflow_definitions": (2, 1, 1),
    "agents": (5, 5, 0),
    "agent_ontologies": (5, 5, 0),
    "workflow_executions": (5, 3, 2),
    "workflow_execution_logs": (8, 6, 2),
    "workflow_events": (8, 7, 1),
    "task_queue": (1, 1, 0),
}


@pytest.fixture
def existing(new_db: Any) -> str:
    """A database holding the user's schema and rows (no migration applied), with the runbook's
    sections 2-5 applied on top."""
    dsn: str = new_db()
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(FIXTURE.read_text(encoding="utf-8"))
        for section in (2, 3, 4, 5):
            conn.execute(runbook_section(section))
    return dsn


def _fingerprints(dsn: str, schema: str) -> dict[str, tuple[int, str]]:
    """{table: (rows, md5 of all rows in id order)} of the runbook's tables in ``schema``."""
    out: dict[str, tuple[int, str]] = {}
    with psycopg.connect(dsn) as conn:
        for table in TABLES:
            ident = psycopg.sql.Identifier(schema, table)
            row = conn.execute(
                psycopg.sql.SQL(
                    "SELECT count(*), md5(coalesce(string_agg(to_jsonb(t)::text, '|' ORDER BY t.id::text), ''))"
                    " FROM {} t"
                ).format(ident)
            ).fetchone()
            assert row is not None
            out[table] = (int(row[0]), str(row[1]))
    return out


def _shape(dsn: str) -> list[tuple[Any, ...]]:
    """Columns and constraints of the public tables, as the catalog has them."""
    with psycopg.connect(dsn) as conn:
        cols = conn.execute(
            "SELECT table_name, ordinal_position, column_name, data_type, is_nullable, column_default, is_identity"
            " FROM information_schema.columns WHERE table_schema = 'public' ORDER BY 1, 2"
        ).fetchall()
        cons = conn.execute(
            "SELECT conrelid::regclass::text, conname, pg_get_constraintdef(oid) FROM pg_constraint"
            " WHERE connamespace = 'public'::regnamespace ORDER BY 1, 2"
        ).fetchall()
    return [*cols, *cons]


def _cli(dsn: str, *args: str) -> Result:
    return CliRunner().invoke(main, list(args), env={"DATABASE_URL": dsn})


def test_check_shows_the_plan_and_changes_nothing(existing: str) -> None:
    before = _fingerprints(existing, "public")
    shape_before = _shape(existing)
    report = migrate.run_upgrade(existing, check=True)
    assert report.check is True
    assert [m.version for m in report.applied] == [m.version for m in migrate.discover()]
    assert report.adopted == {t: (c, r) for t, (_, c, r) in EXPECTED_COUNTS.items()}
    assert [(r.table, r.row_id, r.rule) for r in report.rejects] == EXPECTED_REJECTS
    assert report.columns_not_carried == [("workflow_executions", "legacy_note")]
    # nothing changed: the user's tables are where they were, as they were
    assert _fingerprints(existing, "public") == before
    assert _shape(existing) == shape_before
    with psycopg.connect(existing) as conn:
        assert conn.execute("SELECT to_regnamespace('lifecycle_adopted')").fetchone() == (None,)
        assert conn.execute("SELECT to_regclass('lifecycle.schema_migrations')").fetchone() == (None,)


def test_upgrade_adopts_the_tables_and_keeps_every_row(existing: str, template_db: str, server_dsn: str) -> None:
    before = _fingerprints(existing, "public")
    report = migrate.run_upgrade(existing)
    assert report.adopted == {t: (c, r) for t, (_, c, r) in EXPECTED_COUNTS.items()}
    assert [(r.table, r.row_id, r.rule) for r in report.rejects] == EXPECTED_REJECTS
    assert {t: n for t, (n, _) in before.items()} == {t: n for t, (n, _, _) in EXPECTED_COUNTS.items()}

    # the originals: moved, untouched
    assert _fingerprints(existing, "lifecycle_adopted") == before
    # the new tables: exactly the shipped schema (same columns, types, defaults, constraints)
    template = re.sub(r"dbname=\S+", f"dbname={template_db}", psycopg.conninfo.make_conninfo(server_dsn))
    assert _shape(existing) == _shape(template)
    with connect(existing) as conn:
        assert schema_problems(conn)[1] == []  # doctor: every object as shipped
        counts = {
            t: conn.execute(
                psycopg.sql.SQL("SELECT count(*) AS n FROM {}").format(psycopg.sql.Identifier(t))
            ).fetchone()
            for t in TABLES
        }
        assert {t: c["n"] for t, c in counts.items() if c} == {t: c for t, (_, c, _) in EXPECTED_COUNTS.items()}
        # every rejected row is listed with the whole row
        rejects = conn.execute(
            "SELECT table_name, row_id, rule, row_data ->> 'id' AS data_id FROM lifecycle.adoption_rejects ORDER BY id"
        ).fetchall()
        assert [(r["table_name"], r["row_id"], r["rule"]) for r in rejects] == EXPECTED_REJECTS
        assert all(r["row_id"] == r["data_id"] for r in rejects)

        # copied values: statuses kept (history is not replayed), a NULL context takes our default
        execs = {
            str(r["id"]): (r["status"], r["current_stage"], r["context"], r["created_by"] and str(r["created_by"]))
            for r in conn.execute("SELECT id, status, current_stage, context, created_by FROM workflow_executions")
        }
        assert execs == {
            "e0000000-0000-4000-8000-000000000001": (
                "completed",
                "integrity",
                {"customer": "ACME Corp"},
                "11111111-1111-4111-8111-111111111111",
            ),
            "e0000000-0000-4000-8000-000000000002": (
                "in_progress",
                "qualify",
                {"customer": "Globex"},
                "22222222-2222-4222-8222-222222222222",
            ),
            "e0000000-0000-4000-8000-000000000005": ("failed", "target_design", {}, None),
        }
        # events: new integer ids in time order, chained; the identity sequence continues after them
        events = conn.execute('SELECT id, event_type, "timestamp" FROM workflow_events ORDER BY id').fetchall()
        assert [e["id"] for e in events] == list(range(1, 8))
        assert [e["timestamp"] for e in events] == sorted(e["timestamp"] for e in events)
        assert events[0]["event_type"] == "agent_registered"
        row = conn.execute("INSERT INTO workflow_events (event_type) VALUES ('after_adoption') RETURNING id").fetchone()
        assert row == {"id": 8}
        verified = audit.verify(conn)
        assert (verified.ok, verified.events, verified.streams, verified.unchained) == (True, 8, 3, 0)
        # history is not news: an adopted workflow_failed event records no alert
        failed = conn.execute("SELECT count(*) AS n FROM workflow_events WHERE event_type = 'workflow_failed'")
        assert failed.fetchone() == {"n": 1}
        assert conn.execute("SELECT count(*) AS n FROM lifecycle.alerts").fetchone() == {"n": 0}
        # the engine's state machine is back on: a new execution cannot be inserted completed
        with pytest.raises(psycopg.errors.CheckViolation, match="inserted as pending or in_progress"):
            conn.execute(
                "INSERT INTO workflow_executions (workflow_definition_id, status)"
                " VALUES ('d0000000-0000-4000-8000-000000000001', 'completed')"
            )
    # a second upgrade has nothing to do
    again = migrate.run_upgrade(existing)
    assert (again.applied, again.adopted, again.rejects) == ([], {}, [])


def test_db_upgrade_prints_the_plan_and_the_rejects(existing: str) -> None:
    plan = _cli(existing, "db", "upgrade", "--check")
    assert plan.exit_code == 0, plan.output
    lines = plan.output.splitlines()
    assert lines[0] == "plan (--check: nothing is changed)"
    assert lines[1].startswith("would adopt the existing tables workflow_definitions, agents, agent_ontologies,")
    assert "would copy workflow_executions: 3 rows, 2 rejected" in lines
    assert (
        "REJECTED workflow_executions id=e0000000-0000-4000-8000-000000000003 rule=workflow_executions_status_valid: "
        'new row for relation "workflow_executions" violates check constraint "workflow_executions_status_valid"'
    ) in lines
    assert (
        "REJECTED workflow_executions id=e0000000-0000-4000-8000-000000000004 rule=lifecycle.guard_execution_row: "
        "current_stage launch is not a stage of the DAG that execution e0000000-0000-4000-8000-000000000004 runs"
    ) in lines
    assert lines[-2:] == [
        "6 rows not copied: would be kept in lifecycle_adopted and listed in lifecycle.adoption_rejects",
        "column workflow_executions.legacy_note is not ours: its values stay in lifecycle_adopted.workflow_executions",
    ]
    done = _cli(existing, "db", "upgrade", "--json")
    assert done.exit_code == 0, done.output
    import json

    doc = json.loads(done.output)
    assert doc["check"] is False
    assert doc["adopted"]["workflow_events"] == {"copied": 7, "rejected": 1}
    assert [(r["table"], r["row_id"], r["rule"]) for r in doc["rejects"]] == EXPECTED_REJECTS
    assert _cli(existing, "db", "upgrade").output == "database is up to date\n"


def test_an_earlier_adoptions_schema_is_never_overwritten(existing: str) -> None:
    with psycopg.connect(existing, autocommit=True) as conn:
        conn.execute("CREATE SCHEMA lifecycle_adopted")
    with pytest.raises(psycopg.errors.DuplicateSchema, match="lifecycle_adopted exists already"):
        migrate.run_upgrade(existing)
    with psycopg.connect(existing) as conn:  # nothing half-done
        assert conn.execute("SELECT to_regclass('public.workflow_executions') IS NOT NULL").fetchone() == (True,)
        assert conn.execute("SELECT to_regclass('lifecycle.schema_migrations')").fetchone() == (None,)


# ---------------------------------------------------------------------------------------------
# --repair


def _drift(dsn: str) -> list[tuple[str, str, str]]:
    with psycopg.connect(dsn) as conn:
        return [(str(k), str(o), str(p)) for k, o, p in conn.execute("SELECT * FROM lifecycle.schema_drift()")]


def _feed_rows(dsn: str, name: str) -> int:
    """Rows of workflow_audit_feed for one execution with 2 stage logs and 6 events (4 inserted here,
    2 ``stage_started`` the stage-log trigger records for the logs inserted by hand)."""
    with psycopg.connect(dsn, autocommit=True, row_factory=dict_row) as conn:
        conn.execute(
            "INSERT INTO workflow_definitions (name, version, dag_schema, is_active) VALUES (%(name)s, 1,"
            ' \'{"stages": [{"id": "a", "capability": "x"}, {"id": "b", "capability": "x"}],'
            ' "edges": [{"from": "a", "to": "b"}]}\', true)',
            {"name": name},
        )
        eid = conn.execute(
            "INSERT INTO workflow_executions (workflow_definition_id, status)"
            " SELECT id, 'in_progress' FROM workflow_definitions WHERE name = %s RETURNING id",
            (name,),
        ).fetchone()["id"]  # type: ignore[index]
        for stage in ("a", "b"):
            conn.execute(
                "INSERT INTO workflow_execution_logs (execution_id, stage_id, status) VALUES (%s, %s, 'in_progress')",
                (eid, stage),
            )
            for kind in ("stage_started", "stage_note"):
                conn.execute(
                    "INSERT INTO workflow_events (execution_id, event_type, stage_id) VALUES (%s, %s, %s)",
                    (eid, kind, stage),
                )
        n = conn.execute("SELECT count(*) AS n FROM workflow_audit_feed WHERE execution_id = %s", (eid,)).fetchone()
        assert n is not None
        return int(n["n"])


def test_repair_restores_what_the_runbook_and_hands_changed(db: str) -> None:
    with psycopg.connect(db, autocommit=True) as conn:
        for section in (2, 3, 4, 5):
            conn.execute(runbook_section(section))
        conn.execute("CREATE POLICY everyone_reads ON workflow_executions FOR SELECT TO anon USING (true)")
        conn.execute("ALTER TABLE task_queue DISABLE ROW LEVEL SECURITY")
        conn.execute("DROP TRIGGER task_queue_notify ON task_queue")
        conn.execute("DROP POLICY authenticated_read_own ON workflow_events")
        conn.execute("GRANT EXECUTE ON FUNCTION lifecycle.task_claim TO anon")
        conn.execute(
            "CREATE OR REPLACE FUNCTION lifecycle.breaker_defaults() RETURNS jsonb LANGUAGE sql IMMUTABLE"
            " AS $$ SELECT '{\"window_s\": 1}'::jsonb $$"
        )
    assert _feed_rows(db, "feed_before") == 12  # the runbook's feed multiplies: 2 logs x 6 events
    claim = (
        "function lifecycle.task_claim(p_worker text, p_agent_name text, p_limit integer, "
        "p_lease_s double precision, p_now timestamp with time zone)"
    )
    assert _drift(db) == [
        ("function", "lifecycle.breaker_defaults()", "changed"),
        ("function", "public.perform_workflow_compensation(p_execution_id uuid, p_reason text)", "changed"),
        ("function", "public.retry_stage(p_log_id uuid, p_max_attempts integer)", "changed"),
        ("function", "public.trip_circuit_breaker(p_execution_id uuid, p_reason text)", "changed"),
        ("policy", "authenticated_read_own on public.workflow_events", "missing"),
        ("policy", "everyone_reads on public.workflow_executions", "extra"),
        ("privileges", claim, "changed"),
        ("table", "public.task_queue", "changed"),
        ("trigger", "task_queue_notify on public.task_queue", "missing"),
        ("view", "public.workflow_audit_feed", "changed"),
    ]
    result = _cli(db, "db", "upgrade", "--repair")
    assert result.exit_code == 0, result.output
    assert result.output.splitlines() == [
        "repair function lifecycle.breaker_defaults(): restored",
        "repair function public.perform_workflow_compensation(p_execution_id uuid, p_reason text): restored",
        "repair function public.retry_stage(p_log_id uuid, p_max_attempts integer): restored",
        "repair function public.trip_circuit_breaker(p_execution_id uuid, p_reason text): restored",
        "repair policy authenticated_read_own on public.workflow_events: restored",
        "repair policy everyone_reads on public.workflow_executions: dropped",
        f"repair privileges {claim}: restored",
        "repair table public.task_queue: restored",
        "repair trigger task_queue_notify on public.task_queue: restored",
        "repair view public.workflow_audit_feed: restored",
        f"applied sql/schema/ ({len(migrate.discover_schema())} files; changed: none)",
    ]
    assert _drift(db) == []
    assert _cli(db, "doctor").exit_code == 0
    assert _feed_rows(db, "feed_after") == 6  # ours again: one row per event
    with psycopg.connect(db) as conn:
        row = conn.execute(
            "SELECT has_function_privilege('anon', 'lifecycle.task_claim(text, text, integer, double precision,"
            " timestamptz)', 'EXECUTE'), lifecycle.breaker_defaults() ->> 'window_s' <> '1'"
        ).fetchone()
        assert row == (False, True)
    # a repair re-applies every schema file, whether or not one changed
    files = len(migrate.discover_schema())
    assert _cli(db, "db", "upgrade", "--repair").output == f"applied sql/schema/ ({files} files; changed: none)\n"


def test_migrating_over_drift_is_refused_until_repaired(db: str, tmp_path: Path) -> None:
    folder = tmp_path / "migrations"
    shutil.copytree(sql_dir() / "migrations", folder)
    n = len(migrate.discover()) + 1
    (folder / f"{n:04d}_next.sql").write_text(
        "ALTER TABLE agents ADD COLUMN note text;\n"
    )
    with psycopg.connect(db, autocommit=True) as conn:
        conn.execute(runbook_section(5))
    with pytest.raises(migrate.SchemaDriftError, match=r"view public.workflow_audit_feed \(changed\).*--repair"):
        migrate.run_upgrade(db, folder)
    with psycopg.connect(db) as conn:  # nothing applied
        assert conn.execute("SELECT max(version) FROM lifecycle.schema_migrations").fetchone() == (n - 1,)
    report = migrate.run_upgrade(db, folder, repair=True)
    assert [m.version for m in report.applied] == [n]
    assert ("view", "public.workflow_audit_feed", "restored") in report.repaired
    assert _drift(db) == []


def test_adopts_a_subset_of_the_tables_with_other_types(new_db: Any) -> None:
    """Two of the seven tables, a status enum, a json (not jsonb) context, text ids: converted
    through their text form; a value that does not convert is a rejected row, not a failed upgrade."""
    dsn: str = new_db()
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            """
            CREATE TYPE run_state AS ENUM ('pending', 'in_progress', 'completed');
            CREATE TABLE workflow_definitions (id text PRIMARY KEY, name text, version int, dag_schema json,
                                               is_active boolean);
            CREATE TABLE workflow_executions (id text PRIMARY KEY, workflow_definition_id text,
                                              status run_state, context json, created_by text);
            INSERT INTO workflow_definitions VALUES
              ('d0000000-0000-4000-8000-000000000009', 'tiny', 1,
               '{"stages": [{"id": "only", "capability": "x"}]}', true);
            INSERT INTO workflow_executions VALUES
              ('e0000000-0000-4000-8000-000000000010', 'd0000000-0000-4000-8000-000000000009', 'completed',
               '{"customer": "Hooli"}', NULL),
              ('e0000000-0000-4000-8000-000000000011', 'd0000000-0000-4000-8000-000000000009', 'pending',
               '{}', 'not-a-uuid');
            """
        )
    report = migrate.run_upgrade(dsn)
    assert report.adopted == {"workflow_definitions": (1, 0), "workflow_executions": (1, 1)}
    assert [(r.table, r.row_id, r.rule) for r in report.rejects] == [
        ("workflow_executions", "e0000000-0000-4000-8000-000000000011", "sqlstate 22P02")
    ]
    assert report.rejects[0].message == 'invalid input syntax for type uuid: "not-a-uuid"'
    with connect(dsn) as conn:
        row = conn.execute("SELECT status, context FROM workflow_executions").fetchone()
        assert row == {"status": "completed", "context": {"customer": "Hooli"}}
        # the tables the user did not have are ours, empty
        assert conn.execute("SELECT count(*) AS n FROM task_queue").fetchone() == {"n": 0}
