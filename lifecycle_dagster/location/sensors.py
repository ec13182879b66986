"""Sensors of the code location.

``lifecycle_launch_sensor``: an execution inserted as ``pending`` (``lifecycle-dagster start``, a
Supabase client, the runbook's section 8 statement with status pending) is launched as a run of its
version's job with run key = execution id, so one execution never gets two runs however often the
sensor sees it; the run's first op binds its run id to the row. A row whose job is not loaded
(published since the last reload) stays pending with ``pending_reason`` saying so, and never takes
a launchable row's place in a tick's batch. Rows created bound to a run (``lifecycle-dagster run``)
are never launched. Rows inserted as
``in_progress`` with no run (driven by hand) are never launched.

``lifecycle_run_failure_sensor``: a failed forward run is mirrored into Postgres: its execution
fails (if it was still in progress under that run) and, when its DAG says ``on_failure:
compensate`` (the default), compensation starts (``lifecycle.compensation_start``). Keyed on the
execution id and idempotent: a failure delivered twice, or a run retried and failed again, changes
nothing the second time.

``lifecycle_reconciler``: finds what the failure sensor cannot see or missed, every tick:
in_progress executions whose Dagster run has failed or was canceled (runs of ``lifecycle-dagster
run`` and ``dagster job execute`` have no code-location origin; the sensor may have raised or the
daemon been down), in_progress executions whose heartbeat is older than
``LIFECYCLE_DAGSTER_HEARTBEAT_TIMEOUT_S`` (default 120; a killed run worker; not while a run
launched for the execution, a resume or a continuation, is queued or starting: it waits for a slot
of the run queue), pending executions whose run ended or lost its run worker before binding them
(they are cancelled and rolled back: nothing ran), failed or cancelled executions whose
compensation is due; and it launches the compensation run of every ``compensating`` execution (run
key ``compensate:<execution>``; a compensation run that failed, or whose heartbeat is older than
the same bound (a killed run worker, a hung process), is taken over by a new one, tagged
``lifecycle/takeover``; one lost before its first undo took the compensation is replaced by
``compensate:<execution>:after:<run>``). Dagster runs still STARTED whose execution moved on
without them (ended, or taken over) and has been silent for the same bound are reported failed:
their run worker was killed, and each would hold a concurrent-run slot for good.

``lifecycle_resume_sensor``: a stage set back to ``pending`` after its run ended (the runbook's
``retry_stage``, or a run that died while waiting to retry) is dispatched again once its
not-before time has passed: the sensor launches a run of the execution's job tagged with the
execution id and ``lifecycle/resume``; that run skips the stages already completed. Run keys
(``resume:<execution>:<stage>:<attempt>``) make each pending attempt launch at most once, however
often the sensor ticks or however many daemons run it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from datetime import UTC, datetime

import dagster as dg

from lifecycle_dagster.engine.compensation import TAKEOVER_TAG, compensate_if_due, compensation_job_name
from lifecycle_dagster.location.job_factory import (
    BATCH_SIZE_TAG,
    BATCH_TAG,
    CONTINUES_TAG,
    EXECUTION_ID_TAG,
    RESUME_TAG,
    BatchPlan,
    batch_plan,
    job_name,
)
from lifecycle_dagster.settings import Settings
from lifecycle_dagster.store.db import Connection, connect, resolve_dsn
from lifecycle_dagster.store.sqlfiles import query
from lifecycle_dagster.store.transitions import (
    approvals_expire,
    batch_form,
    compensation_start,
    execution_fail,
    execution_set_pending_reason,
    task_reap,
)

#: executions looked at per tick
RESUME_BATCH = 50


def sensor_interval_s(default: int) -> int:
    """Seconds between a sensor's ticks at least: ``LIFECYCLE_DAGSTER_SENSOR_INTERVAL_S`` for every
    sensor when set (read when the code location loads), else ``default``. The daemon evaluates
    sensors every 5 s at most, so a value just under 5 (4) gives a steady 5 s cadence where 5
    often waits 10 s (a tick found 4.9 s after the last one is skipped)."""
    return Settings.from_env().sensor_interval_s or default


def resume_requests(
    instance: dg.DagsterInstance, jobs: Sequence[str], dsn: str, now: datetime | None = None
) -> Iterator[dg.RunRequest | dg.SkipReason]:
    """The run requests of one tick (see the module docstring)."""
    known = set(jobs)
    with connect(dsn) as conn:
        rows = conn.execute(
            query("resumable_executions"), {"now": now or datetime.now(UTC), "limit": RESUME_BATCH}
        ).fetchall()
    seen: set[str] = set()
    for r in rows:
        # one run per execution: it runs every pending stage (a decision may make several pending);
        # two would take the execution over from each other and call an agent twice
        if r["execution_id"] in seen:
            continue
        seen.add(r["execution_id"])
        job = job_name(r["name"], r["version"])
        if job not in known:
            yield dg.SkipReason(f"execution {r['execution_id']}: job {job} is not loaded (reload the code location)")
            continue
        run = instance.get_run_by_id(r["dagster_run_id"])
        if run is None:
            yield dg.SkipReason(f"execution {r['execution_id']}: its run {r['dagster_run_id']} is not in this instance")
            continue
        if not run.is_finished and not r["left_batch"]:
            continue  # that run retries the stage itself (a batch run leaves a member's retry to this sensor)
        yield dg.RunRequest(
            run_key=f"resume:{r['execution_id']}:{r['stage_id']}:{r['attempt_number']}",
            job_name=job,
            tags={EXECUTION_ID_TAG: r["execution_id"], RESUME_TAG: r["stage_id"], CONTINUES_TAG: run.run_id},
        )


def resume_sensor(jobs: Sequence[dg.JobDefinition]) -> dg.SensorDefinition:
    """The resume sensor over the code location's ``jobs``."""
    return _tick_sensor(
        "lifecycle_resume_sensor",
        jobs,
        10,
        "Dispatches stages set back to pending (retry_stage) once their not-before time passes.",
        resume_requests,
    )


