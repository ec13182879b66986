"""The operator commands (list, status, breakers, doctor) against real runs on real Postgres."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import psycopg
import pytest
from click.testing import CliRunner, Result

from lifecycle_dagster.agents import AgentError, AgentRegistry, Task
from lifecycle_dagster.cli.main import main
from lifecycle_dagster.store import migrate
from lifecycle_dagster.store.db import connect

from helpers import install, rows, run, runbook_section

DAG = {
    "stages": [{"id": "a", "capability": "cap_a", "next": ["b"]}, {"id": "b", "capability": "cap_b"}],
    "on_failure": "hold",
}


class Ok:
    def __init__(self, name: str) -> None:
        self.name = name

    def run(self, task: Task) -> dict[str, Any]:
        return {"summary": f"{task.stage_id} done"}


class Refuses:
    name = "agent_b"

    def run(self, task: Task) -> dict[str, Any]:
        raise AgentError("check_failed", "integrity check failed")


def _cli(db: str, home: Path, *args: str) -> Result:
    return CliRunner().invoke(main, list(args), env={"DATABASE_URL": db, "DAGSTER_HOME": str(home)})


def _json(result: Result) -> Any:
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


@pytest.fixture
def runs(db: str, instance: Any) -> dict[str, Any]:
    """wf v1: one completed run, one failed run (stage b refused), one execution driven by hand."""
    install(db, "wf", DAG, {"cap_a": "agent_a", "cap_b": "agent_b"})
    ok, completed = run(db, instance, "wf", AgentRegistry([Ok("agent_a"), Ok("agent_b")]))
    assert ok.success
    bad, failed = run(db, instance, "wf", AgentRegistry([Ok("agent_a"), Refuses()]))
    assert not bad.success
    with connect(db) as conn:  # the runbook's section 8: inserted in_progress, no run
        row = conn.execute(
            "INSERT INTO workflow_executions (workflow_definition_id, status, current_stage, context)"
            " SELECT id, 'in_progress', 'a', '{\"customer\": \"ACME\"}' FROM workflow_definitions WHERE name = 'wf'"
            " RETURNING id::text AS id"
        ).fetchone()
        assert row is not None
        conn.execute(
            "INSERT INTO workflow_execution_logs (execution_id, stage_id, status, started_at, completed_at,"
            " attempt_number, output_data) VALUES (%s, 'a', 'completed', now(), now(), 1, '{}')",
            (row["id"],),
        )
    return {
        "completed": completed,
        "completed_run": ok.run_id,
        "failed": failed,
        "failed_run": bad.run_id,
        "manual": row["id"],
    }


def _execution_rows(db: str) -> dict[str, dict[str, Any]]:
    return {
        r["id"]: r
        for r in rows(
            db,
            "SELECT id::text AS id, status, current_stage, created_at, updated_at, dagster_run_id"
            " FROM workflow_executions",
        )
    }


# ---------------------------------------------------------------------------------------------
# list


def test_list_shows_each_execution_newest_first(runs: dict[str, Any], db: str, dagster_home: Path) -> None:
    stored = _execution_rows(db)
    doc = _json(_cli(db, dagster_home, "list", "--json"))
    expected = [
        {
            "id": eid,
            "workflow": "wf",
            "version": 1,
            "status": stored[eid]["status"],
            "outcome": "completed" if stored[eid]["status"] == "completed" else None,
            "current_stage": stored[eid]["current_stage"],
            "created_at": stored[eid]["created_at"].isoformat(),
            "updated_at": stored[eid]["updated_at"].isoformat(),
            "dagster_run_id": run_id,
            "manual": manual,
        }
        for eid, run_id, manual in (
            (runs["manual"], None, True),
            (runs["failed"], runs["failed_run"], False),
            (runs["completed"], runs["completed_run"], False),
        )
    ]
    assert doc == {"executions": expected}
    assert [(e["status"], e["current_stage"]) for e in expected] == [
        ("in_progress", "a"),
        ("failed", "b"),
        ("completed", "b"),
    ]

    table = _cli(db, dagster_home, "list")
    assert table.exit_code == 0
    lines = table.output.splitlines()
    assert lines[0].split() == ["ID", "WORKFLOW", "VERSION", "STATUS", "STAGE", "CREATED", "UPDATED", "RUN"]
    fmt = "%Y-%m-%dT%H:%M:%SZ"
    assert [line.split() for line in lines[1:]] == [
        [
            e["id"],
            "wf",
            "1",
            e["status"],
            e["current_stage"],
            stored[e["id"]]["created_at"].strftime(fmt),
            stored[e["id"]]["updated_at"].strftime(fmt),
            "manual" if e["manual"] else e["dagster_run_id"],
        ]
        for e in expected
    ]


def test_list_filters(runs: dict[str, Any], db: str, dagster_home: Path) -> None:
    def ids(*args: str) -> list[str]:
        return [e["id"] for e in _json(_cli(db, dagster_home, "list", "--json", *args))["executions"]]

    assert ids("--status", "failed") == [runs["failed"]]
    assert ids("--workflow", "wf", "--status", "completed") == [runs["completed"]]
    assert ids("--workflow", "other") == []
    assert ids("--limit", "1") == [runs["manual"]]
    assert ids("--since", "1h") == [runs["manual"], runs["failed"], runs["completed"]]
    assert ids("--since", "2999-01-01T00:00:00Z") == []
    assert ids("--since", "2000-01-01") == [runs["manual"], runs["failed"], runs["completed"]]
    assert _cli(db, dagster_home, "list", "--workflow", "other").output == "no executions\n"
    bad = _cli(db, dagster_home, "list", "--since", "yesterday")
    assert bad.exit_code == 2
    assert "'yesterday': expected an ISO 8601 time" in bad.output
    assert _cli(db, dagster_home, "list", "--status", "done").exit_code == 2


# ---------------------------------------------------------------------------------------------
# status


def _logs(db: str, eid: str) -> dict[str, dict[str, Any]]:
    return {
        r["stage_id"]: r
        for r in rows(
            db,
            "SELECT stage_id, round(extract(epoch FROM (completed_at - started_at))::numeric, 3)::float8 AS d"
            " FROM workflow_execution_logs WHERE execution_id = %(e)s",
            e=eid,
        )
    }


def test_status_of_a_completed_and_a_failed_run(runs: dict[str, Any], db: str, dagster_home: Path) -> None:
    stored = _execution_rows(db)
    done = _logs(db, runs["completed"])
    doc = _json(_cli(db, dagster_home, "status", runs["completed"], "--json"))
    assert doc["execution"] == {
        "id": runs["completed"],
        "workflow": "wf",
        "version": 1,
        "status": "completed",
        "current_stage": "b",
        "created_at": stored[runs["completed"]]["created_at"].isoformat(),
        "updated_at": stored[runs["completed"]]["updated_at"].isoformat(),
        "dagster_run_id": runs["completed_run"],
        "compensation_run_id": None,
        "error_message": None,
        "created_by": None,
        "pending_reason": None,
        "outcome": "completed",
        "outcome_reason": None,
        "manual": False,
        "batch_id": None,
        "batch_size": None,
        "batch_run_id": None,
        "batch_left_at": None,
        "batch_left_reason": None,
    }
    assert [
        {k: s[k] for k in ("stage", "capability", "status", "attempts", "duration_s", "agent", "error")}
        for s in doc["stages"]
    ] == [
        {
            "stage": "a",
            "capability": "cap_a",
            "status": "completed",
            "attempts": 1,
            "duration_s": done["a"]["d"],
            "agent": "agent_a",
            "error": None,
        },
        {
            "stage": "b",
            "capability": "cap_b",
            "status": "completed",
            "attempts": 1,
            "duration_s": done["b"]["d"],
            "agent": "agent_b",
            "error": None,
        },
    ]

    failed = _logs(db, runs["failed"])
    result = _cli(db, dagster_home, "status", runs["failed"])
    assert result.exit_code == 0
    lines = result.output.splitlines()
    assert lines[0] == f"execution {runs['failed']}  wf v1"
    assert lines[1] == "  status:   failed  (stage b failed: agent_b: integrity check failed)"
    assert lines[4] == f"  run:      {runs['failed_run']}"
    table = lines[lines.index("") + 1 :]
    assert table[0].split() == ["STAGE", "STATUS", "ATTEMPTS", "DURATION", "AGENT", "ERROR"]
    assert table[1].split() == ["a", "completed", "1", f"{failed['a']['d']:.3f}s", "agent_a", "-"]
    assert re.split(r"\s{2,}", table[2]) == [
        "b",
        "failed",
        "1",
        f"{failed['b']['d']:.3f}s",
        "agent_b",
        "agent_b: integrity check failed",
    ]

    manual = _cli(db, dagster_home, "status", runs["manual"])
    assert "  run:      manual" in manual.output.splitlines()
    assert manual.output.splitlines()[-1].split() == ["b", "not_started", "-", "-", "-", "-"]


@pytest.mark.parametrize(
    ("arg", "message"),
    [
        ("00000000-0000-4000-8000-000000000000", "Error: no execution 00000000-0000-4000-8000-000000000000"),
        ("not-a-uuid", "Error: not an execution id: 'not-a-uuid' (expected a UUID)"),
    ],
)
def test_status_of_an_unknown_execution(db: str, dagster_home: Path, arg: str, message: str) -> None:
    result = _cli(db, dagster_home, "status", arg)
    assert result.exit_code == 1
    assert result.output.startswith(message)


# ---------------------------------------------------------------------------------------------
# breakers


def test_breakers_show_and_reset(runs: dict[str, Any], db: str, dagster_home: Path) -> None:
    with connect(db) as conn:  # opens the breaker of the agent whose task failed (agent_b)
        conn.execute("SELECT trip_circuit_breaker(%s, 'operator stop')", (runs["failed"],))
    doc = _json(_cli(db, dagster_home, "breakers", "--json"))
    assert doc["reset"] is None
    brief = [(b["scope"], b["name"], b["state"], b["serves"], b["calls"], b["failures"]) for b in doc["breakers"]]
    assert brief == [
        ("agent", "agent_a", "closed", "cap_a", 2, 0),
        ("agent", "agent_b", "open", "cap_b", 2, 1),
        ("capability", "cap_a", "closed", None, 2, 0),
        ("capability", "cap_b", "closed", None, 2, 1),
    ]
    opened = doc["breakers"][1]
    assert opened["opened_at"] == opened["state_since"] and opened["half_open_at"] is not None

    result = _cli(db, dagster_home, "breakers", "--reset", "agent_b")
    assert result.exit_code == 0
    lines = result.output.splitlines()
    assert lines[0] == "reset: the breaker of agent 'agent_b' is closed (it was open)"
    assert lines[1].split() == [
        "SCOPE",
        "NAME",
        "STATE",
        "SINCE",
        "HALF-OPENS",
        "AT",
        "CALLS",
        "FAILURES",
        "RATE",
        "P95",
        "MS",
        "SERVES",
    ]
    assert [line.split()[:3] for line in lines[2:]] == [
        ["agent", "agent_a", "closed"],
        ["agent", "agent_b", "closed"],
        ["capability", "cap_a", "closed"],
        ["capability", "cap_b", "closed"],
    ]
    [event] = rows(
        db,
        "SELECT execution_id, metadata FROM workflow_events WHERE event_type = 'breaker_closed'",
    )
    [agent] = rows(db, "SELECT id::text AS id FROM agents WHERE name = 'agent_b'")
    assert event["execution_id"] is None
    opened_at = event["metadata"].pop("opened_at")
    assert opened_at is not None
    assert event["metadata"] == {
        "scope": "agent",
        "key": agent["id"],
        "agent": "agent_b",
        "capability": "cap_b",
        "from": "open",
        "reason": "reset",
    }
    # counting starts afresh: the failure before the reset is out of the window
    after = _json(_cli(db, dagster_home, "breakers", "--json", "--reset", "agent_b"))
    assert after["reset"] == {"agent": "agent_b", "previous_state": "closed", "closed": False}
    assert [(b["name"], b["state"], b["calls"]) for b in after["breakers"] if b["scope"] == "agent"] == [
        ("agent_a", "closed", 2),
        ("agent_b", "closed", 0),
    ]
    again = _cli(db, dagster_home, "breakers", "--reset", "agent_b")
    assert again.output.splitlines()[0] == "reset: the breaker of agent 'agent_b' was already closed: nothing to do"
    assert rows(db, "SELECT count(*) AS n FROM workflow_events WHERE event_type = 'breaker_closed'") == [{"n": 1}]


def test_resetting_an_unknown_agent_is_an_error(db: str, dagster_home: Path) -> None:
    result = _cli(db, dagster_home, "breakers", "--reset", "nobody")
    assert result.exit_code == 1
    assert result.output == "Error: unknown agent 'nobody' (lifecycle-dagster breakers lists them)\n"


# ---------------------------------------------------------------------------------------------
# doctor


def _problems(result: Result) -> list[tuple[str, str, str]]:
    assert result.exit_code == 1, result.output
    doc = json.loads(result.output)
    assert doc["ok"] is False
    return [(p["kind"], p["object"], p["problem"]) for p in doc["problems"]]


def test_doctor_is_clean_on_a_fresh_database(db: str, dagster_home: Path) -> None:
    result = _cli(db, dagster_home, "doctor")
    assert result.exit_code == 0, result.output
    n = len(migrate.discover())
    with connect(db) as conn:
        row = conn.execute("SELECT count(*) AS n FROM lifecycle.schema_fingerprints").fetchone()
    assert row is not None
    assert result.output == f"doctor: ok ({n} migrations applied as shipped, {row['n']} schema objects as shipped)\n"


def test_doctor_finds_the_runbooks_sections_re_applied(db: str, dagster_home: Path) -> None:
    with psycopg.connect(db, autocommit=True) as conn:
        conn.execute(runbook_section(5))  # the feed that multiplies rows
        conn.execute(runbook_section(2))  # the runbook's perform_workflow_compensation replaces our wrapper
        conn.execute(runbook_section(3))  # likewise retry_stage
        conn.execute(  # a body replaced
            "CREATE OR REPLACE FUNCTION lifecycle.breaker_defaults() RETURNS jsonb LANGUAGE sql IMMUTABLE"
            " AS $$ SELECT '{\"window_s\": 1}'::jsonb $$"
        )
    result = _cli(db, dagster_home, "doctor", "--json")
    assert _problems(result) == [
        ("function", "lifecycle.breaker_defaults()", "changed"),
        ("function", "public.perform_workflow_compensation(p_execution_id uuid, p_reason text)", "changed"),
        ("function", "public.retry_stage(p_log_id uuid, p_max_attempts integer)", "changed"),
        ("view", "public.workflow_audit_feed", "changed"),
    ]
    text = _cli(db, dagster_home, "doctor")
    assert text.exit_code == 1
    assert text.output.splitlines() == [
        "PROBLEM function lifecycle.breaker_defaults(): the installed definition is not the shipped one",
        "  fix: lifecycle-dagster db upgrade --repair",
        "PROBLEM function public.perform_workflow_compensation(p_execution_id uuid, p_reason text): the installed "
        "definition is not the shipped one (the runbook's section 2 re-applied?)",
        "  fix: lifecycle-dagster db upgrade --repair",
        "PROBLEM function public.retry_stage(p_log_id uuid, p_max_attempts integer): the installed definition is "
        "not the shipped one (the runbook's section 3 re-applied?)",
        "  fix: lifecycle-dagster db upgrade --repair",
        "PROBLEM view public.workflow_audit_feed: the installed definition is not the shipped one (the runbook's "
        "section 5 re-applied?)",
        "  fix: lifecycle-dagster db upgrade --repair",
        "doctor: 4 problems",
    ]
    # following the advice makes it clean again
    repaired = _cli(db, dagster_home, "db", "upgrade", "--repair")
    assert repaired.exit_code == 0, repaired.output
    assert _cli(db, dagster_home, "doctor").exit_code == 0


def test_doctor_finds_security_and_migration_drift(db: str, dagster_home: Path) -> None:
    with psycopg.connect(db, autocommit=True) as conn:
        conn.execute("ALTER TABLE agents DISABLE ROW LEVEL SECURITY")
        conn.execute("GRANT EXECUTE ON FUNCTION lifecycle.stage_retry(uuid, integer, timestamptz) TO anon")
        conn.execute("DROP POLICY authenticated_read_own ON workflow_events")
        conn.execute("UPDATE lifecycle.schema_migrations SET checksum = 'x' WHERE version = 1")
        conn.execute("UPDATE lifecycle.schema_files SET checksum = 'x' WHERE name = '04_stage_transitions.sql'")
    assert _problems(_cli(db, dagster_home, "doctor", "--json")) == [
        ("migration", "0001_baseline", "changed"),
        ("schema_file", "sql/schema/04_stage_transitions.sql", "pending"),
        ("policy", "authenticated_read_own on public.workflow_events", "missing"),
        (
            "privileges",
            "function lifecycle.stage_retry(p_log_id uuid, p_max_attempts integer, p_now timestamp with time zone)",
            "changed",
        ),
        ("table", "public.agents", "changed"),
    ]


def test_doctor_names_a_client_role_that_holds_service_role(db: str) -> None:
    from lifecycle_dagster.cli.ops import role_problems

    with connect(db) as conn:
        assert role_problems(conn) == []
    # roles are cluster-wide: granted inside a transaction that is rolled back, so that no other
    # database of the server ever sees it
    with connect(db, autocommit=False) as conn:
        conn.execute("GRANT service_role TO authenticated")
        problems = role_problems(conn)
        conn.rollback()
    assert [(p.kind, p.object, p.problem) for p in problems] == [("role", "authenticated", "changed")]
    assert problems[0].message == (
        "role authenticated is a member of service_role: it has that role's privileges on every object of ours"
    )
    assert problems[0].fix.startswith("REVOKE service_role FROM authenticated;")
