"""Calling an agent so that a timeout or a cancel can stop it.

A Python thread cannot be killed, so an attempt with a timeout (or that must notice a cancel)
runs the agent in a child process: the parent waits on a pipe, polls ``should_stop`` every
``poll_s`` seconds and SIGKILLs the child (and its process group) on timeout or stop. Nothing the
child sent after that point is ever read, so a late result cannot be applied. Without a timeout
the agent runs in this process (no child, no cost).

Start method: ``forkserver``, never ``fork``. The caller is a Dagster run worker, a process with
threads and open database connections; ``fork()`` from it copies locks held by other threads and
the sockets of its connections into the child. The forkserver is a separate single-threaded
server, started (fork+exec, like a subprocess) at the first call in each calling process, with
``FORKSERVER_PRELOAD`` imported once: this module (so ``lifecycle_dagster.agents``),
``lifecycle_dagster.agents.http`` (HTTP agents) and the caller's ``__main__`` script if it has one
(``python -m dagster ...`` has none to import). Each agent child is forked from that server.
Measured on the 2-core test machine, a no-op agent called 20 times with a timeout (median per
call): forkserver 9 ms lightly loaded, 20-35 ms with the machine saturated (load 6), after a first
call of 0.3-1 s that starts the server (not counted in the stage's timeout); ``spawn`` 90-230 ms
and a subprocess 100-160 ms (a new interpreter per call); ``fork`` 3-10 ms, up to 30 ms from a
process with Dagster imported. As with every non-fork start method of multiprocessing, a caller's
``__main__`` script must guard its top level with ``if __name__ == "__main__":``.

The child sees what the caller sees: its ``sys.path`` and working directory (multiprocessing
sends them) and its environment at the time of the call (sent here: the forkserver's own
environment is the one it started with).

The child cannot outlive its caller. The kernel's parent-death signal (``PR_SET_PDEATHSIG``)
follows the thread that forked the child, which is the forkserver, not the caller (and the
forkserver outlives the caller while any child lives); so the caller also passes a lifeline, the
read end of a pipe whose write end only the caller holds (created per call and never sent: the
forkserver and the child get only the read end, tests/unit/test_invoke.py checks it in /proc). A
daemon thread in the child blocks reading it; at end of file (the caller died, or is done) it
SIGKILLs the child's own process group (the child and anything the agent started) at once. The
parent-death signal stays: it fires if the forkserver itself dies. The caller SIGKILLs the group
too when it gives up, and after an answer.

Pickling: the agent and its task reach the child pickled. An agent called with a timeout must be
an instance of a class defined at module level in a module the child can import: not a local
class, a lambda or a closure, nor a class of a ``python -c`` script. Otherwise the call fails
with :class:`AgentNotPicklable` (code ``agent_not_picklable``, not retried: the same agent fails
the same way), naming the agent, its class and the reason; it never falls back to running the
agent in-process, which would lose the guarantee that a stopped attempt stops.
"""

from __future__ import annotations

import contextlib
import ctypes
import multiprocessing
import os
import pickle
import signal
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

from lifecycle_dagster.agents import Agent, AgentError, AgentTimeout, Task
from lifecycle_dagster.agents.errors import AgentCrashed, AttemptStopped

#: how agent children are started (see the module docstring): "forkserver" or "spawn"; never "fork",
#: which would also hand the child the write end of its own lifeline
START_METHOD = "forkserver"
#: modules the forkserver imports once, so that each child starts warm
FORKSERVER_PRELOAD = ("__main__", "lifecycle_dagster.agents.invoke", "lifecycle_dagster.agents.http")


class AgentNotPicklable(AgentError):
    """The agent (or its task) could not be sent to the child process: pickling failed here, or
    the child could not rebuild it (a local class, a lambda, a class of ``__main__``, a module the
    child cannot import). Code ``agent_not_picklable``; not retryable."""

    def __init__(self, message: str) -> None:
        super().__init__("agent_not_picklable", message)


#: prctl(2) option: the signal the kernel sends this process when the thread that forked it dies
_PR_SET_PDEATHSIG = 1
_preload_lock = threading.Lock()
_preload_set = False
_preload_more: list[str] = []


def preload(*modules: str) -> bool:
    """Have the forkserver import ``modules`` too (e.g. the module of a worker's agent class), so
    each agent child starts with them instead of importing them per call. Effective only before the
    first call with a timeout in this process (the server starts then); returns whether it was.
    A module that fails to import in the server is skipped there (the child imports it as before)."""
    with _preload_lock:
        if _preload_set:
            return False
        _preload_more.extend(m for m in modules if m not in _preload_more)
        return True


def _context() -> Any:
    """The multiprocessing context agent children start from; sets the forkserver's preload list
    once per process (before its server starts, which happens at the first call)."""
    global _preload_set
    ctx = multiprocessing.get_context(START_METHOD)
    if START_METHOD == "forkserver":
        with _preload_lock:
            if not _preload_set:
                ctx.set_forkserver_preload([*FORKSERVER_PRELOAD, *_preload_more])
                _preload_set = True
    return ctx


