"""lifecycle-dagster in batch mode (docs/batches.md, issue 18): the same 5-stage no-op lifecycle as
the other peers, many executions per Dagster run.

In process (:func:`in_process`, run in a spawned child by :func:`run_in_child`): ``n`` executions
inserted as pending rows, grouped into batches of at most ``size`` with ``lifecycle.batch_form``
(``max_wait_s`` 0: every pending row is taken at once), and each batch run with
``execute_in_process`` of the lifecycle job (tag ``lifecycle/batch``) on the bench's
dagster-postgres instance, one after the other. With the daemon (:func:`with_daemon`): the real
``dagster-daemon`` and code location with ``LIFECYCLE_DAGSTER_BATCH`` on; ``n`` pending rows
inserted in one transaction; the launch sensor forms the batches and launches their runs.

Figures: executions/s = ``n`` / (first insert → last completion) and each row's latency from its
insert (``created_at``) to its completion. A completion's time is the commit time of its
``workflow_completed`` event (``pg_xact_commit_timestamp``: the cluster runs with
``track_commit_timestamp``): the event's own ``timestamp`` is ``now()`` of the statement that
recorded the last stage, which for a batch is the start of one statement recording every member
(reported too, as ``latency_event_ts_s``).

:func:`profile_in_process` runs one more in-process trial under pyinstrument with
``pg_stat_statements`` and ``pg_stat_user_functions`` (``track_functions = 'all'``) reset first:
where the time of a batch run goes.
"""

from __future__ import annotations

import datetime as dt
import math
import multiprocessing
import os
import queue
import time
from pathlib import Path
from typing import Any

from psycopg.types.json import Jsonb

from bench.common import CONTEXT, bench_sql, connect, lifecycle_row, noop_registry, summary

QUIET: dict[str, Any] = {"loggers": {"console": {"config": {"log_level": "CRITICAL"}}}}

ROWS_SQL = """
SELECT e.id::text AS id, e.status, e.created_at, ev."timestamp" AS event_at, {committed} AS committed_at
FROM workflow_executions e
LEFT JOIN workflow_events ev ON ev.execution_id = e.id AND ev.event_type = 'workflow_completed'
WHERE e.id = ANY(%(ids)s::uuid[])
"""


# -- shared --------------------------------------------------------------------------------------
def _ts(v: Any) -> float:
    return float(v.timestamp()) if isinstance(v, dt.datetime) else math.nan


def insert_pending(dsn: str, definition_id: str, n: int, *, one_transaction: bool = False) -> list[str]:
    """Insert ``n`` pending executions of the no-op lifecycle (``create_execution``, pipelined);
    return their ids. ``one_transaction``: all in one transaction (inserted "at once")."""
    from lifecycle_dagster.store.sqlfiles import query

    params = [{"definition_id": definition_id, "context": Jsonb(CONTEXT), "created_by": None}] * n
    ids: list[str] = []
    with connect(dsn) as conn:
        tx = conn.transaction() if one_transaction else None
        if tx is not None:
            tx.__enter__()
        with conn.cursor() as cur:
            cur.executemany(query("create_execution"), params, returning=True)
            while True:
                row = cur.fetchone()
                if row is not None:
                    ids.append(str(row["id"]))
                if not cur.nextset():
                    break
        if tx is not None:
            tx.__exit__(None, None, None)
    assert len(ids) == n, (len(ids), n)
    return ids


