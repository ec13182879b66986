"""Versioned schema migrations, applied in order under an advisory lock.

Files are ``sql/migrations/NNNN_snake_name.sql`` with versions 1, 2, 3… and no gaps. Each applied
version is recorded in ``lifecycle_schema_migrations`` with the SHA-256 of its file. An upgrade
runs in ONE transaction holding ``pg_advisory_xact_lock``: two concurrent upgraders serialise and
the second finds nothing to do; a failed file leaves nothing applied. An applied file whose
checksum has changed stops the upgrade before anything runs (River and procrastinate work the
same way: migrations are immutable once released).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import LiteralString

import psycopg

from lifecycle_dagster.sqlfiles import sql_dir

_FILE = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")
# an arbitrary constant: the key of the advisory lock that serialises upgrades
ADVISORY_LOCK_KEY = 7_301_402_518_133_770_001

_CREATE_TABLE = """
CREATE TABLE IF NOT EXISTS lifecycle_schema_migrations (
  version    integer     PRIMARY KEY,
  name       text        NOT NULL,
  checksum   text        NOT NULL,
  applied_at timestamptz NOT NULL DEFAULT now()
)
"""


class MigrationError(RuntimeError):
    """The migration files or the database's record of them are inconsistent."""


@dataclass(frozen=True)
class Migration:
    """One migration file: ``version`` (1-based), ``name``, file ``path`` and SHA-256 ``checksum``."""

    version: int
    name: str
    path: Path
    checksum: str

    @property
    def sql(self) -> LiteralString:
        """The file's SQL text."""
        return self.path.read_text(encoding="utf-8")


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
        found.append(Migration(int(m.group(1)), m.group(2), path, hashlib.sha256(data).hexdigest()))
    for expected, mig in enumerate(found, start=1):
        if mig.version != expected:
            raise MigrationError(
                f"{mig.path.name}: expected version {expected:04d} (versions start at 1, no gaps or repeats)"
            )
    return found


def applied(conn: psycopg.Connection) -> dict[int, tuple[str, str]]:
    """``{version: (name, checksum)}`` recorded in the database (empty before the first upgrade)."""
    exists = conn.execute("SELECT to_regclass('lifecycle_schema_migrations') IS NOT NULL").fetchone()
    if not exists or not exists[0]:
        return {}
    rows = conn.execute("SELECT version, name, checksum FROM lifecycle_schema_migrations").fetchall()
    return {int(v): (str(n), str(c)) for v, n, c in rows}


@dataclass(frozen=True)
class Reject:
    """A row of an adopted table that breaks one of our rules: not copied, kept in
    ``lifecycle_adopted.<table>`` and listed in ``lifecycle_adoption_rejects``."""

    table: str
    row_id: str
    rule: str
    message: str


@dataclass
class UpgradeReport:
    """What one upgrade did (or, with ``check``, would do).

    ``applied``: migrations run; ``adopted``: ``{table: (rows copied, rows rejected)}`` when the
    database held the runbook's tables before its first migration; ``rejects``: the rejected
    rows; ``columns_not_carried``: ``(table, column)`` of the adopted tables that ours lack;
    ``repaired``: ``(kind, object, action)`` from ``lifecycle_repair_schema()``; ``drift``:
    ``(kind, object, problem)`` found before migrating; ``check``: nothing was committed.
    """

    applied: list[Migration] = field(default_factory=list)
    adopted: dict[str, tuple[int, int]] = field(default_factory=dict)
    rejects: list[Reject] = field(default_factory=list)
    columns_not_carried: list[tuple[str, str]] = field(default_factory=list)
    repaired: list[tuple[str, str, str]] = field(default_factory=list)
    drift: list[tuple[str, str, str]] = field(default_factory=list)
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


