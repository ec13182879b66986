"""The code location: one job per ``workflow_definitions`` row that is active or that an
unfinished execution (status not completed, rolled_back or compensation_failed) still runs on, so
a run started on v1 finishes on v1 after v2 is activated (named query ``active_definitions``).

The table is read ONCE, when the code server loads (Dagster's INITIALIZATION load), into a JSON
snapshot that Dagster stores with every run's execution plan (reconstruction metadata). Run and
step workers rebuild the jobs from that snapshot (RECONSTRUCTION load) without querying, so a run
executes the DAG it was launched with even if the table changed since. New versions appear when
the code location reloads.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import dagster as dg
from dagster._core.definitions.definitions_load_context import (
    DefinitionsLoadContext,
    DefinitionsLoadType,
)

from lifecycle_dagster.location.job_factory import build_jobs
from lifecycle_dagster.location.sensors import failure_sensor, launch_sensor, reconciler, resume_sensor
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


def load_snapshot() -> str:
    """The snapshot this process builds from: the run's own when reconstructing, else the table's."""
    ctx = DefinitionsLoadContext.get()
    snapshot: str | None = None
    if ctx.load_type == DefinitionsLoadType.RECONSTRUCTION:
        snapshot = ctx.reconstruction_metadata.get(SNAPSHOT_KEY)
    if snapshot is None:
        snapshot = fetch_snapshot(resolve_dsn())
    ctx.add_to_pending_reconstruction_metadata(SNAPSHOT_KEY, snapshot)
    return snapshot


def definitions_from_snapshot(snapshot: str) -> dg.Definitions:
    """Build the code location's definitions from a snapshot; invalid rows are logged and skipped."""
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
    return dg.Definitions(jobs=jobs, sensors=sensors)


@dg.definitions
def defs() -> dg.Definitions:
    """Dagster's entry point (``-m lifecycle_dagster`` or ``lifecycle_dagster.location.definitions``)."""
    return definitions_from_snapshot(load_snapshot())
