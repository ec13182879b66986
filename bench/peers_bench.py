"""Section 5, peers: the same 5-stage lifecycle (no-op stages) for lifecycle-dagster, DBOS
Transact and Prefect 3, each against the benchmark's Postgres (DBOS's system database; Prefect's
server database), in executions per second with 1 client and with 4 concurrent client processes;
and the variant where stage 4 fails and stages 1-3 must be undone: how each expresses it and
whether the undo happened (checked in each system's own records).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from bench.common import run_clients
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
