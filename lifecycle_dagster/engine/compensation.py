"""Saga compensation: undoing the completed stages of a failed or cancelled execution.

The compensation job of a definition (``<name>__v<version>__compensate``) has one op per stage
(``<job>__UNDO__<stage>``; stage ids are lower-case, so these never collide with stage ops). The
op of a stage waits for the ops of every stage that depended on it, so compensations run in strict
reverse topological order; the database refuses any other order too
(``lifecycle.undo_start``). Each op:

1. ``lifecycle.undo_start``: ``skip`` (the stage never completed, or says
   ``compensate: false``), ``done`` (already compensated) or ``compensate``;
2. the undo: the stage's ``compensate`` capability routed to an agent (given the stage's output),
   else the stage's own agent's ``compensate()``, else nothing to undo. With the stage's timeout
   it runs in a killable child process (:func:`~lifecycle_dagster.agents.invoke.call_agent`), killed
   at the timeout (a retryable failure) or as soon as this run no longer owns the compensation
   (taken over by the reconciler: nothing is recorded); without one, in the op's process. The op
   keeps the run's heartbeat beating, so a killed compensation run is seen and taken over;
3. ``lifecycle.undo_complete`` voids the artifacts the undo names and marks the stage
   ``compensated``; the last one rolls the execution back. A failed undo is retried by the
   compensation policy (the stage's delays, at least :data:`MIN_UNDO_ATTEMPTS` attempts, every
   error retryable); when attempts run out the stage and the execution are
   ``compensation_failed``, naming the stage.
"""

from __future__ import annotations

import contextlib
import functools
import random
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from lifecycle_dagster import tracing
from lifecycle_dagster.agents import Agent, AgentRegistry, CompensationTask, Task, can_compensate
from lifecycle_dagster.agents.errors import AttemptStopped, classify
from lifecycle_dagster.agents.invoke import call_agent
from lifecycle_dagster.core.payload import check_output, safe_text
from lifecycle_dagster.core.retry import MAX_WAIT_S, RetryPolicy
from lifecycle_dagster.engine.traces import ExecutionTrace, execution_trace
from lifecycle_dagster.store.db import Connection
from lifecycle_dagster.store.sqlfiles import query
from lifecycle_dagster.store.transitions import (
    UndoAction,
    UndoStarted,
    compensation_start,
    undo_complete,
    undo_fail,
    undo_start,
)

#: run tag of a compensation run that takes over from a finished compensation run
TAKEOVER_TAG = "lifecycle/takeover"
#: an undo is tried at least this many times
MIN_UNDO_ATTEMPTS = 3


def compensation_job_name(job: str) -> str:
    """``<job>__compensate``."""
    return f"{job}__compensate"


def undo_op_name(job: str, stage_id: str) -> str:
    """``<job>__UNDO__<stage>``."""
    return f"{job}__UNDO__{stage_id}"


def undo_policy(policy: RetryPolicy) -> RetryPolicy:
    """The compensation policy of a stage: its delays, at least MIN_UNDO_ATTEMPTS attempts, and
    no error code exempt from retrying."""
    return replace(policy, max_attempts=max(policy.max_attempts, MIN_UNDO_ATTEMPTS), non_retryable=())


@dataclass(frozen=True)
class UndoSpec:
    """One stage's compensation: its capability, its DAG ``compensate`` entry and the stages that
    depended on it (``dependents``: its descendants)."""

    stage_id: str
    capability: str
    compensate: str | bool | None = None
    dependents: tuple[str, ...] = ()
    policy: RetryPolicy = field(default_factory=RetryPolicy)
    #: seconds an undo call may run (the stage's timeout; None: no limit, run in the op's process)
    timeout_s: float | None = None


@dataclass(frozen=True)
class UndoOutcome:
    """What an undo op did: ``action`` is skip, done or compensated."""

    action: str
    execution_status: str = ""
    voided: int = 0
    summary: str = ""


