"""Dagster resources of the code location.

``lifecycle_db``       :class:`LifecycleDatabase` — where the orchestration schema lives.
``lifecycle_request``  :class:`ExecutionRequest` — per-run input (context, execution id), set in
                       the run config under ``resources.lifecycle_request.config``.
``lifecycle_agents``   the :class:`~lifecycle_dagster.agents.AgentRegistry` stage ops call: the
                       built-in agents, or the registry ``LIFECYCLE_DAGSTER_AGENTS`` names
                       (``MODULE:FUNCTION``, as ``agent serve --registry`` takes it).
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import dagster as dg
import pydantic

from lifecycle_dagster.agents import AgentRegistry
from lifecycle_dagster.agents.loading import load_registry
from lifecycle_dagster.settings import Settings
from lifecycle_dagster.store.db import resolve_dsn


class LifecycleDatabase(dg.ConfigurableResource):  # type: ignore[type-arg]
    """The orchestration database.

    ``dsn``: libpq URI; empty (the default) means ``DATABASE_URL``, or the embedded server when
    that is unset (:func:`lifecycle_dagster.store.db.resolve_dsn`).
    """

    dsn: str = ""

    def resolved_dsn(self) -> str:
        """The URI to connect to."""
        return self.dsn or resolve_dsn()


class ExecutionRequest(dg.ConfigurableResource):  # type: ignore[type-arg]
    """What one run executes.

    ``context``: the execution context (a JSON object, e.g. a customer profile) for a run that
    creates its execution; ``context_file``: a JSON file to read it from instead (path relative to
    the working directory); ``execution_id``: an existing ``workflow_executions`` row to adopt
    (the ``lifecycle/execution_id`` run tag takes precedence). When an execution is adopted, the
    row's own context is used.
    """

    context: dict[str, Any] = {}  # noqa: RUF012  (pydantic copies field defaults)
    context_file: str = ""
    execution_id: str = ""

    @pydantic.field_validator("execution_id")
    @classmethod
    def _execution_id_is_a_uuid(cls, value: str) -> str:
        if value:
            try:
                uuid.UUID(value)
            except ValueError:
                raise ValueError(f"execution_id must be a UUID, got {value!r}") from None
        return value

    def resolved_context(self) -> dict[str, Any]:
        """``context`` merged over the content of ``context_file``.

        Raises:
            dagster.Failure: the file is missing, not JSON, or not a JSON object.
        """
        base: dict[str, Any] = {}
        if self.context_file:
            path = Path(self.context_file)
            try:
                loaded = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                raise dg.Failure(f"context_file {str(path)!r} could not be read as JSON: {exc}") from exc
            if not isinstance(loaded, dict):
                raise dg.Failure(f"context_file {str(path)!r} must hold a JSON object")
            base = loaded
        return {**base, **self.context}


#: names the registry of the code location's python agents: ``MODULE:FUNCTION`` (unset: the built-in five)
AGENTS_ENV = "LIFECYCLE_DAGSTER_AGENTS"


def configured_registry() -> AgentRegistry:
    """The registry ``LIFECYCLE_DAGSTER_AGENTS`` names (see
    :func:`lifecycle_dagster.agents.loading.load_registry`), else the five built-in agents.

    Raises:
        ValueError: the module, the function or what it returned is not usable (naming the variable).
    """
    ref = Settings.from_env().agents
    try:
        return load_registry(ref)
    except ValueError as exc:
        raise ValueError(f"{AGENTS_ENV}: {exc}") from exc


def agents_resource(registry: AgentRegistry | None = None) -> dg.ResourceDefinition:
    """A resource that hands stage ops ``registry`` (default: :func:`configured_registry`)."""
    return dg.ResourceDefinition.hardcoded_resource(
        registry if registry is not None else configured_registry(), "the agent registry"
    )


def default_resources() -> dict[str, Any]:
    """The resources every generated job is bound to."""
    return {
        "lifecycle_db": LifecycleDatabase(),
        "lifecycle_request": ExecutionRequest.configure_at_launch(),
        "lifecycle_agents": agents_resource(),
    }
