"""What an agent call can end in besides a result, and how each is recorded: the error classes
shared by the stage engine (``engine/``) and the queue worker (``queue/worker.py``).

:func:`classify` maps what a call raised to an :class:`AttemptError` (code, message, retryable,
error class): an :class:`~lifecycle_dagster.agents.AgentError` keeps its code and retryability;
anything else is ``agent_crashed`` (retryable).
"""

from __future__ import annotations

from dataclasses import dataclass

from lifecycle_dagster.agents.base import AgentError
from lifecycle_dagster.core.payload import safe_text


class AgentCrashed(Exception):
    """The agent raised something other than AgentError, or its process died. Retryable."""


class AttemptStopped(Exception):
    """``should_stop`` said stop (the execution was cancelled) while the agent ran."""


@dataclass(frozen=True)
class AttemptError:
    """A failed attempt, to record: ``cause`` is what was raised (the recorded error's cause)."""

    code: str
    message: str
    retryable: bool
    error_class: str
    retry_after_s: float | None = None
    cause: BaseException | None = None


def classify(exc: BaseException) -> AttemptError:
    """Map what an agent call raised to (code, message, retryable, error class)."""
    if isinstance(exc, AgentError):
        return AttemptError(exc.code, safe_text(exc), exc.retryable, type(exc).__name__, exc.retry_after_s)
    if isinstance(exc, AgentCrashed):
        return AttemptError("agent_crashed", safe_text(f"agent crashed: {exc}"), True, "AgentCrashed")
    return AttemptError("agent_crashed", safe_text(f"{type(exc).__name__}: {exc}"), True, type(exc).__name__)
