"""Retention: remove finished executions older than a horizon, whole (docs/retention.md).

:func:`prune` calls ``lifecycle.executions_prune`` (through the seam) batch after batch, each its
own short transaction, oldest executions first, until no finished execution older than the horizon
is left to look at. Each batch removes, for at most ``batch`` executions that are ``completed``,
``rolled_back`` or ``compensation_failed`` and whose row and events are all older than the horizon:
their audit stream (a checkpoint keeps ``audit verify`` whole), the breaker outcomes of their tasks
(an execution with an outcome still counted by a breaker waits for a later run), artifacts, tasks,
stage logs and the execution row. After a batch commits, the Dagster runs of its executions are
deleted through the instance (``dagster_run_id``, ``compensation_run_id``, and every run tagged
``lifecycle/execution_id`` with one of them). A dry run counts the same without deleting.

Used by ``lifecycle-dagster prune`` and the code location's ``lifecycle_retention_schedule``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from lifecycle_dagster.settings import MIN_RETENTION
from lifecycle_dagster.store.db import connect
from lifecycle_dagster.store.transitions import PruneBatch, executions_prune

log = logging.getLogger(__name__)

#: executions per batch (one transaction each)
DEFAULT_BATCH = 500
#: the run tag naming a run's execution (= ``location.job_factory.EXECUTION_ID_TAG``; the engine
#: layer may not import the location's)
EXECUTION_ID_TAG = "lifecycle/execution_id"
#: the kinds of rows counted, in the order they are reported
KINDS = ("executions", "tasks", "stage_logs", "artifacts", "breaker_outcomes", "events", "dagster_runs")


@dataclass
class PruneReport:
    """What :func:`prune` removed (or, ``dry_run``, would remove): rows per kind, ``deferred``
    finished executions kept for a later run, ``batches`` run, ``seconds`` taken, and ``before``,
    the horizon's instant (UTC)."""

    before: datetime
    dry_run: bool
    executions: int = 0
    tasks: int = 0
    stage_logs: int = 0
    artifacts: int = 0
    breaker_outcomes: int = 0
    events: int = 0
    dagster_runs: int = 0
    deferred: int = 0
    batches: int = 0
    seconds: float = 0.0

    def add(self, batch: PruneBatch, runs: int) -> None:
        """Count one batch and the Dagster runs of its executions."""
        for kind in KINDS[:-1]:
            setattr(self, kind, getattr(self, kind) + getattr(batch, kind))
        self.deferred += batch.deferred
        self.dagster_runs += runs
        self.batches += 1

    def as_json(self) -> dict[str, Any]:
        """The report as a JSON-ready dict (``before`` in ISO 8601, UTC)."""
        data = asdict(self)
        data["before"] = self.before.astimezone(UTC).isoformat()
        data["seconds"] = round(self.seconds, 3)
        return data


def horizon(older_than: timedelta, now: datetime | None = None) -> datetime:
    """The instant ``older_than`` before ``now`` (default: the clock), UTC.

    Raises:
        ValueError: ``older_than`` is shorter than 1 hour.
    """
    if older_than < MIN_RETENTION:
        raise ValueError(f"the horizon must be at least 1h, got {older_than}")
    return (now or datetime.now(UTC)) - older_than


def prune(
    dsn: str,
    before: datetime,
    *,
    dry_run: bool = False,
    instance: Any | None = None,
    batch: int = DEFAULT_BATCH,
    on_batch: Callable[[PruneBatch], None] | None = None,
    now: datetime | None = None,
) -> PruneReport:
    """Remove every finished execution older than ``before`` (timezone-aware), batch by batch.

    ``instance``: the Dagster instance whose runs of the removed executions are deleted (None:
    runs are left alone and not counted). ``on_batch`` is called after each batch commits. ``now``:
    the instant breaker windows are judged at and the batches' event is stamped with (default: the
    database's clock; ``before`` must be at least 1 hour before it).

    Raises:
        psycopg.Error: the database refused a batch (``before`` less than 1 hour ago: the
            batches already committed stay removed).
    """
    report = PruneReport(before=before, dry_run=dry_run)
    started = time.monotonic()
    cursor: tuple[datetime, str] | None = None
    with connect(dsn, application_name="lifecycle-dagster prune") as conn:
        while True:
            done = executions_prune(conn, before=before, limit=batch, dry_run=dry_run, after=cursor, now=now)
            runs = _dagster_runs(instance, done.execution_ids, done.run_ids, delete=not dry_run)
            report.add(done, runs)
            if on_batch is not None:
                on_batch(done)
            if done.cursor is None:
                break
            cursor = done.cursor
    report.seconds = time.monotonic() - started
    log.info("prune before %s%s: %s", before.isoformat(), " (dry run)" if dry_run else "", report.as_json())
    return report


def _dagster_runs(instance: Any | None, execution_ids: Sequence[str], run_ids: Sequence[str], *, delete: bool) -> int:
    """The Dagster runs of these executions that exist (ids given, or tagged with one of them):
    deleted when ``delete``; how many."""
    if instance is None or not execution_ids:
        return 0
    from dagster import RunsFilter

    found = set(instance.get_run_ids(RunsFilter(run_ids=list(run_ids)))) if run_ids else set()
    found |= set(instance.get_run_ids(RunsFilter(tags={EXECUTION_ID_TAG: list(execution_ids)})))
    if delete:
        for run_id in sorted(found):
            instance.delete_run(run_id)
    return len(found)


def counts_line(report: PruneReport) -> str:
    """One line of counts: ``12 executions, 120 tasks, ... 3 dagster runs``."""
    return ", ".join(f"{getattr(report, kind)} {kind.replace('_', ' ')}" for kind in KINDS)
