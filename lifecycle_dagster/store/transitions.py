"""The one seam through which Python changes state: every call of a SQL function that changes
state (``sql/schema/04_stage_transitions.sql``, ``05_task_protocol.sql``, ``06_compensation.sql``,
``07_breakers.sql``) goes through a function here, and each returns a typed result.

A function that returns a status code returns a member of a :class:`enum.StrEnum` whose members are
exactly the codes that SQL function can return (``tests/sql/test_transitions.py`` reads them from
``sql/schema``); a code the enum does not know raises :class:`UnknownStatusError` naming the
function and the code, so a new code in SQL fails loudly instead of being misread. Refusals
(``refused_*``: a stale attempt, a lost lease, a result after the deadline...) are members too;
``status.refused`` says whether one is; the reason in words is in the ``*_result_refused`` event. A
function that returns a row returns a frozen dataclass built from it.

Every function takes an open connection (autocommit: each call is its own transaction, unless the
caller holds one) and raises what the SQL function raises (``psycopg.Error`` subclasses: an
unknown id is ``NoDataFound``, an illegal transition ``ObjectNotInPrerequisiteState`` or
``CheckViolation``...). Read-only queries stay with their callers.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any, TypeVar

from psycopg.types.json import Jsonb

from lifecycle_dagster.store.db import Connection
from lifecycle_dagster.store.sqlfiles import query


class UnknownStatusError(RuntimeError):
    """A SQL function returned a code its enum does not list (the SQL and the seam disagree)."""

    def __init__(self, function: str, code: object, known: list[str]) -> None:
        super().__init__(
            f"{function} returned the unknown status code {code!r} (known: {', '.join(known)}): "
            "sql/schema and lifecycle_dagster/store/transitions.py disagree"
        )
        self.function = function
        self.code = code


class StatusCode(StrEnum):
    """Base of the status enums: ``refused`` is true for a ``refused_*`` code."""

    @property
    def refused(self) -> bool:
        """Whether the transition was refused (and recorded as such, nothing else changed)."""
        return self.value.startswith("refused_")


_S = TypeVar("_S", bound=StrEnum)


def parse_status(enum: type[_S], function: str, code: object) -> _S:
    """The member of ``enum`` whose value is ``code``, as returned by SQL function ``function``.

    Raises:
        UnknownStatusError: ``code`` is not one of ``enum``'s values (None included).
    """
    if isinstance(code, str):
        try:
            return enum(code)
        except ValueError:
            pass
    raise UnknownStatusError(function, code, [m.value for m in enum])


# -- the statuses of rows (CHECK constraints of sql/migrations) ---------------------------------------


class ExecutionStatus(StatusCode):
    """``workflow_executions.status``."""

    PENDING = "pending"
    IN_PROGRESS = "in_progress"
    WAITING = "waiting"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"
    COMPENSATING = "compensating"
    ROLLED_BACK = "rolled_back"
    COMPENSATION_FAILED = "compensation_failed"


class TaskStatus(StatusCode):
    """``task_queue.status``; ``final``: completed, failed or cancelled (nothing changes it again)."""

    PENDING = "pending"
    IN_PROGRESS = "in_progress"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def final(self) -> bool:
        """Whether the task is finished (no worker may complete or fail it any more)."""
        return self in (TaskStatus.COMPLETED, TaskStatus.FAILED, TaskStatus.CANCELLED)


class AgentKind(StatusCode):
    """``agents.kind``: called in process, over HTTP, or through the task queue by a worker."""

    PYTHON = "python"
    HTTP = "http"
    QUEUE = "queue"


class BreakerState(StatusCode):
    """``lifecycle.breakers.state``."""

    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


# -- the codes of transitions ---------------------------------------------------------------------------


class StageCompleteStatus(StatusCode):
    """``lifecycle.stage_complete``: the execution's status after the stage completed (completed
    when it was the last stage to run or its output ended the execution; waiting when only an
    approval is left), or why the result was refused."""

    COMPLETED = "completed"
    IN_PROGRESS = "in_progress"
    WAITING = "waiting"
    REFUSED_STALE_ATTEMPT = "refused_stale_attempt"
    REFUSED_STAGE_NOT_RUNNING = "refused_stage_not_running"
    REFUSED_EXECUTION_STOPPED = "refused_execution_stopped"
    REFUSED_TIMED_OUT = "refused_timed_out"


class StageFailStatus(StatusCode):
    """``lifecycle.stage_fail``: ``failed`` (the stage and its execution), or why it was refused (a
    deadline that passed does not refuse a failure)."""

    FAILED = "failed"
    REFUSED_STALE_ATTEMPT = "refused_stale_attempt"
    REFUSED_STAGE_NOT_RUNNING = "refused_stage_not_running"
    REFUSED_EXECUTION_STOPPED = "refused_execution_stopped"


class StageRetryStatus(StatusCode):
    """``lifecycle.stage_schedule_retry``: ``retrying`` (the log is pending until its not-before
    time), or why it was refused."""

    RETRYING = "retrying"
    REFUSED_STALE_ATTEMPT = "refused_stale_attempt"
    REFUSED_STAGE_NOT_RUNNING = "refused_stage_not_running"
    REFUSED_EXECUTION_STOPPED = "refused_execution_stopped"


class TaskCompleteStatus(StatusCode):
    """``lifecycle.task_complete``: ``completed``/``in_progress``/``waiting`` (a task without a
    stage log, or the execution's status after its stage completed), or why the result was refused:
    by the task protocol (token, finished task, lease, output) or by the stage's fencing."""

    COMPLETED = "completed"
    IN_PROGRESS = "in_progress"
    WAITING = "waiting"
    REFUSED_BAD_OUTPUT = "refused_bad_output"
    REFUSED_STALE_TOKEN = "refused_stale_token"
    REFUSED_TASK_FINISHED = "refused_task_finished"
    REFUSED_LEASE_EXPIRED = "refused_lease_expired"
    REFUSED_STALE_ATTEMPT = "refused_stale_attempt"
    REFUSED_STAGE_NOT_RUNNING = "refused_stage_not_running"
    REFUSED_EXECUTION_STOPPED = "refused_execution_stopped"
    REFUSED_TIMED_OUT = "refused_timed_out"


class TaskFailStatus(StatusCode):
    """``lifecycle.task_fail``: ``failed``, or why the failure was refused."""

    FAILED = "failed"
    REFUSED_STALE_TOKEN = "refused_stale_token"
    REFUSED_TASK_FINISHED = "refused_task_finished"
    REFUSED_LEASE_EXPIRED = "refused_lease_expired"


class UndoAction(StatusCode):
    """``lifecycle.undo_start``'s action: ``skip`` (never completed, or ``compensate: false``),
    ``done`` (already compensated) or ``compensate`` (undo it now)."""

    SKIP = "skip"
    DONE = "done"
    COMPENSATE = "compensate"


class UndoCompleteStatus(StatusCode):
    """``lifecycle.undo_complete``: the execution's status (rolled_back after its last undo)."""

    COMPENSATING = "compensating"
    ROLLED_BACK = "rolled_back"


class UndoFailStatus(StatusCode):
    """``lifecycle.undo_fail``: ``compensating`` (a retry was recorded) or ``compensation_failed``."""

    COMPENSATING = "compensating"
    COMPENSATION_FAILED = "compensation_failed"


class ScheduleTickStatus(StatusCode):
    """``lifecycle.execution_schedule``: the tick's execution was inserted by this call, by an
    earlier one, or not at all (the definition is no longer the active version)."""

    CREATED = "created"
    EXISTS = "exists"
    INACTIVE = "inactive"


class StageReadiness(StatusCode):
    """``lifecycle.stage_readiness``: what a stage's op is to do now (docs/branches.md)."""

    READY = "ready"
    COMPLETED = "completed"
    SKIPPED = "skipped"
    WAITING = "waiting"
    BLOCKED = "blocked"
    ENDED = "ended"
    UNKNOWN = "unknown"


class DecideStatus(StatusCode):
    """``lifecycle.approval_decide``: the execution's next step after a decision (``continuing``:
    stages became pending, a continuation run starts them), or why the decision was refused."""

    COMPLETED = "completed"
    FAILED = "failed"
    CONTINUING = "continuing"
    WAITING = "waiting"
    IN_PROGRESS = "in_progress"
    REFUSED_UNKNOWN_STAGE = "refused_unknown_stage"
    REFUSED_NOT_APPROVAL = "refused_not_approval"
    REFUSED_NOT_WAITING = "refused_not_waiting"
    REFUSED_NOT_APPROVER = "refused_not_approver"


class RateTakeStatus(StatusCode):
    """``lifecycle.stage_rate_take``: the call may start (``granted``), must wait for a token
    (``waiting``), or may not happen (the execution stopped, the task is no longer the op's)."""

    GRANTED = "granted"
    WAITING = "waiting"
    REFUSED_EXECUTION_STOPPED = "refused_execution_stopped"
    REFUSED_TASK_FINISHED = "refused_task_finished"


class CapabilityLimitStatus(StatusCode):
    """``lifecycle.capability_limit_set``: the limit was ``set``, ``cleared``, or there was none
    to clear (``unchanged``)."""

    SET = "set"
    CLEARED = "cleared"
    UNCHANGED = "unchanged"


class BatchMemberStatus(StatusCode):
    """What ``lifecycle.batch_ensure`` did with one member: ``bound`` to the run (started), or it
    left the batch: ``stopped`` (cancelled, taken over) or ``not_runnable`` (a transition refused it)."""

    BOUND = "bound"
    STOPPED = "stopped"
    NOT_RUNNABLE = "not_runnable"


class BatchStartState(StatusCode):
    """``lifecycle.batch_stage_start``: per member, ``started`` (an attempt), ``completed`` (done by
    an earlier run), what the op leaves alone (the :class:`StageReadiness` codes), or that the member
    left the batch (``stopped``, ``not_runnable``)."""

    STARTED = "started"
    COMPLETED = "completed"
    SKIPPED = "skipped"
    WAITING = "waiting"
    BLOCKED = "blocked"
    ENDED = "ended"
    STOPPED = "stopped"
    NOT_RUNNABLE = "not_runnable"


#: the enum of each SQL function that returns a status code (tests/sql/test_transitions.py pins these to sql/schema)
STATUS_ENUMS: dict[str, type[StrEnum]] = {
    "lifecycle.stage_complete": StageCompleteStatus,
    "lifecycle.stage_fail": StageFailStatus,
    "lifecycle.stage_schedule_retry": StageRetryStatus,
    "lifecycle.task_complete": TaskCompleteStatus,
    "lifecycle.task_fail": TaskFailStatus,
    "lifecycle.task_abandon": TaskStatus,
    "lifecycle.undo_start": UndoAction,
    "lifecycle.undo_complete": UndoCompleteStatus,
    "lifecycle.undo_fail": UndoFailStatus,
    "lifecycle.breaker_reset": BreakerState,
    "lifecycle.execution_schedule": ScheduleTickStatus,
    "lifecycle.stage_readiness": StageReadiness,
    "lifecycle.approval_decide": DecideStatus,
    "lifecycle.stage_rate_take": RateTakeStatus,
    "lifecycle.capability_limit_set": CapabilityLimitStatus,
}


def _row(conn: Connection, name: str, params: Mapping[str, Any]) -> dict[str, Any]:
    row = conn.execute(query(name), params).fetchone()
    if row is None:  # every query here returns one row, or raises
        raise RuntimeError(f"query {name!r} returned no row")
    return dict(row)


def _text(value: Any) -> str | None:
    return None if value is None else str(value)


# -- executions -------------------------------------------------------------------------------------------


def execution_create(
    conn: Connection,
    *,
    definition_id: str,
    context: Mapping[str, Any],
    created_by: str | None,
    run_id: str | None = None,
) -> str:
    """Insert a pending execution of a definition (the runbook's section 8); return its id.

    ``run_id``: the Dagster run that will execute it, bound in the same statement (a row bound to
    a run is never launched by the launch sensor); None leaves it to the launch sensor."""
    params = {"definition_id": definition_id, "context": Jsonb(dict(context)), "created_by": created_by}
    if run_id is None:
        row = _row(conn, "create_execution", params)
    else:
        row = _row(conn, "create_execution_bound", {**params, "run_id": run_id})
    return str(row["id"])


@dataclass(frozen=True)
class ScheduledExecution:
    """What one schedule tick did: ``status`` and the tick's execution (None when ``inactive``)."""

    status: ScheduleTickStatus
    execution_id: str | None


def execution_schedule(
    conn: Connection, *, definition_id: str, tick: str, context: Mapping[str, Any]
) -> ScheduledExecution:
    """``lifecycle.execution_schedule``: insert the pending execution of schedule tick ``tick``
    (its key, ``schedule:<definition id>:<instant>``) with ``context``, once however often it is
    called.

    Raises:
        psycopg.errors.NoDataFound: no such definition.
        psycopg.errors.InvalidParameterValue: ``tick`` is not a key of that definition.
    """
    params = {"definition_id": definition_id, "tick": tick, "context": Jsonb(dict(context))}
    row = _row(conn, "schedule_execution", params)
    status = parse_status(ScheduleTickStatus, "lifecycle.execution_schedule", row["status"])
    return ScheduledExecution(status=status, execution_id=_text(row["execution_id"]))


@dataclass(frozen=True)
class EnsuredExecution:
    """The execution a run executes, after ``lifecycle.execution_ensure`` created or adopted it."""

    id: str
    status: ExecutionStatus
    context: Any


def execution_ensure(
    conn: Connection,
    *,
    definition_id: str,
    run_id: str,
    execution_id: str | None,
    context: Mapping[str, Any],
    resume: bool,
) -> EnsuredExecution:
    """``lifecycle.execution_ensure``: create the run's execution, or adopt ``execution_id``
    (``resume``: take it over from an earlier run), bind it to the run and start it."""
    row = _row(
        conn,
        "ensure_execution",
        {
            "definition_id": definition_id,
            "run_id": run_id,
            "execution_id": execution_id,
            "context": Jsonb(dict(context)),
            "resume": resume,
        },
    )
    status = parse_status(ExecutionStatus, "lifecycle.execution_ensure", row["status"])
    return EnsuredExecution(id=str(row["id"]), status=status, context=row["context"])


@dataclass(frozen=True)
class CancelResult:
    """``lifecycle.execution_cancel``: whether this call cancelled it, its status now and before,
    and its Dagster run (None: none bound)."""

    cancelled: bool
    status: ExecutionStatus
    previous_status: ExecutionStatus
    dagster_run_id: str | None


def execution_cancel(conn: Connection, *, execution_id: str, reason: str, compensate: bool) -> CancelResult:
    """``lifecycle.execution_cancel``: cancel a pending or in-progress execution (idempotent: a
    finished one is left as it is, ``cancelled`` False)."""
    row = _row(conn, "cancel_execution", {"execution_id": execution_id, "reason": reason, "compensate": compensate})
    name = "lifecycle.execution_cancel"
    return CancelResult(
        cancelled=bool(row["cancelled"]),
        status=parse_status(ExecutionStatus, name, row["status"]),
        previous_status=parse_status(ExecutionStatus, name, row["previous_status"]),
        dagster_run_id=_text(row["dagster_run_id"]),
    )


def execution_fail(conn: Connection, *, execution_id: str, reason: str, run_id: str | None) -> bool:
    """``lifecycle.execution_fail``: fail an in-progress execution (under ``run_id`` when given);
    False when it was not (idempotent)."""
    return bool(
        _row(conn, "fail_execution", {"execution_id": execution_id, "reason": reason, "run_id": run_id})["failed"]
    )


def execution_set_pending_reason(conn: Connection, *, execution_id: str, reason: str) -> bool:
    """``lifecycle.execution_set_pending_reason``: say why a pending execution waits; False when
    it is not pending or already says so."""
    return bool(_row(conn, "set_pending_reason", {"execution_id": execution_id, "reason": reason})["changed"])


def execution_set_trace_parent(conn: Connection, *, execution_id: str, trace_parent: str) -> str:
    """``lifecycle.execution_set_trace_parent``: store ``trace_parent`` (a W3C traceparent,
    ``00-<32 hex>-<16 hex>-<2 hex>``) as the execution's trace unless it has one; return the one
    stored (another run's, when it was first).

    Raises:
        psycopg.errors.NoDataFound: no such execution.
        psycopg.errors.CheckViolation: ``trace_parent`` is not a traceparent.
    """
    params = {"execution_id": execution_id, "trace_parent": trace_parent}
    return str(_row(conn, "set_trace_parent", params)["trace_parent"])


def run_heartbeat(conn: Connection, *, run_id: str) -> bool:
    """``lifecycle.run_heartbeat``: the run's in-progress execution was seen now; False if none."""
    return bool(_row(conn, "heartbeat", {"run_id": run_id})["alive"])


def compensation_start(conn: Connection, *, execution_id: str, reason: str) -> None:
    """``lifecycle.compensation_start`` (the runbook's ``perform_workflow_compensation``): start
    compensating a failed or cancelled execution; idempotent."""
    conn.execute(query("perform_compensation"), {"execution_id": execution_id, "reason": reason})


# -- stages -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StartedStage:
    """``lifecycle.stage_start``: the stage log, its task and routed agent (all None when no agent
    may be called), the stage's input and attempt number; ``already_completed`` with ``output``
    when a resumed run found the stage done."""

    log_id: str
    task_id: str | None
    agent_id: str | None
    agent_name: str | None
    agent_kind: AgentKind | None
    #: as stored (``{"context": ..., "upstream": ...}``; :meth:`Task.from_input_data` checks its shape)
    input_data: Any
    attempt: int
    already_completed: bool
    output: dict[str, Any]


def stage_start(
    conn: Connection,
    *,
    execution_id: str,
    stage_id: str,
    capability: str,
    ancestors: Mapping[str, str],
    attempt: int,
    timeout_s: float | None,
    max_attempts: int,
    resume: bool,
    run_id: str,
) -> StartedStage:
    """``lifecycle.stage_start``: the stage log in progress, routing and the task's dispatch row."""
    params = {
        "execution_id": execution_id,
        "stage_id": stage_id,
        "capability": capability,
        "ancestors": Jsonb(dict(ancestors)),
        "attempt": attempt,
        "timeout_s": timeout_s,
        "max_attempts": max_attempts,
        "resume": resume,
        "run_id": run_id,
    }
    row = _row(conn, "start_stage", params)
    kind = row["agent_kind"]
    return StartedStage(
        log_id=str(row["log_id"]),
        task_id=_text(row["task_id"]),
        agent_id=_text(row["agent_id"]),
        agent_name=_text(row["agent_name"]),
        agent_kind=None if kind is None else parse_status(AgentKind, "lifecycle.stage_start", kind),
        input_data=row["input_data"],
        attempt=int(row["attempt_number"]),
        already_completed=bool(row["already_completed"]),
        output=dict(row["output_data"] or {}),
    )


def stage_complete(
    conn: Connection, *, log_id: str, task_id: str | None, output: Mapping[str, Any], attempt: int
) -> StageCompleteStatus:
    """``lifecycle.stage_complete``: record the attempt's output."""
    params = {"log_id": log_id, "task_id": task_id, "output": Jsonb(output), "attempt": attempt}
    return parse_status(StageCompleteStatus, "lifecycle.stage_complete", _row(conn, "complete_stage", params)["status"])


def stage_readiness(conn: Connection, *, execution_id: str, stage_id: str) -> StageReadiness:
    """``lifecycle.stage_readiness``: whether the stage's op should start it (``ready``) or
    leave it (completed, skipped, waiting, blocked behind an approval, ended early, unknown)."""
    row = _row(conn, "stage_readiness", {"execution_id": execution_id, "stage_id": stage_id})
    return parse_status(StageReadiness, "lifecycle.stage_readiness", row["status"])


def stage_edges_fired(conn: Connection, *, execution_id: str, stage_id: str) -> tuple[str, ...]:
    """``lifecycle.stage_edges``: the child stages whose edge from this stage fired (its
    ``when``/``unless`` patterns against its recorded output), sorted; empty unless completed."""
    rows = conn.execute(query("stage_edges"), {"execution_id": execution_id, "stage_id": stage_id}).fetchall()
    return tuple(str(r["target"]) for r in rows if r["fired"])


@dataclass(frozen=True)
class ApprovalWait:
    """``lifecycle.approval_wait``: the approval stage's status (waiting, completed: decided
    already, skipped), its deadline (None: none) and, when decided, its decision (the output)."""

    status: str
    wait_until: datetime | None
    output: dict[str, Any] | None


def approval_wait(
    conn: Connection, *, execution_id: str, stage_id: str, ancestors: Mapping[str, str], run_id: str | None
) -> ApprovalWait:
    """``lifecycle.approval_wait``: the approval stage reached (its log waiting; the execution
    waiting when nothing else of it can run). Idempotent.

    Raises:
        psycopg.errors.ObjectNotInPrerequisiteState: the execution is not in progress, a parent not done.
        psycopg.errors.UniqueViolation: the execution is bound to another run.
    """
    params = {"execution_id": execution_id, "stage_id": stage_id, "ancestors": Jsonb(dict(ancestors)), "run_id": run_id}
    row = _row(conn, "approval_wait", params)
    output = row["output"]
    return ApprovalWait(str(row["status"]), row["wait_until"], None if output is None else dict(output))


def approval_decide(
    conn: Connection,
    *,
    execution_id: str,
    stage_id: str,
    decision: str,
    comment: str | None,
    actor: str,
    operator: bool,
) -> DecideStatus:
    """``lifecycle.approval_decide``: a decision (``approve``/``reject``) on a waiting approval
    stage, by ``actor`` (``operator``: may decide for any approver), in one transaction.

    Raises:
        psycopg.errors.NoDataFound: no such execution.
        psycopg.errors.InvalidParameterValue: a decision other than approve/reject, a comment over 4000 characters.
    """
    params = {
        "execution_id": execution_id,
        "stage_id": stage_id,
        "decision": decision,
        "comment": comment,
        "actor": actor,
        "operator": operator,
    }
    return parse_status(DecideStatus, "lifecycle.approval_decide", _row(conn, "approval_decide", params)["status"])


def approvals_expire(conn: Connection, *, limit: int = 100) -> list[tuple[str, str, str]]:
    """``lifecycle.approvals_expire``: waiting approval stages past their deadline decided by
    their ``on_timeout``; ``[(execution id, stage id, next step)]``."""
    rows = conn.execute(query("approvals_expire"), {"limit": limit}).fetchall()
    return [(str(r["execution_id"]), str(r["stage_id"]), str(r["status"])) for r in rows]


def stage_fail(
    conn: Connection, *, log_id: str, task_id: str | None, error: str, error_code: str, attempt: int
) -> StageFailStatus:
    """``lifecycle.stage_fail``: the stage, and with it its execution, failed for good."""
    params = {"log_id": log_id, "task_id": task_id, "error": error, "error_code": error_code, "attempt": attempt}
    return parse_status(StageFailStatus, "lifecycle.stage_fail", _row(conn, "fail_stage", params)["status"])


def stage_schedule_retry(
    conn: Connection,
    *,
    log_id: str,
    task_id: str | None,
    attempt: int,
    error: str,
    error_code: str,
    error_class: str,
    delay_s: float,
) -> StageRetryStatus:
    """``lifecycle.stage_schedule_retry``: attempt ``attempt`` failed; the next one may start in
    ``delay_s`` seconds."""
    params = {
        "log_id": log_id,
        "task_id": task_id,
        "attempt": attempt,
        "error": error,
        "error_code": error_code,
        "error_class": error_class,
        "delay_s": delay_s,
    }
    return parse_status(
        StageRetryStatus, "lifecycle.stage_schedule_retry", _row(conn, "schedule_retry", params)["status"]
    )


# -- the task protocol --------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClaimedTask:
    """A task ``lifecycle.task_claim`` leased to a worker, with its fencing token."""

    task_id: str
    lease_token: int
    execution_id: str | None
    stage_id: str
    capability: str | None
    attempt: int
    #: as stored (:meth:`Task.from_input_data` checks its shape)
    input_data: Any
    lease_expires_at: datetime
    #: seconds from the claim to the task's ``deadline_at`` (its stage's timeout), by the database's
    #: clock (<= 0: already past); None when the stage has no timeout
    time_left_s: float | None = None
    #: the W3C traceparent the worker's span continues (the execution's trace); None: not traced
    trace_parent: str | None = None
    #: the workflow and version of the task's execution (None: a task without one)
    workflow: str | None = None
    version: int | None = None


@dataclass(frozen=True)
class TaskState:
    """A ``task_queue`` row as a stage op sees it (the ``task_state`` query): its status, attempt,
    a worker's outcome (output, or error with code, retryable and Retry-After seconds), and its
    execution's status as of the same read."""

    id: str
    status: TaskStatus
    attempt: int
    error_message: str | None
    error_code: str | None
    retryable: bool | None
    retry_after_s: float | None
    output: dict[str, Any] | None
    lease_token: int | None
    #: the status of the task's execution read in the same statement (None: a task without one)
    execution_status: str | None = None

    @property
    def execution_stopped(self) -> bool:
        """Whether the task's execution is no longer in progress (never for a task without one)."""
        return self.execution_status is not None and self.execution_status != "in_progress"

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> TaskState:
        """Build one from a ``task_state`` row.

        Raises:
            UnknownStatusError: the row's status is not a task status.
        """
        return cls(
            id=str(row["id"]),
            status=parse_status(TaskStatus, "task_queue.status", row["status"]),
            attempt=int(row["attempt"]),
            error_message=row["error_message"],
            error_code=row["error_code"],
            retryable=row["retryable"],
            retry_after_s=row["retry_after_s"],
            output=row["output_data"],
            lease_token=row["lease_token"],
            execution_status=row.get("execution_status"),
        )


def task_claim(conn: Connection, *, worker: str, agent: str, limit: int, lease_s: float) -> list[ClaimedTask]:
    """``lifecycle.task_claim``: lease up to ``limit`` pending tasks of ``agent`` for ``lease_s`` seconds."""
    rows = conn.execute(
        query("task_claim"), {"worker": worker, "agent": agent, "limit": limit, "lease_s": lease_s}
    ).fetchall()
    left: dict[str, Any] = {}
    if rows:  # a second statement: it sees the claimed rows whatever the claim's snapshot was
        found = conn.execute(query("task_time_left"), {"ids": [str(r["task_id"]) for r in rows]}).fetchall()
        left = {str(r["id"]): r for r in found}
    return [
        ClaimedTask(
            task_id=str(r["task_id"]),
            lease_token=int(r["lease_token"]),
            execution_id=_text(r["execution_id"]),
            stage_id=str(r["stage_id"]),
            capability=_text(r["capability"]),
            attempt=int(r["attempt"]),
            input_data=r["input_data"],
            lease_expires_at=r["lease_expires_at"],
            **_claim_extras(left.get(str(r["task_id"]))),
        )
        for r in rows
    ]


def _claim_extras(row: Mapping[str, Any] | None) -> dict[str, Any]:
    """The ``task_time_left`` columns of a claimed task as :class:`ClaimedTask` fields."""
    if row is None:
        return {}
    return {
        "time_left_s": None if row["time_left_s"] is None else float(row["time_left_s"]),
        "trace_parent": _text(row["trace_parent"]),
        "workflow": _text(row["workflow"]),
        "version": None if row["version"] is None else int(row["version"]),
    }


def task_heartbeat(conn: Connection, *, task_id: str, token: int, lease_s: float) -> bool:
    """``lifecycle.task_heartbeat``: extend the lease; False when ``token`` is stale (lease lost)."""
    return bool(_row(conn, "task_heartbeat", {"task_id": task_id, "token": token, "lease_s": lease_s})["extended"])


def task_complete(conn: Connection, *, task_id: str, token: int, output: Mapping[str, Any]) -> TaskCompleteStatus:
    """``lifecycle.task_complete``: a worker's result (its stage completes with it)."""
    params = {"task_id": task_id, "token": token, "output": Jsonb(output)}
    return parse_status(TaskCompleteStatus, "lifecycle.task_complete", _row(conn, "task_complete", params)["status"])


def task_fail(
    conn: Connection,
    *,
    task_id: str,
    token: int,
    error: str,
    error_code: str,
    retryable: bool,
    retry_after_s: float | None,
) -> TaskFailStatus:
    """``lifecycle.task_fail``: a worker's failure (the stage op decides on a retry)."""
    params = {
        "task_id": task_id,
        "token": token,
        "error": error,
        "error_code": error_code,
        "retryable": retryable,
        "retry_after_s": retry_after_s,
    }
    return parse_status(TaskFailStatus, "lifecycle.task_fail", _row(conn, "task_fail", params)["status"])


def task_release(conn: Connection, *, task_id: str, token: int) -> bool:
    """``lifecycle.task_release``: hand a leased task back; False when ``token`` no longer holds it."""
    return bool(_row(conn, "task_release", {"task_id": task_id, "token": token})["released"])


def task_reap(conn: Connection) -> int:
    """``lifecycle.task_reap``: put tasks whose lease expired back in the queue; how many."""
    return int(_row(conn, "task_reap", {})["reaped"])


def task_abandon(conn: Connection, *, task_id: str, reason: str) -> TaskStatus:
    """``lifecycle.task_abandon``: cancel an open task; return its status before."""
    row = _row(conn, "task_abandon", {"task_id": task_id, "reason": reason})
    return parse_status(TaskStatus, "lifecycle.task_abandon", row["previous_status"])


# -- compensation and breakers ------------------------------------------------------------------------


@dataclass(frozen=True)
class UndoStarted:
    """``lifecycle.undo_start``: what to do, and for ``compensate`` the stage log, the stage's
    output, the execution's context and the agent that ran the stage."""

    action: UndoAction
    log_id: str | None
    output: dict[str, Any]
    context: dict[str, Any]
    agent_name: str | None


def undo_start(
    conn: Connection,
    *,
    execution_id: str,
    stage_id: str,
    run_id: str,
    dependents: list[str],
    attempt: int,
    takeover: bool,
) -> UndoStarted:
    """``lifecycle.undo_start``: begin (or skip) the undo of one stage under compensation run ``run_id``."""
    params = {
        "execution_id": execution_id,
        "stage_id": stage_id,
        "run_id": run_id,
        "dependents": dependents,
        "attempt": attempt,
        "takeover": takeover,
    }
    row = _row(conn, "start_compensation", params)
    return UndoStarted(
        action=parse_status(UndoAction, "lifecycle.undo_start", row["action"]),
        log_id=_text(row["log_id"]),
        output=dict(row["output_data"] or {}),
        context=dict(row["context"] or {}),
        agent_name=_text(row["agent_name"]),
    )


def undo_complete(
    conn: Connection, *, log_id: str, void: list[Any], result: Mapping[str, Any], attempt: int
) -> UndoCompleteStatus:
    """``lifecycle.undo_complete``: the stage is compensated, the artifacts in ``void`` voided."""
    params = {"log_id": log_id, "void": Jsonb(void), "result": Jsonb(result), "attempt": attempt}
    return parse_status(
        UndoCompleteStatus, "lifecycle.undo_complete", _row(conn, "complete_compensation", params)["status"]
    )


def undo_fail(
    conn: Connection, *, log_id: str, error: str, final: bool, attempt: int, delay_s: float | None
) -> UndoFailStatus:
    """``lifecycle.undo_fail``: an undo attempt failed; ``final``: the compensation failed for good."""
    params = {"log_id": log_id, "error": error, "final": final, "attempt": attempt, "delay_s": delay_s}
    return parse_status(UndoFailStatus, "lifecycle.undo_fail", _row(conn, "fail_compensation", params)["status"])


def breaker_reset(conn: Connection, *, agent: str) -> BreakerState:
    """``lifecycle.breaker_reset``: close an agent's breaker; return its state before."""
    return parse_status(
        BreakerState, "lifecycle.breaker_reset", _row(conn, "breaker_reset", {"agent": agent})["previous_state"]
    )


# -- rate limits (sql/schema/16_rate_limits.sql) -----------------------------------------------------------


@dataclass(frozen=True)
class RateTake:
    """What ``lifecycle.stage_rate_take`` gave: ``status``; ``wait_s``: seconds until the refusing
    bucket holds a token (``waiting``; 0 or more, None when refused); ``scope``: the bucket that
    refused (``agent`` or ``capability``; None unless waiting)."""

    status: RateTakeStatus
    wait_s: float | None
    scope: str | None


def stage_rate_take(conn: Connection, *, task_id: str, note: bool) -> RateTake:
    """``lifecycle.stage_rate_take``: a token of the agent's and the capability's rate limits for
    one call of an op's task; ``note``: when none is left, write ``stage_rate_limited`` (the first
    refusal of a wait). An unlimited agent and capability: ``granted`` with nothing written.

    Raises:
        psycopg.errors.NoDataFound: an unknown task.
    """
    row = _row(conn, "stage_rate_take", {"task_id": task_id, "note": note})
    status = parse_status(RateTakeStatus, "lifecycle.stage_rate_take", row["status"])
    wait = None if row["wait_s"] is None else float(row["wait_s"])
    return RateTake(status, wait, _text(row["scope"]))


def capability_limit_set(
    conn: Connection, *, capability: str, per_s: float | None, burst: float | None
) -> CapabilityLimitStatus:
    """``lifecycle.capability_limit_set``: limit ``capability`` to ``per_s`` calls a second with
    bursts of ``burst`` (None: max(1, per_s)); ``per_s`` None removes its limit.

    Raises:
        psycopg.errors.CheckViolation: a limit out of range (the message names the capability and
            the field).
    """
    row = _row(conn, "capability_limit_set", {"capability": capability, "per_s": per_s, "burst": burst})
    return parse_status(CapabilityLimitStatus, "lifecycle.capability_limit_set", row["status"])


# -- alerts (sql/schema/13_alerts.sql) ---------------------------------------------------------------------


class AlertKind(StatusCode):
    """``lifecycle.alerts.kind``."""

    BREAKER_OPENED = "breaker_opened"
    COMPENSATION_FAILED = "compensation_failed"
    EXECUTION_FAILED = "execution_failed"
    QUEUE_STALE = "queue_stale"


@dataclass(frozen=True)
class ClaimedAlert:
    """An alert ``lifecycle.alerts_claim`` leased to this sender: ``payload`` is the JSON object to
    POST (it holds ``text``, ``kind``, ``key``, ``dedup_key`` and ``at``); ``attempts`` counts this
    one (1 on the first try)."""

    id: int
    kind: AlertKind
    key: str
    payload: dict[str, Any]
    created_at: datetime
    attempts: int
    last_error: str | None


def alerts_scan(conn: Connection, *, threshold_s: float, now: datetime) -> int:
    """``lifecycle.alerts_scan``: record a ``queue_stale`` alert per capability whose oldest pending
    task has waited ``threshold_s`` seconds or more at ``now``; return how many were recorded.

    Raises:
        psycopg.errors.InvalidParameterValue: ``threshold_s`` is not a finite number > 0.
    """
    return int(_row(conn, "alerts_scan", {"threshold_s": threshold_s, "now": now})["recorded"])


def alerts_claim(conn: Connection, *, limit: int, lease_s: float, now: datetime) -> list[ClaimedAlert]:
    """``lifecycle.alerts_claim``: lease up to ``limit`` unsent alerts due at ``now`` for ``lease_s``
    seconds (skipping those another sender holds), oldest due first."""
    rows = conn.execute(query("alerts_claim"), {"limit": limit, "lease_s": lease_s, "now": now}).fetchall()
    return [
        ClaimedAlert(
            id=int(r["id"]),
            kind=parse_status(AlertKind, "lifecycle.alerts_claim", r["kind"]),
            key=str(r["key"]),
            payload=dict(r["payload"]),
            created_at=r["created_at"],
            attempts=int(r["attempts"]),
            last_error=_text(r["last_error"]),
        )
        for r in rows
    ]


def alert_sent(conn: Connection, *, alert_id: int, now: datetime) -> bool:
    """``lifecycle.alert_sent``: the receiver accepted the alert; False if it was recorded sent before."""
    return bool(_row(conn, "alert_sent", {"id": alert_id, "now": now})["recorded"])


def alert_failed(conn: Connection, *, alert_id: int, error: str, delay_s: float, now: datetime) -> bool:
    """``lifecycle.alert_failed``: sending failed; keep ``error``, try again ``delay_s`` seconds after
    ``now``. False when the alert was sent meanwhile (nothing changed)."""
    params = {"id": alert_id, "error": error, "delay_s": delay_s, "now": now}
    return bool(_row(conn, "alert_failed", params)["recorded"])


# -- retention --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PruneBatch:
    """``lifecycle.executions_prune``: one batch. Rows removed (or, in a dry run, that would be) per
    kind; ``deferred`` finished executions looked at but kept (a newer event or row change, or a
    breaker outcome still counted); ``cursor`` the ``(created_at, id)`` to pass to the next batch
    (None: nothing was left to look at); the removed executions' ids and Dagster run ids."""

    executions: int
    tasks: int
    stage_logs: int
    artifacts: int
    breaker_outcomes: int
    events: int
    deferred: int
    cursor: tuple[datetime, str] | None
    execution_ids: tuple[str, ...]
    run_ids: tuple[str, ...]


def executions_prune(
    conn: Connection,
    *,
    before: datetime,
    limit: int,
    dry_run: bool,
    after: tuple[datetime, str] | None,
    now: datetime | None = None,
) -> PruneBatch:
    """``lifecycle.executions_prune``: remove one batch of at most ``limit`` finished executions
    created before ``before`` (timezone-aware), after the cursor ``after``; ``now`` the database's
    clock when None. Raises ``InvalidParameterValue`` when ``before`` is less than an hour before
    now or ``limit`` is outside 1..10000."""
    params = {
        "before": before,
        "limit": limit,
        "dry_run": dry_run,
        "after_created": after[0] if after else None,
        "after_id": after[1] if after else None,
        "now": now,
    }
    row = _row(conn, "executions_prune", params)
    cursor = (row["last_created_at"], str(row["last_id"])) if row["last_id"] is not None else None
    return PruneBatch(
        executions=int(row["executions"]),
        tasks=int(row["tasks"]),
        stage_logs=int(row["stage_logs"]),
        artifacts=int(row["artifacts"]),
        breaker_outcomes=int(row["breaker_outcomes"]),
        events=int(row["events"]),
        deferred=int(row["deferred"]),
        cursor=cursor,
        execution_ids=tuple(row["execution_ids"] or ()),
        run_ids=tuple(row["run_ids"] or ()),
    )


# -- batches (sql/schema/17_batches.sql, docs/batches.md) ---------------------------------------------------


@dataclass(frozen=True)
class FormedBatch:
    """``lifecycle.batch_form``: a new batch's id and how many executions it carries."""

    id: str
    size: int


def batch_form(conn: Connection, *, definition_id: str, max_executions: int, max_wait_s: float) -> FormedBatch | None:
    """``lifecycle.batch_form``: group up to ``max_executions`` pending executions of the definition
    into a new batch, or None (none pending, or not full and the oldest has waited less than
    ``max_wait_s`` seconds)."""
    params = {"definition_id": definition_id, "max_executions": max_executions, "max_wait_s": max_wait_s}
    row = conn.execute(query("batch_form"), params).fetchone()
    return None if row is None else FormedBatch(id=str(row["batch_id"]), size=int(row["size"]))


@dataclass(frozen=True)
class BatchMember:
    """One member's row of ``lifecycle.batch_ensure``; ``message`` says why it left (else None)."""

    execution_id: str
    status: BatchMemberStatus
    message: str | None


def batch_ensure(
    conn: Connection,
    *,
    batch_id: str,
    definition_id: str,
    run_id: str,
    after: str | None = None,
    limit: int | None = None,
) -> list[BatchMember]:
    """``lifecycle.batch_ensure``: bind the batch's live members (the next ``limit`` after execution
    id ``after``; None: all) and the batch to the run, in execution id order."""
    params = {"batch_id": batch_id, "definition_id": definition_id, "run_id": run_id, "after": after, "limit": limit}
    rows = conn.execute(query("batch_ensure"), params).fetchall()
    return [
        BatchMember(
            execution_id=str(r["execution_id"]),
            status=parse_status(BatchMemberStatus, "lifecycle.batch_ensure", r["status"]),
            message=_text(r["message"]),
        )
        for r in rows
    ]


@dataclass(frozen=True)
class BatchStart:
    """One member's row of ``lifecycle.batch_stage_start``: its state, and for ``started`` or
    ``completed`` the start's columns (``started``: None ids when no agent may be called)."""

    execution_id: str
    state: BatchStartState
    started: StartedStage | None
    message: str | None


def batch_stage_start(
    conn: Connection,
    *,
    batch_id: str,
    run_id: str,
    stage_id: str,
    capability: str,
    ancestors: Mapping[str, str],
    timeout_s: float | None,
    max_attempts: int,
    after: str | None = None,
    limit: int | None = None,
) -> list[BatchStart]:
    """``lifecycle.batch_stage_start``: start the stage for the batch's live members (the next
    ``limit`` after execution id ``after``; None: all), in execution id order."""
    params = {
        "after": after,
        "limit": limit,
        "batch_id": batch_id,
        "run_id": run_id,
        "stage_id": stage_id,
        "capability": capability,
        "ancestors": Jsonb(dict(ancestors)),
        "timeout_s": timeout_s,
        "max_attempts": max_attempts,
    }
    out = []
    for r in conn.execute(query("batch_stage_start"), params).fetchall():
        state = parse_status(BatchStartState, "lifecycle.batch_stage_start", r["state"])
        started = None
        if state in (BatchStartState.STARTED, BatchStartState.COMPLETED):
            kind = r["agent_kind"]
            started = StartedStage(
                log_id=str(r["log_id"]),
                task_id=_text(r["task_id"]),
                agent_id=_text(r["agent_id"]),
                agent_name=_text(r["agent_name"]),
                agent_kind=None if kind is None else parse_status(AgentKind, "lifecycle.batch_stage_start", kind),
                input_data=r["input_data"],
                attempt=int(r["attempt_number"]),
                already_completed=state is BatchStartState.COMPLETED,
                output=dict(r["output_data"] or {}),
            )
        out.append(BatchStart(str(r["execution_id"]), state, started, _text(r["message"])))
    return out


@dataclass(frozen=True)
class BatchResult:
    """One outcome for ``lifecycle.batch_stage_record``: ``outcome`` completed (with ``output``),
    retry (after ``delay_s`` seconds) or failed (with the error's message, code and class)."""

    execution_id: str
    log_id: str
    task_id: str | None
    attempt: int
    outcome: str
    output: Mapping[str, Any] | None = None
    error: str | None = None
    error_code: str | None = None
    error_class: str | None = None
    delay_s: float | None = None


@dataclass(frozen=True)
class BatchRecorded:
    """One row of ``lifecycle.batch_stage_record``: the transition's status code (a
    :class:`StageCompleteStatus`, :class:`StageRetryStatus` or :class:`StageFailStatus` value), or
    ``error`` with the SQLSTATE and message of a data error (the output was refused)."""

    execution_id: str
    log_id: str
    status: str
    error_state: str | None
    message: str | None


_RECORD_ENUMS: dict[str, type[StatusCode]] = {
    "completed": StageCompleteStatus,
    "retry": StageRetryStatus,
    "failed": StageFailStatus,
}


def batch_stage_record(conn: Connection, *, results: list[BatchResult]) -> dict[str, BatchRecorded]:
    """``lifecycle.batch_stage_record``: record every outcome in one statement; by log id.

    Raises:
        UnknownStatusError: a status code the matching transition's enum does not know.
    """
    if not results:
        return {}
    payload = [
        {
            "execution_id": r.execution_id,
            "log_id": r.log_id,
            "task_id": r.task_id,
            "attempt": r.attempt,
            "outcome": r.outcome,
            "output": None if r.output is None else dict(r.output),
            "error": r.error,
            "error_code": r.error_code,
            "error_class": r.error_class,
            "delay_s": r.delay_s,
        }
        for r in results
    ]
    outcome_of = {r.log_id: r.outcome for r in results}
    out: dict[str, BatchRecorded] = {}
    for row in conn.execute(query("batch_stage_record"), {"results": Jsonb(payload)}).fetchall():
        status = str(row["status"])
        if status != "error":
            status = parse_status(_RECORD_ENUMS[outcome_of[str(row["log_id"])]], "lifecycle.batch_stage_record", status)
        out[str(row["log_id"])] = BatchRecorded(
            str(row["execution_id"]), str(row["log_id"]), status, _text(row["error_state"]), _text(row["message"])
        )
    return out


def batch_stage_edges(conn: Connection, *, batch_id: str, run_id: str, stage_id: str) -> tuple[str, ...]:
    """``lifecycle.batch_stage_edges``: the child stages whose edge fired for any live member, sorted."""
    rows = conn.execute(query("batch_stage_edges"), {"batch_id": batch_id, "run_id": run_id, "stage_id": stage_id})
    return tuple(str(r["target"]) for r in rows.fetchall())


def batch_leave(conn: Connection, *, execution_id: str, reason: str) -> None:
    """``lifecycle.batch_leave``: the member leaves its batch with ``reason`` (``stopped``,
    ``not_runnable``, ``retry``, ``failed``); no-op when it has left already."""
    conn.execute(query("batch_leave"), {"execution_id": execution_id, "reason": reason})
