"""``lifecycle-dagster prune``: remove finished executions older than a horizon (docs/retention.md).

Exit codes: 0 success (a dry run included); 1 a database error; 2 a bad ``--older-than``.
"""

from __future__ import annotations

import json
from datetime import timedelta

import click

from lifecycle_dagster.cli.common import dagster_home, main
from lifecycle_dagster.cli.common import dsn as _dsn
from lifecycle_dagster.settings import MIN_RETENTION, Settings, parse_duration


class _Duration(click.ParamType[timedelta]):
    """A duration of at least 1 hour (``90d``, ``12h``, ``90m``), as a ``timedelta``."""

    name = "duration"

    def convert(self, value: object, param: click.Parameter | None, ctx: click.Context | None) -> timedelta:
        if isinstance(value, timedelta):
            return value
        try:
            parsed = parse_duration(str(value))
        except ValueError as exc:
            self.fail(str(exc), param, ctx)
        if parsed < MIN_RETENTION:
            self.fail(f"{value!r} is shorter than 1h: a horizon under an hour is refused", param, ctx)
        return parsed


@main.command("prune")
@click.option(
    "--older-than",
    "older_than",
    type=_Duration(),
    required=True,
    help="The horizon: finished executions older than this go (90d, 12h, 2w; at least 1h).",
)
@click.option("--dry-run", is_flag=True, help="Count what would go; delete nothing.")
@click.option("--json", "as_json", is_flag=True, help="One JSON document of the counts instead of a line.")
@click.option(
    "--batch", type=click.IntRange(1, 10000), default=500, show_default=True, help="Executions per transaction."
)
def prune_cmd(older_than: timedelta, dry_run: bool, as_json: bool, batch: int) -> None:
    """Remove the executions that are final (completed, rolled_back, compensation_failed) and older
    than --older-than, whole: their tasks, stage logs, artifacts, breaker outcomes outside every open
    window, audit stream (a checkpoint keeps `audit verify` whole) and Dagster runs. Nothing of an
    unfinished execution is touched. Runs in batches of --batch executions, each its own short
    transaction. Prints the counts per kind and the time taken (--json: one JSON document
    {"before", "dry_run", "executions", "tasks", "stage_logs", "artifacts", "breaker_outcomes",
    "events", "dagster_runs", "deferred", "batches", "seconds"}).
    """
    from dagster import DagsterInstance

    from lifecycle_dagster.engine.retention import counts_line, horizon, prune

    dsn = _dsn()
    instance = DagsterInstance.from_config(str(dagster_home(Settings.from_env(), dsn)))
    try:
        report = prune(dsn, horizon(older_than), dry_run=dry_run, instance=instance, batch=batch)
    finally:
        instance.dispose()
    if as_json:
        click.echo(json.dumps(report.as_json()))
        return
    verb = "would remove" if dry_run else "removed"
    click.echo(f"{verb} (finished before {report.before.isoformat(timespec='seconds')}): {counts_line(report)}")
    kept = f"; {report.deferred} finished execution(s) kept for a later run" if report.deferred else ""
    click.echo(f"{report.batches} batch(es) in {report.seconds:.2f} s{kept}")
