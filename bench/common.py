"""Shared helpers: statistics, the no-op agents, the databases each section uses, client processes.

Units: every duration stored in results is in milliseconds (``*_ms``) or seconds (``*_s``) as its
key says; rates are per second.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, LiteralString

import psycopg
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from lifecycle_dagster.agents import AgentError, AgentRegistry, CompensationTask, Task
from lifecycle_dagster.store import migrate
from lifecycle_dagster.store.sqlfiles import seed_sql

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
SQL_DIR = BENCH_DIR / "sql"

#: the seeded lifecycle's five agents, in stage order
LIFECYCLE_AGENTS = ("Opportunity Agent", "Assessment Agent", "Design Agent", "Realization Agent", "Integrity Agent")
#: the context of a no-op execution (the no-op agents ignore it)
CONTEXT: dict[str, Any] = {"customer": "bench"}
#: the queue agent of section 2 and its capability; the python agents of the chain DAGs
QUEUE_AGENT = "Bench Queue Agent"
QUEUE_CAPABILITY = "bench_queue"
NOOP_AGENT = "Bench Noop Agent"
FAIL_AGENT = "Bench Fail Agent"


def bench_sql(name: str) -> LiteralString:
    """The text of ``bench/sql/<name>.sql`` (fixed files of this harness, never input)."""
    return (SQL_DIR / f"{name}.sql").read_text(encoding="utf-8")  # mypy treats LiteralString as str


# -- statistics ----------------------------------------------------------------------------------
def pct(values: Sequence[float], p: float) -> float:
    """The ``p``-th percentile (0-100, nearest rank) of ``values``; NaN when empty."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(p / 100.0 * len(ordered)))
    return float(ordered[min(rank, len(ordered)) - 1])


def summary(values: Sequence[float]) -> dict[str, float]:
    """n, median, p90, p99, min, max of ``values`` (same unit as the values)."""
    return {
        "n": len(values),
        "median": float(statistics.median(values)) if values else math.nan,
        "p90": pct(values, 90),
        "p99": pct(values, 99),
        "min": min(values) if values else math.nan,
        "max": max(values) if values else math.nan,
    }


def load_average() -> tuple[float, float, float]:
    """The 1, 5 and 15 minute load averages."""
    return os.getloadavg()


