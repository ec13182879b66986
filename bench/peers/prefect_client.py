"""Prefect 3: a flow of five tasks against a Prefect server whose database is the benchmark's
Postgres. The undo variant runs the tasks inside ``prefect.transactions.transaction()``, each of
stages 1-3 with an ``on_rollback`` hook: stage 4's failure rolls the transaction back, which calls
the hooks of the tasks that completed in it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prefect import flow, task
from prefect.transactions import transaction

STAGES = ("discover", "qualify", "target_design", "value_realization", "integrity")
UNDONE: list[str] = []


def _stage_task(stage: str) -> Any:
    @task(name=stage)
    def run_stage(fail: bool = False) -> dict[str, Any]:
        if fail:
            raise RuntimeError(f"{stage} fails on purpose")
        return {"stage": stage, "summary": "noop"}

    @run_stage.on_rollback
    def undo(txn: Any) -> None:
        UNDONE.append(stage)

    return run_stage


TASKS = [_stage_task(s) for s in STAGES]


@flow(name="lifecycle", persist_result=False)
def lifecycle_flow() -> list[dict[str, Any]]:
    return [t() for t in TASKS]


@flow(name="lifecycle_undo")
def lifecycle_undo_flow() -> None:
    with transaction():
        for i, t in enumerate(TASKS[:4]):
            t(fail=i == 3)
    TASKS[4]()


def client(variant: str, client: int, **_: Any) -> Callable[[], Any]:
    def run_ok() -> None:
        assert len(lifecycle_flow()) == len(STAGES)

    def run_undo() -> dict[str, Any]:
        UNDONE.clear()
        state = lifecycle_undo_flow(return_state=True)
        return {"status": state.type.value, "undone": list(UNDONE)}

    fn: Callable[[], Any] = run_ok if variant == "ok" else run_undo
    fn()
    return fn
