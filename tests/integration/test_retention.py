"""Retention (docs/retention.md): `lifecycle-dagster prune` and lifecycle.executions_prune remove the
finished executions older than the horizon whole (tasks, stage logs, artifacts, breaker outcomes,
audit stream, Dagster runs) and touch nothing else; the audit stays verifiable; a dry run counts
the same; claims keep working while a large history is pruned."""

from __future__ import annotations

import json
import multiprocessing as mp
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
from click.testing import CliRunner

from lifecycle_dagster.agents import AgentRegistry, Task
from lifecycle_dagster.cli.main import main
from lifecycle_dagster.engine.retention import prune
from lifecycle_dagster.location.definitions import definitions_from_snapshot, fetch_snapshot
from lifecycle_dagster.location.retention import RETENTION_JOB, RETENTION_SCHEDULE
from lifecycle_dagster.store.audit import verify
from lifecycle_dagster.store.db import connect
from lifecycle_dagster.store.transitions import task_claim, task_complete

from helpers import install, rows, run

REPO = Path(__file__).resolve().parents[2]
HISTORY_SQL = REPO / "bench" / "sql" / "history_functions.sql"

#: every row that belongs to an execution, per kind (the executions' ids are %(ids)s)
DUMPS = {
    "executions": "SELECT to_jsonb(e)::text AS r FROM workflow_executions e WHERE e.id = ANY(%(ids)s::uuid[])",
    "stage_logs": "SELECT to_jsonb(l)::text AS r FROM workflow_execution_logs l"
    " WHERE l.execution_id = ANY(%(ids)s::uuid[])",
    "tasks": "SELECT to_jsonb(t)::text AS r FROM task_queue t WHERE t.workflow_execution_id = ANY(%(ids)s::uuid[])",
    "artifacts": "SELECT to_jsonb(a)::text AS r FROM lifecycle.artifacts a WHERE a.execution_id = ANY(%(ids)s::uuid[])",
    "events": "SELECT to_jsonb(v)::text AS r FROM workflow_events v WHERE v.execution_id = ANY(%(ids)s::uuid[])",
    "breaker_outcomes": "SELECT to_jsonb(o)::text AS r FROM lifecycle.breaker_outcomes o"
    " WHERE o.task_id IN (SELECT id FROM task_queue WHERE workflow_execution_id = ANY(%(ids)s::uuid[]))",
}


class Echo:
    def __init__(self, name: str) -> None:
        self.name = name

    def run(self, task: Task) -> dict[str, Any]:
        return {"summary": task.stage_id}


class Broken:
    name = "B"

    def run(self, task: Task) -> dict[str, Any]:
        raise RuntimeError("broken agent")


def _dump(dsn: str, ids: list[str]) -> dict[str, list[str]]:
    """Every row of these executions, per kind, as sorted JSON texts."""
    with connect(dsn) as conn:
        return {k: sorted(r["r"] for r in conn.execute(q, {"ids": ids}).fetchall()) for k, q in DUMPS.items()}  # type: ignore[arg-type]


def _extras(dsn: str, eid: str, *, breaker_state: str = "closed", agent_name: str = "X", capability: str = "x") -> None:
    """A task, an artifact and two breaker outcomes (agent, capability) for execution ``eid``; both
    breakers set to ``breaker_state`` since a minute ago."""
    with connect(dsn) as conn:
        agent = conn.execute(
            "INSERT INTO agents (name) VALUES (%s) ON CONFLICT (name) DO UPDATE SET name = EXCLUDED.name"
            " RETURNING id::text AS id",
            (agent_name,),
        ).fetchone()["id"]  # type: ignore[index]
        stage = conn.execute(  # the first stage of its DAG (a task must name one)
            "SELECT d.dag_schema -> 'stages' -> 0 ->> 'id' AS s FROM workflow_executions e"
            " JOIN workflow_definitions d ON d.id = e.workflow_definition_id WHERE e.id = %s",
            (eid,),
        ).fetchone()["s"]  # type: ignore[index]
        task = conn.execute(
            "INSERT INTO task_queue (workflow_execution_id, task_type, status, capability, agent_id, attempt)"
            " VALUES (%s, %s, 'pending', %s, %s, 99) RETURNING id::text AS id",
            (eid, stage, capability, agent),
        ).fetchone()["id"]  # type: ignore[index]
        conn.execute("UPDATE task_queue SET status = 'cancelled' WHERE id = %s", (task,))
        conn.execute(
            "INSERT INTO lifecycle.artifacts (execution_id, stage_id, kind, key, data)"
            " VALUES (%s, 'first', 'k', %s, '{}')",
            (eid, eid),
        )
        for scope, key in (("agent", agent), ("capability", capability)):
            conn.execute(
                "INSERT INTO lifecycle.breakers (scope, key, state, state_since, opened_at)"
                " VALUES (%s, %s, %s, now() - interval '1 minute', now())"
                " ON CONFLICT (scope, key) DO UPDATE SET state = EXCLUDED.state, state_since = EXCLUDED.state_since,"
                " opened_at = EXCLUDED.opened_at",
                (scope, key, breaker_state),
            )
            conn.execute(
                "INSERT INTO lifecycle.breaker_outcomes (scope, key, at, success, task_id)"
                " VALUES (%s, %s, now(), true, %s)",
                (scope, key, task),
            )


