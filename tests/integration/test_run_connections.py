"""One connection per run (issue 13): a real in-process Dagster run of the five-stage lifecycle on
real Postgres, sampled from pg_stat_activity on a separate connection while it runs."""

from __future__ import annotations

import threading
import time
import uuid
from typing import Any

import pytest

from lifecycle_dagster.agents import AgentRegistry, Task
from lifecycle_dagster.location.job_factory import EXECUTION_ID_TAG, build_job
from lifecycle_dagster.location.resources import agents_resource
from lifecycle_dagster.queue.worker import Worker
from lifecycle_dagster.store.db import APPLICATION_NAME_MAX, application_name, connect

from helpers import create_execution, rows

AGENTS = ("Opportunity Agent", "Assessment Agent", "Design Agent", "Realization Agent", "Integrity Agent")
STAGE_S = 0.4
HEARTBEAT_S = 0.05


class Slow:
    """Works ``STAGE_S`` seconds, then succeeds."""

    def __init__(self, name: str) -> None:
        self.name = name

    def run(self, task: Task) -> dict[str, Any]:
        time.sleep(STAGE_S)
        return {"summary": f"{task.stage_id} done"}


class Sampler(threading.Thread):
    """Every 20 ms: the (pid, application_name) of this run's connections and the execution's
    (current_stage, heartbeat_at), read on a connection of its own; and the run's heartbeat
    threads alive in this process."""

    def __init__(self, dsn: str, run_id: str, eid: str) -> None:
        super().__init__(daemon=True)
        self.dsn, self.eid = dsn, eid
        self.pattern = f"lifecycle-dagster % {run_id[:8]}"
        self.samples: list[list[tuple[int, str]]] = []
        self.beats: list[tuple[str | None, Any]] = []
        self.thread_name = f"lifecycle-heartbeat-{run_id}"
        self.heartbeat_threads: set[threading.Thread] = set()
        self.done = threading.Event()

    def run(self) -> None:
        with connect(self.dsn) as conn:
            while not self.done.wait(0.02):
                found = conn.execute(
                    "SELECT pid, application_name FROM pg_stat_activity WHERE application_name LIKE %s",
                    (self.pattern,),
                ).fetchall()
                self.samples.append([(r["pid"], r["application_name"]) for r in found])
                row = conn.execute(
                    "SELECT current_stage, heartbeat_at FROM workflow_executions WHERE id = %s", (self.eid,)
                ).fetchone()
                assert row is not None
                self.beats.append((row["current_stage"], row["heartbeat_at"]))
                self.heartbeat_threads.update(t for t in threading.enumerate() if t.name == self.thread_name)


def _run_sampled(dsn: str, instance: Any) -> tuple[Any, str, Sampler]:
    row, eid = create_execution(dsn, "lifecycle_v1", {"customer": "sampled"})
    run_id = str(uuid.uuid4())
    sampler = Sampler(dsn, run_id, eid)
    sampler.start()
    try:
        result = build_job(row).execute_in_process(
            instance=instance,
            run_id=run_id,
            tags={EXECUTION_ID_TAG: eid},
            raise_on_error=False,
            resources={"lifecycle_agents": agents_resource(AgentRegistry(Slow(n) for n in AGENTS))},
        )
    finally:
        sampler.done.set()
        sampler.join(10)
    return result, run_id, sampler


def _pids(sampler: Sampler, role: str) -> set[int]:
    return {pid for sample in sampler.samples for pid, name in sample if name.split(" ")[1] == role}


