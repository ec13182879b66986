"""Section 2, the task queue: throughput of the project's workers (``lifecycle-dagster agent serve``:
:class:`lifecycle_dagster.queue.worker.Worker`, one process each, concurrency 1, a no-op agent) against a
raw ``FOR UPDATE SKIP LOCKED`` claim-and-complete loop on a minimal table (the same number of
processes, the same driver) and ``pgbench -N``, all on the same server; dead tuples and sizes
afterwards; enqueue → pickup latency with LISTEN/NOTIFY and with polling alone.

Each worker cell enqueues its tasks in one transaction, then counts tasks per second from that
commit to the last completion (database clock). The throughput matrix runs with
``synchronous_commit = off`` on its database (both sides alike: the CPU and lock cost of the
statements, independent of how long the shared disk takes to flush), each pair twice,
alternating; a durable cross-check (``synchronous_commit = on``, as deployed) runs 1 and 4 workers.
Pickup latency is measured with durable commits. "Stage tasks" belong to one-stage executions
driven by hand, so completing one completes its stage and execution (what a real queue agent's
task costs); "bare tasks" belong to no execution (the protocol alone).
"""

from __future__ import annotations

import multiprocessing
import os
import random
import re
import subprocess
import time
import uuid
from typing import Any

import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb

from bench.common import QUEUE_AGENT, bench_sql, connect, install_definition, summary
from bench.pg import PG_BIN

WORKER_COUNTS = (1, 2, 4, 8)
#: each (raw, workers) pair of cells is measured this many times, alternating
REPEATS = 2


def _worker_main(dsn: str, ready: Any, stop: Any, listen: bool, poll_s: float) -> None:
    from bench.common import queue_registry
    from lifecycle_dagster.queue.worker import Worker

    worker = Worker(dsn, QUEUE_AGENT, queue_registry(), poll_s=poll_s, listen=listen, lease_s=30.0, grace_s=5.0)
    ready.put(os.getpid())
    worker.run(stop)


def _raw_main(dsn: str, ready: Any, go: Any, out: Any, deadline_s: float) -> None:
    claim, complete = bench_sql("raw_claim"), bench_sql("raw_complete")
    name = f"raw-{os.getpid()}"
    done = 0
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("SELECT 1")
        ready.put(os.getpid())
        go.wait()
        deadline = time.monotonic() + deadline_s
        while time.monotonic() < deadline:
            row = conn.execute(claim, {"worker": name}).fetchone()
            if row is None:
                break
            conn.execute(complete, {"id": row[0], "result": Jsonb({"summary": "noop"})})
            done += 1
    out.put(done)


def _postgres_pids(cluster: Any) -> list[int]:
    import psutil

    root = psutil.Process(_postmaster_pid(cluster))
    return [root.pid, *(p.pid for p in root.children(recursive=True))]


