"""The world the chaos scenarios run in, and the faults they inject.

A :class:`World` is a real deployment on one Postgres server: an orchestration database (migrated,
with the ``chaos`` workflows and their agents), a Dagster home storing into its own database,
``dagster-daemon`` (launch, resume, failure and reconciler sensors; run workers it launches),
``lifecycle-dagster agent serve`` workers for the queue agent (restarted by a supervisor when they
die, as a process manager would), and an HTTP agent served from this process. Every process is
real and killed for real (SIGKILL); nothing is mocked.

The ``chaos`` DAG is a diamond whose four stages use the three agent kinds::

    a (python) -> b (http), c (queue) -> d (python)

Each execution carries its plan in its context (see ``chaos_agents``): which stage is slow, hangs,
returns garbage or 10 MB, fails half its calls or for good. ``chaos_hold`` is the same DAG with
``on_failure: hold``; ``chaos_batch`` the same DAG run in batch runs (its ``batch`` key: at most
:data:`BATCH_SIZE` executions per run, formed at once).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import psutil
import psycopg
from psycopg import conninfo, sql
from psycopg.types.json import Jsonb

from lifecycle_dagster.location.instance import prepare_home
from lifecycle_dagster.store.db import application_name, connect
from lifecycle_dagster.store.invariants import Violation, check

from helpers import send_json

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
BIN = Path(sys.executable).parent
RESULTS = HERE / "results"

PY, HTTP, QUEUE = "Chaos Py", "Chaos Http", "Chaos Queue"
STAGES = ("a", "b", "c", "d")
#: the agent kind of each stage of the chaos DAG
KIND = {"a": "python", "b": "http", "c": "queue", "d": "python"}
#: executions per batch run of ``chaos_batch`` (sql/schema/17_batches.sql)
BATCH_SIZE = 4


def chaos_dag(on_failure: str = "compensate", note: str = "", batch: int | None = None) -> dict[str, Any]:
    """The diamond; ``batch``: its executions run in batch runs of at most that many (formed as
    soon as one is pending: ``max_wait_s`` 0)."""
    dag: dict[str, Any] = {
        "stages": [
            {"id": "a", "capability": "chaos_py", "next": ["b", "c"]},
            {"id": "b", "capability": "chaos_http", "next": ["d"]},
            {"id": "c", "capability": "chaos_queue", "next": ["d"]},
            {"id": "d", "capability": "chaos_py2"},
        ],
        "defaults": {"retry": {"max_attempts": 3, "base_delay_s": 0.2, "max_delay_s": 1.0}, "timeout_s": 5},
        "on_failure": on_failure,
    }
    if note:
        dag["stages"][0]["description"] = note
    if batch is not None:
        dag["batch"] = {"max_executions": batch, "max_wait_s": 0}
    return dag


def with_db(dsn: str, name: str) -> str:
    params = conninfo.conninfo_to_dict(dsn)
    params["dbname"] = name
    return conninfo.make_conninfo(**params)  # type: ignore[arg-type]


def _admin(dsn: str, statement: sql.Composable) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(statement)


def _kill_tree(pid: int, sig: int = signal.SIGKILL) -> None:
    """Signal ``pid`` and every descendant of it."""
    try:
        proc = psutil.Process(pid)
        procs = [*proc.children(recursive=True), proc]
    except psutil.NoSuchProcess:
        return
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.send_signal(sig)


# ---------------------------------------------------------------------------------------------
# the HTTP agent


class _HttpAgent(BaseHTTPRequestHandler):
    """Answers a task as its plan says: ok, slow, hang (until the world stops), garbage (not JSON),
    huge (10 MB of JSON), flaky (a 503 half the time), fail (a 400)."""

    def do_POST(self) -> None:
        from chaos_agents import HUGE, mode_of

        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        stage, attempt = body["stage_id"], body["attempt"]
        mode = mode_of(body.get("context") or {}, stage)
        stop: threading.Event = self.server.stop  # type: ignore[attr-defined]
        code, data = 200, b""
        if mode == "hang":
            stop.wait()
            return
        if mode == "slow":
            stop.wait(float(os.environ.get("CHAOS_SLOW_S", "1.5")))
        if mode == "garbage":
            data = b"<html>\x00 not json at all"
        elif mode == "huge":
            data = json.dumps({"summary": "huge", "blob": "y" * HUGE}).encode()
        elif mode == "flaky" and random.random() < 0.5:
            code, data = 503, b'{"error": "flaky"}'
        elif mode == "fail":
            code, data = 400, b'{"error": "refused"}'
        else:
            out = {
                "summary": f"{HTTP} did {stage} (attempt {attempt})",
                "artifacts": [{"kind": "chaos_effect", "key": f"{stage}-effect", "data": {}}],
            }
            data = json.dumps(out).encode()
        with contextlib.suppress(OSError):
            send_json(self, code, data)

    def log_message(self, *args: Any) -> None:
        pass


# ---------------------------------------------------------------------------------------------


@dataclass
class Figures:
    """What one scenario did and what came of it."""

    scenario: str
    scale: int
    executions: int = 0
    faults: dict[str, int] = field(default_factory=dict)
    quiesce_s: float | None = None
    violations: list[str] = field(default_factory=list)
    outcomes: dict[str, int] = field(default_factory=dict)
    duration_s: float = 0.0
    notes: list[str] = field(default_factory=list)
    #: the statuses the executions had to end in (see ``test_chaos.expect``), counted
    expected: dict[str, int] = field(default_factory=dict)
    #: executions a fault let end otherwise than their plan says, and why
    excused: list[str] = field(default_factory=list)
    #: executions that ended as they must not (the scenario fails)
    mismatches: list[str] = field(default_factory=list)

    def fault(self, kind: str, n: int = 1) -> None:
        self.faults[kind] = self.faults.get(kind, 0) + n

    @property
    def faults_total(self) -> int:
        return sum(self.faults.values())


#: the figures of the scenarios run in this session (printed in pytest's terminal summary)
FIGURES: list[Figures] = []


def record(figures: Figures) -> None:
    """Keep a scenario's figures for the summary and write them to tests/chaos/results."""
    from dataclasses import asdict

    FIGURES.append(figures)
    folder = RESULTS / f"scale{figures.scale}"
    folder.mkdir(parents=True, exist_ok=True)
    document = {**asdict(figures), "faults_total": figures.faults_total}
    (folder / f"{figures.scenario}.json").write_text(json.dumps(document, indent=2) + "\n")