#: executions looked at per reconciler step and tick
RECONCILE_BATCH = 100
_FAILED = (dg.DagsterRunStatus.FAILURE, dg.DagsterRunStatus.CANCELED)


def heartbeat_timeout_s() -> float:
    """``LIFECYCLE_DAGSTER_HEARTBEAT_TIMEOUT_S`` (default 120 s)."""
    return Settings.from_env().heartbeat_timeout_s


def mirror_run_failure(conn: Connection, run_id: str, execution_id: str | None, reason: str) -> str | None:
    """Mirror a failed Dagster run into its execution; return the execution id (None if the run
    carried none and created none). Idempotent."""
    if not execution_id:
        row = conn.execute(query("execution_by_run"), {"run_id": run_id}).fetchone()
        if row is None:
            return None
        execution_id = str(row["id"])
    execution_fail(conn, execution_id=execution_id, reason=reason, run_id=run_id)
    compensate_if_due(conn, execution_id)
    return execution_id


def failure_sensor(jobs: Sequence[dg.JobDefinition]) -> dg.SensorDefinition:
    """The run failure sensor over the forward ``jobs``."""

    @dg.run_failure_sensor(
        name="lifecycle_run_failure_sensor",
        monitored_jobs=list(jobs),
        minimum_interval_seconds=sensor_interval_s(4),  # a steady 5 s cadence (see sensor_interval_s)
        default_status=dg.DefaultSensorStatus.RUNNING,
        description="Mirrors failed workflow runs into Postgres and starts their compensation.",
    )
    def _sensor(context: dg.RunFailureSensorContext) -> None:
        run = context.dagster_run
        message = context.failure_event.message or "run failed"
        reason = f"Dagster run {run.run_id} failed: {message}"
        with connect(resolve_dsn()) as conn:
            if BATCH_TAG in run.tags:  # a batch run: every execution it still holds
                rows = conn.execute(query("executions_of_run"), {"run_id": run.run_id}).fetchall()
                for r in rows:
                    mirror_run_failure(conn, run.run_id, r["execution_id"], reason)
                context.log.info(f"batch run {run.run_id}: {len(rows)} execution(s) mirrored")
                return
            eid = mirror_run_failure(conn, run.run_id, run.tags.get(EXECUTION_ID_TAG), reason)
        context.log.info(f"run {run.run_id}: execution {eid} mirrored")

    return _sensor


