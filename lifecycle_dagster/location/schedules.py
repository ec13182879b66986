"""Schedules of the code location: one Dagster schedule per ACTIVE definition whose DAG declares a
``schedule`` (versions loaded only because an unfinished execution still runs on them get none).

The schedule of workflow ``<name>`` is ``<name>__schedule`` (workflow names contain no ``__``, and
no other generated name ends in ``__schedule``: jobs are ``<name>__v<version>``, ops
``<name>__v<version>__<stage>``, sensors ``lifecycle_*``). It targets the active version's job,
runs on the DAG's ``cron`` in its ``timezone`` (Dagster's ``execution_timezone``: tick times are
wall-clock times there, daylight-saving changes included), and is RUNNING by default unless the
DAG says ``"enabled": false``; Dagster keeps a schedule's running/stopped state by name, so a
stop survives new versions.

Each tick inserts ONE pending execution of that version with the schedule's ``context``, through
``lifecycle.execution_schedule``, keyed by the tick: ``schedule:<definition id>:<tick instant in
UTC>`` (:func:`~lifecycle_dagster.core.dag_schedule.tick_key`), unique in the database, so a tick
evaluated again (a daemon restart, two daemons, a retried tick) inserts nothing. The tick itself
launches nothing: it returns a ``SkipReason`` naming the execution, and the launch sensor launches
that row like any other pending row (run key = execution id). Yielding a ``RunRequest`` too would
launch the row twice (run keys are scoped per sensor or schedule; the second run would fail
"already bound"). A tick of a definition that is no longer active (the code location not reloaded
since another version was activated) inserts nothing and says so.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import dagster as dg

from lifecycle_dagster.core.dag import ScheduleSpec, parse_dag
from lifecycle_dagster.core.dag_schedule import tick_key
from lifecycle_dagster.location.job_factory import DefinitionRow, job_name
from lifecycle_dagster.store.db import connect, resolve_dsn
from lifecycle_dagster.store.transitions import ScheduleTickStatus, execution_schedule

log = logging.getLogger(__name__)


def schedule_name(workflow: str) -> str:
    """The Dagster schedule of a workflow: ``<name>__schedule``."""
    return f"{workflow}__schedule"


def next_ticks(spec: ScheduleSpec, count: int = 3, after: datetime | None = None) -> list[datetime]:
    """The next ``count`` tick times of ``spec`` after ``after`` (default now), as Dagster computes
    them (``dagster._utils.schedules.cron_string_iterator``: wall-clock times in the schedule's
    timezone, daylight-saving changes applied), timezone-aware."""
    from dagster._utils.schedules import cron_string_iterator

    start = (after or datetime.now(UTC)).timestamp()
    later = (t for t in cron_string_iterator(start, spec.cron, spec.timezone) if t.timestamp() > start)
    return list(itertools.islice(later, count))


def describe(spec: ScheduleSpec, after: datetime | None = None) -> str:
    """One line for ``validate``: the cron, the timezone, the default status and the next ticks."""
    status = "running" if spec.enabled else "stopped"
    ticks = ", ".join(t.isoformat() for t in next_ticks(spec, 3, after))
    return f"schedule '{spec.cron}' in {spec.timezone} ({status} by default): next ticks {ticks}"


def run_tick(dsn: str, definition_id: str, context: Mapping[str, Any], scheduled: datetime | None) -> dg.SkipReason:
    """One tick: insert the tick's pending execution (once) and say what happened.

    ``scheduled``: the tick's time (timezone-aware); None (a schedule evaluated by hand without a
    time) inserts nothing.

    Raises:
        psycopg.Error: the database is unreachable or refuses the execution (the tick fails and
            Dagster shows the error; evaluating it again is safe).
    """
    if scheduled is None:
        return dg.SkipReason("no scheduled time (evaluated outside a tick): no execution inserted")
    key = tick_key(definition_id, scheduled)
    with connect(dsn) as conn:
        done = execution_schedule(conn, definition_id=definition_id, tick=key, context=context)
    if done.status == ScheduleTickStatus.CREATED:
        return dg.SkipReason(f"tick {key}: inserted pending execution {done.execution_id} (the launch sensor runs it)")
    if done.status == ScheduleTickStatus.EXISTS:
        return dg.SkipReason(f"tick {key}: execution {done.execution_id} was already inserted for this tick")
    return dg.SkipReason(
        f"tick {key}: definition {definition_id} is no longer the active version: nothing inserted"
        " (reload the code location to schedule the active one)"
    )


def build_schedule(definition: Mapping[str, Any], job: dg.JobDefinition) -> dg.ScheduleDefinition | None:
    """The schedule of one definition row (as :func:`~lifecycle_dagster.location.job_factory.build_job`
    reads it) targeting its ``job``; None when its DAG declares no schedule.

    Raises:
        ValueError: the row lacks a column; DagValidationError: its DAG is invalid.
        dagster.DagsterInvalidDefinitionError: Dagster refuses the cron or timezone (the
            validators refuse them first).
    """
    row = DefinitionRow.from_mapping(definition)
    spec = parse_dag(row.dag_schema).schedule
    if spec is None:
        return None
    context = dict(spec.context)

    def _tick(ctx: dg.ScheduleEvaluationContext) -> dg.SkipReason:
        reason = run_tick(resolve_dsn(), row.id, context, ctx.scheduled_execution_time)
        ctx.log.info(reason.skip_message or "")
        return reason

    return dg.ScheduleDefinition(
        name=schedule_name(row.name),
        cron_schedule=spec.cron,
        execution_timezone=spec.timezone,
        job=job,
        execution_fn=_tick,
        default_status=dg.DefaultScheduleStatus.RUNNING if spec.enabled else dg.DefaultScheduleStatus.STOPPED,
        description=f"inserts a pending execution of {row.label} at {spec.cron} ({spec.timezone})",
        tags={"lifecycle/workflow": row.name, "lifecycle/version": str(row.version)},
    )


def build_schedules(rows: Sequence[Mapping[str, Any]], jobs: Sequence[dg.JobDefinition]) -> list[dg.ScheduleDefinition]:
    """The schedules of the ACTIVE ``rows`` (``is_active`` true) whose job is among ``jobs`` (rows
    the job factory skipped get none); a row whose schedule cannot be built is logged and skipped."""
    by_name = {j.name: j for j in jobs}
    schedules: list[dg.ScheduleDefinition] = []
    for raw in rows:
        version = raw.get("version")
        if raw.get("is_active") is not True or not isinstance(version, int):
            continue
        job = by_name.get(job_name(str(raw.get("name")), version))
        if job is None:
            continue
        try:
            schedule = build_schedule(raw, job)
        except Exception as exc:  # one definition never takes the code location down
            log.warning("workflow %s v%s: schedule skipped: %s", raw.get("name"), raw.get("version"), exc)
            continue
        if schedule is not None:
            schedules.append(schedule)
    return schedules
