"""Section 4, sensors under ``dagster-daemon``: a pending row inserted → its run created (launch
sensor); a run failed → its compensation run created (failure sensor, then the reconciler); run
created → started (the queued run coordinator and the run worker). Two phases, each with its own
daemon and Dagster database: every sensor at 5 s (the launch and failure sensors' previous
default), the shipped defaults (launch and failure sensors 4 s, reconciler 10 s, dequeue every 5 s)
and a tuned deployment (``LIFECYCLE_DAGSTER_SENSOR_INTERVAL_S=4`` for every sensor,
``dequeue_interval_seconds: 1``). Executions use the built-in agents: ``examples/acme.json``
completes, ``examples/globex.json`` fails its integrity stage and is compensated.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml
from psycopg.types.json import Jsonb

from bench.common import REPO, connect, lifecycle_row, prepare_app_db, summary
from lifecycle_dagster.location.instance import prepare_home
from lifecycle_dagster.store.sqlfiles import query

EXECUTION_TAG = "lifecycle/execution_id"
#: the shipped sensor intervals (lifecycle_dagster/location/sensors.py), seconds
DEFAULT_INTERVALS = {"launch": 4, "failure": 4, "reconciler": 10}


@contextlib.contextmanager
def daemon(env: dict[str, str], log_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    """``dagster-daemon run -w workspace.yaml`` from the repository root in its own process group;
    on exit the group gets SIGTERM, then SIGKILL."""
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            [str(Path(sys.executable).parent / "dagster-daemon"), "run", "-w", "workspace.yaml"],
            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        try:
            yield proc
        finally:
            for sig in (signal.SIGTERM, signal.SIGKILL):
                try:
                    os.killpg(proc.pid, sig)
                    proc.wait(20)
                    break
                except (ProcessLookupError, subprocess.TimeoutExpired):
                    continue


def _insert(dsn: str, definition_id: str, context: dict[str, Any]) -> tuple[str, dt.datetime]:
    with connect(dsn) as conn:
        row = conn.execute(
            query("create_execution"), {"definition_id": definition_id, "context": Jsonb(context), "created_by": None}
        ).fetchone()
        assert row is not None
        at = conn.execute("SELECT created_at FROM workflow_executions WHERE id = %(id)s", {"id": row["id"]}).fetchone()
    assert at is not None
    return str(row["id"]), at["created_at"]


def _utc(value: Any) -> float:
    if isinstance(value, dt.datetime):
        return (value if value.tzinfo else value.replace(tzinfo=dt.UTC)).timestamp()
    return float(value)


class Observer:
    """Reads runs and their events from the phase's Dagster instance."""

    def __init__(self, home: Path) -> None:
        import dagster as dg

        self.dg = dg
        self.instance = dg.DagsterInstance.from_config(str(home))

    def runs(self, execution_id: str) -> list[Any]:
        return list(self.instance.get_run_records(self.dg.RunsFilter(tags={EXECUTION_TAG: execution_id})))

    def event_time(self, run_id: str, event: str) -> float | None:
        records = self.instance.get_records_for_run(run_id, of_type=self.dg.DagsterEventType(event), limit=1).records
        return float(records[0].event_log_entry.timestamp) if records else None

    def close(self) -> None:
        self.instance.dispose()


def _wait(cond: Any, timeout_s: float, step: float = 0.5) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(step)
    return False