def reconcile(
    instance: dg.DagsterInstance,
    compensation_jobs: Sequence[str],
    dsn: str,
    timeout_s: float | None = None,
) -> Iterator[dg.RunRequest | dg.SkipReason]:
    """One reconciler tick (see the module docstring): act on Postgres, yield compensation runs."""
    timeout_s = heartbeat_timeout_s() if timeout_s is None else timeout_s
    known = set(compensation_jobs)
    with connect(dsn) as conn:
        task_reap(conn)  # expired leases back to the queue, with or without workers
        approvals_expire(conn)  # approval stages past their deadline decided by their on_timeout
        for r in conn.execute(query("running_executions"), {"limit": RECONCILE_BATCH}).fetchall():
            run = instance.get_run_by_id(r["dagster_run_id"])
            if run is not None and run.status in _FAILED:
                mirror_run_failure(
                    conn, run.run_id, r["execution_id"], f"Dagster run {run.run_id} ended {run.status.value}"
                )
        for r in conn.execute(query("stale_executions"), {"timeout_s": timeout_s}).fetchall():
            if _run_waits_for(instance, r["execution_id"]):
                continue  # a run launched for it (a resume) waits for its turn in the run queue
            reason = f"no heartbeat from Dagster run {r['dagster_run_id']} for over {timeout_s:g} s"
            mirror_run_failure(conn, r["dagster_run_id"], r["execution_id"], reason)
            lost = instance.get_run_by_id(r["dagster_run_id"])
            if lost is not None and not lost.is_finished:  # its worker is gone: say so in Dagster too
                instance.report_run_failed(lost, reason)
        for r in conn.execute(
            query("unbound_pending_executions"), {"timeout_s": timeout_s, "limit": RECONCILE_BATCH}
        ).fetchall():
            _settle_unstarted(instance, conn, r["execution_id"], timeout_s, r["batch_id"])
        for r in conn.execute(query("compensation_due"), {}).fetchall():
            compensation_start(conn, execution_id=r["execution_id"], reason=r["reason"])
        rows = conn.execute(
            query("compensating_executions"), {"limit": RECONCILE_BATCH, "timeout_s": timeout_s}
        ).fetchall()
    _fail_released_runs(instance, dsn, timeout_s)
    for r in rows:
        job = compensation_job_name(job_name(r["name"], r["version"]))
        if job not in known:
            yield dg.SkipReason(f"execution {r['execution_id']}: job {job} is not loaded (reload the code location)")
            continue
        tags = {EXECUTION_ID_TAG: r["execution_id"]}
        owner = r["compensation_run_id"]
        if owner is None:
            key = _unowned_compensation_key(
                instance, job, r["execution_id"], stale=bool(r["stale"]), timeout_s=timeout_s
            )
            if key is not None:
                yield dg.RunRequest(run_key=key, job_name=job, tags=tags)
            continue
        if _compensation_run_lost(instance, owner, stale=bool(r["stale"]), timeout_s=timeout_s):
            yield dg.RunRequest(
                run_key=f"compensate:{r['execution_id']}:after:{owner}",
                job_name=job,
                tags={**tags, TAKEOVER_TAG: owner},
            )


#: run statuses of a run that has not started its first op yet: it may wait in the run queue for long
_WAITING_TO_START = [dg.DagsterRunStatus.QUEUED, dg.DagsterRunStatus.NOT_STARTED, dg.DagsterRunStatus.STARTING]


def _run_waits_for(instance: dg.DagsterInstance, execution_id: str) -> bool:
    """Whether a forward run launched for the execution (tag ``lifecycle/execution_id``: a resume or
    a continuation) is queued or starting: the execution's silence is that run's wait for a slot of
    the run queue, not a lost run, and the run takes the execution over when it starts."""
    runs = instance.get_runs(
        dg.RunsFilter(tags={EXECUTION_ID_TAG: execution_id}, statuses=_WAITING_TO_START), limit=1
    )
    return any(r.tags.get("lifecycle/compensation") != "true" for r in runs)


def _unowned_compensation_key(
    instance: dg.DagsterInstance, job: str, execution_id: str, *, stale: bool, timeout_s: float
) -> str | None:
    """The run key of the compensation run to request for a compensating execution no run owns
    yet, or None to wait: ``compensate:<execution>`` at first (Dagster launches a run key once);
    when nothing was heard for over ``timeout_s`` seconds (``stale``) and every run launched for it
    ended or was lost before its first undo took the compensation (STARTED but silent: its run
    worker was killed; such runs are reported failed), a new run ``compensate:<execution>:after:<run>``.
    A run still queued or starting is waited for."""
    first = f"compensate:{execution_id}"
    if not stale:
        return first
    runs = instance.get_runs(dg.RunsFilter(job_name=job, tags={EXECUTION_ID_TAG: execution_id}), limit=10)
    if not runs:
        return first
    if any(not r.is_finished and r.status != dg.DagsterRunStatus.STARTED for r in runs):
        return None  # queued or starting: its turn comes
    for run in runs:
        if not run.is_finished:
            instance.report_run_failed(
                run,
                f"compensation run {run.run_id}: its run worker was lost before its first undo"
                f" (silent for over {timeout_s:g} s)",
            )
    return f"{first}:after:{runs[0].run_id}"


