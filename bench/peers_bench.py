"""Section 5, peers: the same 5-stage lifecycle (no-op stages) for lifecycle-dagster, DBOS
Transact and Prefect 3, each against the benchmark's Postgres (DBOS's system database; Prefect's
server database), in executions per second with 1 client and with 4 concurrent client processes;
and the variant where stage 4 fails and stages 1-3 must be undone: how each expresses it and
whether the undo happened (checked in each system's own records).

Then lifecycle-dagster in batch mode (issue 18, ``bench/peers/dagster_batch.py``): 1,000
executions (200 with ``--quick``) inserted as pending rows and run many per Dagster run, in process
(``execute_in_process`` of each batch, one trial per batch size) and under ``dagster-daemon`` with
``LIFECYCLE_DAGSTER_BATCH`` on; executions/s and insert → completed latency, beside DBOS's figures
of the same run; and a profile of one in-process trial at the best size (pyinstrument,
pg_stat_statements, pg_stat_user_functions).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from bench.common import connect, prepare_app_db, run_clients
from bench.peers import dagster_batch
from bench.pg import free_port

EXPRESSED = {
    "lifecycle-dagster": (
        "declared: the DAG's on_failure (compensate, the default) and each stage's compensate capability or its "
        "agent's compensate(); the compensation job undoes completed stages in strict reverse topological order "
        "(enforced by the database), durable in Postgres, started by the failure sensor/reconciler"
    ),
    "dbos": (
        "hand-written: no saga construct; the workflow catches stage 4's error and calls an undo step per "
        "completed stage in reverse; steps are checkpointed, so an interrupted undo resumes on recovery"
    ),
    "prefect": (
        "transaction() around the tasks with an on_rollback hook per task: stage 4's failure rolls the "
        "transaction back and calls the hooks of the completed tasks; the hooks run in the flow's process "
        "and are not recorded as runs (an interrupted rollback is not resumed)"
    ),
}


def prefect_server(ctx: Any) -> tuple[subprocess.Popen[bytes], str, dict[str, str]]:
    """Start ``prefect server start`` on a free port with its database on the benchmark's cluster;
    return the process, its API URL and the environment clients need.

    Raises:
        RuntimeError: the server did not answer its health check within 180 s.
    """
    ctx.cluster.create_db("bench_prefect")
    port = free_port()
    home = ctx.work / "prefect_home"
    home.mkdir(exist_ok=True)
    api = f"http://127.0.0.1:{port}/api"
    client_env = {
        "PREFECT_HOME": str(home),
        "PREFECT_API_URL": api,
        "PREFECT_LOGGING_LEVEL": "CRITICAL",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_LOGGING_TO_API_ENABLED": "false",
    }
    env = {
        **os.environ,
        **client_env,
        "PREFECT_SERVER_DATABASE_CONNECTION_URL": (
            f"postgresql+asyncpg://postgres@127.0.0.1:{ctx.cluster.port}/bench_prefect"
        ),
        "PREFECT_UI_ENABLED": "false",
    }
    env.pop("PREFECT_API_URL")
    log = (ctx.work / "prefect_server.log").open("w")
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{api}/health", timeout=2).status_code == 200:
                return proc, api, client_env
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            break
        time.sleep(1)
    proc.kill()
    raise RuntimeError(f"prefect server did not start; see {ctx.work}/prefect_server.log")


def _system(target: str, counts: dict[str, int], seconds: float, **args: Any) -> dict[str, Any]:
    seq = run_clients(target, 1, counts["seq"], variant="ok", seconds=seconds, **args)
    conc = run_clients(target, 4, counts["conc"], variant="ok", seconds=seconds, **args)
    undo = run_clients(target, 1, counts["undo"], variant="undo", seconds=seconds, **args)
    seq.pop("last_result")
    conc.pop("last_result")
    outcome = undo.pop("last_result")
    return {"sequential": seq, "concurrent_4": conc, "undo": {**undo, "outcome": outcome}}


def run(ctx: Any) -> dict[str, Any]:
    """Run section 5 (see the module docstring); ``ctx`` is the harness context."""
    q = ctx.quick
    seconds = 20.0 if q else 40.0
    out: dict[str, Any] = {"expressed": EXPRESSED, "systems": {}}
    out["systems"]["lifecycle-dagster"] = _system(
        "bench.peers.dagster_client:client",
        {"seq": 4 if q else 20, "conc": 2 if q else 8, "undo": 1 if q else 3},
        seconds,
        app_dsn=ctx.app_dsn,
        dagster_home=str(ctx.dagster_home),
    )
    print("   lifecycle-dagster done", flush=True)
    out["batch"] = batch(ctx)
    print("   lifecycle-dagster batch mode done", flush=True)
    dbos_url = ctx.cluster.create_db("bench_dbos")
    out["systems"]["dbos"] = _system(
        "bench.peers.dbos_client:client",
        {"seq": 20 if q else 100, "conc": 10 if q else 50, "undo": 2 if q else 5},
        seconds,
        dbos_url=dbos_url,
    )
    print("   dbos done", flush=True)
    proc, _api, env = prefect_server(ctx)
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # spawned clients inherit it
    try:
        out["systems"]["prefect"] = _system(
            "bench.peers.prefect_client:client",
            {"seq": 4 if q else 20, "conc": 2 if q else 8, "undo": 1 if q else 3},
            seconds,
        )
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        os.killpg(proc.pid, 15)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
    print("   prefect done", flush=True)
    return out


#: batch mode: executions per trial, the in-process batch sizes tried, the daemon's setting
BATCH_FULL: dict[str, Any] = {"executions": 1000, "sizes": [250, 500, 1000], "daemon": ["500/2", "1000/2"]}
BATCH_QUICK: dict[str, Any] = {"executions": 200, "sizes": [100, 200], "daemon": ["100/2"]}
#: the daemon's sensors (LIFECYCLE_DAGSTER_SENSOR_INTERVAL_S, as the tuned sensors phase and the
#: daemon tests set it) and run queue (dequeue_interval_seconds)
BATCH_SENSOR_INTERVAL_S = 4
BATCH_DEQUEUE_S = 1


def batch(ctx: Any) -> dict[str, Any]:
    """Batch mode (see the module docstring): in process, the profile, then with the daemon."""
    plan = BATCH_QUICK if ctx.quick else BATCH_FULL
    n = int(plan["executions"])
    db = "bench_batch"
    dsn = ctx.cluster.create_db(db)
    prepare_app_db(dsn)
    load = {"before_in_process": os.getloadavg()}
    inproc = dagster_batch.run_in_child(
        "in_process", app_dsn=dsn, dagster_home=str(ctx.dagster_home), pg_data=str(ctx.cluster.data),
        executions=n, sizes=list(plan["sizes"]),
    )  # fmt: skip
    trials = inproc["trials"]
    best = max(trials, key=lambda t: t["rate_per_s"] if t["rate_per_s"] == t["rate_per_s"] else -1.0)
    rates = ", ".join(f"size {t['batch_size']}: {t['rate_per_s']:.1f}/s" for t in trials)
    print(f"   batch in process: {rates}", flush=True)
    load["before_profile"] = os.getloadavg()
    with connect(ctx.admin_dsn) as conn:  # new sessions of the database count function calls
        conn.execute(f"ALTER DATABASE {db} SET track_functions = 'all'")
    profile = dagster_batch.run_in_child(
        "profile_in_process", app_dsn=dsn, dagster_home=str(ctx.dagster_home), admin_dsn=ctx.admin_dsn, db=db,
        executions=n, size=best["batch_size"], out_file=str(ctx.out_dir / "profile_batch.txt"),
    )  # fmt: skip
    with connect(ctx.admin_dsn) as conn:
        conn.execute(f"ALTER DATABASE {db} RESET track_functions")
    daemon = []
    for setting in plan["daemon"]:
        load[f"before_daemon_{setting}"] = os.getloadavg()
        d = dagster_batch.with_daemon(ctx, n, setting, BATCH_SENSOR_INTERVAL_S, BATCH_DEQUEUE_S)
        daemon.append(d)
        figures = f"{d['rate_per_s']:.1f}/s, p99 {d['latency_s']['p99']:.1f} s"
        print(f"   batch with the daemon ({setting}): {figures}", flush=True)
    load["after_daemon"] = os.getloadavg()
    return {
        "executions": n,
        "in_process": {"trials": trials, "best_batch_size": best["batch_size"]},
        "daemon": daemon,
        "profile": profile,
        "load_average": load,
        "target_daemon_p99_s": 30.0,
    }
