"""Loading an agent registry named ``MODULE:FUNCTION``: the code location's python agents
(``LIFECYCLE_DAGSTER_AGENTS``) and an ``agent serve`` worker's (``--registry``) alike."""

from __future__ import annotations

import pkgutil

from lifecycle_dagster.agents.base import AgentRegistry
from lifecycle_dagster.agents.builtin import default_registry

#: what a reference without ``:FUNCTION`` names in its module
DEFAULT_FACTORY = "registry"


def load_registry(ref: str | None) -> AgentRegistry:
    """The registry that ``ref`` names: ``MODULE:FUNCTION`` (``pkgutil.resolve_name``), a function
    of no arguments returning an :class:`AgentRegistry`; a bare ``MODULE`` means
    ``MODULE:registry``; empty or ``None``: the five built-in agents.

    Raises:
        ValueError: the module or function cannot be found, or what it returned is not an
            AgentRegistry (the message names ``ref``).
    """
    ref = (ref or "").strip()
    if not ref:
        return default_registry()
    target = ref if ":" in ref else f"{ref}:{DEFAULT_FACTORY}"
    try:
        factory = pkgutil.resolve_name(target)
        registry = factory()
    except (ImportError, AttributeError, ValueError, TypeError) as exc:
        raise ValueError(f"agent registry {ref!r}: {type(exc).__name__}: {exc}") from exc
    if not isinstance(registry, AgentRegistry):
        raise ValueError(f"agent registry {ref!r} returned {type(registry).__name__}, not an AgentRegistry")
    return registry
