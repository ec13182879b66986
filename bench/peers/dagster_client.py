"""lifecycle-dagster: the lifecycle job (no-op agents) with ``execute_in_process`` on the
dagster-postgres instance; the undo variant fails stage 4 (a non-retryable agent error), starts
compensation as the failure sensor does (``perform_workflow_compensation``) and runs the
compensation job, which undoes stages 3, 2, 1 in reverse order."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from psycopg.types.json import Jsonb

from bench.common import CONTEXT, connect, lifecycle_row, noop_registry

QUIET: dict[str, Any] = {"loggers": {"console": {"config": {"log_level": "CRITICAL"}}}}


def client(variant: str, client: int, app_dsn: str, dagster_home: str, **_: Any) -> Callable[[], Any]:
    import os

    import dagster as dg

    from lifecycle_dagster.engine.compensation import perform_compensation
    from lifecycle_dagster.location.job_factory import EXECUTION_ID_TAG, build_compensation_job, build_job
    from lifecycle_dagster.location.resources import agents_resource
    from lifecycle_dagster.store.sqlfiles import query

    os.environ["DATABASE_URL"] = app_dsn
    os.environ["DAGSTER_HOME"] = dagster_home
    instance = dg.DagsterInstance.from_config(dagster_home)
    row = lifecycle_row(app_dsn)
    job = build_job(row)
    comp_job = build_compensation_job(row)
    ok = {"lifecycle_agents": agents_resource(noop_registry())}
    failing = {"lifecycle_agents": agents_resource(noop_registry("Realization Agent"))}
    run_config = {"resources": {"lifecycle_request": {"config": {"context": CONTEXT}}}, **QUIET}

    def run_ok() -> None:
        assert job.execute_in_process(instance=instance, run_config=run_config, resources=ok).success

    def run_undo() -> dict[str, Any]:
        with connect(app_dsn) as conn:
            created = conn.execute(
                query("create_execution"), {"definition_id": row["id"], "context": Jsonb(CONTEXT), "created_by": None}
            ).fetchone()
            assert created is not None
            eid = str(created["id"])
        tags = {EXECUTION_ID_TAG: eid}
        fwd = job.execute_in_process(
            instance=instance, run_config=QUIET, resources=failing, tags=tags, raise_on_error=False
        )
        assert not fwd.success
        with connect(app_dsn) as conn:
            perform_compensation(conn, eid, "bench: stage 4 failed")  # what the failure sensor does
        comp = comp_job.execute_in_process(instance=instance, run_config=QUIET, resources=ok, tags=tags)
        assert comp.success
        with connect(app_dsn) as conn:
            status = conn.execute(query("execution_status"), {"execution_id": eid}).fetchone()
            undone = [
                r["stage_id"]
                for r in conn.execute(
                    "SELECT stage_id FROM workflow_events"
                    " WHERE execution_id = %(e)s AND event_type = 'stage_compensated'"
                    " ORDER BY id",
                    {"e": eid},
                )
            ]
        assert status is not None and status["status"] == "rolled_back", status
        return {"undone": undone, "status": status["status"]}

    fn: Callable[[], Any] = run_ok if variant == "ok" else run_undo
    fn()  # warm-up
    return fn