def _unfinished(dsn: str, definition_id: str, path: list[str]) -> str:
    """An execution driven by hand along ``path`` of statuses (legal transitions)."""
    with connect(dsn) as conn:
        eid = conn.execute(
            "INSERT INTO workflow_executions (workflow_definition_id, status) VALUES (%s, 'pending')"
            " RETURNING id::text AS id",
            (definition_id,),
        ).fetchone()["id"]  # type: ignore[index]
        for status in path:
            conn.execute("UPDATE workflow_executions SET status = %s WHERE id = %s", (status, eid))
        conn.execute(
            "INSERT INTO workflow_events (execution_id, event_type, metadata) VALUES (%s, 'test_marker', '{}')", (eid,)
        )
    return eid


@pytest.fixture
def world(db: str, instance: Any) -> dict[str, Any]:
    """Old: 2 completed (one of them with an outcome an open breaker still counts), 1 failed, 1
    rolled back, 1 waiting, 1 in progress; then the horizon; then 1 recent completed."""
    dag = {"stages": [{"id": "first", "capability": "x", "next": ["second"]}, {"id": "second", "capability": "y"}]}
    install(db, "wf", dag, {"x": "X", "y": "Y"})
    install(db, "bad", {"stages": [{"id": "only", "capability": "b", "retry": {"max_attempts": 1}}]}, {"b": "B"})
    reg = AgentRegistry([Echo("X"), Echo("Y"), Broken()])
    w: dict[str, Any] = {"runs": {}}
    for name in ("old_done", "old_done2"):
        result, w[name] = run(db, instance, "wf", reg)
        assert result.success
        w["runs"][name] = result.run_id
    result, w["old_failed"] = run(db, instance, "bad", reg)
    w["runs"]["old_failed"] = result.run_id
    definition = rows(db, "SELECT id::text AS id FROM workflow_definitions WHERE name = 'wf'")[0]["id"]
    w["old_rolled_back"] = _unfinished(db, definition, ["cancelled", "compensating", "rolled_back"])
    w["old_waiting"] = _unfinished(db, definition, ["in_progress", "waiting"])
    w["old_running"] = _unfinished(db, definition, ["in_progress"])
    for name in ("old_done", "old_rolled_back", "old_failed"):
        _extras(db, w[name])
    time.sleep(0.05)
    w["horizon"] = rows(db, "SELECT clock_timestamp() AS t")[0]["t"]
    time.sleep(0.05)
    result, w["recent_done"] = run(db, instance, "wf", reg)
    w["runs"]["recent_done"] = result.run_id
    _extras(db, w["recent_done"])
    # an outcome an open breaker still judges (recorded since it opened): old_done2 must wait
    _extras(db, w["old_done2"], breaker_state="open", agent_name="Z", capability="z")
    w["gone"] = [w["old_done"], w["old_rolled_back"]]
    w["kept"] = [w[k] for k in ("old_done2", "old_failed", "old_waiting", "old_running", "recent_done")]
    return w


def test_prune_removes_old_finished_executions_whole_and_nothing_else(
    db: str, instance: Any, world: dict[str, Any]
) -> None:
    kept_before = _dump(db, world["kept"])
    assert all(kept_before[k] for k in ("executions", "tasks", "events", "breaker_outcomes", "artifacts", "stage_logs"))
    gone_before = _dump(db, world["gone"])
    assert all(gone_before.values())
    now = world["horizon"] + timedelta(hours=1)

    dry = prune(db, world["horizon"], dry_run=True, instance=instance, now=now)
    assert _dump(db, world["kept"]) == kept_before and all(_dump(db, world["gone"]).values())  # nothing moved
    real = prune(db, world["horizon"], instance=instance, now=now, batch=1)

    counts = {k: v for k, v in real.as_json().items() if k not in ("seconds", "batches", "dry_run")}
    assert counts == {k: v for k, v in dry.as_json().items() if k not in ("seconds", "batches", "dry_run")}
    assert (real.executions, real.deferred, real.dagster_runs) == (2, 1, 1)  # old_done2 waits for its breaker
    assert {k: getattr(real, k) for k in DUMPS} == {k: len(v) for k, v in gone_before.items()}
    assert {k: v for k, v in _dump(db, world["gone"]).items() if v} == {}
    assert _dump(db, world["kept"]) == kept_before
    # the Dagster runs: the pruned execution's gone, the others kept
    assert instance.get_run_by_id(world["runs"]["old_done"]) is None
    assert all(instance.get_run_by_id(world["runs"][k]) is not None for k in ("old_done2", "old_failed", "recent_done"))
    # the audit: every chain whole, one event of the batches in the global stream
    with connect(db) as conn:
        report = verify(conn)
    assert report.ok, [b.describe() for b in report.broken]
    assert CliRunner().invoke(main, ["audit", "verify"]).exit_code == 0
    pruned = rows(db, "SELECT metadata FROM workflow_events WHERE event_type = 'executions_pruned'")
    assert sum(r["metadata"]["executions"] for r in pruned) == 2
    # once the breaker's window has passed, old_done2 goes too; a second run finds nothing more
    with connect(db) as conn:
        conn.execute("UPDATE lifecycle.breakers SET state = 'closed', state_since = %s", (now,))
    assert prune(db, world["horizon"], instance=instance, now=now).executions == 1
    assert prune(db, world["horizon"], instance=instance, now=now).executions == 0
    with connect(db) as conn:
        assert verify(conn).ok


