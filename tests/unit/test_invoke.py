"""An agent's child process cannot outlive the process that called it: SIGKILL the caller (a run
worker) mid-stage and the agent child dies with it, before it could write anything."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

SCRIPT = """
import sys, time
from pathlib import Path
from lifecycle_dagster.agents import Task
from lifecycle_dagster.engine.invoke import call_agent

class Slow:
    name = "slow"
    def run(self, task):
        import os
        Path(sys.argv[1]).write_text(str(os.getpid()))
        time.sleep(3)
        Path(sys.argv[2]).write_text("the agent finished")  # must never happen
        return {}

call_agent(Slow(), Task("e", "s", "c", 1, {}, {}), timeout_s=60)
"""


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_an_agent_child_dies_with_its_killed_caller(tmp_path: Path) -> None:
    started, finished = tmp_path / "child.pid", tmp_path / "finished"
    caller = subprocess.Popen([sys.executable, "-c", SCRIPT, str(started), str(finished)])
    try:
        deadline = time.monotonic() + 30
        while not started.exists() or not started.read_text():
            assert time.monotonic() < deadline, "the agent never started"
            time.sleep(0.05)
        child = int(started.read_text())
        assert child != caller.pid and _alive(child)
        os.kill(caller.pid, signal.SIGKILL)
        caller.wait(10)
        gone_by = time.monotonic() + 1.0
        while _alive(child) and time.monotonic() < gone_by:
            time.sleep(0.02)
        assert not _alive(child), "the agent child outlived its killed caller"
        time.sleep(3.5)  # longer than the agent's own work
        assert not finished.exists()
    finally:
        if caller.poll() is None:
            caller.kill()
