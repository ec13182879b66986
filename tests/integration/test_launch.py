"""Launching by inserting a row: the launch sensor (run key = execution id), pending reasons,
manual executions left alone, and `lifecycle-dagster start` with the daemon running."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import dagster as dg
import pytest
from click.testing import CliRunner
from psycopg.types.json import Jsonb

from lifecycle_dagster.cli import main as cli_main
from lifecycle_dagster.location.definitions import definitions_from_snapshot, fetch_snapshot
from lifecycle_dagster.location.job_factory import EXECUTION_ID_TAG
from lifecycle_dagster.location.sensors import LAUNCH_BATCH, launch_requests
from lifecycle_dagster.store.db import connect

from helpers import events, rows, running_daemon

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
ACME = json.loads((REPO / "examples/acme.json").read_text())


def _insert(db: str, status: str = "pending", version: int = 1) -> str:
    with connect(db) as conn:
        row = conn.execute(
            "INSERT INTO workflow_executions (workflow_definition_id, status, context)"
            " SELECT id, %s, %s FROM workflow_definitions WHERE name = 'lifecycle_v1' AND version = %s"
            " RETURNING id::text",
            (status, Jsonb(ACME), version),
        ).fetchone()
    assert row is not None
    return str(row["id"])


def test_pending_rows_become_run_requests_keyed_by_execution(seeded_db: str, instance: Any) -> None:
    pending = _insert(seeded_db)
    _insert(seeded_db, status="in_progress")  # driven by hand: never launched
    defs = definitions_from_snapshot(fetch_snapshot(seeded_db))
    repo = defs.get_repository_def()
    sensor = repo.get_sensor_def("lifecycle_launch_sensor")
    data = sensor.evaluate_tick(dg.build_sensor_context(instance=instance, repository_def=repo))
    assert [(r.run_key, r.job_name, r.tags[EXECUTION_ID_TAG]) for r in data.run_requests] == [
        (pending, "lifecycle_v1__v1", pending)
    ]
    # the run it asks for executes the pending row (the first op binds the run id)
    [req] = data.run_requests
    result = repo.get_job("lifecycle_v1__v1").execute_in_process(instance=instance, tags=dict(req.tags))
    assert result.success
    [ex] = rows(seeded_db, "SELECT status, dagster_run_id FROM workflow_executions WHERE id = %(e)s", e=pending)
    assert ex == {"status": "completed", "dagster_run_id": result.run_id}
    assert list(launch_requests(["lifecycle_v1__v1"], seeded_db)) == []


def test_a_version_not_loaded_waits_with_a_visible_reason(seeded_db: str) -> None:
    with connect(seeded_db) as conn:
        conn.execute(
            "SELECT lifecycle.definition_publish('lifecycle_v1', 'v2',"
            ' dag_schema || \'{"on_failure": "hold"}\', true) FROM workflow_definitions WHERE version = 1'
        )
    eid = _insert(seeded_db, version=2)
    for _ in range(2):  # the code location still has only v1: the row waits, saying why, once
        assert list(launch_requests(["lifecycle_v1__v1"], seeded_db)) == []
    [ex] = rows(seeded_db, "SELECT status, pending_reason FROM workflow_executions WHERE id = %(e)s", e=eid)
    assert ex["status"] == "pending"
    assert (
        ex["pending_reason"] == "job lifecycle_v1__v2 is not loaded: reload the code location to pick up this version"
    )
    assert [t for t, _, _ in events(seeded_db, eid)] == ["launch_waiting"]
    [req] = list(launch_requests(["lifecycle_v1__v1", "lifecycle_v1__v2"], seeded_db))  # after a reload
    assert req.run_key == eid


def test_rows_of_versions_not_loaded_never_keep_a_launchable_row_waiting(seeded_db: str) -> None:
    """A batch of the oldest pending rows once held only rows of a version the code location had not
    loaded: 100 of them kept every newer row from launching."""
    with connect(seeded_db) as conn:
        conn.execute(
            "SELECT lifecycle.definition_publish('lifecycle_v1', 'v2',"
            ' dag_schema || \'{"on_failure": "hold"}\', true) FROM workflow_definitions WHERE version = 1'
        )
        conn.execute(
            "INSERT INTO workflow_executions (workflow_definition_id, status, context, created_at)"
            " SELECT id, 'pending', '{}', now() - interval '1 hour' + g * interval '1 ms'"
            " FROM workflow_definitions, generate_series(1, %s) g WHERE version = 2",
            (LAUNCH_BATCH + 20,),
        )
    launchable = _insert(seeded_db, version=1)  # the newest row
    for tick in (1, 2, 3):  # the waiting rows say why, a batch per tick, and block nothing meanwhile
        assert [r.run_key for r in launch_requests(["lifecycle_v1__v1"], seeded_db)] == [launchable]
        waiting = rows(
            seeded_db,
            "SELECT count(*) AS n FROM workflow_executions"
            " WHERE pending_reason LIKE 'job lifecycle_v1__v2 is not loaded%%'",
        )
        assert waiting == [{"n": min(tick * LAUNCH_BATCH, LAUNCH_BATCH + 20)}]


def test_run_binds_its_execution_before_a_daemon_could_launch_it(
    seeded_db: str, dagster_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`lifecycle-dagster run` once inserted its row unbound: a running daemon's launch sensor launched
    it a second time. The sensor's view just before `run` executes its job is checked here."""
    seen: list[list[str]] = []
    real = cli_main.execute_here

    def execute_here(dsn: str, job: Any, tags: dict[str, str], run_id: str | None = None) -> Any:
        seen.append([r.run_key or "" for r in launch_requests(["lifecycle_v1__v1"], dsn)])
        return real(dsn, job, tags, **({} if run_id is None else {"run_id": run_id}))

    monkeypatch.setattr(cli_main, "execute_here", execute_here)
    result = CliRunner().invoke(
        cli_main.main,
        ["run", "lifecycle_v1", "--context", str(REPO / "examples/acme.json")],
        env={"DAGSTER_HOME": str(dagster_home)},
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output
    assert seen == [[]]
    run_id = next(line.split()[2][:-1] for line in result.output.splitlines() if line.startswith("dagster run "))
    [ex] = rows(seeded_db, "SELECT status, dagster_run_id FROM workflow_executions")
    assert ex == {"status": "completed", "dagster_run_id": run_id}


@pytest.mark.slow
def test_daemon_launches_every_pending_row_once(seeded_db: str, dagster_home: Path, tmp_path: Path) -> None:
    n = int(os.environ.get("LIFECYCLE_TEST_LAUNCH_N", "12"))
    ids = [_insert(seeded_db) for _ in range(n)]
    env = {**os.environ, "DATABASE_URL": seeded_db, "DAGSTER_HOME": str(dagster_home)}
    with running_daemon(env, tmp_path / "daemon.log"):
        started = subprocess.run(
            [
                str(BIN / "lifecycle-dagster"),
                "start",
                "lifecycle_v1",
                "--context",
                "examples/acme.json",
                "--wait",
                "--timeout",
                "240",
            ],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert started.returncode == 0, started.stderr[-3000:]
        ids.append(started.stdout.splitlines()[0].strip())
        assert "stage integrity: completed (attempt 1, agent Integrity Agent, " in started.stderr
        assert "summary: completed, 5/5 stages done, " in started.stdout
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            done = rows(seeded_db, "SELECT count(*) AS n FROM workflow_executions WHERE status = 'completed'")[0]["n"]
            if done == len(ids):
                break
            time.sleep(1)
    ex = rows(seeded_db, "SELECT id::text AS id, status, dagster_run_id FROM workflow_executions")
    assert sorted(e["id"] for e in ex) == sorted(ids)
    assert {e["status"] for e in ex} == {"completed"}, (tmp_path / "daemon.log").read_text()[-3000:]
    assert len({e["dagster_run_id"] for e in ex}) == len(ids)  # one run each, written back
    instance = dg.DagsterInstance.from_config(str(dagster_home))
    try:
        for e in ex:
            runs = instance.get_runs(dg.RunsFilter(tags={EXECUTION_ID_TAG: e["id"]}))
            assert [r.run_id for r in runs] == [e["dagster_run_id"]]
    finally:
        instance.dispose()