def test_the_cli_prunes_with_counts_and_refuses_bad_horizons(db: str, instance: Any, world: dict[str, Any]) -> None:
    runner = CliRunner()
    dry = runner.invoke(main, ["prune", "--older-than", "1h", "--dry-run", "--json"])
    assert dry.exit_code == 0, dry.output
    report = json.loads(dry.stdout.splitlines()[-1])  # stderr may carry Dagster's warnings
    assert report["dry_run"] is True and report["executions"] == 0  # nothing is an hour old yet
    text = runner.invoke(main, ["prune", "--older-than", "90d"])
    assert text.exit_code == 0, text.output
    assert "removed (finished before " in text.output and "0 executions, 0 tasks" in text.output
    assert " s" in text.output.splitlines()[-1]
    for bad, why in (
        ("banana", "not a duration"),
        ("30m", "shorter than 1h"),
        ("0h", "shorter than 1h"),
        ("5x", "not a duration"),
    ):
        out = runner.invoke(main, ["prune", "--older-than", bad])
        assert out.exit_code == 2 and "--older-than" in out.output and why in out.output, out.output
    assert "--older-than" in runner.invoke(main, ["prune"]).output
    with connect(db) as conn, pytest.raises(psycopg.errors.InvalidParameterValue, match="at least 1 hour"):
        conn.execute("SELECT * FROM lifecycle.executions_prune(now() - interval '59 minutes')")


def test_the_schedule_follows_the_setting(db: str, monkeypatch: pytest.MonkeyPatch) -> None:
    repo = definitions_from_snapshot(fetch_snapshot(db)).get_repository_def()
    schedule = repo.get_schedule_def(RETENTION_SCHEDULE)
    assert (schedule.cron_schedule, schedule.execution_timezone, schedule.job_name) == (
        "17 3 * * *",
        "UTC",
        RETENTION_JOB,
    )
    monkeypatch.setenv("LIFECYCLE_DAGSTER_RETENTION", "30d")
    repo = definitions_from_snapshot(fetch_snapshot(db)).get_repository_def()
    config = repo.get_schedule_def(RETENTION_SCHEDULE).evaluate_tick(__import__("dagster").build_schedule_context())
    [request] = config.run_requests or []
    assert request.run_config == {"ops": {"prune": {"config": {"older_than": "30d"}}}}
    monkeypatch.setenv("LIFECYCLE_DAGSTER_RETENTION", "off")
    repo = definitions_from_snapshot(fetch_snapshot(db)).get_repository_def()
    assert RETENTION_SCHEDULE not in {s.name for s in repo.schedule_defs}
    assert repo.has_job(RETENTION_JOB)
    monkeypatch.setenv("LIFECYCLE_DAGSTER_RETENTION", "10m")
    with pytest.raises(ValueError, match="LIFECYCLE_DAGSTER_RETENTION"):
        definitions_from_snapshot(fetch_snapshot(db))


def test_the_retention_job_prunes_and_deletes_runs(db: str, instance: Any, world: dict[str, Any]) -> None:
    repo = definitions_from_snapshot(fetch_snapshot(db)).get_repository_def()
    result = repo.get_job(RETENTION_JOB).execute_in_process(
        instance=instance, run_config={"ops": {"prune": {"config": {"older_than": "1h", "dry_run": True}}}}
    )
    assert result.success
    assert result.output_for_node("prune")["executions"] == 0  # nothing an hour old


# -- claims while a large history is pruned ----------------------------------------------------------

LIVE = 300  #: live executions, one queue task each
HISTORY = 2000  #: finished executions of history (26 rows each: about 52k rows)
LOCK_TIMEOUT_S = 5  #: a claim or completion that waits longer than this for a lock errors


