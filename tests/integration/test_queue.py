"""The task queue protocol (claim, lease, heartbeat, complete, fail, reap, fencing), external
workers (`agent serve`), and http agents against a real local HTTP server."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.types.json import Jsonb

from lifecycle_dagster.agents import AgentRegistry, Task, default_registry
from lifecycle_dagster.agents.http import http_agent
from lifecycle_dagster.queue.worker import Worker
from lifecycle_dagster.store.db import connect

from helpers import events, install, rows, run, send_json

REPO = Path(__file__).resolve().parents[2]
TESTS = Path(__file__).resolve().parents[1]
ACME = json.loads((REPO / "examples/acme.json").read_text())
T0 = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)


def _make_design_a_queue_agent(db: str, **config: Any) -> None:
    with connect(db) as conn:
        conn.execute("UPDATE agents SET kind = 'queue', config = %s WHERE name = 'Design Agent'", (Jsonb(config),))


def _pending_task(db: str, capability: str = "design", payload: Any = None) -> str:
    """A pending task of a manual execution (as the runbook's section 7 enqueues)."""
    with connect(db) as conn:
        d = conn.execute("SELECT id FROM workflow_definitions WHERE name = 'lifecycle_v1'").fetchone()
        assert d is not None
        e = conn.execute(
            "INSERT INTO workflow_executions (workflow_definition_id, status, context) VALUES (%s, 'in_progress', %s)"
            " RETURNING id",
            (d["id"], Jsonb(ACME)),
        ).fetchone()
        assert e is not None
        stage = {"design": "target_design", "opportunity": "discover"}[capability]
        conn.execute(
            "INSERT INTO workflow_execution_logs (execution_id, stage_id, status) VALUES (%s, %s, 'pending')",
            (e["id"], stage),
        )
        t = conn.execute(
            "INSERT INTO task_queue (workflow_execution_id, task_type, input_data) VALUES (%s, %s, %s) RETURNING id",
            (e["id"], stage, Jsonb(payload if payload is not None else {"context": ACME})),
        ).fetchone()
        assert t is not None
    return str(t["id"])


def _claim(db: str, worker: str, agent: str = "Design Agent", lease_s: float = 30, now: datetime = T0) -> list[Any]:
    with connect(db) as conn:
        return conn.execute(
            "SELECT * FROM lifecycle.task_claim(%s, %s, 5, %s, %s)", (worker, agent, lease_s, now)
        ).fetchall()


def test_runbook_section_7_enqueue_is_idempotent_by_a_clear_unique_violation(seeded_db: str) -> None:
    task = _pending_task(seeded_db)
    [row] = rows(
        seeded_db, "SELECT capability, stage_log_id IS NOT NULL AS linked FROM task_queue WHERE id = %(t)s", t=task
    )
    assert row == {"capability": "design", "linked": True}  # derived from the execution's DAG
    with connect(seeded_db) as conn, pytest.raises(psycopg.errors.UniqueViolation) as err:
        conn.execute(
            "INSERT INTO task_queue (workflow_execution_id, task_type, input_data)"
            " SELECT execution_id, stage_id, input_data FROM workflow_execution_logs WHERE status = 'pending'"
        )
    assert err.value.diag.constraint_name == "task_queue_one_per_stage_attempt"
    assert "target_design" in str(err.value)


def test_claim_lease_heartbeat_fencing_and_reap(seeded_db: str) -> None:
    _make_design_a_queue_agent(seeded_db)
    task = _pending_task(seeded_db)
    [claimed] = _claim(seeded_db, "w1", lease_s=10)
    assert (str(claimed["task_id"]), claimed["lease_token"], claimed["attempt"]) == (task, 1, 1)
    assert _claim(seeded_db, "w2") == []  # nothing else to claim
    # the claim started the pending stage
    assert rows(seeded_db, "SELECT status FROM workflow_execution_logs WHERE stage_id = 'target_design'") == [
        {"status": "in_progress"}
    ]
    with connect(seeded_db) as conn:
        assert conn.execute(
            "SELECT lifecycle.task_heartbeat(%s, 1, 10, %s) AS ok", (task, T0 + timedelta(seconds=5))
        ).fetchone()["ok"]  # type: ignore[index]
        assert not conn.execute("SELECT lifecycle.task_heartbeat(%s, 7, 10, %s) AS ok", (task, T0)).fetchone()["ok"]  # type: ignore[index]
        # the lease (extended to T0+15 s) expires; the reaper puts the task back, counting an attempt
        assert conn.execute("SELECT lifecycle.task_reap(%s) AS n", (T0 + timedelta(seconds=14),)).fetchone()["n"] == 0  # type: ignore[index]
        assert conn.execute("SELECT lifecycle.task_reap(%s) AS n", (T0 + timedelta(seconds=16),)).fetchone()["n"] == 1  # type: ignore[index]
    [state] = rows(
        seeded_db, "SELECT status, attempt, lease_token, claimed_by FROM task_queue WHERE id = %(t)s", t=task
    )
    assert state == {"status": "pending", "attempt": 2, "lease_token": 1, "claimed_by": None}
    [again] = _claim(seeded_db, "w2", now=T0 + timedelta(seconds=20))
    assert (again["lease_token"], again["attempt"]) == (2, 2)
    with connect(seeded_db) as conn:
        late = conn.execute(
            "SELECT lifecycle.task_complete(%s, 1, %s) AS s", (task, Jsonb({"summary": "late"}))
        ).fetchone()
        assert late == {"s": "refused_stale_token"}
        out = (
            default_registry()
            .get("Design Agent")
            .run(
                Task(
                    "e",
                    "target_design",
                    "design",
                    2,
                    ACME,
                    {
                        "q": {
                            "capability": "assessment",
                            "output": default_registry()
                            .get("Assessment Agent")
                            .run(
                                Task(
                                    "e",
                                    "qualify",
                                    "assessment",
                                    1,
                                    ACME,
                                    {
                                        "d": {
                                            "capability": "opportunity",
                                            "output": default_registry()
                                            .get("Opportunity Agent")
                                            .run(Task("e", "discover", "opportunity", 1, ACME, {})),
                                        }
                                    },
                                )
                            ),
                        }
                    },
                )
            )
        )
        ok = conn.execute(
            "SELECT lifecycle.task_complete(%s, 2, %s, %s) AS s", (task, Jsonb(out), T0 + timedelta(seconds=21))
        ).fetchone()
        assert ok is not None and ok["s"] == "in_progress"
    refused = [
        m
        for t, _, m in events(
            seeded_db, str(rows(seeded_db, "SELECT workflow_execution_id AS e FROM task_queue")[0]["e"])
        )
        if t == "task_result_refused"
    ]
    assert len(refused) == 1 and refused[0]["token"] == 1
    assert rows(seeded_db, "SELECT status FROM workflow_execution_logs WHERE stage_id = 'target_design'") == [
        {"status": "completed"}
    ]


def test_reaping_a_task_out_of_attempts_fails_it(seeded_db: str) -> None:
    _make_design_a_queue_agent(seeded_db)
    task = _pending_task(seeded_db)
    with connect(seeded_db) as conn:
        conn.execute("UPDATE task_queue SET max_attempts = 1 WHERE id = %s", (task,))
    _claim(seeded_db, "w1", lease_s=1)
    with connect(seeded_db) as conn:
        conn.execute("SELECT lifecycle.task_reap(%s)", (T0 + timedelta(seconds=2),))
    [state] = rows(seeded_db, "SELECT status, error_code, retryable FROM task_queue WHERE id = %(t)s", t=task)
    assert state == {"status": "failed", "error_code": "lease_expired", "retryable": False}


def test_concurrent_claimers_take_each_task_once_and_respect_the_concurrency_limit(seeded_db: str) -> None:
    _make_design_a_queue_agent(seeded_db, concurrency=3)
    tasks = {_pending_task(seeded_db) for _ in range(6)}
    barrier = threading.Barrier(6)
    got: list[str] = []
    lock = threading.Lock()

    def claimer(i: int) -> None:
        with connect(seeded_db) as conn:
            barrier.wait(10)
            for r in conn.execute("SELECT * FROM lifecycle.task_claim(%s, 'Design Agent', 2, 30)", (f"w{i}",)):
                with lock:
                    got.append(str(r["task_id"]))

    threads = [threading.Thread(target=claimer, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(got) == 3 and len(set(got)) == 3 and set(got) <= tasks  # the limit of 3 held


def test_lifecycle_with_design_served_by_a_worker(seeded_db: str, instance: Any) -> None:
    _make_design_a_queue_agent(seeded_db)
    stop = threading.Event()
    worker = Worker(seeded_db, "Design Agent", default_registry(), lease_s=5, poll_s=0.2, worker_id="test-worker")
    t = threading.Thread(target=worker.run, args=(stop,))
    t.start()
    try:
        result, _ = run(seeded_db, instance, "lifecycle_v1", default_registry(), ACME)
    finally:
        stop.set()
        t.join(30)
    assert result.success
    [task] = rows(seeded_db, "SELECT status, claimed_by, capability FROM task_queue WHERE task_type = 'target_design'")
    assert task == {"status": "completed", "claimed_by": "test-worker", "capability": "design"}
    assert rows(seeded_db, "SELECT status FROM workflow_executions") == [{"status": "completed"}]
    assert worker.completed == 1


def _serve(db: str, *extra: str, sleep_s: float = 0.0) -> subprocess.Popen[bytes]:
    # this checkout's package first (not whichever one the venv has installed), then the test agents
    path = os.pathsep.join([str(REPO), str(TESTS)])
    env = {**os.environ, "DATABASE_URL": db, "PYTHONPATH": path, "QUEUE_AGENT_SLEEP_S": str(sleep_s)}
    return subprocess.Popen(
        [
            str(Path(sys.executable).parent / "lifecycle-dagster"),
            "agent",
            "serve",
            "--agent",
            "Design Agent",
            "--registry",
            "queue_agents:registry",
            *extra,
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


def _wait(predicate: Any, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return False


@pytest.mark.slow
def test_a_killed_worker_task_is_reclaimed_and_completed_once(seeded_db: str) -> None:
    _make_design_a_queue_agent(seeded_db)
    task = _pending_task(seeded_db, payload=_design_input())
    first = _serve(seeded_db, "--lease-s", "1", "--poll-s", "0.2", sleep_s=30)
    try:
        assert _wait(lambda: rows(seeded_db, "SELECT status FROM task_queue")[0]["status"] == "in_progress", 30)
        os.killpg(first.pid, signal.SIGKILL)
        first.wait(10)
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
    second = _serve(seeded_db, "--lease-s", "5", "--poll-s", "0.2", sleep_s=0)
    try:
        assert _wait(lambda: rows(seeded_db, "SELECT status FROM task_queue")[0]["status"] == "completed", 30)
    finally:
        os.killpg(second.pid, signal.SIGTERM)
        second.wait(30)
    [t] = rows(
        seeded_db,
        "SELECT attempt, lease_token, claimed_by FROM task_queue WHERE id = %(t)s",
        t=task,
    )
    # the worker id is host:pid:suffix (its agent ran in a child of its own: the stage has a time limit)
    assert t["attempt"] == 2 and t["lease_token"] == 2 and t["claimed_by"].split(":")[1] == str(second.pid)
    kinds = [
        k
        for k, _, _ in events(
            seeded_db, str(rows(seeded_db, "SELECT workflow_execution_id AS e FROM task_queue")[0]["e"])
        )
    ]
    assert kinds.count("task_reaped") == 1 and kinds.count("stage_completed") == 1


def _design_input() -> dict[str, Any]:
    reg = default_registry()
    opp = reg.get("Opportunity Agent").run(Task("e", "discover", "opportunity", 1, ACME, {}))
    ass = reg.get("Assessment Agent").run(
        Task("e", "qualify", "assessment", 1, ACME, {"discover": {"capability": "opportunity", "output": opp}})
    )
    return {
        "context": ACME,
        "upstream": {
            "discover": {"capability": "opportunity", "output": opp},
            "qualify": {"capability": "assessment", "output": ass},
        },
    }


@pytest.mark.slow
def test_a_one_second_lease_with_a_three_second_task_runs_once(seeded_db: str) -> None:
    _make_design_a_queue_agent(seeded_db)
    task = _pending_task(seeded_db, payload=_design_input())
    worker = _serve(seeded_db, "--lease-s", "1", "--poll-s", "0.2", sleep_s=3)
    try:
        assert _wait(lambda: rows(seeded_db, "SELECT status FROM task_queue")[0]["status"] == "completed", 30)
    finally:
        os.killpg(worker.pid, signal.SIGTERM)
        worker.wait(30)
    [t] = rows(seeded_db, "SELECT attempt, lease_token FROM task_queue WHERE id = %(t)s", t=task)
    assert t == {"attempt": 1, "lease_token": 1}  # heartbeats kept the lease: never reaped, never re-claimed


@pytest.mark.slow
def test_worker_survives_its_listener_being_terminated(seeded_db: str) -> None:
    _make_design_a_queue_agent(seeded_db)
    worker = _serve(seeded_db, "--poll-s", "0.5", sleep_s=0)
    try:
        assert _wait(
            lambda: (
                rows(
                    seeded_db,
                    "SELECT count(*) AS n FROM pg_stat_activity WHERE query = 'LISTEN lifecycle_task'"
                    " AND datname = current_database()",
                )[0]["n"]
                == 1
            ),
            30,
        )
        rows(
            seeded_db,
            "SELECT pg_terminate_backend(pid) AS ok FROM pg_stat_activity WHERE query = 'LISTEN lifecycle_task'"
            " AND datname = current_database()",  # only this test's worker: the server is shared
        )
        big = _design_input()
        big["context"] = {**big["context"], "notes": "x" * 20_000}  # over NOTIFY's 8000-byte limit
        task = _pending_task(seeded_db, payload=big)
        assert _wait(
            lambda: (
                rows(seeded_db, "SELECT status FROM task_queue WHERE id = %(t)s", t=task)[0]["status"] == "completed"
            ),
            10,
        )
    finally:
        os.killpg(worker.pid, signal.SIGTERM)
        worker.wait(30)


@pytest.mark.slow
def test_eight_workers_with_pools_of_two_stay_within_their_connections(seeded_db: str) -> None:
    _make_design_a_queue_agent(seeded_db)
    for _ in range(16):
        _pending_task(seeded_db, payload=_design_input())
    workers = [_serve(seeded_db, "--concurrency", "2", "--poll-s", "0.2", sleep_s=0.5) for _ in range(8)]
    peak = 0
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            n = rows(
                seeded_db,
                "SELECT count(*) AS n FROM pg_stat_activity WHERE datname = current_database()"
                " AND application_name LIKE 'lifecycle-worker %%' AND pid <> pg_backend_pid()",
            )[0]["n"]
            peak = max(peak, n)
            if rows(seeded_db, "SELECT count(*) AS n FROM task_queue WHERE status = 'completed'")[0]["n"] == 16:
                break
            time.sleep(0.05)
    finally:
        for w in workers:
            os.killpg(w.pid, signal.SIGTERM)
        for w in workers:
            w.wait(30)
    assert rows(seeded_db, "SELECT count(*) AS n FROM task_queue WHERE status = 'completed'")[0]["n"] == 16
    assert 8 <= peak <= 8 * (2 + 1)  # each worker: its pool of 2 plus the listening connection


class _Handler(BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        mode = self.server.mode  # type: ignore[attr-defined]
        self.server.seen.append((self.headers.get("Idempotency-Key"), body["stage_id"]))  # type: ignore[attr-defined]
        if mode == "slow":
            time.sleep(2)
        code, reply = {
            "ok": (200, {"summary": "done over http", "echo": body["capability"]}),
            "500": (500, {"error": "boom"}),
            "400": (400, {"error": "bad"}),
            "slow": (200, {"summary": "late"}),
        }[mode]
        data = json.dumps(reply).encode()
        send_json(self, code, data)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.mark.parametrize(
    ("mode", "status", "code", "attempts"),
    [
        ("ok", "completed", None, 1),
        ("500", "failed", "overloaded", 2),
        ("400", "failed", "bad_request", 1),
        ("slow", "failed", "timeout", 2),
    ],
)
def test_http_agent(db: str, instance: Any, mode: str, status: str, code: str | None, attempts: int) -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.mode = mode  # type: ignore[attr-defined]
    server.seen = []  # type: ignore[attr-defined]
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        install(
            db,
            "wf",
            {
                "stages": [{"id": "a", "capability": "remote"}],
                "defaults": {"retry": {"max_attempts": 2, "base_delay_s": 0.01, "max_delay_s": 0.02}},
            },
            {"remote": "Remote"},
        )
        with connect(db) as conn:
            conn.execute(
                "UPDATE agents SET kind = 'http', config = %s WHERE name = 'Remote'",
                (Jsonb({"url": f"http://127.0.0.1:{server.server_address[1]}/task", "timeout_s": 0.5}),),
            )
        result, eid = run(db, instance, "wf", AgentRegistry())
    finally:
        server.shutdown()
    [log] = rows(
        db, "SELECT status, output_data, attempt_number FROM workflow_execution_logs WHERE execution_id = %(e)s", e=eid
    )
    assert log["status"] == status and log["attempt_number"] == attempts
    assert result.success is (status == "completed")
    if status == "completed":
        assert log["output_data"] == {"summary": "done over http", "echo": "remote"}
    else:
        [failed] = [m for t, _, m in events(db, eid) if t == "stage_failed"]
        assert failed["error_code"] == code
    tasks = rows(db, "SELECT id::text AS id FROM task_queue ORDER BY attempt")
    assert [k for k, _ in server.seen] == [t["id"] for t in tasks][: len(server.seen)]  # the task id is the key



def test_http_agent_of_a_missing_agents_row_names_the_id(db: str) -> None:
    missing = "00000000-0000-4000-8000-000000000013"
    with connect(db) as conn, pytest.raises(KeyError, match=f"http agent: no agents row has id {missing}"):
        http_agent(conn, missing, None)

@pytest.mark.slow
def test_lifecycle_survives_its_design_worker_being_killed(seeded_db: str, instance: Any) -> None:
    """The issue's bar: the lifecycle runs with the Design Agent served by an external `agent serve`
    process, and survives that process being killed mid-task."""
    _make_design_a_queue_agent(seeded_db)
    first = _serve(seeded_db, "--lease-s", "1", "--poll-s", "0.2", sleep_s=60)
    outcome: dict[str, Any] = {}

    def execute() -> None:
        outcome["result"], outcome["eid"] = run(seeded_db, instance, "lifecycle_v1", default_registry(), ACME)

    runner = threading.Thread(target=execute)
    runner.start()
    second = None
    try:
        assert _wait(
            lambda: (
                rows(
                    seeded_db,
                    "SELECT count(*) AS n FROM task_queue WHERE task_type = 'target_design' AND status = 'in_progress'",
                )[0]["n"]
                == 1
            ),
            60,
        )
        os.killpg(first.pid, signal.SIGKILL)
        first.wait(10)
        second = _serve(seeded_db, "--lease-s", "5", "--poll-s", "0.2", sleep_s=0)
        runner.join(120)
        assert not runner.is_alive()
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
        if second is not None:
            os.killpg(second.pid, signal.SIGTERM)
            second.wait(30)
    assert outcome["result"].success
    eid = outcome["eid"]
    assert rows(seeded_db, "SELECT status FROM workflow_executions") == [{"status": "completed"}]
    [task] = rows(
        seeded_db,
        "SELECT attempt, status, claimed_by FROM task_queue WHERE task_type = 'target_design'",
    )
    assert task["status"] == "completed" and task["attempt"] == 2
    assert str(task["claimed_by"]).split(":")[1] == str(second.pid)  # host:pid:suffix of the second worker
    kinds = [(k, s) for k, s, _ in events(seeded_db, eid)]
    assert kinds.count(("task_reaped", "target_design")) == 1
    assert kinds.count(("stage_completed", "target_design")) == 1


def test_stage_ops_use_their_capability_pool_and_agent_limits_set_it(seeded_db: str, dagster_home: Path) -> None:
    from click.testing import CliRunner

    from lifecycle_dagster.cli.main import main
    from lifecycle_dagster.location.job_factory import build_job

    with connect(seeded_db) as conn:
        row = conn.execute(
            "SELECT id::text AS id, name, version, description, dag_schema FROM workflow_definitions"
        ).fetchone()
        conn.execute("UPDATE agents SET config = '{\"concurrency\": 2}' WHERE name <> 'Integrity Agent'")
        # a second design agent with its own limit: the design pool gets their sum
        a = conn.execute(
            "INSERT INTO agents (name, config) VALUES ('Design Agent 2', '{\"concurrency\": 3}') RETURNING id"
        ).fetchone()
        assert a is not None
        conn.execute(
            "INSERT INTO agent_ontologies (agent_id, domain, knowledge) VALUES (%s, 'orchestration',"
            ' \'{"capabilities": ["design"]}\')',
            (a["id"],),
        )
    assert row is not None
    job = build_job(dict(row))
    pools = {n.name.split("__")[-1]: n.definition.pool for n in job.graph.nodes}
    assert pools["target_design"] == "lifecycle_design" and pools["integrity"] == "lifecycle_governance"
    out = CliRunner().invoke(main, ["agent", "limits"], env={"DAGSTER_HOME": str(dagster_home)})
    assert out.exit_code == 0, out.output
    assert out.stdout.splitlines() == [
        "lifecycle_assessment: 2",
        "lifecycle_design: 5",
        "lifecycle_execution: 2",
        "lifecycle_governance: unlimited (an agent of it has no concurrency limit)",
        "lifecycle_opportunity: 2",
    ]
    from dagster import DagsterInstance

    instance = DagsterInstance.from_config(str(dagster_home))
    try:
        assert instance.event_log_storage.get_concurrency_info("lifecycle_design").slot_count == 5
    finally:
        instance.dispose()


def _task_row(db: str, task_id: str) -> dict[str, Any]:
    [row] = rows(db, "SELECT status, error_code, retryable, lease_token FROM task_queue WHERE id = %(t)s", t=task_id)
    return row


def test_a_hung_agent_is_stopped_at_its_stage_timeout_and_its_slot_takes_other_work(
    seeded_db: str, tmp_path: Path
) -> None:
    """One slot; the first task's agent hangs, its stage's timeout (deadline_at) is 1 s: the agent's
    process is killed, the task failed as a retryable `timeout`, and the slot runs the next task."""
    from agents_for_tests import HangWhenAsked
    from processes import gone_within

    _make_design_a_queue_agent(seeded_db)
    hung = _pending_task(seeded_db, payload={"context": {"hang": True}})
    with connect(seeded_db) as conn:
        conn.execute("UPDATE task_queue SET deadline_at = now() + interval '1 second' WHERE id = %s", (hung,))
    later = _pending_task(seeded_db, payload={"context": {"customer": "next"}})
    registry = AgentRegistry([HangWhenAsked("Design Agent", tmp_path)])
    worker = Worker(seeded_db, "Design Agent", registry, lease_s=5, poll_s=0.2, grace_s=1, worker_id="hang-test")
    stop = threading.Event()
    serving = threading.Thread(target=worker.run, args=(stop,))
    serving.start()
    try:
        assert _wait(lambda: _task_row(seeded_db, later)["status"] == "completed", 30), _task_row(seeded_db, later)
    finally:
        stop.set()
        serving.join(30)
    assert not serving.is_alive()
    timed_out = {"status": "failed", "error_code": "timeout", "retryable": True, "lease_token": 1}
    assert _task_row(seeded_db, hung) == timed_out
    assert worker.timed_out == 1 and worker.completed == 1
    [marker] = list(tmp_path.glob("hang-*"))
    assert gone_within([int(marker.name.split("-")[1])], 5) == []  # the hung agent's process was killed


@pytest.mark.slow
def test_agent_serve_max_task_s_frees_the_slot_of_a_hung_agent(seeded_db: str) -> None:
    """A real `agent serve --max-task-s 1` (one slot) whose agent hangs on a stage with no timeout:
    the task fails as a retryable `timeout` after a second and the worker serves the next task."""
    _make_design_a_queue_agent(seeded_db)
    design = _design_input()
    hung = _pending_task(seeded_db, payload={**design, "context": {**design["context"], "hang": True}})
    later = _pending_task(seeded_db, payload=design)
    worker = _serve(seeded_db, "--max-task-s", "1", "--poll-s", "0.2", "--grace-s", "1")
    try:
        assert _wait(lambda: _task_row(seeded_db, later)["status"] == "completed", 60), worker.poll()
    finally:
        os.killpg(worker.pid, signal.SIGTERM)
        worker.wait(30)
    timed_out = {"status": "failed", "error_code": "timeout", "retryable": True, "lease_token": 1}
    assert _task_row(seeded_db, hung) == timed_out