#: STARTED runs looked at per reconciler tick for runs whose execution moved on without them
RELEASE_BATCH = 100


def _fail_released_runs(instance: dg.DagsterInstance, dsn: str, timeout_s: float) -> None:
    """Report failed the Dagster runs Dagster still thinks are STARTED whose execution is no longer
    theirs (it ended, or another run took it over; an unowned compensation is left to
    :func:`_unowned_compensation_key`) and has been silent for over ``timeout_s`` seconds: their
    run worker was killed after its execution moved on (the default run launcher cannot see that),
    and each such run would hold one of the instance's concurrent-run slots for good, so that
    queued runs (compensation runs included) never start."""
    started = instance.get_runs(dg.RunsFilter(statuses=[dg.DagsterRunStatus.STARTED]), limit=RELEASE_BATCH)
    tagged = [r for r in started if r.tags.get(EXECUTION_ID_TAG)]
    if not tagged:
        return
    with connect(dsn) as conn:
        released = conn.execute(
            query("released_runs"),
            {
                "run_ids": [r.run_id for r in tagged],
                "execution_ids": [r.tags[EXECUTION_ID_TAG] for r in tagged],
                "compensation": [r.tags.get("lifecycle/compensation") == "true" for r in tagged],  # the job's tag
                "timeout_s": timeout_s,
            },
        ).fetchall()
    by_id = {r.run_id: r for r in started}
    for row in released:
        instance.report_run_failed(
            by_id[row["run_id"]],
            f"run {row['run_id']}: its execution {row['execution_id']} is {row['status']} without it and silent for"
            f" over {timeout_s:g} s: its run worker is gone",
        )


def _compensation_run_lost(instance: dg.DagsterInstance, owner: str, *, stale: bool, timeout_s: float) -> bool:
    """Whether the compensation run ``owner`` is gone: failed or canceled, or ``stale`` (no heartbeat
    for over ``timeout_s`` seconds: its run worker was killed, or the run is not in this instance).
    A stale run Dagster still thinks is running is reported failed, as for a stale forward run."""
    run = instance.get_run_by_id(owner)
    if run is not None and run.status in _FAILED:
        return True
    if not stale:
        return False
    if run is not None and not run.is_finished:
        instance.report_run_failed(run, f"compensation run {owner}: no heartbeat for over {timeout_s:g} s")
    return True


def _settle_unstarted(
    instance: dg.DagsterInstance, conn: Connection, execution_id: str, timeout_s: float, batch_id: str | None = None
) -> None:
    """A pending execution that was launched but never started: every run launched for it (tag
    ``lifecycle/execution_id``) failed, was canceled, or lost its run worker before the first op
    bound the run (STARTED for over ``timeout_s`` seconds: the default run launcher cannot see a
    killed run worker, and the launch sensor never launches a run key twice). Its lost runs are
    failed in Dagster and the execution is cancelled and rolled back (nothing ran: nothing to
    undo), so it does not wait forever. An execution not launched yet is left alone. A member of
    batch ``batch_id`` is looked up by its batch's runs (tag ``lifecycle/batch``)."""
    tag = {BATCH_TAG: batch_id} if batch_id else {EXECUTION_ID_TAG: execution_id}
    runs = instance.get_runs(dg.RunsFilter(tags=tag), limit=10)
    if not runs:
        return
    now = datetime.now(UTC).timestamp()
    lost = []
    for run in runs:
        if run.is_finished:
            continue
        record = instance.get_run_record_by_id(run.run_id)
        started = record.start_time if record is not None else None
        if run.status != dg.DagsterRunStatus.STARTED or started is None or now - started < timeout_s:
            return  # queued, starting, or starting its first op: not lost (yet)
        lost.append(run)
    reason = (
        f"its Dagster run {runs[0].run_id} ended or lost its run worker before the execution started"
        f" (no stage ran for over {timeout_s:g} s)"
    )
    for run in lost:
        instance.report_run_failed(run, reason)
    compensation_start(conn, execution_id=execution_id, reason=reason)


def reconciler(compensation_jobs: Sequence[dg.JobDefinition]) -> dg.SensorDefinition:
    """The reconciler sensor; it launches the ``compensation_jobs``."""
    return _tick_sensor(
        "lifecycle_reconciler",
        compensation_jobs,
        10,
        "Fails lost executions, starts due compensations and launches compensation runs.",
        reconcile,
    )