class UndoRetry(Exception):
    """The undo failed and a retry was recorded: wait ``delay_s`` seconds."""

    def __init__(self, message: str, delay_s: float, max_attempts: int) -> None:
        super().__init__(message)
        self.delay_s = delay_s
        self.max_attempts = max_attempts


class UndoFailed(Exception):
    """The undo failed for good: the stage and the execution are compensation_failed."""


class NoUndoAgent(Exception):
    """No agent serves the stage's compensate capability: retrying cannot help."""


class UndoStopped(Exception):
    """The undo was stopped because this run no longer owns the compensation (another run took it
    over, or the execution is no longer compensating); nothing was recorded."""


class _UndoCall:
    """An agent's ``compensate(task)`` as an agent's ``run`` (what :func:`call_agent` calls), so an
    undo runs in a killable child like a stage. Picklable when the agent is."""

    def __init__(self, agent: Any, task: CompensationTask) -> None:
        self.name = str(agent.name)
        self.agent = agent
        self.task = task

    def run(self, _task: Task) -> Any:
        return self.agent.compensate(self.task)


def _compensation_lost(conn: Connection, execution_id: str, run_id: str) -> bool:
    """Whether run ``run_id`` no longer owns the execution's compensation."""
    row = conn.execute(query("compensation_owner"), {"execution_id": execution_id}).fetchone()
    return row is None or row["status"] != "compensating" or row["compensation_run_id"] != run_id


def run_undo(
    conn: Connection,
    spec: UndoSpec,
    *,
    execution_id: str,
    run_id: str,
    attempt: int,
    registry: AgentRegistry,
    takeover: bool = False,
    draw: Callable[[], float] = random.random,
) -> UndoOutcome:
    """Compensate one stage of an execution (see the module docstring).

    Raises:
        UndoRetry: a retry was recorded. UndoFailed: the undo failed for good (recorded).
        UndoStopped: another run took the compensation over while the undo ran (nothing recorded).
        psycopg.Error: the database refused (not compensating, order violated, another run owns
            the compensation).
        UnknownStatusError: a transition returned a code the seam does not know.
    """
    started = undo_start(
        conn,
        execution_id=execution_id,
        stage_id=spec.stage_id,
        run_id=run_id,
        dependents=list(spec.dependents),
        attempt=attempt,
        takeover=takeover,
    )
    if started.action is not UndoAction.COMPENSATE:
        return UndoOutcome(action=started.action.value)
    log_id = str(started.log_id)
    trace = execution_trace(conn, execution_id, run_id)
    attributes = _undo_attributes(trace, spec, run_id, attempt, started)
    call = _Caller(spec.timeout_s, functools.partial(_compensation_lost, conn, execution_id, run_id), attributes)
    with _undo_span(spec, trace, attributes):
        try:
            result = _undo(
                conn, spec, registry, call, execution_id, attempt, started.context, started.output, started.agent_name
            )
            void = _checked_void(result)
        except AttemptStopped as exc:
            raise UndoStopped(
                f"undo of stage '{spec.stage_id}' stopped: run {run_id} no longer owns the compensation"
            ) from exc
        except Exception as exc:
            raise _record_undo_failure(conn, spec, log_id, attempt, exc, draw) from exc
        status = undo_complete(conn, log_id=log_id, void=void, result=result, attempt=attempt)
    return UndoOutcome(
        action="compensated",
        execution_status=status.value,
        voided=len(void),
        summary=str(result.get("summary", "")),
    )


def _undo_attributes(
    trace: ExecutionTrace | None, spec: UndoSpec, run_id: str, attempt: int, started: UndoStarted
) -> dict[str, tracing.AttributeValue]:
    """The attributes of an undo's spans (empty when tracing is off); ``lifecycle.agent``: the
    agent that ran the stage (``started``, from ``lifecycle.undo_start``)."""
    if trace is None:
        return {}
    return trace.with_attributes(
        {
            tracing.ATTR_RUN_ID: run_id,
            tracing.ATTR_STAGE: spec.stage_id,
            tracing.ATTR_CAPABILITY: spec.compensate if isinstance(spec.compensate, str) else spec.capability,
            tracing.ATTR_ATTEMPT: attempt,
            tracing.ATTR_AGENT: started.agent_name,
        }
    )


