"""The heartbeat of a running execution: while a run works, a background thread records
``heartbeat_at`` every ``LIFECYCLE_DAGSTER_HEARTBEAT_S`` seconds (default 5) on its own connection
(``application_name`` ``lifecycle-dagster heartbeat <run>``, opened at the first beat, kept for the
run, then handed back to the process's idle connections). The reconciler fails an in_progress
execution whose heartbeat is older than its bound (a killed run worker stops beating)."""

from __future__ import annotations

import threading
from types import TracebackType

import psycopg

from lifecycle_dagster.settings import Settings
from lifecycle_dagster.store import transitions
from lifecycle_dagster.store.db import Connection, application_name, give_back, take_connection


def heartbeat_interval_s() -> float:
    """Seconds between heartbeats (``LIFECYCLE_DAGSTER_HEARTBEAT_S``, default 5)."""
    return Settings.from_env().heartbeat_s


class Heartbeat:
    """Beat for Dagster run ``run_id`` from :meth:`start` (or entering the ``with`` block) until
    :meth:`stop` (or leaving it), every ``interval_s`` seconds (default
    :func:`heartbeat_interval_s`). Database errors are ignored (a missed beat only makes the
    execution look older); a lost connection is replaced at the next beat."""

    def __init__(self, dsn: str, run_id: str, interval_s: float | None = None) -> None:
        self.dsn = dsn
        self.run_id = run_id
        self.interval_s = interval_s if interval_s is not None else heartbeat_interval_s()
        self.beats = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=f"lifecycle-heartbeat-{run_id}", daemon=True)

    def _beat(self) -> None:
        conn: Connection | None = None
        try:
            while not self._stop.wait(self.interval_s):
                try:
                    if conn is None or conn.closed:
                        conn = take_connection(self.dsn, application_name("heartbeat", self.run_id))
                    transitions.run_heartbeat(conn, run_id=self.run_id)
                    self.beats += 1
                except psycopg.Error:
                    if conn is not None:
                        conn.close()
                    conn = None
        finally:
            if conn is not None:
                give_back(self.dsn, conn)

    def start(self) -> None:
        """Start beating (in a daemon thread)."""
        self._thread.start()

    def stop(self) -> None:
        """Stop beating; waits up to 5 s for a beat under way."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    def __enter__(self) -> Heartbeat:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
