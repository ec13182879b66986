"""Agents for queue tests, importable by `agent serve --registry queue_agents:registry`."""

from __future__ import annotations

import os
import time
from typing import Any

from lifecycle_dagster.agents import AgentRegistry, Task, default_registry


class SlowDesign:
    """The built-in Design Agent, taking QUEUE_AGENT_SLEEP_S seconds first (hanging for good when the
    task's context says ``hang``)."""

    name = "Design Agent"

    def run(self, task: Task) -> dict[str, Any]:
        if task.context.get("hang"):  # a hung agent: only killing its process ends it
            while True:
                time.sleep(3600)
        time.sleep(float(os.environ.get("QUEUE_AGENT_SLEEP_S", "0")))
        out: dict[str, Any] = default_registry().get("Design Agent").run(task)
        out["agent_pid"] = os.getpid()  # the worker's, or its agent child's when the task has a time limit
        return out


def registry() -> AgentRegistry:
    base = default_registry()
    return AgentRegistry([*(base.get(n) for n in base.names() if n != "Design Agent"), SlowDesign()])
