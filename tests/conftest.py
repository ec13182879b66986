"""Test fixtures: a real Postgres (DATABASE_URL's server, or the embedded one when unset), a
migrated template database cloned per test, and a real Dagster instance stored with
dagster-postgres in its own database.
"""

from __future__ import annotations

import os
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg import conninfo, sql

from lifecycle_dagster.store import migrate
from lifecycle_dagster.store.db import connect
from lifecycle_dagster.store.sqlfiles import seed_sql

REPO = Path(__file__).resolve().parent.parent


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--chaos-scale",
        type=int,
        default=1,
        help="multiply the executions and faults of the chaos suite (tests/chaos) by N (default 1)",
    )


def _with_db(dsn: str, dbname: str) -> str:
    params = conninfo.conninfo_to_dict(dsn)
    params["dbname"] = dbname
    return conninfo.make_conninfo(**params)  # type: ignore[arg-type]


@pytest.fixture(scope="session")
def server_dsn() -> Iterator[str]:
    """Admin DSN (database ``postgres``) of the server the tests use."""
    url = os.environ.get("DATABASE_URL")
    if url:
        yield _with_db(url, "postgres")
        return
    from lifecycle_dagster.store.embedded import ensure_server, stop_server

    data = Path(tempfile.mkdtemp(prefix="ld-embedded-"))
    os.chmod(data, 0o755)
    dsn = ensure_server(data / "pgdata", keep_running=True)  # stopped below, once
    yield _with_db(dsn, "postgres")
    stop_server(data / "pgdata")


def _create_db(admin: str, name: str, template: str | None = None) -> None:
    with psycopg.connect(admin, autocommit=True) as conn:
        stmt = sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name))
        if template:
            stmt = sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(sql.Identifier(name), sql.Identifier(template))
        conn.execute(stmt)


def _drop_db(admin: str, name: str) -> None:
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


@pytest.fixture(scope="session")
def template_db(server_dsn: str) -> Iterator[str]:
    """Name of a database with every migration applied (no seed)."""
    name = f"ld_tpl_{os.getpid()}"
    _drop_db(server_dsn, name)
    _create_db(server_dsn, name)
    migrate.upgrade(_with_db(server_dsn, name))
    yield name
    _drop_db(server_dsn, name)


@pytest.fixture
def new_db(server_dsn: str) -> Iterator[object]:
    """Factory: ``new_db(template=None) -> dsn`` of a fresh database dropped after the test."""
    made: list[str] = []

    def make(template: str | None = None) -> str:
        name = f"ld_t_{uuid.uuid4().hex[:12]}"
        _create_db(server_dsn, name, template)
        made.append(name)
        return _with_db(server_dsn, name)

    yield make
    for name in made:
        _drop_db(server_dsn, name)


@pytest.fixture
def db(new_db, template_db: str, monkeypatch: pytest.MonkeyPatch) -> str:  # type: ignore[no-untyped-def]
    """DSN of a fresh migrated database; DATABASE_URL points at it for this test."""
    dsn: str = new_db(template_db)
    monkeypatch.setenv("DATABASE_URL", dsn)
    return dsn


@pytest.fixture
def seeded_db(db: str) -> str:
    """``db`` with the runbook's lifecycle_v1, agents and capabilities installed."""
    with connect(db) as conn:
        conn.execute(seed_sql())
    return db


@pytest.fixture(scope="session")
def dagster_home(server_dsn: str) -> Iterator[Path]:
    """A DAGSTER_HOME stored with dagster-postgres in its own database (schema ``dagster``)."""
    from lifecycle_dagster.location.instance import prepare_home

    name = f"ld_dagster_{os.getpid()}"
    _drop_db(server_dsn, name)
    _create_db(server_dsn, name)
    home = Path(tempfile.mkdtemp(prefix="ld-dagster-home-"))
    prepare_home(home, _with_db(server_dsn, name))
    yield home
    _drop_db(server_dsn, name)


@pytest.fixture
def instance(dagster_home: Path, monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    """The real Dagster instance of ``dagster_home``."""
    from dagster import DagsterInstance

    monkeypatch.setenv("DAGSTER_HOME", str(dagster_home))
    inst = DagsterInstance.from_config(str(dagster_home))
    yield inst
    inst.dispose()


@pytest.fixture(autouse=True)
def _dagster_load_context_restored() -> Iterator[None]:
    """Put Dagster's definitions load context back after each test. Dagster installs one globally
    when it loads definitions in this process (``execute_job`` of a reconstructable job, the
    scheduler loop) and never removes it, so a later test's load would be a RECONSTRUCTION from
    another test's snapshot. Dagster is not imported for it (unit tests check what loads it)."""
    import sys

    name = "dagster._core.definitions.definitions_load_context"
    module = sys.modules.get(name)
    before = module.DefinitionsLoadContext._instance if module is not None else None
    yield
    module = sys.modules.get(name)
    if module is not None:
        module.DefinitionsLoadContext._instance = before
