"""Sensors of the code location.

``lifecycle_resume_sensor``: a stage set back to ``pending`` after its run ended (the runbook's
``retry_stage``, or a run that died while waiting to retry) is dispatched again once its
not-before time has passed: the sensor launches a run of the execution's job tagged with the
execution id and ``lifecycle/resume``; that run skips the stages already completed. Run keys
(``resume:<execution>:<stage>:<attempt>``) make each pending attempt launch at most once, however
often the sensor ticks or however many daemons run it.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from typing import Any

import dagster as dg

from lifecycle_dagster.db import connect, resolve_dsn
from lifecycle_dagster.job_factory import EXECUTION_ID_TAG, RESUME_TAG, job_name
from lifecycle_dagster.sqlfiles import query

#: executions looked at per tick
RESUME_BATCH = 50
IN_PROCESS: dict[str, Any] = {"execution": {"config": {"in_process": {}}}}


def resume_requests(
    instance: dg.DagsterInstance, jobs: Sequence[str], dsn: str, now: datetime | None = None
) -> Iterator[dg.RunRequest | dg.SkipReason]:
    """The run requests of one tick (see the module docstring)."""
    known = set(jobs)
    with connect(dsn) as conn:
        rows = conn.execute(
            query("resumable_executions"), {"now": now or datetime.now(UTC), "limit": RESUME_BATCH}
        ).fetchall()
    for r in rows:
        job = job_name(r["name"], r["version"])
        if job not in known:
            yield dg.SkipReason(f"execution {r['execution_id']}: job {job} is not loaded (reload the code location)")
            continue
        run = instance.get_run_by_id(r["dagster_run_id"])
        if run is None:
            yield dg.SkipReason(f"execution {r['execution_id']}: its run {r['dagster_run_id']} is not in this instance")
            continue
        if not run.is_finished:
            continue  # that run retries the stage itself
        yield dg.RunRequest(
            run_key=f"resume:{r['execution_id']}:{r['stage_id']}:{r['attempt_number']}",
            job_name=job,
            run_config=IN_PROCESS,
            tags={EXECUTION_ID_TAG: r["execution_id"], RESUME_TAG: r["stage_id"]},
        )


def resume_sensor(jobs: Sequence[dg.JobDefinition]) -> dg.SensorDefinition:
    """The resume sensor over the code location's ``jobs``."""
    names = [j.name for j in jobs]

    @dg.sensor(
        name="lifecycle_resume_sensor",
        jobs=list(jobs),
        minimum_interval_seconds=10,
        default_status=dg.DefaultSensorStatus.RUNNING,
        description="Dispatches stages set back to pending (retry_stage) once their not-before time passes.",
    )
    def _sensor(context: dg.SensorEvaluationContext) -> Iterator[dg.RunRequest | dg.SkipReason]:
        requests = list(resume_requests(context.instance, names, resolve_dsn()))
        for req in requests:
            if isinstance(req, dg.SkipReason):
                context.log.info(req.skip_message or "")
            else:
                yield req

    return _sensor
