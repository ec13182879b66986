"""One stage for every execution of a batch run (docs/batches.md), with no Dagster in it.

A batch run carries many executions of one definition version (``sql/schema/17_batches.sql``).
Its first op in a process binds them to the run (:func:`ensure_batch`, one statement); each stage
op then makes, for the whole batch, what :func:`~lifecycle_dagster.engine.stage.run_stage` makes
for one execution:

1. start: ``lifecycle.batch_stage_start`` (one statement: each live member's readiness and start);
2. call: every started attempt's agent, concurrently in threads, at most ``concurrency`` calls of
   one agent at a time (queue agents: their tasks wait for external workers as usual, polled);
3. record: ``lifecycle.batch_stage_record`` (one statement: each member's completion, retry or
   failure, decided by the stage's retry policy exactly as for one execution); an output the
   database refuses, or one that came after the deadline, is that attempt's failure, recorded in a
   second statement;
4. edges: ``lifecycle.batch_stage_edges``, the children whose edge fired for any member.

One execution never fails the op nor touches the others: a member whose stage is to be retried
leaves the batch (the resume sensor resumes it alone once its not-before time passed), one that
failed for good leaves it and its compensation starts as the failure sensor would start it
(:func:`settle`), one that stopped (cancelled, taken over, refused) leaves it too. Only the
database being unreachable (``psycopg.OperationalError``) fails the op.
"""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import psycopg

from lifecycle_dagster.agents import AgentRegistry
from lifecycle_dagster.agents.errors import AttemptError
from lifecycle_dagster.core.payload import safe_text
from lifecycle_dagster.engine.compensation import compensate_if_due
from lifecycle_dagster.engine.stage import (
    AgentOutput,
    Attempt,
    StageError,
    StageOutcome,
    StageSpec,
    call_step,
    plan_failure,
)
from lifecycle_dagster.store.db import Connection
from lifecycle_dagster.store.sqlfiles import query
from lifecycle_dagster.store.transitions import (
    BatchMember,
    BatchMemberStatus,
    BatchRecorded,
    BatchResult,
    BatchStart,
    BatchStartState,
    StageCompleteStatus,
    batch_ensure,
    batch_stage_edges,
    batch_stage_record,
    batch_stage_start,
    execution_fail,
)

#: calls of one agent a batch stage op makes at once, unless told otherwise
DEFAULT_CONCURRENCY = 8
#: members started, then recorded, per statement: each statement is one transaction holding its
#: members' execution rows (a cancel waits for it) and a subtransaction per member (PostgreSQL keeps
#: 64 subtransaction ids per backend in shared memory; past that, other sessions' visibility checks
#: read pg_subtrans), so a large batch goes in chunks of this many
CHUNK = 50


@dataclass(frozen=True)
class BatchStageOutcome:
    """What one stage op did for its batch.

    ``states``: member count by what became of it at this stage: ``completed`` (now or by an earlier
    run), the readiness codes left alone (``skipped``, ``waiting``, ``blocked``, ``ended``), and the
    ways a member left the batch (``retry``, ``failed``, ``stopped``, ``not_runnable``);
    ``fired``: the child stages whose edge fired for at least one member, sorted; ``left``:
    ``{execution_id: why}`` of the members that left the batch at this stage; ``calls``: agent calls
    made; ``duration_ms``: the op's wall time, milliseconds.
    """

    batch_id: str
    stage_id: str
    states: Mapping[str, int]
    fired: tuple[str, ...]
    left: Mapping[str, str] = field(default_factory=dict)
    calls: int = 0
    duration_ms: float = 0.0

    @property
    def members(self) -> int:
        """How many members the op looked at."""
        return sum(self.states.values())


#: (database, run id, batch id) of the batches this process bound: the next ops skip the round trip
_ENSURED: dict[tuple[str, str, str], None] = {}
_ENSURED_MAX = 64


def ensure_batch(conn: Connection, spec: StageSpec, *, batch_id: str, run_id: str) -> list[BatchMember]:
    """Bind the batch's members to run ``run_id`` (``lifecycle.batch_ensure``), once per run and
    process (later calls return []). Members that may not start left the batch: :func:`settle`
    them.

    Raises:
        psycopg.errors.UniqueViolation: another run bound the batch.
        psycopg.errors.NoDataFound / InvalidParameterValue: an unknown batch, or one of another definition.
    """
    key = (f"{conn.info.host}:{conn.info.port}/{conn.info.dbname}", run_id, batch_id)
    if key in _ENSURED:
        return []
    members: list[BatchMember] = []
    after: str | None = None
    while True:  # in chunks, as the stages (CHUNK)
        chunk = batch_ensure(
            conn, batch_id=batch_id, definition_id=spec.definition_id, run_id=run_id, after=after, limit=CHUNK
        )
        members += chunk
        if len(chunk) < CHUNK:
            break
        after = chunk[-1].execution_id
    if len(_ENSURED) >= _ENSURED_MAX:
        del _ENSURED[next(iter(_ENSURED))]
    _ENSURED[key] = None
    return members


