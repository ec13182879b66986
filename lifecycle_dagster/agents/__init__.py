"""Pure, deterministic lifecycle agents and the registry that names them.

The ``http`` agent kind (a network call) is :mod:`lifecycle_dagster.agents.http`, imported on its own.
"""

from lifecycle_dagster.agents.base import (
    Agent,
    AgentBadRequest,
    AgentError,
    AgentOverloaded,
    AgentRateLimited,
    AgentRegistry,
    AgentTimeout,
    CompensationTask,
    RetryableAgentError,
    Task,
    artifacts,
    can_compensate,
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
    "CompensationTask",
    "DesignAgent",
    "IntegrityAgent",
    "OpportunityAgent",
    "RealizationAgent",
    "RetryableAgentError",
    "Task",
    "artifacts",
    "can_compensate",
    "default_registry",
    "parse_profile",
]
