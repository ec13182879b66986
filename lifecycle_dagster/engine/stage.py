"""The runtime of one stage attempt: what a stage op does, with no Dagster in it.

One attempt makes these transitions, each one SQL function call (one transaction):
``lifecycle.execution_ensure`` (create or adopt the execution), ``lifecycle.stage_start`` (stage
log in_progress, stage_started, routing, the task_queue dispatch row), the agent call, then one of
``lifecycle.stage_complete``, ``lifecycle.stage_schedule_retry`` (a retryable error with attempts left:
the log goes back to pending with its not-before time) or ``lifecycle.stage_fail`` (for good).
Every result is fenced by the database: a result for a stale attempt, after the attempt's
deadline or after the execution stopped being in progress is refused and recorded
(``stage_result_refused``), never applied. Upstream outputs come from Postgres (the ancestors'
``output_data``), never from Dagster's IO managers.

Error classes (see :class:`lifecycle_dagster.agents.AgentError`): an agent's ``AgentError`` is
retryable or not by its class; a crash, a timeout and an unstorable output are retryable; no agent
for the capability and an unregistered agent are not. Codes in the stage's ``non_retryable`` list
are never retried.

Circuit breakers (``sql/schema/07_breakers.sql``): routing skips agents whose breaker is open;
when no agent may be called the attempt fails at once with the non-retryable ``breaker_open``
(no task, no call). The database records each call's outcome against the agent's and the
capability's breakers inside the transition that ends the attempt.

Rate limits (``sql/schema/16_rate_limits.sql``, docs/rate-limits.md): before each call of a python
or http agent the op takes a token of the agent's and the capability's limits
(``lifecycle.stage_rate_take``); with none left it sleeps until one is due (at most
:data:`RATE_SLEEP_MAX_S` at a time, the execution re-checked on each try) and tries again. Waiting is
neither an attempt nor a failure, and uses none of the stage's timeout; each wait writes one
``stage_rate_limited`` event.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import random
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import psycopg
from opentelemetry.trace import Span, SpanKind

from lifecycle_dagster import tracing
from lifecycle_dagster.agents import AgentError, AgentRegistry, AgentTimeout, Task
from lifecycle_dagster.agents.errors import AttemptError, AttemptStopped, classify
from lifecycle_dagster.agents.http import http_agent
from lifecycle_dagster.agents.invoke import call_agent
from lifecycle_dagster.core.payload import check_output, safe_text
from lifecycle_dagster.core.retry import MAX_WAIT_S, RetryPolicy
from lifecycle_dagster.engine.traces import ExecutionTrace, execution_trace
from lifecycle_dagster.queue.wait import queue_wait_s, wait_for_task
from lifecycle_dagster.store.db import Connection
from lifecycle_dagster.store.fetch import fetch_one
from lifecycle_dagster.store.sqlfiles import query
from lifecycle_dagster.store.transitions import (
    AgentKind,
    RateTakeStatus,
    StageCompleteStatus,
    StageReadiness,
    StageRetryStatus,
    StartedStage,
    TaskState,
    TaskStatus,
    execution_ensure,
    stage_complete,
    stage_edges_fired,
    stage_fail,
    stage_rate_take,
    stage_readiness,
    stage_schedule_retry,
    stage_start,
    task_abandon,
)

log = logging.getLogger(__name__)

#: the longest sleep (s) of a stage op waiting for a rate-limit token: it asks again after it
RATE_SLEEP_MAX_S = 5.0


@dataclass(frozen=True)
class StageSpec:
    """One stage of one definition version, as a job was built with it.

    ``ancestors``: ``{stage_id: capability}`` of every transitive upstream stage;
    ``timeout_s``: seconds an attempt may run (None: no limit).
    """

    definition_id: str
    stage_id: str
    capability: str
    ancestors: Mapping[str, str] = field(default_factory=dict)
    policy: RetryPolicy = field(default_factory=RetryPolicy)
    timeout_s: float | None = None


@dataclass(frozen=True)
class StageOutcome:
    """A completed attempt: the ids, the agent, and ``output`` (the agent's JSON object)."""

    execution_id: str
    log_id: str
    task_id: str | None
    agent_name: str
    attempt: int
    duration_ms: float
    output: dict[str, Any]
    execution_status: str
    #: True when a resumed run found the stage completed by an earlier run (nothing was run)
    already_completed: bool = False
    #: completed (the stage ran, or had: ``already_completed``), or what the op found instead
    #: (:class:`~lifecycle_dagster.store.transitions.StageReadiness`): skipped (no fired edge
    #: reaches it), waiting (an approval stage waits for its decision), blocked (a parent waits),
    #: ended (a stage ended the execution early); only a completed stage's edges may fire
    state: str = "completed"


class StageError(Exception):
    """Base of what a stage attempt can end in besides success; str() is the message."""

    def __init__(self, message: str, *, code: str, execution_id: str, stage_id: str, attempt: int) -> None:
        super().__init__(message)
        self.code = code
        self.execution_id = execution_id
        self.stage_id = stage_id
        self.attempt = attempt


class StageFailed(StageError):
    """The stage failed for good; recorded (stage log, task, events, execution failed)."""


class StageRetry(StageError):
    """The attempt failed and a retry was recorded; wait ``delay_s`` seconds, then run attempt + 1."""

    def __init__(self, message: str, *, delay_s: float, max_attempts: int, **kw: Any) -> None:
        super().__init__(message, **kw)
        self.delay_s = delay_s
        self.max_attempts = max_attempts


class StageStopped(StageError):
    """The attempt may not go on: the execution is not in progress (cancelled, failed by a sibling)
    or the database refused the result as stale. Never retried."""


def _unrouted(conn: Connection, spec: StageSpec) -> AttemptError:
    """Why routing gave no agent: none serves the capability (``no_agent``), or the circuit breakers
    in the way are open (``breaker_open``, naming them). Neither is retried."""
    breakers = [dict(r) for r in conn.execute(query("capability_breakers"), {"capability": spec.capability})]
    if not any(b["scope"] == "agent" for b in breakers):
        return AttemptError(
            "no_agent",
            f"no active agent serves capability '{spec.capability}' (stage '{spec.stage_id}'): give an active "
            "agent that capability (an agent_ontologies row, domain 'orchestration') or activate a version "
            "that does not need it",
            False,
            "NoAgent",
        )
    blocking = [
        f"{b['scope']} '{b['name']}' "
        + (f"open since {b['opened_at'].isoformat()}" if b["state"] == "open" else "half_open with no probe left")
        for b in breakers
        if b["state"] != "closed"
    ]
    return AttemptError(
        "breaker_open",
        f"circuit breaker open: no agent may be called for capability '{spec.capability}' "
        f"(stage '{spec.stage_id}'); open breakers: {', '.join(blocking) or 'none any more (closed meanwhile)'}",
        False,
        "BreakerOpen",
    )


@dataclass(frozen=True)
class Attempt:
    """One started attempt of a stage (the start step's result): the execution, the stage log, its
    task (None: no task), the attempt's number and the agent routed to it (``agent_kind`` None:
    none may be called). A queue task's attempt may move on while it waits (a reaped lease): the
    call step then returns a copy with the new ``number``."""

    execution_id: str
    stage_id: str
    log_id: str
    task_id: str | None
    number: int
    agent_id: str | None
    agent_name: str
    agent_kind: AgentKind | None
    input_data: Any
    #: the execution's trace, its attributes naming the run, stage and capability too (None: tracing off)
    trace: ExecutionTrace | None = None

    @classmethod
    def of(cls, execution_id: str, stage_id: str, started: StartedStage, trace: ExecutionTrace | None) -> Attempt:
        """The attempt ``lifecycle.stage_start`` started (``trace``: the execution's, or None)."""
        return cls(
            execution_id=execution_id,
            stage_id=stage_id,
            log_id=started.log_id,
            task_id=started.task_id,
            number=started.attempt,
            agent_id=started.agent_id,
            agent_name=started.agent_name or "",
            agent_kind=started.agent_kind if started.agent_id is not None else None,
            input_data=started.input_data,
            trace=trace,
        )

    def ids(self) -> dict[str, Any]:
        """The keyword arguments of a :class:`StageError` about this attempt."""
        return {"execution_id": self.execution_id, "stage_id": self.stage_id, "attempt": self.number}

    def span_attributes(self) -> dict[str, tracing.AttributeValue]:
        """The attributes of this attempt's spans (empty when tracing is off)."""
        if self.trace is None:
            return {}
        return self.trace.with_attributes(
            {tracing.ATTR_ATTEMPT: self.number, tracing.ATTR_AGENT: self.agent_name or None}
        )


@dataclass(frozen=True)
class AgentOutput:
    """An agent's output, checked but not recorded yet, and how long the call took."""

    output: dict[str, Any]
    duration_ms: float


#: executions this process ensured, by (database, run id, definition id, execution id, resume): their ids. A
#: run's first stage op ensures its execution (creates or adopts it, binds it to the run, starts it);
#: the others of the run in this process skip that round trip, and ``lifecycle.stage_start`` refuses
#: them if another run has taken the execution over.
_ENSURED: dict[tuple[str, str, str, str, bool], str] = {}
_ENSURED_MAX = 256

#: what ``lifecycle.execution_ensure`` and ``lifecycle.stage_start`` raise when the stage may not run
NOT_RUNNABLE = (
    psycopg.errors.ObjectNotInPrerequisiteState,  # the execution is not in progress, an upstream stage is not done
    psycopg.errors.UniqueViolation,  # the execution is bound to another run
    psycopg.errors.CheckViolation,  # an illegal transition
    psycopg.errors.NoDataFound,  # an unknown execution or definition
    psycopg.errors.InvalidParameterValue,  # the execution belongs to another definition
    psycopg.errors.InvalidTextRepresentation,  # an execution id that is not a uuid
)


def ensure_execution(
    conn: Connection,
    spec: StageSpec,
    run_id: str,
    execution_id: str | None,
    context: Mapping[str, Any] | None,
    resume: bool,
) -> str:
    """The id of the execution run ``run_id`` executes (``lifecycle.execution_ensure`` once per run
    and process)."""
    database = f"{conn.info.host}:{conn.info.port}/{conn.info.dbname}"
    key = (database, run_id, spec.definition_id, execution_id or "", resume)
    found = _ENSURED.get(key)
    if found is not None:
        return found
    ensured = execution_ensure(
        conn,
        definition_id=spec.definition_id,
        run_id=run_id,
        execution_id=execution_id or None,
        context=dict(context or {}),
        resume=resume,
    )
    if len(_ENSURED) >= _ENSURED_MAX:
        del _ENSURED[next(iter(_ENSURED))]
    _ENSURED[key] = ensured.id
    return ensured.id


def execution_of_runs(conn: Connection, definition_id: str, run_ids: Sequence[str]) -> str | None:
    """The id of the execution of definition ``definition_id`` that one of the Dagster runs
    ``run_ids`` (e.g. a re-execution's parent and root run) executed, the first run's first; None
    when none did (named query ``execution_of_runs``)."""
    ids = [r for r in run_ids if r]
    if not ids:
        return None
    row = conn.execute(query("execution_of_runs"), {"definition_id": definition_id, "run_ids": ids}).fetchone()
    return None if row is None else str(row["execution_id"])


def run_stage(
    conn: Connection,
    spec: StageSpec,
    *,
    run_id: str,
    attempt: int,
    registry: AgentRegistry,
    execution_id: str | None = None,
    context: Mapping[str, Any] | None = None,
    draw: Callable[[], float] = random.random,
    resume: bool = False,
    listen: bool = True,
    on_execution: Callable[[str], None] | None = None,
) -> StageOutcome:
    """Run one attempt (1-based; the database may raise it, see ``lifecycle.stage_start``): start
    it, call its agent (or wait for its queue task), record the outcome.

    ``conn`` must be in autocommit mode: each call is its own transaction. ``draw`` gives the
    uniform [0, 1) value for the backoff jitter. ``resume``: this run resumes the execution (a
    completed stage is not run again; a failed one is retried as its next attempt). ``listen``: a
    queue agent's attempt LISTENs on ``conn`` while it waits for the task (else it polls).
    ``on_execution``: called with the execution id as soon as the execution row exists (before the
    stage starts), e.g. to tag the Dagster run with it.

    Raises:
        StageRetry: a retry was recorded; the caller waits ``delay_s`` and runs the next attempt.
        StageFailed: the stage failed for good (recorded).
        StageStopped: the execution is not in progress or the result was refused (recorded).
        psycopg.Error: the database could not be reached or refused an argument.
        UnknownStatusError: a transition returned a code the seam does not know (sql/schema and
            lifecycle_dagster.store.transitions disagree).
    """
    start_ns = time.time_ns()
    started = _start(
        conn,
        spec,
        run_id=run_id,
        attempt=attempt,
        execution_id=execution_id,
        context=context,
        resume=resume,
        on_execution=on_execution,
    )
    if isinstance(started, StageOutcome):
        return started
    with _attempt_span(spec, started, start_ns) as span:
        current, result = call_step(conn, spec, started, registry, listen)
        span.set_attribute(tracing.ATTR_ATTEMPT, current.number)
        if isinstance(result, AgentOutput):
            result = _record_output(conn, current, result)
        if isinstance(result, StageOutcome):
            return result
        raise _record_failure(conn, spec, current, result, draw) from result.cause


#: ``lifecycle.outcome`` of an attempt that ended in each error
_OUTCOMES: dict[type[StageError], str] = {StageRetry: "retrying", StageFailed: "failed", StageStopped: "stopped"}


@contextlib.contextmanager
def _attempt_span(spec: StageSpec, attempt: Attempt, start_ns: int) -> Iterator[Span]:
    """The span ``stage <id>`` of one attempt (from ``start_ns``, before the stage started), a child
    of the execution's root, current for the block: ``lifecycle.outcome`` completed, retrying,
    failed or stopped (with ``lifecycle.error_code`` and status ERROR) as the block ends."""
    if attempt.trace is None:
        with tracing.span(f"stage {spec.stage_id}") as off:  # tracing off: the no-op span
            yield off
        return
    with tracing.span(
        f"stage {spec.stage_id}",
        parent=attempt.trace.trace_parent,
        attributes=attempt.span_attributes(),
        start_time_ns=start_ns,
    ) as span:
        try:
            yield span
        except StageError as exc:
            tracing.end_with(span, _OUTCOMES.get(type(exc), "failed"), exc.code, str(exc))
            raise
        except Exception:
            span.set_attribute(tracing.ATTR_OUTCOME, "error")
            raise
        tracing.end_with(span, "completed")


def call_step(
    conn: Connection,
    spec: StageSpec,
    attempt: Attempt,
    registry: AgentRegistry,
    listen: bool,
    rate_limited: bool = True,
) -> tuple[Attempt, StageOutcome | AgentOutput | AttemptError]:
    """The call step: no agent may be called, wait for the queue task, or call the agent. Returns
    the attempt (moved on when a queue task's lease was reaped) and what the call gave.
    ``rate_limited`` False: the caller knows that neither the agent nor the capability has a rate
    limit (no token is asked for: ``lifecycle.stage_rate_take`` would grant it and write nothing)."""
    if attempt.agent_kind is None:
        return attempt, _unrouted(conn, spec)
    kind = SpanKind.CLIENT if attempt.agent_kind is AgentKind.HTTP else SpanKind.INTERNAL
    with tracing.span(f"agent {attempt.agent_name}", attributes=attempt.span_attributes(), kind=kind) as span:
        current: Attempt = attempt
        result: StageOutcome | AgentOutput | AttemptError
        if attempt.agent_kind is AgentKind.QUEUE:
            current, result = _await_queue_task(conn, spec, attempt, listen=listen)
        else:
            result = _call(conn, spec, attempt, registry, rate_limited)
        if isinstance(result, AttemptError):
            tracing.end_with(span, "failed", result.code, result.message)
        else:
            tracing.end_with(span, "completed")
    return current, result


# -- start ----------------------------------------------------------------------------------------


def _start(
    conn: Connection,
    spec: StageSpec,
    *,
    run_id: str,
    attempt: int,
    execution_id: str | None,
    context: Mapping[str, Any] | None,
    resume: bool,
    on_execution: Callable[[str], None] | None = None,
) -> Attempt | StageOutcome:
    """Ensure the execution and start the stage (``lifecycle.stage_start``): the attempt, or the
    outcome of a stage an earlier run completed. A stage already in progress (this op run again
    after a lost connection) is adopted: the same attempt and task, whoever created the task.

    Raises:
        StageStopped: the stage may not run (``not_runnable``: see :data:`NOT_RUNNABLE`).
    """
    try:
        exec_id = ensure_execution(conn, spec, run_id, execution_id, context, resume)
        trace = _stage_trace(conn, spec, exec_id, run_id)  # before the task is inserted: it carries the trace
        if on_execution is not None:
            on_execution(exec_id)
        left = left_alone(conn, spec, exec_id)
        if left is not None:
            return left
        started = stage_start(
            conn,
            execution_id=exec_id,
            stage_id=spec.stage_id,
            capability=spec.capability,
            ancestors=spec.ancestors,
            attempt=attempt,
            timeout_s=spec.timeout_s,
            max_attempts=spec.policy.max_attempts,
            # an adopted execution may hold stages done by hand or by an earlier run
            resume=resume or bool(execution_id),
            run_id=run_id,
        )
    except NOT_RUNNABLE as exc:
        raise StageStopped(
            safe_text(exc.diag.message_primary or exc),
            code="not_runnable",
            execution_id=str(execution_id or ""),
            stage_id=spec.stage_id,
            attempt=attempt,
        ) from exc
    if started.already_completed:  # nothing runs: the output an earlier run recorded
        return StageOutcome(
            execution_id=exec_id,
            log_id=started.log_id,
            task_id=None,
            agent_name="",
            attempt=started.attempt,
            duration_ms=0.0,
            output=started.output,
            execution_status="in_progress",
            already_completed=True,
        )
    return Attempt.of(exec_id, spec.stage_id, started, trace)


#: what ``lifecycle.stage_readiness`` says when the op is to leave its stage alone
_LEFT_ALONE = (StageReadiness.SKIPPED, StageReadiness.WAITING, StageReadiness.BLOCKED, StageReadiness.ENDED)


def left_alone(conn: Connection, spec: StageSpec, execution_id: str) -> StageOutcome | None:
    """The outcome of a stage its op is to leave alone (skipped, waiting, blocked behind an
    approval, ended early: docs/branches.md), or None to start it."""
    readiness = stage_readiness(conn, execution_id=execution_id, stage_id=spec.stage_id)
    if readiness not in _LEFT_ALONE:
        return None
    return StageOutcome(
        execution_id=execution_id,
        log_id="",
        task_id=None,
        agent_name="",
        attempt=0,
        duration_ms=0.0,
        output={},
        execution_status="",
        state=readiness.value,
    )


def next_stages(conn: Connection, execution_id: str, stage_id: str) -> tuple[str, ...]:
    """The child stages whose edge from ``stage_id`` fired (``lifecycle.stage_edges``), sorted:
    the op yields their outputs, so Dagster skips the branches not taken."""
    return stage_edges_fired(conn, execution_id=execution_id, stage_id=stage_id)


def _stage_trace(conn: Connection, spec: StageSpec, execution_id: str, run_id: str) -> ExecutionTrace | None:
    """The execution's trace with the run, stage and capability added (None: tracing off)."""
    trace = execution_trace(conn, execution_id, run_id)
    if trace is None:
        return None
    more = {tracing.ATTR_RUN_ID: run_id, tracing.ATTR_STAGE: spec.stage_id, tracing.ATTR_CAPABILITY: spec.capability}
    return replace(trace, attributes=trace.with_attributes(more))


# -- call -----------------------------------------------------------------------------------------


def _execution_stopped(conn: Connection, execution_id: str) -> bool:
    """Whether the execution is no longer in progress (cancelled, failed by a sibling)."""
    row = conn.execute(query("execution_status"), {"execution_id": execution_id}).fetchone()
    return row is None or row["status"] != "in_progress"


def _call(
    conn: Connection, spec: StageSpec, attempt: Attempt, registry: AgentRegistry, rate_limited: bool = True
) -> AgentOutput | AttemptError:
    """Call an in-process (registry) or http agent: its checked output, or why the attempt failed."""
    name = attempt.agent_name
    try:
        if attempt.agent_kind is AgentKind.HTTP:
            agent: Any = http_agent(conn, str(attempt.agent_id), attempt.task_id, tracing.current_trace_parent())
        else:
            agent = registry.get(name)
    except KeyError as exc:
        return AttemptError(
            "agent_not_registered", safe_text(exc.args[0] if exc.args else exc), False, "KeyError", cause=exc
        )
    except AgentError as exc:
        return AttemptError(exc.code, safe_text(exc), False, type(exc).__name__, cause=exc)
    if rate_limited:
        _take_token(conn, spec, attempt)
    t0 = time.perf_counter()
    stopped = functools.partial(_execution_stopped, conn, attempt.execution_id)
    try:
        task = Task.from_input_data(
            execution_id=attempt.execution_id,
            stage_id=spec.stage_id,
            capability=spec.capability,
            attempt=attempt.number,
            input_data=attempt.input_data,
        )
        raw = call_agent(
            agent, task, timeout_s=spec.timeout_s, should_stop=stopped if spec.timeout_s is not None else None
        )
    except AttemptStopped as exc:
        return AttemptError("cancelled", str(exc), False, "AttemptStopped", cause=exc)
    except psycopg.OperationalError:
        raise  # our connection died while the agent ran (watching for a cancel): not the agent's fault
    except Exception as exc:
        err = classify(exc)
        return replace(err, message=f"{name}: {err.message}", cause=exc)
    duration_ms = (time.perf_counter() - t0) * 1000.0
    problem = check_output(raw)
    if problem is not None:
        return AttemptError("bad_output", f"{name}: {problem}", True, "BadOutput")
    return AgentOutput(raw, duration_ms)


def _take_token(
    conn: Connection, spec: StageSpec, attempt: Attempt, sleep: Callable[[float], None] = time.sleep
) -> None:
    """Wait until the agent's and the capability's rate limits give this call a token
    (``lifecycle.stage_rate_take``; immediate when neither is limited). While none is left, sleep
    until the next is due (plus up to 10% jitter, so that ops waiting together do not all wake at
    once; at most :data:`RATE_SLEEP_MAX_S`) and ask again; the first refusal writes
    ``stage_rate_limited``. Not an attempt, not a failure.

    Raises:
        StageStopped: the execution stopped or the task is no longer the op's meanwhile.
    """
    if attempt.task_id is None:
        return
    waited_since: float | None = None
    while True:
        took = stage_rate_take(conn, task_id=attempt.task_id, note=waited_since is None)
        if took.status is RateTakeStatus.GRANTED:
            if waited_since is not None:
                waited = time.monotonic() - waited_since
                log.info("stage '%s': rate limit: a token after %.3f s", attempt.stage_id, waited)
            return
        if took.status.refused:
            raise StageStopped(f"rate-limited call not made: {took.status}", code="refused", **attempt.ids())
        if waited_since is None:
            waited_since = time.monotonic()
            log.info(
                "stage '%s': rate limit of %s '%s' reached; waiting %.3f s for a token",
                attempt.stage_id,
                took.scope,
                attempt.agent_name if took.scope == "agent" else spec.capability,
                took.wait_s or 0.0,
            )
        due = max(0.001, took.wait_s or 0.0)
        sleep(min(RATE_SLEEP_MAX_S, due * (1.0 + 0.1 * random.random())))


def _await_queue_task(
    conn: Connection, spec: StageSpec, attempt: Attempt, *, listen: bool
) -> tuple[Attempt, StageOutcome | AttemptError]:
    """A queue agent's attempt: wait for an external worker (claim, complete or fail with its lease
    token); its completion already completed the stage in the database. Returns the attempt as the
    task ended it (a reaped lease moves the attempt on) with the outcome or why it failed.

    The outcome is decided by one read of the task and its execution (``wait_for_task``): a task
    that completed is a completion, even when it completed the execution too.

    Raises:
        StageStopped: the task was cancelled.
    """
    task_id = str(attempt.task_id)
    t0 = time.perf_counter()
    try:
        timeout_s = spec.timeout_s or queue_wait_s()
        task = wait_for_task(conn, task_id, timeout_s=timeout_s, listen=listen)
    except (AgentTimeout, AttemptStopped) as exc:
        ended = _abandon(conn, attempt, exc)
        if isinstance(ended, tuple):
            return ended
        task = ended  # a worker finished the task before the abandon: its outcome stands
    attempt = replace(attempt, number=task.attempt)
    if task.status is TaskStatus.COMPLETED:
        done = fetch_one(conn, "stage_log_output", {"log_id": attempt.log_id})
        return attempt, StageOutcome(
            execution_id=attempt.execution_id,
            log_id=attempt.log_id,
            task_id=task_id,
            agent_name=attempt.agent_name,
            attempt=attempt.number,
            duration_ms=(time.perf_counter() - t0) * 1000.0,
            output=dict(done["output_data"] or {}),
            execution_status=str(done["execution_status"]),
        )
    if task.status is TaskStatus.CANCELLED:
        raise StageStopped(f"task {task_id} was cancelled: {task.error_message}", code="refused", **attempt.ids())
    return attempt, AttemptError(
        str(task.error_code or "agent_error"),
        safe_text(f"{attempt.agent_name}: {task.error_message}"),
        bool(task.retryable),
        "QueueTaskFailed",
        task.retry_after_s,
    )


def _abandon(
    conn: Connection, attempt: Attempt, exc: AgentTimeout | AttemptStopped
) -> tuple[Attempt, AttemptError] | TaskState:
    """No worker finished the task in time, or the execution stopped: cancel the task
    (``lifecycle.task_abandon``) and say why the attempt failed. A task a worker completed or
    failed before the abandon took it is not abandoned: its state is returned instead."""
    before = task_abandon(conn, task_id=str(attempt.task_id), reason=str(exc))
    # the reaper may have moved the attempt on meanwhile (a worker's lease expired): record the
    # outcome against the attempt the stage is at now, or the database refuses it as stale
    state = TaskState.from_row(fetch_one(conn, "task_state", {"task_id": attempt.task_id}))
    if before in (TaskStatus.COMPLETED, TaskStatus.FAILED):
        return state
    attempt = replace(attempt, number=state.attempt)
    if isinstance(exc, AttemptStopped):
        return attempt, AttemptError("cancelled", str(exc), False, "AttemptStopped", cause=exc)
    return attempt, AttemptError("timeout", f"{attempt.agent_name}: {exc}", True, "AgentTimeout", cause=exc)


# -- record ---------------------------------------------------------------------------------------


def _record_output(conn: Connection, attempt: Attempt, result: AgentOutput) -> StageOutcome | AttemptError:
    """Complete the stage with the agent's output (``lifecycle.stage_complete``): the outcome, or
    why the attempt failed after all (the database refused the output, or it came after the deadline).

    Raises:
        StageStopped: the result was refused (a stale attempt, the execution stopped).
    """
    name = attempt.agent_name
    try:
        status = stage_complete(
            conn, log_id=attempt.log_id, task_id=attempt.task_id, output=result.output, attempt=attempt.number
        )
    except (psycopg.errors.DataError, psycopg.errors.ProgramLimitExceeded, psycopg.errors.StatementTooComplex) as exc:
        # the database refused the output itself (its own payload limits): as unstorable as a bad output
        refusal = safe_text(exc.diag.message_primary or exc)
        return AttemptError("bad_output", f"{name}: {refusal}", True, "BadOutput", cause=exc)
    if status is StageCompleteStatus.REFUSED_TIMED_OUT:
        return AttemptError("timeout", f"{name}: result arrived after the deadline ({status})", True, "AgentTimeout")
    if status.refused:
        raise StageStopped(f"result of attempt {attempt.number} {status}", code="refused", **attempt.ids())
    return StageOutcome(
        execution_id=attempt.execution_id,
        log_id=attempt.log_id,
        task_id=attempt.task_id,
        agent_name=name,
        attempt=attempt.number,
        duration_ms=result.duration_ms,
        output=result.output,
        execution_status=status.value,
    )


@dataclass(frozen=True)
class FailurePlan:
    """What a failed attempt becomes (:func:`plan_failure`): a retry after ``delay_s`` seconds, or
    the stage's failure with ``message`` (the attempt count added to a retryable error's)."""

    retry: bool
    message: str
    delay_s: float | None = None


def plan_failure(policy: RetryPolicy, attempt: int, err: AttemptError, draw: Callable[[], float]) -> FailurePlan:
    """Retry or fail a failed attempt ``attempt`` (1-based) by the stage's ``policy``: a retryable
    error whose code the stage does not list as non-retryable, with attempts left, is retried after
    the policy's delay (at least the agent's Retry-After, within the policy's cap and MAX_WAIT_S
    seconds; ``draw`` gives the jitter's uniform [0, 1) value)."""
    retryable = err.retryable and err.code not in policy.non_retryable
    if retryable and attempt < policy.max_attempts:
        delay = policy.delay(attempt, draw())
        if err.retry_after_s is not None and err.retry_after_s > delay:
            delay = min(policy.max_delay_s, float(err.retry_after_s))
        return FailurePlan(True, err.message, min(delay, MAX_WAIT_S))
    if retryable:
        return FailurePlan(False, f"{err.message} (attempt {attempt} of {policy.max_attempts})")
    return FailurePlan(False, err.message)


def _record_failure(
    conn: Connection, spec: StageSpec, attempt: Attempt, err: AttemptError, draw: Callable[[], float]
) -> StageError:
    """Record a failed attempt: a retry when allowed (``lifecycle.stage_schedule_retry``), else the
    stage's failure (``lifecycle.stage_fail``). Returns the error for the caller to raise."""
    plan = plan_failure(spec.policy, attempt.number, err, draw)
    if plan.retry:
        return _record_retry(conn, spec, attempt, err, float(plan.delay_s or 0.0))
    status = stage_fail(
        conn,
        log_id=attempt.log_id,
        task_id=attempt.task_id,
        error=plan.message,
        error_code=err.code,
        attempt=attempt.number,
    )
    if status.refused:
        return StageStopped(f"{status} ({err.message})", code="refused", **attempt.ids())
    return StageFailed(plan.message, code=err.code, **attempt.ids())


def _record_retry(conn: Connection, spec: StageSpec, attempt: Attempt, err: AttemptError, delay: float) -> StageError:
    """Schedule the next attempt after ``delay`` seconds (:func:`plan_failure`)."""
    policy, n = spec.policy, attempt.number
    try:
        status = stage_schedule_retry(
            conn,
            log_id=attempt.log_id,
            task_id=attempt.task_id,
            attempt=n,
            error=err.message,
            error_code=err.code,
            error_class=err.error_class,
            delay_s=delay,
        )
    except psycopg.OperationalError:
        raise  # the connection is gone: the stage op runs the stage again once it is back
    except psycopg.Error as exc:
        # never loop: this attempt fails visibly, and the run with it
        return StageFailed(
            safe_text(f"could not record the retry of attempt {n} ({err.message}): {exc}"),
            code="retry_not_recorded",
            **attempt.ids(),
        )
    if status is StageRetryStatus.RETRYING:
        return StageRetry(
            f"attempt {n} of {policy.max_attempts} failed ({err.code}): {err.message}; retrying in {delay:.3f} s",
            delay_s=delay,
            max_attempts=policy.max_attempts,
            code=err.code,
            **attempt.ids(),
        )
    return StageStopped(f"{status} ({err.message})", code="refused", **attempt.ids())
