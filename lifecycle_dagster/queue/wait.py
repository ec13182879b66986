"""The task queue seen from Python: waiting for a queue agent's task, and the HTTP agent kind.

Every dispatch is a ``task_queue`` row (``sql/schema/05_task_protocol.sql`` holds the protocol:
claim, heartbeat, complete, fail, release, reap, abandon). A stage routed to a ``queue`` agent
leaves its task pending and waits here for an external worker to finish it: LISTEN on
``lifecycle_task_done`` (ids only) plus polling every ``poll_s`` seconds, so a lost notification
or a dead listening connection costs at most one polling interval.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping
from typing import Any

import httpx
import psycopg

from lifecycle_dagster.agents import (
    AgentBadRequest,
    AgentOverloaded,
    AgentRateLimited,
    AgentTimeout,
    RetryableAgentError,
    Task,
)
from lifecycle_dagster.engine.invoke import AttemptStopped
from lifecycle_dagster.settings import Settings
from lifecycle_dagster.store.db import Connection
from lifecycle_dagster.store.sqlfiles import query
from lifecycle_dagster.store.transitions import TaskState


def queue_wait_s() -> float:
    """Seconds a stage without a timeout waits for its queue task (default 3600)."""
    return Settings.from_env().queue_wait_s


def wait_for_task(
    conn: Connection,
    task_id: str,
    *,
    timeout_s: float,
    dsn: str | None = None,
    should_stop: Callable[[], bool] | None = None,
    poll_s: float = 0.5,
) -> TaskState:
    """Wait until task ``task_id`` is final (completed, failed or cancelled: ``TaskStatus.final``);
    return its state.

    Raises:
        AgentTimeout: ``timeout_s`` seconds passed. AttemptStopped: ``should_stop()`` said stop.
        UnknownStatusError: the task's status is not one :class:`TaskStatus` knows.
    """
    listener: psycopg.Connection[Any] | None = None
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            row = conn.execute(query("task_state"), {"task_id": task_id}).fetchone()
            assert row is not None, task_id
            state = TaskState.from_row(row)
            if state.status.final:
                return state
            if should_stop is not None and should_stop():
                raise AttemptStopped("the execution is no longer in progress")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AgentTimeout(f"no worker finished task {task_id} within {timeout_s:g} s")
            wait = min(poll_s, remaining)
            if dsn is not None and listener is None:
                try:
                    listener = psycopg.connect(dsn, autocommit=True)
                    listener.execute("LISTEN lifecycle_task_done")
                except psycopg.Error:
                    listener = None
            if listener is None:
                time.sleep(wait)
                continue
            try:
                for _ in listener.notifies(timeout=wait, stop_after=1):
                    pass
            except psycopg.Error:  # the listening connection died: poll, and listen again next time
                listener = None
    finally:
        if listener is not None:
            listener.close()


class HttpAgent:
    """An agent of kind ``http``: POSTs the task as JSON to ``url``.

    Config (``agents.config``): ``url`` (required), ``timeout_s`` (default 30), ``auth_env``: the NAME
    of an environment variable holding a bearer token (the secret itself never sits in the
    database). The task id is sent as ``Idempotency-Key``. Outcomes: 2xx with a JSON object is the
    output; connection errors, 5xx and 408 are retryable (overloaded), 429 is rate limiting; both
    honour ``Retry-After`` (seconds); other 4xx are not retryable (bad request); a 2xx whose body is
    not JSON, or is nested too deeply to decode, is a ``bad_output`` (retryable); one that is JSON but
    not a storable JSON object fails the engine's output check (``bad_output`` too).
    """

    def __init__(self, name: str, config: Mapping[str, Any], task_id: str | None = None) -> None:
        url = config.get("url")
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise AgentBadRequest(f"http agent {name!r} has no valid config.url (got {url!r})")
        self.name = name
        self.url = url
        self.timeout_s = float(config.get("timeout_s") or 30.0)
        self.auth_env = config.get("auth_env")
        self.task_id = task_id

    def run(self, task: Task) -> dict[str, Any]:
        headers = {"Content-Type": "application/json"}
        if self.task_id:
            headers["Idempotency-Key"] = self.task_id
        if self.auth_env:
            secret = os.environ.get(str(self.auth_env))
            if not secret:
                raise AgentBadRequest(f"http agent {self.name!r}: environment variable {self.auth_env} is not set")
            headers["Authorization"] = f"Bearer {secret}"
        payload = {
            "task_id": self.task_id,
            "execution_id": task.execution_id,
            "stage_id": task.stage_id,
            "capability": task.capability,
            "attempt": task.attempt,
            "context": dict(task.context),
            "upstream": {k: dict(v) for k, v in task.upstream.items()},
        }
        try:
            response = httpx.post(self.url, json=payload, headers=headers, timeout=self.timeout_s)
        except httpx.TimeoutException as exc:
            raise AgentTimeout(f"{self.url} did not answer within {self.timeout_s:g} s") from exc
        except httpx.HTTPError as exc:
            raise AgentOverloaded(f"{self.url} unreachable: {type(exc).__name__}: {exc}") from exc
        retry_after = _retry_after(response.headers.get("Retry-After"))
        status = response.status_code
        if status == 429:
            raise AgentRateLimited(f"{self.url} answered 429", retry_after_s=retry_after)
        if status == 408 or status >= 500:
            raise AgentOverloaded(f"{self.url} answered {status}: {response.text[:200]}", retry_after_s=retry_after)
        if status >= 400:
            raise AgentBadRequest(f"{self.url} answered {status}: {response.text[:200]}")
        try:
            body = response.json()
        except ValueError:  # not JSON, not UTF-8
            body = None
        except RecursionError:
            raise RetryableAgentError(
                "bad_output", f"{self.url} answered {status} with JSON nested too deeply to decode"
            ) from None
        if body is None:
            raise RetryableAgentError(
                "bad_output", f"{self.url} answered {status} with a body that is not JSON: {response.text[:200]!r}"
            )
        return body  # type: ignore[no-any-return]  # anything but an object fails the output check


def _retry_after(value: str | None) -> float | None:
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None  # an HTTP date: ignored (the policy's delay applies)


def http_agent(conn: Connection, agent_id: str, task_id: str | None) -> HttpAgent:
    """The HttpAgent of an ``agents`` row."""
    row = conn.execute(query("agent_row"), {"agent_id": agent_id}).fetchone()
    assert row is not None, agent_id
    return HttpAgent(str(row["name"]), dict(row["config"] or {}), task_id)


__all__ = ["HttpAgent", "http_agent", "queue_wait_s", "wait_for_task"]
