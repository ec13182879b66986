"""The heartbeat of a running execution: while a run works, a background thread records
``heartbeat_at`` every ``LIFECYCLE_DAGSTER_HEARTBEAT_S`` seconds (default 5) on its own connection
(``application_name`` ``lifecycle-dagster heartbeat <run>``, opened at the first beat, kept for the
run, then handed back to the process's idle connections). The reconciler fails an in_progress
execution whose heartbeat is older than its bound (a killed run worker stops beating), and takes
over a compensating one (``lifecycle.run_heartbeat`` beats for a compensation run too).

A beat that fails (the database is down, the connection was lost) is logged as a warning naming
the run and its execution: the first failure at once, then at most one line every
:data:`LOG_EVERY_S` seconds while it keeps failing (with the number of failed beats), and one
line when a beat succeeds again. So a down database shows in the log long before the reconciler
fails the execution, without flooding it.
"""

from __future__ import annotations

import logging
import threading
import time
from types import TracebackType

from lifecycle_dagster.settings import Settings
from lifecycle_dagster.store import transitions
from lifecycle_dagster.store.db import Connection, application_name, give_back, take_connection

log = logging.getLogger(__name__)

#: while beats keep failing, at most one warning per this many seconds (per heartbeat)
LOG_EVERY_S = 60.0


def heartbeat_interval_s() -> float:
    """Seconds between heartbeats (``LIFECYCLE_DAGSTER_HEARTBEAT_S``, default 5)."""
    return Settings.from_env().heartbeat_s


class Heartbeat:
    """Beat for Dagster run ``run_id`` from :meth:`start` (or entering the ``with`` block) until
    :meth:`stop` (or leaving it), every ``interval_s`` seconds (default
    :func:`heartbeat_interval_s`). ``execution_id``: the execution the run works on, for log lines
    (None: not known yet; set the attribute when it is). A failed beat is logged (rate-limited, see
    the module docstring) and otherwise ignored (a missed beat only makes the execution look
    older); a lost connection is replaced at the next beat. ``failures``: failed beats in all."""

    def __init__(self, dsn: str, run_id: str, interval_s: float | None = None, execution_id: str | None = None) -> None:
        self.dsn = dsn
        self.run_id = run_id
        self.execution_id = execution_id
        self.interval_s = interval_s if interval_s is not None else heartbeat_interval_s()
        self.beats = 0
        self.failures = 0
        self._failing = 0  # consecutive failed beats
        self._logged_at: float | None = None  # monotonic time of the last warning
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=f"lifecycle-heartbeat-{run_id}", daemon=True)

    def _who(self) -> str:
        return f"run {self.run_id} (execution {self.execution_id or 'not known yet'})"

    def _failed(self, exc: BaseException) -> None:
        """Count a failed beat; log it when it is the first of a series or LOG_EVERY_S passed."""
        self.failures += 1
        self._failing += 1
        now = time.monotonic()
        if self._logged_at is None or now - self._logged_at >= LOG_EVERY_S:
            self._logged_at = now
            log.warning(
                "heartbeat of %s failed (%d failed beat(s) in a row): %s: %s; the reconciler fails an "
                "execution whose heartbeat is older than LIFECYCLE_DAGSTER_HEARTBEAT_TIMEOUT_S",
                self._who(),
                self._failing,
                type(exc).__name__,
                str(exc).strip(),
            )

    def _recovered(self) -> None:
        if self._failing:
            log.warning("heartbeat of %s recovered after %d failed beat(s)", self._who(), self._failing)
        self._failing = 0
        self._logged_at = None

    def _beat(self) -> None:
        conn: Connection | None = None
        try:
            while not self._stop.wait(self.interval_s):
                try:
                    if conn is None or conn.closed:
                        conn = take_connection(self.dsn, application_name("heartbeat", self.run_id))
                    transitions.run_heartbeat(conn, run_id=self.run_id)
                    self.beats += 1
                    self._recovered()
                except Exception as exc:  # a database error, or anything else: logged, never fatal
                    self._failed(exc)
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
