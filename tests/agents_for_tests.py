"""Agents for tests that call them with a timeout (or a cancel watch).

Such an agent runs in a child process started by the forkserver (lifecycle_dagster.agents.invoke),
which rebuilds it by unpickling: its class must be defined at module level of a module the child
can import. The child gets the caller's ``sys.path``, on which tests/ is (pytest puts it there), so
this module qualifies; it imports only the standard library and lifecycle_dagster.agents, so that a
child starts fast (a test module would drag pytest and Dagster into every child).
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path
from typing import Any

from lifecycle_dagster.agents import CompensationTask, Task, artifacts


def _write_whole(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so that a reader never sees half of it."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.rename(path)


class Ok:
    """Answers at once."""

    def __init__(self, name: str) -> None:
        self.name = name

    def run(self, task: Task) -> dict[str, Any]:
        return {"summary": f"{task.stage_id} done", "attempt": task.attempt}


class Sleeper:
    """Notes its process id (``pid-ATTEMPT`` next to ``marker``), sleeps ``seconds``, then writes
    ``marker``: a killed attempt never writes it."""

    name = "worker"

    def __init__(self, marker: Path, seconds: float) -> None:
        self.marker = marker
        self.seconds = seconds

    def run(self, task: Task) -> dict[str, Any]:
        (self.marker.parent / f"pid-{task.attempt}").write_text(str(os.getpid()))
        time.sleep(self.seconds)
        self.marker.write_text(f"attempt {task.attempt} finished")
        return {"summary": "late"}


class SlowMarker(Ok):
    """Sleeps 3 s, writes ``marker``, then answers."""

    def __init__(self, name: str, marker: Path) -> None:
        super().__init__(name)
        self.marker = marker

    def run(self, task: Task) -> dict[str, Any]:
        time.sleep(3)
        self.marker.write_text("finished")
        return super().run(task)


class Spawner:
    """Starts a ``sleep`` process of its own, writes "AGENT_PID GRANDCHILD_PID" to ``pids``, sleeps
    ``seconds``, then writes ``finished``: what an agent that shells out looks like."""

    name = "spawner"

    def __init__(self, pids: Path, finished: Path, seconds: float) -> None:
        self.pids = pids
        self.finished = finished
        self.seconds = seconds

    def run(self, task: Task) -> dict[str, Any]:
        grandchild = subprocess.Popen(["sleep", str(self.seconds + 30)])
        _write_whole(self.pids, f"{os.getpid()} {grandchild.pid}")
        time.sleep(self.seconds)
        self.finished.write_text("the agent finished")
        return {"summary": "finished"}


class Pid:
    """Answers with its process id, its parent's and its process group."""

    name = "pid"

    def run(self, task: Task) -> dict[str, Any]:
        return {"summary": "pid", "pid": os.getpid(), "ppid": os.getppid(), "pgid": os.getpgid(0)}


class Raises:
    """Raises ``error``."""

    name = "raises"

    def __init__(self, error: BaseException) -> None:
        self.error = error

    def run(self, task: Task) -> dict[str, Any]:
        raise self.error


class WaitsFor:
    """Writes its process id to ``pid_file``, waits (at most 30 s) until ``release`` exists, answers."""

    name = "waits"

    def __init__(self, pid_file: Path, release: Path) -> None:
        self.pid_file = pid_file
        self.release = release

    def run(self, task: Task) -> dict[str, Any]:
        _write_whole(self.pid_file, str(os.getpid()))
        deadline = time.monotonic() + 30
        while not self.release.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        return {"summary": "released"}


class Env:
    """Answers with the value of environment variable ``key`` in its process (None when unset)."""

    name = "env"

    def __init__(self, key: str) -> None:
        self.key = key

    def run(self, task: Task) -> dict[str, Any]:
        return {"summary": "env", "value": os.environ.get(self.key)}


class HangWhenAsked:
    """Answers at once, unless the task's context says ``hang``: then it notes its process id in
    ``<marker_dir>/hang-<pid>`` and never returns (a hung agent; only killing its process ends it)."""

    def __init__(self, name: str, marker_dir: Path) -> None:
        self.name = name
        self.marker_dir = marker_dir

    def run(self, task: Task) -> dict[str, Any]:
        if task.context.get("hang"):
            (self.marker_dir / f"hang-{os.getpid()}").write_text(task.stage_id)
            while True:
                time.sleep(3600)
        return {"summary": f"{task.stage_id} done", "attempt": task.attempt}


class UndoHangsFirst:
    """A stage agent whose output declares one artifact and whose undo hangs on its first attempt
    (noting its process id in ``<marker_dir>/undo-<pid>``; only killing the process ends it), then
    undoes on the next one."""

    def __init__(self, name: str, marker_dir: Path) -> None:
        self.name = name
        self.marker_dir = marker_dir

    def run(self, task: Task) -> dict[str, Any]:
        return {"summary": task.stage_id, "artifacts": artifacts("thing", [{"id": task.stage_id}])}

    def compensate(self, task: CompensationTask) -> dict[str, Any]:
        if task.attempt == 1:
            (self.marker_dir / f"undo-{os.getpid()}").write_text(task.stage_id)
            while True:
                time.sleep(3600)
        return {"summary": f"undid {task.stage_id}", "void": task.artifacts()}


class Distributed:
    """An agent for the Celery tests (tests/e2e/test_celery.py), whose capability says what it does:
    ``fan`` sleeps ``CELERY_TEST_FAN_S`` seconds (default 1.5: siblings overlap, so both workers
    get one); ``flaky_once`` fails its first attempt (retryable) and answers the next one;
    ``slow`` writes its process id to ``$CELERY_TEST_MARKERS/slow-<pid>``, sleeps
    ``CELERY_TEST_SLOW_S`` seconds (default 3), then answers. Each answer names its process id."""

    def __init__(self, name: str) -> None:
        self.name = name

    def run(self, task: Task) -> dict[str, Any]:
        if task.capability == "fan":
            time.sleep(float(os.environ.get("CELERY_TEST_FAN_S", "1.5")))
        elif task.capability == "flaky_once" and task.attempt == 1:
            from lifecycle_dagster.agents import AgentOverloaded

            raise AgentOverloaded(f"{self.name}: first attempt fails")
        elif task.capability == "slow":
            _write_whole(Path(os.environ["CELERY_TEST_MARKERS"]) / f"slow-{os.getpid()}", task.stage_id)
            time.sleep(float(os.environ.get("CELERY_TEST_SLOW_S", "3")))
        return {"summary": f"{task.stage_id} done (attempt {task.attempt})", "pid": os.getpid()}


#: the agent of each capability of the Celery tests
DISTRIBUTED_AGENTS = {"fan": "Distributed Fan", "flaky_once": "Distributed Flaky", "slow": "Distributed Slow"}


def distributed_registry() -> Any:
    """``LIFECYCLE_DAGSTER_AGENTS=agents_for_tests:distributed_registry``: the five built-in agents
    and a :class:`Distributed` per capability of :data:`DISTRIBUTED_AGENTS`."""
    from lifecycle_dagster.agents import AgentRegistry, default_registry

    base = default_registry()
    return AgentRegistry([*(base.get(n) for n in base.names()), *map(Distributed, DISTRIBUTED_AGENTS.values())])