def _postmaster_pid(cluster: Any) -> int:
    return int((cluster.data / "postmaster.pid").read_text().split()[0])


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds of the processes still alive among ``pids``."""
    import psutil

    total = 0.0
    for pid in pids:
        try:
            t = psutil.Process(pid).cpu_times()
            total += t.user + t.system
        except psutil.Error:
            continue
    return total


class Workers:
    """``n`` worker processes, started and ready; ``stop()`` ends them."""

    def __init__(self, dsn: str, n: int, *, listen: bool = True, poll_s: float = 1.0) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.stop_event = ctx.Event()
        ready = ctx.Queue()
        self.procs = [
            ctx.Process(target=_worker_main, args=(dsn, ready, self.stop_event, listen, poll_s)) for _ in range(n)
        ]
        for p in self.procs:
            p.start()
        for _ in self.procs:
            ready.get(timeout=120)
        time.sleep(1.0)  # each has listened and found the queue empty

    def stop(self) -> None:
        self.stop_event.set()
        for p in self.procs:
            p.join(30)
            if p.is_alive():
                p.kill()


def _db_now(conn: psycopg.Connection[Any]) -> Any:
    row = conn.execute("SELECT clock_timestamp() AS t").fetchone()
    assert row is not None
    return row["t"]


def _wait_drained(conn: psycopg.Connection[Any], deadline_s: float) -> None:
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        row = conn.execute(bench_sql("queue_open")).fetchone()
        if row is not None and row["open"] == 0:
            return
        time.sleep(0.1)


def worker_cell(
    dsn: str, definition_id: str, workers: int, n: int, kind: str, deadline_s: float, cluster: Any = None
) -> dict[str, Any]:
    """Tasks per second of ``workers`` worker processes over ``n`` tasks of ``kind`` (stage, bare);
    with ``cluster``, also CPU ms per task in the workers and in Postgres."""
    batch = uuid.uuid4().hex[:12]
    pool = Workers(dsn, workers)
    worker_pids = [p.pid for p in pool.procs if p.pid is not None]
    pg_pids = _postgres_pids(cluster) if cluster is not None else []
    cpu0 = (cpu_seconds(worker_pids), cpu_seconds(pg_pids))
    try:
        with connect(dsn) as conn:
            ids: list[Any] = []
            if kind == "stage":
                rows = conn.execute(
                    bench_sql("queue_executions"), {"definition_id": definition_id, "batch": batch, "n": n}
                ).fetchall()
                ids = [r["id"] for r in rows]
                conn.execute(bench_sql("queue_logs"), {"ids": ids})
                conn.execute(bench_sql("queue_enqueue_stage"), {"ids": ids, "batch": batch})
            else:
                conn.execute(bench_sql("queue_enqueue_bare"), {"n": n, "batch": batch}).fetchall()
            t0 = _db_now(conn)
            _wait_drained(conn, deadline_s)
            row = conn.execute(bench_sql("queue_batch_done"), {"batch": batch}).fetchone()
            assert row is not None
            t_end = _db_now(conn)
        cpu1 = (cpu_seconds(worker_pids), cpu_seconds(_postgres_pids(cluster) if cluster is not None else []))
    finally:
        pool.stop()
        with connect(dsn) as conn:
            conn.execute(bench_sql("queue_cancel_open"))
    done = int(row["done"])
    last = row["last"] if done == n else t_end
    elapsed = max(1e-6, (last - t0).total_seconds())
    cell = {
        "workers": workers,
        "kind": kind,
        "tasks": n,
        "done": done,
        "seconds": elapsed,
        "rate_per_s": done / elapsed,
    }
    if cluster is not None and done:
        cell["worker_cpu_ms_per_task"] = (cpu1[0] - cpu0[0]) * 1000.0 / done
        cell["postgres_cpu_ms_per_task"] = (cpu1[1] - cpu0[1]) * 1000.0 / done  # new backends: lower bound
    return cell


def raw_cell(dsn: str, procs: int, n: int, deadline_s: float) -> dict[str, Any]:
    """Rows per second of ``procs`` raw claim-and-complete loops over ``n`` rows."""
    batch = uuid.uuid4().hex[:12]
    ctx = multiprocessing.get_context("spawn")
    ready, out, go = ctx.Queue(), ctx.Queue(), ctx.Event()
    with connect(dsn) as conn:
        conn.execute(bench_sql("raw_fill"), {"n": n, "batch": batch})
        ps = [ctx.Process(target=_raw_main, args=(dsn, ready, go, out, deadline_s)) for _ in range(procs)]
        for p in ps:
            p.start()
        for _ in ps:
            ready.get(timeout=120)
        t0 = _db_now(conn)
        go.set()
        total = sum(int(out.get(timeout=deadline_s + 60)) for _ in ps)
        for p in ps:
            p.join(30)
        row = conn.execute(bench_sql("raw_batch_done"), {"batch": batch}).fetchone()
        assert row is not None
        conn.execute("DELETE FROM bench_raw_queue WHERE status <> 'completed'")
    elapsed = max(1e-6, (row["last"] - t0).total_seconds())
    return {
        "workers": procs,
        "kind": "raw",
        "tasks": n,
        "done": total,
        "seconds": elapsed,
        "rate_per_s": total / elapsed,
    }


def pgbench(cluster: Any, clients: int, seconds: int) -> dict[str, Any]:
    """``pgbench -N`` (simple updates) on database bench_pgbench: transactions per second."""
    cmd = [str(PG_BIN / "pgbench"), "-h", "127.0.0.1", "-p", str(cluster.port), "-U", "postgres", "-n", "-N",
           "-c", str(clients), "-j", str(min(clients, 2)), "-T", str(seconds), "bench_pgbench"]  # fmt: skip
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    m = re.search(r"tps = ([0-9.]+) \(without initial connection time\)", out)
    return {"clients": clients, "seconds": seconds, "tps": float(m.group(1)) if m else None}


def pickup_latency(dsn: str, n: int, *, listen: bool, gap_s: tuple[float, float]) -> dict[str, Any]:
    """Enqueue → claim (``started_at - created_at``, ms) of ``n`` tasks enqueued one at a time, each
    after the previous one was completed plus a random gap, with one worker (LISTEN or polling
    every 1 s, the ``agent serve`` default)."""
    pool = Workers(dsn, 1, listen=listen, poll_s=1.0)
    latencies: list[float] = []
    try:
        with connect(dsn) as conn, psycopg.connect(dsn, autocommit=True) as done_listener:
            done_listener.execute("LISTEN lifecycle_task_done")
            for _ in range(n):
                time.sleep(random.uniform(*gap_s))
                [task] = conn.execute(bench_sql("queue_enqueue_bare"), {"n": 1, "batch": "latency"}).fetchall()
                deadline = time.monotonic() + 5.0
                while time.monotonic() < deadline:
                    got = [x.payload for x in done_listener.notifies(timeout=0.5, stop_after=1)]
                    if task["id"] in got:
                        break
                row = conn.execute(
                    "SELECT started_at - created_at AS d FROM task_queue WHERE id = %(id)s", {"id": task["id"]}
                ).fetchone()
                if row is not None and row["d"] is not None:
                    latencies.append(row["d"].total_seconds() * 1000.0)
    finally:
        pool.stop()
        with connect(dsn) as conn:
            conn.execute(bench_sql("queue_cancel_open"))
    return {"mode": "listen" if listen else "poll_1s", **summary(latencies), "raw_ms": latencies}


def mean_rates(cells: list[dict[str, Any]]) -> dict[tuple[str, int, str], float]:
    """Mean tasks per second of the repeats of each (kind, workers, commit mode) cell."""
    acc: dict[tuple[str, int, str], list[float]] = {}
    for c in cells:
        acc.setdefault((c["kind"], c["workers"], c["commit"]), []).append(c["rate_per_s"])
    return {k: sum(v) / len(v) for k, v in acc.items()}


def _reset_statements(admin_dsn: str) -> None:
    with connect(admin_dsn) as conn:
        conn.execute("SELECT pg_stat_statements_reset()")


def _top_statements(admin_dsn: str, db: str, per: int) -> list[dict[str, Any]]:
    """The 10 statements of ``db`` with the most execution time (nested included), per task."""
    with connect(admin_dsn) as conn:
        rows = conn.execute(bench_sql("top_statements"), {"db": db, "limit": 10}).fetchall()
    return [
        {"toplevel": r["toplevel"], "calls_per_task": r["calls"] / per, "ms_per_task": r["ms"] / per, "query": r["q"]}
        for r in rows
    ]


def set_commit_mode(admin_dsn: str, db: str, durable: bool) -> None:
    """``synchronous_commit`` for new connections to ``db`` (of the throwaway cluster): on (durable,
    as deployed: every commit waits for its WAL flush) or off (no flush wait: what the statements
    cost in CPU and locks, whatever the disk is doing)."""
    with connect(admin_dsn) as conn:
        stmt = (
            "ALTER DATABASE {} RESET synchronous_commit"
            if durable
            else "ALTER DATABASE {} SET synchronous_commit = off"
        )
        conn.execute(sql.SQL(stmt).format(sql.Identifier(db)))


def _pair(
    ctx: Any, dsn: str, definition_id: str, w: int, n: int, deadline: float, commit: str, rep: int
) -> list[dict[str, Any]]:
    raw = {**raw_cell(dsn, w, n, deadline), "repeat": rep, "commit": commit}
    stage = worker_cell(dsn, definition_id, w, n, "stage", deadline, cluster=ctx.cluster)
    stage.update(repeat=rep, commit=commit)
    print(
        f"   {commit}, {w} workers: raw {raw['rate_per_s']:.0f}/s, agent serve {stage['rate_per_s']:.0f}/s", flush=True
    )
    return [raw, stage]


def run(ctx: Any) -> dict[str, Any]:
    """Run section 2 (see the module docstring); ``ctx`` is the harness context."""
    quick = ctx.quick
    dsn = ctx.cluster.create_db("bench_queue")
    from bench.common import prepare_app_db

    prepare_app_db(dsn)
    with connect(dsn) as conn:
        conn.execute(bench_sql("raw_queue"))
    definition = install_definition(
        dsn,
        "bench_q",
        {"stages": [{"id": "work", "capability": "bench_queue"}], "defaults": {"retry": {"max_attempts": 1}}},
    )
    per_worker = 60 if quick else 200
    deadline = 15.0 if quick else 40.0
    counts = (1, 4) if quick else WORKER_COUNTS
    cells: list[dict[str, Any]] = []
    statements: list[dict[str, Any]] = []
    set_commit_mode(ctx.admin_dsn, "bench_queue", durable=False)
    for w in counts:
        for rep in range(REPEATS):  # alternating, so a noisy moment hits both sides alike
            if w == 4 and rep == 0:
                _reset_statements(ctx.admin_dsn)
            cells += _pair(ctx, dsn, definition["id"], w, per_worker * w, deadline, "async", rep)
            if w == 4 and rep == 0:
                statements = _top_statements(ctx.admin_dsn, "bench_queue", cells[-1]["done"])
    bare = worker_cell(dsn, definition["id"], 4, per_worker * 4, "bare", deadline, cluster=ctx.cluster)
    cells.append({**bare, "repeat": 0, "commit": "async"})
    set_commit_mode(ctx.admin_dsn, "bench_queue", durable=True)
    for w in (1, 4):
        cells += _pair(ctx, dsn, definition["id"], w, per_worker * w, deadline, "durable", 0)

    ctx.cluster.create_db("bench_pgbench")
    subprocess.run(
        [str(PG_BIN / "pgbench"), "-h", "127.0.0.1", "-p", str(ctx.cluster.port), "-U", "postgres", "-i", "-q",
         "-s", "2" if quick else "10", "bench_pgbench"],
        check=True, capture_output=True,
    )  # fmt: skip
    bench_runs = []
    for durable in (True, False):
        set_commit_mode(ctx.admin_dsn, "bench_pgbench", durable=durable)
        for c in (1, 4):
            bench_runs.append(
                {**pgbench(ctx.cluster, c, 3 if quick else 5), "commit": "durable" if durable else "async"}
            )

    time.sleep(1.5)  # table statistics are flushed about every second
    with connect(dsn) as conn:
        tables = [dict(r) for r in conn.execute(bench_sql("table_stats")).fetchall()]
    for t in tables:
        t["last_autovacuum"] = t["last_autovacuum"].isoformat() if t["last_autovacuum"] else None

    latency = [  # durable commits, as deployed
        pickup_latency(dsn, 30 if quick else 200, listen=True, gap_s=(0.0, 0.02)),
        pickup_latency(dsn, 6 if quick else 30, listen=False, gap_s=(0.0, 1.0)),
    ]
    rates = mean_rates(cells)

    def ratio(commit: str) -> float:
        return rates.get(("stage", 4, commit), 0.0) / rates.get(("raw", 4, commit), float("nan"))

    return {
        "cells": cells,
        "pgbench": bench_runs,
        "mean_rate_per_s": [
            {"kind": k, "workers": w, "commit": c, "rate_per_s": r} for (k, w, c), r in sorted(rates.items())
        ],
        "four_workers_vs_raw": ratio("async"),
        "four_workers_vs_raw_durable": ratio("durable"),
        "top_statements_per_task_4_workers": statements,
        "target_four_workers_vs_raw": 0.5,
        "tables_after": tables,
        "pickup_latency_ms": latency,
        "target_pickup_ms": {"p50": 10, "p99": 50},
    }
