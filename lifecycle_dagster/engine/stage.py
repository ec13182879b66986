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
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from lifecycle_dagster.agents import AgentError, AgentRegistry, AgentTimeout, Task
from lifecycle_dagster.agents.http import http_agent
from lifecycle_dagster.core.payload import check_output, safe_text
from lifecycle_dagster.core.retry import MAX_WAIT_S, RetryPolicy
from lifecycle_dagster.engine.invoke import AgentCrashed, AttemptStopped, call_agent
from lifecycle_dagster.queue.wait import queue_wait_s, wait_for_task
from lifecycle_dagster.store.db import Connection
from lifecycle_dagster.store.sqlfiles import query


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


@dataclass(frozen=True)
class _AttemptError:
    code: str
    message: str
    retryable: bool
    error_class: str
    retry_after_s: float | None = None


#: the status code a transition returns when its result came after the attempt's deadline
REFUSED_TIMED_OUT = "refused_timed_out"


def is_refusal(status: object) -> bool:
    """Whether a status code returned by a stage or task transition (``lifecycle.stage_complete``,
    ``stage_fail``, ``stage_schedule_retry``, ``task_complete``, ``task_fail``) is a refusal:
    ``refused_stale_attempt``, ``refused_stage_not_running``, ``refused_execution_stopped``,
    ``refused_timed_out``, ``refused_stale_token``, ``refused_task_finished``,
    ``refused_lease_expired`` or ``refused_bad_output``. The reason in words is in the
    ``*_result_refused`` event."""
    return isinstance(status, str) and status.startswith("refused_")


def classify(exc: BaseException) -> _AttemptError:
    """Map what an agent call raised to (code, message, retryable, error class)."""
    if isinstance(exc, AgentError):
        return _AttemptError(exc.code, safe_text(exc), exc.retryable, type(exc).__name__, exc.retry_after_s)
    if isinstance(exc, AgentCrashed):
        return _AttemptError("agent_crashed", safe_text(f"agent crashed: {exc}"), True, "AgentCrashed")
    return _AttemptError("agent_crashed", safe_text(f"{type(exc).__name__}: {exc}"), True, type(exc).__name__)


