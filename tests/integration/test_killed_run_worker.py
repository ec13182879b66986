"""A Dagster run worker killed with SIGKILL mid-stage leaves no agent process and nothing written
after the kill (the agent child of ``agents/invoke.py`` dies with its run worker)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from helpers import TESTS, install, rows
from processes import kill_caller_mid_call

#: a Dagster run worker in miniature: runs execution ``wf`` in-process (in_process executor)
RUN_WORKER = """
import sys
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from dagster import DagsterInstance
from agents_for_tests import Spawner
from helpers import run
from lifecycle_dagster.agents import AgentRegistry

with DagsterInstance.ephemeral() as instance:
    run(sys.argv[4], instance, "wf", AgentRegistry([Spawner(Path(sys.argv[2]), Path(sys.argv[3]), 3)]))
"""


def test_a_killed_dagster_run_worker_leaves_no_agent(db: str, tmp_path: Path) -> None:
    dag = {"stages": [{"id": "a", "capability": "a", "timeout_s": 60}], "defaults": {"retry": {"max_attempts": 1}}}
    install(db, "wf", dag, {"a": "spawner"})
    pids, finished = tmp_path / "pids", tmp_path / "finished"
    args = [sys.executable, "-c", RUN_WORKER, str(TESTS), str(pids), str(finished), db]
    kill_caller_mid_call(args, pids, finished, env={**os.environ, "DAGSTER_HOME": str(tmp_path)})
    [log] = rows(db, "SELECT status FROM workflow_execution_logs")
    assert log["status"] == "in_progress"  # the stage never completed: nothing was written after the kill
