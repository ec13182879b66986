"""Prometheus metrics scraped over HTTP after real runs: ``metrics serve`` (database side) and
``agent serve --metrics-port`` (a worker), and the Grafana dashboard's queries against both."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from psycopg.types.json import Jsonb

from lifecycle_dagster.agents import AgentOverloaded, AgentRegistry, Task, default_registry
from lifecycle_dagster.store.db import connect
from lifecycle_dagster.store.metrics import DatabaseCollector, serve_registry

from helpers import create_execution, install, rows, run

REPO = Path(__file__).resolve().parents[2]
TESTS = Path(__file__).resolve().parents[1]
ACME = json.loads((REPO / "examples/acme.json").read_text())
T0 = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


class Flaky:
    """Overloaded on its first attempt (retried), then answers."""

    def __init__(self, name: str) -> None:
        self.name = name

    def run(self, task: Task) -> dict[str, Any]:
        if task.attempt == 1:
            raise AgentOverloaded("busy")
        return {"summary": f"{task.stage_id} done"}


class Down:
    """Always overloaded."""

    name = "down_agent"

    def run(self, task: Task) -> dict[str, Any]:
        raise AgentOverloaded("down")


def _samples(text: str) -> Samples:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def _value(samples: Samples, name: str, **labels: str) -> float:
    """The value of the one sample ``name`` whose labels include ``labels`` (0 when none)."""
    found = [v for (n, ls), v in samples.items() if n == name and set(labels.items()) <= ls]
    assert len(found) <= 1, (name, labels, found)
    return found[0] if found else 0.0


def _start(args: list[str], db: str) -> tuple[subprocess.Popen[str], int]:
    """Start ``lifecycle-dagster ARGS`` (this checkout first, then tests/) and read the metrics port it prints."""
    env = {**os.environ, "DATABASE_URL": db, "PYTHONPATH": os.pathsep.join([str(REPO), str(TESTS)])}
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "lifecycle-dagster"), *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
    )
    assert proc.stdout is not None
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        found = re.search(r"metrics on http://[^:]+:(\d+)/metrics", line)
        if found:
            return proc, int(found.group(1))
        if not line and proc.poll() is not None:
            break
    proc.kill()
    raise AssertionError(f"{args} printed no metrics address (exit {proc.poll()})")


def _stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def _scrape(port: int) -> str:
    response = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=30)
    assert response.status_code == 200, response.text
    return response.text


def _reaped_bare_task(db: str) -> None:
    """A queue agent serving ``queued_cap``, two bare pending tasks of it, one of them claimed at T0
    with a 1 s lease and reaped 10 s later (requeued): two pending, one lease expiry."""
    install(db, "unused", {"stages": [{"id": "s", "capability": "queued_cap"}]}, {"queued_cap": "queue_agent"})
    with connect(db) as conn:
        conn.execute("UPDATE agents SET kind = 'queue' WHERE name = 'queue_agent'")
        for _ in range(2):
            conn.execute(
                "INSERT INTO task_queue (task_type, capability, input_data, created_at)"
                " VALUES ('x', 'queued_cap', '{}', %s)",
                (T0,),
            )
        conn.execute("SELECT * FROM lifecycle.task_claim('w', 'queue_agent', 1, 1, %s)", (T0,))
        assert conn.execute("SELECT lifecycle.task_reap(%s) AS n", (T0 + timedelta(seconds=10),)).fetchone() == {"n": 1}


def _world(db: str, instance: Any) -> AgentRegistry:
    """flaky v1: one stage retried once then completed; down v1: failed twice (its agent's breaker,
    threshold 2, opens); an execution of down compensated with nothing to undo (rolled back)."""
    install(
        db,
        "flaky",
        {"stages": [{"id": "work", "capability": "work", "retry": {"max_attempts": 2, "base_delay_s": 0}}]},
        {"work": "flaky_agent"},
    )
    down = {"stages": [{"id": "hit", "capability": "down", "retry": {"max_attempts": 1}}]}
    install(db, "down", down, {"down": "down_agent"})
    with connect(db) as conn:
        breaker = Jsonb({"breaker": {"failure_threshold": 2}})
        conn.execute("UPDATE agents SET config = %s WHERE name = 'down_agent'", (breaker,))
    registry = AgentRegistry([Flaky("flaky_agent"), Down()])
    assert run(db, instance, "flaky", registry)[0].success
    for _ in range(2):
        assert not run(db, instance, "down", registry)[0].success
    _, eid = create_execution(db, "down")
    with connect(db) as conn:
        conn.execute("SELECT perform_workflow_compensation(%s, 'not wanted')", (eid,))
    _reaped_bare_task(db)
    return registry


@pytest.mark.slow
def test_metrics_serve_after_real_runs(db: str, instance: Any) -> None:
    registry = _world(db, instance)
    proc, port = _start(["metrics", "serve", "--port", "0", "--host", "127.0.0.1", "--settle-s", "0"], db)
    try:
        s = _samples(_scrape(port))
        flaky = {"workflow": "flaky", "version": "1", "stage": "work"}
        down = {"workflow": "down", "version": "1", "stage": "hit"}
        # one observation per stage attempt: flaky's 2 (retried, completed), down's 2 (failed)
        attempts = rows(db, "SELECT count(*) AS n FROM task_queue WHERE workflow_execution_id IS NOT NULL")[0]["n"]
        assert attempts == 4
        assert _value(s, "lifecycle_stage_attempt_duration_seconds_count", **flaky) == 2
        assert _value(s, "lifecycle_stage_attempt_duration_seconds_count", **down) == 2
        assert _value(s, "lifecycle_stage_attempt_duration_seconds_bucket", **flaky, le="+Inf") == 2
        assert _value(s, "lifecycle_stage_outcomes_total", **flaky, agent="flaky_agent", outcome="retrying") == 1
        assert _value(s, "lifecycle_stage_outcomes_total", **flaky, agent="flaky_agent", outcome="completed") == 1
        assert _value(s, "lifecycle_stage_outcomes_total", **down, agent="down_agent", outcome="failed") == 2
        assert _value(s, "lifecycle_stage_retries_total", **flaky) == 1
        assert _value(s, "lifecycle_task_claim_to_complete_seconds_count", capability="down", agent="down_agent") == 2
        assert _value(s, "lifecycle_executions", workflow="flaky", version="1", status="completed") == 1
        assert _value(s, "lifecycle_executions", workflow="down", version="1", status="failed") == 2
        assert _value(s, "lifecycle_executions", workflow="down", version="1", status="rolled_back") == 1
        assert _value(s, "lifecycle_compensations_total", workflow="down", outcome="rolled_back") == 1
        open_agent = {"scope": "agent", "agent": "down_agent", "capability": ""}
        assert _value(s, "lifecycle_breaker_state", **open_agent, state="open") == 1
        assert _value(s, "lifecycle_breaker_state", **open_agent, state="closed") == 0
        # the capability's breaker (default threshold 5) stays closed
        assert _value(s, "lifecycle_breaker_state", scope="capability", capability="down", state="closed") == 1
        pending = rows(
            db, "SELECT count(*) AS n FROM task_queue WHERE status = 'pending' AND capability = 'queued_cap'"
        )
        assert _value(s, "lifecycle_queue_depth", capability="queued_cap") == pending[0]["n"] == 2
        assert _value(s, "lifecycle_queue_oldest_pending_age_seconds", capability="queued_cap") >= 6 * 86400
        assert _value(s, "lifecycle_queue_depth", capability="work") == 0  # served, nothing waiting
        assert _value(s, "lifecycle_task_lease_expiries_total", capability="queued_cap", agent="queue_agent") == 1

        # the next scrape adds only what happened since (settled totals + the new events)
        assert run(db, instance, "flaky", registry)[0].success
        s = _samples(_scrape(port))
        assert _value(s, "lifecycle_stage_attempt_duration_seconds_count", **flaky) == 4
        assert _value(s, "lifecycle_stage_retries_total", **flaky) == 2
        assert _value(s, "lifecycle_executions", workflow="flaky", version="1", status="completed") == 2
    finally:
        _stop(proc)
    # a collector that keeps the last minute unsettled reads the same figures
    fresh = CollectorRegistry()
    fresh.register(DatabaseCollector(db))

    other = _samples(generate_latest(fresh).decode())
    timing = ("lifecycle_metrics_scrape_duration_seconds", "lifecycle_queue_oldest_pending_age_seconds")
    assert {k: v for k, v in other.items() if k[0] not in timing} == {k: v for k, v in s.items() if k[0] not in timing}


def test_a_failed_scrape_answers_500_and_the_next_reconnects(db: str) -> None:
    collector = DatabaseCollector(db)
    registry = CollectorRegistry()
    registry.register(collector)
    server = serve_registry(registry, "127.0.0.1", 0)
    try:
        assert "lifecycle_queue_depth" in _scrape(server.server_port)
        with connect(db) as conn:
            conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE application_name = 'lifecycle-dagster metrics' AND datname = current_database()"
            )
        failed = httpx.get(f"http://127.0.0.1:{server.server_port}/metrics", timeout=30)
        assert failed.status_code == 500 and failed.text.startswith("scrape failed: ")
        assert "lifecycle_queue_depth" in _scrape(server.server_port)  # a new connection
        assert httpx.get(f"http://127.0.0.1:{server.server_port}/nope", timeout=30).status_code == 404
    finally:
        server.shutdown()
        server.server_close()
        collector.close()


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


def _dashboard_names() -> set[str]:
    """Every ``lifecycle_*`` name the dashboard's PromQL expressions query."""
    dashboard = json.loads((REPO / "deploy/grafana/lifecycle.json").read_text())

    def exprs(node: Any) -> Iterator[str]:
        if isinstance(node, dict):
            for k, v in node.items():
                if k in ("expr", "query") and isinstance(v, str):
                    yield v
                else:
                    yield from exprs(v)
        elif isinstance(node, list):
            for v in node:
                yield from exprs(v)

    found = {n for e in exprs(dashboard) for n in re.findall(r"\b(lifecycle_[a-z0-9_]+)", e)}
    assert any(v.get("type") == "datasource" for v in dashboard["templating"]["list"])
    assert {"lifecycle_stage_attempt_duration_seconds_bucket", "lifecycle_queue_depth"} <= found
    return found