def left_at_ensure(members: Sequence[BatchMember]) -> dict[str, str]:
    """``{execution_id: why}`` of the members :func:`ensure_batch` could not bind."""
    return {m.execution_id: m.message or m.status.value for m in members if m.status is not BatchMemberStatus.BOUND}


def run_batch_stage(
    conn: Connection,
    spec: StageSpec,
    *,
    batch_id: str,
    run_id: str,
    registry: AgentRegistry,
    concurrency: int = DEFAULT_CONCURRENCY,
    draw: Callable[[], float] = random.random,
    chunk: int | None = None,
) -> BatchStageOutcome:
    """Run stage ``spec`` for every live member of batch ``batch_id`` (see the module docstring).

    ``conn``: autocommit, shared by the call threads (psycopg serialises its use). ``concurrency``:
    at most this many calls of one agent at a time (>= 1). ``draw``: the backoff jitter's uniform
    [0, 1) value. ``chunk``: members started and recorded per transaction (>= 1; None: :data:`CHUNK`).

    Raises:
        psycopg.OperationalError: the database could not be reached (the op runs the stage again:
            every member's attempt in progress is adopted, a recorded one kept).
        UnknownStatusError: a transition returned a code the seam does not know.
    """
    t0 = time.perf_counter()
    chunk = chunk or CHUNK
    states: Counter[str] = Counter()
    left: dict[str, str] = {}
    calls = 0
    after: str | None = None
    while True:
        starts = batch_stage_start(
            conn,
            batch_id=batch_id,
            run_id=run_id,
            stage_id=spec.stage_id,
            capability=spec.capability,
            ancestors=spec.ancestors,
            timeout_s=spec.timeout_s,
            max_attempts=spec.policy.max_attempts,
            after=after,
            limit=chunk,
        )
        attempts = _attempts(spec, starts, states, left)
        results = _call_all(conn, spec, attempts, registry, concurrency)
        _record(conn, spec, results, draw, states, left)
        calls += len(attempts)
        if len(starts) < chunk:
            break
        after = starts[-1].execution_id
    fired = batch_stage_edges(conn, batch_id=batch_id, run_id=run_id, stage_id=spec.stage_id)
    return BatchStageOutcome(
        batch_id=batch_id,
        stage_id=spec.stage_id,
        states=dict(states),
        fired=fired,
        left=left,
        calls=calls,
        duration_ms=(time.perf_counter() - t0) * 1000.0,
    )


def _attempts(
    spec: StageSpec, starts: Sequence[BatchStart], states: Counter[str], left: dict[str, str]
) -> list[Attempt]:
    """The started attempts of one chunk; the other members counted in ``states`` (and ``left``)."""
    attempts: list[Attempt] = []
    for s in starts:
        if s.state is BatchStartState.STARTED and s.started is not None:
            attempts.append(Attempt.of(s.execution_id, spec.stage_id, s.started, None))
            continue
        states[s.state.value] += 1
        if s.state in (BatchStartState.STOPPED, BatchStartState.NOT_RUNNABLE):
            left[s.execution_id] = f"{s.state.value}: {s.message or ''}".rstrip(": ")
    return attempts


#: what one call gave: the attempt as it ended, and its output, completion, error or stop
_Called = tuple[Attempt, StageOutcome | AgentOutput | AttemptError | StageError]


def _call_all(
    conn: Connection, spec: StageSpec, attempts: Sequence[Attempt], registry: AgentRegistry, concurrency: int
) -> list[_Called]:
    """Call every attempt's agent (:func:`~lifecycle_dagster.engine.stage.call_step`), at most
    ``concurrency`` calls of one agent at once, in execution id order of results."""
    if not attempts:
        return []
    bounds: dict[str, threading.BoundedSemaphore] = {}
    for a in attempts:
        bounds.setdefault(a.agent_name, threading.BoundedSemaphore(max(1, concurrency)))
    agent_ids = sorted({a.agent_id for a in attempts if a.agent_id})
    limited = {
        str(r["agent_id"])
        for r in conn.execute(
            query("rate_limited_agents"), {"agent_ids": agent_ids, "capability": spec.capability}
        ).fetchall()
    }

    def one(attempt: Attempt) -> _Called:
        with bounds[attempt.agent_name]:
            try:
                return call_step(conn, spec, attempt, registry, False, attempt.agent_id in limited)
            except StageError as exc:  # the call may not happen or its task was cancelled: this member stops
                return attempt, exc

    if len(attempts) == 1 or concurrency <= 1:
        return [one(a) for a in attempts]
    workers = min(len(attempts), max(1, concurrency) * len(bounds), 64)
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix=f"batch-{spec.stage_id}") as pool:
        return list(pool.map(one, attempts))