def completion_figures(dsn: str, ids: list[str], end_s: float | None = None) -> dict[str, Any]:
    """The figures of executions ``ids`` (see the module docstring); ``end_s``: when the caller saw
    the last run end (epoch seconds), reported beside them."""
    with connect(dsn) as conn:
        on = conn.execute("SHOW track_commit_timestamp").fetchone()
        committed = "pg_xact_commit_timestamp(ev.xmin)" if on and on["track_commit_timestamp"] == "on" else "NULL"
        rows = conn.execute(ROWS_SQL.format(committed=committed), {"ids": ids}).fetchall()
    statuses: dict[str, int] = {}
    lat: list[float] = []
    lat_event: list[float] = []
    created = [_ts(r["created_at"]) for r in rows]
    done: list[float] = []
    for r in rows:
        statuses[r["status"]] = statuses.get(r["status"], 0) + 1
        if r["status"] != "completed" or r["event_at"] is None:
            continue
        at = _ts(r["committed_at"]) if r["committed_at"] is not None else _ts(r["event_at"])
        done.append(at)
        lat.append(at - _ts(r["created_at"]))
        lat_event.append(_ts(r["event_at"]) - _ts(r["created_at"]))
    first = min(created) if created else math.nan
    last = max(done) if done else math.nan
    wall = last - first
    return {
        "executions": len(ids),
        "completed": len(done),
        "statuses": statuses,
        "wall_s": wall,
        "rate_per_s": len(done) / wall if wall > 0 else math.nan,
        "latency_s": summary(lat),
        "latency_event_ts_s": summary(lat_event),
        "completion_time": "commit" if committed != "NULL" else "event timestamp",
        "first_insert_to_last_run_end_s": (end_s - first) if end_s is not None else None,
        "raw_latency_s": lat,
    }


# -- in process ----------------------------------------------------------------------------------
class InProcess:
    """The lifecycle job, its no-op agents and the Dagster instance of one child process."""

    def __init__(self, app_dsn: str, dagster_home: str) -> None:
        os.environ["DATABASE_URL"] = app_dsn
        os.environ["DAGSTER_HOME"] = dagster_home
        import dagster as dg

        from lifecycle_dagster.location.job_factory import BATCH_TAG, build_job
        from lifecycle_dagster.location.resources import agents_resource

        self.dsn = app_dsn
        self.tag = BATCH_TAG
        self.instance = dg.DagsterInstance.from_config(dagster_home)
        self.row = lifecycle_row(app_dsn)
        self.job = build_job(self.row)
        self.resources = {"lifecycle_agents": agents_resource(noop_registry())}

    def form(self, size: int) -> list[Any]:
        """Every pending row grouped into batches of at most ``size`` (``lifecycle.batch_form``)."""
        from lifecycle_dagster.store.transitions import batch_form

        out = []
        with connect(self.dsn) as conn:
            while (b := batch_form(conn, definition_id=self.row["id"], max_executions=size, max_wait_s=0)) is not None:
                out.append(b)
        return out

    def run_batch(self, batch_id: str) -> int:
        """Run one batch; return how many of its steps were retried (a stage op whose statement
        failed with an OperationalError, e.g. a deadlock, runs its stage again)."""
        import dagster as dg

        res = self.job.execute_in_process(
            instance=self.instance, run_config=QUIET, resources=self.resources, tags={self.tag: batch_id}
        )
        assert res.success, f"batch run {res.run_id} failed"
        return sum(1 for e in res.all_events if e.event_type == dg.DagsterEventType.STEP_UP_FOR_RETRY)

    def trial(self, n: int, size: int) -> dict[str, Any]:
        """Insert ``n`` pending rows, form batches of at most ``size``, run them one after the other."""
        ids = insert_pending(self.dsn, self.row["id"], n)
        t_formed = time.time()
        batches = self.form(size)
        t_form = time.time() - t_formed
        runs_s = []
        retries = 0
        for b in batches:
            t = time.perf_counter()
            retries += self.run_batch(b.id)
            runs_s.append(time.perf_counter() - t)
        end = time.time()
        fig = completion_figures(self.dsn, ids, end)
        return {
            "batch_size": size,
            "batches": [b.size for b in batches],
            "form_s": t_form,
            "run_s": runs_s,
            "step_retries": retries,
            **fig,
        }


