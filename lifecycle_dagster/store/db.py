"""The connector seam: how every part of the product reaches Postgres.

:func:`resolve_dsn` turns :class:`~lifecycle_dagster.settings.Settings` into a libpq URI (starting
the embedded server when ``DATABASE_URL`` is unset); :func:`connect` opens a psycopg connection
with dict rows. Every state change is one call of a SQL function or one statement.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
from psycopg.pq import TransactionStatus
from psycopg.rows import DictRow, dict_row

from lifecycle_dagster.settings import Settings

Connection = psycopg.Connection[DictRow]


def resolve_dsn(settings: Settings | None = None) -> str:
    """The libpq URI of the orchestration database.

    ``DATABASE_URL`` when set; otherwise the embedded server is started (or attached to) and
    ``DATABASE_URL`` is set in this process's environment so that child processes (Dagster run and
    step workers) reach the same server.
    """
    settings = settings or Settings.from_env()
    if settings.database_url:
        return settings.database_url
    from lifecycle_dagster.store.embedded import ensure_server

    dsn = ensure_server(settings.pgdata)
    os.environ["DATABASE_URL"] = dsn
    return dsn


def connect(dsn: str, **kwargs: Any) -> Connection:
    """Open a connection with dict rows (autocommit unless ``autocommit=False`` is passed)."""
    kwargs.setdefault("autocommit", True)
    return psycopg.connect(dsn, row_factory=dict_row, **kwargs)


#: one idle connection per DSN kept by this process for the next stage op: ``{dsn: (pid, conn)}``
_idle: dict[str, tuple[int, Connection]] = {}
_idle_lock = threading.Lock()


@contextmanager
def reused_connection(dsn: str) -> Iterator[Connection]:
    """An autocommit connection (dict rows) that the stage ops of a run share: the one this process
    kept idle for ``dsn`` when there is one, else a new one. It is kept again on a clean exit when
    it is idle; closed when the block raised, when it is in a transaction, or when another one is
    kept already (two ops at once in one process). A connection made before a fork is never used
    (or closed) by the child. Saves a connect (a few ms) per stage after the first of a run."""
    pid = os.getpid()
    with _idle_lock:
        kept = _idle.pop(dsn, None)
    conn = kept[1] if kept is not None and kept[0] == pid and not kept[1].closed else None
    if conn is None:
        conn = connect(dsn)
    ok = False
    try:
        yield conn
        ok = True
    finally:
        keep = ok and not conn.closed and conn.info.transaction_status == TransactionStatus.IDLE
        if keep:
            with _idle_lock:
                keep = dsn not in _idle
                if keep:
                    _idle[dsn] = (pid, conn)
        if not keep:
            conn.close()