# the runbook's tables in foreign-key order (parents first): the order adoption copies them in
ADOPTED_TABLES = (
    "workflow_definitions",
    "agents",
    "agent_ontologies",
    "workflow_executions",
    "workflow_execution_logs",
    "workflow_events",
    "task_queue",
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

    1. ``repair``: put back the shipped definitions of every function, view, trigger, policy and
       privilege that differs (``lifecycle_repair_schema()``, from 0012 on); without it, pending
       migrations on a drifted schema raise :class:`SchemaDriftError` (they would record the
       drifted objects as shipped).
    2. Adoption: a database with no migration recorded that already holds any of the runbook's
       seven tables has them (and same-named views, sequences and functions) moved into the schema
       ``lifecycle_adopted``; then every migration runs; then the rows are copied table by table,
       each row that breaks a rule reported in the result and in ``lifecycle_adoption_rejects``.
    3. Pending migrations, in order.
    With ``check`` all of it runs and is rolled back: the report is the plan.

    Raises:
        MigrationError: see :func:`upgrade`; SchemaDriftError; psycopg.Error (nothing committed).
    """
    from lifecycle_dagster.sqlfiles import query

    migrations = discover(folder)
    report = UpgradeReport(check=check)
    with psycopg.connect(dsn, autocommit=False) as conn:
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (ADVISORY_LOCK_KEY,))
        conn.execute(_CREATE_TABLE)
        done = applied(conn)
        _check_applied(done, migrations)
        pending = [m for m in migrations if m.version not in done]
        has_drift_functions = _exists(conn, "SELECT to_regprocedure('lifecycle_repair_schema()') IS NOT NULL")
        if repair and has_drift_functions:
            rows = conn.execute(query("repair_schema")).fetchall()
            report.repaired = [(str(k), str(o), str(a)) for k, o, a in rows]
        elif repair and done:
            raise MigrationError(
                "this database predates 0012_schema_repair, which records the shipped definitions that "
                "--repair restores: run `lifecycle-dagster db upgrade` first"
            )
        if pending and has_drift_functions:
            report.drift = [(str(k), str(o), str(p)) for k, o, p in conn.execute(query("schema_drift")).fetchall()]
            blocking = [d for d in report.drift if _blocks_migrating(d)]
            if blocking:
                raise SchemaDriftError(blocking)
        adopt = [str(r[0]) for r in conn.execute(query("adopt_existing_tables")).fetchall()] if not done else []
        if adopt:
            conn.execute(query("adopt_move_aside"))
        for mig in pending:
            conn.execute(mig.sql)
            conn.execute(
                "INSERT INTO lifecycle_schema_migrations (version, name, checksum) VALUES (%s, %s, %s)",
                (mig.version, mig.name, mig.checksum),
            )
        if adopt:
            if not _exists(conn, "SELECT to_regprocedure('lifecycle_adopt_rows(text)') IS NOT NULL"):
                raise MigrationError(f"the database holds {', '.join(adopt)}: adopting them needs 0012_schema_repair")
            for table in ADOPTED_TABLES:
                if table in adopt:
                    row = conn.execute(query("adopt_rows"), {"table": table}).fetchone()
                    assert row is not None
                    report.adopted[table] = (int(row[0]), int(row[1]))
            report.rejects = [Reject(*map(str, r)) for r in conn.execute(query("adoption_rejects")).fetchall()]
            report.columns_not_carried = [
                (str(t), str(c)) for t, c in conn.execute(query("adopt_dropped_columns")).fetchall()
            ]
        report.applied = pending
        if check:
            conn.rollback()
        else:
            conn.commit()
    return report


def _exists(conn: psycopg.Connection, sql: LiteralString) -> bool:
    row = conn.execute(sql).fetchone()
    return bool(row and row[0])


def _blocks_migrating(drift: tuple[str, str, str]) -> bool:
    """Changed or missing shipped objects, and extra policies or triggers on our tables, would be
    recorded as shipped by the next migration; extra functions and views of the user's are not ours
    to judge (the runbook's overloads are: they are extra functions with our names)."""
    kind, obj, problem = drift
    if problem != "extra":
        return True
    if kind in ("policy", "trigger"):
        return True
    return kind == "function" and obj.split("(", 1)[0] in (
        "perform_workflow_compensation",
        "retry_stage",
        "trip_circuit_breaker",
    )


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