def _unrouted(conn: Connection, spec: StageSpec) -> _AttemptError:
    """Why routing gave no agent: none serves the capability (``no_agent``), or the circuit breakers
    in the way are open (``breaker_open``, naming them). Neither is retried."""
    breakers = [dict(r) for r in conn.execute(query("capability_breakers"), {"capability": spec.capability})]
    if not any(b["scope"] == "agent" for b in breakers):
        return _AttemptError(
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
    return _AttemptError(
        "breaker_open",
        f"circuit breaker open: no agent may be called for capability '{spec.capability}' "
        f"(stage '{spec.stage_id}'); open breakers: {', '.join(blocking) or 'none any more (closed meanwhile)'}",
        False,
        "BreakerOpen",
    )


def _one(conn: Connection, name: str, params: Mapping[str, Any]) -> dict[str, Any]:
    row = conn.execute(query(name), params).fetchone()
    assert row is not None, name
    return dict(row)


#: executions this process ensured, by (database, run id, definition id, execution id, resume): their ids. A
#: run's first stage op ensures its execution (creates or adopts it, binds it to the run, starts it);
#: the others of the run in this process skip that round trip, and ``lifecycle.stage_start`` refuses
#: them if another run has taken the execution over.
_ENSURED: dict[tuple[str, str, str, str, bool], str] = {}
_ENSURED_MAX = 256


def _ensure_execution(
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
    row = _one(
        conn,
        "ensure_execution",
        {
            "definition_id": spec.definition_id,
            "run_id": run_id,
            "execution_id": execution_id or None,
            "context": Jsonb(dict(context or {})),
            "resume": resume,
        },
    )
    if len(_ENSURED) >= _ENSURED_MAX:
        del _ENSURED[next(iter(_ENSURED))]
    _ENSURED[key] = str(row["id"])
    return _ENSURED[key]


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
    dsn: str | None = None,
) -> StageOutcome:
    """Run one attempt (1-based; the database may raise it, see ``lifecycle.stage_start``).

    ``conn`` must be in autocommit mode: each call is its own transaction. ``draw`` gives the
    uniform [0, 1) value for the backoff jitter. ``resume``: this run resumes the execution (a
    completed stage is not run again; a failed one is retried as its next attempt).

    Raises:
        StageRetry: a retry was recorded; the caller waits ``delay_s`` and runs the next attempt.
        StageFailed: the stage failed for good (recorded).
        StageStopped: the execution is not in progress or the result was refused (recorded).
        psycopg.Error: the database could not be reached or refused an argument.
    """
    try:
        exec_id = _ensure_execution(conn, spec, run_id, execution_id, context, resume)
        started = _one(
            conn,
            "start_stage",
            {
                "execution_id": exec_id,
                "stage_id": spec.stage_id,
                "capability": spec.capability,
                "ancestors": Jsonb(dict(spec.ancestors)),
                "attempt": attempt,
                "timeout_s": spec.timeout_s,
                "max_attempts": spec.policy.max_attempts,
                # an adopted execution may hold stages done by hand or by an earlier run
                "resume": resume or bool(execution_id),
                "run_id": run_id,
            },
        )
    except (
        psycopg.errors.ObjectNotInPrerequisiteState,  # the execution is not in progress, an upstream stage is not done
        psycopg.errors.UniqueViolation,  # the execution is bound to another run
        psycopg.errors.CheckViolation,  # an illegal transition
        psycopg.errors.NoDataFound,  # an unknown execution or definition
        psycopg.errors.InvalidParameterValue,  # the execution belongs to another definition
        psycopg.errors.InvalidTextRepresentation,  # an execution id that is not a uuid
    ) as exc:
        raise StageStopped(
            safe_text(exc.diag.message_primary or exc),
            code="not_runnable",
            execution_id=str(execution_id or ""),
            stage_id=spec.stage_id,
            attempt=attempt,
        ) from exc
    log_id, task_id = str(started["log_id"]), started["task_id"]
    attempt = int(started["attempt_number"])
    if started["already_completed"]:
        return StageOutcome(
            execution_id=exec_id,
            log_id=log_id,
            task_id=None,
            agent_name="",
            attempt=attempt,
            duration_ms=0.0,
            output=dict(started["output_data"] or {}),
            execution_status="in_progress",
            already_completed=True,
        )
    ids: dict[str, Any] = {"execution_id": exec_id, "stage_id": spec.stage_id, "attempt": attempt}

    def record(err: _AttemptError) -> StageError:
        """Record a failed attempt: a retry when allowed, else the stage's failure."""
        attempt = int(ids["attempt"])  # a queue task's attempt may have moved on (reaped leases)
        retry = err.retryable and err.code not in spec.policy.non_retryable and attempt < spec.policy.max_attempts
        if retry:
            delay = spec.policy.delay(attempt, draw())
            if err.retry_after_s is not None and err.retry_after_s > delay:
                delay = min(spec.policy.max_delay_s, float(err.retry_after_s))
            delay = min(delay, MAX_WAIT_S)
            try:
                status = _one(
                    conn,
                    "schedule_retry",
                    {
                        "log_id": log_id,
                        "task_id": task_id,
                        "attempt": attempt,
                        "error": err.message,
                        "error_code": err.code,
                        "error_class": err.error_class,
                        "delay_s": delay,
                    },
                )["status"]
            except psycopg.OperationalError:
                raise  # the connection is gone: the stage op runs the stage again once it is back
            except psycopg.Error as exc:
                # never loop: this attempt fails visibly, and the run with it
                return StageFailed(
                    safe_text(f"could not record the retry of attempt {attempt} ({err.message}): {exc}"),
                    code="retry_not_recorded",
                    **ids,
                )
            if status == "retrying":
                return StageRetry(
                    f"attempt {attempt} of {spec.policy.max_attempts} failed ({err.code}): {err.message}; "
                    f"retrying in {delay:.3f} s",
                    delay_s=delay,
                    max_attempts=spec.policy.max_attempts,
                    code=err.code,
                    **ids,
                )
            return StageStopped(f"{status} ({err.message})", code="refused", **ids)
        message = err.message
        if err.retryable and err.code not in spec.policy.non_retryable:
            message = f"{err.message} (attempt {attempt} of {spec.policy.max_attempts})"
        status = _one(
            conn,
            "fail_stage",
            {"log_id": log_id, "task_id": task_id, "error": message, "error_code": err.code, "attempt": attempt},
        )["status"]
        if is_refusal(status):
            return StageStopped(f"{status} ({err.message})", code="refused", **ids)
        return StageFailed(message, code=err.code, **ids)

    if started["agent_id"] is None:
        raise record(_unrouted(conn, spec))
    agent_name = str(started["agent_name"])

    def stopped() -> bool:
        row = conn.execute(query("execution_status"), {"execution_id": exec_id}).fetchone()
        return row is None or row["status"] != "in_progress"

    if started["agent_kind"] == "queue":
        return _await_queue_task(
            conn, spec, record, stopped, dsn=dsn, agent_name=agent_name, log_id=log_id, task_id=str(task_id), ids=ids
        )
    try:
        if started["agent_kind"] == "http":
            agent: Any = http_agent(conn, str(started["agent_id"]), str(task_id) if task_id else None)
        else:
            agent = registry.get(agent_name)
    except KeyError as exc:
        raise record(
            _AttemptError("agent_not_registered", safe_text(exc.args[0] if exc.args else exc), False, "KeyError")
        ) from exc
    except AgentError as exc:
        raise record(_AttemptError(exc.code, safe_text(exc), False, type(exc).__name__)) from exc

    t0 = time.perf_counter()
    try:
        task = Task.from_input_data(
            execution_id=exec_id,
            stage_id=spec.stage_id,
            capability=spec.capability,
            attempt=attempt,
            input_data=started["input_data"],
        )
        raw = call_agent(
            agent, task, timeout_s=spec.timeout_s, should_stop=stopped if spec.timeout_s is not None else None
        )
    except AttemptStopped as exc:
        raise record(_AttemptError("cancelled", str(exc), False, "AttemptStopped")) from exc
    except psycopg.OperationalError:
        raise  # our connection died while the agent ran (watching for a cancel): not the agent's fault
    except Exception as exc:
        err = classify(exc)
        raise record(
            _AttemptError(err.code, f"{agent_name}: {err.message}", err.retryable, err.error_class, err.retry_after_s)
        ) from exc
    duration_ms = (time.perf_counter() - t0) * 1000.0
    problem = check_output(raw)
    if problem is not None:
        raise record(_AttemptError("bad_output", f"{agent_name}: {problem}", True, "BadOutput"))

    try:
        status = str(
            _one(
                conn, "complete_stage", {"log_id": log_id, "task_id": task_id, "output": Jsonb(raw), "attempt": attempt}
            )["status"]
        )
    except (psycopg.errors.DataError, psycopg.errors.ProgramLimitExceeded, psycopg.errors.StatementTooComplex) as exc:
        # the database refused the output itself (its own payload limits): as unstorable as above
        refusal = safe_text(exc.diag.message_primary or exc)
        raise record(_AttemptError("bad_output", f"{agent_name}: {refusal}", True, "BadOutput")) from exc
    if is_refusal(status):
        if status == REFUSED_TIMED_OUT:
            raise record(
                _AttemptError(
                    "timeout", f"{agent_name}: result arrived after the deadline ({status})", True, "AgentTimeout"
                )
            )
        raise StageStopped(f"result of attempt {attempt} {status}", code="refused", **ids)
    return StageOutcome(
        execution_id=exec_id,
        log_id=log_id,
        task_id=str(task_id) if task_id else None,
        agent_name=agent_name,
        attempt=attempt,
        duration_ms=duration_ms,
        output=raw,
        execution_status=status,
    )


def _await_queue_task(
    conn: Connection,
    spec: StageSpec,
    record: Callable[[_AttemptError], StageError],
    stopped: Callable[[], bool],
    *,
    dsn: str | None,
    agent_name: str,
    log_id: str,
    task_id: str,
    ids: dict[str, Any],
) -> StageOutcome:
    """A queue agent's attempt: wait for an external worker (claim, complete or fail with its lease
    token); its completion already completed the stage in the database."""
    t0 = time.perf_counter()
    try:
        task = wait_for_task(conn, task_id, timeout_s=spec.timeout_s or queue_wait_s(), dsn=dsn, should_stop=stopped)
    except (AgentTimeout, AttemptStopped) as exc:
        conn.execute(query("task_abandon"), {"task_id": task_id, "reason": str(exc)})
        # the reaper may have moved the attempt on meanwhile (a worker's lease expired): record the
        # outcome against the attempt the stage is at now, or the database refuses it as stale
        state = conn.execute(query("task_state"), {"task_id": task_id}).fetchone()
        if state is not None:
            ids["attempt"] = int(state["attempt"])
        if isinstance(exc, AttemptStopped):
            raise record(_AttemptError("cancelled", str(exc), False, "AttemptStopped")) from exc
        raise record(_AttemptError("timeout", f"{agent_name}: {exc}", True, "AgentTimeout")) from exc
    ids["attempt"] = int(task["attempt"])
    if task["status"] == "completed":
        done = _one(conn, "stage_log_output", {"log_id": log_id})
        return StageOutcome(
            execution_id=ids["execution_id"],
            log_id=log_id,
            task_id=task_id,
            agent_name=agent_name,
            attempt=int(task["attempt"]),
            duration_ms=(time.perf_counter() - t0) * 1000.0,
            output=dict(done["output_data"] or {}),
            execution_status=str(done["execution_status"]),
        )
    if task["status"] == "cancelled":
        raise StageStopped(f"task {task_id} was cancelled: {task['error_message']}", code="refused", **ids)
    raise record(
        _AttemptError(
            str(task["error_code"] or "agent_error"),
            safe_text(f"{agent_name}: {task['error_message']}"),
            bool(task["retryable"]),
            "QueueTaskFailed",
            task["retry_after_s"],
        )
    )
