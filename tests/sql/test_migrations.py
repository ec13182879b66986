"""Tests of lifecycle_dagster.store.migrate against real Postgres: ordering, checksums, concurrency, atomicity."""

from __future__ import annotations

import hashlib
import shutil
import threading
from pathlib import Path
from typing import Any

import psycopg
import pytest

from lifecycle_dagster.store import migrate
from lifecycle_dagster.store.sqlfiles import sql_dir

MIGRATIONS = sql_dir() / "migrations"
RUNBOOK_TABLES = (
    "workflow_definitions",
    "workflow_executions",
    "workflow_execution_logs",
    "workflow_events",
    "agents",
    "agent_ontologies",
    "task_queue",
)


def _files() -> list[Path]:
    return sorted(p for p in MIGRATIONS.iterdir() if p.suffix == ".sql")


def _recorded(dsn: str) -> list[tuple[Any, ...]]:
    """Rows of lifecycle.schema_migrations (empty list when the table does not exist)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        exists = conn.execute("SELECT to_regclass('lifecycle.schema_migrations') IS NOT NULL").fetchone()
        assert exists is not None
        if not exists[0]:
            return []
        return conn.execute(
            "SELECT version, name, checksum, applied_at FROM lifecycle.schema_migrations ORDER BY version"
        ).fetchall()


def _table_exists(dsn: str, name: str) -> bool:
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute("SELECT to_regclass(%s) IS NOT NULL", (name,)).fetchone()
        assert row is not None
        return bool(row[0])


def _copy_migrations(tmp_path: Path) -> Path:
    folder = tmp_path / "migrations"
    shutil.copytree(MIGRATIONS, folder)
    return folder


# ---------------------------------------------------------------------------------------------
# discover


def test_discover_lists_the_shipped_files_in_order() -> None:
    found = migrate.discover()
    assert [m.version for m in found] == list(range(1, len(found) + 1))
    assert [(m.version, m.name) for m in found[:1]] == [(1, "baseline")]
    for mig, path in zip(found, _files(), strict=True):
        assert mig.path == path
        assert mig.checksum == hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize(
    "bad_name", ["2_engine.sql", "0002_Engine.sql", "0002-engine.sql", "00002_engine.sql", "0002_.sql"]
)
def test_discover_refuses_a_misnamed_file(tmp_path: Path, bad_name: str) -> None:
    (tmp_path / "0001_schema.sql").write_text("SELECT 1;\n")
    (tmp_path / bad_name).write_text("SELECT 2;\n")
    with pytest.raises(migrate.MigrationError) as err:
        migrate.discover(tmp_path)
    assert bad_name in str(err.value)
    assert "NNNN_snake_name.sql" in str(err.value)


def test_discover_ignores_files_that_are_not_sql(tmp_path: Path) -> None:
    (tmp_path / "0001_schema.sql").write_text("SELECT 1;\n")
    (tmp_path / "README.md").write_text("notes\n")
    assert [m.name for m in migrate.discover(tmp_path)] == ["schema"]


def test_discover_refuses_a_gap(tmp_path: Path) -> None:
    (tmp_path / "0001_schema.sql").write_text("SELECT 1;\n")
    (tmp_path / "0003_later.sql").write_text("SELECT 3;\n")
    with pytest.raises(migrate.MigrationError, match=r"0003_later\.sql: expected version 0002"):
        migrate.discover(tmp_path)


def test_discover_refuses_a_first_version_other_than_one(tmp_path: Path) -> None:
    (tmp_path / "0002_engine.sql").write_text("SELECT 2;\n")
    with pytest.raises(migrate.MigrationError, match=r"0002_engine\.sql: expected version 0001"):
        migrate.discover(tmp_path)


def test_discover_refuses_a_repeated_version(tmp_path: Path) -> None:
    (tmp_path / "0001_a.sql").write_text("SELECT 1;\n")
    (tmp_path / "0001_b.sql").write_text("SELECT 1;\n")
    with pytest.raises(migrate.MigrationError, match=r"0001_b\.sql: expected version 0002"):
        migrate.discover(tmp_path)


# ---------------------------------------------------------------------------------------------
# upgrade


def test_upgrade_on_an_empty_database_applies_every_file(new_db: Any) -> None:
    dsn: str = new_db()
    assert _recorded(dsn) == []
    assert not _table_exists(dsn, "workflow_definitions")

    applied = migrate.upgrade(dsn)

    files = _files()
    assert [m.version for m in applied] == list(range(1, len(files) + 1))
    for table in RUNBOOK_TABLES:
        assert _table_exists(dsn, table), table
    rows = _recorded(dsn)
    expected = [(int(p.name[:4]), p.stem[5:], hashlib.sha256(p.read_bytes()).hexdigest()) for p in files]
    assert [(v, n, c) for v, n, c, _ in rows] == expected
    assert rows[0][:2] == (1, "baseline")
    with psycopg.connect(dsn) as conn:  # and then every schema file, recorded with its checksum
        assert migrate.applied_schema(conn) == {f.name: f.checksum for f in migrate.discover_schema()}


def test_upgrade_rerun_applies_nothing_and_changes_nothing(new_db: Any) -> None:
    dsn: str = new_db()
    first = migrate.upgrade(dsn)
    assert first
    before = _recorded(dsn)

    assert migrate.upgrade(dsn) == []
    assert _recorded(dsn) == before  # same versions, checksums and applied_at


def test_upgrade_on_the_template_database_is_a_no_op(new_db: Any, template_db: str) -> None:
    dsn: str = new_db(template_db)
    before = _recorded(dsn)
    assert len(before) == len(_files())
    assert migrate.upgrade(dsn) == []
    assert _recorded(dsn) == before


@pytest.mark.parametrize("round_", range(3))
def test_two_concurrent_upgraders_apply_one_set(new_db: Any, round_: int) -> None:
    dsn: str = new_db()
    barrier = threading.Barrier(2, timeout=10)
    results: list[list[int] | None] = [None, None]
    errors: list[BaseException] = []

    def upgrader(i: int) -> None:
        try:
            barrier.wait()
            results[i] = [m.version for m in migrate.upgrade(dsn)]  # opens its own connection
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=upgrader, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not any(t.is_alive() for t in threads), "an upgrader hung"
    assert errors == []
    every = list(range(1, len(_files()) + 1))
    # one upgrader applied everything, the other found nothing to do
    assert sorted(results, key=len) == [[], every]
    rows = _recorded(dsn)
    assert [r[0] for r in rows] == every
    assert len(rows) == len(_files()) >= 1
    with psycopg.connect(dsn) as conn:
        assert migrate.applied_schema(conn) == {f.name: f.checksum for f in migrate.discover_schema()}


def test_upgrade_refuses_a_changed_applied_file(new_db: Any, tmp_path: Path) -> None:
    dsn: str = new_db()
    folder = _copy_migrations(tmp_path)
    migrate.upgrade(dsn, folder)
    before = _recorded(dsn)

    first = sorted(folder.glob("0001_*.sql"))[0]
    with first.open("a", encoding="utf-8") as fh:
        fh.write("\n-- edited after release\n")
    # a new pending migration that must NOT be applied when the check fails
    new_version = len(before) + 1
    (folder / f"{new_version:04d}_pending_marker.sql").write_text("CREATE TABLE pending_marker (id int);\n")

    with pytest.raises(migrate.MigrationError) as err:
        migrate.upgrade(dsn, folder)
    message = str(err.value)
    assert first.name in message
    assert "changed" in message
    assert _recorded(dsn) == before
    assert not _table_exists(dsn, "pending_marker")


def test_upgrade_refuses_a_database_migrated_by_newer_code(new_db: Any, tmp_path: Path) -> None:
    dsn: str = new_db()
    newer = _copy_migrations(tmp_path)
    version = len(_files()) + 1
    (newer / f"{version:04d}_from_the_future.sql").write_text("CREATE TABLE future_marker (id int);\n")
    migrate.upgrade(dsn, newer)
    before = _recorded(dsn)
    assert before[-1][:2] == (version, "from_the_future")

    with pytest.raises(migrate.MigrationError) as err:
        migrate.upgrade(dsn)  # the shipped folder lacks that version
    message = str(err.value)
    assert f"{version:04d}_from_the_future" in message
    assert "does not know" in message
    assert _recorded(dsn) == before


def test_a_failing_migration_leaves_nothing_applied(new_db: Any, tmp_path: Path) -> None:
    dsn: str = new_db()
    folder = _copy_migrations(tmp_path)
    migrate.upgrade(dsn, folder)
    before = _recorded(dsn)
    version = len(before) + 1
    (folder / f"{version:04d}_broken.sql").write_text(
        "CREATE TABLE broken_marker (id int);\nINSERT INTO broken_marker VALUES (1);\nSELECT 1 / 0;\n"
    )

    with pytest.raises(psycopg.errors.DivisionByZero):
        migrate.upgrade(dsn, folder)
    assert not _table_exists(dsn, "broken_marker")
    assert _recorded(dsn) == before
    assert version not in [r[0] for r in _recorded(dsn)]


def test_a_failing_migration_on_an_empty_database_applies_none_of_the_batch(new_db: Any, tmp_path: Path) -> None:
    dsn: str = new_db()
    folder = _copy_migrations(tmp_path)
    version = len(_files()) + 1
    (folder / f"{version:04d}_broken.sql").write_text(
        "CREATE TABLE broken_marker (id int);\nSELECT no_such_function();\n"
    )

    with pytest.raises(psycopg.errors.UndefinedFunction):
        migrate.upgrade(dsn, folder)
    # one transaction: the earlier files of the batch and the bookkeeping table are gone too
    assert _recorded(dsn) == []
    assert not _table_exists(dsn, "lifecycle.schema_migrations")
    assert not _table_exists(dsn, "broken_marker")
    assert not _table_exists(dsn, "workflow_definitions")


def test_upgrade_refuses_an_applied_migration_replaced_by_another_name(new_db: Any, tmp_path: Path) -> None:
    dsn = new_db()
    folder = _copy_migrations(tmp_path)
    n = len(_files()) + 1
    (folder / f"{n:04d}_extra.sql").write_text("CREATE TABLE extra_one (id int);")
    migrate.upgrade(dsn, folder)
    (folder / f"{n:04d}_extra.sql").rename(folder / f"{n:04d}_other.sql")
    with pytest.raises(migrate.MigrationError) as err:
        migrate.upgrade(dsn, folder)
    assert str(err.value).startswith(
        f"migration {n:04d} was applied as {n:04d}_extra.sql, but the file now is {n:04d}_other.sql"
    )
