"""Approval stages (docs/branches.md): the op of an approval stage records that the stage waits
for a decision (``lifecycle.approval_wait``) and returns at once; no Dagster run stays open while
a person decides. A later (continuation) run finds the stage decided and its decision as output.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from lifecycle_dagster.core.payload import safe_text
from lifecycle_dagster.engine.stage import (
    NOT_RUNNABLE,
    StageOutcome,
    StageSpec,
    StageStopped,
    ensure_execution,
    left_alone,
)
from lifecycle_dagster.store.db import Connection
from lifecycle_dagster.store.transitions import StageReadiness, approval_wait

__all__ = ["ApprovalOutcome", "reach_approval"]


@dataclass(frozen=True)
class ApprovalOutcome:
    """What the op of an approval stage found: ``outcome.state`` waiting (the stage waits until
    ``wait_until``, None: no deadline), completed (decided: ``outcome.output`` is the decision),
    or skipped, blocked, ended (as for any stage)."""

    outcome: StageOutcome
    wait_until: datetime | None = None


def reach_approval(
    conn: Connection,
    spec: StageSpec,
    *,
    run_id: str,
    execution_id: str | None,
    context: Mapping[str, Any] | None,
    resume: bool,
    on_execution: Callable[[str], None] | None = None,
) -> ApprovalOutcome:
    """Ensure the execution (as :func:`~lifecycle_dagster.engine.stage.run_stage` does) and reach
    the approval stage ``spec``: its log waits for a decision (idempotent).

    Raises:
        StageStopped: the stage may not wait (the execution stopped, another run's, a parent not done).
        psycopg.Error: the database could not be reached.
    """
    try:
        exec_id = ensure_execution(conn, spec, run_id, execution_id, context, resume)
        if on_execution is not None:
            on_execution(exec_id)
        left = left_alone(conn, spec, exec_id)
        if left is not None and left.state != StageReadiness.WAITING:
            return ApprovalOutcome(left)
        waited = approval_wait(
            conn, execution_id=exec_id, stage_id=spec.stage_id, ancestors=spec.ancestors, run_id=run_id
        )
    except NOT_RUNNABLE as exc:
        raise StageStopped(
            safe_text(exc.diag.message_primary or exc),
            code="not_runnable",
            execution_id=str(execution_id or ""),
            stage_id=spec.stage_id,
            attempt=1,
        ) from exc
    outcome = StageOutcome(
        execution_id=exec_id,
        log_id="",
        task_id=None,
        agent_name="",
        attempt=1,
        duration_ms=0.0,
        output=dict(waited.output or {}),
        execution_status="",
        already_completed=waited.status == "completed",
        state=waited.status,
    )
    return ApprovalOutcome(outcome, waited.wait_until)
