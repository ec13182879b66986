"""Section "retention": claim latency while a large history is pruned (issue 19).

Generates finished history with SQL (``bench/sql/history_functions.sql``: per execution 1 row, 5
stage logs, 10 tasks, 10 events: 26 rows) up to ``--rows`` rows, then runs ``CLAIMERS`` claimer
processes that each claim one pending task at a time (``lifecycle.task_claim``), complete it
(``lifecycle.task_complete``) and enqueue a new one (not timed), for ``BASELINE_S`` seconds
without a prune (the baseline), then while ``lifecycle-dagster prune``'s loop
(:func:`lifecycle_dagster.engine.retention.prune`, batches of 500 executions) removes the whole
history. Reports claim and claim+complete p50/p99/max in both phases, errors, the prune's time and
rows per second.

``python -m bench.retention_bench [--rows 200000] [--out DIR]`` (this project's venv is enough)
starts its own PostgreSQL 15 cluster (``bench/pg.py``); ``bench/run --only retention`` runs it in
the harness at 200k rows (50k with ``--quick``). The 1M-row run: ``python -m bench.retention_bench
--rows 1000000``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import multiprocessing
import time
from pathlib import Path
from typing import Any

from bench.common import BENCH_DIR, QUEUE_AGENT, bench_sql, connect, load_average, machine, pct, write_json
from bench.history_bench import grow

ROWS_PER_EXECUTION = 26
CLAIMERS = 2
BASELINE_S = 15.0
LOCK_TIMEOUT_S = 10


def _claimer(dsn: str, ready: Any, go: Any, stop: Any, out: Any) -> None:
    """Claim, complete, enqueue until ``stop``; put (start, claim ms, claim+complete ms) per task and errors."""
    from lifecycle_dagster.store.db import connect as ld_connect
    from lifecycle_dagster.store.transitions import task_claim, task_complete

    samples: list[tuple[float, float, float]] = []
    errors: list[str] = []
    with ld_connect(dsn) as conn:
        conn.execute(f"SET lock_timeout = '{LOCK_TIMEOUT_S}s'")
        ready.put(1)
        go.wait()
        while not stop.is_set():
            t0 = time.time()
            p0 = time.perf_counter()
            try:
                [task] = task_claim(conn, worker="bench", agent=QUEUE_AGENT, limit=1, lease_s=60)
                p1 = time.perf_counter()
                task_complete(conn, task_id=task.task_id, token=task.lease_token, output={"summary": "noop"})
                p2 = time.perf_counter()
                samples.append((t0, (p1 - p0) * 1000, (p2 - p0) * 1000))
            except Exception as exc:  # counted: the figure that matters is how many
                errors.append(f"{type(exc).__name__}: {exc}")
            conn.execute(bench_sql("queue_enqueue_bare"), {"n": 1, "batch": "retention"}).fetchall()
    out.put({"samples": samples, "errors": errors})


def _phase(samples: list[tuple[float, float, float]], start: float, end: float) -> dict[str, Any]:
    claim = [s[1] for s in samples if start <= s[0] < end]
    both = [s[2] for s in samples if start <= s[0] < end]
    if not claim:
        return {"claims": 0}
    return {
        "claims": len(claim),
        "claims_per_s": len(claim) / (end - start),
        "claim_ms": {"p50": pct(claim, 50), "p99": pct(claim, 99), "max": max(claim)},
        "claim_complete_ms": {"p50": pct(both, 50), "p99": pct(both, 99), "max": max(both)},
    }


def _counts(dsn: str) -> dict[str, int]:
    with connect(dsn) as conn:
        row = conn.execute(
            "SELECT (SELECT count(*) FROM workflow_executions) AS executions,"
            " (SELECT count(*) FROM workflow_execution_logs) AS stage_logs,"
            " (SELECT count(*) FROM task_queue WHERE workflow_execution_id IS NOT NULL) AS tasks,"
            " (SELECT count(*) FROM workflow_events) AS events"
        ).fetchone()
    return dict(row or {})


def measure(dsn: str, rows: int) -> dict[str, Any]:
    """Generate ``rows`` rows of history; baseline claims; claims during the prune (see the module docstring)."""
    from lifecycle_dagster.engine.retention import prune

    with connect(dsn) as conn:
        conn.execute(bench_sql("history_functions"))
        definition = conn.execute("SELECT id FROM workflow_definitions WHERE name = 'lifecycle_v1'").fetchone()
        conn.execute(bench_sql("queue_enqueue_bare"), {"n": 200, "batch": "retention"}).fetchall()
    generate_s = grow(dsn, str(definition["id"]), rows // ROWS_PER_EXECUTION)  # type: ignore[index]
    before_counts = _counts(dsn)
    ctx = multiprocessing.get_context("spawn")
    ready, go, stop, out = ctx.Queue(), ctx.Event(), ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_claimer, args=(dsn, ready, go, stop, out)) for _ in range(CLAIMERS)]
    for p in procs:
        p.start()
    for _ in procs:
        ready.get(timeout=120)
    t0 = time.time()
    go.set()
    time.sleep(BASELINE_S)
    t1 = time.time()
    with connect(dsn) as conn:
        horizon = conn.execute("SELECT now() - interval '1 hour' AS t").fetchone()["t"]  # type: ignore[index]
    report = prune(dsn, horizon)
    t2 = time.time()
    time.sleep(2.0)
    stop.set()
    got = [out.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(30)
    samples = [s for g in got for s in g["samples"]]
    removed = sum(before_counts.values()) - sum(_counts(dsn).values())
    return {
        "history_rows": sum(before_counts.values()),
        "history": before_counts,
        "generate_s": generate_s,
        "baseline": _phase(samples, t0, t1),
        "during_prune": _phase(samples, t1, t2),
        "errors": [e for g in got for e in g["errors"]],
        "prune": {**report.as_json(), "rows_removed": removed, "rows_per_s": removed / max(t2 - t1, 1e-9)},
    }


def run(ctx: Any) -> dict[str, Any]:
    """The harness section (``bench/run --only retention``): 200k rows (50k with --quick)."""
    dsn = ctx.cluster.create_db("bench_retention")
    from bench.common import prepare_app_db

    prepare_app_db(dsn)
    return measure(dsn, 50_000 if ctx.quick else 200_000)


def phase_rows(r: dict[str, Any]) -> list[str]:
    """The Markdown table of both phases and the prune's line (the harness's report uses it too)."""
    p = r["prune"]

    def line(name: str, phase: dict[str, Any]) -> str:
        if not phase.get("claims"):
            return f"| {name} | 0 | | | | | | | |"
        c, cc = phase["claim_ms"], phase["claim_complete_ms"]
        return (
            f"| {name} | {phase['claims']:,} | {phase['claims_per_s']:.0f} | {c['p50']:.2f} | {c['p99']:.2f} |"
            f" {c['max']:.1f} | {cc['p50']:.2f} | {cc['p99']:.2f} | {cc['max']:.1f} |"
        )

    return [
        f"History: {r['history_rows']:,} rows ({r['history']}), generated in {r['generate_s']:.0f} s."
        f" {CLAIMERS} claimer processes (claim one, complete it, enqueue one); baseline {BASELINE_S:.0f} s"
        " without a prune, then while the prune (batches of 500 executions) removes the whole history.",
        "",
        "| phase | claims | claims/s | claim p50 ms | claim p99 ms | claim max ms | claim+complete p50 ms"
        " | claim+complete p99 ms | claim+complete max ms |",
        "|---|---|---|---|---|---|---|---|---|",
        line("baseline", r["baseline"]),
        line("during prune", r["during_prune"]),
        "",
        f"Prune: {p['executions']:,} executions, {p['rows_removed']:,} rows in {p['seconds']:.1f} s"
        f" ({p['rows_per_s']:,.0f} rows/s, {p['batches']} batches); claim errors: {len(r['errors'])}.",
    ]


def markdown(r: dict[str, Any]) -> str:
    """The results as a short Markdown report."""
    head = [
        f"# retention: claims while pruning ({r['date']})",
        "",
        f"Machine: {r['machine']}; PostgreSQL {r['postgres']}; load average at start"
        f" {r['load_average_at_start']}, at end {r['load_average_at_end']}.",
    ]
    return "\n".join([*head, *phase_rows(r), ""])


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.retention_bench", description=__doc__)
    parser.add_argument("--rows", type=int, default=200_000, help="rows of history to generate and prune")
    parser.add_argument("--out", default=str(BENCH_DIR / "results" / f"{dt.date.today().isoformat()}-retention"))
    args = parser.parse_args()
    from bench.common import prepare_app_db
    from bench.pg import cluster

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {
        "date": dt.date.today().isoformat(),
        "machine": machine(),
        "load_average_at_start": load_average(),
    }
    with cluster() as c:
        results["postgres"] = c.server_version()
        dsn = c.create_db("bench_retention")
        prepare_app_db(dsn)
        results.update(measure(dsn, args.rows))
    results["load_average_at_end"] = load_average()
    write_json(out / "results.json", results)
    (out / "results.md").write_text(markdown(results), encoding="utf-8")
    print(markdown(results))


if __name__ == "__main__":
    main()