def _claimer(dsn: str, ready: Any, go: Any, stop: Any, out: Any) -> None:
    """Claim and complete the live tasks one at a time until ``stop``; report what happened."""
    conn = connect(dsn, application_name="retention test claimer")
    conn.execute(f"SET lock_timeout = '{LOCK_TIMEOUT_S}s'")
    done, empty, errors, slowest, times = 0, 0, [], 0.0, []
    ready.set()
    go.wait()
    while not stop.is_set() or empty == 0:
        t = time.perf_counter()
        try:
            claimed = task_claim(conn, worker="w1", agent="Q", limit=1, lease_s=60)
            for c in claimed:
                assert (
                    task_complete(conn, task_id=c.task_id, token=c.lease_token, output={"summary": "ok"}).value
                    == "completed"
                )
                done += 1
                times.append(time.time())
        except Exception as exc:  # every claim must succeed: record what did not
            errors.append(f"{type(exc).__name__}: {exc}")
            claimed = []
        slowest = max(slowest, time.perf_counter() - t)
        if not claimed:
            empty += 1
            time.sleep(0.01)
    out.put({"done": done, "errors": errors, "slowest_s": slowest, "times": times})
    conn.close()


def test_claims_keep_working_while_a_large_history_is_pruned(seeded_db: str) -> None:
    db = seeded_db
    install(
        db,
        "q",
        {"stages": [{"id": "work", "capability": "qcap"}], "defaults": {"retry": {"max_attempts": 1}}},
        {"qcap": "Q"},
    )
    with connect(db) as conn:
        conn.execute("UPDATE agents SET kind = 'queue' WHERE name = 'Q'")
        conn.execute(HISTORY_SQL.read_text(encoding="utf-8"))
        lifecycle = conn.execute("SELECT id FROM workflow_definitions WHERE name = 'lifecycle_v1'").fetchone()["id"]  # type: ignore[index]
        with conn.transaction():
            conn.execute("SELECT bench_generate_history(%s, %s)", (lifecycle, HISTORY))
        q = conn.execute("SELECT id FROM workflow_definitions WHERE name = 'q'").fetchone()["id"]  # type: ignore[index]
        ids = [
            r["id"]
            for r in conn.execute(
                "INSERT INTO workflow_executions (workflow_definition_id, status, context)"
                " SELECT %s, 'in_progress', jsonb_build_object('i', g) FROM generate_series(1, %s) g RETURNING id",
                (q, LIVE),
            ).fetchall()
        ]
        conn.execute(
            "INSERT INTO workflow_execution_logs (execution_id, stage_id, status)"
            " SELECT e, 'work', 'pending' FROM unnest(%s::uuid[]) e",
            (ids,),
        )
        conn.execute(
            "INSERT INTO task_queue (workflow_execution_id, task_type, input_data, status, capability, stage_log_id)"
            " SELECT l.execution_id, 'work', jsonb_build_object('context', '{}'::jsonb, 'upstream', '{}'::jsonb),"
            " 'pending', 'qcap', l.id"
            " FROM workflow_execution_logs l WHERE l.execution_id = ANY(%s::uuid[])",
            (ids,),
        )
        history_rows = conn.execute(
            "SELECT (SELECT count(*) FROM workflow_executions WHERE status <> 'in_progress')"
            " + (SELECT count(*) FROM workflow_events) + (SELECT count(*) FROM task_queue WHERE status <> 'pending')"
            " + (SELECT count(*) FROM workflow_execution_logs WHERE status <> 'pending') AS n"
        ).fetchone()["n"]  # type: ignore[index]
    assert history_rows >= 50_000

    ctx = mp.get_context("spawn")
    ready, go, stop, out = ctx.Event(), ctx.Event(), ctx.Event(), ctx.Queue()
    claimer = ctx.Process(target=_claimer, args=(db, ready, go, stop, out))
    claimer.start()
    try:
        assert ready.wait(60)
        go.set()
        before = rows(db, "SELECT now() - interval '1 hour' AS t")[0]["t"]
        started = time.time()
        report = prune(db, before, batch=100)
        ended = time.time()
        stop.set()
        got = out.get(timeout=60)
    finally:
        stop.set()
        claimer.join(timeout=30)
    assert report.executions == HISTORY and report.batches >= HISTORY // 100
    assert got["errors"] == [] and got["done"] == LIVE
    assert got["slowest_s"] < LOCK_TIMEOUT_S
    assert any(started <= t <= ended for t in got["times"])  # claims completed while the prune ran
    left = rows(db, "SELECT status, count(*) AS n FROM workflow_executions GROUP BY status ORDER BY status")
    assert left == [{"status": "completed", "n": LIVE}]  # the history gone, every live execution completed