def phase(
    ctx: Any, dsn: str, key: str, name: str, interval: int | None, dequeue_s: int, launches: int, failures: int
) -> dict[str, Any]:
    """One daemon phase (see the module docstring): ``interval`` sets every sensor's interval
    (``LIFECYCLE_DAGSTER_SENSOR_INTERVAL_S``; None: the shipped defaults); times in seconds."""
    dagster_dsn = ctx.cluster.create_db(f"bench_dagster_{key}")
    home = prepare_home(ctx.work / f"home_{key}", dagster_dsn)
    env = {**os.environ, "DATABASE_URL": dsn, "DAGSTER_HOME": str(home)}
    env.pop("LIFECYCLE_DAGSTER_SENSOR_INTERVAL_S", None)
    if interval is not None:
        env["LIFECYCLE_DAGSTER_SENSOR_INTERVAL_S"] = str(interval)
    if dequeue_s != 5:
        cfg = yaml.safe_load((home / "dagster.yaml").read_text())
        cfg["run_coordinator"]["config"] = {"dequeue_interval_seconds": dequeue_s}
        (home / "dagster.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    definition = lifecycle_row(dsn)["id"]
    acme = json.loads((REPO / "examples" / "acme.json").read_text())
    globex = json.loads((REPO / "examples" / "globex.json").read_text())
    obs = Observer(home)
    plan = ["ok"] * launches + ["fail"] * failures
    random.Random(7).shuffle(plan)
    inserted: list[tuple[str, str, dt.datetime]] = []
    with daemon(env, ctx.work / f"daemon_{key}.log"):
        warm, _ = _insert(dsn, definition, acme)  # the first tick after start initialises sensors
        if not _wait(lambda: bool(obs.runs(warm)), 120):
            raise RuntimeError(f"daemon ({name}): no run for the warm-up execution; see {ctx.work}/daemon_{key}.log")
        for kind in plan:
            eid, at = _insert(dsn, definition, acme if kind == "ok" else globex)
            inserted.append((kind, eid, at))
            time.sleep(random.uniform(2.5, 4.5))  # de-phased against the 5 s daemon loop

        def settled() -> bool:
            for kind, eid, _ in inserted:
                runs = obs.runs(eid)
                if kind == "ok" and not any(r.dagster_run.is_finished for r in runs):
                    return False
                if kind == "fail" and not any(r.dagster_run.job_name.endswith("__compensate") for r in runs):
                    return False
            return True

        _wait(settled, 120, 1.0)
    launch_s, start_s, failure_s, hop1_s, hop2_s = [], [], [], [], []
    missing = 0
    with connect(dsn) as conn:
        for kind, eid, at in inserted:
            runs = obs.runs(eid)
            forward = [r for r in runs if not r.dagster_run.job_name.endswith("__compensate")]
            comp = [r for r in runs if r.dagster_run.job_name.endswith("__compensate")]
            if not forward:
                missing += 1
                continue
            fwd = forward[0]
            created = _utc(fwd.create_timestamp)
            launch_s.append(created - at.timestamp())
            started = obs.event_time(fwd.dagster_run.run_id, "PIPELINE_START")
            if started is not None:
                start_s.append(started - created)
            if kind == "fail":
                failed = obs.event_time(fwd.dagster_run.run_id, "PIPELINE_FAILURE")
                ev = conn.execute(
                    'SELECT min("timestamp") AS t FROM workflow_events'
                    " WHERE execution_id = %(e)s AND event_type = 'workflow_compensating'",
                    {"e": eid},
                ).fetchone()
                if failed is None or not comp:
                    missing += 1
                    continue
                comp_created = _utc(comp[0].create_timestamp)
                failure_s.append(comp_created - failed)
                if ev is not None and ev["t"] is not None:
                    hop1_s.append(ev["t"].timestamp() - failed)
                    hop2_s.append(comp_created - ev["t"].timestamp())
    obs.close()
    launch_interval = interval or DEFAULT_INTERVALS["launch"]
    reconciler_interval = interval or DEFAULT_INTERVALS["reconciler"]
    return {
        "phase": name,
        "sensor_interval_s": launch_interval,
        "failure_sensor_interval_s": interval or DEFAULT_INTERVALS["failure"],
        "reconciler_interval_s": reconciler_interval,
        "dequeue_interval_s": dequeue_s,
        "launches": launches,
        "failures": failures,
        "missing": missing,
        "insert_to_created_s": summary(launch_s),
        "created_to_started_s": summary(start_s),
        "failure_to_compensation_created_s": summary(failure_s),
        "failure_to_compensating_s": summary(hop1_s),
        "compensating_to_run_created_s": summary(hop2_s),
        "target_s": launch_interval + 2,
        # the compensation run is created by the reconciler (after the failure sensor's hop)
        "failure_target_s": reconciler_interval + 2,
        "raw_s": {"insert_to_created": launch_s, "failure_to_compensation_created": failure_s},
    }


def run(ctx: Any) -> dict[str, Any]:
    """Run section 4 (see the module docstring); ``ctx`` is the harness context."""
    dsn = ctx.cluster.create_db("bench_sensors")
    prepare_app_db(dsn)
    launches, failures = (3, 1) if ctx.quick else (5, 2)
    phases = [
        phase(ctx, dsn, "s5", "every sensor 5 s (the previous launch and failure default)", 5, 5, launches, failures),
        phase(ctx, dsn, "default", "shipped defaults", None, 5, launches, failures),
        phase(ctx, dsn, "tuned", "tuned: every sensor 4 s, dequeue 1 s", 4, 1, launches, failures),
    ]
    return {"phases": phases}