#: ``lifecycle.outcome`` of an undo that ended in each error
_UNDO_OUTCOMES: dict[type[Exception], str] = {UndoRetry: "retrying", UndoFailed: "failed", UndoStopped: "stopped"}


def _undo_error_code(exc: BaseException | None) -> str:
    """The ``lifecycle.error_code`` of what made an undo fail."""
    if isinstance(exc, NoUndoAgent):
        return "no_agent"
    if isinstance(exc, ValueError):
        return "bad_output"
    return classify(exc).code if exc is not None else "undo_failed"


@contextlib.contextmanager
def _undo_span(
    spec: UndoSpec, trace: ExecutionTrace | None, attributes: Mapping[str, tracing.AttributeValue]
) -> Iterator[None]:
    """The span ``undo <stage>`` (a child of the execution's root; none when tracing is off):
    ``lifecycle.outcome`` compensated, retrying, failed or stopped as the block ends."""
    if trace is None:
        yield
        return
    with tracing.span(f"undo {spec.stage_id}", parent=trace.trace_parent, attributes=attributes) as span:
        try:
            yield
        except UndoStopped:
            tracing.end_with(span, "stopped")
            raise
        except (UndoRetry, UndoFailed) as exc:
            tracing.end_with(span, _UNDO_OUTCOMES[type(exc)], _undo_error_code(exc.__cause__), str(exc))
            raise
        except Exception:
            span.set_attribute(tracing.ATTR_OUTCOME, "error")
            raise
        tracing.end_with(span, "compensated")


def _checked_void(result: dict[str, Any]) -> list[Any]:
    """The artifacts an undo's result names to void (``void``: a list of ``{"kind", "key"}``).

    Raises:
        ValueError: the result is not a storable JSON object, or its ``void`` has another shape.
    """
    problem = check_output(result, what="the undo's result")
    void = result.get("void", [])
    if problem is None and not (
        isinstance(void, list) and all(isinstance(v, dict) and {"kind", "key"} <= v.keys() for v in void)
    ):
        problem = 'the undo\'s result: "void" must be a list of {"kind", "key"}'
    if problem is not None:
        raise ValueError(problem)
    return list(void)


def _record_undo_failure(
    conn: Connection, spec: UndoSpec, log_id: str, attempt: int, exc: Exception, draw: Callable[[], float]
) -> UndoRetry | UndoFailed:
    """Record a failed undo (``lifecycle.undo_fail``): a retry while the compensation policy allows
    one (never when no agent serves the compensate capability), else the compensation's failure.
    Returns the error for the caller to raise."""
    policy = undo_policy(spec.policy)
    message = safe_text(classify(exc).message)
    if attempt < policy.max_attempts and not isinstance(exc, NoUndoAgent):
        delay = min(policy.delay(attempt, draw()), MAX_WAIT_S)
        undo_fail(conn, log_id=log_id, error=message, final=False, attempt=attempt, delay_s=delay)
        return UndoRetry(f"undo of stage '{spec.stage_id}' failed ({message}); retrying", delay, policy.max_attempts)
    final = f"{message} (attempt {attempt} of {policy.max_attempts})"
    undo_fail(conn, log_id=log_id, error=final, final=True, attempt=attempt, delay_s=None)
    return UndoFailed(f"compensation of stage '{spec.stage_id}' failed: {final}")


