"""The agent contract: the Task an agent receives, the error it raises, the registry naming agents.

An agent is a pure, deterministic function of a :class:`Task` (no database, Dagster, network,
randomness or clock).  It returns a JSON object that contains ``"summary"``, a one-line human
string shorter than 120 characters, or raises :class:`AgentError` when its work fails.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol


class AgentError(Exception):
    """A failure of the agent's work (bad input, failed check), as opposed to a bug.

    ``code`` is a short snake_case error code (``"bad_input"``, ``"missing_upstream"``,
    ``"integrity_failed"``, ...); ``message`` is for people and equals ``str(error)``.
    ``retryable``: whether another attempt may succeed (False for this base class: bad input and
    failed checks fail the same way again). ``retry_after_s``: the agent's own hint, in seconds,
    of when to try again (honoured within the stage's ``max_delay_s``).

    Hierarchy::

        AgentError                 retryable=False  (bad_request-like: bad input, failed checks)
        ├── AgentBadRequest        retryable=False  code "bad_request"
        └── RetryableAgentError    retryable=True
            ├── AgentTimeout       code "timeout"
            ├── AgentOverloaded    code "overloaded"
            └── AgentRateLimited   code "rate_limited" (usually with retry_after_s)

    Any other exception raised by an agent is a crash (code ``agent_crashed``), retryable.
    """

    retryable: bool = False

    def __init__(self, code: str, message: str, *, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.retry_after_s = retry_after_s

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild_agent_error, (type(self), self.code, self.message, self.retry_after_s))


def _rebuild_agent_error(cls: type[AgentError], code: str, message: str, retry_after_s: float | None) -> AgentError:
    err = cls.__new__(cls)
    AgentError.__init__(err, code, message, retry_after_s=retry_after_s)
    return err


class AgentBadRequest(AgentError):
    """The request itself is wrong; retrying cannot help."""

    def __init__(self, message: str) -> None:
        super().__init__("bad_request", message)


class RetryableAgentError(AgentError):
    """A transient failure: another attempt may succeed."""

    retryable = True


class AgentTimeout(RetryableAgentError):
    """The attempt ran past its timeout."""

    def __init__(self, message: str) -> None:
        super().__init__("timeout", message)


class AgentOverloaded(RetryableAgentError):
    """The agent is overloaded (e.g. HTTP 503)."""

    def __init__(self, message: str, *, retry_after_s: float | None = None) -> None:
        super().__init__("overloaded", message, retry_after_s=retry_after_s)


class AgentRateLimited(RetryableAgentError):
    """The agent rate-limited the caller (e.g. HTTP 429)."""

    def __init__(self, message: str, *, retry_after_s: float | None = None) -> None:
        super().__init__("rate_limited", message, retry_after_s=retry_after_s)


@dataclass(frozen=True)
class Task:
    """One attempt (1-based) of one stage of one execution.

    ``context`` is the execution context (the customer profile).  ``upstream`` holds the outputs
    of ALL ancestor stages: ``{stage_id: {"capability": str, "output": {...}}}``.
    """

    execution_id: str
    stage_id: str
    capability: str
    attempt: int
    context: Mapping[str, Any]
    upstream: Mapping[str, Mapping[str, Any]]

    def output_of(self, capability: str) -> Mapping[str, Any]:
        """The output of the ancestor stage with ``capability`` (the first by stage id if several).

        Raises ``AgentError(code="missing_upstream")`` naming the capability and this stage.
        """
        for _, entry in sorted(self.upstream.items()):
            if entry.get("capability") == capability and isinstance(entry.get("output"), Mapping):
                output: Mapping[str, Any] = entry["output"]
                return output
        have = ", ".join(f"{sid} ({e.get('capability')})" for sid, e in sorted(self.upstream.items()))
        raise AgentError(
            "missing_upstream",
            f"stage {self.stage_id!r} needs the output of an upstream {capability!r} stage, "
            f"but its upstream stages are: {have or 'none'}",
        )

    @classmethod
    def from_input_data(
        cls,
        *,
        execution_id: str,
        stage_id: str,
        capability: str,
        attempt: int,
        input_data: Mapping[str, Any],
    ) -> Task:
        """Build a Task from a stage's stored ``{"context": {...}, "upstream": {...}}``.

        A missing or null ``upstream`` means no ancestors.  Malformed data raises
        ``AgentError(code="bad_input")`` naming the field path.
        """
        if isinstance(attempt, bool) or not isinstance(attempt, int) or attempt < 1:
            raise AgentError("bad_input", f"attempt must be an integer >= 1, got {attempt!r}")
        if not isinstance(input_data, Mapping) or not isinstance(input_data.get("context"), Mapping):
            raise AgentError("bad_input", "input_data.context must be an object")
        raw = {} if input_data.get("upstream") is None else input_data["upstream"]
        if not isinstance(raw, Mapping):
            raise AgentError("bad_input", "input_data.upstream must be an object")
        upstream: dict[str, Mapping[str, Any]] = {}
        for sid, entry in raw.items():
            path = f"input_data.upstream.{sid}"
            if not isinstance(entry, Mapping) or not isinstance(entry.get("capability"), str):
                raise AgentError("bad_input", f"{path}.capability must be a string")
            if not isinstance(entry.get("output"), Mapping):
                raise AgentError("bad_input", f"{path}.output must be an object")
            upstream[str(sid)] = {
                "capability": entry["capability"],
                "output": dict(entry["output"]),
            }
        return cls(execution_id, stage_id, capability, attempt, dict(input_data["context"]), upstream)


class Agent(Protocol):
    """Anything with a unique ``name`` and a deterministic ``run(task) -> JSON object``.

    Effects: an output may carry ``"artifacts": [{"kind": str, "key": str, "data": {...}}]``; the
    engine stores them (table ``lifecycle.artifacts``) in the transaction that completes the stage.
    An agent that can undo its work also has ``compensate(task: CompensationTask) -> JSON object``
    returning ``{"summary": str, "void": [{"kind": str, "key": str}, ...]}``: the artifacts to void.
    """

    name: str

    def run(self, task: Task) -> dict[str, Any]: ...


@dataclass(frozen=True)
class CompensationTask:
    """Undo one completed stage: its ``output`` (with its ``artifacts``), the execution
    ``context``, and the 1-based compensation ``attempt``."""

    execution_id: str
    stage_id: str
    capability: str
    attempt: int
    context: Mapping[str, Any]
    output: Mapping[str, Any]

    def artifacts(self) -> list[dict[str, str]]:
        """``[{"kind", "key"}]`` of every artifact the stage's output declared."""
        found = self.output.get("artifacts") or []
        return [{"kind": str(a["kind"]), "key": str(a["key"])} for a in found if isinstance(a, Mapping)]


def can_compensate(agent: object) -> bool:
    """Whether ``agent`` implements an undo (a callable ``compensate``)."""
    return callable(getattr(agent, "compensate", None))


def artifacts(kind: str, items: Iterable[Mapping[str, Any]], key: str = "id") -> list[dict[str, Any]]:
    """One artifact per item: ``{"kind": kind, "key": item[key], "data": item}``."""
    return [{"kind": kind, "key": str(item[key]), "data": dict(item)} for item in items]


class AgentRegistry:
    """The agents available in this code location, by name."""

    def __init__(self, agents: Iterable[Agent] = ()) -> None:
        self._agents: dict[str, Agent] = {}
        for agent in agents:
            self.register(agent)

    def register(self, agent: Agent) -> None:
        if agent.name in self._agents:
            raise ValueError(f"agent {agent.name!r} is already registered")
        self._agents[agent.name] = agent

    def get(self, name: str) -> Agent:
        try:
            return self._agents[name]
        except KeyError:
            registered = ", ".join(self.names()) or "(none)"
            raise KeyError(
                f"agent {name!r} is not registered in this code location; registered: {registered}"
            ) from None

    def names(self) -> tuple[str, ...]:
        return tuple(sorted(self._agents))
