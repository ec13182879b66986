"""The code location: one job per ``workflow_definitions`` row that is active or that an
unfinished execution (status not completed, rolled_back or compensation_failed) still runs on, so
a run started on v1 finishes on v1 after v2 is activated (named query ``active_definitions``),
plus, per workflow, the stable job ``<name>`` running its active version (``is_active`` in the
snapshot; see :mod:`~lifecycle_dagster.location.job_factory`), which the sensors watch like the
versioned jobs.

The table is read ONCE, when the code server loads (Dagster's INITIALIZATION load), into a JSON
snapshot that Dagster stores with every run's execution plan (reconstruction metadata). Run and
step workers rebuild the jobs from that snapshot (RECONSTRUCTION load) without querying, so a run
executes the DAG it was launched with even if the table changed since. New versions appear when
the code location reloads.

Dagster's public state-backed API (``dg.StateBackedComponent`` with ``LEGACY_CODE_SERVER_SNAPSHOTS``
state) would do the same but fails whenever definitions load outside a load context set by a
Dagster process (``dagster job execute -m lifecycle_dagster``, a plain ``defs()`` call): see
:func:`_load_context`. The private load context is therefore used here, in that one function.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

import dagster as dg

from lifecycle_dagster.core.logs import configure
from lifecycle_dagster.location.alerts import alert_sensor
from lifecycle_dagster.location.job_factory import build_jobs
from lifecycle_dagster.location.retention import retention_definitions
from lifecycle_dagster.location.schedules import build_schedules
from lifecycle_dagster.location.sensors import failure_sensor, launch_sensor, reconciler, resume_sensor
from lifecycle_dagster.settings import Settings
from lifecycle_dagster.store.db import connect, resolve_dsn
from lifecycle_dagster.store.sqlfiles import query

#: reconstruction-metadata key of the snapshot
SNAPSHOT_KEY = "lifecycle_dagster/workflow_definitions"

log = logging.getLogger(__name__)


def fetch_snapshot(dsn: str) -> str:
    """The loaded definitions (active, or pinned by an unfinished execution) as canonical JSON text
    (sorted keys, stable row order)."""
    with connect(dsn) as conn:
        rows = conn.execute(query("active_definitions")).fetchall()
    return json.dumps([dict(r) for r in rows], sort_keys=True, separators=(",", ":"))


def _load_context() -> tuple[str | None, Callable[[str], None]]:
    """``(the run's snapshot, or None when not reconstructing a run; a function that stores a
    snapshot with every run launched from these definitions)``: Dagster's definitions load context.

    Private Dagster API (``dagster._core.definitions.definitions_load_context``), kept in this one
    function because the public alternative lacks a working form for us (dagster 1.13.27):
    ``dg.StateBackedComponent`` with ``DefsStateConfigArgs.legacy_code_server_snapshots()`` is the
    only public state mode refreshed at every code server load (``LOCAL_FILESYSTEM`` and
    ``VERSIONED_STATE_STORAGE`` are refreshed by ``dg utils refresh-defs-state`` or ``dagster dev``
    only: dagster/components/component/state_backed_component.py:209-221), but it calls
    ``DefinitionsLoadContext.get()`` anew to store the state and again to read it back
    (state_backed_component.py:136 and :223), and ``get()`` makes a NEW context each call when no
    Dagster process has set one (definitions_load_context.py:97). So ``dagster job execute -m
    lifecycle_dagster`` fails with ``KeyError: 'defs-state-[...]'`` (definitions_load_context.py:234);
    working around that needs this same private module. Here the context is fetched once.
    """
    from dagster._core.definitions.definitions_load_context import DefinitionsLoadContext, DefinitionsLoadType

    ctx = DefinitionsLoadContext.get()
    stored: str | None = None
    if ctx.load_type == DefinitionsLoadType.RECONSTRUCTION:
        stored = ctx.reconstruction_metadata.get(SNAPSHOT_KEY)
    return stored, lambda snapshot: ctx.add_to_pending_reconstruction_metadata(SNAPSHOT_KEY, snapshot)


def load_snapshot() -> str:
    """The snapshot this process builds from: the run's own when reconstructing a run (the table is
    not read), else the table's (a code server loading, or a load outside any Dagster process).
    Either way it is stored with the runs launched from these definitions."""
    snapshot, keep = _load_context()
    if snapshot is None:
        snapshot = fetch_snapshot(resolve_dsn())
    keep(snapshot)
    return snapshot


def definitions_from_snapshot(snapshot: str) -> dg.Definitions:
    """Build the code location's definitions from a snapshot (jobs, sensors, and the schedule of
    each active row that declares one); invalid rows are logged and skipped.

    The retention job ``lifecycle__retention`` is always defined, its daily schedule
    ``lifecycle_retention_schedule`` unless ``LIFECYCLE_DAGSTER_RETENTION`` is ``off``
    (:mod:`~lifecycle_dagster.location.retention`). With ``LIFECYCLE_DAGSTER_ALERT_URL`` set,
    ``lifecycle_alert_sensor`` is defined too (jobs or not); with ``LIFECYCLE_DAGSTER_LOG_FORMAT=json``
    the ``lifecycle_dagster`` loggers write JSON lines.

    Raises:
        lifecycle_dagster.location.resources.AgentsSettingError: ``LIFECYCLE_DAGSTER_AGENTS`` names
            no usable registry: the load fails with it (the code location's status shows it), since
            no job could run.
        ValueError: ``LIFECYCLE_DAGSTER_LOG_FORMAT`` is neither text nor json, or
            ``LIFECYCLE_DAGSTER_RETENTION`` is neither off nor a duration of at least 1h (the
            message names the variable).
        lifecycle_dagster.location.executors.ExecutorSettingError: ``LIFECYCLE_DAGSTER_EXECUTOR``
            names no usable executor (the same).
    """
    settings = Settings.from_env()
    if settings.log_format == "json":
        configure("json", logger="lifecycle_dagster")
    rows: list[dict[str, Any]] = json.loads(snapshot)
    jobs, skipped = build_jobs(rows)
    for s in skipped:
        log.warning("workflow %s v%s skipped: %s", s.name, s.version, s.error)
    forward = [j for j in jobs if not j.name.endswith("__compensate")]
    compensation = [j for j in jobs if j.name.endswith("__compensate")]
    sensors = (
        [launch_sensor(forward), resume_sensor(forward), failure_sensor(forward), reconciler(compensation)]
        if jobs
        else []
    )
    if settings.alert_url:
        sensors.append(alert_sensor(settings.alert_url))
    retention_jobs, retention_schedules = retention_definitions(settings.retention)
    return dg.Definitions(
        jobs=[*jobs, *retention_jobs],
        sensors=sensors,
        schedules=[*build_schedules(rows, jobs), *retention_schedules],
    )


@dg.definitions
def defs() -> dg.Definitions:
    """Dagster's entry point (``-m lifecycle_dagster`` or ``lifecycle_dagster.location.definitions``)."""
    return definitions_from_snapshot(load_snapshot())