def _pg_cpu(pg_data: str) -> dict[int, float]:
    """User + system CPU seconds of each process of the cluster (the postmaster and its children)."""
    import psutil

    root = psutil.Process(int((Path(pg_data) / "postmaster.pid").read_text().split()[0]))
    out: dict[int, float] = {}
    for p in (root, *root.children(recursive=True)):
        try:
            t = p.cpu_times()
            out[p.pid] = t.user + t.system
        except psutil.Error:
            continue
    return out


def _pg_cpu_delta(before: dict[int, float], after: dict[int, float]) -> float:
    """CPU seconds the cluster spent between two :func:`_pg_cpu` readings: processes alive at both
    count their difference, new ones all of theirs; ones that ended meanwhile are lost (a lower bound)."""
    return sum(v - before.get(pid, 0.0) for pid, v in after.items())


def in_process(
    app_dsn: str, dagster_home: str, pg_data: str, executions: int, sizes: list[int], warmup: int = 5
) -> dict[str, Any]:
    """One trial per batch size in ``sizes`` (each ``executions`` rows), after a warm-up batch of
    ``warmup`` rows; CPU seconds of this process and of the Postgres cluster per trial."""
    import psutil

    me = psutil.Process()
    job = InProcess(app_dsn, dagster_home)
    job.trial(warmup, warmup)  # imports, Dagster's caches, the run's connections
    trials = []
    for size in sizes:
        c0 = (me.cpu_times(), _pg_cpu(pg_data))
        t = job.trial(executions, size)
        c1 = (me.cpu_times(), _pg_cpu(pg_data))
        t["client_cpu_s"] = (c1[0].user + c1[0].system) - (c0[0].user + c0[0].system)
        t["postgres_cpu_s"] = _pg_cpu_delta(c0[1], c1[1])
        trials.append(t)
    job.instance.dispose()
    return {"trials": trials}


def profile_in_process(
    app_dsn: str, dagster_home: str, admin_dsn: str, db: str, executions: int, size: int, out_file: str
) -> dict[str, Any]:
    """One trial (``executions`` rows, batches of ``size``) under pyinstrument, with
    pg_stat_statements and the database's function statistics reset after the warm-up (the caller
    set ``track_functions = 'all'`` on the database). Writes pyinstrument's text to ``out_file``."""
    from pyinstrument import Profiler

    from bench.overhead_bench import _split

    job = InProcess(app_dsn, dagster_home)
    job.trial(5, 5)
    with connect(admin_dsn) as conn:
        conn.execute("SELECT pg_stat_statements_reset()")
    with connect(app_dsn) as conn:
        conn.execute("SELECT pg_stat_reset()")
    profiler = Profiler(interval=0.001)
    profiler.start()
    fig = job.trial(executions, size)
    profiler.stop()
    Path(out_file).write_text(profiler.output_text(unicode=False, color=False, show_all=False), encoding="utf-8")
    split = {k: v for k, v in _split(profiler).items()}
    time.sleep(0.6)  # function statistics reach the collector when a backend goes idle (500 ms)
    with connect(admin_dsn) as conn:
        top = conn.execute(bench_sql("top_statements"), {"db": db, "limit": 15}).fetchall()
        totals = conn.execute(
            "SELECT d.datname AS db, sum(s.calls) FILTER (WHERE s.toplevel) AS round_trips, sum(s.calls) AS calls,"
            " sum(s.total_exec_time) FILTER (WHERE s.toplevel) AS exec_ms"
            " FROM pg_stat_statements s JOIN pg_database d ON d.oid = s.dbid GROUP BY d.datname ORDER BY 4 DESC"
        ).fetchall()
    with connect(app_dsn) as conn:
        funcs = conn.execute(
            "SELECT schemaname || '.' || funcname AS function, calls, total_time AS total_ms, self_time AS self_ms"
            " FROM pg_stat_user_functions ORDER BY self_time DESC LIMIT 20"
        ).fetchall()
    job.instance.dispose()
    fig.pop("raw_latency_s", None)
    return {
        "executions": executions,
        "batch_size": size,
        "trial": fig,
        "profile_s": split,
        "top_statements": [
            {"toplevel": r["toplevel"], "calls": r["calls"], "ms": r["ms"], "query": r["q"]} for r in top
        ],
        "statements_by_db": [
            {k: (float(v) if k != "db" and v is not None else v) for k, v in r.items()} for r in totals
        ],
        "functions_by_self_time": [dict(r) for r in funcs],
    }


