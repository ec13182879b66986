"""Logs: a completed stage writes one INFO line to its run's Dagster event log; `agent serve
--log-format json` writes one JSON object per line with the task's fields; the code location's own
loggers write JSON with LIFECYCLE_DAGSTER_LOG_FORMAT=json."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dagster as dg
import pytest
from psycopg.types.json import Jsonb

from lifecycle_dagster.agents import AgentRegistry, Task, default_registry
from lifecycle_dagster.location.definitions import definitions_from_snapshot
from lifecycle_dagster.store.db import connect

from helpers import install, rows, run

REPO = Path(__file__).resolve().parents[2]
TESTS = Path(__file__).resolve().parents[1]
ACME = json.loads((REPO / "examples/acme.json").read_text())


class Echo:
    def __init__(self, name: str) -> None:
        self.name = name

    def run(self, task: Task) -> dict[str, Any]:
        return {"summary": task.stage_id}


def test_a_completed_stage_logs_one_info_line_in_its_run(db: str, instance: Any) -> None:
    dag = {"stages": [{"id": "first", "capability": "x", "next": ["second"]}, {"id": "second", "capability": "y"}]}
    install(db, "wf", dag, {"x": "X", "y": "Y"})
    result, eid = run(db, instance, "wf", AgentRegistry([Echo("X"), Echo("Y")]))
    assert result.success
    lines = [
        e.user_message
        for e in instance.all_logs(result.run_id)
        if e.level == logging.INFO and "completed: agent" in e.user_message
    ]
    assert len(lines) == 2
    for stage, agent in (("first", "X"), ("second", "Y")):
        [line] = [m for m in lines if f"stage '{stage}' completed" in m]
        assert f"agent {agent}, attempt 1, " in line and line.endswith(f" ms (execution {eid})")


@pytest.mark.slow
def test_agent_serve_writes_json_lines_with_the_task_fields(seeded_db: str, tmp_path: Path) -> None:
    reg = default_registry()
    opp = reg.get("Opportunity Agent").run(Task("e", "discover", "opportunity", 1, ACME, {}))
    ass = reg.get("Assessment Agent").run(
        Task("e", "qualify", "assessment", 1, ACME, {"discover": {"capability": "opportunity", "output": opp}})
    )
    upstream = {
        "discover": {"capability": "opportunity", "output": opp},
        "qualify": {"capability": "assessment", "output": ass},
    }
    with connect(seeded_db) as conn:
        conn.execute("UPDATE agents SET kind = 'queue' WHERE name = 'Design Agent'")
        e = conn.execute(
            "INSERT INTO workflow_executions (workflow_definition_id, status, context)"
            " SELECT id, 'in_progress', %s FROM workflow_definitions WHERE name = 'lifecycle_v1' RETURNING id::text",
            (Jsonb(ACME),),
        ).fetchone()
        assert e is not None
        eid = e["id"]
        conn.execute(
            "INSERT INTO workflow_execution_logs (execution_id, stage_id, status)"
            " VALUES (%s, 'target_design', 'pending')",
            (eid,),
        )
        conn.execute(
            "INSERT INTO task_queue (workflow_execution_id, task_type, input_data) VALUES (%s, 'target_design', %s)",
            (eid, Jsonb({"context": ACME, "upstream": upstream})),
        )
    env = {**os.environ, "DATABASE_URL": seeded_db, "PYTHONPATH": os.pathsep.join([str(REPO), str(TESTS)])}
    env.pop("LIFECYCLE_DAGSTER_LOG_FORMAT", None)
    err = tmp_path / "serve.log"
    with err.open("wb") as out:
        worker = subprocess.Popen(
            [
                *(str(Path(sys.executable).parent / "lifecycle-dagster"), "agent", "serve", "--agent", "Design Agent"),
                *("--registry", "queue_agents:registry", "--poll-s", "0.2", "--log-format", "json"),
            ],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=out,
            start_new_session=True,
        )
        try:
            deadline = time.monotonic() + 60
            while rows(seeded_db, "SELECT status FROM task_queue")[0]["status"] != "completed":
                assert time.monotonic() < deadline and worker.poll() is None, err.read_text()
                time.sleep(0.2)
        finally:
            if worker.poll() is None:
                os.killpg(worker.pid, signal.SIGTERM)
            worker.wait(30)
    lines = [json.loads(line) for line in err.read_text().splitlines() if line.strip()]
    [task] = rows(seeded_db, "SELECT id::text AS id FROM task_queue")
    # the status the database returned: the execution's, as for lifecycle.stage_complete
    [done] = [x for x in lines if x["message"].startswith(f"task {task['id']}: ")]
    assert {k: done[k] for k in ("level", "logger", "execution_id", "stage", "attempt", "task_id", "capability")} == {
        "level": "INFO",
        "logger": "lifecycle_dagster.queue.worker",
        "execution_id": eid,
        "stage": "target_design",
        "attempt": 1,
        "task_id": task["id"],
        "capability": "design",
    }
    assert done["duration_ms"] >= 0


@pytest.fixture
def location_logger() -> Iterator[logging.Logger]:
    log = logging.getLogger("lifecycle_dagster")
    yield log
    for h in [h for h in log.handlers if h.get_name() == "lifecycle_dagster.json"]:
        log.removeHandler(h)
    log.propagate = True
    log.setLevel(logging.NOTSET)


def test_the_code_location_logs_json_when_asked(
    location_logger: logging.Logger, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("LIFECYCLE_DAGSTER_LOG_FORMAT", "json")
    bad = {"id": "00000000-0000-4000-8000-000000000001", "name": "broken", "version": 1, "description": None}
    defs = definitions_from_snapshot(json.dumps([{**bad, "dag_schema": {"stages": []}}]))
    assert isinstance(defs, dg.Definitions)
    [line] = [json.loads(x) for x in capsys.readouterr().err.splitlines() if "broken" in x]
    assert line["level"] == "WARNING" and line["logger"] == "lifecycle_dagster.location.definitions"
    assert line["message"].startswith("workflow broken v1 skipped: ")
    monkeypatch.setenv("LIFECYCLE_DAGSTER_LOG_FORMAT", "yaml")
    with pytest.raises(ValueError, match="LIFECYCLE_DAGSTER_LOG_FORMAT must be one of text, json, got 'yaml'"):
        definitions_from_snapshot("[]")
