"""Saga compensation: reverse topological undo, artifacts voided, idempotent compensation, hold,
undo retries, the failure sensor and the reconciler (evaluated against a real Dagster instance)."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import dagster as dg
import psycopg
import pytest

from lifecycle_dagster.agents import AgentBadRequest, AgentRegistry, CompensationTask, Task, artifacts, default_registry
from lifecycle_dagster.location.definitions import definitions_from_snapshot, fetch_snapshot
from lifecycle_dagster.location.job_factory import EXECUTION_ID_TAG, build_compensation_job
from lifecycle_dagster.location.resources import agents_resource
from lifecycle_dagster.location.sensors import reconcile
from lifecycle_dagster.store.db import connect

from helpers import create_execution, events, install, rows, run

REPO = Path(__file__).resolve().parents[2]
ACME = json.loads((REPO / "examples/acme.json").read_text())


class Broken:
    """Fails for good (a bad request: not retried)."""

    def __init__(self, name: str) -> None:
        self.name = name

    def run(self, task: Task) -> dict[str, Any]:
        raise AgentBadRequest(f"{self.name} refuses")


def _lifecycle_failing_at_realization(seeded_db: str, instance: Any) -> tuple[str, AgentRegistry, Any]:
    base = default_registry()
    registry = AgentRegistry(
        [base.get(n) for n in base.names() if n != "Realization Agent"] + [Broken("Realization Agent")]
    )
    with connect(seeded_db) as conn:
        row = conn.execute(
            "SELECT id::text AS id, name, version, description, dag_schema FROM workflow_definitions"
        ).fetchone()
    assert row is not None
    from lifecycle_dagster.location.job_factory import build_job
    from lifecycle_dagster.store.sqlfiles import query

    with connect(seeded_db) as conn:
        created = conn.execute(
            query("create_execution"),
            {"definition_id": row["id"], "context": psycopg.types.json.Jsonb(ACME), "created_by": None},
        ).fetchone()
    assert created is not None
    result = build_job(dict(row)).execute_in_process(
        instance=instance,
        tags={EXECUTION_ID_TAG: created["id"]},
        raise_on_error=False,
        resources={"lifecycle_agents": agents_resource(registry)},
    )
    return str(created["id"]), registry, result


def _compensate(db: str, instance: Any, registry: AgentRegistry) -> list[Any]:
    """One reconciler tick, then every compensation run it asked for, in-process."""
    defs = definitions_from_snapshot(fetch_snapshot(db))
    repo = defs.get_repository_def()
    names = [j.name for j in repo.get_all_jobs() if j.name.endswith("__compensate")]
    results = []
    for req in list(reconcile(instance, names, db, timeout_s=3600)):
        assert isinstance(req, dg.RunRequest), req
        job = repo.get_job(req.job_name)  # type: ignore[arg-type]
        results.append(
            job.execute_in_process(
                instance=instance,
                tags=dict(req.tags),
                raise_on_error=False,
                resources={"lifecycle_agents": agents_resource(registry)},
            )
        )
    return results


def _live_artifacts(db: str, eid: str) -> dict[str, int]:
    return {
        r["stage_id"]: r["n"]
        for r in rows(
            db,
            "SELECT stage_id, count(*) AS n FROM lifecycle.artifacts WHERE execution_id = %(e)s AND voided_at IS NULL"
            " GROUP BY stage_id",
            e=eid,
        )
    }


def test_lifecycle_failing_at_realization_is_rolled_back_in_reverse_order(seeded_db: str, instance: Any) -> None:
    eid, registry, result = _lifecycle_failing_at_realization(seeded_db, instance)
    assert not result.success
    assert _live_artifacts(seeded_db, eid) == {"discover": 3, "qualify": 3, "target_design": 2}
    [comp] = _compensate(seeded_db, instance, registry)
    assert comp.success
    [ex] = rows(seeded_db, "SELECT status, compensation_run_id FROM workflow_executions WHERE id = %(e)s", e=eid)
    assert ex == {"status": "rolled_back", "compensation_run_id": comp.run_id}
    evs = events(seeded_db, eid)
    assert [s for t, s, _ in evs if t == "stage_compensated"] == ["target_design", "qualify", "discover"]
    assert [t for t, _, _ in evs].count("workflow_rolled_back") == 1
    assert evs[-1][0] == "workflow_rolled_back"
    assert evs[-1][2]["compensated"] == ["target_design", "qualify", "discover"]
    assert [m["voided"] for t, _, m in evs if t == "stage_compensated"] == [2, 3, 3]
    assert _live_artifacts(seeded_db, eid) == {}
    logs = {
        r["stage_id"]: r["status"]
        for r in rows(
            seeded_db, "SELECT stage_id, status FROM workflow_execution_logs WHERE execution_id = %(e)s", e=eid
        )
    }
    assert logs == {
        "discover": "compensated",
        "qualify": "compensated",
        "target_design": "compensated",
        "value_realization": "failed",
    }
    # a second tick finds nothing to do: compensation happened once
    assert _compensate(seeded_db, instance, registry) == []
    assert [t for t, _, _ in events(seeded_db, eid)].count("stage_compensated") == 3


class Effects:
    """A diamond agent that writes an artifact and undoes it, recording the undo order."""

    def __init__(self, name: str, undone: list[str], fail: bool = False) -> None:
        self.name = name
        self.undone = undone
        self.fail = fail

    def run(self, task: Task) -> dict[str, Any]:
        if self.fail:
            raise AgentBadRequest("no")
        return {"summary": task.stage_id, "artifacts": artifacts("thing", [{"id": task.stage_id}])}

    def compensate(self, task: CompensationTask) -> dict[str, Any]:
        self.undone.append(task.stage_id)
        return {"summary": f"undid {task.stage_id}", "void": task.artifacts()}


DIAMOND_PLUS = {
    "stages": [
        {"id": "a", "capability": "a", "next": ["b", "c"]},
        {"id": "b", "capability": "b", "next": ["d"]},
        {"id": "c", "capability": "c", "next": ["d"]},
        {"id": "d", "capability": "d", "next": ["e"]},
        {"id": "e", "capability": "e"},
    ],
    "defaults": {"retry": {"max_attempts": 1, "base_delay_s": 0.01, "max_delay_s": 0.02}},
}


def _diamond(db: str, undone: list[str], **dag: Any) -> AgentRegistry:
    install(db, "wf", {**DIAMOND_PLUS, **dag}, {c: c.upper() for c in "abcde"})
    return AgentRegistry([Effects(c.upper(), undone, fail=(c == "e")) for c in "abcde"])


def test_diamond_reverse_topological_rule(db: str, instance: Any) -> None:
    undone: list[str] = []
    registry = _diamond(db, undone)
    result, eid = run(db, instance, "wf", registry)
    assert not result.success
    [comp] = _compensate(db, instance, registry)
    assert comp.success
    assert undone[0] == "d" and undone[-1] == "a" and sorted(undone[1:3]) == ["b", "c"]
    order = [s for t, s, _ in events(db, eid) if t in ("stage_compensating", "stage_compensated")]
    # every stage's undo starts only after the undos of all stages that depended on it finished
    finished = {s: i for i, s in enumerate(order) if order.index(s) != i}
    started = {s: order.index(s) for s in set(order)}
    for stage, dependents in {"a": "bcd", "b": "d", "c": "d"}.items():
        assert all(finished[d] < started[stage] for d in dependents)
    assert rows(db, "SELECT status FROM workflow_executions") == [{"status": "rolled_back"}]


def test_the_database_refuses_the_wrong_order(db: str, instance: Any) -> None:
    undone: list[str] = []
    registry = _diamond(db, undone)
    _, eid = run(db, instance, "wf", registry)
    with connect(db) as conn:
        conn.execute("SELECT perform_workflow_compensation(%s, 'test')", (eid,))
        with pytest.raises(psycopg.errors.ObjectNotInPrerequisiteState, match="before its dependents b, c, d"):
            conn.execute("SELECT * FROM lifecycle.undo_start(%s, 'a', 'run-x', ARRAY['b','c','d','e'])", (eid,))


def test_hold_leaves_the_execution_failed_until_asked(db: str, instance: Any, dagster_home: Path) -> None:
    undone: list[str] = []
    registry = _diamond(db, undone, on_failure="hold")
    result, eid = run(db, instance, "wf", registry)
    assert not result.success
    assert _compensate(db, instance, registry) == []
    assert rows(db, "SELECT status FROM workflow_executions") == [{"status": "failed"}]
    assert undone == []
    with connect(db) as conn:
        conn.execute("SELECT perform_workflow_compensation(%s, 'operator')", (eid,))
    [comp] = _compensate(db, instance, registry)
    assert comp.success and len(undone) == 4
    assert rows(db, "SELECT status FROM workflow_executions") == [{"status": "rolled_back"}]


class FlakyUndo(Effects):
    def __init__(self, name: str, undone: list[str], failures: int) -> None:
        super().__init__(name, undone)
        self.failures = failures

    def compensate(self, task: CompensationTask) -> dict[str, Any]:
        if self.failures > 0:
            self.failures -= 1
            raise RuntimeError("undo service unavailable")
        return super().compensate(task)


@pytest.mark.parametrize(("failures", "final"), [(2, "rolled_back"), (99, "compensation_failed")])
def test_undo_is_retried_by_its_policy(db: str, instance: Any, failures: int, final: str) -> None:
    undone: list[str] = []
    install(db, "wf", DIAMOND_PLUS, {c: c.upper() for c in "abcde"})
    agents = [Effects(c.upper(), undone, fail=(c == "e")) for c in "abcd"]
    agents[1] = FlakyUndo("B", undone, failures)
    registry = AgentRegistry([*agents, Effects("E", undone, fail=True)])
    _, eid = run(db, instance, "wf", registry)
    [comp] = _compensate(db, instance, registry)
    [ex] = rows(db, "SELECT status, error_message FROM workflow_executions WHERE id = %(e)s", e=eid)
    assert ex["status"] == final
    retrying = [m for t, s, m in events(db, eid) if t == "stage_compensation_retrying" and s == "b"]
    if final == "rolled_back":
        assert comp.success and len(retrying) == 2
        assert sorted(undone) == ["a", "b", "c", "d"]
    else:
        assert not comp.success and len(retrying) == 2  # 3 attempts in all
        assert ex["error_message"] == (
            "compensation of stage b failed: RuntimeError: undo service unavailable (attempt 3 of 3)"
        )
        assert "a" not in undone  # its dependent b was never undone
        [log] = rows(
            db, "SELECT status FROM workflow_execution_logs WHERE execution_id = %(e)s AND stage_id = 'b'", e=eid
        )
        assert log["status"] == "compensation_failed"


def test_a_compensation_run_survives_a_lost_connection_while_an_undo_waits_to_retry(db: str, instance: Any) -> None:
    """The run's kept connection is killed (a server restart, a failover) while Dagster waits to
    retry an undo: the retried undo reconnects and the execution is rolled back."""
    undone: list[str] = []
    slow_retry = {"retry": {"max_attempts": 1, "base_delay_s": 2, "max_delay_s": 2, "jitter": "none"}}
    install(db, "wf", {**DIAMOND_PLUS, "defaults": slow_retry}, {c: c.upper() for c in "abcde"})
    agents = [Effects(c.upper(), undone, fail=(c == "e")) for c in "abcde"]
    agents[1] = FlakyUndo("B", undone, 1)
    registry = AgentRegistry(agents)
    _, eid = run(db, instance, "wf", registry)
    killed: list[int] = []
    stop = threading.Event()

    def kill_during_the_wait() -> None:
        with connect(db) as conn:
            while not stop.wait(0.05):
                retrying = conn.execute(
                    "SELECT 1 FROM workflow_events WHERE execution_id = %s"
                    " AND event_type = 'stage_compensation_retrying'",
                    (eid,),
                ).fetchone()
                if retrying:
                    row = conn.execute(
                        "SELECT count(pg_terminate_backend(pid)) AS n FROM pg_stat_activity"
                        " WHERE datname = current_database() AND application_name LIKE 'lifecycle-dagster op%%'"
                    ).fetchone()
                    killed.append(int(row["n"]) if row else 0)
                    return

    killer = threading.Thread(target=kill_during_the_wait)
    killer.start()
    try:
        [comp] = _compensate(db, instance, registry)
    finally:
        stop.set()
        killer.join(10)
    assert killed == [1]  # the run's op connection, killed while the undo of b waited
    assert comp.success
    assert rows(db, "SELECT status FROM workflow_executions WHERE id = %(e)s", e=eid) == [{"status": "rolled_back"}]
    # an undo whose connection died mid-call may be called again (at least once), recorded once
    assert set(undone) == {"a", "b", "c", "d"}
    compensated = sorted(s for t, s, _ in events(db, eid) if t == "stage_compensated")
    assert compensated == ["a", "b", "c", "d"]


def test_perform_workflow_compensation_twice_and_concurrently(db: str, instance: Any) -> None:
    undone: list[str] = []
    registry = _diamond(db, undone)
    _, eid = run(db, instance, "wf", registry)
    barrier = threading.Barrier(4)
    errors: list[BaseException] = []

    def call() -> None:
        try:
            with connect(db) as conn:
                barrier.wait(10)
                conn.execute("SELECT perform_workflow_compensation(%s, 'together')", (eid,))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=call) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert errors == []
    with connect(db) as conn:
        conn.execute("SELECT perform_workflow_compensation(%s, 'again')", (eid,))
    kinds = [t for t, _, _ in events(db, eid)]
    assert kinds.count("workflow_compensating") == 1
    assert rows(db, "SELECT count(*) AS n FROM pg_proc WHERE proname = 'perform_workflow_compensation'") == [{"n": 1}]
    [ev] = [m for t, _, m in events(db, eid) if t == "workflow_compensating"]
    assert ev["stages"] == ["a", "b", "c", "d"] and ev["reason"] == "together"


def test_nothing_to_compensate_rolls_back_at_once(db: str) -> None:
    install(db, "wf", DIAMOND_PLUS, {c: c.upper() for c in "abcde"})
    _, eid = create_execution(db, "wf")
    with connect(db) as conn:
        conn.execute("SELECT perform_workflow_compensation(%s, 'never ran')", (eid,))
    assert [t for t, _, _ in events(db, eid)] == ["workflow_cancelled", "workflow_compensating", "workflow_rolled_back"]
    assert rows(db, "SELECT status FROM workflow_executions") == [{"status": "rolled_back"}]


def test_a_completed_execution_is_never_compensated(db: str, instance: Any) -> None:
    install(db, "wf", {"stages": [{"id": "a", "capability": "a"}]}, {"a": "A"})
    result, eid = run(db, instance, "wf", AgentRegistry([Effects("A", [])]))
    assert result.success
    with connect(db) as conn, pytest.raises(psycopg.errors.ObjectNotInPrerequisiteState, match="completed"):
        conn.execute("SELECT perform_workflow_compensation(%s, 'x')", (eid,))


def test_failure_sensor_mirrors_once_and_reconciler_covers_a_raising_sensor(
    db: str, instance: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    undone: list[str] = []
    registry = _diamond(db, undone)
    defs = definitions_from_snapshot(fetch_snapshot(db))
    sensor = defs.get_repository_def().get_sensor_def("lifecycle_run_failure_sensor")
    first = sensor.evaluate_tick(dg.build_sensor_context(instance=instance))  # the first tick sets the cursor
    assert first.cursor

    # a run that dies without recording its failure (as a killed worker would): the run fails,
    # the execution is still in progress
    _, eid = create_execution(db, "wf")

    @dg.op
    def crash() -> None:
        raise RuntimeError("worker died")

    lost = dg.GraphDefinition(name="wf__v1", node_defs=[crash]).to_job(name="wf__v1")
    result = lost.execute_in_process(instance=instance, tags={EXECUTION_ID_TAG: eid}, raise_on_error=False)
    assert not result.success
    with connect(db) as conn:
        conn.execute(
            "UPDATE workflow_executions SET status = 'in_progress', dagster_run_id = %s WHERE id = %s",
            (result.run_id, eid),
        )

    # the sensor raises (its database is unreachable): the tick fails, the run is not delivered again
    monkeypatch.setenv("DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/ld_no_such_database")
    ticked = sensor.evaluate_tick(dg.build_sensor_context(instance=instance, cursor=first.cursor))
    [reaction] = ticked.dagster_run_reactions
    assert reaction.dagster_run is not None and reaction.dagster_run.run_id == result.run_id
    assert reaction.error is not None and "ld_no_such_database" in reaction.error.message
    monkeypatch.setenv("DATABASE_URL", db)
    assert rows(db, "SELECT status FROM workflow_executions") == [{"status": "in_progress"}]

    # the reconciler finds the failed run, fails the execution and compensates it (no stage had
    # completed, so there is nothing to undo and it is rolled back at once)
    assert _compensate(db, instance, registry) == []
    [ex] = rows(db, "SELECT status, error_message FROM workflow_executions")
    assert ex == {"status": "rolled_back", "error_message": f"Dagster run {result.run_id} ended FAILURE"}
    kinds = [t for t, _, _ in events(db, eid)]
    assert kinds == ["workflow_failed", "workflow_compensating", "workflow_rolled_back"]

    # the same failure delivered again (a fresh cursor): nothing changes
    again = sensor.evaluate_tick(dg.build_sensor_context(instance=instance, cursor=first.cursor))
    assert again.cursor
    assert [t for t, _, _ in events(db, eid)] == kinds


def test_failure_sensor_delivers_a_failed_run(db: str, instance: Any) -> None:
    undone: list[str] = []
    registry = _diamond(db, undone)
    defs = definitions_from_snapshot(fetch_snapshot(db))
    repo = defs.get_repository_def()
    sensor = repo.get_sensor_def("lifecycle_run_failure_sensor")
    first = sensor.evaluate_tick(dg.build_sensor_context(instance=instance))
    result, eid = run(db, instance, "wf", registry)
    assert not result.success
    second = sensor.evaluate_tick(dg.build_sensor_context(instance=instance, cursor=first.cursor))
    assert [r.dagster_run.run_id for r in second.dagster_run_reactions] == [result.run_id]
    assert rows(db, "SELECT status FROM workflow_executions") == [{"status": "compensating"}]
    # delivered twice (the cursor replayed): one compensation
    sensor.evaluate_tick(dg.build_sensor_context(instance=instance, cursor=first.cursor))
    assert [t for t, _, _ in events(db, eid)].count("workflow_compensating") == 1
    [comp] = _compensate(db, instance, registry)
    assert comp.success
    assert rows(db, "SELECT status FROM workflow_executions") == [{"status": "rolled_back"}]


def test_cli_compensate_runs_the_compensation(db: str, instance: Any, dagster_home: Path) -> None:
    from click.testing import CliRunner

    from lifecycle_dagster.cli.main import main

    undone: list[str] = []
    install(db, "wf", {**DIAMOND_PLUS, "on_failure": "hold"}, {c: c.upper() for c in "abcde"})
    registry = AgentRegistry([Effects(c.upper(), undone, fail=(c == "e")) for c in "abcde"])
    _, eid = run(db, instance, "wf", registry)
    # the CLI's registry is the built-in one: these agents are unknown to it, so the undo fails
    out = CliRunner().invoke(main, ["compensate", eid], env={"DAGSTER_HOME": str(dagster_home)})
    assert out.exit_code == 1
    assert "status: compensation_failed" in out.output
    assert "is not registered in this code location" in out.output
    _ = build_compensation_job


WORKER = """
import json, sys, time
from lifecycle_dagster.agents import AgentRegistry, artifacts
from lifecycle_dagster.store.db import connect
from lifecycle_dagster.location.job_factory import EXECUTION_ID_TAG, build_job
from lifecycle_dagster.location.resources import agents_resource
from dagster import DagsterInstance