def _served_names(text: str) -> set[str]:
    """The series names a scrape serves, including those of families with no series yet (# TYPE)."""
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
    names = set()
    for family in text_string_to_metric_families(text):
        names |= {family.name + s for s in suffixes.get(family.type, ("",))}
        names |= {s.name for s in family.samples}
    return names


@pytest.mark.slow
def test_agent_serve_metrics_and_the_dashboard(seeded_db: str, instance: Any) -> None:
    with connect(seeded_db) as conn:
        conn.execute("UPDATE agents SET kind = 'queue' WHERE name = 'Design Agent'")
        for payload in (_design_input(), _design_input(), {"context": {}}):  # two succeed, one fails
            conn.execute(
                "INSERT INTO task_queue (task_type, capability, input_data) VALUES ('bare', 'design', %s)",
                (Jsonb(payload),),
            )
    worker, worker_port = _start(
        ["agent", "serve", "--agent", "Design Agent", "--registry", "queue_agents:registry", "--poll-s", "0.2",
         "--metrics-port", "0", "--metrics-host", "127.0.0.1"],
        seeded_db,
    )  # fmt: skip
    server, port = _start(["metrics", "serve", "--port", "0", "--host", "127.0.0.1"], seeded_db)
    try:
        result, _ = run(seeded_db, instance, "lifecycle_v1", default_registry(), ACME)  # its design stage: the worker
        assert result.success
        deadline = time.monotonic() + 30
        while rows(seeded_db, "SELECT 1 FROM task_queue WHERE status IN ('pending', 'in_progress')"):
            assert time.monotonic() < deadline
            time.sleep(0.1)
        w = _samples(worker_text := _scrape(worker_port))
        design = {"agent": "Design Agent", "capability": "design"}
        assert _value(w, "lifecycle_worker_tasks_claimed_total", **design) == 4
        assert _value(w, "lifecycle_worker_tasks_finished_total", **design, outcome="completed") == 3
        assert _value(w, "lifecycle_worker_tasks_finished_total", **design, outcome="failed") == 1
        assert _value(w, "lifecycle_worker_task_claim_to_complete_seconds_count", **design) == 4
        assert _value(w, "lifecycle_worker_agent_call_duration_seconds_count", **design, outcome="error") == 1
        assert _value(w, "lifecycle_worker_tasks_in_flight", agent="Design Agent") == 0
        db_text = _scrape(port)
        d = _samples(db_text)
        stage = {"workflow": "lifecycle_v1", "version": "1", "stage": "target_design"}
        assert _value(d, "lifecycle_stage_outcomes_total", **stage, agent="Design Agent", outcome="completed") == 1
        missing = _dashboard_names() - _served_names(worker_text) - _served_names(db_text)
        assert missing == set()
    finally:
        _stop(worker)
        _stop(server)
