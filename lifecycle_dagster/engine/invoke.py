"""Calling an agent so that a timeout or a cancel can stop it.

A Python thread cannot be killed, so an attempt with a timeout (or that must notice a cancel)
runs the agent in a forked child process: the parent waits on a pipe, polls ``should_stop`` every
``poll_s`` seconds and SIGKILLs the child on timeout or stop. Nothing the child did after that
point is ever read, so a late result cannot be applied. The child dies with the thread that
forked it (``PR_SET_PDEATHSIG``): a run worker killed with SIGKILL leaves no agent running. Without
a timeout the agent runs in this process (no fork cost).
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import time
from collections.abc import Callable
from typing import Any

from lifecycle_dagster.agents import Agent, AgentError, AgentTimeout, Task


class AgentCrashed(Exception):
    """The agent raised something other than AgentError, or its process died. Retryable."""


class AttemptStopped(Exception):
    """``should_stop`` said stop (the execution was cancelled) while the agent ran."""


#: prctl(2) option: the signal the kernel sends this process when the thread that forked it dies
_PR_SET_PDEATHSIG = 1


def _die_with_parent(parent: int) -> None:  # pragma: no cover - runs in the child
    """Have the kernel SIGKILL this child when the thread that forked it dies (Linux
    ``prctl(PR_SET_PDEATHSIG)``; elsewhere nothing), and exit now if the parent died before that
    was set: a child whose run worker was killed must not finish its work after the execution was
    rolled back."""
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:
        os._exit(1)


def _child(agent: Agent, task: Task, conn: Any, parent: int) -> None:  # pragma: no cover - runs in the child
    _die_with_parent(parent)
    try:
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
        os._exit(0)  # no atexit handlers, no finalizers: inherited connections stay untouched


def call_agent(
    agent: Agent,
    task: Task,
    *,
    timeout_s: float | None = None,
    should_stop: Callable[[], bool] | None = None,
    poll_s: float = 0.25,
) -> Any:
    """Run ``agent.run(task)``; return its result.

    Raises:
        AgentError: the agent's own error (``AgentTimeout`` when ``timeout_s`` seconds passed).
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

    ctx = multiprocessing.get_context("fork")
    receiver, sender = ctx.Pipe(duplex=False)
    child = ctx.Process(target=_child, args=(agent, task, sender, os.getpid()), daemon=True)
    child.start()
    sender.close()
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    try:
        while True:
            wait = poll_s if deadline is None else max(0.0, min(poll_s, deadline - time.monotonic()))
            if receiver.poll(wait):
                try:
                    kind, payload = receiver.recv()
                except EOFError:
                    child.join(5)
                    raise AgentCrashed(f"agent process exited with code {child.exitcode} and no result") from None
                break
            if deadline is not None and time.monotonic() >= deadline:
                raise AgentTimeout(f"no result within the stage timeout of {timeout_s:g} s")
            if should_stop is not None and should_stop():
                raise AttemptStopped("the execution is no longer in progress")
    finally:
        if child.is_alive():
            child.kill()
        child.join(5)
        receiver.close()
    if kind == "ok":
        return payload
    if kind == "agent_error":
        raise payload
    raise AgentCrashed(payload)
