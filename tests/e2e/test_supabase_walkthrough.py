"""Issue 6's "done when", end to end: a Supabase-style client starts a lifecycle by inserting a row
as an authenticated user; the launch sensor runs it; the operator follows it with
`lifecycle-dagster status`; its run is in the Dagster instance the UI reads, tagged with the
execution id; `audit verify` proves its history intact; another user cannot see any of it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import dagster as dg
import psycopg
import pytest
from click.testing import CliRunner
from psycopg.types.json import Jsonb

from lifecycle_dagster.cli.main import main
from lifecycle_dagster.location.definitions import definitions_from_snapshot, fetch_snapshot
from lifecycle_dagster.location.job_factory import EXECUTION_ID_TAG
from lifecycle_dagster.store.db import connect

from helpers import as_role

REPO = Path(__file__).resolve().parents[2]
ACME = json.loads((REPO / "examples/acme.json").read_text())
ALICE = "aaaaaaaa-0000-4000-8000-00000000000a"
BOB = "bbbbbbbb-0000-4000-8000-00000000000b"


def _visible(dsn: str, role: str, sub: str | None, eid: str) -> dict[str, int]:
    with as_role(dsn, role, sub, commit=True) as conn:
        out = {}
        for name, query in (
            ("executions", "SELECT count(*) AS n FROM workflow_executions WHERE id = %s"),
            ("logs", "SELECT count(*) AS n FROM workflow_execution_logs WHERE execution_id = %s"),
            ("events", "SELECT count(*) AS n FROM workflow_events WHERE execution_id = %s"),
            ("feed", "SELECT count(*) AS n FROM audit_feed WHERE execution_id = %s"),
        ):
            row = conn.execute(query, (eid,)).fetchone()
            assert row is not None
            out[name] = int(row["n"])
        return out


def test_an_authenticated_user_starts_follows_and_proves_a_lifecycle_others_cannot_see(
    seeded_db: str, instance: Any, dagster_home: Path
) -> None:
    # 1. the client inserts the row (supabase.from('workflow_executions').insert(...))
    with as_role(seeded_db, "authenticated", ALICE, commit=True) as conn:
        row = conn.execute(
            "INSERT INTO workflow_executions (workflow_definition_id, context, created_by)"
            " SELECT id, %s, auth.uid() FROM workflow_definitions WHERE name = 'lifecycle_v1' AND is_active"
            " RETURNING id::text AS id, status",
            (Jsonb(ACME),),
        ).fetchone()
    assert row is not None and row["status"] == "pending"
    eid = str(row["id"])

    # 2. the launch sensor turns it into a run (run key = execution id), which executes it
    repo = definitions_from_snapshot(fetch_snapshot(seeded_db)).get_repository_def()
    tick = repo.get_sensor_def("lifecycle_launch_sensor").evaluate_tick(
        dg.build_sensor_context(instance=instance, repository_def=repo)
    )
    [request] = tick.run_requests
    assert (request.run_key, request.job_name) == (eid, "lifecycle_v1__v1")
    result = repo.get_job("lifecycle_v1__v1").execute_in_process(instance=instance, tags=dict(request.tags))
    assert result.success

    # 3. the operator follows it
    env = {"DATABASE_URL": seeded_db, "DAGSTER_HOME": str(dagster_home)}
    status = CliRunner().invoke(main, ["status", eid, "--json"], env=env)
    assert status.exit_code == 0, status.output
    doc = json.loads(status.output)
    assert doc["execution"]["status"] == "completed"
    assert (doc["execution"]["dagster_run_id"], doc["execution"]["created_by"]) == (result.run_id, ALICE)
    assert [s["stage"] for s in doc["stages"]] == [
        "discover",
        "qualify",
        "target_design",
        "value_realization",
        "integrity",
    ]
    assert {s["status"] for s in doc["stages"]} == {"completed"}

    # 4. the run the UI shows: in the instance, tagged with the execution id
    run = instance.get_run_by_id(result.run_id)
    assert run is not None and run.job_name == "lifecycle_v1__v1"
    assert run.tags[EXECUTION_ID_TAG] == eid
    assert run.status == dg.DagsterRunStatus.SUCCESS

    # 5. its history is intact
    verified = CliRunner().invoke(main, ["audit", "verify", eid, "--json"], env=env)
    assert verified.exit_code == 0, verified.output
    report = json.loads(verified.output)
    assert (report["ok"], report["streams"], report["broken"]) == (True, 1, [])
    with connect(seeded_db) as conn:
        n_events = conn.execute("SELECT count(*) AS n FROM workflow_events WHERE execution_id = %s", (eid,)).fetchone()
    assert n_events is not None and report["events"] == n_events["n"] >= 12

    # 6. Alice sees all of it; Bob nothing; anon cannot even ask
    assert _visible(seeded_db, "authenticated", ALICE, eid) == {
        "executions": 1,
        "logs": 5,
        "events": n_events["n"],
        "feed": n_events["n"],
    }
    assert _visible(seeded_db, "authenticated", BOB, eid) == {"executions": 0, "logs": 0, "events": 0, "feed": 0}
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        _visible(seeded_db, "anon", None, eid)
