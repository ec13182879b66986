"""Section 1, overhead: the lifecycle job (five stages, no-op agents) against a bare Dagster job of
the same shape (five ops in a chain), both ``execute_in_process`` (the in-process executor) on the
same dagster-postgres instance, runs interleaved. Then, over a few more runs each: the statements
each job sends (pg_stat_statements, per database: ours and Dagster's storage) and a pyinstrument
profile of the lifecycle job split into time in ``lifecycle_dagster`` (our Python, and psycopg
under it: connects and SQL round trips) against everything else (Dagster).
"""

import statistics
import time
from pathlib import Path
from typing import Any

import dagster as dg
from pyinstrument import Profiler

from bench.common import CONTEXT, bench_sql, connect, lifecycle_row, noop_registry, summary
from lifecycle_dagster.location.job_factory import build_job
from lifecycle_dagster.location.resources import agents_resource

STAGES = 5
#: both jobs log to the console at WARNING (Dagster's default console logger is DEBUG)
QUIET: dict[str, Any] = {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}


def bare_job() -> dg.JobDefinition:
    """Five ops in a chain (``Nothing`` dependencies), doing nothing: the shape of lifecycle_v1."""
    ops = []
    for i in range(STAGES):

        def compute(context: dg.OpExecutionContext) -> None:
            return None

        ops.append(
            dg.op(
                name=f"bare_s{i + 1}",
                ins={"upstream": dg.In(dg.Nothing)} if i else {},
                out=dg.Out(dg.Nothing),
            )(compute)
        )
    deps: dict[str, dict[str, dg.IDependencyDefinition]] = {
        ops[i].name: {"upstream": dg.DependencyDefinition(ops[i - 1].name)} for i in range(1, STAGES)
    }
    return dg.GraphDefinition(name="bare_chain5", node_defs=ops, dependencies=deps).to_job()


class Jobs:
    """The two jobs and how to run each once on ``instance``; the lifecycle run must complete."""

    def __init__(self, app_dsn: str, instance: dg.DagsterInstance) -> None:
        self.instance = instance
        self.bare = bare_job()
        self.lifecycle = build_job(lifecycle_row(app_dsn))
        self.resources = {"lifecycle_agents": agents_resource(noop_registry())}
        self.run_config: dict[str, Any] = {
            "resources": {"lifecycle_request": {"config": {"context": CONTEXT}}},
            **QUIET,
        }

    def run_bare(self) -> None:
        assert self.bare.execute_in_process(instance=self.instance, run_config=QUIET).success

    def run_lifecycle(self) -> None:
        result = self.lifecycle.execute_in_process(
            instance=self.instance, run_config=self.run_config, resources=self.resources
        )
        assert result.success


def _statements(admin_dsn: str, dbs: dict[str, str]) -> dict[str, dict[str, float]]:
    """pg_stat_statements totals per database label: top-level statements (client round trips), all
    statements (with those run inside our SQL functions and triggers), execution ms."""
    out: dict[str, dict[str, float]] = {}
    with connect(admin_dsn) as conn:
        for label, name in dbs.items():
            row = conn.execute(
                "SELECT coalesce(sum(s.calls) FILTER (WHERE s.toplevel), 0) AS toplevel,"
                " coalesce(sum(s.calls), 0) AS all_calls,"
                " coalesce(sum(s.total_exec_time) FILTER (WHERE s.toplevel), 0) AS exec_ms"
                " FROM pg_stat_statements s JOIN pg_database d ON d.oid = s.dbid WHERE d.datname = %(db)s",
                {"db": name},
            ).fetchone()
            assert row is not None
            out[label] = {k: float(v) for k, v in row.items()}
    return out


def _top_statements(admin_dsn: str, db: str, per: int) -> list[dict[str, Any]]:
    """The 12 statements of ``db`` with the most execution time (nested ones included), per stage."""
    with connect(admin_dsn) as conn:
        rows = conn.execute(bench_sql("top_statements"), {"db": db, "limit": 12}).fetchall()
    return [
        {"toplevel": r["toplevel"], "calls_per_stage": r["calls"] / per, "ms_per_stage": r["ms"] / per, "query": r["q"]}
        for r in rows
    ]


def _reset(admin_dsn: str) -> None:
    with connect(admin_dsn) as conn:
        conn.execute("SELECT pg_stat_statements_reset()")


