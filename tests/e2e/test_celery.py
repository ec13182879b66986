"""A real distributed engine: the generated jobs under ``LIFECYCLE_DAGSTER_EXECUTOR=celery``, their
steps run by two Celery workers (separate processes, each in its own working directory) on a
``redis-server`` this module starts, with a real Dagster instance on Postgres.

One redis and two workers serve every test of the module (a worker killed by a test is started
again by the next). The workers acknowledge a step when it ends (``task_acks_late``), and the
broker gives an unacknowledged step to another worker once its visibility timeout
has passed (here 15 s, longer than any step of these tests takes): that is what finishes the step
of a worker killed mid-stage.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import psycopg
import pytest
from psycopg import conninfo, sql

from lifecycle_dagster.location.job_factory import EXECUTION_ID_TAG
from lifecycle_dagster.store.db import connect
from lifecycle_dagster.store.sqlfiles import seed_sql

from agents_for_tests import DISTRIBUTED_AGENTS
from helpers import create_execution, events, install, rows, running_daemon

REPO = Path(__file__).resolve().parents[2]
TESTS = REPO / "tests"
BIN = Path(sys.executable).parent
REDIS_SERVER = Path("/usr/bin/redis-server")
#: seconds after which the broker hands an unacknowledged step (its worker died) to another worker
VISIBILITY_TIMEOUT_S = 15
pytestmark = pytest.mark.slow

FIVE = ["discover", "qualify", "target_design", "value_realization", "integrity"]
FAN_OUT = {
    "stages": [
        {"id": "root", "capability": "fan", "next": ["f1", "f2", "f3", "f4"]},
        *({"id": f"f{i}", "capability": "fan", "next": ["join"]} for i in range(1, 5)),
        {"id": "join", "capability": "fan"},
    ]
}
FLAKY = {"stages": [{"id": "flaky", "capability": "flaky_once", "retry": {"max_attempts": 3, "base_delay_s": 0.1}}]}
SLOW = {"stages": [{"id": "slow", "capability": "slow", "next": ["after"]}, {"id": "after", "capability": "fan"}]}


def _with_db(dsn: str, name: str) -> str:
    params = conninfo.conninfo_to_dict(dsn)
    params["dbname"] = name
    return conninfo.make_conninfo(**params)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def celery_db(server_dsn: str, template_db: str) -> Iterator[str]:
    """A migrated, seeded database for the module (the workers start with its URL), holding the
    lifecycle and the workflows fan_out, flaky and slow."""
    name = f"ld_celery_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(server_dsn, autocommit=True) as conn:
        create = sql.SQL("CREATE DATABASE {} TEMPLATE {}")
        conn.execute(create.format(sql.Identifier(name), sql.Identifier(template_db)))
    dsn = _with_db(server_dsn, name)
    try:
        with connect(dsn) as conn:
            conn.execute(seed_sql())
        install(dsn, "fan_out", FAN_OUT, {"fan": DISTRIBUTED_AGENTS["fan"]})
        install(dsn, "flaky", FLAKY, {"flaky_once": DISTRIBUTED_AGENTS["flaky_once"]})
        install(dsn, "slow", SLOW, {"slow": DISTRIBUTED_AGENTS["slow"]})
        yield dsn
    finally:
        with psycopg.connect(server_dsn, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _stop_group(proc: subprocess.Popen[bytes], *signals: int) -> None:
    """``signals`` in turn (default SIGTERM, then SIGKILL) to the process group of ``proc`` (started in
    its own session) until it exits (10 s each)."""
    for sig in signals or (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(10)
            return


@dataclass
class Cluster:
    """redis-server and the Celery workers ``w1`` and ``w2``, and the environment every process of
    the deployment shares (code server, daemon, run and step workers, Celery workers)."""

    root: Path
    env: dict[str, str]
    redis: subprocess.Popen[bytes] | None = None
    workers: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    @property
    def markers(self) -> Path:
        return self.root / "markers"

    def start_worker(self, name: str) -> None:
        """Start worker ``name`` in its own directory and session (see :meth:`wait_ready`)."""
        workdir = self.root / name
        workdir.mkdir(exist_ok=True)
        args = [str(BIN / "celery"), "-A", "lifecycle_dagster.location.celery_app", "worker", "--pool", "solo"]
        args += ["-n", f"{name}@%h", "--loglevel", "INFO", "--without-mingle", "--without-gossip"]
        with (workdir / "worker.log").open("a") as out:
            self.workers[name] = subprocess.Popen(
                args, cwd=workdir, env=self.env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )

    def wait_ready(self, name: str) -> None:
        """Wait until worker ``name`` consumes (its log says ``ready.``)."""
        proc, log = self.workers[name], self.root / name / "worker.log"
        deadline = time.monotonic() + 60
        while " ready." not in log.read_text():
            assert proc.poll() is None, f"worker {name} exited with {proc.returncode}:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"worker {name} not ready after 60 s:\n{log.read_text()[-3000:]}"
            time.sleep(0.1)

    def ensure_workers(self) -> None:
        """Both workers running (one killed by an earlier test is started again), started together."""
        missing = [n for n in ("w1", "w2") if n not in self.workers or self.workers[n].poll() is not None]
        for name in missing:
            if name in self.workers:  # a killed worker's log is kept aside: `ready.` must be the new one's
                (self.root / name / "worker.log").replace(self.root / name / f"worker-{self.workers[name].pid}.log")
            self.start_worker(name)
        for name in missing:
            self.wait_ready(name)

    def worker_holding(self, pid: int) -> str:
        """The worker whose process tree holds ``pid``."""
        for name, proc in self.workers.items():
            if proc.poll() is not None:
                continue
            tree = {proc.pid, *(c.pid for c in psutil.Process(proc.pid).children(recursive=True))}
            if pid in tree:
                return name
        raise AssertionError(f"pid {pid} belongs to no worker")

    def stop(self) -> None:
        for proc in self.workers.values():
            _stop_group(proc, signal.SIGKILL)  # nothing left to finish
        if self.redis is not None:
            _stop_group(self.redis)


@pytest.fixture(scope="module")
def cluster(celery_db: str, dagster_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    if not REDIS_SERVER.exists():
        pytest.fail(f"{REDIS_SERVER} is missing: install the redis-server package (apt-get install -y redis-server)")
    root = tmp_path_factory.mktemp("celery")
    port = _free_port()
    broker = f"redis://127.0.0.1:{port}"
    env = {
        **os.environ,
        "DATABASE_URL": celery_db,
        "DAGSTER_HOME": str(dagster_home),
        "LIFECYCLE_DAGSTER_EXECUTOR": "celery",
        "LIFECYCLE_DAGSTER_CELERY_BROKER": f"{broker}/0",
        "LIFECYCLE_DAGSTER_CELERY_BACKEND": f"{broker}/1",
        "LIFECYCLE_DAGSTER_CELERY_CONFIG": json.dumps(
            {
                "broker_transport_options": {
                    "visibility_timeout": VISIBILITY_TIMEOUT_S,
                    "unacked_restore_interval": 1,  # look for lost steps every second
                    "unacked_restore_throttle": 1,
                }
            }
        ),
        "LIFECYCLE_DAGSTER_AGENTS": "agents_for_tests:distributed_registry",
        "PYTHONPATH": os.pathsep.join([str(TESTS), *filter(None, [os.environ.get("PYTHONPATH")])]),
        "CELERY_TEST_MARKERS": str(root / "markers"),
    }
    env.pop("LIFECYCLE_DAGSTER_EMBEDDED", None)
    cl = Cluster(root, env)
    patch = pytest.MonkeyPatch()  # this process orchestrates runs too: the same environment
    for key in ("DATABASE_URL", "DAGSTER_HOME", "CELERY_TEST_MARKERS"):
        patch.setenv(key, env[key])
    for key in [k for k in env if k.startswith("LIFECYCLE_DAGSTER_")]:
        patch.setenv(key, env[key])
    cl.markers.mkdir()
    cl.redis = subprocess.Popen(
        [str(REDIS_SERVER), "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        cwd=root,
        stdout=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        _wait_for_redis(port)
        t0 = time.monotonic()
        cl.ensure_workers()
        print(f"redis and two workers ready in {time.monotonic() - t0:.1f} s")
        yield cl
    finally:
        cl.stop()
        patch.undo()


def _wait_for_redis(port: int) -> None:
    deadline = time.monotonic() + 20
    while True:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1) as s:
            s.sendall(b"PING\r\n")
            if s.recv(16).startswith(b"+PONG"):
                return
        assert time.monotonic() < deadline, "redis-server did not answer PING within 20 s"
        time.sleep(0.05)


def _execute(job: str, execution_id: str) -> bool:
    """Execute ``job`` adopting ``execution_id`` here, as ``dagster job execute -m lifecycle_dagster``
    does (the job loaded from the module, the run orchestrated in this process, no run config: the
    executor is the job's); return Dagster's result."""
    from dagster import DagsterInstance, execute_job
    from dagster._core.definitions.reconstruct import ReconstructableRepository

    recon = ReconstructableRepository.for_module("lifecycle_dagster", "defs").get_reconstructable_job(job)
    tags = {EXECUTION_ID_TAG: execution_id}
    with DagsterInstance.get() as instance, execute_job(recon, instance, tags=tags) as result:
        return bool(result.success)


def _run(job: str, execution_id: str) -> None:
    assert _execute(job, execution_id), f"run of {job} for {execution_id} failed"


def _execution(dsn: str, eid: str) -> dict[str, Any]:
    [ex] = rows(dsn, "SELECT status, dagster_run_id FROM workflow_executions WHERE id = %(e)s", e=eid)
    logs = rows(
        dsn, "SELECT stage_id, status, attempt_number FROM workflow_execution_logs WHERE execution_id = %(e)s", e=eid
    )
    ex["stages"] = {r["stage_id"]: (r["status"], r["attempt_number"]) for r in logs}
    return ex


def _celery_workers(instance: Any, run_id: str) -> dict[str, list[str]]:
    """``{stage id: [worker name, ...]}``: which Celery worker took each step of the run, in order
    (dagster-celery's engine event "Executing steps ... in celery worker", stored in the instance)."""
    from dagster import DagsterEventType

    taken: dict[str, list[str]] = {}
    for record in instance.all_logs(run_id, of_type=DagsterEventType.ENGINE_EVENT):
        event = record.dagster_event
        if event is None or "in celery worker" not in (event.message or ""):
            continue
        worker = str(event.engine_event_data.metadata["Celery worker"].value).split("@")[0]
        taken.setdefault(str(event.step_key).rsplit("__", 1)[-1], []).append(worker)
    return taken


def test_the_lifecycle_and_a_fan_out_run_on_both_workers(cluster: Cluster, celery_db: str, instance: Any) -> None:
    cluster.ensure_workers()
    t0 = time.monotonic()
    _, lifecycle = create_execution(celery_db, "lifecycle_v1", json.loads((REPO / "examples/acme.json").read_text()))
    _run("lifecycle_v1__v1", lifecycle)
    t1 = time.monotonic()
    _, fan = create_execution(celery_db, "fan_out")
    _run("fan_out__v1", fan)
    print(f"lifecycle {t1 - t0:.1f} s, fan-out {time.monotonic() - t1:.1f} s under the Celery executor")

    ex = _execution(celery_db, lifecycle)
    assert ex["status"] == "completed"
    assert ex["stages"] == {s: ("completed", 1) for s in FIVE}
    assert set(_celery_workers(instance, ex["dagster_run_id"])) == set(FIVE)
    [summary] = rows(
        celery_db,
        "SELECT output_data->>'summary' AS s FROM workflow_execution_logs WHERE execution_id = %(e)s"
        " AND stage_id = 'discover'",
        e=lifecycle,
    )
    assert "229,250.00 USD" in summary["s"]

    ex = _execution(celery_db, fan)
    assert ex["status"] == "completed"
    assert ex["stages"] == {s: ("completed", 1) for s in ["root", "f1", "f2", "f3", "f4", "join"]}
    taken = _celery_workers(instance, ex["dagster_run_id"])
    assert all(len(w) == 1 for w in taken.values()), taken  # each step ran once
    siblings = {taken[f"f{i}"][0] for i in range(1, 5)}
    assert siblings == {"w1", "w2"}, f"the four siblings ran on {taken}"


def test_a_stage_that_fails_once_is_retried_by_the_workers(cluster: Cluster, celery_db: str, instance: Any) -> None:
    cluster.ensure_workers()
    _, eid = create_execution(celery_db, "flaky")
    _run("flaky__v1", eid)
    ex = _execution(celery_db, eid)
    assert ex["status"] == "completed"
    assert ex["stages"] == {"flaky": ("completed", 2)}
    retried = [e for t, _s, e in events(celery_db, eid) if t == "stage_retrying"]
    assert len(retried) == 1
    assert len(_celery_workers(instance, ex["dagster_run_id"])["flaky"]) == 2  # two Celery tasks


def test_a_worker_killed_mid_stage_leaves_the_stage_to_the_other(
    cluster: Cluster, celery_db: str, instance: Any
) -> None:
    cluster.ensure_workers()
    _, eid = create_execution(celery_db, "slow")
    before = set(cluster.markers.iterdir())
    outcome: list[bool] = []
    runner = threading.Thread(target=lambda: outcome.append(_execute("slow__v1", eid)), daemon=True)
    runner.start()
    deadline = time.monotonic() + 90
    while not (new := set(cluster.markers.iterdir()) - before):
        assert runner.is_alive() and time.monotonic() < deadline, "the slow stage never started"
        time.sleep(0.05)
    [marker] = new
    victim = cluster.worker_holding(int(marker.name.split("-")[1]))
    os.killpg(cluster.workers[victim].pid, signal.SIGKILL)  # the worker and every process of it
    cluster.workers[victim].wait(10)
    killed_at = time.monotonic()
    runner.join(VISIBILITY_TIMEOUT_S + 90)
    assert outcome == [True], "the run did not succeed after the worker was killed"
    survivor = ({"w1", "w2"} - {victim}).pop()
    ex = _execution(celery_db, eid)
    assert ex["status"] == "completed"
    # the interrupted attempt goes on as the same attempt (lifecycle.stage_start adopts it)
    assert ex["stages"] == {"slow": ("completed", 1), "after": ("completed", 1)}
    taken = _celery_workers(instance, ex["dagster_run_id"])
    assert taken["slow"] == [victim, survivor], taken
    assert len(set(cluster.markers.iterdir()) - before) == 2  # the agent was called again, by the survivor
    after = time.monotonic() - killed_at
    print(f"slow stage: attempt {ex['stages']['slow'][1]}, finished {after:.1f} s after the kill")


def test_a_pending_row_is_launched_by_the_daemon_under_the_celery_executor(
    cluster: Cluster, celery_db: str, instance: Any, tmp_path: Path
) -> None:
    """`lifecycle-dagster start` inserts a pending row; the daemon's launch sensor launches it (no
    run config: the sensors write no executor config), its run worker sends the steps to Celery."""
    cluster.ensure_workers()
    context = tmp_path / "ctx.json"
    context.write_text("{}")
    t0 = time.monotonic()
    with running_daemon(cluster.env, tmp_path / "daemon.log"):  # it starts while the row is inserted
        started = subprocess.run(
            [str(BIN / "lifecycle-dagster"), "start", "fan_out", "--context", str(context)],
            env=cluster.env,
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        )
        eid = started.stdout.strip().splitlines()[-1]
        status = "pending"
        while time.monotonic() - t0 < 150 and status in ("pending", "in_progress"):
            time.sleep(0.5)
            status = _execution(celery_db, eid)["status"]
    print(f"launched and completed by the daemon in {time.monotonic() - t0:.1f} s")
    assert status == "completed", (tmp_path / "daemon.log").read_text()[-4000:]
    ex = _execution(celery_db, eid)
    run = instance.get_run_by_id(ex["dagster_run_id"])
    assert run is not None and run.tags[EXECUTION_ID_TAG] == eid
    assert "execution" not in run.run_config
    taken = _celery_workers(instance, run.run_id)
    assert set(taken) == {"root", "f1", "f2", "f3", "f4", "join"}
    assert {w for ws in taken.values() for w in ws} <= {"w1", "w2"}
