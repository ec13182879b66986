"""Versioned publishing: definition files, publish, activate, the list of versions and the warnings
``validate`` prints. (Asking a running Dagster webserver to reload the code location is
:mod:`lifecycle_dagster.location.reload`.)

A workflow changes only by publishing a new version (``lifecycle.definition_publish``, one SQL
function, one transaction under a per-name advisory lock): the DAG is validated (in Python first,
for a readable list of problems, and again by the database, whose BEFORE INSERT trigger refuses
an invalid ``dag_schema`` from any client), the new row gets version = highest + 1 and, when asked,
becomes the only active version. Content identical to the latest version (same ``dag_schema``
jsonb and same description) stores nothing.

Pinning: the code location builds a job for every active version and for every version that an
execution whose status is not final (:data:`FINAL_STATUSES`) still runs on, so a run started on
v1 finishes on v1, and its compensation job exists, after v2 is activated (named query
``active_definitions``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, cast

import psycopg
from psycopg.types.json import Jsonb

from lifecycle_dagster.core.dag import Dag, DagValidationError, parse_dag
from lifecycle_dagster.core.dag_structure import quote
from lifecycle_dagster.core.payload import check_output, json_float
from lifecycle_dagster.store.db import Connection
from lifecycle_dagster.store.sqlfiles import query

#: workflow names (the CHECK workflow_definitions_name_valid, and lifecycle.definition_publish):
#: also without ``__`` and not ending in ``_``, so job and op names stay unambiguous Dagster names
WORKFLOW_NAME_PATTERN = r"^[a-z][a-z0-9_]{0,62}$"
_NAME_RE = re.compile(WORKFLOW_NAME_PATTERN)
#: execution statuses with no way out (lifecycle.transitions); any other status pins its version
FINAL_STATUSES = ("completed", "rolled_back", "compensation_failed")


class DefinitionFileError(ValueError):
    """A definition file cannot be read, is not JSON or YAML, or lacks what publishing needs."""


class PublishError(ValueError):
    """The database refused to publish or activate (its message names the workflow and version)."""


@dataclass(frozen=True)
class DefinitionFile:
    """A definition file's content: ``name`` and ``description`` (``None`` when absent) and the
    DAG (the document without ``name`` and ``description``, or its ``dag_schema`` key)."""

    path: Path
    name: Any
    description: Any
    dag: Any


@dataclass(frozen=True)
class PublishResult:
    """What :func:`publish` did. ``created``: a new version was stored; otherwise ``version`` is
    the identical latest one. ``active``: ``version`` is the active version now. ``activated``:
    this call made it the active one. ``previous_version``: the version that was active before
    when this call activated another (``None`` otherwise, or when none was)."""

    name: str
    version: int
    created: bool
    active: bool
    activated: bool
    definition_id: str
    previous_version: int | None


@dataclass(frozen=True)
class ActivationResult:
    """What :func:`activate` did. ``activated``: False when ``version`` was already active.
    ``previous_version``: the version that was active before (``None`` when none was)."""

    name: str
    version: int
    activated: bool
    definition_id: str
    previous_version: int | None


@dataclass(frozen=True)
class VersionInfo:
    """One row of :func:`list_versions`. ``stage_count`` is ``None`` for a (pre-0007) row whose
    ``stages`` is not an array; ``unfinished`` counts executions whose status is not final."""

    version: int
    active: bool
    created_at: datetime
    description: str | None
    stage_count: int | None
    unfinished: int


# ---------------------------------------------------------------------------------------------
def strict_json(text: str, *, exact_numbers: bool = False) -> Any:
    """``json.loads`` by JSON's rules: NaN and Infinity are refused. ``exact_numbers`` (definition
    files): a number a double cannot hold (``1e400``, ``1e-400``, which the database's DAG
    validator refuses with ``NOT_A_DOUBLE``) is read as a
    :class:`~lifecycle_dagster.core.payload.OutOfRange` (an infinite float that prints as
    written), so Python's validator refuses it with the database's reason instead of reading 0.

    Raises:
        ValueError: not JSON. RecursionError: nested too deeply to decode.
    """

    def refuse(constant: str) -> None:
        raise ValueError(f"{constant} is not JSON")

    return json.loads(text, parse_constant=refuse, parse_float=json_float if exact_numbers else float)


def read_definition_file(path: Path) -> DefinitionFile:
    """Read a definition file: JSON (by JSON's rules, when the name ends in ``.json`` or the text
    starts with ``{`` or ``[``) or YAML, shaped like a definition row: ``name``, ``description``
    and the DAG's keys (``stages``, ``edges``, ``defaults``, ``on_failure``) at top level, or the
    DAG under ``dag_schema``. Nothing is validated here but the syntax.

    Raises:
        DefinitionFileError: unreadable, or not valid JSON or YAML (the message names the file).
    """
    import yaml

    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DefinitionFileError(f"{path}: cannot read it: {exc}") from exc
    try:
        # JSON by JSON's own rules (1e3 is a number, NaN is not JSON); YAML for the rest
        doc = (
            strict_json(text, exact_numbers=True)
            if path.suffix.lower() == ".json" or text.lstrip().startswith(("{", "["))
            else yaml.safe_load(text)
        )
    except RecursionError as exc:
        raise DefinitionFileError(f"{path}: nested too deeply to read (objects and arrays, too many levels)") from exc
    except (ValueError, yaml.YAMLError) as exc:
        raise DefinitionFileError(f"{path}: not valid JSON or YAML: {exc}") from exc
    if not isinstance(doc, dict):
        return DefinitionFile(path, None, None, doc)
    dag = doc.get("dag_schema", doc)
    if isinstance(dag, dict):
        dag = {k: v for k, v in dag.items() if k not in ("name", "description")}
    return DefinitionFile(path, doc.get("name"), doc.get("description"), dag)


def _name_problem(name: object) -> str | None:
    """Why ``name`` cannot name a published workflow (the database's rule), or None."""
    if not isinstance(name, str) or not name:
        return "a definition file to publish needs a 'name' (a string)"
    if not (_NAME_RE.fullmatch(name) and "__" not in name and not name.endswith("_")):
        return (
            f"invalid workflow name {quote(name)}: it must match {WORKFLOW_NAME_PATTERN}, without __ and not"
            " ending in _"
        )
    return None


def _description_problem(description: object) -> str | None:
    return None if description is None or isinstance(description, str) else "'description' must be a string"


def _storage_problem(found: DefinitionFile) -> str | None:
    """Why Postgres cannot store the file's content, or None (core.payload.check_output)."""
    return check_output({"name": found.name, "description": found.description, "dag": found.dag}, what="the definition")


def file_problems(found: DefinitionFile) -> list[str]:
    """What publishing (here or in the database) refuses in a definition file besides its DAG's
    problems (:func:`~lifecycle_dagster.core.dag.validate_dag` lists those), in this order: no
    ``name`` string, or one the database refuses; a ``description`` that is not a string; content
    Postgres cannot store (a NUL character or a lone surrogate anywhere, the top-level description
    included, values that are not JSON, nesting deeper than 100 levels) or over the size limit.
    Each a sentence; ``[]`` when there is nothing. ``validate`` prints them all, ``publish`` stops
    at the first."""
    found_problems = (_name_problem(found.name), _description_problem(found.description), _storage_problem(found))
    return [p for p in found_problems if p]


def checked_for_publishing(found: DefinitionFile) -> tuple[str, str | None, dict[str, Any], Dag]:
    """``(name, description, dag_schema, parsed DAG)`` of a file about to be published.

    Raises:
        DefinitionFileError: a problem of :func:`file_problems` (the first), naming the file: a
            name or description problem before the DAG is validated, a storage problem after.
        DagValidationError: the DAG is invalid (every problem listed).
    """
    early = _name_problem(found.name) or _description_problem(found.description)
    if early:
        raise DefinitionFileError(f"{found.path}: {early}")
    dag = parse_dag(found.dag)
    stored = _storage_problem(found)
    if stored:
        raise DefinitionFileError(f"{found.path}: {stored}")
    return cast(str, found.name), cast(str | None, found.description), cast(dict[str, Any], found.dag), dag


# ---------------------------------------------------------------------------------------------
def _refusal(exc: psycopg.Error) -> str:
    if isinstance(exc, (psycopg.errors.UndefinedFunction, psycopg.errors.InvalidSchemaName)):
        return "this database has no versioned publishing yet: run `lifecycle-dagster db upgrade` first"
    diag = getattr(exc, "diag", None)
    return (diag.message_primary if diag is not None else None) or str(exc).strip()


def publish(
    conn: Connection,
    name: str,
    description: str | None,
    dag_schema: Mapping[str, Any],
    *,
    activate: bool = False,
    created_by: str | None = None,
) -> PublishResult:
    """Publish ``dag_schema`` as the next version of workflow ``name`` (SQL:
    ``lifecycle.definition_publish``): validated; nothing stored when it and ``description`` equal
    the latest version's; with ``activate`` the version becomes the only active one (an identical
    latest version that is inactive is activated). One transaction: the connection's own when it
    is in autocommit mode (:func:`~lifecycle_dagster.store.db.connect`'s default), else the caller's.

    Raises:
        DagValidationError: the DAG is invalid (checked before the database is asked).
        PublishError: the database refused (an invalid name, say), its message naming what, or it
            is not migrated.
    """
    parse_dag(dict(dag_schema))
    try:
        row = conn.execute(
            query("publish_definition"),
            {
                "name": name,
                "description": description,
                "dag": Jsonb(dict(dag_schema)),
                "activate": activate,
                "created_by": created_by,
            },
        ).fetchone()
    except (
        psycopg.errors.CheckViolation,
        psycopg.errors.InvalidTransactionState,
        psycopg.errors.UndefinedFunction,
        psycopg.errors.InvalidSchemaName,
    ) as exc:
        raise PublishError(_refusal(exc)) from exc
    if row is None:
        raise PublishError(f"publishing {name} returned no row (run doctor: is the schema the shipped one?)")
    return PublishResult(
        name=name,
        version=int(row["version"]),
        created=bool(row["created"]),
        active=bool(row["active"]),
        activated=bool(row["activated"]),
        definition_id=str(row["definition_id"]),
        previous_version=row["previous_version"],
    )


def activate(conn: Connection, name: str, version: int) -> ActivationResult:
    """Make ``version`` the active version of ``name`` and deactivate the others, in one
    transaction (SQL: ``lifecycle.definition_activate``); already active: nothing changes.

    Raises:
        PublishError: no workflow ``name``, or it has no ``version`` (the message lists its
            versions), or the database is not migrated.
    """
    try:
        row = conn.execute(query("activate_definition"), {"name": name, "version": version}).fetchone()
    except (psycopg.errors.NoDataFound, psycopg.errors.UndefinedFunction, psycopg.errors.InvalidSchemaName) as exc:
        raise PublishError(_refusal(exc)) from exc
    if row is None:
        raise PublishError(f"activating {name} v{version} returned no row (run doctor)")
    return ActivationResult(
        name=name,
        version=int(row["version"]),
        activated=bool(row["activated"]),
        definition_id=str(row["definition_id"]),
        previous_version=row["previous_version"],
    )


def list_versions(conn: Connection, name: str) -> list[VersionInfo]:
    """Every version of workflow ``name``, oldest first (empty when there is no such workflow)."""
    return [
        VersionInfo(
            version=int(r["version"]),
            active=bool(r["active"]),
            created_at=r["created_at"],
            description=r["description"],
            stage_count=r["stage_count"],
            unfinished=int(r["unfinished"]),
        )
        for r in conn.execute(query("definition_versions"), {"name": name}).fetchall()
    ]


# ---------------------------------------------------------------------------------------------
def isolated_stages(dag: Dag) -> tuple[str, ...]:
    """Stages connected to nothing (no edge in or out) in a DAG of 2+ stages, in declaration order.
    Valid (the runbook's v2 adds one), but often a forgotten edge."""
    if len(dag.stages) < 2:
        return ()
    linked = {end for edge in dag.edges for end in edge}
    return tuple(s.id for s in dag.stages if s.id not in linked)


def unserved_capabilities(conn: Connection, dag: Dag) -> tuple[str, ...]:
    """The stage capabilities no active agent serves (by its latest orchestration ontology), in
    declaration order: such a stage fails with ``no_agent`` until an agent is registered. Approval
    stages call no agent: they have no capability."""
    wanted = list(dict.fromkeys(s.capability for s in dag.stages if s.kind == "agent"))
    rows = conn.execute(query("served_capabilities"), {"capabilities": wanted}).fetchall()
    served = {r["capability"] for r in rows}
    return tuple(c for c in wanted if c not in served)


def dag_warnings(dag: Dag) -> list[str]:
    """Warnings about a valid DAG that need no database: each stage connected to nothing."""
    return [
        f"stage '{sid}' is connected to nothing (no edge in or out): it runs on its own, in parallel with the rest"
        for sid in isolated_stages(dag)
    ]


__all__ = [
    "FINAL_STATUSES",
    "ActivationResult",
    "DagValidationError",
    "DefinitionFile",
    "DefinitionFileError",
    "PublishError",
    "PublishResult",
    "VersionInfo",
    "activate",
    "checked_for_publishing",
    "dag_warnings",
    "file_problems",
    "isolated_stages",
    "list_versions",
    "publish",
    "read_definition_file",
    "strict_json",
    "unserved_capabilities",
]
