"""A throwaway PostgreSQL 15 cluster for the benchmarks.

The shared server at 127.0.0.1:5432 is never touched: the harness runs ``initdb`` into a temporary
folder, starts the server on a free port with ``pg_stat_statements`` preloaded (and
``track_commit_timestamp`` on), creates its
databases there (all named ``bench_*``) and removes the whole cluster at the end. Run as root, the
server runs as the system user ``nobody`` (``initdb`` refuses root).
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
from psycopg import conninfo, sql

PG_BIN = Path(os.environ.get("BENCH_PG_BIN", "/usr/lib/postgresql/15/bin"))

#: settings appended to postgresql.conf (everything else is initdb's default, as on the shared server)
SERVER_SETTINGS = {
    "listen_addresses": "'127.0.0.1'",
    "max_connections": "200",
    "shared_buffers": "256MB",
    "max_wal_size": "4GB",
    "shared_preload_libraries": "'pg_stat_statements'",
    "pg_stat_statements.track": "all",
    "pg_stat_statements.max": "10000",
    # commit times of rows (pg_xact_commit_timestamp): when a batch's completions became visible
    "track_commit_timestamp": "on",
    "log_min_messages": "warning",
}


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _run_as(user: str | None) -> dict[str, Any]:
    return {"user": user, "group": pwd.getpwnam(user).pw_gid} if user else {}


class Cluster:
    """A temporary cluster: ``start()``, ``dsn(db)``, ``create_db(name)``, ``stop()``."""

    def __init__(self) -> None:
        self.user = "nobody" if os.geteuid() == 0 else None
        self.root = Path(tempfile.mkdtemp(prefix="bench-pg-"))
        self.data = self.root / "data"
        self.port = free_port()
        self._started = False

    def start(self) -> None:
        """initdb, configure and start; waits until the server accepts connections.

        Raises:
            subprocess.CalledProcessError: initdb or pg_ctl failed (the server log is in the folder).
        """
        os.chmod(self.root, 0o755)
        if self.user:
            info = pwd.getpwnam(self.user)
            os.chown(self.root, info.pw_uid, info.pw_gid)
        run = _run_as(self.user)
        subprocess.run(
            [str(PG_BIN / "initdb"), "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8",
             "--locale=C", "--no-sync"],
            check=True, capture_output=True, **run,
        )  # fmt: skip
        with (self.data / "postgresql.conf").open("a") as f:
            for key, value in SERVER_SETTINGS.items():
                f.write(f"{key} = {value}\n")
        subprocess.run(
            [str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-l", str(self.root / "server.log"), "-w", "-t", "60",
             "-o", f"-p {self.port} -k {self.root}", "start"],
            check=True, capture_output=True, **run,
        )  # fmt: skip
        self._started = True

    def stop(self) -> None:
        """Stop the server and delete its folder."""
        if self._started:
            subprocess.run(
                [str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop"],
                capture_output=True,
                **_run_as(self.user),
            )
            self._started = False
        shutil.rmtree(self.root, ignore_errors=True)

    def dsn(self, db: str = "postgres") -> str:
        """libpq URI of database ``db`` (TCP on 127.0.0.1, user postgres, trust auth)."""
        return f"postgresql://postgres@127.0.0.1:{self.port}/{db}"

    def create_db(self, name: str) -> str:
        """Create database ``name`` (dropping an old one); return its URI."""
        with psycopg.connect(self.dsn(), autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return self.dsn(name)

    def server_version(self) -> str:
        """``SHOW server_version``."""
        with psycopg.connect(self.dsn(), autocommit=True) as conn:
            row = conn.execute("SHOW server_version").fetchone()
        return str(row[0]) if row else "?"


@contextlib.contextmanager
def cluster() -> Iterator[Cluster]:
    """A started :class:`Cluster`, stopped and removed on exit."""
    c = Cluster()
    try:
        c.start()
        yield c
    finally:
        c.stop()


def db_name(dsn: str) -> str:
    """The database name of a URI."""
    return str(conninfo.conninfo_to_dict(dsn).get("dbname") or "postgres")


def wait_ready(dsn: str, timeout_s: float = 30.0) -> None:
    """Wait until ``dsn`` accepts a connection.

    Raises:
        TimeoutError: not within ``timeout_s`` seconds.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with psycopg.connect(dsn, connect_timeout=2):
                return
        except psycopg.OperationalError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{dsn} not ready within {timeout_s:g} s") from None
            time.sleep(0.2)