def test_a_run_holds_one_op_connection_and_one_heartbeat(
    seeded_db: str, instance: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LIFECYCLE_DAGSTER_HEARTBEAT_S", str(HEARTBEAT_S))
    result, run_id, sampler = _run_sampled(seeded_db, instance)
    assert result.success
    assert len(sampler.samples) >= 50  # 5 stages of 0.4 s, sampled every 20 ms

    assert max(len(s) for s in sampler.samples) == 2  # op + heartbeat, never more
    names = {name for sample in sampler.samples for _, name in sample}
    assert names == {f"lifecycle-dagster op {run_id[:8]}", f"lifecycle-dagster heartbeat {run_id[:8]}"}
    assert len(_pids(sampler, "heartbeat")) == 1  # one heartbeat connection for the whole run
    assert len(sampler.heartbeat_threads) == 1  # one heartbeat for the whole run, not one per stage
    assert len(_pids(sampler, "op")) == 1  # the five stage ops used one connection

    # the heartbeat kept beating through the stages: heartbeat_at moved while each stage ran
    stages_beating: set[str] = set()
    for (_, before), (stage, after) in zip(sampler.beats, sampler.beats[1:], strict=False):
        if before is not None and after is not None and after > before:
            stages_beating.add(str(stage))
    assert stages_beating == {"discover", "qualify", "target_design", "value_realization", "integrity"}


def test_a_stage_waiting_for_its_queue_task_opens_no_third_connection(
    seeded_db: str, instance: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The wait LISTENs on the op connection: still op + heartbeat, never a third."""
    monkeypatch.setenv("LIFECYCLE_DAGSTER_HEARTBEAT_S", str(HEARTBEAT_S))
    with connect(seeded_db) as conn:
        conn.execute("UPDATE agents SET kind = 'queue' WHERE name = 'Design Agent'")
    stop = threading.Event()
    registry = AgentRegistry([Slow("Design Agent")])
    worker = Worker(seeded_db, "Design Agent", registry, lease_s=5, poll_s=0.5, worker_id="conn-test")
    serving = threading.Thread(target=worker.run, args=(stop,))
    serving.start()
    try:
        result, run_id, sampler = _run_sampled(seeded_db, instance)
    finally:
        stop.set()
        serving.join(30)
    assert result.success and worker.completed == 1
    [task] = rows(seeded_db, "SELECT status, claimed_by FROM task_queue WHERE task_type = 'target_design'")
    assert task == {"status": "completed", "claimed_by": "conn-test"}
    assert max(len(s) for s in sampler.samples) == 2
    assert {name for sample in sampler.samples for _, name in sample} == {
        f"lifecycle-dagster op {run_id[:8]}",
        f"lifecycle-dagster heartbeat {run_id[:8]}",
    }


def test_the_next_run_of_the_process_reuses_both_connections(
    seeded_db: str, instance: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LIFECYCLE_DAGSTER_HEARTBEAT_S", str(HEARTBEAT_S))
    first, first_id, one = _run_sampled(seeded_db, instance)
    kept = _pids(one, "op") | _pids(one, "heartbeat")
    with connect(seeded_db) as conn:
        between = conn.execute(
            "SELECT application_name FROM pg_stat_activity WHERE pid = ANY(%s)", (list(kept),)
        ).fetchall()
    assert [r["application_name"] for r in between] == ["lifecycle-dagster idle"] * 2  # no finished run's name
    second, second_id, two = _run_sampled(seeded_db, instance)
    assert first.success and second.success
    for role in ("op", "heartbeat"):  # the same backends, renamed for the second run
        assert len(_pids(one, role)) == 1
        assert _pids(two, role) == _pids(one, role)
    assert {name for s in two.samples for _, name in s} == {
        f"lifecycle-dagster op {second_id[:8]}",
        f"lifecycle-dagster heartbeat {second_id[:8]}",
    }
    assert first_id[:8] != second_id[:8]


def test_application_names_fit_postgres() -> None:
    run_id = "0123456789abcdef-0123-0123-0123-0123456789ab"
    assert application_name("heartbeat", run_id) == "lifecycle-dagster heartbeat 01234567"
    assert application_name("op") == "lifecycle-dagster op"
    long = application_name("é" * 40, run_id)
    assert len(long.encode("utf-8")) <= APPLICATION_NAME_MAX
    assert long.startswith("lifecycle-dagster éé")
