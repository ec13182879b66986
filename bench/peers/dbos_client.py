"""DBOS Transact (Python): a durable workflow of five steps, its system database on the
benchmark's Postgres. DBOS has no saga construct: the undo variant catches stage 4's error in the
workflow and runs an undo step for stages 3, 2, 1 (each checkpointed, so a crash mid-undo resumes
the undo on recovery)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from dbos import DBOS

STAGES = ("discover", "qualify", "target_design", "value_realization", "integrity")


class StageFailure(Exception):
    """Stage 4 fails on purpose."""


@DBOS.step()
def stage_step(stage: str, fail: bool) -> dict[str, Any]:
    if fail:
        raise StageFailure(f"{stage} fails on purpose")
    return {"stage": stage, "summary": "noop"}


@DBOS.step()
def undo_step(stage: str) -> dict[str, Any]:
    return {"undone": stage}


@DBOS.workflow()
def lifecycle_wf() -> list[dict[str, Any]]:
    return [stage_step(s, False) for s in STAGES]


@DBOS.workflow()
def lifecycle_undo_wf() -> dict[str, Any]:
    done: list[str] = []
    try:
        for i, s in enumerate(STAGES):
            stage_step(s, i == 3)
            done.append(s)
    except StageFailure:
        undone = []
        for s in reversed(done):
            undo_step(s)
            undone.append(s)
        return {"status": "rolled_back", "undone": undone}
    return {"status": "completed", "undone": []}


def client(variant: str, client: int, dbos_url: str, **_: Any) -> Callable[[], Any]:
    DBOS(config={"name": "bench-lifecycle", "system_database_url": dbos_url, "log_level": "ERROR"})
    DBOS.launch()

    def run_ok() -> None:
        assert len(lifecycle_wf()) == len(STAGES)

    def run_undo() -> dict[str, Any]:
        handle = DBOS.start_workflow(lifecycle_undo_wf)
        result: dict[str, Any] = handle.get_result()
        steps = [s["function_name"] for s in DBOS.list_workflow_steps(handle.workflow_id)]
        assert result["undone"] == ["target_design", "qualify", "discover"], result
        return {**result, "recorded_steps": steps}

    fn: Callable[[], Any] = run_ok if variant == "ok" else run_undo
    fn()
    return fn