@dataclass(frozen=True)
class _Caller:
    """How an undo calls its agent: with the stage's timeout, :func:`call_agent` in a killable child
    (killed at the timeout, or when ``lost()`` says the run no longer owns the compensation), as
    for a stage attempt; without one, in the op's process."""

    timeout_s: float | None
    lost: Callable[[], bool]
    #: the attributes of the call's span ``agent <name>`` (empty: tracing off)
    attributes: Mapping[str, tracing.AttributeValue] = field(default_factory=dict)

    def __call__(self, agent: Agent, task: Task) -> Any:
        attributes = {**self.attributes, tracing.ATTR_AGENT: agent.name}
        with tracing.span(f"agent {agent.name}", attributes=attributes) as span:
            try:
                if self.timeout_s is None:
                    result = agent.run(task)  # in the op's process, as before (its errors recorded as raised)
                else:
                    result = call_agent(agent, task, timeout_s=self.timeout_s, should_stop=self.lost)
            except AttemptStopped:
                tracing.end_with(span, "stopped")
                raise
            except Exception as exc:
                tracing.end_with(span, "failed", _undo_error_code(exc), str(exc))
                raise
            tracing.end_with(span, "completed")
            return result


def _undo(
    conn: Connection,
    spec: UndoSpec,
    registry: AgentRegistry,
    call: _Caller,
    execution_id: str,
    attempt: int,
    context: dict[str, Any],
    output: dict[str, Any],
    agent_name: str | None,
) -> dict[str, Any]:
    """Call the undo of a stage; return its JSON result (``void``: the artifacts to void)."""
    if isinstance(spec.compensate, str):
        row = conn.execute(query("route_capability"), {"capability": spec.compensate}).fetchone()
        if row is None or row["agent_name"] is None:
            raise NoUndoAgent(f"no active agent serves the compensate capability '{spec.compensate}'")
        agent = registry.get(str(row["agent_name"]))
        task = Task(
            execution_id,
            spec.stage_id,
            spec.compensate,
            attempt,
            context,
            {spec.stage_id: {"capability": spec.capability, "output": output}},
        )
        result: dict[str, Any] = call(agent, task)
        if not isinstance(result, dict):
            raise ValueError(f"the undo's result must be a JSON object, got {type(result).__name__}")
        result.setdefault("undo", f"capability {spec.compensate} ({agent.name})")
        if "void" not in result:
            result["void"] = CompensationTask(
                execution_id, spec.stage_id, spec.capability, attempt, context, output
            ).artifacts()
        return result
    if agent_name and agent_name not in registry.names():
        row = conn.execute(query("agent_kind"), {"name": agent_name}).fetchone()
        if row is not None and row["kind"] != "python":
            # an http or queue agent has no undo of its own (only a `compensate` capability can undo it)
            return {"summary": f"nothing to undo ({agent_name} is a {row['kind']} agent)", "undo": "none", "void": []}
    stage_agent = registry.get(agent_name) if agent_name else None
    if stage_agent is not None and can_compensate(stage_agent):
        undo_task = CompensationTask(execution_id, spec.stage_id, spec.capability, attempt, context, output)
        result = call(
            _UndoCall(stage_agent, undo_task),
            Task(execution_id, spec.stage_id, spec.capability, attempt, context, {}),
        )
        if isinstance(result, dict):
            result.setdefault("undo", f"{stage_agent.name}.compensate")
        return result
    who = agent_name or "no agent"
    return {"summary": f"nothing to undo ({who} has no undo)", "undo": "none", "void": []}


def perform_compensation(conn: Connection, execution_id: str, reason: str) -> None:
    """Start compensating (``lifecycle.compensation_start``, which the runbook's
    ``perform_workflow_compensation`` wraps): idempotent."""
    compensation_start(conn, execution_id=execution_id, reason=reason)


def compensate_if_due(conn: Connection, execution_id: str) -> bool:
    """Start compensation when it is due for this execution (see lifecycle.compensation_due)."""
    due = conn.execute(query("compensation_due_for"), {"execution_id": execution_id}).fetchone()
    if due is None:
        return False
    compensation_start(conn, execution_id=execution_id, reason=due["reason"])
    return True