class A:
    name = "A"
    def run(self, task):
        return {"summary": "a", "artifacts": artifacts("thing", [{"id": "a"}])}

class Slow:
    name = "B"
    def run(self, task):
        time.sleep(120)
        return {"summary": "never"}

dsn, home, eid = sys.argv[1:4]
with connect(dsn) as conn:
    row = conn.execute(
        "SELECT id::text AS id, name, version, description, dag_schema FROM workflow_definitions"
    ).fetchone()
instance = DagsterInstance.from_config(home)
build_job(dict(row)).execute_in_process(
    instance=instance, tags={EXECUTION_ID_TAG: eid},
    resources={"lifecycle_agents": agents_resource(AgentRegistry([A(), Slow()]))})
"""


@pytest.mark.slow
def test_a_killed_run_worker_goes_stale_and_is_compensated(
    db: str, instance: Any, dagster_home: Path, tmp_path: Path
) -> None:
    import os
    import signal
    import subprocess
    import sys
    import time

    install(
        db,
        "wf",
        {"stages": [{"id": "a", "capability": "a", "next": ["b"]}, {"id": "b", "capability": "b"}]},
        {"a": "A", "b": "B"},
    )
    _, eid = create_execution(db, "wf")
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {**os.environ, "DATABASE_URL": db, "LIFECYCLE_DAGSTER_HEARTBEAT_S": "0.2"}
    worker = subprocess.Popen(
        [sys.executable, str(script), db, str(dagster_home), eid],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        beats: list[Any] = []
        while time.monotonic() < deadline:
            r = rows(
                db,
                "SELECT l.status, e.heartbeat_at FROM workflow_executions e LEFT JOIN workflow_execution_logs l"
                " ON l.execution_id = e.id AND l.stage_id = 'b' WHERE e.id = %(e)s",
                e=eid,
            )[0]
            if r["status"] == "in_progress" and r["heartbeat_at"] is not None:
                beats.append(r["heartbeat_at"])
                if len(set(beats)) >= 3:  # the heartbeat moves while the agent works
                    break
            time.sleep(0.1)
        assert len(set(beats)) >= 3
        worker.send_signal(signal.SIGKILL)
        worker.wait(10)
    finally:
        if worker.poll() is None:
            worker.kill()
    # while fresh, the execution is left alone
    registry = AgentRegistry([Effects("A", []), Effects("B", [])])
    names = ["wf__v1__compensate"]
    assert list(reconcile(instance, names, db, timeout_s=30)) == []
    assert rows(db, "SELECT status FROM workflow_executions") == [{"status": "in_progress"}]
    time.sleep(1.5)
    [req] = list(reconcile(instance, names, db, timeout_s=1.0))
    assert isinstance(req, dg.RunRequest)
    [ex] = rows(db, "SELECT status, error_message FROM workflow_executions")
    assert ex["status"] == "compensating"
    assert "no heartbeat from Dagster run" in ex["error_message"]
    logs = {r["stage_id"]: r["status"] for r in rows(db, "SELECT stage_id, status FROM workflow_execution_logs")}
    assert logs == {"a": "completed", "b": "failed"}
    defs = definitions_from_snapshot(fetch_snapshot(db))
    comp = (
        defs.get_repository_def()
        .get_job("wf__v1__compensate")
        .execute_in_process(
            instance=instance, tags=dict(req.tags), resources={"lifecycle_agents": agents_resource(registry)}
        )
    )
    assert comp.success
    assert rows(db, "SELECT status FROM workflow_executions") == [{"status": "rolled_back"}]
    assert _live_artifacts(db, eid) == {}


class Undoer:
    name = "Undoer"

    def __init__(self) -> None:
        self.seen: list[tuple[str, str, list[str]]] = []

    def run(self, task: Task) -> dict[str, Any]:
        self.seen.append((task.stage_id, task.capability, sorted(task.upstream)))
        return {"summary": f"undid {task.stage_id} by capability"}


def test_compensate_capability_and_opt_out(db: str, instance: Any) -> None:
    undone: list[str] = []
    dag = {
        "stages": [
            {"id": "a", "capability": "a", "next": ["b"], "compensate": "undo_a"},
            {"id": "b", "capability": "b", "next": ["c"], "compensate": False},
            {"id": "c", "capability": "c"},
        ],
        "defaults": {"retry": {"max_attempts": 1}},
    }
    install(db, "wf", dag, {"a": "A", "b": "B", "c": "C", "undo_a": "Undoer"})
    undoer = Undoer()
    registry = AgentRegistry([Effects("A", undone), Effects("B", undone), Effects("C", undone, fail=True), undoer])
    _, eid = run(db, instance, "wf", registry)
    [comp] = _compensate(db, instance, registry)
    assert comp.success
    assert undoer.seen == [("a", "undo_a", ["a"])]
    assert undone == []  # neither A's own undo (a has a compensate capability) nor B's (opted out) ran
    logs = {r["stage_id"]: r["status"] for r in rows(db, "SELECT stage_id, status FROM workflow_execution_logs")}
    assert logs == {"a": "compensated", "b": "completed", "c": "failed"}
    assert _live_artifacts(db, eid) == {"b": 1}  # b opted out: its effect stays
    assert rows(db, "SELECT status FROM workflow_executions") == [{"status": "rolled_back"}]
    [ev] = [m for t, s, m in events(db, eid) if t == "stage_compensated"]
    assert ev["undo"] == "capability undo_a (Undoer)" and ev["voided"] == 1


HANGING_UNDO_DAG = {
    "stages": [
        {"id": "a", "capability": "a", "next": ["b"], "timeout_s": 6},  # room for a loaded machine
        {"id": "b", "capability": "b"},
    ],
    "defaults": {"retry": {"max_attempts": 1, "base_delay_s": 0.01, "max_delay_s": 0.02}},
}


def _in_thread(fn: Any, timeout_s: float) -> list[Any]:
    """``fn()`` in a daemon thread, waited for ``timeout_s`` seconds: ``[result]``, or ``[]`` when
    it did not return in time (a hung call must fail the test, not hang it)."""
    out: list[Any] = []
    t = threading.Thread(target=lambda: out.append(fn()), daemon=True)
    t.start()
    t.join(timeout_s)
    return out


def test_a_hung_undo_is_killed_at_the_stage_timeout_and_retried(db: str, instance: Any, tmp_path: Path) -> None:
    from agents_for_tests import UndoHangsFirst
    from processes import gone_within

    install(db, "wf", HANGING_UNDO_DAG, {"a": "A", "b": "B"})
    registry = AgentRegistry([UndoHangsFirst("A", tmp_path), Broken("B")])
    result, eid = run(db, instance, "wf", registry)
    assert not result.success
    done = _in_thread(lambda: _compensate(db, instance, registry), 90)
    assert done, "the compensation run never finished: its undo hung"
    [comp] = done[0]
    assert comp.success
    assert rows(db, "SELECT status FROM workflow_executions") == [{"status": "rolled_back"}]
    [retrying] = [m for t, s, m in events(db, eid) if t == "stage_compensation_retrying" and s == "a"]
    assert "no result within the stage timeout of 6 s" in str(retrying)
    [marker] = list(tmp_path.glob("undo-*"))
    assert gone_within([int(marker.name.split("-")[1])], 5) == []  # the hung undo's process was killed
    assert _live_artifacts(db, eid) == {}


def test_an_undo_stops_when_another_run_takes_the_compensation_over(db: str, instance: Any, tmp_path: Path) -> None:
    from agents_for_tests import UndoHangsFirst

    slow_timeout = {
        **HANGING_UNDO_DAG,
        "stages": [{**HANGING_UNDO_DAG["stages"][0], "timeout_s": 60}, HANGING_UNDO_DAG["stages"][1]],
    }  # type: ignore[index]
    install(db, "wf", slow_timeout, {"a": "A", "b": "B"})
    registry = AgentRegistry([UndoHangsFirst("A", tmp_path), Broken("B")])
    _, eid = run(db, instance, "wf", registry)
    box: list[Any] = []
    t = threading.Thread(target=lambda: box.append(_compensate(db, instance, registry)), daemon=True)
    t.start()
    deadline = time.monotonic() + 30
    while not list(tmp_path.glob("undo-*")) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert list(tmp_path.glob("undo-*")), "the undo never started"
    with connect(db) as conn:  # what a takeover run's first undo does (lifecycle.undo_start, takeover)
        conn.execute("UPDATE workflow_executions SET compensation_run_id = 'another-run' WHERE id = %s", (eid,))
    t0 = time.monotonic()
    t.join(20)
    assert not t.is_alive() and time.monotonic() - t0 < 10  # stopped at once, not at the 60 s timeout
    [comp] = box[0]
    assert not comp.success
    kinds = [k for k, s, _ in events(db, eid) if s == "a"]
    assert "stage_compensation_retrying" not in kinds and "stage_compensated" not in kinds  # nothing recorded
    [ex] = rows(db, "SELECT status, compensation_run_id FROM workflow_executions")
    assert ex == {"status": "compensating", "compensation_run_id": "another-run"}


def test_a_stale_compensation_is_taken_over_and_a_compensation_run_beats(db: str, instance: Any) -> None:
    """A compensating execution whose compensation run stopped beating (its run worker was killed;
    here a run not even in the instance) gets a takeover run; while fresh it is left alone. And
    lifecycle.run_heartbeat beats for a compensation run."""
    undone: list[str] = []
    registry = _diamond(db, undone)
    _, eid = run(db, instance, "wf", registry)
    with connect(db) as conn:
        conn.execute("SELECT perform_workflow_compensation(%s, 'test')", (eid,))
        conn.execute("UPDATE workflow_executions SET compensation_run_id = 'killed-run' WHERE id = %s", (eid,))
        before = conn.execute("SELECT heartbeat_at FROM workflow_executions WHERE id = %s", (eid,)).fetchone()
        beat = conn.execute("SELECT lifecycle.run_heartbeat('killed-run') AS alive").fetchone()
        after = conn.execute("SELECT heartbeat_at FROM workflow_executions WHERE id = %s", (eid,)).fetchone()
    assert beat is not None and beat["alive"] is True
    assert before is not None and after is not None and after["heartbeat_at"] != before["heartbeat_at"]
    names = ["wf__v1__compensate"]
    assert list(reconcile(instance, names, db, timeout_s=3600)) == []  # fresh: left alone
    time.sleep(1.2)
    [req] = list(reconcile(instance, names, db, timeout_s=1.0))
    assert isinstance(req, dg.RunRequest)
    assert req.run_key == f"compensate:{eid}:after:killed-run"
    assert req.tags == {EXECUTION_ID_TAG: eid, "lifecycle/takeover": "killed-run"}
    repo = definitions_from_snapshot(fetch_snapshot(db)).get_repository_def()
    comp = repo.get_job("wf__v1__compensate").execute_in_process(
        instance=instance, tags=dict(req.tags), resources={"lifecycle_agents": agents_resource(registry)}
    )
    assert comp.success
    assert rows(db, "SELECT status, compensation_run_id FROM workflow_executions") == [
        {"status": "rolled_back", "compensation_run_id": comp.run_id}
    ]
    assert sorted(undone) == ["a", "b", "c", "d"]


def _started_run(instance: Any, job: dg.JobDefinition, execution_id: str) -> str:
    """A run Dagster thinks is STARTED, tagged with ``execution_id``, whose run worker is gone (as
    after a kill -9 of the run worker: the default run launcher never notices)."""
    run = instance.create_run_for_job(
        job_def=job, tags={**job.tags, EXECUTION_ID_TAG: execution_id}, status=dg.DagsterRunStatus.STARTED
    )
    return str(run.run_id)


def test_a_compensation_run_lost_before_its_first_undo_is_replaced(db: str, instance: Any) -> None:
    """Chaos at scale 10 left 15 executions `compensating` for good: their compensation run was
    launched (run key compensate:<execution>) and its run worker killed before its first undo took
    the compensation, so no run owned it, the run stayed STARTED, and the reconciler asked for the
    same run key again and again (Dagster launches a run key once). Now a silent, unowned
    compensation whose runs are all gone gets a new run, and the lost run is reported failed."""
    undone: list[str] = []
    registry = _diamond(db, undone)
    _, eid = run(db, instance, "wf", registry)
    with connect(db) as conn:
        conn.execute("SELECT perform_workflow_compensation(%s, 'test')", (eid,))
    repo = definitions_from_snapshot(fetch_snapshot(db)).get_repository_def()
    job = repo.get_job("wf__v1__compensate")
    names = [job.name]
    [first] = list(reconcile(instance, names, db, timeout_s=3600))
    assert isinstance(first, dg.RunRequest) and first.run_key == f"compensate:{eid}"
    lost = _started_run(instance, job, eid)  # the run of that key, killed before its first undo
    assert list(reconcile(instance, names, db, timeout_s=3600)) == [first]  # fresh: Dagster dedupes the key
    time.sleep(1.2)
    [again] = list(reconcile(instance, names, db, timeout_s=1.0))
    assert isinstance(again, dg.RunRequest) and again.run_key == f"compensate:{eid}:after:{lost}"
    assert instance.get_run_by_id(lost).status == dg.DagsterRunStatus.FAILURE
    comp = job.execute_in_process(
        instance=instance, tags=dict(again.tags), resources={"lifecycle_agents": agents_resource(registry)}
    )
    assert comp.success
    assert rows(db, "SELECT status FROM workflow_executions") == [{"status": "rolled_back"}]
    assert sorted(undone) == ["a", "b", "c", "d"]


def test_a_started_run_whose_execution_moved_on_is_failed_and_frees_its_slot(db: str, instance: Any) -> None:
    """A run worker killed after its execution failed (or completed) left the run STARTED for good,
    holding one of the instance's concurrent-run slots: four of them and no queued run (the
    compensation runs included) ever started. The reconciler now fails such a run once its execution
    has been silent for the bound, and leaves a run whose execution is still its own alone."""
    undone: list[str] = []
    registry = _diamond(db, undone)
    _, eid = run(db, instance, "wf", registry)  # fails at e: compensation is due
    _, other = create_execution(db, "wf")
    repo = definitions_from_snapshot(fetch_snapshot(db)).get_repository_def()
    forward = repo.get_job("wf__v1")
    zombie = _started_run(instance, forward, eid)
    live = _started_run(instance, forward, other)
    with connect(db) as conn:  # `other` is in progress under `live` (its heartbeat is old too)
        conn.execute(
            "UPDATE workflow_executions SET status = 'in_progress', dagster_run_id = %s WHERE id = %s", (live, other)
        )
    names = ["wf__v1__compensate"]
    list(reconcile(instance, names, db, timeout_s=3600))
    assert instance.get_run_by_id(zombie).status == dg.DagsterRunStatus.STARTED  # not silent long enough
    time.sleep(1.2)
    list(reconcile(instance, names, db, timeout_s=1.0))
    assert instance.get_run_by_id(zombie).status == dg.DagsterRunStatus.FAILURE
    # `live` is its execution's run: the heartbeat rule (not this one) judges it: failed as stale
    [ex] = rows(db, "SELECT status FROM workflow_executions WHERE id = %(e)s", e=other)
    assert ex["status"] in ("failed", "compensating", "rolled_back")
