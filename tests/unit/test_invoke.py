"""Calling an agent in a child process (lifecycle_dagster.agents.invoke), with real processes.

The child is started by the forkserver (not forked from the threaded caller); it cannot outlive
the process that called it: SIGKILL the caller (a run worker) mid-stage and the agent child, and
whatever it started, die within a second, before they could write anything. Only the caller holds
the write end of the lifeline; an agent that cannot be pickled fails clearly, never in-process.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import pytest

from lifecycle_dagster.agents import AgentError, AgentRateLimited, AgentTimeout, Task
from lifecycle_dagster.agents.errors import AgentCrashed, AttemptStopped, classify
from lifecycle_dagster.agents.invoke import AgentNotPicklable, call_agent

from agents_for_tests import Env, Ok, Pid, Raises, Spawner, WaitsFor
from processes import gone_within, kill_caller_mid_call, wait_for

TESTS = Path(__file__).resolve().parents[1]
TASK = Task("e", "s", "c", 1, {}, {})

#: a run worker in miniature: calls a Spawner (3 s of work) with a timeout, in its own process
CALLER = """
import sys
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from agents_for_tests import Spawner
from lifecycle_dagster.agents import Task
from lifecycle_dagster.agents.invoke import call_agent

call_agent(Spawner(Path(sys.argv[2]), Path(sys.argv[3]), 3), Task("e", "s", "c", 1, {}, {}), timeout_s=60)
"""


def test_an_agent_child_dies_with_its_killed_caller(tmp_path: Path) -> None:
    pids, finished = tmp_path / "pids", tmp_path / "finished"
    kill_caller_mid_call([sys.executable, "-c", CALLER, str(TESTS), str(pids), str(finished)], pids, finished)


def test_the_agent_child_is_not_forked_from_the_caller() -> None:
    out = call_agent(Pid(), TASK, timeout_s=30)
    assert out["pid"] != os.getpid()
    assert out["ppid"] != os.getpid()  # its parent is the forkserver
    assert out["pgid"] == out["pid"]  # its own process group
    server = psutil.Process(out["ppid"])
    assert server.ppid() == os.getpid()
    assert "from multiprocessing.forkserver import main" in " ".join(server.cmdline())
    again = call_agent(Pid(), TASK, timeout_s=30)
    assert again["ppid"] == out["ppid"] and again["pid"] != out["pid"]  # one server, a child per call


def test_the_agent_sees_the_callers_environment_of_the_moment(monkeypatch: pytest.MonkeyPatch) -> None:
    """The forkserver keeps the environment it started with; the child takes the caller's, as a
    forked child would."""
    call_agent(Pid(), TASK, timeout_s=30)  # the forkserver runs by now
    monkeypatch.setenv("INVOKE_TEST_PROBE", "set after the forkserver started")
    assert call_agent(Env("INVOKE_TEST_PROBE"), TASK, timeout_s=30)["value"] == "set after the forkserver started"
    monkeypatch.delenv("INVOKE_TEST_PROBE")
    assert call_agent(Env("INVOKE_TEST_PROBE"), TASK, timeout_s=30)["value"] is None


def _pipe_ends(pid: int) -> dict[int, set[str]]:
    """Pipe inode -> the ends ("r", "w") process ``pid`` holds (Linux /proc)."""
    ends: dict[int, set[str]] = {}
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return ends
    for fd in fds:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            info = Path(f"/proc/{pid}/fdinfo/{fd}").read_text()
        except OSError:
            continue
        match = re.search(r"flags:\s*([0-7]+)", info)
        if target.startswith("pipe:[") and match:
            ends.setdefault(int(target[6:-1]), set()).add("w" if int(match.group(1), 8) & 3 == 1 else "r")
    return ends


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_only_the_caller_holds_the_write_end_of_the_lifeline(tmp_path: Path) -> None:
    pid_file, release = tmp_path / "pid", tmp_path / "release"
    outcome: list[Any] = []
    call = threading.Thread(target=lambda: outcome.append(call_agent(WaitsFor(pid_file, release), TASK, timeout_s=60)))
    call.start()
    try:
        child = int(wait_for(pid_file))
        mine = _pipe_ends(os.getpid())
        # lifelines: pipes the child reads and this process (the caller) writes. Ours, and the
        # sentinel multiprocessing keeps for forkserver children (the write end stays in the caller).
        lifelines = {i for i, e in _pipe_ends(child).items() if "r" in e and "w" in mine.get(i, set())}
        assert len(lifelines) >= 1
        holders: dict[int, dict[int, set[str]]] = {i: {} for i in lifelines}
        for pid in (int(p) for p in os.listdir("/proc") if p.isdigit()):
            for inode, ends in _pipe_ends(pid).items():
                if inode in holders:
                    holders[inode][pid] = ends
        server = psutil.Process(child).ppid()
        for inode, by_pid in holders.items():
            writers = sorted(p for p, ends in by_pid.items() if "w" in ends)
            assert writers == [os.getpid()], f"pipe {inode}: its write end is held by {writers}"
            assert server not in by_pid  # the forkserver holds neither end
    finally:
        release.write_text("go")
        call.join(30)
    assert outcome == [{"summary": "released"}]


def test_a_timeout_kills_the_agent_and_what_it_started(tmp_path: Path) -> None:
    pids, finished = tmp_path / "pids", tmp_path / "finished"
    t0 = time.monotonic()
    with pytest.raises(AgentTimeout, match="no result within the stage timeout of 1 s"):
        call_agent(Spawner(pids, finished, 30), TASK, timeout_s=1.0)
    assert time.monotonic() - t0 < 3
    child, grandchild = map(int, pids.read_text().split())
    assert gone_within([child, grandchild], 1.0) == []
    assert not finished.exists()


def test_a_stop_kills_the_agent(tmp_path: Path) -> None:
    pids, finished = tmp_path / "pids", tmp_path / "finished"
    stop_at = time.monotonic() + 0.5
    with pytest.raises(AttemptStopped):
        call_agent(Spawner(pids, finished, 30), TASK, should_stop=lambda: time.monotonic() > stop_at, poll_s=0.05)
    assert gone_within(list(map(int, wait_for(pids, seconds=1).split())), 1.0) == []


@pytest.mark.parametrize(
    ("agent", "check"),
    [
        (Ok("ok"), lambda out: out == {"summary": "s done", "attempt": 1}),
        (Raises(AgentRateLimited("slow down", retry_after_s=2.5)), None),
        (Raises(AgentError("integrity_failed", "totals differ")), None),
    ],
)
def test_results_and_agent_errors_cross_the_process_boundary(agent: Any, check: Callable[[Any], bool] | None) -> None:
    if check is not None:
        assert check(call_agent(agent, TASK, timeout_s=30))
        return
    with pytest.raises(type(agent.error)) as raised:
        call_agent(agent, TASK, timeout_s=30)
    err = raised.value
    assert (err.code, str(err), err.retry_after_s) == (agent.error.code, str(agent.error), agent.error.retry_after_s)


def test_a_crash_is_an_agent_crashed() -> None:
    with pytest.raises(AgentCrashed, match=r"^RuntimeError: boom$"):
        call_agent(Raises(RuntimeError("boom")), TASK, timeout_s=30)


class _HoldsALock:
    name = "locked"

    def __init__(self) -> None:
        self.lock = threading.Lock()

    def run(self, task: Task) -> dict[str, Any]:
        return {"summary": "never"}


def test_an_agent_that_cannot_be_pickled_fails_clearly_and_is_not_retried() -> None:
    class Local:
        name = "local"

        def run(self, task: Task) -> dict[str, Any]:
            return {"summary": "never"}

    cases: list[tuple[Any, str]] = [
        (Local(), r"agent 'local' \(test_invoke\..*Local\) cannot be sent to its agent process \(.*local object"),
        (_HoldsALock(), r"agent 'locked' \(test_invoke\._HoldsALock\) .*cannot pickle '_thread\.lock' object"),
    ]
    for agent, pattern in cases:
        t0 = time.monotonic()
        with pytest.raises(AgentNotPicklable, match=pattern) as raised:
            call_agent(agent, TASK, timeout_s=30)
        assert time.monotonic() - t0 < 1
        attempt = classify(raised.value)
        assert (attempt.code, attempt.retryable) == ("agent_not_picklable", False)
    assert Local().run(TASK) == {"summary": "never"}  # in-process, without a timeout, it would run
    assert call_agent(Local(), TASK) == {"summary": "never"}


#: a caller whose agent class lives in ``python -c``'s __main__: it pickles, but no child can rebuild it
MAIN_CLASS = """
from lifecycle_dagster.agents import Task
from lifecycle_dagster.agents.invoke import AgentNotPicklable, call_agent

class InMain:
    name = "in-main"
    def run(self, task):
        return {"summary": "never"}

try:
    call_agent(InMain(), Task("e", "s", "c", 1, {}, {}), timeout_s=30)
except AgentNotPicklable as exc:
    print(exc.code, exc.retryable, exc)
"""


def test_an_agent_the_child_cannot_rebuild_fails_clearly() -> None:
    out = subprocess.run([sys.executable, "-c", MAIN_CLASS], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("agent_not_picklable False agent 'in-main' (__main__.InMain) cannot be sent")
    assert "could not rebuild it: AttributeError: Can't get attribute 'InMain'" in out.stdout


