"""Time the lifecycle (lifecycle_v1 on examples/acme_run.yaml) under each executor, as
`dagster job execute -m lifecycle_dagster` runs it: the command's wall time and the run's own
duration (RUN_START to its end, from the Dagster instance). Celery: a redis-server and two workers
(solo pool) started here. Prints a Markdown table (docs/deploy.md holds one).

    DATABASE_URL=postgresql://postgres@127.0.0.1:5432/postgres python scripts/executor_timings.py [RUNS]

DATABASE_URL names a server where a scratch database is created and dropped (it needs CREATE
DATABASE); /usr/bin/redis-server must exist.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import psycopg
from psycopg import conninfo, sql

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _db(server: str, name: str) -> str:
    params = conninfo.conninfo_to_dict(server)
    params["dbname"] = name
    return conninfo.make_conninfo(**params)  # type: ignore[arg-type]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


#: the command timed, from the repository root
EXECUTE = ["dagster", "job", "execute", "-m", "lifecycle_dagster", "-j", "lifecycle_v1__v1",
           "-c", "examples/acme_run.yaml"]
#: a Celery worker (its name added)
WORKER = ["celery", "-A", "lifecycle_dagster.location.celery_app", "worker", "--pool", "solo", "-l", "INFO"]


def _time_runs(env: dict[str, str], runs: int) -> list[tuple[float, float]]:
    """(wall s, run s) of each run."""
    from dagster import DagsterInstance

    out = []
    for _ in range(runs):
        t0 = time.monotonic()
        proc = subprocess.run(
            [str(BIN / EXECUTE[0]), *EXECUTE[1:]],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
        )
        wall = time.monotonic() - t0
        assert proc.returncode == 0, proc.stderr[-3000:]
        with DagsterInstance.from_config(env["DAGSTER_HOME"]) as instance:
            [record] = instance.get_run_records(limit=1)
            run_s = (record.end_time or 0) - (record.start_time or 0)
        out.append((wall, run_s))
    return out


def main(runs: int) -> None:
    from lifecycle_dagster.location.instance import prepare_home
    from lifecycle_dagster.store import migrate
    from lifecycle_dagster.store.db import connect
    from lifecycle_dagster.store.sqlfiles import seed_sql

    server = os.environ["DATABASE_URL"]
    name = f"ld_timings_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(server, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    dsn = _db(server, name)
    root = Path(tempfile.mkdtemp(prefix="ld-timings-"))
    procs: list[subprocess.Popen[bytes]] = []
    try:
        migrate.upgrade(dsn)
        with connect(dsn) as conn:
            conn.execute(seed_sql())
        home = prepare_home(root / "home", dsn)
        base = {**os.environ, "DATABASE_URL": dsn, "DAGSTER_HOME": str(home)}
        print(f"lifecycle_v1, {runs} runs each: median (min-max), seconds")
        print("| executor | `dagster job execute` wall | the run (RUN_START to end) |")
        print("|---|---|---|", flush=True)
        for executor in ("in_process", "multiprocess", "celery"):
            env = {**base, "LIFECYCLE_DAGSTER_EXECUTOR": executor}
            if executor == "celery":
                port = _port()
                env["LIFECYCLE_DAGSTER_CELERY_BROKER"] = f"redis://127.0.0.1:{port}/0"
                env["LIFECYCLE_DAGSTER_CELERY_BACKEND"] = f"redis://127.0.0.1:{port}/1"
                procs.append(
                    subprocess.Popen(
                        ["/usr/bin/redis-server", "--port", str(port), "--save", "", "--appendonly", "no"],
                        stdout=subprocess.DEVNULL,
                        start_new_session=True,
                    )
                )
                for w in ("w1", "w2"):
                    (root / w).mkdir()
                    log = (root / w / "worker.log").open("w")
                    procs.append(
                        subprocess.Popen(
                            [str(BIN / WORKER[0]), *WORKER[1:], "--without-mingle", "-n", f"{w}@%h"],
                            cwd=root / w,
                            env=env,
                            stdout=log,
                            stderr=subprocess.STDOUT,
                            start_new_session=True,
                        )
                    )
                for w in ("w1", "w2"):
                    while " ready." not in (root / w / "worker.log").read_text():
                        time.sleep(0.2)
            timed = _time_runs(env, runs)
            walls, run_s = [t[0] for t in timed], [t[1] for t in timed]
            print(
                f"| `{executor}` | {statistics.median(walls):.1f} ({min(walls):.1f}-{max(walls):.1f}) "
                f"| {statistics.median(run_s):.1f} ({min(run_s):.1f}-{max(run_s):.1f}) |",
                flush=True,
            )
    finally:
        for p in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
            p.wait()
        with psycopg.connect(server, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 3)
