"""The command line with Dagster's own tooling: a `run` listed on its job's page in the UI
(the GraphQL queries the page sends), `dev` stopping quickly, and `dg` seeing the project. Each
spawns real processes (a code server, `dagster dev`, `dg`)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
from click.testing import CliRunner

from lifecycle_dagster.cli.main import main
from lifecycle_dagster.store.embedded import server_running

from processes import gone_within

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
pytestmark = pytest.mark.slow

#: the UI's job page: the job's own runs (its "Runs" tab and last-run badge), and the runs list
#: filtered to the job in its repository
_JOB_RUNS = """
query JobRuns($selector: PipelineSelector!, $filter: RunsFilter!) {
  pipelineOrError(params: $selector) { __typename ... on Pipeline { runs(limit: 20) { runId status } } }
  runsOrError(filter: $filter) { __typename ... on Runs { results { runId status } } }
}
"""


def test_a_run_of_the_cli_is_listed_on_its_jobs_page(seeded_db: str, dagster_home: Path) -> None:
    from dagster import DagsterInstance
    from dagster._core.workspace.context import WorkspaceProcessContext
    from dagster._core.workspace.load_target import WorkspaceFileTarget
    from dagster_graphql.test.utils import execute_dagster_graphql

    env = {"DAGSTER_HOME": str(dagster_home)}
    result = CliRunner().invoke(main, ["run", "lifecycle_v1", "--context", str(REPO / "examples/acme.json")], env=env)
    assert result.exit_code == 0, result.output
    run_id = next(ln.split()[2].rstrip(":") for ln in result.output.splitlines() if ln.startswith("dagster run "))
    instance = DagsterInstance.from_config(str(dagster_home))
    try:
        with WorkspaceProcessContext(instance, WorkspaceFileTarget(paths=[str(REPO / "workspace.yaml")])) as wpc:
            ctx = wpc.create_request_context()
            repo = ctx.get_code_location("lifecycle_dagster").get_repository("__repository__")
            label = repo.get_remote_origin().get_label()
            selector = {
                "pipelineName": "lifecycle_v1__v1",
                "repositoryName": "__repository__",
                "repositoryLocationName": "lifecycle_dagster",
            }
            filter_: dict[str, Any] = {
                "pipelineName": "lifecycle_v1__v1",
                "tags": [{"key": ".dagster/repository", "value": label}],
            }
            data = execute_dagster_graphql(ctx, _JOB_RUNS, {"selector": selector, "filter": filter_}).data
    finally:
        instance.dispose()
    assert data["pipelineOrError"]["__typename"] == "Pipeline", data
    assert {"runId": run_id, "status": "SUCCESS"} in data["pipelineOrError"]["runs"]
    assert {"runId": run_id, "status": "SUCCESS"} in data["runsOrError"]["results"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_dev_stops_everything_it_started_with_the_embedded_server(tmp_path: Path) -> None:
    """Ctrl-C stops `dev`'s whole process group and the embedded server it started, exit 0. How
    fast is not asserted here (a loaded machine stretches it): `dev` gives its group
    DEV_STOP_GRACE_S after SIGINT, then kills what is left (about 2 s in all on a quiet machine)."""
    os.chmod(tmp_path, 0o755)  # run as root, the server's own user must reach its folder
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "DAGSTER_HOME")}
    env["LIFECYCLE_DAGSTER_DATA_DIR"] = str(tmp_path)
    port = _free_port()
    log = (tmp_path / "dev.log").open("w")
    dev = subprocess.Popen(
        [str(BIN / "lifecycle-dagster"), "dev", "-p", str(port)], cwd=REPO, env=env, stdout=log, stderr=log
    )
    try:
        deadline = time.monotonic() + 240
        while True:
            assert dev.poll() is None, (tmp_path / "dev.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the webserver never answered"
            try:
                if httpx.get(f"http://127.0.0.1:{port}/server_info", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        assert server_running(tmp_path / "pgdata")
        procs = [psutil.Process(dev.pid), *psutil.Process(dev.pid).children(recursive=True)]
        assert len(procs) >= 4  # dg dev, its webserver, daemon and code server
        names = {p.pid: " ".join(p.cmdline())[:100] for p in procs}
        started = time.monotonic()
        dev.send_signal(signal.SIGINT)
        left = gone_within(list(names), 60.0)
        took = time.monotonic() - started
        assert left == [], f"outlived the stop: {[names[p] for p in left]} ({took:.1f} s after Ctrl-C)"
        assert dev.wait(1) == 0
        assert not server_running(tmp_path / "pgdata"), "dev left the embedded server it started running"
    finally:
        for p in psutil.Process().children(recursive=True):
            p.kill()
        dev.wait(30)
        if server_running(tmp_path / "pgdata"):
            subprocess.run([str(BIN / "lifecycle-dagster"), "db", "stop"], env=env, timeout=60)
    text = (tmp_path / "dev.log").read_text()
    assert "SupersessionWarning" not in text
    assert "Checking for new runs for sensor" not in text


def test_dg_sees_the_project(seeded_db: str, dagster_home: Path) -> None:
    env = {**os.environ, "DATABASE_URL": seeded_db, "DAGSTER_HOME": str(dagster_home)}
    check = subprocess.run([str(BIN / "dg"), "check", "defs"], cwd=REPO, env=env, capture_output=True, text=True)
    assert check.returncode == 0, check.stderr[-3000:]
    assert "All definitions loaded successfully" in check.stdout + check.stderr
    listed = subprocess.run(
        [str(BIN / "dg"), "list", "defs", "--json"], cwd=REPO, env=env, capture_output=True, text=True
    )
    assert listed.returncode == 0, listed.stderr[-3000:]
    defs = json.loads(listed.stdout)
    assert {j["name"] for j in defs["jobs"]} == {
        "lifecycle_v1",
        "lifecycle_v1__v1",
        "lifecycle_v1__v1__compensate",
        "lifecycle__retention",  # the daily prune (LIFECYCLE_DAGSTER_RETENTION)
    }
    assert len(defs["sensors"]) == 4
