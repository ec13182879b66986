"""The product through Dagster's own processes: `dagster job execute`, `dagster job launch` plus
a run worker, and the `lifecycle-dagster run` command. Each spawns real processes."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from psycopg.types.json import Jsonb

from lifecycle_dagster.store.db import connect

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
pytestmark = pytest.mark.slow


def _wait_for_code_servers(timeout_s: float) -> None:
    """Wait until no `dagster api grpc` child of this process is alive."""
    import psutil

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        alive = [
            p
            for p in psutil.Process().children(recursive=True)
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE and "grpc" in " ".join(p.cmdline())
        ]
        if not alive:
            return
        time.sleep(0.5)
    raise AssertionError(f"code servers still running after {timeout_s} s: {[p.pid for p in alive]}")


def _env(dsn: str, home: Path) -> dict[str, str]:
    return {**os.environ, "DATABASE_URL": dsn, "DAGSTER_HOME": str(home)}


def _executions(dsn: str) -> list[dict[str, Any]]:
    with connect(dsn) as conn:
        return [
            dict(r)
            for r in conn.execute(
                "SELECT e.id, e.status, e.dagster_run_id, d.version,"
                " (SELECT array_agg(l.stage_id || ':' || l.status ORDER BY l.started_at)"
                "    FROM workflow_execution_logs l WHERE l.execution_id = e.id) AS stages"
                " FROM workflow_executions e JOIN workflow_definitions d ON d.id = e.workflow_definition_id"
            ).fetchall()
        ]


FIVE = [
    "discover:completed",
    "qualify:completed",
    "target_design:completed",
    "value_realization:completed",
    "integrity:completed",
]


def test_dagster_job_execute_in_process(seeded_db: str, dagster_home: Path) -> None:
    proc = subprocess.run(
        [
            str(BIN / "dagster"),
            "job",
            "execute",
            "-m",
            "lifecycle_dagster",
            "-j",
            "lifecycle_v1__v1",
            "-c",
            "examples/acme_run.yaml",
        ],
        cwd=REPO,
        env=_env(seeded_db, dagster_home),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    [ex] = _executions(seeded_db)
    assert ex["status"] == "completed"
    assert ex["stages"] == FIVE
    assert ex["dagster_run_id"] in proc.stderr + proc.stdout


def test_dagster_job_execute_exits_1_when_integrity_fails(seeded_db: str, dagster_home: Path, tmp_path: Path) -> None:
    cfg = tmp_path / "globex.yaml"
    globex = REPO / "examples" / "globex.json"  # absolute: a relative context_file is refused
    cfg.write_text(f"resources: {{lifecycle_request: {{config: {{context_file: '{globex}'}}}}}}\n")
    proc = subprocess.run(
        [str(BIN / "dagster"), "job", "execute", "-m", "lifecycle_dagster", "-j", "lifecycle_v1__v1", "-c", str(cfg)],
        cwd=REPO,
        env=_env(seeded_db, dagster_home),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 1
    [ex] = _executions(seeded_db)
    assert ex["status"] == "failed"
    assert ex["stages"][-1] == "integrity:failed"


def test_cli_run_prints_stages_and_exit_codes(seeded_db: str, dagster_home: Path) -> None:
    ok = subprocess.run(
        [str(BIN / "lifecycle-dagster"), "run", "lifecycle_v1", "--context", "examples/acme.json"],
        cwd=REPO,
        env=_env(seeded_db, dagster_home),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert ok.returncode == 0, ok.stderr[-3000:]
    lines = ok.stdout.splitlines()
    assert lines[0].startswith("execution ")
    assert [ln.split()[0:2] for ln in lines[1:6]] == [[s.split(":")[0], "completed"] for s in FIVE]
    assert "229,250.00 USD" in lines[1]
    assert "status: completed" in ok.stdout
    bad = subprocess.run(
        [str(BIN / "lifecycle-dagster"), "run", "lifecycle_v1", "--context", "examples/globex.json"],
        cwd=REPO,
        env=_env(seeded_db, dagster_home),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert bad.returncode == 1
    assert "status: failed  (stage integrity failed: Integrity Agent: integrity failed:" in bad.stdout
    executions = _executions(seeded_db)
    assert sorted(e["status"] for e in executions) == ["completed", "failed"]


def test_run_executes_the_dag_it_was_launched_with(
    seeded_db: str, dagster_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Launch through the instance, change the table, then start the run worker: it rebuilds the
    job from the snapshot stored with the run, not from the table (where v1 is gone)."""
    from dagster import DagsterInstance, DagsterRunStatus, RunsFilter
    from dagster._core.workspace.context import WorkspaceProcessContext
    from dagster._core.workspace.load_target import WorkspaceFileTarget

    env = _env(seeded_db, dagster_home)
    monkeypatch.setenv("DAGSTER_HOME", str(dagster_home))
    # 1. submit: the instance's QueuedRunCoordinator stores the run (and its plan snapshot) as QUEUED
    tag = f"pin-{time.time_ns()}"
    proc = subprocess.run(
        [
            str(BIN / "dagster"),
            "job",
            "launch",
            "-w",
            "workspace.yaml",
            "-j",
            "lifecycle_v1__v1",
            "-c",
            "examples/acme_run.yaml",
            "--tags",
            f'{{"test/pin": "{tag}"}}',
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    instance = DagsterInstance.from_config(str(dagster_home))
    try:
        [run] = instance.get_runs(RunsFilter(tags={"test/pin": tag}))
        assert run.status == DagsterRunStatus.QUEUED
        # 2. the table changes: v2 (two stages only) replaces v1
        with connect(seeded_db) as conn, conn.transaction():
            conn.execute(
                "INSERT INTO workflow_definitions (name, version, dag_schema, is_active) VALUES"
                " ('lifecycle_v1', 2, %s, true)",
                (
                    Jsonb(
                        {
                            "stages": [
                                {"id": "discover", "capability": "opportunity", "next": ["qualify"]},
                                {"id": "qualify", "capability": "assessment"},
                            ]
                        }
                    ),
                ),
            )
            conn.execute("UPDATE workflow_definitions SET is_active = false WHERE version = 1")
        # 3. a code server loaded now only knows lifecycle_v1__v2; the run worker it starts
        #    rebuilds the launched job from the run's snapshot
        with WorkspaceProcessContext(instance, WorkspaceFileTarget(paths=[str(REPO / "workspace.yaml")])) as wpc:
            ctx = wpc.create_request_context()
            repo = ctx.get_code_location("lifecycle_dagster").get_repository("__repository__")
            assert repo.has_job("lifecycle_v1__v2") and not repo.has_job("lifecycle_v1__v1")
            instance.launch_run(run.run_id, ctx)
            deadline = time.monotonic() + 240
            while time.monotonic() < deadline:
                status = instance.get_run_by_id(run.run_id).status  # type: ignore[union-attr]
                if status in (DagsterRunStatus.SUCCESS, DagsterRunStatus.FAILURE):
                    break
                time.sleep(0.5)
        # the code server exits once it has cleared its finished run; wait for it while the
        # Dagster database still exists (it needs it to do so)
        _wait_for_code_servers(timeout_s=60)
        assert status == DagsterRunStatus.SUCCESS
    finally:
        instance.dispose()
    [ex] = _executions(seeded_db)
    assert ex["dagster_run_id"] == run.run_id
    assert ex["version"] == 1
    assert ex["status"] == "completed"
    assert ex["stages"] == FIVE


def test_a_bad_agents_registry_fails_the_code_location_load(seeded_db: str, dagster_home: Path) -> None:
    """The code location's status (what the UI shows, and `dagster definitions validate`) is a load
    error naming LIFECYCLE_DAGSTER_AGENTS, not a location that loads with no jobs."""
    env = {**_env(seeded_db, dagster_home), "LIFECYCLE_DAGSTER_AGENTS": "no_such_module_xyz:registry"}
    proc = subprocess.run(
        [str(BIN / "dagster"), "definitions", "validate", "-m", "lifecycle_dagster"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out[-3000:]
    assert "AgentsSettingError" in out
    assert "LIFECYCLE_DAGSTER_AGENTS='no_such_module_xyz:registry' names no usable agent registry" in out
    ok = subprocess.run(
        [str(BIN / "dagster"), "definitions", "validate", "-m", "lifecycle_dagster"],
        cwd=REPO,
        env=_env(seeded_db, dagster_home),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert ok.returncode == 0, (ok.stdout + ok.stderr)[-3000:]
