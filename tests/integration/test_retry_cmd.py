"""`lifecycle-dagster retry EXECUTION_ID`: a failed execution held (on_failure: hold) is re-executed
from its failed stage as a Dagster re-execution; completed stages are not run again."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result
from dagster import DagsterInstance

from lifecycle_dagster.agents import AgentBadRequest, AgentRegistry, Task
from lifecycle_dagster.cli.main import main

from helpers import events, install, rows

HOLD = {
    "stages": [
        {"id": "a", "capability": "cap_a", "next": ["b"]},
        {"id": "b", "capability": "cap_b", "next": ["c"]},
        {"id": "c", "capability": "cap_c"},
    ],
    "defaults": {"retry": {"max_attempts": 1}},
    "on_failure": "hold",
}

CALLS: dict[str, list[int]] = {}


class Flaky:
    """Fails its first ``fail_times`` calls, then answers."""

    def __init__(self, name: str, fail_times: int = 0) -> None:
        self.name = name
        self.fail_times = fail_times

    def run(self, task: Task) -> dict[str, Any]:
        calls = CALLS.setdefault(self.name, [])
        calls.append(task.attempt)
        if len(calls) <= self.fail_times:
            raise AgentBadRequest("the CRM said no")
        return {"summary": f"{task.stage_id} done"}


def registry() -> AgentRegistry:
    """LIFECYCLE_DAGSTER_AGENTS=test_retry_cmd:registry"""
    return AgentRegistry([Flaky("A"), Flaky("B", fail_times=1), Flaky("C")])


@pytest.fixture
def cli(db: str, dagster_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    CALLS.clear()
    monkeypatch.setenv("LIFECYCLE_DAGSTER_AGENTS", "test_retry_cmd:registry")
    install(db, "wf", HOLD, {"cap_a": "A", "cap_b": "B", "cap_c": "C"})
    context = tmp_path / "ctx.json"
    context.write_text(json.dumps({"customer": "ACME"}))

    def invoke(*args: str) -> Result:
        return CliRunner().invoke(
            main,
            [a if a != "CTX" else str(context) for a in args],
            env={"DATABASE_URL": db, "DAGSTER_HOME": str(dagster_home)},
        )

    return invoke


def _execution(db: str) -> dict[str, Any]:
    [row] = rows(
        db,
        "SELECT id::text AS id, status, dagster_run_id FROM workflow_executions e"
        " WHERE e.context ->> 'customer' = 'ACME'",
    )
    return row


def test_retry_re_executes_a_held_execution_from_its_failed_stage(cli: Any, db: str, dagster_home: Path) -> None:
    first = cli("run", "wf", "--context", "CTX")
    assert first.exit_code == 1, first.output
    failed = _execution(db)
    assert failed["status"] == "failed"  # on_failure: hold: no compensation
    assert CALLS == {"A": [1], "B": [1]}

    again = cli("retry", failed["id"])
    assert again.exit_code == 0, again.output
    assert (
        f"retrying execution {failed['id']} (wf v1) after run {failed['dagster_run_id']}" in again.output.splitlines()
    )
    assert CALLS == {"A": [1], "B": [1, 2], "C": [1]}  # a is not run again; b runs its attempt 2
    done = _execution(db)
    assert done["status"] == "completed"
    logs = {
        r["stage_id"]: (r["status"], r["attempt_number"])
        for r in rows(
            db,
            "SELECT stage_id, status, attempt_number FROM workflow_execution_logs WHERE execution_id = %(e)s",
            e=done["id"],
        )
    }
    assert logs == {"a": ("completed", 1), "b": ("completed", 2), "c": ("completed", 1)}
    resumed = [m for t, _, m in events(db, done["id"]) if t == "workflow_resumed"]
    assert resumed == [{"dagster_run_id": done["dagster_run_id"], "previous_dagster_run_id": failed["dagster_run_id"]}]
    # Dagster sees a re-execution of the failed run
    instance = DagsterInstance.from_config(str(dagster_home))
    try:
        run = instance.get_run_by_id(done["dagster_run_id"])
        assert run is not None
        assert (run.tags["dagster/parent_run_id"], run.tags["dagster/root_run_id"]) == (
            failed["dagster_run_id"],
            failed["dagster_run_id"],
        )
    finally:
        instance.dispose()

    # a completed execution is not retried
    refused = cli("retry", done["id"])
    assert refused.exit_code == 1
    assert refused.output == f"Error: execution {done['id']} is completed: only a failed execution is retried\n"


def test_retry_refuses_once_compensation_started_and_bad_ids(cli: Any, db: str) -> None:
    assert cli("run", "wf", "--context", "CTX").exit_code == 1
    failed = _execution(db)
    assert cli("compensate", failed["id"], "--no-wait").exit_code == 0
    refused = cli("retry", failed["id"])
    assert refused.exit_code == 1
    assert refused.output == f"Error: execution {failed['id']} is compensating: its compensation has started\n"
    assert CALLS == {"A": [1], "B": [1]}  # nothing ran
    unknown = cli("retry", "00000000-0000-4000-8000-000000000000")
    assert (unknown.exit_code, unknown.output) == (1, "Error: no execution 00000000-0000-4000-8000-000000000000\n")
    bad = cli("retry", "nope")
    assert (bad.exit_code, bad.output) == (1, "Error: not an execution id: 'nope' (expected a UUID)\n")
