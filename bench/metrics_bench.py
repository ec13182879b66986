"""The cost of a ``metrics serve`` scrape against the size of the history.

``python -m bench.metrics_bench [--quick] [--out DIR]`` (this project's venv is enough: no plots)
starts its own PostgreSQL 15 cluster (``bench/pg.py``), generates finished history with SQL
(``bench/sql/history_functions.sql``: per execution 5 stage logs, 10 tasks, 10 events; 9 in 10
completed, 1 in 10 rolled back) up to 10k, 100k and 1M events, and at each size measures over
HTTP (``serve_registry`` + httpx, the way Prometheus scrapes):

* the first scrape of a new collector (it reads the whole history once),
* then ``SCRAPES`` scrapes of the same collector (p50/p95/max): each reads the events since the
  previous cutoff plus the last minute's, the executions, breakers and queue;
* each query of a scrape alone (median of 20).

To give the steady scrapes a realistic recent window, the newest ``RECENT_EVENTS`` events are moved
into the last minute (triggers off, as the generator does) and ``PENDING_TASKS`` bare tasks wait in
the queue. Writes ``results.json`` and ``results.md`` into ``--out``
(default ``bench/results/<today>-metrics``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import statistics
import time
from pathlib import Path
from typing import Any

import httpx
from prometheus_client import CollectorRegistry

from bench.common import (
    BENCH_DIR,
    bench_sql,
    connect,
    lifecycle_row,
    load_average,
    machine,
    pct,
    prepare_app_db,
    write_json,
)
from bench.history_bench import EVENTS_PER_EXECUTION, grow
from bench.pg import cluster
from lifecycle_dagster.store.metrics import DURATION_BUCKETS_S, DatabaseCollector, serve_registry
from lifecycle_dagster.store.sqlfiles import query

SCRAPES = 60
RECENT_EVENTS = 3000
PENDING_TASKS = 1000


def _recent_and_pending(dsn: str) -> None:
    """Move the newest events into the last minute; enqueue bare pending tasks."""
    with connect(dsn) as conn, conn.transaction():
        conn.execute(bench_sql("metrics_task_ids"))
        conn.execute(
            'UPDATE workflow_events SET "timestamp" = now() - random() * interval \'50 seconds\''
            " WHERE id > (SELECT max(id) FROM workflow_events) - %(n)s",
            {"n": RECENT_EVENTS},
        )
    with connect(dsn) as conn:
        conn.execute(
            "INSERT INTO task_queue (task_type, capability, input_data)"
            " SELECT 'bench', 'bench_queue', '{}' FROM generate_series(1, %(n)s)",
            {"n": PENDING_TASKS},
        )
        conn.execute("VACUUM ANALYZE workflow_events, task_queue")


def _query_ms(dsn: str) -> dict[str, float]:
    """Median ms of each query of a steady scrape, alone."""
    with connect(dsn) as conn:
        cutoff = conn.execute(query("metrics_clock"), {"settle_s": 60.0}).fetchone()["cutoff"]  # type: ignore[index]
        latest = dt.datetime(9999, 12, 31, tzinfo=dt.UTC)
        window = {"after": cutoff, "until": latest, "bounds": list(DURATION_BUCKETS_S)}
        cases: dict[str, tuple[str, dict[str, Any]]] = {
            "metrics_stage_attempts (last minute)": ("metrics_stage_attempts", window),
            "metrics_lease_expiries (last minute)": ("metrics_lease_expiries", window),
            "metrics_executions": ("metrics_executions", {}),
            "metrics_breakers": ("metrics_breakers", {}),
            "metrics_queue": ("metrics_queue", {}),
        }
        out = {}
        for label, (name, params) in cases.items():
            times = []
            for _ in range(20):
                t = time.perf_counter()
                conn.execute(query(name), params).fetchall()  # type: ignore[arg-type]
                times.append((time.perf_counter() - t) * 1000)
            out[label] = statistics.median(times)
    return out


def measure(dsn: str, scrapes: int) -> dict[str, Any]:
    """First scrape and steady scrapes (ms) of a new collector served over HTTP; query times."""
    collector = DatabaseCollector(dsn)
    registry = CollectorRegistry()
    registry.register(collector)
    server = serve_registry(registry, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.server_port}/metrics"
    try:
        with httpx.Client(timeout=120) as client:
            t = time.perf_counter()
            first = client.get(url)
            first_ms = (time.perf_counter() - t) * 1000
            assert first.status_code == 200, first.text
            steady = []
            for _ in range(scrapes):
                t = time.perf_counter()
                r = client.get(url)
                steady.append((time.perf_counter() - t) * 1000)
                assert r.status_code == 200, r.text
    finally:
        server.shutdown()
        server.server_close()
        collector.close()
    with connect(dsn) as conn:
        counts = conn.execute(
            "SELECT (SELECT count(*) FROM workflow_events) AS events, (SELECT count(*) FROM task_queue) AS tasks,"
            " (SELECT count(*) FROM workflow_executions) AS executions,"
            " (SELECT count(*) FROM workflow_execution_logs) AS stage_logs"
        ).fetchone()
    return {
        "counts": dict(counts or {}),
        "first_scrape_ms": first_ms,
        "scrape_ms": {"p50": pct(steady, 50), "p95": pct(steady, 95), "max": max(steady)},
        "scrape_samples_ms": steady,
        "query_ms": _query_ms(dsn),
        "bytes": len(first.content),
    }


def run(dsn: str, quick: bool) -> dict[str, Any]:
    prepare_app_db(dsn)
    with connect(dsn) as conn:
        conn.execute(bench_sql("history_functions"))
    lifecycle = lifecycle_row(dsn)
    levels = (10_000, 50_000) if quick else (10_000, 100_000, 1_000_000)
    have, results = 0, []
    for events in levels:
        generate_s = grow(dsn, lifecycle["id"], (events - have) // EVENTS_PER_EXECUTION)
        have = events
        _recent_and_pending(dsn)
        level = measure(dsn, 20 if quick else SCRAPES)
        level["history_events"] = events
        level["generate_s"] = generate_s
        results.append(level)
        s = level["scrape_ms"]
        print(
            f"{events} events: first scrape {level['first_scrape_ms']:.0f} ms, then p50 {s['p50']:.1f} ms,"
            f" p95 {s['p95']:.1f} ms",
            flush=True,
        )
    return {"levels": results}


def _markdown(r: dict[str, Any]) -> str:
    lines = [
        f"# metrics serve: scrape cost against history ({r['date']})",
        "",
        f"Machine: {r['machine']}; PostgreSQL {r['postgres']}; load average at start {r['load_average_at_start']},"
        f" at end {r['load_average_at_end']}.",
        f"Each level: the newest {RECENT_EVENTS} events moved into the last minute, {PENDING_TASKS} pending tasks;"
        f" {SCRAPES} steady scrapes over HTTP after the first.",
        "",
        "| events | tasks | executions | first scrape (whole history) | scrape p50 | scrape p95 | scrape max | bytes |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for lv in r["levels"]:
        c, s = lv["counts"], lv["scrape_ms"]
        lines.append(
            f"| {c['events']:,} | {c['tasks']:,} | {c['executions']:,} | {lv['first_scrape_ms']:,.0f} ms |"
            f" {s['p50']:.1f} ms | {s['p95']:.1f} ms | {s['max']:.1f} ms | {lv['bytes']:,} |"
        )
    lines += ["", "Each query of a steady scrape alone, median ms:", "", "| query | " + " | ".join(
        f"{lv['counts']['events']:,} events" for lv in r["levels"]) + " |", "|---|" + "---|" * len(r["levels"])]
    for name in r["levels"][0]["query_ms"]:
        lines.append(f"| `{name}` | " + " | ".join(f"{lv['query_ms'][name]:.2f}" for lv in r["levels"]) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.metrics_bench", description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default=str(BENCH_DIR / "results" / f"{dt.date.today().isoformat()}-metrics"))
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {
        "date": dt.date.today().isoformat(),
        "machine": machine(),
        "load_average_at_start": load_average(),
        "quick": args.quick,
    }
    with cluster() as c:
        results["postgres"] = c.server_version()
        results.update(run(c.create_db("bench_metrics"), args.quick))
    results["load_average_at_end"] = load_average()
    write_json(out / "results.json", results)
    (out / "results.md").write_text(_markdown(results), encoding="utf-8")
    print(f"results in {out}")


if __name__ == "__main__":
    main()
