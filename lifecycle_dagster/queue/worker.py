"""An external worker for a ``queue`` agent: ``lifecycle-dagster agent serve --agent NAME``.

It claims tasks of the agent's capabilities (``lifecycle.task_claim``: one statement, ``FOR UPDATE
SKIP LOCKED``, a lease and a fencing token), runs the agent of that name from the registry,
extends the lease while it works (every ``lease_s / 3`` seconds) and completes or fails the task
with its token, so a result from a worker that lost its lease is refused. It wakes on
``LISTEN lifecycle_task`` (ids only) with a polling fallback every ``poll_s`` seconds; when the
listening connection dies it reconnects with capped exponential backoff and keeps polling
meanwhile (``listen=False``: polling alone). When a claim fills every free slot (a backlog, whose
inserts were notified long ago), it claims again as soon as one of its tasks finishes instead of
waiting for a notification. Each loop also reaps expired leases (``lifecycle.task_reap``).
Connections: a pool of at most ``concurrency`` (claims, heartbeats and results share it) plus the
listening one. On stop
(SIGTERM) it claims nothing more, lets running
tasks finish for ``grace_s`` seconds, then hands back the ones still running
(``lifecycle.task_release``).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from typing import Any

import psycopg
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb
from psycopg_pool import ConnectionPool

from lifecycle_dagster.agents import AgentError, AgentRegistry, Task
from lifecycle_dagster.core.payload import check_output, safe_text
from lifecycle_dagster.engine.invoke import AgentCrashed
from lifecycle_dagster.engine.stage import classify, is_refusal
from lifecycle_dagster.store.sqlfiles import query

log = logging.getLogger(__name__)


class Worker:
    """Serve one agent (see the module docstring). ``run(stop)`` returns when ``stop`` is set."""

    def __init__(
        self,
        dsn: str,
        agent_name: str,
        registry: AgentRegistry,
        *,
        concurrency: int = 1,
        lease_s: float = 30.0,
        poll_s: float = 1.0,
        grace_s: float = 30.0,
        worker_id: str | None = None,
        listen: bool = True,
    ) -> None:
        if concurrency < 1:
            raise ValueError("concurrency must be >= 1")
        self.dsn = dsn
        self.agent_name = agent_name
        self.agent = registry.get(agent_name)
        self.concurrency = concurrency
        self.lease_s = lease_s
        self.poll_s = poll_s
        self.grace_s = grace_s
        self.worker_id = worker_id or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        #: False: polling alone (every poll_s seconds), no LISTEN
        self.listen = listen
        self._running: dict[str, tuple[int, threading.Thread]] = {}
        self._lock = threading.Lock()
        self._slot_freed = threading.Event()
        self.completed = 0

    @property
    def application_name(self) -> str:
        """``lifecycle-worker <worker_id>``: the sessions' name in ``pg_stat_activity``."""
        return f"lifecycle-worker {self.worker_id}"[:63]

    # -- the loop ----------------------------------------------------------------------------
    def run(self, stop: threading.Event) -> None:
        """Claim and run tasks until ``stop`` is set; then shut down gracefully."""
        pool = ConnectionPool(
            self.dsn,
            min_size=1,
            max_size=self.concurrency,
            # pg_stat_activity names the worker of each session (Postgres keeps 63 bytes)
            kwargs={"autocommit": True, "row_factory": dict_row, "application_name": self.application_name},
            open=True,
        )
        self._pool = pool
        listener: psycopg.Connection[Any] | None = None
        backoff = 0.1
        try:
            while not stop.is_set():
                if listener is None and self.listen:
                    try:
                        listener = psycopg.connect(self.dsn, autocommit=True, application_name=self.application_name)
                        listener.execute("LISTEN lifecycle_task")
                        backoff = 0.1
                    except psycopg.Error as exc:
                        log.warning("listening connection failed (%s); retrying in %.1f s", exc, backoff)
                        listener = None
                        stop.wait(backoff)
                        backoff = min(backoff * 2, 5.0)
                self._slot_freed.clear()
                try:
                    with pool.connection() as conn:
                        conn.execute(query("task_reap"))
                        free, claimed = self._claim(conn)
                except psycopg.Error as exc:
                    log.warning("claim failed: %s", exc)
                    stop.wait(min(self.poll_s, 1.0))
                    continue
                if claimed >= free:  # every slot busy, and maybe more waiting: claim when one frees
                    self._slot_freed.wait(self.poll_s)
                    continue
                if listener is None:
                    stop.wait(self.poll_s)
                    continue
                try:
                    for _ in listener.notifies(timeout=self.poll_s, stop_after=1):
                        pass
                except psycopg.Error as exc:
                    log.warning("listening connection lost (%s): polling until it is back", exc)
                    try:
                        listener.close()
                    finally:
                        listener = None
        finally:
            self._shutdown(pool)
            if listener is not None:
                listener.close()
            pool.close()

    def _claim(self, conn: psycopg.Connection[Any]) -> tuple[int, int]:
        """Claim up to the number of free slots; return (free slots, tasks claimed)."""
        with self._lock:
            free = self.concurrency - len(self._running)
        if free <= 0:
            return 0, 0
        rows = conn.execute(
            query("task_claim"),
            {"worker": self.worker_id, "agent": self.agent_name, "limit": free, "lease_s": self.lease_s},
        ).fetchall()
        for row in rows:
            t = threading.Thread(
                target=self._handle, args=(dict(row), self._pool), name=f"task-{row['task_id']}", daemon=True
            )
            with self._lock:
                self._running[str(row["task_id"])] = (int(row["lease_token"]), t)
            t.start()
        return free, len(rows)

    # -- one task ----------------------------------------------------------------------------
    def _handle(self, row: dict[str, Any], pool: ConnectionPool[Any]) -> None:
        task_id, token = str(row["task_id"]), int(row["lease_token"])
        done = threading.Event()
        beat = threading.Thread(target=self._heartbeat, args=(task_id, token, done, pool), daemon=True)
        beat.start()
        try:
            outcome = self._run_agent(row)
            with pool.connection() as conn:
                if outcome[0] == "ok":
                    status = conn.execute(
                        query("task_complete"), {"task_id": task_id, "token": token, "output": Jsonb(outcome[1])}
                    ).fetchone()
                    if status and not is_refusal(status["status"]):
                        self.completed += 1
                else:
                    _, code, message, retryable, retry_after = outcome
                    status = conn.execute(
                        query("task_fail"),
                        {
                            "task_id": task_id,
                            "token": token,
                            "error": message,
                            "error_code": code,
                            "retryable": retryable,
                            "retry_after_s": retry_after,
                        },
                    ).fetchone()
                log.info("task %s: %s", task_id, status["status"] if status else "?")
        except psycopg.Error as exc:
            log.warning("task %s: result not recorded (%s); its lease will expire", task_id, exc)
        finally:
            done.set()
            with self._lock:
                self._running.pop(task_id, None)
            self._slot_freed.set()

    def _run_agent(self, row: dict[str, Any]) -> tuple[Any, ...]:
        try:
            task = Task.from_input_data(
                execution_id=str(row["execution_id"]),
                stage_id=str(row["stage_id"]),
                capability=str(row["capability"]),
                attempt=int(row["attempt"]),
                input_data=row["input_data"] or {},
            )
            output = self.agent.run(task)
        except AgentError as exc:
            return ("error", exc.code, safe_text(exc), exc.retryable, exc.retry_after_s)
        except Exception as exc:
            err = classify(AgentCrashed(f"{type(exc).__name__}: {exc}"))
            return ("error", err.code, err.message, True, None)
        problem = check_output(output)
        if problem is not None:
            return ("error", "bad_output", safe_text(problem), True, None)
        return ("ok", output)

    def _heartbeat(self, task_id: str, token: int, done: threading.Event, pool: ConnectionPool[Any]) -> None:
        while not done.wait(self.lease_s / 3):
            try:
                with pool.connection(timeout=self.lease_s / 3) as conn:
                    row = conn.execute(
                        query("task_heartbeat"), {"task_id": task_id, "token": token, "lease_s": self.lease_s}
                    ).fetchone()
                if row is not None and not row["extended"]:
                    log.warning("task %s: lease lost (token %s is stale)", task_id, token)
                    return
            except Exception as exc:  # a missed beat only shortens the lease (pool timeout, database error)
                log.warning("task %s: heartbeat failed (%s)", task_id, exc)

    # -- shutdown ----------------------------------------------------------------------------
    def _shutdown(self, pool: ConnectionPool[Any]) -> None:
        deadline = time.monotonic() + self.grace_s
        while time.monotonic() < deadline:
            with self._lock:
                if not self._running:
                    return
            time.sleep(0.05)
        with self._lock:
            left = dict(self._running)
        for task_id, (token, _) in left.items():
            try:
                with pool.connection() as conn:
                    conn.execute(query("task_release"), {"task_id": task_id, "token": token})
                log.info("task %s handed back", task_id)
            except psycopg.Error as exc:
                log.warning("task %s: not handed back (%s); its lease will expire", task_id, exc)
