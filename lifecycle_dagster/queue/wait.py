"""The task queue seen from Python: a stage op waiting for a queue agent's task.

Every dispatch is a ``task_queue`` row (``sql/schema/05_task_protocol.sql`` holds the protocol:
claim, heartbeat, complete, fail, release, reap, abandon). A stage routed to a ``queue`` agent
leaves its task pending and waits here for an external worker to finish it: LISTEN on
``lifecycle_task_done`` (ids only) plus polling every ``poll_s`` seconds, so a lost notification
or a dead listening connection costs at most one polling interval.
"""

from __future__ import annotations

import contextlib
import time

import psycopg

from lifecycle_dagster.agents import AgentTimeout
from lifecycle_dagster.agents.errors import AttemptStopped
from lifecycle_dagster.settings import Settings
from lifecycle_dagster.store.db import Connection
from lifecycle_dagster.store.fetch import fetch_one
from lifecycle_dagster.store.transitions import TaskState


def queue_wait_s() -> float:
    """Seconds a stage without a timeout waits for its queue task (default 3600)."""
    return Settings.from_env().queue_wait_s


def wait_for_task(
    conn: Connection,
    task_id: str,
    *,
    timeout_s: float,
    listen: bool = True,
    stop_with_execution: bool = True,
    poll_s: float = 0.5,
) -> TaskState:
    """Wait until task ``task_id`` is final (completed, failed or cancelled: ``TaskStatus.final``);
    return its state. Each attempt of the task gets ``timeout_s`` seconds: when the reaper takes
    the task back from a dead worker and requeues it as the next attempt, the clock restarts.
    ``conn`` (autocommit) reads the task every ``poll_s`` seconds and, with
    ``listen``, LISTENs on ``lifecycle_task_done`` meanwhile so a completion wakes the wait at once:
    the run's own connection, so waiting opens no connection of its own (UNLISTEN at the end).

    Each read is one statement (the ``task_state`` query): the task and its execution's status as
    of one snapshot. A final task is returned whatever its execution's status (a completion that
    completed the execution too is a completion); with ``stop_with_execution``, a task not final
    whose execution is no longer in progress stops the wait.

    Raises:
        AgentTimeout: ``timeout_s`` seconds passed. AttemptStopped: the execution stopped.
        UnknownStatusError: the task's status is not one :class:`TaskStatus` knows.
    """
    listening = False
    deadline = time.monotonic() + timeout_s
    attempt: int | None = None
    try:
        while True:
            state = TaskState.from_row(fetch_one(conn, "task_state", {"task_id": task_id}))
            if state.status.final:
                return state
            if attempt is not None and state.attempt != attempt:
                deadline = time.monotonic() + timeout_s  # the reaper gave the task a new attempt: its own time
            attempt = state.attempt
            if stop_with_execution and state.execution_stopped:
                raise AttemptStopped(f"the execution is {state.execution_status}, no longer in progress")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AgentTimeout(f"no worker finished task {task_id} within {timeout_s:g} s")
            wait = min(poll_s, remaining)
            if listen and not listening:
                conn.execute("LISTEN lifecycle_task_done")
                listening = True
            if not listening:
                time.sleep(wait)
                continue
            for _ in conn.notifies(timeout=wait, stop_after=1):
                pass
    finally:
        if listening and not conn.closed:
            with contextlib.suppress(psycopg.Error):
                conn.execute("UNLISTEN lifecycle_task_done")


__all__ = ["queue_wait_s", "wait_for_task"]
