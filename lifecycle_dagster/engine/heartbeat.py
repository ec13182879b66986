"""The heartbeat of a running execution: while a stage op works, a background thread records
``heartbeat_at`` every ``LIFECYCLE_DAGSTER_HEARTBEAT_S`` seconds (default 5) on its own connection.
The reconciler fails an in_progress execution whose heartbeat is older than its bound (a killed run
worker stops beating)."""

from __future__ import annotations

import threading
from types import TracebackType

import psycopg

from lifecycle_dagster.settings import Settings
from lifecycle_dagster.store.db import connect
from lifecycle_dagster.store.sqlfiles import query


def heartbeat_interval_s() -> float:
    """Seconds between heartbeats (``LIFECYCLE_DAGSTER_HEARTBEAT_S``, default 5)."""
    return Settings.from_env().heartbeat_s


class Heartbeat:
    """Context manager: beat for Dagster run ``run_id`` until exit. Database errors are ignored
    (a missed beat only makes the execution look older)."""

    def __init__(self, dsn: str, run_id: str, interval_s: float | None = None) -> None:
        self.dsn = dsn
        self.run_id = run_id
        self.interval_s = interval_s if interval_s is not None else heartbeat_interval_s()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=f"lifecycle-heartbeat-{run_id}", daemon=True)

    def _beat(self) -> None:
        conn = None
        try:
            while not self._stop.wait(self.interval_s):
                try:
                    if conn is None or conn.closed:
                        conn = connect(self.dsn)
                    conn.execute(query("heartbeat"), {"run_id": self.run_id})
                except psycopg.Error:
                    conn = None
        finally:
            if conn is not None:
                conn.close()

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
