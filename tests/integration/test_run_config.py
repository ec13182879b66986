"""What a run's config may carry: a relative context_file is refused before anything is written
(each step may run in another process, directory or machine); an absolute one is read."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lifecycle_dagster.location.job_factory import build_job
from lifecycle_dagster.store.db import connect
from lifecycle_dagster.store.sqlfiles import query

from helpers import rows

REPO = Path(__file__).resolve().parents[2]


def _run(dsn: str, instance: Any, context_file: str) -> Any:
    with connect(dsn) as conn:
        row = conn.execute(query("active_definition_by_name"), {"name": "lifecycle_v1"}).fetchone()
    assert row is not None
    config = {"resources": {"lifecycle_request": {"config": {"context_file": context_file}}}}
    return build_job(row).execute_in_process(instance=instance, run_config=config, raise_on_error=False)


def test_a_relative_context_file_is_refused_and_nothing_is_written(seeded_db: str, instance: Any) -> None:
    result = _run(seeded_db, instance, "examples/acme.json")
    assert not result.success
    failures = [getattr(e.event_specific_data, "error", None) for e in result.all_events if e.is_failure]
    errors = [f.to_string() for f in failures if f is not None]  # the resource's init failed: the run
    assert any(
        "context_file must be an absolute path (a relative one would be read from each worker's directory): "
        "'examples/acme.json'" in e
        for e in errors
    ), errors
    assert rows(seeded_db, "SELECT count(*) AS n FROM workflow_executions") == [{"n": 0}]


def test_an_absolute_context_file_is_read(seeded_db: str, instance: Any) -> None:
    result = _run(seeded_db, instance, str(REPO / "examples" / "acme.json"))
    assert result.success
    [ex] = rows(seeded_db, "SELECT status, context->>'customer' AS customer FROM workflow_executions")
    assert ex == {"status": "completed", "customer": "ACME Corp"}
