"""Retention in the code location: the job ``lifecycle__retention`` (one op, ``prune``) and its
daily schedule ``lifecycle_retention_schedule`` (03:17 UTC, RUNNING by default), which remove the
finished executions older than ``LIFECYCLE_DAGSTER_RETENTION`` (default 90 days) exactly as
``lifecycle-dagster prune --older-than`` does (:mod:`lifecycle_dagster.engine.retention`), their
Dagster runs through the run's own instance.

The job's name has a double underscore so that no workflow's job can take it (workflow names have
none; versioned jobs end in ``__v<version>``). The schedule passes the horizon as the op's config
(``older_than``, e.g. ``90d``: the run's config shows it); a run launched by hand without config
uses the setting of the process that runs it. ``LIFECYCLE_DAGSTER_RETENTION=off``: the job stays
(a run by hand needs ``older_than``), the schedule is not defined.
"""

from datetime import timedelta

import dagster as dg

from lifecycle_dagster.settings import MIN_RETENTION, format_duration, parse_duration

#: the job, its op and the schedule
RETENTION_JOB = "lifecycle__retention"
RETENTION_SCHEDULE = "lifecycle_retention_schedule"
#: every day at 03:17 UTC (off the hour: other daily jobs start at :00)
RETENTION_CRON = "17 3 * * *"


class PruneConfig(dg.Config):
    """``older_than``: the horizon (``90d``, ``12h``; at least 1h); empty: ``LIFECYCLE_DAGSTER_RETENTION``."""

    older_than: str = ""
    dry_run: bool = False


def _older_than(config: PruneConfig) -> timedelta:
    """The horizon of a run: its config, else the setting.

    Raises:
        dagster.Failure: neither gives one (the setting is ``off``), or it is shorter than 1 hour.
    """
    from lifecycle_dagster.settings import Settings

    try:
        value = parse_duration(config.older_than) if config.older_than else Settings.from_env().retention
    except ValueError as exc:
        raise dg.Failure(f"retention: {exc}") from None
    if value is None:
        raise dg.Failure("retention is off (LIFECYCLE_DAGSTER_RETENTION=off) and the run's config gives no older_than")
    if value < MIN_RETENTION:
        raise dg.Failure(f"retention: older_than must be at least 1h, got {config.older_than!r}")
    return value


@dg.op(name="prune")
def prune_op(context: dg.OpExecutionContext, config: PruneConfig) -> dict[str, object]:
    """Remove the finished executions older than the horizon and their Dagster runs; return the
    report (:meth:`~lifecycle_dagster.engine.retention.PruneReport.as_json`), also logged and
    attached as output metadata."""
    from lifecycle_dagster.engine.retention import counts_line, horizon, prune
    from lifecycle_dagster.store.db import resolve_dsn

    older_than = _older_than(config)
    report = prune(resolve_dsn(), horizon(older_than), dry_run=config.dry_run, instance=context.instance)
    context.log.info(
        f"{'would remove' if config.dry_run else 'removed'}: {counts_line(report)} ({report.seconds:.1f} s)"
    )
    data = report.as_json()
    context.add_output_metadata({k: v for k, v in data.items() if isinstance(v, int | float | str | bool)})
    return data


def retention_job() -> dg.JobDefinition:
    """The job ``lifecycle__retention``: the op ``prune``, in process."""

    @dg.job(name=RETENTION_JOB, executor_def=dg.in_process_executor, tags={"lifecycle/kind": "retention"})
    def _job() -> None:
        prune_op()

    return _job


def retention_schedule(job: dg.JobDefinition, older_than: timedelta) -> dg.ScheduleDefinition:
    """``lifecycle_retention_schedule``: ``job`` every day at 03:17 UTC with ``older_than`` as config."""
    return dg.ScheduleDefinition(
        name=RETENTION_SCHEDULE,
        job=job,
        cron_schedule=RETENTION_CRON,
        execution_timezone="UTC",
        default_status=dg.DefaultScheduleStatus.RUNNING,
        run_config={"ops": {"prune": {"config": {"older_than": format_duration(older_than)}}}},
        description=f"remove finished executions older than {format_duration(older_than)}"
        " (LIFECYCLE_DAGSTER_RETENTION)",
    )


def retention_definitions(older_than: timedelta | None) -> tuple[list[dg.JobDefinition], list[dg.ScheduleDefinition]]:
    """The job, and the schedule unless retention is off (``older_than`` None)."""
    job = retention_job()
    return [job], ([] if older_than is None else [retention_schedule(job, older_than)])
