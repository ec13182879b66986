"""With dagster-daemon running: a failed lifecycle execution is compensated by the reconciler's
compensation run, launched and executed by the daemon, within a bounded time."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import events, rows, running_daemon

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
pytestmark = pytest.mark.slow


def test_daemon_compensates_a_failed_execution(seeded_db: str, dagster_home: Path, tmp_path: Path) -> None:
    env = {**os.environ, "DATABASE_URL": seeded_db, "DAGSTER_HOME": str(dagster_home)}
    failed = subprocess.run(
        [str(BIN / "lifecycle-dagster"), "run", "lifecycle_v1", "--context", "examples/globex.json"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert failed.returncode == 1, failed.stderr[-2000:]
    [ex] = rows(seeded_db, "SELECT id::text AS id, status FROM workflow_executions")
    assert ex["status"] == "failed"

    with running_daemon(env, tmp_path / "daemon.log"):
        t0 = time.monotonic()
        status = ex["status"]
        while time.monotonic() - t0 < 150 and status != "rolled_back":
            time.sleep(1)
            status = rows(seeded_db, "SELECT status FROM workflow_executions")[0]["status"]
        elapsed = time.monotonic() - t0
    assert status == "rolled_back", (tmp_path / "daemon.log").read_text()[-4000:]
    assert elapsed < 150
    compensated = [s for t, s, _ in events(seeded_db, ex["id"]) if t == "stage_compensated"]
    assert compensated == ["value_realization", "target_design", "qualify", "discover"]
    assert rows(seeded_db, "SELECT count(*) AS n FROM lifecycle.artifacts WHERE voided_at IS NULL") == [{"n": 0}]
    print(f"rolled back {elapsed:.1f} s after the daemon started")
