"""The connector seam: how every part of the product reaches Postgres.

:func:`resolve_dsn` turns :class:`~lifecycle_dagster.settings.Settings` into a libpq URI (starting
the embedded server when ``DATABASE_URL`` is unset); :func:`connect` opens a psycopg connection
with dict rows. Every state change is one call of a SQL function or one statement.
"""

from __future__ import annotations

import os
from typing import Any

import psycopg
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
    from lifecycle_dagster.embedded import ensure_server

    dsn = ensure_server(settings.pgdata)
    os.environ["DATABASE_URL"] = dsn
    return dsn


def connect(dsn: str, **kwargs: Any) -> Connection:
    """Open a connection with dict rows (autocommit unless ``autocommit=False`` is passed)."""
    kwargs.setdefault("autocommit", True)
    return psycopg.connect(dsn, row_factory=dict_row, **kwargs)