def _die_with_caller(lifeline: Connection) -> None:  # pragma: no cover - runs in the child
    """Make this child (and its process group) die when the caller dies: own process group, the
    kernel's parent-death signal (Linux; fires when the forkserver dies), and a daemon thread that
    SIGKILLs the group when the lifeline reaches end of file (every holder of its write end, i.e.
    the caller, closed it or died)."""
    with contextlib.suppress(OSError):
        os.setpgid(0, 0)
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)

    def watch() -> None:
        with contextlib.suppress(BaseException):
            lifeline.recv_bytes()  # the caller never writes: this returns only by EOFError
        if os.getpgid(0) == os.getpid():
            os.killpg(0, signal.SIGKILL)
        os._exit(1)

    threading.Thread(target=watch, name="lifeline", daemon=True).start()


def _child(
    blob: bytes, env: dict[str, str], conn: Connection, lifeline: Connection
) -> None:  # pragma: no cover - runs in the child
    _die_with_caller(lifeline)
    for key in set(os.environ) - set(env):  # the caller's environment now, not the forkserver's
        del os.environ[key]
    os.environ.update(env)
    try:
        try:
            agent, task = pickle.loads(blob)
        except BaseException as exc:
            conn.send(("not_picklable", f"the agent process could not rebuild it: {type(exc).__name__}: {exc}"))
            return
        try:
            out = agent.run(task)
            conn.send(("ok", out))
        except AgentError as exc:
            conn.send(("agent_error", exc))
        except BaseException as exc:
            conn.send(("crash", f"{type(exc).__name__}: {exc}"))
    except BaseException as exc:  # the result itself could not be sent (not picklable)
        with contextlib.suppress(BaseException):
            conn.send(("crash", f"result could not be returned: {type(exc).__name__}: {exc}"))
    finally:
        conn.close()
        os._exit(0)  # no atexit handlers, no finalizers


def _agent_label(agent: Agent) -> str:
    cls = type(agent)
    return f"agent {getattr(agent, 'name', '?')!r} ({cls.__module__}.{cls.__qualname__})"


def _not_picklable(agent: Agent, why: str) -> AgentNotPicklable:
    return AgentNotPicklable(
        f"{_agent_label(agent)} cannot be sent to its agent process ({why}); an agent called with a "
        "timeout must be an instance of a module-level class of an importable module"
    )


def _pickled(agent: Agent, task: Task) -> bytes:
    try:
        return pickle.dumps((agent, task), protocol=pickle.HIGHEST_PROTOCOL)
    except Exception as exc:
        raise _not_picklable(agent, f"{type(exc).__name__}: {exc}") from exc


def _kill(child: Any) -> None:
    """SIGKILL the child's process group (the child and whatever the agent started), then the
    child itself (if it had not made its group yet). The child is not reaped yet, so its pid, and
    so its group id, cannot have been reused."""
    if child.pid is not None:
        with contextlib.suppress(OSError):
            os.killpg(child.pid, signal.SIGKILL)
    if child.is_alive():
        child.kill()


def _wait_for_answer(
    receiver: Connection, timeout_s: float | None, should_stop: Callable[[], bool] | None, poll_s: float
) -> tuple[str, Any]:
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        wait = poll_s if deadline is None else max(0.0, min(poll_s, deadline - time.monotonic()))
        if receiver.poll(wait):
            try:
                answer: tuple[str, Any] = receiver.recv()
            except EOFError:  # the child died without answering (the caller reports it, after reaping)
                return ("died", None)
            return answer
        if deadline is not None and time.monotonic() >= deadline:
            raise AgentTimeout(f"no result within the stage timeout of {timeout_s:g} s")
        if should_stop is not None and should_stop():
            raise AttemptStopped("the execution is no longer in progress")


def call_agent(
    agent: Agent,
    task: Task,
    *,
    timeout_s: float | None = None,
    should_stop: Callable[[], bool] | None = None,
    poll_s: float = 0.25,
) -> Any:
    """Run ``agent.run(task)``; return its result. With ``timeout_s`` (seconds) or ``should_stop``
    the agent runs in a child process (see the module docstring), so it must be picklable.

    Raises:
        AgentError: the agent's own error (``AgentTimeout`` when ``timeout_s`` seconds passed;
            ``AgentNotPicklable`` when the agent cannot reach its child process).
        AgentCrashed: any other exception, or the child process died without an answer.
        AttemptStopped: ``should_stop()`` returned True while the agent ran.
    """
    if timeout_s is None and should_stop is None:
        try:
            return agent.run(task)
        except AgentError:
            raise
        except Exception as exc:
            raise AgentCrashed(f"{type(exc).__name__}: {exc}") from exc

    blob = _pickled(agent, task)
    ctx = _context()
    receiver, sender = ctx.Pipe(duplex=False)
    lifeline, keep = ctx.Pipe(duplex=False)  # ``keep``, the write end, never leaves this process
    child = ctx.Process(
        target=_child, args=(blob, dict(os.environ), sender, lifeline), daemon=True, name="lifecycle-agent"
    )
    try:
        child.start()
    except BaseException:
        receiver.close()
        keep.close()
        raise
    finally:
        sender.close()
        lifeline.close()
    try:
        kind, payload = _wait_for_answer(receiver, timeout_s, should_stop, poll_s)
    finally:
        _kill(child)  # before anything reaps it (see _kill)
        child.join(5)
        receiver.close()
        keep.close()
    if kind == "died":
        raise AgentCrashed(f"agent process exited with code {child.exitcode} and no result")
    if kind == "ok":
        return payload
    if kind == "agent_error":
        raise payload
    if kind == "not_picklable":
        raise _not_picklable(agent, payload)
    raise AgentCrashed(payload)
