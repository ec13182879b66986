"""The embedded server's lifetime across processes: it stays up while any process holds it (a
command, a `dev`, a `run`) or `db start` pinned it, and the last holder out stops it, whichever
process started it. Real servers in a temporary data folder (each start takes about a second)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from lifecycle_dagster.store.embedded import server_running

BIN = Path(sys.executable).parent
#: a process holding the server until its stdin closes (as `dev` or `run` does while it works)
_HOLD = (
    "import sys; from pathlib import Path; from lifecycle_dagster.store.embedded import ensure_server; "
    "print(ensure_server(Path(sys.argv[1])), flush=True); sys.stdin.read()"
)


@pytest.fixture
def data_dir(tmp_path: Path) -> Iterator[Path]:
    os.chmod(tmp_path, 0o755)  # run as root, the server's own user must reach its folder
    yield tmp_path
    if server_running(tmp_path / "pgdata"):
        _cli(tmp_path, "db", "stop")


def _env(data_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "DAGSTER_HOME")}
    return {**env, "LIFECYCLE_DAGSTER_DATA_DIR": str(data_dir)}


def _cli(data_dir: Path, *args: str) -> str:
    done = subprocess.run(
        [str(BIN / "lifecycle-dagster"), *args], env=_env(data_dir), capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def _hold(data_dir: Path) -> subprocess.Popen[str]:
    """Start a process holding the server (started or attached to) until :func:`_release`."""
    proc = subprocess.Popen(
        [sys.executable, "-c", _HOLD, str(data_dir / "pgdata")],
        env=_env(data_dir),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None and proc.stdout.readline().startswith("postgresql://")
    return proc


def _release(proc: subprocess.Popen[str]) -> None:
    """Let a holder exit normally."""
    assert proc.stdin is not None
    proc.stdin.close()
    assert proc.wait(60) == 0


@contextmanager
def _holder(data_dir: Path) -> Iterator[None]:
    """A process holding the server from entry to exit."""
    proc = _hold(data_dir)
    try:
        yield
    finally:
        _release(proc)


def test_the_last_holder_out_stops_the_server_unless_db_start_pinned_it(data_dir: Path) -> None:
    pgdata = data_dir / "pgdata"
    starter = _hold(data_dir)
    with _holder(data_dir):  # attaches; outlives the process that started the server
        _release(starter)
        assert server_running(pgdata), "the starter exiting stopped the server another process holds"
        assert _cli(data_dir, "db", "url").startswith("postgresql://")  # a short command
        assert server_running(pgdata), "a short command stopped the server a holder holds"
    assert not server_running(pgdata), "the last holder out left the server running"

    with _holder(data_dir):  # `dev` started it ...
        _cli(data_dir, "db", "start")  # ... then `db start`, while `dev` runs
    assert server_running(pgdata), "db start did not keep the server up after the holder that started it"
    with _holder(data_dir):
        pass
    _cli(data_dir, "db", "url")
    assert server_running(pgdata), "a pinned server was stopped by its last holder"
    assert _cli(data_dir, "db", "stop").strip() == "stopped"
    assert not server_running(pgdata)
