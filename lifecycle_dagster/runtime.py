"""The runtime of one stage: what a stage op does, with no Dagster in it.

:func:`run_stage` makes four transitions, each one SQL function call (one transaction):
``lifecycle_ensure_execution`` (create or adopt the execution), ``lifecycle_start_stage`` (stage
log in_progress, stage_started, routing, the task_queue dispatch row), then the agent call, then
``lifecycle_complete_stage`` or ``lifecycle_fail_stage``. Upstream outputs come from Postgres
(``output_data`` of the ancestors' logs), never from Dagster's IO managers.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from psycopg.types.json import Jsonb

from lifecycle_dagster.agents import AgentError, AgentRegistry, Task
from lifecycle_dagster.db import Connection
from lifecycle_dagster.sqlfiles import query

#: the largest agent output stored, in bytes of JSON (larger outputs fail the stage)
MAX_OUTPUT_BYTES = 8 * 1024 * 1024


@dataclass(frozen=True)
class StageSpec:
    """One stage of one definition version, as a job was built with it.

    ``ancestors``: ``{stage_id: capability}`` of every transitive upstream stage.
    """

    definition_id: str
    stage_id: str
    capability: str
    ancestors: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class StageOutcome:
    """What a stage did: the ids, the agent, and ``output`` (the agent's JSON object)."""

    execution_id: str
    log_id: str
    task_id: str | None
    agent_name: str
    attempt: int
    duration_ms: float
    output: dict[str, Any]
    execution_status: str


class StageFailed(Exception):
    """The stage failed and that was recorded (stage log, task, events, execution).

    ``code``: short error code (``no_agent``, ``agent_not_registered``, an agent's own code,
    ``agent_crashed``, ``bad_output``); ``execution_id``, ``stage_id``; str() is the message.
    """

    def __init__(self, message: str, *, code: str, execution_id: str, stage_id: str) -> None:
        super().__init__(message)
        self.code = code
        self.execution_id = execution_id
        self.stage_id = stage_id


def _check_output(output: object) -> tuple[dict[str, Any] | None, str | None]:
    """Return (output, None) when storable, else (None, reason)."""
    if not isinstance(output, dict):
        return None, f"agent returned {type(output).__name__}, not a JSON object"
    try:
        text = json.dumps(output, allow_nan=False)
    except (TypeError, ValueError) as exc:
        return None, f"agent output is not JSON: {exc}"
    if "\\u0000" in text:
        return None, "agent output contains a NUL character, which Postgres jsonb cannot store"
    if len(text.encode()) > MAX_OUTPUT_BYTES:
        return None, f"agent output is {len(text.encode())} bytes, over the {MAX_OUTPUT_BYTES}-byte limit"
    return output, None


def run_stage(
    conn: Connection,
    spec: StageSpec,
    *,
    run_id: str,
    attempt: int,
    registry: AgentRegistry,
    execution_id: str | None = None,
    context: Mapping[str, Any] | None = None,
) -> StageOutcome:
    """Run one attempt (1-based) of a stage inside Dagster run ``run_id``.

    ``conn`` must be in autocommit mode: each call below is its own transaction.

    Raises:
        StageFailed: the stage failed; the failure is recorded in Postgres.
        psycopg.Error: a transition was refused (e.g. the execution is no longer in_progress, an
            upstream stage has not completed); nothing was written by the refused call.
    """
    execution = conn.execute(
        query("ensure_execution"),
        {
            "definition_id": spec.definition_id,
            "run_id": run_id,
            "execution_id": execution_id or None,
            "context": Jsonb(dict(context or {})),
        },
    ).fetchone()
    assert execution is not None
    exec_id = str(execution["id"])
    started = conn.execute(
        query("start_stage"),
        {
            "execution_id": exec_id,
            "stage_id": spec.stage_id,
            "capability": spec.capability,
            "ancestors": Jsonb(dict(spec.ancestors)),
            "attempt": attempt,
        },
    ).fetchone()
    assert started is not None
    log_id, task_id = str(started["log_id"]), started["task_id"]

    def fail(message: str, code: str) -> StageFailed:
        conn.execute(
            query("fail_stage"),
            {"log_id": log_id, "task_id": task_id, "error": message, "error_code": code},
        )
        return StageFailed(message, code=code, execution_id=exec_id, stage_id=spec.stage_id)

    if started["agent_id"] is None:
        raise fail(
            f"no active agent serves capability '{spec.capability}' (stage '{spec.stage_id}')",
            "no_agent",
        )
    agent_name = str(started["agent_name"])
    try:
        agent = registry.get(agent_name)
    except KeyError as exc:
        raise fail(str(exc.args[0]) if exc.args else str(exc), "agent_not_registered") from exc

    t0 = time.perf_counter()
    try:
        task = Task.from_input_data(
            execution_id=exec_id,
            stage_id=spec.stage_id,
            capability=spec.capability,
            attempt=attempt,
            input_data=started["input_data"],
        )
        raw = agent.run(task)
    except AgentError as exc:
        raise fail(f"{agent_name}: {exc}", exc.code) from exc
    except Exception as exc:  # an agent bug must still be recorded as a stage failure
        raise fail(f"{agent_name} crashed: {type(exc).__name__}: {exc}", "agent_crashed") from exc
    duration_ms = (time.perf_counter() - t0) * 1000.0
    output, problem = _check_output(raw)
    if output is None:
        raise fail(f"{agent_name}: {problem}", "bad_output")

    done = conn.execute(
        query("complete_stage"), {"log_id": log_id, "task_id": task_id, "output": Jsonb(output)}
    ).fetchone()
    assert done is not None
    return StageOutcome(
        execution_id=exec_id,
        log_id=log_id,
        task_id=str(task_id) if task_id else None,
        agent_name=agent_name,
        attempt=attempt,
        duration_ms=duration_ms,
        output=output,
        execution_status=str(done["execution_status"]),
    )
