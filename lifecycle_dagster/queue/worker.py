"""An external worker for a ``queue`` agent: ``lifecycle-dagster agent serve --agent NAME``.

It claims tasks of the agent's capabilities (``lifecycle.task_claim``: one statement, ``FOR UPDATE
SKIP LOCKED``, a lease and a fencing token), runs the agent of that name from the registry,
extends the lease while it works (every ``lease_s / 3`` seconds) and completes or fails the task
with its token, so a result from a worker that lost its lease is refused. It wakes on
``LISTEN lifecycle_task`` (ids only) with a polling fallback every ``poll_s`` seconds; when the
listening connection dies it reconnects with capped exponential backoff and keeps polling
meanwhile (``listen=False``: polling alone). When a claim fills every free slot (a backlog, whose
inserts were notified long ago), it claims again as soon as one of its tasks finishes instead of
waiting for a notification. An agent with a rate limit (docs/rate-limits.md) is claimed only as
many tasks as it has tokens for; after a claim that came back short the worker sleeps until the
next token is due (``lifecycle.rate_wait``, at most ``poll_s``), since a backlog notifies nothing
new. Each loop also reaps expired leases (``lifecycle.task_reap``).
Connections: a pool of at most ``concurrency`` (claims, heartbeats and results share it) plus the
listening one. On stop
(SIGTERM) it claims nothing more, lets running
tasks finish for ``grace_s`` seconds, then hands back the ones still running
(``lifecycle.task_release``) and stops their agents.

A task runs where it can be stopped: when it has a time limit, its agent runs in a killable child
process (:func:`lifecycle_dagster.agents.invoke.call_agent`; the agent must be picklable, a
module-level class). Its limit is the earlier of its stage's timeout (the task's ``deadline_at``,
by the database's clock at the claim) and ``max_task_s`` (``agent serve --max-task-s``, default
``LIFECYCLE_DAGSTER_MAX_TASK_S``). At the limit the child is killed and the task failed with code
``timeout`` (retryable: its stage op decides on a retry), and the slot takes other work; when the
lease is lost (reaped, or the task cancelled) or the shutdown hands the task back, the child is
killed and nothing is recorded. A task with no limit (no stage timeout, ``max_task_s`` None) runs
in the worker's own process, as fast as it gets, and cannot be stopped.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any

import psycopg
from opentelemetry.trace import SpanKind
from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool, PoolClosed

from lifecycle_dagster import tracing
from lifecycle_dagster.agents import AgentError, AgentRegistry, Task
from lifecycle_dagster.agents.errors import AgentCrashed, AttemptStopped, classify
from lifecycle_dagster.agents.invoke import call_agent, preload
from lifecycle_dagster.core.payload import check_output, safe_text
from lifecycle_dagster.queue.metrics import WorkerMetrics
from lifecycle_dagster.store.sqlfiles import query
from lifecycle_dagster.store.transitions import (
    ClaimedTask,
    TaskCompleteStatus,
    TaskFailStatus,
    task_claim,
    task_complete,
    task_fail,
    task_heartbeat,
    task_reap,
    task_release,
)

log = logging.getLogger(__name__)


def log_fields(task: ClaimedTask) -> dict[str, Any]:
    """The ``extra`` of a log line about ``task`` (the JSON log format writes them as fields:
    :mod:`lifecycle_dagster.core.logs`): execution_id, stage, attempt, task_id, capability."""
    return {
        "execution_id": task.execution_id,
        "stage": task.stage_id,
        "attempt": task.attempt,
        "task_id": task.task_id,
        "capability": task.capability,
    }


@dataclass(frozen=True)
class _Outcome:
    """What running the agent on a task gave: its output, or an error (code, message, whether a
    retry may help, the agent's Retry-After seconds)."""

    output: dict[str, Any] | None = None
    code: str = ""
    message: str = ""
    retryable: bool = True
    retry_after_s: float | None = None
    #: False: the agent was stopped because the task is no longer this worker's; record nothing
    record: bool = True


class _Listener:
    """The ``LISTEN lifecycle_task`` connection: (re)connected with capped exponential backoff
    (0.1 s doubling to 5 s) while it fails; while it is down the worker polls."""

    def __init__(self, dsn: str, application_name: str, *, enabled: bool) -> None:
        self.dsn = dsn
        self.application_name = application_name
        self.enabled = enabled
        self.conn: psycopg.Connection[Any] | None = None
        self.backoff = 0.1

    def connect(self, stop: threading.Event) -> None:
        """Listen when enabled and not listening; on failure wait the backoff (or until ``stop``)."""
        if self.conn is not None or not self.enabled:
            return
        try:
            self.conn = psycopg.connect(self.dsn, autocommit=True, application_name=self.application_name)
            self.conn.execute("LISTEN lifecycle_task")
            self.backoff = 0.1
        except psycopg.Error as exc:
            log.warning("listening connection failed (%s); retrying in %.1f s", exc, self.backoff)
            self.conn = None
            stop.wait(self.backoff)
            self.backoff = min(self.backoff * 2, 5.0)

    def wait(self, stop: threading.Event, timeout_s: float) -> None:
        """Wait for a notification (or ``timeout_s`` seconds; polling alone: until ``stop`` or the timeout)."""
        if self.conn is None:
            stop.wait(timeout_s)
            return
        try:
            for _ in self.conn.notifies(timeout=timeout_s, stop_after=1):
                pass
        except psycopg.Error as exc:
            log.warning("listening connection lost (%s): polling until it is back", exc)
            try:
                self.conn.close()
            finally:
                self.conn = None

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()


class Worker:
    """Serve one agent (see the module docstring). ``run(stop)`` returns when ``stop`` is set."""

    def __init__(
        self,
        dsn: str,
        agent_name: str,
        registry: AgentRegistry,
        *,
        concurrency: int = 1,
        lease_s: float = 30.0,
        poll_s: float = 1.0,
        grace_s: float = 30.0,
        worker_id: str | None = None,
        listen: bool = True,
        max_task_s: float | None = None,
    ) -> None:
        if concurrency < 1:
            raise ValueError("concurrency must be >= 1")
        if max_task_s is not None and not (max_task_s > 0):
            raise ValueError(f"max_task_s must be a number of seconds > 0 or None, got {max_task_s!r}")
        self.dsn = dsn
        self.agent_name = agent_name
        self.agent = registry.get(agent_name)
        preload(type(self.agent).__module__)  # agent children start with the agent's module imported
        self.concurrency = concurrency
        self.lease_s = lease_s
        self.poll_s = poll_s
        self.grace_s = grace_s
        self.worker_id = worker_id or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        #: False: polling alone (every poll_s seconds), no LISTEN
        self.listen = listen
        #: seconds a task's agent may run at most (None: only its stage's timeout bounds it)
        self.max_task_s = max_task_s
        self._running: dict[str, tuple[int, threading.Thread]] = {}
        #: per running task: set when its agent must stop (lease lost, or handed back at shutdown)
        self._stops: dict[str, threading.Event] = {}
        self._lock = threading.Lock()
        self._slot_freed = threading.Event()
        self.completed = 0
        #: tasks whose agent ran out of time (failed with code ``timeout``)
        self.timed_out = 0
        #: this worker's Prometheus figures (its own registry: ``agent serve --metrics-port``)
        self.metrics = WorkerMetrics(agent_name)

    @property
    def application_name(self) -> str:
        """``lifecycle-worker <worker_id>``: the sessions' name in ``pg_stat_activity``."""
        return f"lifecycle-worker {self.worker_id}"[:63]

    # -- the loop ----------------------------------------------------------------------------
    def run(self, stop: threading.Event) -> None:
        """Claim and run tasks until ``stop`` is set; then shut down gracefully."""
        pool: ConnectionPool[Any] = ConnectionPool(
            self.dsn,
            min_size=1,
            max_size=self.concurrency,
            # pg_stat_activity names the worker of each session (Postgres keeps 63 bytes)
            kwargs={"autocommit": True, "row_factory": dict_row, "application_name": self.application_name},
            open=True,
        )
        self._pool = pool
        listener = _Listener(self.dsn, self.application_name, enabled=self.listen)
        try:
            while not stop.is_set():
                listener.connect(stop)
                self._slot_freed.clear()
                try:
                    with pool.connection() as conn:
                        task_reap(conn)
                        free, claimed = self._claim(conn)
                        rate_wait_s = self._rate_wait_s(conn) if claimed < free else 0.0
                except psycopg.Error as exc:
                    log.warning("claim failed: %s", exc)
                    stop.wait(min(self.poll_s, 1.0))
                    continue
                if claimed >= free:  # every slot busy, and maybe more waiting: claim when one frees
                    self._slot_freed.wait(self.poll_s)
                    continue
                if rate_wait_s > 0:  # out of tokens (maybe with a backlog): claim again when one is due
                    stop.wait(min(rate_wait_s, self.poll_s))
                    continue
                listener.wait(stop, self.poll_s)
        finally:
            self._shutdown(pool)
            listener.close()
            pool.close()
            tracing.flush()

    def _claim(self, conn: psycopg.Connection[Any]) -> tuple[int, int]:
        """Claim up to the number of free slots; return (free slots, tasks claimed)."""
        with self._lock:
            free = self.concurrency - len(self._running)
        if free <= 0:
            return 0, 0
        tasks = task_claim(conn, worker=self.worker_id, agent=self.agent_name, limit=free, lease_s=self.lease_s)
        for task in tasks:
            t = threading.Thread(target=self._handle, args=(task, self._pool), name=f"task-{task.task_id}", daemon=True)
            with self._lock:
                self._running[task.task_id] = (task.lease_token, t)
                self._stops[task.task_id] = threading.Event()
            self.metrics.task_claimed(task.capability)
            t.start()
        return free, len(tasks)

    def _rate_wait_s(self, conn: psycopg.Connection[Any]) -> float:
        """Seconds until the agent's rate limits (its own, its capabilities') each hold a token
        (``lifecycle.rate_wait``; 0: now, or no limit): after a claim that came back short, a
        worker with tokens to wait for sleeps that long instead of waiting for a notification (a
        backlog notifies nothing new)."""
        row = conn.execute(query("rate_wait"), {"agent": self.agent_name}).fetchone()
        return 0.0 if row is None or row["wait_s"] is None else float(row["wait_s"])

    # -- one task ----------------------------------------------------------------------------
    def _handle(self, task: ClaimedTask, pool: ConnectionPool[Any]) -> None:
        """Run one claimed task under a heartbeat and record its outcome with its lease token."""
        done = threading.Event()
        claimed_at = time.monotonic()
        ended, took_s = "not_recorded", None
        beat = threading.Thread(
            target=self._heartbeat, args=(task.task_id, task.lease_token, done, pool, task.capability), daemon=True
        )
        beat.start()
        fields = log_fields(task)
        started = time.monotonic()
        try:
            called_at = time.monotonic()
            outcome = self._traced_run(task)
            if not outcome.record:
                ended = "stopped"
                msg = "task %s: agent stopped (%s); nothing recorded"
                log.warning(msg, task.task_id, outcome.message, extra=fields)
                return
            self.metrics.agent_ran(task.capability, time.monotonic() - called_at, outcome.output is not None)
            with pool.connection() as conn:
                status = self._record(conn, task, outcome)
            ended = "refused" if status.refused else "completed" if outcome.output is not None else "failed"
            took_s = None if status.refused else time.monotonic() - claimed_at
            took = {"duration_ms": round((time.monotonic() - started) * 1000.0, 1)}
            log.info("task %s: %s", task.task_id, status, extra={**fields, **took})
        except psycopg.Error as exc:
            log.warning("task %s: result not recorded (%s); its lease will expire", task.task_id, exc, extra=fields)
        finally:
            self.metrics.task_ended(task.capability, ended, took_s)
            done.set()
            with self._lock:
                self._running.pop(task.task_id, None)
                self._stops.pop(task.task_id, None)
            self._slot_freed.set()

    def _record(
        self, conn: psycopg.Connection[Any], task: ClaimedTask, outcome: _Outcome
    ) -> TaskCompleteStatus | TaskFailStatus:
        """Complete or fail the task (``lifecycle.task_complete`` / ``task_fail``); count a
        completion the database took."""
        if outcome.output is not None:
            status = task_complete(conn, task_id=task.task_id, token=task.lease_token, output=outcome.output)
            if not status.refused:
                self.completed += 1
            return status
        return task_fail(
            conn,
            task_id=task.task_id,
            token=task.lease_token,
            error=outcome.message,
            error_code=outcome.code,
            retryable=outcome.retryable,
            retry_after_s=outcome.retry_after_s,
        )

    def time_limit_s(self, claimed: ClaimedTask) -> float | None:
        """Seconds the agent may run on ``claimed``: the earlier of its stage's timeout (time left
        at the claim) and ``max_task_s``; None when neither bounds it."""
        limits = [x for x in (claimed.time_left_s, self.max_task_s) if x is not None]
        return min(limits) if limits else None

    def _traced_run(self, claimed: ClaimedTask) -> _Outcome:
        """:meth:`_run_agent` in a span ``worker <agent>`` continuing the task's trace (its
        ``trace_parent``: the execution's), with the outcome and error code."""
        attributes: dict[str, tracing.AttributeValue | None] = {
            tracing.ATTR_EXECUTION_ID: claimed.execution_id,
            tracing.ATTR_WORKFLOW: claimed.workflow,
            tracing.ATTR_VERSION: claimed.version,
            tracing.ATTR_STAGE: claimed.stage_id,
            tracing.ATTR_CAPABILITY: claimed.capability,
            tracing.ATTR_ATTEMPT: claimed.attempt,
            tracing.ATTR_AGENT: self.agent_name,
            tracing.ATTR_TASK_ID: claimed.task_id,
        }
        name = f"worker {self.agent_name}"
        kept = {k: v for k, v in attributes.items() if v is not None}
        with tracing.span(name, parent=claimed.trace_parent, attributes=kept, kind=SpanKind.CONSUMER) as span:
            outcome = self._run_agent(claimed)
            if outcome.output is not None:
                tracing.end_with(span, "completed")
            elif not outcome.record:  # the task is no longer this worker's: not an error of the agent
                tracing.end_with(span, "stopped")
            else:
                tracing.end_with(span, "failed", outcome.code, outcome.message)
        return outcome

    def _run_agent(self, claimed: ClaimedTask) -> _Outcome:
        """Run the agent on the task (in a killable child when it has a time limit); any error is an
        outcome (an unknown one: ``agent_crashed``; the limit passed: ``timeout``)."""
        limit = self.time_limit_s(claimed)
        with self._lock:
            stop = self._stops.get(claimed.task_id) or threading.Event()
        try:
            task = Task.from_input_data(
                execution_id=str(claimed.execution_id),
                stage_id=str(claimed.stage_id),
                capability=str(claimed.capability),
                attempt=claimed.attempt,
                input_data=claimed.input_data or {},
            )
            if limit is None:
                output = self.agent.run(task)
            else:
                output = call_agent(self.agent, task, timeout_s=max(limit, 0.0), should_stop=stop.is_set)
        except AttemptStopped:
            return _Outcome(None, "stopped", "the task is no longer this worker's", record=False)
        except AgentError as exc:
            if exc.code == "timeout":
                self.timed_out += 1
                log.warning(
                    "task %s: no result within %.3g s: stopped, failed as retryable",
                    claimed.task_id,
                    limit,
                    extra=log_fields(claimed),
                )
            return _Outcome(None, exc.code, safe_text(exc), exc.retryable, exc.retry_after_s)
        except Exception as exc:
            err = classify(exc if isinstance(exc, AgentCrashed) else AgentCrashed(f"{type(exc).__name__}: {exc}"))
            return _Outcome(None, err.code, err.message, True, None)
        problem = check_output(output)
        if problem is not None:
            return _Outcome(None, "bad_output", safe_text(problem), True, None)
        return _Outcome(output)

    def _heartbeat(
        self, task_id: str, token: int, done: threading.Event, pool: ConnectionPool[Any], capability: str | None = None
    ) -> None:
        """Extend the lease every ``lease_s / 3`` seconds until ``done``, or until the lease is lost."""
        while not done.wait(self.lease_s / 3):
            try:
                with pool.connection(timeout=self.lease_s / 3) as conn:
                    extended = task_heartbeat(conn, task_id=task_id, token=token, lease_s=self.lease_s)
                if not extended:
                    self.metrics.lease_lost(capability)
                    log.warning(
                        "task %s: lease lost (token %s is stale): stopping its agent",
                        task_id,
                        token,
                        extra={"task_id": task_id},
                    )
                    self._stop_agent(task_id)
                    return
            except PoolClosed:  # the worker stopped and handed the task back: nothing left to extend
                return
            except Exception as exc:  # a missed beat only shortens the lease (pool timeout, database error)
                log.warning("task %s: heartbeat failed (%s)", task_id, exc, extra={"task_id": task_id})

    def _stop_agent(self, task_id: str) -> None:
        """Ask the agent of ``task_id`` to stop (a child is killed; an in-process agent cannot be)."""
        with self._lock:
            stop = self._stops.get(task_id)
        if stop is not None:
            stop.set()

    # -- shutdown ----------------------------------------------------------------------------
    def _shutdown(self, pool: ConnectionPool[Any]) -> None:
        """Wait up to ``grace_s`` seconds for running tasks, then hand back the ones still running."""
        deadline = time.monotonic() + self.grace_s
        while time.monotonic() < deadline:
            with self._lock:
                if not self._running:
                    return
            time.sleep(0.05)
        with self._lock:
            left = dict(self._running)
        for task_id, (token, _) in left.items():
            try:
                with pool.connection() as conn:
                    task_release(conn, task_id=task_id, token=token)
                log.info("task %s handed back", task_id, extra={"task_id": task_id})
            except psycopg.Error as exc:
                log.warning(
                    "task %s: not handed back (%s); its lease will expire", task_id, exc, extra={"task_id": task_id}
                )
            self._stop_agent(task_id)
