"""Agents of the chaos suite, for the code location (``LIFECYCLE_DAGSTER_AGENTS=chaos_agents:registry``)
and for queue workers (``agent serve --registry chaos_agents:registry``), with the worker hooks the
suite uses to kill workers at chosen points.

Each execution's context carries its plan: ``{"chaos": {"modes": {stage_id: mode}, "undo": {stage_id:
"slow"}}}`` (a slow undo takes ``CHAOS_SLOW_UNDO_S`` seconds, default 3). Modes:

``ok``                 returns at once (with an artifact, undone by ``compensate``)
``slow``               sleeps ``CHAOS_SLOW_S`` seconds (default 1.5) first: a worker can be killed mid-task
``hang``               never returns (the stage's timeout, or the worker's lease, has to end it)
``garbage``            returns something that is not a JSON object
``huge``               returns a 10 MB reply (over the 8 MiB limit)
``flaky``              fails half its calls (retryable), at random
``fail``               fails for good (a bad request: not retried)
``pause_after_return`` (queue workers) returns, then the worker pauses before recording the result:
                       it writes ``<CHAOS_HOOK_DIR>/<task id>.returned`` (its pid) and waits up to
                       ``CHAOS_PAUSE_S`` seconds, so the suite can kill it there (once per task)

Side effects: every call of the python and queue agents that succeeds (``ok``, ``slow``, a ``flaky``
call that passes, ``pause_after_return``) records its side effect before it returns: a row of ``chaos_effects``
(execution, stage, attempt, agent, pid, the database's clock) in the database of ``DATABASE_URL``;
``chaos_world.effects_after_attempt`` checks that no effect lands after its attempt ended.
"""

from __future__ import annotations

import os
import random
import threading
import time
from pathlib import Path
from typing import Any

import psycopg

from lifecycle_dagster.agents import (
    AgentBadRequest,
    AgentOverloaded,
    AgentRegistry,
    CompensationTask,
    Task,
    artifacts,
    default_registry,
)

#: ten megabytes of reply
HUGE = 10 * 1024 * 1024


def mode_of(context: Any, stage_id: str) -> str:
    """The mode the plan in ``context`` gives ``stage_id`` (``ok`` when none)."""
    plan = context.get("chaos") if hasattr(context, "get") else None
    modes = plan.get("modes") if isinstance(plan, dict) else None
    mode = modes.get(stage_id) if isinstance(modes, dict) else None
    return mode if isinstance(mode, str) else "ok"


def behave(mode: str, stage_id: str, attempt: int, who: str) -> Any:
    """What an agent in ``mode`` returns (or raises) for one call."""
    if mode == "slow":
        time.sleep(float(os.environ.get("CHAOS_SLOW_S", "1.5")))
    elif mode == "hang":
        threading.Event().wait()
    elif mode == "garbage":
        return ["not", "an", "object", attempt]
    elif mode == "huge":
        return {"summary": "huge", "blob": "x" * HUGE}
    elif mode == "flaky" and random.random() < 0.5:
        raise AgentOverloaded(f"{who}: flaky call failed (attempt {attempt})")
    elif mode == "fail":
        raise AgentBadRequest(f"{who}: refuses stage {stage_id}")
    return {
        "summary": f"{who} did {stage_id} (attempt {attempt})",
        "effect": True,
        "artifacts": artifacts("chaos_effect", [{"id": f"{stage_id}-effect"}]),
    }


class ChaosAgent:
    """An agent whose behaviour the execution's plan chooses, per stage."""

    def __init__(self, name: str) -> None:
        self.name = name

    def run(self, task: Task) -> dict[str, Any]:
        out: Any = behave(mode_of(task.context, task.stage_id), task.stage_id, task.attempt, self.name)
        if isinstance(out, dict) and out.pop("effect", False):
            record_effect(task.execution_id, task.stage_id, task.attempt, self.name)
        return out  # type: ignore[no-any-return]

    def compensate(self, task: CompensationTask) -> dict[str, Any]:
        plan = task.context.get("chaos")
        undo = plan.get("undo") if isinstance(plan, dict) else None
        if isinstance(undo, dict) and undo.get(task.stage_id) == "slow":
            time.sleep(float(os.environ.get("CHAOS_SLOW_UNDO_S", "3")))
        return {"summary": f"{self.name} undid {task.stage_id}", "void": task.artifacts()}


def record_effect(execution_id: str, stage_id: str, attempt: int, agent: str, tries: int = 5) -> None:
    """Record one side effect of ``agent`` (a ``chaos_effects`` row, timed by the database's clock).
    A lost connection (the suite terminates sessions) is retried ``tries`` times; then the call fails
    (retryable: the effect did not happen)."""
    for n in range(tries):
        try:
            with psycopg.connect(os.environ["DATABASE_URL"], autocommit=True, connect_timeout=5) as conn:
                conn.execute(
                    "INSERT INTO chaos_effects (execution_id, stage_id, attempt, agent, pid)"
                    " VALUES (%s, %s, %s, %s, %s)",
                    (execution_id, stage_id, attempt, agent, os.getpid()),
                )
            return
        except psycopg.OperationalError as exc:
            if n == tries - 1:
                raise AgentOverloaded(f"{agent}: side effect of {stage_id} not recorded ({exc})") from exc
            time.sleep(0.2)


#: the python agent (capabilities chaos_py and chaos_py2) and the queue agent
PY_AGENT = "Chaos Py"
QUEUE_AGENT = "Chaos Queue"


def registry() -> AgentRegistry:
    """The built-in agents plus the chaos agents; in a queue worker (CHAOS_HOOK_DIR set), the
    worker hooks too."""
    if os.environ.get("CHAOS_HOOK_DIR"):
        _install_worker_hooks(Path(os.environ["CHAOS_HOOK_DIR"]))
    base = default_registry()
    return AgentRegistry([*(base.get(n) for n in base.names()), ChaosAgent(PY_AGENT), ChaosAgent(QUEUE_AGENT)])


def _install_worker_hooks(hook_dir: Path) -> None:
    """Pause a worker after its agent returned and before it records the result, for the tasks
    whose plan says ``pause_after_return`` (first attempt only)."""
    from lifecycle_dagster.queue import worker

    if getattr(worker.Worker, "_chaos_hooked", False):
        return
    original = worker.Worker._run_agent

    def run_agent(self: worker.Worker, claimed: Any) -> Any:
        outcome = original(self, claimed)
        context = (claimed.input_data or {}).get("context") or {}
        seen = any(hook_dir.glob(f"{claimed.task_id}.*"))
        if mode_of(context, claimed.stage_id) == "pause_after_return" and not seen:
            hook_dir.mkdir(parents=True, exist_ok=True)
            (hook_dir / f"{claimed.task_id}.returned").write_text(str(os.getpid()))
            time.sleep(float(os.environ.get("CHAOS_PAUSE_S", "20")))
        return outcome

    worker.Worker._run_agent = run_agent  # type: ignore[method-assign]
    worker.Worker._chaos_hooked = True  # type: ignore[attr-defined]
