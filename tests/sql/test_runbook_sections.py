"""The runbook's sections 1 to 8, run verbatim in order on a migrated and seeded database, leave
every engine path working: the engine calls only ``lifecycle.*``, so the runbook's own
``perform_workflow_compensation``, ``retry_stage``, ``trip_circuit_breaker`` and
``workflow_audit_feed`` replace our public wrappers instead of adding overloads. ``doctor`` names
the four replaced objects and ``db upgrade --repair`` restores them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import psycopg
from click.testing import CliRunner, Result

from lifecycle_dagster.cli.main import main

from helpers import runbook_section, runbook_statements

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def _cli(db: str, home: Path, *args: str) -> Result:
    return CliRunner().invoke(main, list(args), env={"DATABASE_URL": db, "DAGSTER_HOME": str(home)})


def _sections_1_to_8(db: str) -> None:
    with psycopg.connect(db, autocommit=True) as conn:
        for section in range(1, 8):
            conn.execute(runbook_section(section))
        create, advance = runbook_statements(8)  # the second uses the id the first returned
        row = conn.execute(create).fetchone()
        assert row is not None
        conn.execute(advance.replace("$EXECUTION_ID", str(row[0])))


def _problems(result: Result) -> list[tuple[str, str, str]]:
    doc: dict[str, Any] = json.loads(result.output)
    return [(p["kind"], p["object"], p["problem"]) for p in doc["problems"]]


def _execution(db: str, output: str) -> dict[str, Any]:
    eid = next(line.split()[1] for line in output.splitlines() if line.startswith("execution "))
    with psycopg.connect(db) as conn:
        row = conn.execute(
            "SELECT e.status, d.version FROM workflow_executions e"
            " JOIN workflow_definitions d ON d.id = e.workflow_definition_id WHERE e.id = %s",
            (eid,),
        ).fetchone()
    assert row is not None
    return {"id": eid, "status": row[0], "version": row[1]}


def test_engine_paths_work_after_the_runbook_sections_1_to_8(seeded_db: str, dagster_home: Path) -> None:
    _sections_1_to_8(seeded_db)

    # section 6 made v2 active: its extra stage post_integrity (capability 'audit') hangs off no
    # edge and no seeded agent has that capability, so the run fails and is compensated
    bad = _cli(seeded_db, dagster_home, "run", "lifecycle_v1", "--context", str(EXAMPLES / "acme.json"))
    assert bad.exit_code == 1, bad.output
    failed = _execution(seeded_db, bad.output)
    assert (failed["status"], failed["version"]) == ("failed", 2)
    comp = _cli(seeded_db, dagster_home, "compensate", failed["id"])
    assert comp.exit_code == 0, comp.output
    assert _execution(seeded_db, f"execution {failed['id']}")["status"] == "rolled_back"

    # back to v1, which completes
    assert _cli(seeded_db, dagster_home, "activate", "lifecycle_v1", "1").exit_code == 0
    ok = _cli(seeded_db, dagster_home, "run", "lifecycle_v1", "--context", str(EXAMPLES / "acme.json"))
    assert ok.exit_code == 0, ok.output
    assert _execution(seeded_db, ok.output) | {"id": None} == {"id": None, "status": "completed", "version": 1}

    verify = _cli(seeded_db, dagster_home, "audit", "verify", "--json")
    assert verify.exit_code == 0, verify.output
    assert json.loads(verify.output)["ok"] is True

    breakers = _cli(seeded_db, dagster_home, "breakers", "--json")
    assert breakers.exit_code == 0, breakers.output

    # the runbook replaced four objects of ours: doctor names them, --repair restores them
    doctor = _cli(seeded_db, dagster_home, "doctor", "--json")
    assert doctor.exit_code == 1
    assert _problems(doctor) == [
        ("function", "public.perform_workflow_compensation(p_execution_id uuid, p_reason text)", "changed"),
        ("function", "public.retry_stage(p_log_id uuid, p_max_attempts integer)", "changed"),
        ("function", "public.trip_circuit_breaker(p_execution_id uuid, p_reason text)", "changed"),
        ("view", "public.workflow_audit_feed", "changed"),
    ]
    repair = _cli(seeded_db, dagster_home, "db", "upgrade", "--repair")
    assert repair.exit_code == 0, repair.output
    again = _cli(seeded_db, dagster_home, "doctor", "--json")
    assert again.exit_code == 0, again.output
    assert _problems(again) == []


def test_the_runbook_functions_replace_wrappers_and_add_no_overload(db: str) -> None:
    with psycopg.connect(db, autocommit=True) as conn:
        for section in (2, 3, 4, 5):
            conn.execute(runbook_section(section))
        counts = conn.execute(
            "SELECT p.proname, count(*) FROM pg_proc p WHERE p.pronamespace = 'public'::regnamespace"
            " AND p.proname IN ('perform_workflow_compensation', 'retry_stage', 'trip_circuit_breaker')"
            " GROUP BY 1 ORDER BY 1"
        ).fetchall()
    assert counts == [("perform_workflow_compensation", 1), ("retry_stage", 1), ("trip_circuit_breaker", 1)]


def test_section_8_by_hand_fills_the_audit_feed_and_doctor_names_the_execution_left_at_its_end(
    seeded_db: str, dagster_home: Path
) -> None:
    """The runbook runs section 8 "to validate event logging and audit feed population": each stage
    log it inserts by hand records its event (lifecycle.stage_log_event), so the feed fills; driven
    by hand to its last stage, the execution stays in_progress and doctor --invariants says why."""
    create, advance = runbook_statements(8)
    with psycopg.connect(seeded_db, autocommit=True) as conn:
        row = conn.execute(create).fetchone()
        assert row is not None
        eid = str(row[0])
        conn.execute(advance.replace("$EXECUTION_ID", eid))
        feed = conn.execute(
            "SELECT event_type, stage_id, stage_status, metadata FROM workflow_audit_feed"
            " WHERE execution_id = %s AND event_type IS NOT NULL",
            (eid,),
        ).fetchall()
        assert [(f[0], f[1], f[2]) for f in feed] == [("stage_completed", "discover", "completed")]
        assert feed[0][3] | {"db_user": None} == {
            "status": "completed",
            "attempt": 1,
            "recorded_by": "stage_log_trigger",
            "db_user": None,
        }
        # "Repeat for subsequent stages": the same two statements for each stage, in DAG order
        order = conn.execute(
            "SELECT s ->> 'id' FROM workflow_executions e JOIN workflow_definitions d"
            " ON d.id = e.workflow_definition_id, jsonb_array_elements(d.dag_schema -> 'stages') s"
            " WHERE e.id = %s",
            (eid,),
        ).fetchall()
        stages = [r[0] for r in order]
        for stage, following in zip(stages[1:], [*stages[2:], stages[-1]], strict=True):
            statement = advance.replace("$EXECUTION_ID", eid).replace("'discover'", f"'{stage}'")
            conn.execute(statement.replace("current_stage = 'qualify'", f"current_stage = '{following}'"))
        types = conn.execute(
            "SELECT event_type, stage_id FROM workflow_events WHERE execution_id = %s ORDER BY id", (eid,)
        ).fetchall()
    assert types == [("stage_completed", s) for s in stages]

    verify = _cli(seeded_db, dagster_home, "audit", "verify", eid)
    assert verify.exit_code == 0, verify.output
    doctor = _cli(seeded_db, dagster_home, "doctor", "--invariants", "--json")
    assert doctor.exit_code == 1, doctor.output
    found = [v for v in json.loads(doctor.output)["violations"] if v["execution_id"] == eid]
    assert [(v["rule"], v["message"]) for v in found] == [
        (
            "not_quiesced",
            f"execution {eid} is not at rest: in_progress, driven by hand (no Dagster run) to its last stage:"
            " every stage of its DAG is completed, but nothing completes the execution (set its status to"
            f" 'completed') (idle {found[0]['message'].rsplit('idle ', 1)[1][:-1]})",
        )
    ]
