"""Pure, deterministic lifecycle agents and the registry that names them."""

from lifecycle_dagster.agents.base import Agent, AgentError, AgentRegistry, Task
from lifecycle_dagster.agents.builtin import (
    BUILTIN_CAPABILITIES,
    AssessmentAgent,
    DesignAgent,
    IntegrityAgent,
    OpportunityAgent,
    RealizationAgent,
    default_registry,
    parse_profile,
)

__all__ = [
    "BUILTIN_CAPABILITIES",
    "Agent",
    "AgentError",
    "AgentRegistry",
    "AssessmentAgent",
    "DesignAgent",
    "IntegrityAgent",
    "OpportunityAgent",
    "RealizationAgent",
    "Task",
    "default_registry",
    "parse_profile",
]
