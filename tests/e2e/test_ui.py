"""What the UI and GraphQL clients see, against a real workspace (a code server process, runs
launched by the instance's run launcher, GraphQL over dagster_graphql's schema): the Launchpad's
default config of a DAG declaring its context is valid and an empty context is refused naming the
missing key; the stable job ``wf`` runs the active version; a run launched without the
``lifecycle/execution_id`` tag gets it; a GraphQL re-execution from failure of such a run resumes
its execution; a run launched before an activation finishes on the version it was launched on."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from test_dagster_processes import _wait_for_code_servers

from lifecycle_dagster.agents import AgentBadRequest, AgentRegistry, Task
from lifecycle_dagster.location.job_factory import EXECUTION_ID_TAG
from lifecycle_dagster.store.db import connect
from lifecycle_dagster.store.versions import publish

from helpers import install, rows

REPO = Path(__file__).resolve().parents[2]
#: the agent of stage b fails while this file exists (its path in the environment of the code server)
FAIL_FLAG_ENV = "LD_TEST_UI_FAIL_FLAG"

DAG: dict[str, Any] = {
    "stages": [{"id": "a", "capability": "cap_a", "next": ["b"]}, {"id": "b", "capability": "cap_b"}],
    "defaults": {"retry": {"max_attempts": 1}},
    "on_failure": "hold",
    "context": {"required": ["customer"], "example": {"customer": "ACME"}, "description": "who it is for"},
}


class _Agent:
    def __init__(self, name: str) -> None:
        self.name = name

    def run(self, task: Task) -> dict[str, Any]:
        import os

        flag = os.environ.get(FAIL_FLAG_ENV, "")
        if self.name == "B" and flag and Path(flag).exists():
            raise AgentBadRequest("b is told to fail")
        return {"summary": f"{task.stage_id} for {task.context.get('customer')}"}


def registry() -> AgentRegistry:
    """LIFECYCLE_DAGSTER_AGENTS=test_ui:registry (imported by the code server and run workers)."""
    return AgentRegistry([_Agent("A"), _Agent("B")])


SELECTOR = {"repositoryLocationName": "lifecycle_dagster", "repositoryName": "__repository__"}

CONFIG_VALID = """
query($selector: PipelineSelector!, $config: RunConfigData) {
  isPipelineConfigValid(pipeline: $selector, runConfigData: $config, mode: "default") {
    __typename
    ... on RunConfigValidationInvalid { errors { message } }
  }
}"""
DEFAULT_CONFIG = """
query($selector: PipelineSelector!) {
  runConfigSchemaOrError(selector: $selector) { __typename ... on RunConfigSchema { rootDefaultYaml } }
}"""
LAUNCH = """
mutation($params: ExecutionParams!) {
  launchPipelineExecution(executionParams: $params) {
    __typename
    ... on LaunchRunSuccess { run { runId } }
    ... on PythonError { message }
    ... on RunConfigValidationInvalid { errors { message } }
  }
}"""
REEXECUTE = """
mutation($params: ReexecutionParams!) {
  launchPipelineReexecution(reexecutionParams: $params) {
    __typename
    ... on LaunchRunSuccess { run { runId } }
    ... on PythonError { message }
  }
}"""


def _gql(ctx: Any, query: str, variables: dict[str, Any]) -> dict[str, Any]:
    from dagster_graphql.test.utils import execute_dagster_graphql

    result = execute_dagster_graphql(ctx, query, variables)
    assert not result.errors, result.errors
    data: dict[str, Any] = result.data
    return data


def _submit(ctx: Any, job: str, customer: str) -> str:
    """Submit ``job`` through GraphQL (no tags, no executor config: the job's own): the run id of the queued run."""
    config = {"resources": {"lifecycle_request": {"config": {"context": {"customer": customer}}}}}
    params = {"selector": {**SELECTOR, "jobName": job}, "runConfigData": config}
    out = _gql(ctx, LAUNCH, {"params": params})["launchPipelineExecution"]
    assert out["__typename"] == "LaunchRunSuccess", out
    return str(out["run"]["runId"])


def _run_to_end(instance: Any, ctx: Any, run_id: str) -> Any:
    """Launch a queued run (no daemon here) and wait until it ends; the run."""
    from dagster import DagsterRunStatus

    instance.launch_run(run_id, ctx)
    deadline = time.monotonic() + 180
    while True:
        run = instance.get_run_by_id(run_id)
        if run.status in (DagsterRunStatus.SUCCESS, DagsterRunStatus.FAILURE, DagsterRunStatus.CANCELED):
            return run
        assert time.monotonic() < deadline, f"run {run_id} is still {run.status}"
        time.sleep(0.3)


def _execution(db: str, run_id: str) -> dict[str, Any]:
    [row] = rows(
        db,
        "SELECT e.id::text AS id, e.status, d.version, e.context FROM workflow_executions e"
        " JOIN workflow_definitions d ON d.id = e.workflow_definition_id WHERE e.dagster_run_id = %(r)s",
        r=run_id,
    )
    return row


@pytest.mark.slow
def test_launchpad_stable_job_tags_and_reexecution(
    db: str, dagster_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dagster import DagsterInstance, DagsterRunStatus, RunsFilter
    from dagster._core.workspace.context import WorkspaceProcessContext
    from dagster._core.workspace.load_target import WorkspaceFileTarget

    install(db, "wf", DAG, {"cap_a": "A", "cap_b": "B"})
    flag = tmp_path / "fail"
    flag.touch()
    tests = Path(__file__).resolve().parents[1]
    monkeypatch.setenv("PYTHONPATH", f"{REPO}:{tests}:{tests / 'e2e'}")
    monkeypatch.setenv("LIFECYCLE_DAGSTER_AGENTS", "test_ui:registry")
    monkeypatch.setenv(FAIL_FLAG_ENV, str(flag))
    monkeypatch.setenv("DAGSTER_HOME", str(dagster_home))
    monkeypatch.chdir(REPO)
    instance = DagsterInstance.from_config(str(dagster_home))
    try:
        with WorkspaceProcessContext(instance, WorkspaceFileTarget(paths=[str(REPO / "workspace.yaml")])) as wpc:
            ctx = wpc.create_request_context()
            stable = {**SELECTOR, "pipelineName": "wf"}
            # 1. the Launchpad: the default config is the declared example, and valid
            default = _gql(ctx, DEFAULT_CONFIG, {"selector": stable})["runConfigSchemaOrError"]
            assert "customer: ACME" in default["rootDefaultYaml"], default
            valid = _gql(ctx, CONFIG_VALID, {"selector": stable, "config": {}})["isPipelineConfigValid"]
            assert valid["__typename"] == "PipelineConfigValidationValid", valid
            empty = {"resources": {"lifecycle_request": {"config": {"context": {}}}}}
            refused = _gql(ctx, CONFIG_VALID, {"selector": stable, "config": empty})["isPipelineConfigValid"]
            assert refused["__typename"] == "RunConfigValidationInvalid", refused
            assert any('"customer"' in e["message"] for e in refused["errors"]), refused

            # 2. the stable job runs v1 (active); the run has no tag at launch, gets it from its op
            first = _run_to_end(instance, ctx, _submit(ctx, "wf", "Initech"))
            assert first.status == DagsterRunStatus.FAILURE  # b fails (its flag), on_failure: hold
            failed = _execution(db, first.run_id)
            assert (failed["status"], failed["version"], failed["context"]) == ("failed", 1, {"customer": "Initech"})
            assert first.tags[EXECUTION_ID_TAG] == failed["id"]
            assert [r.run_id for r in instance.get_runs(RunsFilter(tags={EXECUTION_ID_TAG: failed["id"]}))] == [
                first.run_id
            ]

            # 3. GraphQL re-execution from failure, without the parent's tags: the op finds the
            #    execution of the parent run in Postgres and resumes it (a is not run again)
            flag.unlink()
            params = {"parentRunId": first.run_id, "strategy": "FROM_FAILURE", "useParentRunTags": False}
            out = _gql(ctx, REEXECUTE, {"params": params})["launchPipelineReexecution"]
            assert out["__typename"] == "LaunchRunSuccess", out
            second = _run_to_end(instance, ctx, out["run"]["runId"])
            assert second.status == DagsterRunStatus.SUCCESS
            assert second.tags["dagster/parent_run_id"] == first.run_id
            assert second.tags[EXECUTION_ID_TAG] == failed["id"]
            done = _execution(db, second.run_id)
            assert (done["id"], done["status"]) == (failed["id"], "completed")
            assert rows(db, "SELECT count(*) AS n FROM workflow_executions") == [{"n": 1}]
            logs = rows(
                db,
                "SELECT stage_id, attempt_number FROM workflow_execution_logs WHERE execution_id = %(e)s ORDER BY 1",
                e=done["id"],
            )
            assert logs == [{"stage_id": "a", "attempt_number": 1}, {"stage_id": "b", "attempt_number": 2}]

            # 4. a run of wf submitted now, then v2 is activated and the location reloads
            pinned = _submit(ctx, "wf", "Hooli")
            v2 = {**DAG, "stages": [*DAG["stages"][:1], {**DAG["stages"][1], "next": ["c"]}]}
            v2["stages"].append({"id": "c", "capability": "cap_a"})
            with connect(db) as conn:
                publish(conn, "wf", None, v2, activate=True)
            wpc.reload_code_location("lifecycle_dagster")
            ctx = wpc.create_request_context()
            repo = ctx.get_code_location("lifecycle_dagster").get_repository("__repository__")
            assert repo.get_full_job("wf").tags["lifecycle/version"] == "2"
            newer = _run_to_end(instance, ctx, _submit(ctx, "wf", "Globex"))
            older = _run_to_end(instance, ctx, pinned)
        _wait_for_code_servers(60)
    finally:
        instance.dispose()
    assert (newer.status, older.status) == (DagsterRunStatus.SUCCESS, DagsterRunStatus.SUCCESS)
    assert _execution(db, newer.run_id)["version"] == 2  # the same job name now runs v2
    assert _execution(db, older.run_id)["version"] == 1  # the run launched before still ran v1
    stages = "SELECT stage_id FROM workflow_execution_logs WHERE execution_id = %(e)s ORDER BY 1"
    assert [r["stage_id"] for r in rows(db, stages, e=_execution(db, newer.run_id)["id"])] == ["a", "b", "c"]
    assert [r["stage_id"] for r in rows(db, stages, e=_execution(db, older.run_id)["id"])] == ["a", "b"]
    assert older.tags[EXECUTION_ID_TAG] == _execution(db, older.run_id)["id"]