def _failure(spec: StageSpec, attempt: Attempt, err: AttemptError, draw: Callable[[], float]) -> BatchResult:
    """The retry or failure row of a failed attempt (the stage's retry policy, as for one execution)."""
    plan = plan_failure(spec.policy, attempt.number, err, draw)
    return BatchResult(
        execution_id=attempt.execution_id,
        log_id=attempt.log_id,
        task_id=attempt.task_id,
        attempt=attempt.number,
        outcome="retry" if plan.retry else "failed",
        error=plan.message,
        error_code=err.code,
        error_class=err.error_class,
        delay_s=plan.delay_s,
    )


def _record(
    conn: Connection,
    spec: StageSpec,
    called: Sequence[_Called],
    draw: Callable[[], float],
    states: Counter[str],
    left: dict[str, str],
) -> None:
    """Record every call's outcome (one statement, and a second for the outputs the first refused),
    counting each member's state in ``states`` and the members that left in ``left``."""
    rows: list[BatchResult] = []
    attempt_of: dict[str, Attempt] = {}
    for attempt, result in called:
        attempt_of[attempt.log_id] = attempt
        if isinstance(result, StageOutcome):  # a queue worker's completion completed the stage already
            states["completed"] += 1
        elif isinstance(result, StageError):
            states["stopped"] += 1
            left[attempt.execution_id] = f"stopped: {result}"
        elif isinstance(result, AgentOutput):
            rows.append(_completion(attempt, result))
        else:
            rows.append(_failure(spec, attempt, result, draw))
    again: list[BatchResult] = []
    recorded = batch_stage_record(conn, results=rows)
    for row in rows:
        rec = recorded[row.log_id]
        refused = _refused_output(row, rec)
        if refused is not None:
            again.append(_failure(spec, attempt_of[row.log_id], refused, draw))
            continue
        _count(row, rec, states, left)
    recorded_again = batch_stage_record(conn, results=again)
    for row in again:
        _count(row, recorded_again[row.log_id], states, left)


def _completion(attempt: Attempt, result: AgentOutput) -> BatchResult:
    return BatchResult(
        execution_id=attempt.execution_id,
        log_id=attempt.log_id,
        task_id=attempt.task_id,
        attempt=attempt.number,
        outcome="completed",
        output=result.output,
    )


def _refused_output(row: BatchResult, rec: BatchRecorded) -> AttemptError | None:
    """Why a completion was not recorded after all, as the attempt's error (the database refused
    the output: ``bad_output``; it came after the deadline: ``timeout``), or None."""
    if row.outcome != "completed":
        return None
    if rec.status == "error":
        return AttemptError("bad_output", safe_text(rec.message or "output refused"), True, "BadOutput")
    if rec.status == StageCompleteStatus.REFUSED_TIMED_OUT:
        return AttemptError("timeout", f"result arrived after the deadline ({rec.status})", True, "AgentTimeout")
    return None


def _count(row: BatchResult, rec: BatchRecorded, states: Counter[str], left: dict[str, str]) -> None:
    status = str(rec.status)
    if status.startswith("refused_") or status == "error":
        states["stopped"] += 1
        left[row.execution_id] = f"stopped: {status}"
    elif row.outcome == "completed":
        states["completed"] += 1
    elif row.outcome == "retry":
        states["retry"] += 1
        left[row.execution_id] = f"retry: {row.error}"
    else:
        states["failed"] += 1
        left[row.execution_id] = f"failed: {row.error}"


def settle(conn: Connection, left: Mapping[str, str], *, run_id: str, stage_id: str) -> None:
    """What a failed run's failure sensor does for its execution, for each member that left the
    batch at stage ``stage_id``: one still in progress under the run (it stopped) fails
    (``lifecycle.execution_fail``), then its compensation starts when due (a failed or cancelled
    execution, by its DAG's ``on_failure``). A member left to retry is left alone."""
    for execution_id, why in left.items():
        if why.startswith("retry"):
            continue
        reason = f"Dagster run {run_id} failed: stage '{stage_id}' {why}"
        try:
            execution_fail(conn, execution_id=execution_id, reason=reason, run_id=run_id)
            compensate_if_due(conn, execution_id)
        except psycopg.OperationalError:
            raise
        except psycopg.Error:  # the reconciler does it on its next tick: never stop the others for one
            continue


def live_members(conn: Connection, *, batch_id: str, run_id: str) -> list[str]:
    """The ids of the batch's members still in it and held by run ``run_id``, sorted."""
    rows = conn.execute(query("batch_live_members"), {"batch_id": batch_id, "run_id": run_id}).fetchall()
    return [str(r["execution_id"]) for r in rows]


def batch_of_execution(conn: Connection, execution_id: str) -> dict[str, Any] | None:
    """The batch an execution was launched in: ``{"batch_id", "size", "run_id", "left_at",
    "left_reason"}``, or None (it ran alone)."""
    row = conn.execute(query("batch_of_execution"), {"execution_id": execution_id}).fetchone()
    return None if row is None else dict(row)


__all__ = [
    "DEFAULT_CONCURRENCY",
    "BatchStageOutcome",
    "batch_of_execution",
    "ensure_batch",
    "left_at_ensure",
    "live_members",
    "run_batch_stage",
    "settle",
]
