"""Pure, deterministic lifecycle agents and the registry that names them."""

from lifecycle_dagster.agents.base import (
    Agent,
    AgentBadRequest,
    AgentError,
    AgentOverloaded,
    AgentRateLimited,
    AgentRegistry,
    AgentTimeout,
    RetryableAgentError,
    Task,
)
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
    "AgentBadRequest",
    "AgentError",
    "AgentOverloaded",
    "AgentRateLimited",
    "AgentRegistry",
    "AgentTimeout",
    "AssessmentAgent",
    "DesignAgent",
    "IntegrityAgent",
    "OpportunityAgent",
    "RealizationAgent",
    "RetryableAgentError",
    "Task",
    "default_registry",
    "parse_profile",
]
