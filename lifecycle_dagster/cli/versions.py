"""``lifecycle-dagster validate | publish | activate | versions``: versioned publishing.

Registered on :data:`lifecycle_dagster.cli.main.main` (cli.py imports this module last). Exit codes as
in :mod:`lifecycle_dagster.cli.main`: 0 success (warnings included, and "identical: nothing
published"); 1 an invalid DAG or file, a refusal by the database, an unknown workflow or version;
2 usage errors.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from lifecycle_dagster.cli.common import dsn as _dsn
from lifecycle_dagster.cli.common import main
from lifecycle_dagster.cli.output import print_table
from lifecycle_dagster.core.dag import Dag, DagValidationError, parse_dag
from lifecycle_dagster.location.reload import reload_code_location, reload_hint, webserver_url
from lifecycle_dagster.settings import Settings
from lifecycle_dagster.store.db import connect
from lifecycle_dagster.store.sqlfiles import query
from lifecycle_dagster.store.versions import (
    DefinitionFileError,
    PublishError,
    activate,
    checked_for_publishing,
    dag_warnings,
    file_problems,
    list_versions,
    publish,
    read_definition_file,
    unserved_capabilities,
)


def _warn(text: str) -> None:
    click.echo(f"warning: {text}", err=True)


def _reachable_dsn() -> tuple[str | None, str]:
    """``(dsn, "")`` of a database to look agents up in, or ``(None, why not)``: DATABASE_URL when
    set, else the embedded server only when it is already running (``validate`` never starts it)."""
    settings = Settings.from_env()
    if settings.database_url:
        return settings.database_url, ""
    from lifecycle_dagster.store.embedded import server_running

    if not server_running(settings.pgdata):
        return None, "no DATABASE_URL and the embedded server is not running (lifecycle-dagster db start)"
    return _dsn(), ""


def _capability_warnings(dag: Dag, label: str) -> None:
    """Warn about each capability no active agent serves, when a database can be reached."""
    import psycopg

    dsn, why = _reachable_dsn()
    if dsn is None:
        click.echo(f"{label}: note: agents not checked: {why} (--offline skips this check)", err=True)
        return
    try:
        with connect(dsn, connect_timeout=5) as conn:
            missing = unserved_capabilities(conn, dag)
    except (psycopg.Error, OSError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        click.echo(f"{label}: note: agents not checked: {first} (--offline skips this check)", err=True)
        return
    _warn_unserved(dag, missing, label)


def _warn_unserved(dag: Dag, missing: tuple[str, ...], label: str) -> None:
    for capability in missing:
        stages = ", ".join(f"'{s.id}'" for s in dag.stages if s.kind == "agent" and s.capability == capability)
        _warn(f"{label}: capability '{capability}' (stage {stages}) is served by no active agent (no_agent)")


def _reload() -> None:
    """After a change of the active version: have a running webserver reload, or say how to."""
    url = webserver_url()
    if url is None:
        click.echo(reload_hint())
        return
    outcome = reload_code_location(url)
    if outcome.ok:
        click.echo(outcome.message)
    else:
        _warn(outcome.message)


def _validate_file(file: Path, offline: bool) -> bool:
    """Print what ``publish`` and the database would refuse in ``file`` (every DAG problem, then
    every other problem: name, description, content Postgres cannot store, size), or that it is
    valid and its warnings. True when valid."""
    try:
        found = read_definition_file(file)
    except DefinitionFileError as exc:
        raise click.ClickException(str(exc)) from exc
    others = file_problems(found)
    try:
        parsed = parse_dag(found.dag)
    except DagValidationError as exc:
        click.echo(f"{file}: {exc}")
        parsed = None
    for problem in others:
        click.echo(f"{file}: {problem}")
    if parsed is None or others:
        return False
    click.echo(f"{file}: valid ({len(parsed.stages)} stages: {' -> '.join(parsed.topological_order())})")
    if parsed.schedule is not None:
        from lifecycle_dagster.location.schedules import describe

        click.echo(f"{file}: {describe(parsed.schedule)}")
    for warning in dag_warnings(parsed):
        _warn(f"{file}: {warning}")
    if not offline:
        _capability_warnings(parsed, str(file))
    return True


# --------------------------------------------------------------------------------------------
@main.command("validate")
@click.argument("file", required=False, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--all",
    "check_all",
    is_flag=True,
    help="Validate every definition the code location loads (active versions, and versions that "
    "unfinished executions run on).",
)
@click.option("--offline", is_flag=True, help="Do not look agents up in the database.")
def validate_cmd(file: Path | None, check_all: bool, offline: bool) -> None:
    """Validate a definition FILE (JSON or YAML: name, description, stages, edges) by every rule
    `publish` and the database apply (the DAG, the name, the description, content Postgres cannot
    store, the size limit) or, with --all, every definition the code location loads (a row it would
    skip is listed with why). Exits 1 when any is invalid.

    A valid FILE is also checked for warnings (exit 0): a stage connected to nothing, and, when a
    database is reachable (DATABASE_URL, or the embedded server already running) and --offline is
    not given, a capability that no active agent serves.
    """
    from lifecycle_dagster.location.executors import ExecutorSettingError
    from lifecycle_dagster.location.job_factory import build_jobs
    from lifecycle_dagster.location.resources import AgentsSettingError

    if file is None and not check_all:
        raise click.UsageError("give a FILE or --all")
    bad = 0
    if file is not None and not _validate_file(file, offline):
        bad += 1
    if check_all:
        with connect(_dsn()) as conn:
            rows = conn.execute(query("active_definitions")).fetchall()
        try:
            jobs, skipped = build_jobs(rows)
        except (AgentsSettingError, ExecutorSettingError) as exc:
            raise click.ClickException(f"the code location cannot load: {exc}") from exc
        for j in jobs:
            click.echo(f"{j.name}: valid")
        for s in skipped:
            click.echo(f"{s.name} v{s.version}: SKIPPED by the code location: {s.error}")
        bad += len(skipped)
    sys.exit(1 if bad else 0)


@main.command("publish")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--activate", "make_active", is_flag=True, help="Make it the active version (the previous one is deactivated)."
)
def publish_cmd(file: Path, make_active: bool) -> None:
    """Publish FILE (JSON or YAML: name, description, stages, edges, defaults, on_failure, context) as the
    next version of its workflow. Validated first (every problem listed; exit 1). Content identical
    to the latest version (same DAG and description) publishes nothing (exit 0). With --activate,
    the new version replaces the active one in the same transaction, and a running Dagster
    webserver (LIFECYCLE_DAGSTER_WEBSERVER_URL) is asked to reload the code location.
    """
    try:
        name, description, dag_schema, dag = checked_for_publishing(read_definition_file(file))
    except DefinitionFileError as exc:
        raise click.ClickException(str(exc)) from exc
    except DagValidationError as exc:
        click.echo(f"{file}: {exc}")
        sys.exit(1)
    for warning in dag_warnings(dag):
        _warn(f"{file}: {warning}")
    with connect(_dsn()) as conn:
        try:
            result = publish(conn, name, description, dag_schema, activate=make_active)
        except PublishError as exc:
            raise click.ClickException(str(exc)) from exc
        missing = unserved_capabilities(conn, dag)
    _warn_unserved(dag, missing, str(file))
    if result.created:
        line = f"published {name} v{result.version}"
        if result.activated:
            line += " and activated it"
            if result.previous_version is not None:
                line += f" (v{result.previous_version} deactivated)"
        else:
            line += f" (not active: `lifecycle-dagster activate {name} {result.version}` activates it)"
        click.echo(line)
    else:
        click.echo(f"{name}: identical to version {result.version}: nothing published")
        if result.activated:
            was = f" (v{result.previous_version} deactivated)" if result.previous_version is not None else ""
            click.echo(f"activated {name} v{result.version}{was}")
    if result.activated:
        _reload()


@main.command("activate")
@click.argument("name")
@click.argument("version", type=click.IntRange(min=1))
def activate_cmd(name: str, version: int) -> None:
    """Make VERSION the active version of workflow NAME (the other versions are deactivated, in one
    transaction); a running Dagster webserver (LIFECYCLE_DAGSTER_WEBSERVER_URL) is asked to reload.
    Runs already started keep their version. Exits 1 for an unknown workflow or version.
    """
    with connect(_dsn()) as conn:
        try:
            result = activate(conn, name, version)
        except PublishError as exc:
            raise click.ClickException(str(exc)) from exc
    if not result.activated:
        click.echo(f"{name} v{version} is already the active version: nothing changed")
        return
    was = f" (v{result.previous_version} deactivated)" if result.previous_version is not None else ""
    click.echo(f"activated {name} v{version}{was}")
    _reload()


@main.command("versions")
@click.argument("name")
def versions_cmd(name: str) -> None:
    """List the versions of workflow NAME: version, whether it is active, when it was created, its
    stage count, and how many of its executions are unfinished (not completed, rolled_back or
    compensation_failed: each keeps the version loaded in the code location). Exits 1 for an
    unknown workflow.
    """
    with connect(_dsn()) as conn:
        found = list_versions(conn, name)
    if not found:
        raise click.ClickException(f"no workflow named '{name}'")
    print_table(
        ("version", "active", "created_at", "stages", "unfinished"),
        [
            (
                str(v.version),
                "yes" if v.active else "no",
                v.created_at.isoformat(timespec="seconds"),
                "-" if v.stage_count is None else str(v.stage_count),
                str(v.unfinished),
            )
            for v in found
        ],
        right=(0, 3, 4),
    )