def _child(target: str, kwargs: dict[str, Any], out: Any) -> None:
    try:
        out.put({"ok": globals()[target](**kwargs)})
    except BaseException as exc:  # reported to the parent, which raises
        import traceback

        out.put({"error": f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"})


def run_in_child(target: str, timeout_s: float = 1800, **kwargs: Any) -> dict[str, Any]:
    """``target(**kwargs)`` (a function of this module) in a spawned process; its result.

    Raises:
        RuntimeError: it failed (its traceback in the message) or gave nothing in ``timeout_s``.
    """
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    proc = ctx.Process(target=_child, args=(target, kwargs, out))
    proc.start()
    deadline = time.monotonic() + timeout_s
    got: dict[str, Any] | None = None
    try:
        while got is None:
            try:
                got = out.get(timeout=5)
            except queue.Empty:
                if not proc.is_alive():
                    raise RuntimeError(f"{target}: the child process ended (exit code {proc.exitcode})") from None
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{target}: no result within {timeout_s:g} s") from None
    finally:
        proc.join(60)
        if proc.is_alive():
            proc.kill()
    if "error" in got:
        raise RuntimeError(f"{target}: {got['error']}")
    return dict(got["ok"])


# -- with the daemon -----------------------------------------------------------------------------
class ActivitySampler:
    """Samples, every ``every_s`` seconds in a thread, what the active backends of database ``db``
    do (``pg_stat_activity``: the statement's start, and its wait event or "CPU"); :meth:`stop`
    returns the counts, most frequent first: where the database's time goes."""

    SQL = (
        "SELECT left(regexp_replace(query, '\\s+', ' ', 'g'), 60) AS q,"
        " coalesce(wait_event_type || ':' || wait_event, 'CPU') AS w"
        " FROM pg_stat_activity WHERE datname = %(db)s AND state = 'active' AND pid <> pg_backend_pid()"
    )

    def __init__(self, admin_dsn: str, db: str, every_s: float = 0.1) -> None:
        import threading

        self.counts: dict[tuple[str, str], int] = {}
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(admin_dsn, db, every_s), daemon=True)
        self._thread.start()

    def _run(self, admin_dsn: str, db: str, every_s: float) -> None:
        with connect(admin_dsn) as conn:
            while not self._stop.is_set():
                for r in conn.execute(self.SQL, {"db": db}).fetchall():
                    key = (r["q"], r["w"])
                    self.counts[key] = self.counts.get(key, 0) + 1
                self.samples += 1
                self._stop.wait(every_s)

    def stop(self, top: int = 12) -> dict[str, Any]:
        self._stop.set()
        self._thread.join(10)
        rows = sorted(self.counts.items(), key=lambda kv: -kv[1])[:top]
        return {
            "samples": self.samples,
            "top": [{"statement": q, "wait": w, "samples": n} for (q, w), n in rows],
        }


def with_daemon(ctx: Any, executions: int, batch: str, interval_s: int, dequeue_s: int) -> dict[str, Any]:
    """The daemon run (see the module docstring): its own application and Dagster databases,
    ``LIFECYCLE_DAGSTER_BATCH=batch``, every sensor at ``interval_s``, the run queue dequeued every
    ``dequeue_s`` seconds; a warm-up execution first, then ``executions`` rows in one transaction."""
    import yaml

    from bench.common import REPO, prepare_app_db
    from bench.pg import db_name
    from bench.sensors_bench import Observer, _utc, daemon
    from lifecycle_dagster.location.instance import prepare_home

    key = batch.replace("/", "_").replace(".", "_")
    dsn = ctx.cluster.create_db(f"bench_batch_daemon_{key}")
    prepare_app_db(dsn)
    home = prepare_home(ctx.work / f"home_batch_daemon_{key}", ctx.cluster.create_db(f"bench_dagster_batch_{key}"))
    cfg = yaml.safe_load((home / "dagster.yaml").read_text())
    cfg["run_coordinator"]["config"] = {"dequeue_interval_seconds": dequeue_s}
    (home / "dagster.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    env = {
        **os.environ,
        "DATABASE_URL": dsn,
        "DAGSTER_HOME": str(home),
        "LIFECYCLE_DAGSTER_BATCH": batch,
        "LIFECYCLE_DAGSTER_SENSOR_INTERVAL_S": str(interval_s),
        "LIFECYCLE_DAGSTER_AGENTS": "bench.common:noop_registry",
        "PYTHONPATH": os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]),
    }
    definition = lifecycle_row(dsn)["id"]
    log = ctx.work / f"daemon_batch_{key}.log"

    def completed(ids: list[str]) -> int:
        with connect(dsn) as conn:
            row = conn.execute(
                "SELECT count(*) AS n FROM workflow_executions WHERE id = ANY(%(ids)s::uuid[])"
                " AND status NOT IN ('pending', 'in_progress')",
                {"ids": ids},
            ).fetchone()
        return int(row["n"]) if row else 0

    def wait_done(ids: list[str], timeout_s: float) -> float | None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if completed(ids) == len(ids):
                return time.time()
            time.sleep(0.25)
        return None

    obs = Observer(home)
    with daemon(env, log):
        warm = insert_pending(dsn, definition, 1)
        if wait_done(warm, 180) is None:
            raise RuntimeError(f"batch daemon: the warm-up execution did not finish; see {log}")
        sampler = ActivitySampler(ctx.admin_dsn, db_name(dsn))
        ids = insert_pending(dsn, definition, executions, one_transaction=True)
        end = wait_done(ids, 900)
        activity = sampler.stop()
        deadline = time.monotonic() + 120  # the runs end after their last rows: let them, then stop
        while time.monotonic() < deadline and not all(r.is_finished for r in obs.instance.get_runs()):
            time.sleep(0.5)
    fig = completion_figures(dsn, ids, end)
    first = min(_ts_list(dsn, ids))
    import dagster as dg

    runs = []
    for rec in obs.instance.get_run_records():
        tags = rec.dagster_run.tags
        if "lifecycle/batch" not in tags or _utc(rec.create_timestamp) < first:
            continue  # the warm-up's run
        run_id = rec.dagster_run.run_id
        started = obs.event_time(run_id, "PIPELINE_START")
        ended = obs.event_time(run_id, "PIPELINE_SUCCESS") or obs.event_time(run_id, "PIPELINE_FAILURE")
        created = _utc(rec.create_timestamp)
        retries = len(
            obs.instance.get_records_for_run(run_id, of_type=dg.DagsterEventType.STEP_UP_FOR_RETRY, limit=1000).records
        )
        runs.append({
            "size": int(tags.get("lifecycle/batch_size", "0")),
            "status": rec.dagster_run.status.value,
            "step_retries": retries,
            "created_after_insert_s": created - first,
            "created_to_started_s": (started - created) if started else None,
            "started_to_ended_s": (ended - started) if started and ended else None,
        })  # fmt: skip
    obs.close()
    return {
        "batch_setting": batch,
        "sensor_interval_s": interval_s,
        "dequeue_interval_s": dequeue_s,
        "finished": end is not None,
        "database_activity": activity,
        "runs": sorted(runs, key=lambda r: r["created_after_insert_s"]),
        **fig,
    }


def _ts_list(dsn: str, ids: list[str]) -> list[float]:
    with connect(dsn) as conn:
        rows = conn.execute("SELECT created_at FROM workflow_executions WHERE id = ANY(%(ids)s::uuid[])", {"ids": ids})
        return [_ts(r["created_at"]) for r in rows]
