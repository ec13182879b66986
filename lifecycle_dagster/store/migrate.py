"""Versioned schema migrations, applied in order under an advisory lock.

Files are ``sql/migrations/NNNN_snake_name.sql`` with versions 1, 2, 3… and no gaps. Each applied
version is recorded in ``lifecycle.schema_migrations`` with the SHA-256 of its file. An upgrade
runs in ONE transaction holding ``pg_advisory_xact_lock``: two concurrent upgraders serialise and
the second finds nothing to do; a failed file leaves nothing applied. An applied file whose
checksum has changed stops the upgrade before anything runs (River and procrastinate work the
same way: migrations are immutable once released).

Functions, views, triggers, policies and privileges are not in migrations: each is written once
in ``sql/schema/NN_family.sql``. After the pending migrations, in the same transaction, the
upgrader applies every schema file when any of them changed (Flyway's repeatable migrations), then
records the fingerprints of the installed objects (``lifecycle.schema_fingerprints``) that
``doctor`` compares against. See ``sql/README.md``.

This module is the runner; in the same transaction it calls :mod:`lifecycle_dagster.store.adopt`
(a database that already holds the runbook's tables) and :mod:`lifecycle_dagster.store.repair`
(drift of the installed schema, and ``--repair``).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import LiteralString

import psycopg

from lifecycle_dagster.store import adopt
from lifecycle_dagster.store import repair as schema_repair
from lifecycle_dagster.store.adopt import Reject
from lifecycle_dagster.store.sqlfiles import sql_dir

_FILE = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")
# an arbitrary constant: the key of the advisory lock that serialises upgrades
ADVISORY_LOCK_KEY = 7_301_402_518_133_770_001

_CREATE_TABLE = """
CREATE SCHEMA IF NOT EXISTS lifecycle;
CREATE TABLE IF NOT EXISTS lifecycle.schema_files (
  name       text        PRIMARY KEY,
  checksum   text        NOT NULL,
  applied_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE IF NOT EXISTS lifecycle.schema_migrations (
  version    integer     PRIMARY KEY,
  name       text        NOT NULL,
  checksum   text        NOT NULL,
  applied_at timestamptz NOT NULL DEFAULT now()
)
"""


class MigrationError(RuntimeError):
    """The migration files or the database's record of them are inconsistent."""


@dataclass(frozen=True)
class SqlFile:
    """One SQL file: ``name``, ``path`` and the SHA-256 ``checksum`` of its bytes."""

    name: str
    path: Path
    checksum: str

    @property
    def sql(self) -> LiteralString:
        """The file's SQL text."""
        return self.path.read_text(encoding="utf-8")


@dataclass(frozen=True)
class Migration(SqlFile):
    """One migration file ``NNNN_name.sql``: ``name`` without the number, ``version`` (1-based)."""

    version: int


def discover(folder: Path | None = None) -> list[Migration]:
    """List the migration files of ``folder`` (default ``sql/migrations``) in version order.

    Raises:
        MigrationError: a file is misnamed, a version repeats, or versions have a gap.
    """
    folder = folder or sql_dir() / "migrations"
    found: list[Migration] = []
    for path in sorted(folder.iterdir()):
        if path.suffix != ".sql":
            continue
        m = _FILE.match(path.name)
        if not m:
            raise MigrationError(f"{path.name}: migration files are named NNNN_snake_name.sql")
        data = path.read_bytes()
        found.append(Migration(m.group(2), path, hashlib.sha256(data).hexdigest(), int(m.group(1))))
    for expected, mig in enumerate(found, start=1):
        if mig.version != expected:
            raise MigrationError(
                f"{mig.path.name}: expected version {expected:04d} (versions start at 1, no gaps or repeats)"
            )
    return found


def applied(conn: psycopg.Connection) -> dict[int, tuple[str, str]]:
    """``{version: (name, checksum)}`` recorded in the database (empty before the first upgrade)."""
    exists = conn.execute("SELECT to_regclass('lifecycle.schema_migrations') IS NOT NULL").fetchone()
    if not exists or not exists[0]:
        return {}
    rows = conn.execute("SELECT version, name, checksum FROM lifecycle.schema_migrations").fetchall()
    return {int(v): (str(n), str(c)) for v, n, c in rows}


@dataclass
class UpgradeReport:
    """What one upgrade did (or, with ``check``, would do).

    ``applied``: migrations run; ``adopted``: ``{table: (rows copied, rows rejected)}`` when the
    database held the runbook's tables before its first migration; ``rejects``: the rejected
    rows; ``columns_not_carried``: ``(table, column)`` of the adopted tables that ours lack;
    ``repaired``: ``(kind, object, action)`` from ``lifecycle.schema_repair()``; ``drift``:
    ``(kind, object, problem)`` found before migrating; ``check``: nothing was committed.
    """

    applied: list[Migration] = field(default_factory=list)
    adopted: dict[str, tuple[int, int]] = field(default_factory=dict)
    rejects: list[Reject] = field(default_factory=list)
    columns_not_carried: list[tuple[str, str]] = field(default_factory=list)
    repaired: list[tuple[str, str, str]] = field(default_factory=list)
    drift: list[tuple[str, str, str]] = field(default_factory=list)
    schema_applied: list[str] = field(default_factory=list)
    schema_changed: list[str] = field(default_factory=list)
    check: bool = False


class SchemaDriftError(MigrationError):
    """The installed functions, views, triggers, policies or privileges differ from the shipped
    ones; migrating now would record the drifted objects as shipped. ``drift`` lists them."""

    def __init__(self, drift: list[tuple[str, str, str]]) -> None:
        self.drift = drift
        listed = "; ".join(f"{kind} {obj} ({problem})" for kind, obj, problem in drift[:5])
        more = f" and {len(drift) - 5} more" if len(drift) > 5 else ""
        super().__init__(
            f"the schema differs from the shipped one: {listed}{more}. Run `lifecycle-dagster db upgrade "
            "--repair` to restore the shipped definitions first (`lifecycle-dagster doctor` explains each)"
        )


def upgrade(dsn: str, folder: Path | None = None) -> list[Migration]:
    """Apply every pending migration to the database at ``dsn``; return the ones applied.

    Runs in one transaction under an advisory lock; a re-run applies nothing. See
    :func:`run_upgrade` for adoption of an existing schema, ``check`` and ``repair``.

    Raises:
        MigrationError: an applied file changed (checksum), or the database records a version
            this code does not have (it was migrated by newer code).
        SchemaDriftError: pending migrations, and the installed schema differs from the shipped one.
        psycopg.Error: a migration's SQL failed (nothing is applied then).
    """
    return run_upgrade(dsn, folder).applied


def run_upgrade(dsn: str, folder: Path | None = None, *, check: bool = False, repair: bool = False) -> UpgradeReport:
    """Upgrade the database at ``dsn`` in ONE transaction under an advisory lock.

    1. ``repair``: drop what is extra among our objects and re-apply every schema file, which puts
       back the shipped definition of every function, view, trigger, policy and privilege that
       differs. Without it, an upgrade with work to do on a drifted schema raises
       :class:`SchemaDriftError` (it would silently replace what was changed by hand).
    2. Adoption: a database with no migration recorded that already holds any of the runbook's
       seven tables has them (and same-named views, sequences and functions) moved into the schema
       ``lifecycle_adopted``; then every migration runs; then the rows are copied table by table,
       each row that breaks a rule reported in the result and in ``lifecycle.adoption_rejects``.
    3. Pending migrations, in order; then every ``sql/schema/`` file when any changed (or a
       migration ran), and the fingerprints of what they installed.
    With ``check`` all of it runs and is rolled back: the report is the plan.

    Raises:
        MigrationError: see :func:`upgrade`; SchemaDriftError; psycopg.Error (nothing committed).
    """
    migrations = discover(folder)
    files = discover_schema()
    report = UpgradeReport(check=check)
    with psycopg.connect(dsn, autocommit=False) as conn:
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (ADVISORY_LOCK_KEY,))
        conn.execute(_CREATE_TABLE)
        done = applied(conn)
        _check_applied(done, migrations)
        pending = [m for m in migrations if m.version not in done]
        stale = _stale_schema(conn, files)
        report.schema_changed = [f.name for f in stale]
        if _check_drift(conn, report, migrated=bool(done), work=bool(pending or stale), repair=repair):
            stale = files
        tables = adopt.tables_to_adopt(conn) if not done else []
        if tables:
            adopt.move_aside(conn)
        for mig in pending:
            conn.execute(mig.sql)
            conn.execute(
                "INSERT INTO lifecycle.schema_migrations (version, name, checksum) VALUES (%s, %s, %s)",
                (mig.version, mig.name, mig.checksum),
            )
        if pending or stale:
            _apply_schema(conn, files)
        if tables:
            report.adopted, report.rejects, report.columns_not_carried = adopt.copy_rows(conn, tables)
        report.applied = pending
        report.schema_applied = [f.name for f in files] if (pending or stale) else []
        if check:
            conn.rollback()
        else:
            conn.commit()
    return report


