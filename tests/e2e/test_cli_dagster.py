"""The command line with Dagster's own tooling: a `run` listed on its job's page in the UI
(the GraphQL queries the page sends), `dev` stopping quickly, and `dg` seeing the project. Each
spawns real processes (a code server, `dagster dev`, `dg`)."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from lifecycle_dagster.cli.main import main

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
