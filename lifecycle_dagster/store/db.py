"""The connector seam: how every part of the product reaches Postgres.

:func:`resolve_dsn` turns :class:`~lifecycle_dagster.settings.Settings` into a libpq URI (starting
the embedded server when ``DATABASE_URL`` is unset); :func:`connect` opens a psycopg connection
with dict rows; :func:`take_connection` / :func:`give_back` reuse a few idle connections per process
(a run's op and heartbeat connections serve the next run). Every state change is one call of a SQL
function or one statement.
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
from psycopg.pq import TransactionStatus
from psycopg.rows import DictRow, dict_row

from lifecycle_dagster.settings import Settings

Connection = psycopg.Connection[DictRow]


class DatabaseUrlMissing(RuntimeError):
    """``DATABASE_URL`` is unset in a process that may not start the embedded server (a worker, a
    code server or daemon under a deployment): the message names the variable, the kind of process
    and the fix."""


def process_kind(argv: list[str] | None = None) -> str:
    """What this process is, for messages: ``Celery worker``, ``Dagster step worker``, ``Dagster
    run worker``, ``Dagster code server``, ``dagster-daemon``, else ``non-interactive``
    (``argv``: default ``sys.argv``)."""
    words = set(sys.argv if argv is None else argv)
    words |= {os.path.basename(w) for w in words}
    for markers, kind in (
        ({"celery", "worker"}, "Celery worker"),
        ({"execute_step"}, "Dagster step worker"),
        ({"execute_run"}, "Dagster run worker"),
        ({"resume_run"}, "Dagster run worker"),
        ({"api", "grpc"}, "Dagster code server"),
        ({"code-server"}, "Dagster code server"),
        ({"dagster-daemon"}, "dagster-daemon"),
    ):
        if markers <= words:
            return kind
    return "non-interactive"


def _stdin_is_a_terminal() -> bool:
    try:
        return sys.stdin is not None and sys.stdin.isatty()
    except (ValueError, OSError):  # closed or detached
        return False


def resolve_dsn(settings: Settings | None = None, *, allow_embedded: bool = False) -> str:
    """The libpq URI of the orchestration database.

    ``DATABASE_URL`` when set. Otherwise the embedded server is started (or attached to) and
    ``DATABASE_URL`` is set in this process's environment so that child processes (Dagster run and
    step workers) reach the same server, but only where that is safe: ``allow_embedded`` (the
    ``lifecycle-dagster`` command, which owns the server's lifetime), ``LIFECYCLE_DAGSTER_EMBEDDED=1``,
    or a process whose stdin is a terminal (a person running Dagster's own commands);
    ``LIFECYCLE_DAGSTER_EMBEDDED=0`` forbids it everywhere. Anywhere else (a Celery, step or run
    worker, a code server under a deployment) a private, empty server would answer with missing
    functions, so this raises.

    Raises:
        DatabaseUrlMissing: no ``DATABASE_URL`` and no embedded fallback here (nothing is created).
        ValueError: ``LIFECYCLE_DAGSTER_EMBEDDED`` is neither 0 nor 1.
    """
    settings = settings or Settings.from_env()
    if settings.database_url:
        return settings.database_url
    opt_in = settings.embedded_allowed
    if opt_in is False or not (allow_embedded or opt_in or _stdin_is_a_terminal()):
        raise DatabaseUrlMissing(
            f"DATABASE_URL is not set in this {process_kind()} process (pid {os.getpid()}): it would start "
            "a private, empty embedded PostgreSQL server instead of reaching the orchestration database; "
            "set DATABASE_URL on every worker, code server and daemon, or start through "
            "`lifecycle-dagster dev` / `lifecycle-dagster run` (LIFECYCLE_DAGSTER_EMBEDDED=1 allows the "
            "embedded server here)"
        )
    from lifecycle_dagster.store.embedded import ensure_server

    dsn = ensure_server(settings.pgdata)
    os.environ["DATABASE_URL"] = dsn
    return dsn


def connect(dsn: str, **kwargs: Any) -> Connection:
    """Open a connection with dict rows (autocommit unless ``autocommit=False`` is passed)."""
    kwargs.setdefault("autocommit", True)
    return psycopg.connect(dsn, row_factory=dict_row, **kwargs)


#: the longest ``application_name`` Postgres keeps (NAMEDATALEN - 1 bytes); longer ones are cut
APPLICATION_NAME_MAX = 63
#: idle connections this process keeps per DSN for the next run: a run's op connection and its
#: heartbeat connection
IDLE_PER_DSN = 2
#: the idle connections of this process: ``{dsn: [(pid, conn), ...]}`` (pid: the process that made it)
_idle: dict[str, list[tuple[int, Connection]]] = {}
_idle_lock = threading.Lock()


def application_name(role: str, run_id: str | None = None) -> str:
    """``lifecycle-dagster <role> <first 8 characters of run_id>`` (as Dagster shows run ids), cut to
    :data:`APPLICATION_NAME_MAX` bytes: what ``pg_stat_activity.application_name`` shows for a
    connection of a run (``role``: ``op`` or ``heartbeat``)."""
    name = f"lifecycle-dagster {role} {run_id[:8]}" if run_id else f"lifecycle-dagster {role}"
    return name.encode("utf-8")[:APPLICATION_NAME_MAX].decode("utf-8", "ignore")


def take_connection(dsn: str, app_name: str | None = None) -> Connection:
    """An autocommit connection (dict rows) to ``dsn``: one this process kept idle (its
    ``application_name`` set to ``app_name``, one round trip), else a new one. Hand it back with
    :func:`give_back`. A connection made before a fork is never used (nor closed) by the child.

    Raises:
        psycopg.OperationalError: a new connection could not be made.
    """
    pid = os.getpid()
    while True:
        with _idle_lock:
            kept = _idle.get(dsn)
            entry = kept.pop() if kept else None
        if entry is None:
            return connect(dsn, **({"application_name": app_name} if app_name else {}))
        owner, conn = entry
        if owner != pid or conn.closed:
            continue  # another process's (dropped, never closed here) or dead
        try:
            if app_name:
                conn.execute("SELECT set_config('application_name', %s, false)", (app_name,))
            return conn
        except psycopg.Error:
            conn.close()


def reusable(conn: Connection) -> bool:
    """True when ``conn`` is open and idle (not in a transaction, no query running): it can serve
    another op or run."""
    return not conn.closed and conn.info.transaction_status == TransactionStatus.IDLE


def _renamed(conn: Connection, app_name: str) -> bool:
    """Set ``conn``'s ``application_name`` (so ``pg_stat_activity`` never shows a finished run's
    name on a kept connection); False when the connection failed."""
    try:
        conn.execute("SELECT set_config('application_name', %s, false)", (app_name,))
    except psycopg.Error:
        return False
    return True


def give_back(dsn: str, conn: Connection) -> None:
    """Keep ``conn`` idle for the next :func:`take_connection` of ``dsn`` when it is
    :func:`reusable` and fewer than :data:`IDLE_PER_DSN` are kept (renamed ``lifecycle-dagster
    idle``); otherwise close it."""
    if reusable(conn) and _renamed(conn, application_name("idle")):
        with _idle_lock:
            kept = _idle.setdefault(dsn, [])
            if len(kept) < IDLE_PER_DSN:
                kept.append((os.getpid(), conn))
                return
    if not conn.closed:
        conn.close()


def close_idle(dsn: str | None = None) -> int:
    """Close the connections this process keeps idle for ``dsn`` (every DSN when None), e.g.
    before the database is dropped or copied as a template; return how many were closed."""
    with _idle_lock:
        dsns = [dsn] if dsn is not None else list(_idle)
        taken = [entry for d in dsns for entry in _idle.pop(d, [])]
    pid = os.getpid()
    closed = 0
    for owner, conn in taken:
        if owner == pid and not conn.closed:
            conn.close()
            closed += 1
    return closed


@contextmanager
def reused_connection(dsn: str, app_name: str | None = None) -> Iterator[Connection]:
    """:func:`take_connection` for the block, :func:`give_back` after it; closed instead when the
    block raised a :class:`psycopg.OperationalError` (the connection may be broken)."""
    conn = take_connection(dsn, app_name)
    try:
        yield conn
    except psycopg.OperationalError:
        conn.close()
        raise
    finally:
        give_back(dsn, conn)