class World:
    """See the module docstring. ``admin_dsn``: a superuser DSN of the server; ``template``: a
    migrated database to clone (None: create and migrate one)."""

    def __init__(self, admin_dsn: str, tmp: Path, *, template: str | None, workers: int = 2) -> None:
        self.admin_dsn = admin_dsn
        self.tmp = tmp
        self.name = f"ld_chaos_{uuid.uuid4().hex[:10]}"
        self.dagster_db = f"{self.name}_dagster"
        self.dsn = with_db(admin_dsn, self.name)
        self.template = template
        self.n_workers = workers
        self.home = tmp / "dagster_home"
        self.hooks = tmp / "hooks"
        self.logs = tmp / "logs"
        self.daemon: subprocess.Popen[bytes] | None = None
        self.workers: list[subprocess.Popen[bytes] | None] = [None] * workers
        self.worker_starts = 0
        self._stop = threading.Event()
        self._supervising = threading.Event()
        self._supervisor: threading.Thread | None = None
        self.http: ThreadingHTTPServer | None = None
        self.definitions: dict[str, str] = {}
        self.pinned_versions: list[int] = [1]
        #: what the faults hit: queue worker pids killed, Dagster runs whose worker was killed (and
        #: kills whose run was not known yet), executions cancelled (with or without compensation)
        self.killed_worker_pids: set[int] = set()
        self.killed_runs: set[str] = set()
        self.unknown_run_kills = 0
        self.cancelled: dict[str, bool] = {}

    # -- set up and tear down ----------------------------------------------------------------
    def create(self) -> None:
        if self.template:
            _admin(
                self.admin_dsn,
                sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
                    sql.Identifier(self.name), sql.Identifier(self.template)
                ),
            )
        else:
            from lifecycle_dagster.store import migrate

            _admin(self.admin_dsn, sql.SQL("CREATE DATABASE {}").format(sql.Identifier(self.name)))
            migrate.upgrade(self.dsn)
        _admin(self.admin_dsn, sql.SQL("CREATE DATABASE {}").format(sql.Identifier(self.dagster_db)))
        prepare_home(self.home, with_db(self.admin_dsn, self.dagster_db))
        self.logs.mkdir(parents=True, exist_ok=True)
        self.http = ThreadingHTTPServer(("127.0.0.1", 0), _HttpAgent)
        self.http.daemon_threads = True
        self.http.stop = threading.Event()  # type: ignore[attr-defined]
        threading.Thread(target=self.http.serve_forever, daemon=True).start()
        self._install()

    def _install(self) -> None:
        breaker = {"failure_threshold": 20, "cooldown_s": 2, "window_s": 30}
        assert self.http is not None
        url = f"http://127.0.0.1:{self.http.server_address[1]}/task"
        with connect(self.dsn) as conn:
            conn.execute(EFFECTS_TABLE)
            for name, dag in (
                ("chaos", chaos_dag()),
                ("chaos_hold", chaos_dag("hold")),
                ("chaos_batch", chaos_dag(batch=BATCH_SIZE)),
            ):
                row = conn.execute(
                    "SELECT definition_id::text AS id FROM lifecycle.definition_publish(%s, 'chaos', %s, true)",
                    (name, Jsonb(dag)),
                ).fetchone()
                assert row is not None
                self.definitions[name] = row["id"]
            for agent, kind, caps, config in (
                (PY, "python", ["chaos_py", "chaos_py2"], {"breaker": breaker}),
                (HTTP, "http", ["chaos_http"], {"breaker": breaker, "url": url, "timeout_s": 2}),
                # a concurrency limit (above what its workers take) makes its claims lock the agent
                # row: kill_worker_before_claim holds that row to catch a claim in flight
                (QUEUE, "queue", ["chaos_queue"], {"breaker": breaker, "concurrency": 64}),
            ):
                a = conn.execute(
                    "INSERT INTO agents (name, kind, config) VALUES (%s, %s, %s) RETURNING id",
                    (agent, kind, Jsonb(config)),
                ).fetchone()
                assert a is not None
                conn.execute(
                    "INSERT INTO agent_ontologies (agent_id, domain, knowledge) VALUES (%s, 'orchestration', %s)",
                    (a["id"], Jsonb({"capabilities": caps})),
                )

    def env(self) -> dict[str, str]:
        path = os.pathsep.join([str(HERE), *(p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p)])
        return {
            **os.environ,
            "DATABASE_URL": self.dsn,
            "DAGSTER_HOME": str(self.home),
            "PYTHONPATH": path,
            "LIFECYCLE_DAGSTER_AGENTS": "chaos_agents:registry",
            "LIFECYCLE_DAGSTER_HEARTBEAT_S": "0.5",
            "LIFECYCLE_DAGSTER_HEARTBEAT_TIMEOUT_S": "15",
            "CHAOS_HOOK_DIR": str(self.hooks),
            "CHAOS_PAUSE_S": "20",
        }

    def start(self) -> None:
        env = {k: v for k, v in self.env().items() if k != "CHAOS_HOOK_DIR"}
        self.daemon = subprocess.Popen(
            [str(BIN / "dagster-daemon"), "run", "-w", "workspace.yaml"],
            cwd=REPO,
            env=env,
            stdout=(self.logs / "daemon.log").open("ab"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        for i in range(self.n_workers):
            self._start_worker(i)
        self._supervisor = threading.Thread(target=self._supervise, daemon=True)
        self._supervising.set()
        self._supervisor.start()

    def _start_worker(self, i: int) -> None:
        self.worker_starts += 1
        log = (self.logs / f"worker{i}.log").open("ab")
        self.workers[i] = subprocess.Popen(
            [
                str(BIN / "lifecycle-dagster"),
                "agent",
                "serve",
                "--agent",
                QUEUE,
                "--registry",
                "chaos_agents:registry",
                "--concurrency",
                "2",
                "--lease-s",
                "2",
                "--poll-s",
                "0.3",
                "--grace-s",
                "1",
            ],
            cwd=REPO,
            env=self.env(),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def _supervise(self) -> None:
        """Restart a worker that died (as a process manager would), half a second later."""
        while not self._stop.wait(0.5):
            if not self._supervising.is_set():
                continue
            for i, w in enumerate(self.workers):
                if w is None or w.poll() is not None:
                    self._start_worker(i)

    def worker_pids(self) -> list[int]:
        return [w.pid for w in self.workers if w is not None and w.poll() is None]

    def stop(self) -> None:
        self._stop.set()
        if self._supervisor is not None:
            self._supervisor.join(5)
        for w in self.workers:
            if w is not None and w.poll() is None:
                _kill_tree(w.pid)
                w.wait(10)
        if self.daemon is not None:
            _kill_tree(self.daemon.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.daemon.wait(20)
            _kill_tree(self.daemon.pid)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.daemon.wait(10)
        if self.http is not None:
            self.http.stop.set()  # type: ignore[attr-defined]
            self.http.shutdown()
            self.http.server_close()

    def drop(self) -> None:
        """Drop the world's two databases, unless ``CHAOS_KEEP_DATABASES=1`` (to look at the rows
        after a failure: their names and the logs' folder are printed; drop them by hand)."""
        if os.environ.get("CHAOS_KEEP_DATABASES") == "1":
            print(f"\nchaos: kept databases {self.name} and {self.dagster_db} (logs: {self.logs})")
            return
        for name in (self.name, self.dagster_db):
            with contextlib.suppress(psycopg.Error):
                _admin(self.admin_dsn, sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))

    def daemon_log_tail(self, n: int = 6000) -> str:
        with contextlib.suppress(OSError):
            return (self.logs / "daemon.log").read_text(errors="replace")[-n:]
        return ""

    # -- executions ----------------------------------------------------------------------------
    def start_executions(
        self,
        plans: list[dict[str, str]],
        workflow: str = "chaos",
        version: int | None = None,
        undo: dict[str, str] | None = None,
        *,
        atomic: bool = False,
    ) -> list[str]:
        """Insert one pending execution per plan (the launch sensor runs them); ``version`` None:
        the active version; ``undo``: the plan of their undos (``{stage: "slow"}``); ``atomic``: in
        one transaction (a launch sensor tick sees all of them or none)."""
        ids = []
        with connect(self.dsn, autocommit=not atomic) as conn:
            for modes in plans:
                row = conn.execute(
                    "INSERT INTO workflow_executions (workflow_definition_id, context)"
                    " SELECT id, %s FROM workflow_definitions WHERE name = %s"
                    " AND (CASE WHEN %s::int IS NULL THEN is_active ELSE version = %s::int END)"
                    " RETURNING id::text",
                    (
                        Jsonb({"customer": "chaos", "chaos": {"modes": modes, "undo": undo or {}}}),
                        workflow,
                        version,
                        version,
                    ),
                ).fetchone()
                assert row is not None
                ids.append(str(row["id"]))
        return ids

    def start_batch(self, plans: list[dict[str, str]], workflow: str = "chaos_batch") -> tuple[str, list[str]]:
        """Insert one pending execution per plan and form them into one batch
        (``lifecycle.batch_form``) in the same transaction, so that no launch sensor tick sees them
        outside it: the batch holds exactly these executions (the sensor launches its run, run key
        ``batch:<id>``). Returns the batch id and the execution ids."""
        assert 1 <= len(plans) <= BATCH_SIZE
        with connect(self.dsn, autocommit=False) as conn:
            ids = [
                str(row["id"])
                for modes in plans
                if (
                    row := conn.execute(
                        "INSERT INTO workflow_executions (workflow_definition_id, context)"
                        " SELECT id, %s FROM workflow_definitions WHERE name = %s AND is_active RETURNING id::text",
                        (Jsonb({"customer": "chaos", "chaos": {"modes": modes, "undo": {}}}), workflow),
                    ).fetchone()
                )
                is not None
            ]
            formed = conn.execute(
                "SELECT b.batch_id::text AS batch_id FROM workflow_definitions d,"
                " lifecycle.batch_form(d.id, %s, 0) b WHERE d.name = %s AND d.is_active",
                (len(ids), workflow),
            ).fetchone()
            assert formed is not None, "no batch formed"
            members = conn.execute(
                "SELECT execution_id::text AS id FROM lifecycle.batch_members WHERE batch_id = %s",
                (formed["batch_id"],),
            ).fetchall()
            assert sorted(m["id"] for m in members) == sorted(ids), "the batch took other executions"
            conn.commit()
        return str(formed["batch_id"]), ids

    def batches_of(self, ids: list[str]) -> dict[str, dict[str, Any]]:
        """``{batch id: {"run_id", "members", "left"}}`` of the batches the executions ``ids`` were
        launched in (``left``: ``{execution id: left_reason}`` of the members that left it)."""
        with connect(self.dsn) as conn:
            rows = conn.execute(
                "SELECT b.id::text AS batch_id, b.run_id, m.execution_id::text AS execution_id, m.left_reason"
                " FROM lifecycle.batch_members m JOIN lifecycle.batches b ON b.id = m.batch_id"
                " WHERE m.execution_id = ANY (%s::uuid[]) ORDER BY b.created_at, m.execution_id",
                (ids,),
            ).fetchall()
        out: dict[str, dict[str, Any]] = {}
        for r in rows:
            b = out.setdefault(r["batch_id"], {"run_id": r["run_id"], "members": [], "left": {}})
            b["members"].append(r["execution_id"])
            if r["left_reason"] is not None:
                b["left"][r["execution_id"]] = r["left_reason"]
        return out

    def batch_run(self, batch_id: str) -> str | None:
        """The Dagster run that bound batch ``batch_id`` (None: not yet)."""
        run = self.scalar("SELECT run_id FROM lifecycle.batches WHERE id = %s", batch_id)
        return None if run is None else str(run)

    def busy_stages(self, run_id: str) -> set[str]:
        """The stages with an attempt in progress of the executions run ``run_id`` holds."""
        with connect(self.dsn) as conn:
            rows = conn.execute(
                "SELECT DISTINCT l.stage_id FROM workflow_execution_logs l"
                " JOIN workflow_executions e ON e.id = l.execution_id"
                " WHERE e.dagster_run_id = %s AND e.status = 'in_progress' AND l.status = 'in_progress'",
                (run_id,),
            ).fetchall()
        return {str(r["stage_id"]) for r in rows}

    def run_members(self, run_id: str) -> list[dict[str, Any]]:
        """The in-progress executions run ``run_id`` holds: ``{"id", "live"}`` (``live``: still in
        its batch; else ``left_reason`` says why it left)."""
        with connect(self.dsn) as conn:
            rows = conn.execute(
                "SELECT e.id::text AS id, m.left_at IS NULL AS live, m.left_reason"
                " FROM workflow_executions e LEFT JOIN lifecycle.batch_members m ON m.execution_id = e.id"
                " WHERE e.dagster_run_id = %s AND e.status = 'in_progress' ORDER BY e.id",
                (run_id,),
            ).fetchall()
        return [dict(r) for r in rows]

    def run_sessions(self, run_id: str) -> int:
        """How many sessions of run ``run_id`` (its op connection and heartbeat) the server has."""
        names = [application_name("op", run_id), application_name("heartbeat", run_id)]
        with psycopg.connect(self.admin_dsn, autocommit=True) as conn:
            row = conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = %s AND application_name = ANY (%s)",
                (self.name, names),
            ).fetchone()
        return int(row[0]) if row else 0

    def statuses(self, ids: list[str] | None = None) -> dict[str, int]:
        with connect(self.dsn) as conn:
            rows = conn.execute(
                "SELECT status, count(*) AS n FROM workflow_executions"
                " WHERE %s::uuid[] IS NULL OR id = ANY (%s::uuid[]) GROUP BY status",
                (ids, ids),
            ).fetchall()
        return {r["status"]: int(r["n"]) for r in rows}

    def errors(self, ids: list[str]) -> list[str]:
        """The distinct error messages of the executions ``ids`` that did not complete (numbers
        and ids blurred), with how many had each."""
        with connect(self.dsn) as conn:
            rows = conn.execute(
                "SELECT status, error_message FROM workflow_executions WHERE id = ANY (%s::uuid[])"
                " AND status <> 'completed'",
                (ids,),
            ).fetchall()
        counts: dict[str, int] = {}
        for r in rows:
            message = str(r["error_message"])
            if "Steps failed" in message:
                message += " <- " + self._step_failure(message)
            text = re.sub(r"[0-9a-f]{8}-[0-9a-f-]{27}", "<id>", message)
            text = re.sub(r"\d+(\.\d+)?", "N", text)[:400]
            key = f"{r['status']}: {text}"
            counts[key] = counts.get(key, 0) + 1
        return [f"{n} x {k}" for k, n in sorted(counts.items(), key=lambda kv: -kv[1])]

    def _step_failure(self, message: str) -> str:
        """The error of the failed step of the Dagster run a message names (what the op raised)."""
        from dagster import DagsterEventType, DagsterInstance

        m = re.search(r"run ([0-9a-f-]{36})", message)
        if m is None:
            return "?"
        instance = DagsterInstance.from_config(str(self.home))
        try:
            for entry in instance.all_logs(m.group(1), of_type=DagsterEventType.STEP_FAILURE):
                event = entry.dagster_event
                error = getattr(event.event_specific_data, "error", None) if event is not None else None
                if error is not None:
                    return f"{error.cls_name}: {error.message.strip()}"[:240]
        finally:
            instance.dispose()
        return "?"

    def scalar(self, query: str, *params: Any) -> Any:
        with connect(self.dsn) as conn:
            row = conn.execute(query, params).fetchone()  # type: ignore[call-overload]
        return None if row is None else next(iter(row.values()))

    def wait_for(self, predicate: Callable[[], bool], timeout_s: float, poll_s: float = 0.2) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with contextlib.suppress(psycopg.Error):
                if predicate():
                    return True
            time.sleep(poll_s)
        return False

    def quiesce(self, timeout_s: float) -> tuple[float | None, list[Violation]]:
        """Poll the invariant checker (and :func:`effects_after_attempt`) until it reports
        nothing: (seconds it took, or None, and what it reported last). When no check could run
        within ``timeout_s`` (every one lost its connection), that is reported as the violation
        ``not_checked``: a scenario never passes unchecked."""
        t0 = time.monotonic()
        found: list[Violation] | None = None
        error = "no check was tried"
        while time.monotonic() - t0 < timeout_s:
            try:
                with connect(self.dsn) as conn:
                    found = check(conn) + effects_after_attempt(conn)
            except psycopg.OperationalError as exc:
                error = f"{type(exc).__name__}: {exc}".strip()
                time.sleep(1)
                continue
            if not found:
                return time.monotonic() - t0, []
            time.sleep(1)
        if found is None:
            return None, [
                Violation("not_checked", f"no invariant check completed in {timeout_s:.0f} s (last: {error})")
            ]
        return None, found

    def completed_without_effects(self, ids: list[str], stages: list[str]) -> list[str]:
        """``execution:stage`` of the completed executions of ``ids`` with no side effect recorded
        (``chaos_effects``) for one of ``stages``."""
        with connect(self.dsn) as conn:
            rows = conn.execute(
                "SELECT e.id::text || ':' || s.stage AS missing FROM workflow_executions e"
                " CROSS JOIN unnest(%s::text[]) AS s(stage)"
                " WHERE e.id = ANY (%s::uuid[]) AND e.status = 'completed' AND NOT EXISTS"
                " (SELECT 1 FROM chaos_effects x WHERE x.execution_id = e.id AND x.stage_id = s.stage)"
                " ORDER BY 1",
                (stages, ids),
            ).fetchall()
        return [str(r["missing"]) for r in rows]

    def outcomes(self, ids: list[str]) -> list[dict[str, Any]]:
        """Per execution of ``ids``: its id, status, error, run ids, and ``reaps``: per stage, how
        many of its attempts the reaper took back from a worker the suite killed (``any_reaps``:
        from any worker, as when a lost connection stopped its heartbeat)."""
        with connect(self.dsn) as conn:
            rows = conn.execute(
                "SELECT e.id::text AS id, e.status, e.error_message, e.dagster_run_id, e.compensation_run_id,"
                " coalesce((SELECT jsonb_agg(jsonb_build_array(v.stage_id, v.metadata->>'worker'))"
                "  FROM workflow_events v WHERE v.execution_id = e.id AND v.event_type = 'task_reaped'),"
                " '[]') AS reaped"
                " FROM workflow_executions e WHERE e.id = ANY (%s::uuid[])",
                (ids,),
            ).fetchall()
        out = []
        for r in rows:
            reaps: dict[str, int] = {}
            any_reaps: dict[str, int] = {}
            for stage, worker in r["reaped"]:
                any_reaps[stage] = any_reaps.get(stage, 0) + 1
                if _worker_pid(worker) in self.killed_worker_pids:
                    reaps[stage] = reaps.get(stage, 0) + 1
            out.append({**{k: r[k] for k in r if k != "reaped"}, "reaps": reaps, "any_reaps": any_reaps})
        return out

    # -- faults --------------------------------------------------------------------------------
    def kill_worker_mid_task(self) -> bool:
        """SIGKILL a queue worker while it runs a claimed task (not one paused after its agent
        returned: that one is :meth:`kill_worker_after_return`'s)."""
        from chaos_agents import mode_of

        mine = set(self.worker_pids()) - self.paused_worker_pids()
        with connect(self.dsn) as conn:
            rows = conn.execute(
                "SELECT claimed_by, task_type, input_data -> 'context' AS context FROM task_queue"
                " WHERE status = 'in_progress' AND claimed_by <> 'op'"
            ).fetchall()
        # a task whose plan pauses its worker after the agent returned is left to that kill, before
        # the pause too (else three mid-task kills can take all its attempts and no after-return
        # kill ever happens)
        rows = [r for r in rows if mode_of(r["context"] or {}, r["task_type"]) != "pause_after_return"]
        pids = [p for p in (_worker_pid(r["claimed_by"]) for r in rows) if p in mine]
        if not pids:
            return False
        victim = random.choice(pids)
        self.killed_worker_pids.add(victim)
        _kill_tree(victim)
        return True

    def kill_worker_before_claim(self) -> bool:
        """SIGKILL a queue worker while its claim is in flight: the agent row is locked so the claim
        statement waits (the queue agent has a concurrency limit, so its claims lock that row); the
        worker dies before its claim returns (the claim then commits for a dead worker, whose lease
        the reaper takes back, or dies with its session)."""
        with connect(self.dsn, autocommit=False) as locker:
            locker.execute("SELECT 1 FROM agents WHERE name = %s FOR UPDATE", (QUEUE,))
            victim = None
            deadline = time.monotonic() + 5
            while victim is None and time.monotonic() < deadline:
                blocked = self._blocked_claim_workers()  # over TCP or a unix socket alike
                paused = self.paused_worker_pids()
                victim = next((pid for pid in self.worker_pids() if pid in blocked and pid not in paused), None)
                time.sleep(0.05)
            if victim is not None:
                self.killed_worker_pids.add(victim)
                _kill_tree(victim)
            locker.rollback()
        return victim is not None

    def _blocked_claim_workers(self) -> set[int]:
        """Process ids of the workers whose claim waits on a lock (their sessions are named
        ``lifecycle-worker <host>:<pid>:<suffix>``)."""
        with connect(self.dsn) as conn:
            rows = conn.execute(
                "SELECT application_name FROM pg_stat_activity WHERE datname = current_database()"
                " AND wait_event_type = 'Lock' AND query LIKE %s AND application_name LIKE 'lifecycle-worker %%'",
                ("%lifecycle.task_claim%",),
            ).fetchall()
        pids: set[int] = set()
        for r in rows:
            parts = str(r["application_name"]).split(":")
            if len(parts) >= 3 and parts[-2].isdigit():
                pids.add(int(parts[-2]))
        return pids

    def paused_worker_pids(self) -> set[int]:
        """Process ids of the queue workers paused after their agent returned (plan:
        ``pause_after_return``), kept alive for :meth:`kill_worker_after_return`."""
        pids: set[int] = set()
        for marker in self.hooks.glob("*.returned"):
            with contextlib.suppress(OSError, ValueError):
                pids.add(int(marker.read_text() or 0))
        return pids

    def kill_worker_after_return(self, timeout_s: float = 15) -> bool:
        """SIGKILL the queue worker paused after its agent returned (plan: pause_after_return)."""
        deadline = time.monotonic() + timeout_s
        while True:
            for marker in sorted(self.hooks.glob("*.returned")):
                pid = int(marker.read_text() or 0)
                marker.rename(marker.with_suffix(".killed"))
                if pid in self.worker_pids():
                    self.killed_worker_pids.add(pid)
                    _kill_tree(pid)
                    return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.1)

    def run_workers(self) -> dict[int, str | None]:
        """``{pid: Dagster run id or None}`` of the run workers running now: the processes the
        daemon's code servers (``dagster api grpc``) started for runs (each run worker is a child of
        its code server; the agents it forks are its own children). The run id comes from the
        compute log files the run worker holds open (``.../<run id>/compute_logs/...``)."""
        found: dict[int, str | None] = {}
        if self.daemon is None:
            return found
        with contextlib.suppress(psutil.Error):
            for p in psutil.Process(self.daemon.pid).children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    if "api grpc" not in " ".join(p.cmdline()):
                        continue
                    for child in p.children():
                        run_id = None
                        with contextlib.suppress(psutil.Error):
                            for f in child.open_files():
                                m = re.search(
                                    r"/([0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})/", f.path
                                )
                                if m:
                                    run_id = m.group(1)
                                    break
                        found[child.pid] = run_id
        return found

    def kill_run_worker(self) -> bool:
        """SIGKILL a Dagster run worker while a stage (or an undo) runs."""
        workers = self.run_workers()
        busy = self.scalar(
            "SELECT count(*) FROM workflow_executions e WHERE e.status = 'compensating'"
            " OR (e.status = 'in_progress' AND EXISTS (SELECT 1 FROM workflow_execution_logs l"
            " WHERE l.execution_id = e.id AND l.status = 'in_progress'))"
        )
        if not workers or not busy:
            return False
        victim = random.choice(list(workers))
        self._note_run_kill(workers[victim])
        _kill_tree(victim)
        return True

    def kill_run(self, run_id: str, settle_s: float = 10.0) -> bool:
        """SIGKILL the run worker of Dagster run ``run_id`` (False: none is known for it now), then
        wait (up to ``settle_s``) until the server has ended its sessions: a statement the worker
        had in flight may still commit until then."""
        pid = next((p for p, r in self.run_workers().items() if r == run_id), None)
        if pid is None:
            return False
        self._note_run_kill(run_id)
        _kill_tree(pid)
        self.wait_for(lambda: self.run_sessions(run_id) == 0, settle_s, poll_s=0.1)
        return True

    def terminate_run_connection(self, run_id: str, role: str = "op") -> int:
        """pg_terminate_backend of the ``role`` connection of Dagster run ``run_id`` (``op``: the one
        its stage ops share; ``heartbeat``); how many sessions ended."""
        with psycopg.connect(self.admin_dsn, autocommit=True) as conn:
            rows = conn.execute(
                "SELECT pg_terminate_backend(pid) AS ok FROM pg_stat_activity"
                " WHERE datname = %s AND application_name = %s AND pid <> pg_backend_pid()",
                (self.name, application_name(role, run_id)),
            ).fetchall()
        return sum(1 for r in rows if r[0])

    def run_status(self, run_id: str) -> str | None:
        """The Dagster status of run ``run_id`` (None: unknown to the instance)."""
        from dagster import DagsterInstance

        instance = DagsterInstance.from_config(str(self.home))
        try:
            run = instance.get_run_by_id(run_id)
            return None if run is None else str(run.status.value)
        finally:
            instance.dispose()

    def op_retries(self, run_id: str) -> dict[str, int]:
        """``{step: how many times Dagster retried it}`` in run ``run_id`` (a stage op retries when
        it lost its database connection)."""
        from dagster import DagsterEventType, DagsterInstance

        instance = DagsterInstance.from_config(str(self.home))
        counts: dict[str, int] = {}
        try:
            for entry in instance.all_logs(run_id, of_type=DagsterEventType.STEP_UP_FOR_RETRY):
                step = entry.step_key or "?"
                counts[step] = counts.get(step, 0) + 1
        finally:
            instance.dispose()
        return counts

    def _note_run_kill(self, run_id: str | None) -> None:
        if run_id is None:
            self.unknown_run_kills += 1
        else:
            self.killed_runs.add(run_id)

    def kill_compensation_run_worker(self) -> bool:
        """SIGKILL the run worker of a compensation run (the runs tagged lifecycle/compensation)."""
        from dagster import DagsterInstance

        workers = {run: pid for pid, run in self.run_workers().items() if run}
        if not workers:
            return False
        instance = DagsterInstance.from_config(str(self.home))
        try:
            mine = [
                run
                for run in workers
                if (r := instance.get_run_by_id(run)) is not None and r.tags.get("lifecycle/compensation") == "true"
            ]
        finally:
            instance.dispose()
        if not mine:
            return False
        run = random.choice(mine)
        self._note_run_kill(run)
        _kill_tree(workers[run])
        return True

    def terminate_backends(self, n: int) -> int:
        """pg_terminate_backend of up to ``n`` random sessions of the orchestration database
        (engine, workers, listeners, sensors; never another database's)."""
        with psycopg.connect(self.admin_dsn, autocommit=True) as conn:
            rows = conn.execute(
                "SELECT pg_terminate_backend(pid) AS ok FROM ("
                " SELECT pid FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()"
                " AND backend_type = 'client backend' ORDER BY random() LIMIT %s) s",
                (self.name, n),
            ).fetchall()
        return sum(1 for r in rows if r[0])

    def cancel(self, execution_id: str, compensate: bool) -> bool:
        with connect(self.dsn) as conn:
            row = conn.execute(
                "SELECT cancelled FROM lifecycle.execution_cancel(%s, 'chaos cancel', %s)", (execution_id, compensate)
            ).fetchone()
        done = bool(row and row["cancelled"])
        if done:
            self.cancelled[execution_id] = compensate
        return done

    def publish(self, note: str) -> int:
        """Publish and activate a new version of ``chaos``; return it."""
        with connect(self.dsn) as conn:
            row = conn.execute(
                "SELECT version FROM lifecycle.definition_publish('chaos', 'chaos', %s, true)",
                (Jsonb(chaos_dag(note=note)),),
            ).fetchone()
        assert row is not None
        return int(row["version"])

    def reconcile_now(self) -> int:
        """One reconciler tick from this process, racing the daemon's (its run requests are dropped:
        the daemon's own tick launches them)."""
        from dagster import DagsterInstance, RunRequest

        from lifecycle_dagster.location.sensors import reconcile

        instance = DagsterInstance.from_config(str(self.home))
        try:
            jobs = [f"chaos__v{v}__compensate" for v in range(1, 20)] + ["chaos_hold__v1__compensate"]
            return sum(1 for r in reconcile(instance, jobs, self.dsn) if isinstance(r, RunRequest))
        finally:
            instance.dispose()


#: the side effects of the chaos agents (``chaos_agents.record_effect``), timed by the database's clock
EFFECTS_TABLE = """
CREATE TABLE chaos_effects (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    execution_id uuid NOT NULL, stage_id text NOT NULL, attempt integer NOT NULL,
    agent text NOT NULL, pid integer NOT NULL, at timestamptz NOT NULL DEFAULT clock_timestamp()
)"""

#: how long after its attempt ended an agent's side effect may still land: a worker learns that its
#: task was taken back at its next heartbeat (every lease_s / 3, 0.67 s here) and must stop its
#: agent; a stage op kills its python agent before it records the timeout
EFFECT_GRACE_S = 2.0

#: the first event that ended each attempt of a stage: a retry or failure of that attempt, its task
#: taken back by the reaper, or a later attempt started (the events' times: their transactions' start)
_EFFECTS_AFTER_ATTEMPT = """
SELECT x.execution_id::text AS execution_id, x.stage_id, x.attempt, x.agent, x.pid, x.at,
       f.event_type, f.at AS ended_at
FROM chaos_effects x
JOIN LATERAL (
    SELECT v.event_type, v."timestamp" AS at
    FROM workflow_events v
    WHERE v.execution_id = x.execution_id AND v.stage_id = x.stage_id
      AND CASE v.event_type
            WHEN 'stage_retrying' THEN (v.metadata->>'failed_attempt')::int = x.attempt
            WHEN 'stage_failed' THEN (v.metadata->>'attempt')::int = x.attempt
            WHEN 'task_reaped' THEN (v.metadata->>'attempt')::int = x.attempt
            WHEN 'stage_started' THEN (v.metadata->>'attempt')::int > x.attempt
            ELSE false END
    ORDER BY v."timestamp", v.id
    LIMIT 1
) f ON true
WHERE x.at > f.at + make_interval(secs => %s)
ORDER BY x.at
"""


def effects_after_attempt(conn: Any, grace_s: float = EFFECT_GRACE_S) -> list[Violation]:
    """Rule ``effect_after_attempt``: no side effect of an agent (``chaos_effects``) lands more than
    ``grace_s`` seconds after its attempt ended (the attempt was retried or failed, its task was
    taken back by the reaper, or a later attempt started): fencing must stop the work, not only
    refuse its result. An effect of an attempt that nobody ended (the engine kept it) never counts."""
    rows = conn.execute(_EFFECTS_AFTER_ATTEMPT, (grace_s,)).fetchall()
    return [
        Violation(
            "effect_after_attempt",
            f"{r['agent']} (pid {r['pid']}) did the side effect of stage {r['stage_id']} attempt {r['attempt']} "
            f"of execution {r['execution_id']} at {r['at'].isoformat()}, "
            f"{(r['at'] - r['ended_at']).total_seconds():.1f} s after that attempt ended ({r['event_type']})",
            execution_id=r["execution_id"],
            stage_id=r["stage_id"],
        )
        for r in rows
    ]


def _worker_pid(claimed_by: str | None) -> int | None:
    """The pid in a worker id (``host:pid:suffix``)."""
    parts = (claimed_by or "").split(":")
    return int(parts[-2]) if len(parts) >= 3 and parts[-2].isdigit() else None


# ---------------------------------------------------------------------------------------------
# a throwaway Postgres cluster (the restart scenario never touches the shared server)


class Cluster:
    """A Postgres cluster of its own: initdb into a temporary folder, pg_ctl on a free port with
    its unix socket in that folder. Run as root, the server runs as the ``postgres`` user.
    ``durable``: fsync, synchronous commit and full page writes on (the defaults of a production
    server), so an immediate shutdown is a crash the server recovers from its WAL; otherwise all
    three are off (faster, but only a clean shutdown keeps the data)."""

    def __init__(self, bindir: Path, *, durable: bool = True) -> None:
        self.bindir = bindir
        self.durable = durable
        self.root = Path(tempfile.mkdtemp(prefix="ld-chaos-pg-"))
        self.data = self.root / "data"
        self.sock = self.root / "sock"
        self.log = self.root / "server.log"
        self.port = _free_port()
        self.dsn = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"
        self.as_user: list[str] = []
        if os.geteuid() == 0:
            self.as_user = ["runuser", "-u", "postgres", "--"]
            os.chmod(self.root, 0o755)
            shutil.chown(self.root, "postgres")

    def _run(self, *args: str, timeout: float = 120) -> None:
        subprocess.run([*self.as_user, *args], check=True, capture_output=True, timeout=timeout, cwd=self.root)

    def init(self) -> None:
        self.sock.mkdir()
        if self.as_user:
            shutil.chown(self.sock, "postgres")
        self._run(str(self.bindir / "initdb"), "-D", str(self.data), "-U", "postgres", "-A", "trust", "--no-sync")
        self.start()

    def start(self) -> None:
        flag = "on" if self.durable else "off"
        opts = (
            f"-p {self.port} -k {self.sock} -c listen_addresses=127.0.0.1 -c max_connections=300"
            f" -c fsync={flag} -c synchronous_commit={flag} -c full_page_writes={flag}"
        )
        self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-o", opts, "-w", "start")

    def stop(self, mode: str = "fast") -> None:
        self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop")

    def restart(self, mode: str) -> None:
        self.stop(mode)
        self.start()

    def settings(self) -> dict[str, str]:
        """fsync, synchronous_commit and full_page_writes as the running server has them."""
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            rows = conn.execute(
                "SELECT name, setting FROM pg_settings"
                " WHERE name IN ('fsync', 'synchronous_commit', 'full_page_writes')"
            ).fetchall()
        return {str(r[0]): str(r[1]) for r in rows}

    def destroy(self) -> None:
        with contextlib.suppress(subprocess.SubprocessError, OSError):
            self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def running(world: World) -> Iterator[World]:
    """Create and start ``world``; stop and drop it at the end."""
    try:
        world.create()
        world.start()
        yield world
    finally:
        world.stop()
        world.drop()