#: pending executions launched per tick
LAUNCH_BATCH = 100


#: batches formed per batched job and tick at most
BATCHES_PER_TICK = 20


def launch_requests(
    jobs: Sequence[str], dsn: str, batched: Mapping[str, BatchPlan] | None = None
) -> Iterator[dg.RunRequest]:
    """The run requests of one launch tick (see the module docstring): the oldest
    :data:`LAUNCH_BATCH` pending rows of the loaded unbatched ``jobs`` (rows of a version not loaded
    never take their place: they are given a ``pending_reason`` instead, once), then the batch runs
    of the ``batched`` jobs (job name -> its plan: docs/batches.md): pending rows are grouped into
    batches (``lifecycle.batch_form``) and every batch no run has bound yet is requested, run key
    ``batch:<id>``."""
    batched = dict(batched or {})
    known = sorted(set(jobs))
    single = [j for j in known if j not in batched]
    with connect(dsn) as conn:
        unloaded = conn.execute(query("unloaded_pending_executions"), {"jobs": known, "limit": LAUNCH_BATCH})
        for r in unloaded.fetchall():
            execution_set_pending_reason(
                conn,
                execution_id=r["execution_id"],
                reason=f"job {job_name(r['workflow_name'], r['version'])} is not loaded: "
                "reload the code location to pick up this version",
            )
        rows = conn.execute(query("launchable_executions"), {"jobs": single, "limit": LAUNCH_BATCH}).fetchall()
        for plan in sorted(set(batched.values())):
            for _ in range(BATCHES_PER_TICK):
                formed = batch_form(
                    conn,
                    definition_id=plan.definition_id,
                    max_executions=plan.max_executions,
                    max_wait_s=plan.max_wait_s,
                )
                if formed is None:
                    break
        unlaunched = conn.execute(query("batches_unlaunched"), {"limit": LAUNCH_BATCH}).fetchall()
    for r in rows:
        yield dg.RunRequest(
            run_key=r["execution_id"],
            job_name=job_name(r["workflow_name"], r["version"]),
            tags={
                EXECUTION_ID_TAG: r["execution_id"],
                "lifecycle/workflow": r["workflow_name"],
                "lifecycle/version": str(r["version"]),
            },
        )
    for b in unlaunched:
        job = job_name(b["name"], b["version"])
        if job not in known:
            continue  # its version is not loaded here (yet)
        yield dg.RunRequest(
            run_key=f"batch:{b['batch_id']}",
            job_name=job,
            tags={
                BATCH_TAG: b["batch_id"],
                BATCH_SIZE_TAG: str(b["size"]),
                "lifecycle/workflow": b["name"],
                "lifecycle/version": str(b["version"]),
            },
        )


def launch_sensor(jobs: Sequence[dg.JobDefinition]) -> dg.SensorDefinition:
    """The launch sensor over the forward ``jobs``."""
    batched = {j.name: plan for j in jobs if (plan := batch_plan(j)) is not None}
    return _tick_sensor(
        "lifecycle_launch_sensor",
        jobs,
        4,  # a steady 5 s cadence (see sensor_interval_s)
        "Launches executions inserted as pending (run key = execution id; a batched version's in batch runs).",
        lambda _instance, names, dsn: launch_requests(names, dsn, batched),
    )


def _tick_sensor(
    name: str,
    jobs: Sequence[dg.JobDefinition],
    interval_s: int,
    description: str,
    tick: Callable[[dg.DagsterInstance, list[str], str], Iterable[dg.RunRequest | dg.SkipReason]],
) -> dg.SensorDefinition:
    """A RUNNING-by-default sensor over ``jobs`` whose tick is ``tick(instance, job names, dsn)``:
    its run requests are yielded, its skip reasons logged."""
    names = [j.name for j in jobs]

    @dg.sensor(
        name=name,
        jobs=list(jobs),
        minimum_interval_seconds=sensor_interval_s(interval_s),
        default_status=dg.DefaultSensorStatus.RUNNING,
        description=description,
    )
    def _sensor(context: dg.SensorEvaluationContext) -> Iterator[dg.RunRequest]:
        for req in list(tick(context.instance, names, resolve_dsn())):
            if isinstance(req, dg.SkipReason):
                context.log.debug(req.skip_message or "")  # an idle tick: not in `dev`'s log
            else:
                yield req

    return _sensor