def cpu_busy_fraction(seconds: float = 1.0) -> float:
    """Fraction (0-1) of all cores busy over the next ``seconds`` seconds (/proc/stat)."""

    def read() -> tuple[int, int]:
        with open("/proc/stat") as f:
            parts = [int(x) for x in f.readline().split()[1:]]
        idle = parts[3] + parts[4]
        return sum(parts), idle

    t0, i0 = read()
    time.sleep(seconds)
    t1, i1 = read()
    return 1.0 - (i1 - i0) / max(1, t1 - t0)


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    cpu = "?"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "?")
    except OSError:
        pass
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {
        "cores": os.cpu_count(),
        "cpu": cpu,
        "memory_gib": round(mem_gib, 1),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


# -- the no-op agents ----------------------------------------------------------------------------
class NoopAgent:
    """An agent that does nothing: returns ``{"summary": "noop"}`` and undoes nothing."""

    def __init__(self, name: str, fail: bool = False) -> None:
        self.name = name
        self.fail = fail

    def run(self, task: Task) -> dict[str, Any]:
        if self.fail:
            raise AgentError("bench_failure", f"{self.name} fails on purpose (stage {task.stage_id})")
        return {"summary": "noop"}

    def compensate(self, task: CompensationTask) -> dict[str, Any]:
        return {"summary": f"undo {task.stage_id}", "void": []}


def noop_registry(fail_agent: str | None = None) -> AgentRegistry:
    """No-op versions of the five lifecycle agents (``fail_agent`` raises a non-retryable error) and
    of the bench agents of ``bench/sql/setup.sql`` (``Bench Fail Agent`` always fails)."""
    agents = [NoopAgent(n, fail=n == fail_agent) for n in (*LIFECYCLE_AGENTS, QUEUE_AGENT, NOOP_AGENT)]
    return AgentRegistry([*agents, NoopAgent(FAIL_AGENT, fail=True)])


def queue_registry() -> AgentRegistry:
    """The registry of the queue benchmark's workers (``agent serve --registry bench.common:queue_registry``)."""
    return AgentRegistry([NoopAgent(QUEUE_AGENT)])


# -- databases -----------------------------------------------------------------------------------
def connect(dsn: str) -> psycopg.Connection[Any]:
    """An autocommit connection with dict rows."""
    return psycopg.connect(dsn, autocommit=True, row_factory=dict_row)


def prepare_app_db(dsn: str) -> None:
    """Migrate, seed (lifecycle_v1 and its agents), and add the bench definitions and agents
    (``bench/sql/setup.sql``)."""
    migrate.upgrade(dsn)
    with connect(dsn) as conn:
        conn.execute(seed_sql())
        conn.execute(bench_sql("setup"))


def chain_dag(n: int, fail_last: bool = False) -> dict[str, Any]:
    """A chain of ``n`` stages ``s0001 → s0002 → ...`` over capability ``bench_noop`` (or
    ``bench_fail`` for the last stage when ``fail_last``), no retries."""
    stages = []
    for i in range(1, n + 1):
        cap = "bench_fail" if fail_last and i == n else "bench_noop"
        stage: dict[str, Any] = {"id": f"s{i:04d}", "capability": cap}
        if i < n:
            stage["next"] = [f"s{i + 1:04d}"]
        stages.append(stage)
    return {"stages": stages, "defaults": {"retry": {"max_attempts": 1}}}


def install_definition(dsn: str, name: str, dag: dict[str, Any]) -> dict[str, Any]:
    """Publish and activate ``name`` with ``dag``; return its definition row (as build_job takes it)."""
    with connect(dsn) as conn:
        conn.execute(
            "SELECT * FROM lifecycle.definition_publish(%(name)s, %(d)s, %(dag)s, true, NULL)",
            {"name": name, "d": f"bench {name}", "dag": Jsonb(dag)},
        )
        row = conn.execute(
            "SELECT id::text AS id, name, description, version, dag_schema::text AS dag_schema_json"
            " FROM workflow_definitions WHERE name = %(name)s AND is_active",
            {"name": name},
        ).fetchone()
    assert row is not None
    return dict(row)


def lifecycle_row(dsn: str, name: str = "lifecycle_v1") -> dict[str, Any]:
    """The active definition row of ``name``."""
    with connect(dsn) as conn:
        row = conn.execute(
            "SELECT id::text AS id, name, description, version, dag_schema::text AS dag_schema_json"
            " FROM workflow_definitions WHERE name = %(name)s AND is_active",
            {"name": name},
        ).fetchone()
    assert row is not None, name
    return dict(row)


# -- client processes ----------------------------------------------------------------------------
def _client_main(target: str, args: dict[str, Any], barrier: Any, out: Any, index: int) -> None:
    module_name, _, func_name = target.partition(":")
    import importlib

    try:
        func = getattr(importlib.import_module(module_name), func_name)
        run_one = func(**args, client=index)  # setup, warm-up; returns a callable running one execution
        barrier.wait(timeout=300)
        t0 = time.monotonic()
        durations = []
        deadline = t0 + float(args.get("seconds") or 1e9)
        last = None
        for _ in range(int(args["count"])):
            s = time.monotonic()
            last = run_one()
            durations.append((time.monotonic() - s) * 1000.0)
            if time.monotonic() > deadline:
                break
        out.put({"index": index, "start": t0, "end": time.monotonic(), "durations_ms": durations, "last": last})
    except BaseException as exc:  # reported to the parent, which raises
        import traceback

        with __import__("contextlib").suppress(Exception):
            barrier.abort()
        out.put({"index": index, "error": f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"})


def run_clients(target: str, clients: int, count: int, **args: Any) -> dict[str, Any]:
    """Run ``clients`` processes (spawned), each ``target(**args, client=i)`` to set up (returning a
    callable that runs one execution), then, all together, ``count`` executions each.

    Returns ``{"clients", "executions", "wall_s", "rate_per_s", "latency_ms": summary, "last_result"}``
    (what client 0's last execution returned).

    Raises:
        RuntimeError: a client failed (its traceback is in the message).
    """
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(clients)
    out = ctx.Queue()
    procs = [
        ctx.Process(target=_client_main, args=(target, {**args, "count": count}, barrier, out, i))
        for i in range(clients)
    ]
    for p in procs:
        p.start()
    results = []
    try:
        for _ in procs:
            results.append(out.get(timeout=900))
    finally:
        for p in procs:
            p.join(30)
            if p.is_alive():
                p.kill()
    errors = [r["error"] for r in results if "error" in r]
    if errors:
        raise RuntimeError(f"{target}: client failed: {errors[0]}")
    start = min(r["start"] for r in results)
    end = max(r["end"] for r in results)
    durations = [d for r in results for d in r["durations_ms"]]
    return {
        "clients": clients,
        "executions": len(durations),
        "wall_s": end - start,
        "rate_per_s": len(durations) / (end - start) if end > start else math.nan,
        "latency_ms": summary(durations),
        "last_result": next((r["last"] for r in results if r["index"] == 0), None),
    }


def write_json(path: Path, data: Any) -> None:
    """Write ``data`` as indented JSON (NaN becomes null)."""

    def clean(v: Any) -> Any:
        if isinstance(v, float) and (math.isnan(v) or math.isinf(v)):
            return None
        if isinstance(v, dict):
            return {str(k): clean(x) for k, x in v.items()}
        if isinstance(v, list | tuple):
            return [clean(x) for x in v]
        return v

    path.write_text(json.dumps(clean(data), indent=2, sort_keys=False) + "\n", encoding="utf-8")


def timed(fn: Callable[[], Any]) -> float:
    """Milliseconds ``fn()`` took."""
    t = time.perf_counter()
    fn()
    return (time.perf_counter() - t) * 1000.0
