"""The lifecycle runs end to end as a generated Dagster job on real Postgres (in-process)."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import pytest
from psycopg.types.json import Jsonb

from lifecycle_dagster.agents import AgentRegistry, Task, default_registry
from lifecycle_dagster.location.job_factory import EXECUTION_ID_TAG, build_job
from lifecycle_dagster.location.resources import agents_resource
from lifecycle_dagster.store.db import connect
from lifecycle_dagster.store.sqlfiles import query

REPO = Path(__file__).resolve().parents[2]
LIFECYCLE_ORDER = ["discover", "qualify", "target_design", "value_realization", "integrity"]


def _profile(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((REPO / "examples" / f"{name}.json").read_text())
    return data


def _active(conn: Any, name: str) -> dict[str, Any]:
    row = conn.execute(query("active_definition_by_name"), {"name": name}).fetchone()
    assert row is not None
    return dict(row)


def _run(dsn: str, instance: Any, name: str, context: dict[str, Any], **kw: Any) -> tuple[Any, str]:
    with connect(dsn) as conn:
        row = _active(conn, name)
        created = conn.execute(
            query("create_execution"),
            {"definition_id": row["id"], "context": Jsonb(context), "created_by": None},
        ).fetchone()
    assert created is not None
    job = build_job(row)
    result = job.execute_in_process(
        instance=instance, tags={EXECUTION_ID_TAG: created["id"]}, raise_on_error=False, **kw
    )
    return result, str(created["id"])


def _rows(dsn: str, sql: Any, **params: Any) -> list[dict[str, Any]]:
    with connect(dsn) as conn:
        return [dict(r) for r in conn.execute(sql, params).fetchall()]


def test_acme_completes_all_five_stages(seeded_db: str, instance: Any) -> None:
    result, eid = _run(seeded_db, instance, "lifecycle_v1", _profile("acme"))
    assert result.success
    logs = _rows(
        seeded_db,
        "SELECT stage_id, status, attempt_number, started_at, completed_at, input_data, output_data"
        " FROM workflow_execution_logs WHERE execution_id = %(e)s ORDER BY started_at",
        e=eid,
    )
    assert [r["stage_id"] for r in logs] == LIFECYCLE_ORDER
    assert {r["status"] for r in logs} == {"completed"}
    assert {r["attempt_number"] for r in logs} == {1}
    for earlier, later in itertools.pairwise(logs):
        assert earlier["completed_at"] <= later["started_at"]
    # upstream outputs come from Postgres: integrity saw all four ancestors' outputs
    integrity = logs[-1]
    assert sorted(integrity["input_data"]["upstream"]) == sorted(LIFECYCLE_ORDER[:-1])
    assert integrity["input_data"]["upstream"]["discover"]["output"] == logs[0]["output_data"]
    assert integrity["input_data"]["context"]["customer"] == "ACME Corp"
    assert integrity["output_data"]["passed"] is True
    assert logs[0]["output_data"]["total_potential"] == 229250.0

    ex = _rows(seeded_db, "SELECT status, current_stage, dagster_run_id FROM workflow_executions")
    assert ex == [{"status": "completed", "current_stage": "integrity", "dagster_run_id": result.run_id}]

    events = _rows(
        seeded_db,
        "SELECT event_type, stage_id FROM workflow_events WHERE execution_id = %(e)s ORDER BY id",
        e=eid,
    )
    expected = [("workflow_started", None)]
    for s in LIFECYCLE_ORDER:
        expected += [("stage_started", s), ("stage_completed", s)]
    expected.append(("workflow_completed", None))
    assert [(e["event_type"], e["stage_id"]) for e in events] == expected

    tasks = _rows(
        seeded_db,
        "SELECT t.task_type, t.status, a.name AS agent FROM task_queue t JOIN agents a ON a.id = t.agent_id"
        " WHERE t.workflow_execution_id = %(e)s ORDER BY t.created_at",
        e=eid,
    )
    assert [(t["task_type"], t["status"], t["agent"]) for t in tasks] == [
        ("discover", "completed", "Opportunity Agent"),
        ("qualify", "completed", "Assessment Agent"),
        ("target_design", "completed", "Design Agent"),
        ("value_realization", "completed", "Realization Agent"),
        ("integrity", "completed", "Integrity Agent"),
    ]
    # Dagster metadata of a stage op (on its output `result`) names the agent, the task and the
    # attempt; each op but the last also yields the output of its fired edge (`to_<child>`)
    outputs = [e for e in result.all_events if e.event_type_value == "STEP_OUTPUT"]
    assert [e.event_specific_data.step_output_handle.output_name for e in outputs] == [
        "result",
        "to_qualify",
        "result",
        "to_target_design",
        "result",
        "to_value_realization",
        "result",
        "to_integrity",
        "result",
    ]
    md = outputs[0].event_specific_data.metadata
    assert md["agent"].value == "Opportunity Agent"
    assert md["attempt"].value == 1
    assert md["execution_id"].value == eid


def test_globex_fails_at_integrity_with_its_message(seeded_db: str, instance: Any) -> None:
    result, eid = _run(seeded_db, instance, "lifecycle_v1", _profile("globex"))
    assert not result.success
    logs = _rows(
        seeded_db,
        "SELECT stage_id, status, error_message FROM workflow_execution_logs"
        " WHERE execution_id = %(e)s ORDER BY started_at",
        e=eid,
    )
    assert [(r["stage_id"], r["status"]) for r in logs] == [
        *[(s, "completed") for s in LIFECYCLE_ORDER[:-1]],
        ("integrity", "failed"),
    ]
    assert "exceeds its potential" in logs[-1]["error_message"]
    assert "Research, which was never targeted" in logs[-1]["error_message"]
    ex = _rows(seeded_db, "SELECT status, error_message FROM workflow_executions WHERE id = %(e)s", e=eid)
    assert ex[0]["status"] == "failed"
    assert ex[0]["error_message"].startswith("stage integrity failed: Integrity Agent: integrity failed:")
    kinds = [
        r["event_type"]
        for r in _rows(
            seeded_db, "SELECT event_type FROM workflow_events WHERE execution_id = %(e)s ORDER BY id", e=eid
        )
    ]
    assert kinds[-2:] == ["stage_failed", "workflow_failed"]
    task = _rows(
        seeded_db,
        "SELECT status FROM task_queue WHERE workflow_execution_id = %(e)s AND task_type = 'integrity'",
        e=eid,
    )
    assert task == [{"status": "failed"}]


def test_run_without_execution_id_creates_one_from_config(seeded_db: str, instance: Any) -> None:
    """A launch from the UI or `dagster job execute` carries no execution id: the run makes one."""
    with connect(seeded_db) as conn:
        job = build_job(_active(conn, "lifecycle_v1"))
    result = job.execute_in_process(
        instance=instance,
        run_config={"resources": {"lifecycle_request": {"config": {"context_file": str(REPO / "examples/acme.json")}}}},
    )
    assert result.success
    ex = _rows(seeded_db, "SELECT status, context, dagster_run_id FROM workflow_executions")
    assert len(ex) == 1
    assert ex[0]["status"] == "completed"
    assert ex[0]["dagster_run_id"] == result.run_id
    assert ex[0]["context"] == _profile("acme")


class _Recorder:
    """A real agent for the diamond: records the upstream stages it saw."""

    def __init__(self, name: str) -> None:
        self.name = name

    def run(self, task: Task) -> dict[str, Any]:
        return {"summary": f"{task.stage_id} saw {sorted(task.upstream)}", "saw": sorted(task.upstream)}


def test_diamond_join_runs_once_after_both_parents(db: str, instance: Any) -> None:
    dag = json.loads((REPO / "tests/fixtures/diamond.json").read_text())
    with connect(db) as conn:
        conn.execute(
            "INSERT INTO workflow_definitions (name, version, dag_schema, is_active) VALUES ('diamond', 1, %s, true)",
            (Jsonb(dag["dag_schema"]),),
        )
        for cap in ("opportunity", "assessment", "design", "governance"):
            aid = conn.execute("INSERT INTO agents (name) VALUES (%s) RETURNING id", (f"{cap} recorder",)).fetchone()
            assert aid is not None
            conn.execute(
                "INSERT INTO agent_ontologies (agent_id, domain, knowledge) VALUES (%s, 'orchestration', %s)",
                (aid["id"], Jsonb({"capability": cap})),
            )
    registry = AgentRegistry(_Recorder(f"{c} recorder") for c in ("opportunity", "assessment", "design", "governance"))
    result, eid = _run(db, instance, "diamond", {}, resources={"lifecycle_agents": registry})
    assert result.success
    logs = {
        r["stage_id"]: r
        for r in _rows(
            db,
            "SELECT stage_id, started_at, completed_at, output_data FROM workflow_execution_logs"
            " WHERE execution_id = %(e)s",
            e=eid,
        )
    }
    assert sorted(logs) == ["a", "b", "c", "d"]
    assert logs["d"]["started_at"] >= max(logs["b"]["completed_at"], logs["c"]["completed_at"])
    assert logs["d"]["output_data"]["saw"] == ["a", "b", "c"]
    starts = _rows(
        db,
        "SELECT count(*) AS n FROM workflow_events WHERE execution_id = %(e)s AND event_type = 'stage_started'"
        " AND stage_id = 'd'",
        e=eid,
    )
    assert starts == [{"n": 1}]


def test_capability_no_agent_serves_fails_the_stage_clearly(seeded_db: str, instance: Any) -> None:
    with connect(seeded_db) as conn:
        conn.execute("UPDATE agents SET is_active = false WHERE name = 'Design Agent'")
    result, eid = _run(seeded_db, instance, "lifecycle_v1", _profile("acme"))
    assert not result.success
    ex = _rows(seeded_db, "SELECT status, error_message FROM workflow_executions WHERE id = %(e)s", e=eid)
    assert ex == [
        {
            "status": "failed",
            "error_message": "stage target_design failed: no active agent serves capability 'design'"
            " (stage 'target_design'): give an active agent that capability (an agent_ontologies row, domain"
            " 'orchestration') or activate a version that does not need it",
        }
    ]


class _Crashing:
    name = "Assessment Agent"

    def run(self, task: Task) -> dict[str, Any]:
        raise ZeroDivisionError("division by zero")


class _Garbage:
    name = "Assessment Agent"

    def run(self, task: Task) -> dict[str, Any]:
        return {"summary": "bad", "blob": "a\u0000b"}


@pytest.mark.parametrize(
    ("agent", "code", "fragment"),
    [
        (_Crashing(), "agent_crashed", "Assessment Agent: agent crashed: ZeroDivisionError: division by zero"),
        (_Garbage(), "bad_output", "NUL character"),
    ],
)
def test_agent_crash_or_unstorable_output_is_recorded(
    seeded_db: str, instance: Any, agent: Any, code: str, fragment: str
) -> None:
    registry = default_registry()
    reg = AgentRegistry([registry.get(n) for n in registry.names() if n != "Assessment Agent"] + [agent])
    result, eid = _run(
        seeded_db, instance, "lifecycle_v1", _profile("acme"), resources={"lifecycle_agents": agents_resource(reg)}
    )
    assert not result.success
    log = _rows(
        seeded_db,
        "SELECT status, error_message, output_data FROM workflow_execution_logs"
        " WHERE execution_id = %(e)s AND stage_id = 'qualify'",
        e=eid,
    )
    assert log[0]["status"] == "failed" and log[0]["output_data"] is None
    assert fragment in log[0]["error_message"]
    ev = _rows(
        seeded_db,
        "SELECT metadata FROM workflow_events WHERE execution_id = %(e)s AND event_type = 'stage_failed'",
        e=eid,
    )
    assert ev[0]["metadata"]["error_code"] == code
    # crashes and unstorable outputs are retryable: the default policy's three attempts ran
    assert fragment in log[0]["error_message"] and log[0]["error_message"].endswith("(attempt 3 of 3)")
    retried = _rows(
        seeded_db,
        "SELECT count(*) AS n FROM workflow_events WHERE execution_id = %(e)s AND event_type = 'stage_retrying'",
        e=eid,
    )
    assert retried == [{"n": 2}]