def _split(profiler: Profiler) -> dict[str, float]:
    """Seconds of the profile in our code (lifecycle_dagster frames, outermost), in psycopg under
    our code, and elsewhere (Dagster and the rest)."""
    session = profiler.last_session
    assert session is not None
    root = session.root_frame()
    assert root is not None
    ours = 0.0
    driver = 0.0

    def driver_time(frame: Any) -> float:
        if "/psycopg/" in (frame.file_path or "") or "/psycopg_pool/" in (frame.file_path or ""):
            return float(frame.time)
        return sum(driver_time(c) for c in frame.children)

    parts: dict[str, float] = {}

    def walk(frame: Any) -> None:
        nonlocal ours, driver
        if "/lifecycle_dagster/" in (frame.file_path or ""):
            ours += float(frame.time)
            driver += driver_time(frame)
            for c in frame.children:  # one level down: run_stage (SQL calls), connect, Heartbeat...
                parts[c.function] = parts.get(c.function, 0.0) + float(c.time)
            return
        for c in frame.children:
            walk(c)

    walk(root)
    return {
        "total_s": float(root.time),
        "ours_s": ours,
        "ours_psycopg_s": driver,
        "dagster_s": float(root.time) - ours,
        **{f"ours_{name}_s": t for name, t in parts.items()},
    }


def run(ctx: Any) -> dict[str, Any]:
    """Run section 1 (see the module docstring); ``ctx`` is the harness context."""
    n = 6 if ctx.quick else 30
    k = 4 if ctx.quick else 10
    instance = dg.DagsterInstance.from_config(str(ctx.dagster_home))
    jobs = Jobs(ctx.app_dsn, instance)
    for _ in range(2):  # warm-up: imports, first connections, Dagster's caches
        jobs.run_bare()
        jobs.run_lifecycle()
    bare: list[float] = []
    life: list[float] = []
    ratios: list[float] = []
    for i in range(n):
        order = [("bare", jobs.run_bare), ("life", jobs.run_lifecycle)]
        if i % 2:
            order.reverse()
        got: dict[str, float] = {}
        for name, fn in order:
            t = time.perf_counter()
            fn()
            got[name] = (time.perf_counter() - t) * 1000.0
        bare.append(got["bare"])
        life.append(got["life"])
        ratios.append(got["life"] / got["bare"])

    dbs = {"ours": ctx.app_db, "dagster": ctx.dagster_db}
    _reset(ctx.admin_dsn)
    for _ in range(k):
        jobs.run_lifecycle()
    stmts_life = _statements(ctx.admin_dsn, dbs)
    top = _top_statements(ctx.admin_dsn, ctx.app_db, k * STAGES)
    _reset(ctx.admin_dsn)
    for _ in range(k):
        jobs.run_bare()
    stmts_bare = _statements(ctx.admin_dsn, dbs)

    split_life: dict[str, float] = {}
    split_bare: dict[str, float] = {}
    for i in range(k):  # one profile per run, alternating, so drift hits both jobs alike
        for split, fn in ((split_life, jobs.run_lifecycle), (split_bare, jobs.run_bare)):
            profiler = Profiler(interval=0.0005)
            profiler.start()
            fn()
            profiler.stop()
            for key, v in _split(profiler).items():
                split[key] = split.get(key, 0.0) + v
            if i == k - 1 and fn == jobs.run_lifecycle:
                Path(ctx.out_dir / "profile_overhead.txt").write_text(
                    profiler.output_text(unicode=False, color=False, show_all=False), encoding="utf-8"
                )
    instance.dispose()

    med_bare, med_life = statistics.median(bare), statistics.median(life)
    per_run = {key: v / k for key, v in split_life.items()}
    return {
        "runs_each": n,
        "bare_ms": summary(bare),
        "lifecycle_ms": summary(life),
        "ratio_of_medians": med_life / med_bare,
        "median_pair_ratio": statistics.median(ratios),
        "target_ratio": 1.15,
        "bookkeeping_ms_per_stage": (med_life - med_bare) / STAGES,
        "statements_per_stage": {
            "ours_round_trips": stmts_life["ours"]["toplevel"] / (k * STAGES),
            "ours_all": stmts_life["ours"]["all_calls"] / (k * STAGES),
            "ours_exec_ms": stmts_life["ours"]["exec_ms"] / (k * STAGES),
            "dagster_round_trips_lifecycle": stmts_life["dagster"]["toplevel"] / (k * STAGES),
            "dagster_round_trips_bare": stmts_bare["dagster"]["toplevel"] / (k * STAGES),
        },
        "top_statements_per_stage": top,
        "profile_runs": k,
        "profile_ms_per_run_lifecycle": {key[:-2] + "_ms": v * 1000.0 for key, v in per_run.items()},
        "profile_ms_per_run_bare": {key[:-2] + "_ms": v * 1000.0 / k for key, v in split_bare.items()},
        "raw_ms": {"bare": bare, "lifecycle": life},
    }