def _stale_schema(conn: psycopg.Connection, files: list[SchemaFile]) -> list[SchemaFile]:
    """The schema files whose checksum differs from the one last applied; all of them when the set
    of files differs from the one last applied."""
    installed = applied_schema(conn)
    return [f for f in files if installed.get(f.name) != f.checksum] or (
        files if set(installed) != {f.name for f in files} else []
    )


def _check_drift(conn: psycopg.Connection, report: UpgradeReport, *, migrated: bool, work: bool, repair: bool) -> bool:
    """Read the drift into ``report``; with ``repair`` repair it (into ``report.repaired``) and
    return True: every schema file must then be re-applied. Without, refuse an upgrade with
    ``work`` to do on a drifted schema.

    Raises:
        MigrationError: ``repair`` on a database with no lifecycle schema (not ``migrated``), or a
            difference re-applying sql/schema/ cannot undo (nothing is repaired then).
        SchemaDriftError: ``work`` to do, no ``repair``, and the schema drifted.
    """
    drift = schema_repair.read_drift(conn) if migrated else []
    report.drift = drift
    if not repair:
        blocking = [d for d in drift if _blocks_migrating(d)] if work else []
        if blocking:
            raise SchemaDriftError(blocking)
        return False
    if not migrated:
        raise MigrationError("this database has no lifecycle schema yet: run `lifecycle-dagster db upgrade` first")
    left = schema_repair.unrepairable(drift)
    if left:
        listed = "; ".join(f"{k} {o} ({p})" for k, o, p in left[:5])
        raise MigrationError(
            f"--repair cannot restore {listed}{' and more' if len(left) > 5 else ''}: tables, their "
            "constraints and the state machine's rows come from sql/migrations/ (restore them from a backup, "
            "or move an extra table out of schema lifecycle); nothing was repaired"
        )
    report.repaired = schema_repair.repair(conn, drift)
    return True


