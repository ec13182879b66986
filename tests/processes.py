"""Process helpers of the tests that kill a caller mid agent call (tests/unit/test_invoke.py,
tests/integration/test_killed_run_worker.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import psutil


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def gone_within(pids: list[int], seconds: float) -> list[int]:
    """The pids still alive after waiting up to ``seconds`` for all of them to die."""
    deadline = time.monotonic() + seconds
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.02)
    return [p for p in pids if alive(p)]


def wait_for(path: Path, proc: subprocess.Popen[bytes] | None = None, seconds: float = 60) -> str:
    deadline = time.monotonic() + seconds
    while not path.exists():
        assert proc is None or proc.poll() is None, f"the caller exited with {proc.returncode}"
        assert time.monotonic() < deadline, f"{path.name} never appeared"
        time.sleep(0.02)
    return path.read_text()


def kill_caller_mid_call(args: list[str], pids: Path, finished: Path, **popen: Any) -> None:
    """Start a caller, wait until its agent (a Spawner) runs, SIGKILL the caller; assert the agent
    child and its own child die within 1 s, nothing of the caller lives on within 3 s, and the
    agent never finishes its work."""
    caller = subprocess.Popen(args, **popen)
    try:
        child, grandchild = map(int, wait_for(pids, caller).split())
        assert child != caller.pid and alive(child) and alive(grandchild)
        assert psutil.Process(child).ppid() != caller.pid, "the agent child was forked from the caller"
        descendants = [p.pid for p in psutil.Process(caller.pid).children(recursive=True)]
        assert child in descendants  # through the forkserver, which the caller started
        os.kill(caller.pid, signal.SIGKILL)
        caller.wait(10)
        assert gone_within([child, grandchild], 1.0) == [], "the agent outlived its killed caller"
        assert gone_within(descendants, 3.0) == [], "a process of the killed caller lives on"
        time.sleep(3.5)  # longer than the agent's own work
        assert not finished.exists()
    finally:
        if caller.poll() is None:
            caller.kill()
