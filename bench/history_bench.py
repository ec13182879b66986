"""Section 3, scaling with history: with 10k, 100k and 1M events (and as many tasks) of finished
executions generated with SQL (``bench/sql/history_functions.sql``), the p50/p99 of the audit feed
of one execution, of enqueueing a task (the runbook's section 7 insert), claiming it
(``lifecycle.task_claim``) and completing it; and the time of a compensation (lifecycle_v1, stage 4
fails, stages 3..1 undone: ``perform_workflow_compensation`` then each stage's undo as the
compensation job's ops do, without Dagster). Then compensation time against the number of stages
(chains of 5, 50, 500 stages whose last stage fails) on a database without history.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from typing import Any

from psycopg.types.json import Jsonb

from bench.common import (
    CONTEXT,
    QUEUE_AGENT,
    bench_sql,
    chain_dag,
    connect,
    install_definition,
    lifecycle_row,
    noop_registry,
    prepare_app_db,
    summary,
)
from lifecycle_dagster.core.dag import Dag, parse_dag
from lifecycle_dagster.core.retry import resolve_policy
from lifecycle_dagster.engine.compensation import UndoSpec, perform_compensation, run_undo
from lifecycle_dagster.engine.stage import StageFailed, StageSpec, run_stage
from lifecycle_dagster.location.job_factory import DefinitionRow
from lifecycle_dagster.store.db import connect as ld_connect
from lifecycle_dagster.store.sqlfiles import query

EVENTS_PER_EXECUTION = 10


def _descendants(dag: Dag, stage_id: str) -> tuple[str, ...]:
    seen: list[str] = []
    frontier = list(dag.children(stage_id))
    while frontier:
        s = frontier.pop()
        if s not in seen:
            seen.append(s)
            frontier.extend(dag.children(s))
    return tuple(seen)


def specs(row: dict[str, Any]) -> tuple[list[StageSpec], list[UndoSpec]]:
    """The stage and undo specs of a definition row, in topological order (as the jobs build them)."""
    d = DefinitionRow.from_mapping(row)
    dag = parse_dag(d.dag_schema)
    order = dag.topological_order()
    forward = [
        StageSpec(
            definition_id=d.id,
            stage_id=s,
            capability=dag.stage(s).capability,
            ancestors={a: dag.stage(a).capability for a in dag.ancestors(s)},
            policy=resolve_policy(dag, s),
        )
        for s in order
    ]
    undo = [
        UndoSpec(
            stage_id=s,
            capability=dag.stage(s).capability,
            compensate=dag.stage(s).compensate,
            dependents=_descendants(dag, s),
            policy=resolve_policy(dag, s),
        )
        for s in order
    ]
    return forward, undo


def failed_then_compensated(
    dsn: str, row: dict[str, Any], fail_agent: str | None, budget_s: float | None = None
) -> dict[str, float]:
    """Run the stages of ``row`` in order (no Dagster; ``fail_agent`` fails its stage) until one
    fails, then compensate; return the forward and compensation milliseconds and the stages undone.
    With ``budget_s``, compensation stops after that many seconds (``finished`` 0).

    Raises:
        AssertionError: no stage failed, or the execution did not end rolled_back.
    """
    forward, undo = specs(row)
    registry = noop_registry(fail_agent)
    run_id = f"bench-{uuid.uuid4()}"
    execution_id: str | None = None
    t0 = time.perf_counter()
    with ld_connect(dsn) as conn:
        failed = False
        for spec in forward:
            try:
                out = run_stage(
                    conn, spec, run_id=run_id, attempt=1, registry=registry, execution_id=execution_id,
                    context=CONTEXT,
                )  # fmt: skip
                execution_id = out.execution_id
            except StageFailed as exc:
                execution_id = exc.execution_id or execution_id
                failed = True
                break
        assert failed and execution_id, "no stage failed"
        t1 = time.perf_counter()
        perform_compensation(conn, execution_id, "bench: stage failed")
        comp_run = f"bench-comp-{uuid.uuid4()}"
        undone = 0
        for spec_u in reversed(undo):
            if budget_s is not None and time.perf_counter() - t1 > budget_s:
                break
            out_u = run_undo(conn, spec_u, execution_id=execution_id, run_id=comp_run, attempt=1, registry=registry)
            undone += out_u.action == "compensated"
        t2 = time.perf_counter()
        status = conn.execute(query("execution_status"), {"execution_id": execution_id}).fetchone()
    finished = status is not None and status["status"] == "rolled_back"
    assert finished or budget_s is not None, status
    return {
        "forward_ms": (t1 - t0) * 1000.0,
        "compensation_ms": (t2 - t1) * 1000.0,
        "undone": float(undone),
        "finished": float(finished),
    }


def _ms(conn: Any, sql: Any, params: dict[str, Any]) -> tuple[float, Any]:
    t = time.perf_counter()
    rows = conn.execute(sql, params).fetchall()
    return (time.perf_counter() - t) * 1000.0, rows


def measure(dsn: str, queue_definition_id: str, lifecycle: dict[str, Any], samples: int, comps: int) -> dict[str, Any]:
    """Feed, enqueue, claim, complete (ms each) and compensation at the current history size."""
    with connect(dsn) as conn:
        counts = dict(conn.execute(bench_sql("history_counts")).fetchone() or {})
        ids = [r["id"] for r in conn.execute(bench_sql("history_sample"), {"n": samples}).fetchall()]
        feed: list[float] = []
        for eid in ids:
            ms, rows = _ms(conn, query("audit_feed"), {"execution_id": eid})
            assert len(rows) == EVENTS_PER_EXECUTION, (eid, len(rows))
            feed.append(ms)
        plan = [
            r["QUERY PLAN"]
            for r in conn.execute(
                "EXPLAIN (ANALYZE, COSTS OFF, TIMING OFF) " + query("audit_feed"), {"execution_id": ids[0]}
            ).fetchall()
        ][:12]
        live = [
            r["id"]
            for r in conn.execute(
                bench_sql("queue_executions"), {"definition_id": queue_definition_id, "batch": "history", "n": samples}
            ).fetchall()
        ]
        conn.execute(bench_sql("queue_logs"), {"ids": live})
        enqueue: list[float] = []
        claim: list[float] = []
        complete: list[float] = []
        for eid in live:
            ms, rows = _ms(conn, bench_sql("history_enqueue"), {"execution_id": eid})
            enqueue.append(ms)
            ms, claimed = _ms(
                conn, query("task_claim"), {"worker": "bench", "agent": QUEUE_AGENT, "limit": 1, "lease_s": 30.0}
            )
            assert len(claimed) == 1, claimed
            claim.append(ms)
            ms, done = _ms(
                conn,
                query("task_complete"),
                {
                    "task_id": claimed[0]["task_id"],
                    "token": claimed[0]["lease_token"],
                    "output": Jsonb({"summary": "x"}),
                },
            )
            assert done[0]["status"] == "completed", done
            complete.append(ms)
    comp = [failed_then_compensated(dsn, lifecycle, "Realization Agent") for _ in range(comps)]
    return {
        "counts": counts,
        "feed_ms": summary(feed),
        "feed_plan": plan,
        "enqueue_ms": summary(enqueue),
        "claim_ms": summary(claim),
        "complete_ms": summary(complete),
        "compensation_ms": summary([c["compensation_ms"] for c in comp]),
        "forward_ms": summary([c["forward_ms"] for c in comp]),
    }


def grow(dsn: str, definition_id: str, executions: int, chunk: int = 20000) -> float:
    """Add ``executions`` finished executions of history; return the seconds it took (with VACUUM ANALYZE)."""
    t = time.perf_counter()
    left = executions
    with connect(dsn) as conn:
        while left > 0:
            n = min(chunk, left)
            with conn.transaction():
                conn.execute("SELECT bench_generate_history(%(d)s, %(n)s)", {"d": definition_id, "n": n})
            left -= n
        conn.execute("VACUUM ANALYZE workflow_executions, workflow_execution_logs, task_queue, workflow_events")
    return time.perf_counter() - t


def by_stages(dsn: str, sizes: Sequence[int], repeats: int, budget_s: float) -> list[dict[str, Any]]:
    """Compensation (and forward) time of chains of ``sizes`` stages whose last stage fails; a
    compensation still running after ``budget_s`` seconds is stopped (``finished`` false)."""
    out: list[dict[str, Any]] = []
    for n in sizes:
        row = install_definition(dsn, f"bench_chain_{n}", chain_dag(n, fail_last=True))
        got = [failed_then_compensated(dsn, row, None, budget_s) for _ in range(repeats if n < 100 else 1)]
        comp = [g["compensation_ms"] for g in got]
        undone = int(min(g["undone"] for g in got))
        out.append(
            {
                "stages": n,
                "to_undo": n - 1,
                "undone": undone,
                "finished": all(g["finished"] for g in got),
                "compensation_ms": summary(comp),
                "compensation_ms_per_undone_stage": summary(
                    [c / max(1, g["undone"]) for c, g in zip(comp, got, strict=True)]
                ),
                "forward_ms": summary([g["forward_ms"] for g in got]),
            }
        )
        print(
            f"   {n} stages: compensation {out[-1]['compensation_ms']['median']:.0f} ms ({undone} undone)", flush=True
        )
    return out


def _exponent(points: list[dict[str, Any]]) -> float | None:
    """The exponent p of compensation time ~ stages^p between the two largest finished chains."""
    import math

    done = [p for p in points if p["finished"]]
    if len(done) < 2:
        return None
    a, b = done[-2], done[-1]
    return math.log(b["compensation_ms"]["median"] / a["compensation_ms"]["median"]) / math.log(
        b["stages"] / a["stages"]
    )


def run(ctx: Any) -> dict[str, Any]:
    """Run section 3 (see the module docstring); ``ctx`` is the harness context."""
    quick = ctx.quick
    dsn = ctx.cluster.create_db("bench_history")
    prepare_app_db(dsn)
    with connect(dsn) as conn:
        conn.execute(bench_sql("history_functions"))
    queue_def = install_definition(
        dsn,
        "bench_q",
        {"stages": [{"id": "work", "capability": "bench_queue"}], "defaults": {"retry": {"max_attempts": 1}}},
    )
    lifecycle = lifecycle_row(dsn)

    with connect(ctx.admin_dsn) as conn:
        conn.execute("SELECT pg_stat_statements_reset()")
    stages = by_stages(dsn, (5, 50) if quick else (5, 50, 100, 500), 2 if quick else 3, 20.0 if quick else 45.0)
    with connect(ctx.admin_dsn) as conn:
        top = [dict(r) for r in conn.execute(bench_sql("top_statements"), {"db": "bench_history", "limit": 8})]

    levels = (10_000, 50_000) if quick else (10_000, 100_000, 1_000_000)
    samples = 40 if quick else 200
    comps = 2 if quick else 5
    results: list[dict[str, Any]] = []
    have = 0
    for events in levels:
        seconds = grow(dsn, lifecycle["id"], (events - have) // EVENTS_PER_EXECUTION)
        have = events
        level = measure(dsn, queue_def["id"], lifecycle, samples, comps)
        level["history_events"] = events
        level["generate_s"] = seconds
        results.append(level)
        print(
            f"   {events} events: feed p99 {level['feed_ms']['p99']:.2f} ms,"
            f" claim p99 {level['claim_ms']['p99']:.2f} ms,"
            f" compensation {level['compensation_ms']['median']:.0f} ms",
            flush=True,
        )
    with connect(dsn) as conn:
        conn.execute(bench_sql("history_index_fix"))
        conn.execute("ANALYZE task_queue")
    with_index = measure(dsn, queue_def["id"], lifecycle, samples, comps)
    with_index["history_events"] = have
    first, last = results[0], results[-1]
    return {
        "levels": results,
        "largest_with_stage_log_index": with_index,
        "compensation_by_stages": stages,
        "compensation_by_stages_exponent": _exponent(stages),
        "compensation_by_stages_top_statements": top,
        "target_feed_p99_ms": 10,
        "feed_p99_ms_at_largest": last["feed_ms"]["p99"],
        "claim_p99_growth": last["claim_ms"]["p99"] / first["claim_ms"]["p99"],
        "compensation_growth": last["compensation_ms"]["median"] / first["compensation_ms"]["median"],
        "compensation_growth_with_index": with_index["compensation_ms"]["median"] / first["compensation_ms"]["median"],
    }