class SchemaFile(SqlFile):
    """One file of ``sql/schema/``; its ``name`` is the file name, ``NN_family.sql``."""


_SCHEMA_FILE = re.compile(r"^(\d{2})_([a-z0-9_]+)\.sql$")


def discover_schema(folder: Path | None = None) -> list[SchemaFile]:
    """List ``sql/schema/NN_family.sql`` in the order they are applied (by name).

    Raises:
        MigrationError: a file is misnamed.
    """
    folder = folder or sql_dir() / "schema"
    found: list[SchemaFile] = []
    for path in sorted(folder.iterdir()):
        if path.suffix != ".sql":
            continue
        if not _SCHEMA_FILE.match(path.name):
            raise MigrationError(f"{path.name}: schema files are named NN_family.sql")
        found.append(SchemaFile(path.name, path, hashlib.sha256(path.read_bytes()).hexdigest()))
    return found


def applied_schema(conn: psycopg.Connection) -> dict[str, str]:
    """``{file name: checksum}`` of the schema files the database last applied."""
    rows = conn.execute("SELECT name, checksum FROM lifecycle.schema_files").fetchall()
    return {str(n): str(c) for n, c in rows}


def _apply_schema(conn: psycopg.Connection, files: list[SchemaFile]) -> None:
    """Apply every schema file in order, record their checksums and the fingerprints of what they
    installed. Bodies are checked when called, not when created (as pg_dump restores them), so a
    file may name a function of a later file."""
    conn.execute("SET LOCAL check_function_bodies = off")
    for f in files:
        try:
            conn.execute(f.sql)
        except psycopg.Error as exc:
            raise MigrationError(f"sql/schema/{f.name}: {exc}") from exc
    conn.execute("RESET check_function_bodies")
    conn.execute("DELETE FROM lifecycle.schema_files")
    with conn.cursor() as cur:
        cur.executemany(
            "INSERT INTO lifecycle.schema_files (name, checksum) VALUES (%s, %s)", [(f.name, f.checksum) for f in files]
        )
    conn.execute("SELECT lifecycle.schema_fingerprints_record()")


def _blocks_migrating(drift: tuple[str, str, str]) -> bool:
    """Every difference blocks an upgrade: the catalog holds only our objects, and applying the
    schema over a drifted one would silently replace what someone changed by hand (a runbook
    section re-run, say). ``--repair`` is the explicit way to put the shipped definitions back."""
    return bool(drift)


def _check_applied(done: dict[int, tuple[str, str]], migrations: list[Migration]) -> None:
    by_version = {m.version: m for m in migrations}
    for version, (name, checksum) in sorted(done.items()):
        mig = by_version.get(version)
        if mig is None:
            raise MigrationError(
                f"the database has migration {version:04d}_{name} which this code does not know: "
                "it was upgraded by a newer lifecycle-dagster"
            )
        if mig.name != name:
            raise MigrationError(
                f"migration {version:04d} was applied as {version:04d}_{name}.sql, but the file now is "
                f"{mig.path.name}: applied migrations are never renamed or replaced; add a new one"
            )
        if mig.checksum != checksum:
            raise MigrationError(
                f"{mig.path.name} was changed after it was applied (checksum {checksum[:12]}… "
                f"recorded, {mig.checksum[:12]}… on disk): add a new migration instead"
            )
