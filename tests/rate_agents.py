"""A rate-limited test agent, importable by `agent serve --registry rate_agents:registry`: each call
records its time (the database's clock) and who made it in the table ``rl_calls`` of
``DATABASE_URL`` (the test creates it), then returns at once."""

from __future__ import annotations

import os
from typing import Any

import psycopg

from lifecycle_dagster.agents import AgentRegistry, Task

AGENT = "RL Agent"


class Recording:
    """Appends (clock_timestamp(), ``who``, stage) to ``rl_calls`` per call."""

    name = AGENT

    def __init__(self, who: str) -> None:
        self.who = who

    def run(self, task: Task) -> dict[str, Any]:
        with psycopg.connect(os.environ["DATABASE_URL"], autocommit=True) as conn:
            conn.execute("INSERT INTO rl_calls (who, execution_id) VALUES (%s, %s)", (self.who, task.execution_id))
        return {"summary": f"called by {self.who}"}


def registry() -> AgentRegistry:
    """The agent as a worker process serves it (``who``: worker <pid>)."""
    return AgentRegistry([Recording(f"worker {os.getpid()}")])
