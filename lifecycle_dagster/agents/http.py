"""The agent kind ``http``: a stage whose agent row has ``kind = 'http'`` POSTs its task to a URL.

Unlike the agents of :mod:`lifecycle_dagster.agents.base` (pure functions of a task: no database
or network), this kind is a network call: :class:`HttpAgent` sends the task as JSON and maps the
HTTP outcome onto the agent errors (retryable or not), and :func:`http_agent` builds one from its
``agents`` row. ``lifecycle_dagster.engine.stage`` calls it like any other agent, in a killable
child (:mod:`lifecycle_dagster.agents.invoke`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import httpx

from lifecycle_dagster.agents.base import (
    AgentBadRequest,
    AgentOverloaded,
    AgentRateLimited,
    AgentTimeout,
    RetryableAgentError,
    Task,
)
from lifecycle_dagster.store.db import Connection
from lifecycle_dagster.store.sqlfiles import query


class HttpAgent:
    """An agent of kind ``http``: POSTs the task as JSON to ``url``.

    Config (``agents.config``): ``url`` (required), ``timeout_s`` (default 30), ``auth_env``: the NAME
    of an environment variable holding a bearer token (the secret itself never sits in the
    database). The task id is sent as ``Idempotency-Key``; ``trace_parent`` (the W3C traceparent of
    the calling span, when traced) as ``traceparent``, so the agent's own spans join the
    execution's trace. Outcomes: 2xx with a JSON object is the
    output; connection errors, 5xx and 408 are retryable (overloaded), 429 is rate limiting; both
    honour ``Retry-After`` (seconds); other 4xx are not retryable (bad request); a 2xx whose body is
    not JSON, or is nested too deeply to decode, is a ``bad_output`` (retryable); one that is JSON but
    not a storable JSON object fails the engine's output check (``bad_output`` too).
    """

    def __init__(
        self, name: str, config: Mapping[str, Any], task_id: str | None = None, trace_parent: str | None = None
    ) -> None:
        url = config.get("url")
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise AgentBadRequest(f"http agent {name!r} has no valid config.url (got {url!r})")
        self.name = name
        self.url = url
        self.timeout_s = float(config.get("timeout_s") or 30.0)
        self.auth_env = config.get("auth_env")
        self.task_id = task_id
        self.trace_parent = trace_parent

    def run(self, task: Task) -> dict[str, Any]:
        """POST ``task`` to :attr:`url`; return the decoded JSON body of a 2xx answer.

        Raises:
            AgentTimeout: no answer within :attr:`timeout_s`. AgentRateLimited: 429.
            AgentOverloaded: unreachable, 408 or 5xx. AgentBadRequest: other 4xx, or ``auth_env``
            names an unset variable. RetryableAgentError (``bad_output``): a 2xx body that is not JSON.
        """
        headers = {"Content-Type": "application/json"}
        if self.task_id:
            headers["Idempotency-Key"] = self.task_id
        if self.trace_parent:
            headers["traceparent"] = self.trace_parent
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


def http_agent(conn: Connection, agent_id: str, task_id: str | None, trace_parent: str | None = None) -> HttpAgent:
    """The HttpAgent of the ``agents`` row ``agent_id`` (a UUID's text); ``task_id`` is sent as the
    ``Idempotency-Key``, ``trace_parent`` (a W3C traceparent, or None) as ``traceparent``.

    Raises:
        KeyError: no ``agents`` row has that id (it was deleted since the stage was routed to it).
        AgentBadRequest: the row's ``config.url`` is missing or not an http(s) URL.
    """
    row = conn.execute(query("agent_row"), {"agent_id": agent_id}).fetchone()
    if row is None:
        raise KeyError(f"http agent: no agents row has id {agent_id}")
    return HttpAgent(str(row["name"]), dict(row["config"] or {}), task_id, trace_parent)


__all__ = ["HttpAgent", "http_agent"]
