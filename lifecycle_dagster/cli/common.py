"""What the command groups share: the click group ``main``, reaching the database, the Dagster
home, running a job in this process and printing an execution. Every module of ``cli/`` imports from
here (never from one another), so the command modules form no import cycle; ``cli/main.py``
imports them all to register their commands."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from lifecycle_dagster.settings import Settings
from lifecycle_dagster.store.db import connect, resolve_dsn
from lifecycle_dagster.store.sqlfiles import query

#: `run` and `resume` exit with this when the execution waits for a decision (0: completed, 1: else)
EXIT_WAITING = 3


def dsn() -> str:
    """The database URL: ``DATABASE_URL``, else the embedded server, which this command owns
    (started for it, stopped when it exits unless ``db start`` keeps it up) and hands to the Dagster
    processes it starts through ``DATABASE_URL``.

    Raises:
        click.ClickException: the server could not be reached or started.
    """
    try:
        return resolve_dsn(allow_embedded=True)
    except Exception as exc:  # the server could not be reached or started
        raise click.ClickException(f"cannot reach the database: {exc}") from exc


class _Main(click.Group):
    """Turns database errors into one clear line (exit 1) instead of a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        import psycopg

        try:
            return super().invoke(ctx)
        except psycopg.Error as exc:
            diag = getattr(exc, "diag", None)
            message = (diag.message_primary if diag is not None else None) or str(exc).strip()
            raise click.ClickException(f"database error: {message}") from exc


@click.group(cls=_Main)
def main() -> None:
    """Multi-stage agent workflows kept in Postgres, run as Dagster jobs."""


def dagster_home(settings: Settings, dsn: str) -> Path:
    """Prepare the Dagster home; warn when a home chosen by the user stores Dagster's runs elsewhere."""
    from lifecycle_dagster.location.instance import prepare_home, stores_elsewhere

    home = prepare_home(settings.dagster_home, dsn, managed=settings.dagster_home_managed)
    if stores_elsewhere(home, dsn):
        click.echo(
            f"warning: {home / 'dagster.yaml'} was not written by this tool for this database: Dagster's runs "
            "are stored where it says, not beside DATABASE_URL's workflow rows",
            err=True,
        )
    return home


#: the code location and repository the runs of this command are filed under, as ``workspace.yaml``
#: and ``[tool.dagster]`` name them (Dagster names a ``Definitions`` object's repository
#: ``__repository__``): the UI's job page lists a run by its job name and this repository's label
LOCATION_NAME = "lifecycle_dagster"
REPOSITORY_NAME = "__repository__"
DEFINITIONS_MODULE = "lifecycle_dagster.definitions"


def run_origins(job_name: str) -> tuple[Any, Any]:
    """The ``(remote_job_origin, job_code_origin)`` a run of ``job_name`` launched from the code
    location carries: location ``lifecycle_dagster``, repository ``__repository__``, the module
    ``lifecycle_dagster.definitions`` run by this Python. Built without loading a workspace (no
    code server is started)."""
    from dagster._core.code_pointer import ModuleCodePointer
    from dagster._core.origin import JobPythonOrigin, RepositoryPythonOrigin
    from dagster._core.remote_origin import (
        ManagedGrpcPythonEnvCodeLocationOrigin,
        RemoteJobOrigin,
        RemoteRepositoryOrigin,
    )
    from dagster._core.types.loadable_target_origin import LoadableTargetOrigin

    target = LoadableTargetOrigin(executable_path=sys.executable, module_name=DEFINITIONS_MODULE)
    location = ManagedGrpcPythonEnvCodeLocationOrigin(target, location_name=LOCATION_NAME)
    remote = RemoteJobOrigin(RemoteRepositoryOrigin(location, REPOSITORY_NAME), job_name)
    pointer = ModuleCodePointer(DEFINITIONS_MODULE, "defs", working_directory=None)
    code = JobPythonOrigin(job_name, RepositoryPythonOrigin(sys.executable, pointer, None, None, None))
    return remote, code


def execute_here(dsn: str, job: Any, tags: dict[str, str], run_id: str | None = None) -> Any:
    """Execute the Dagster ``job`` in this process on the Dagster home of ``dsn`` (in-process
    executor, console logging off) with run ``tags`` (and run id ``run_id``, a new one when None);
    return its ``JobExecutionResult`` (``run_id``, ``success``, ``all_events``). A failed run is
    returned, not raised.

    The run is created with the code location's origin (:func:`run_origins`), as a run launched
    from the UI or a sensor is: the job's page in the UI lists it and the location's run failure
    sensor sees it. No daemon and no code server are involved."""
    from dagster import DagsterInstance
    from dagster._core.definitions.job_base import InMemoryJob
    from dagster._core.execution.api import create_execution_plan, execute_run

    instance = DagsterInstance.from_config(str(dagster_home(Settings.from_env(), dsn)))
    try:
        ephemeral = job.as_ephemeral_job(resource_defs={}, input_values={})  # the in-process executor
        in_memory = InMemoryJob(ephemeral)
        run_config = {"loggers": {"console": {"config": {"log_level": "CRITICAL"}}}}
        plan = create_execution_plan(in_memory, run_config=run_config, instance_ref=instance.get_ref())
        remote_origin, code_origin = run_origins(job.name)
        run = instance.create_run_for_job(
            job_def=ephemeral,
            execution_plan=plan,
            run_id=run_id,
            run_config=run_config,
            tags={**job.run_tags, **tags},
            remote_job_origin=remote_origin,
            job_code_origin=code_origin,
        )
        return execute_run(in_memory, run, instance, raise_on_error=False)
    finally:
        instance.dispose()


def print_execution(dsn: str, execution_id: str) -> str:
    """Print each stage's status and output summary; return the execution's status."""
    with connect(dsn) as conn:
        execution = conn.execute(query("execution"), {"execution_id": execution_id}).fetchone()
        logs = conn.execute(query("stage_logs"), {"execution_id": execution_id}).fetchall()
    if execution is None:
        raise click.ClickException(f"no execution {execution_id}")
    for log in logs:
        out: Any = log["output_data"] or {}
        detail = out.get("summary") if isinstance(out, dict) else None
        detail = detail or log["error_message"] or ""
        click.echo(f"  {log['stage_id']:<20} {log['status']:<12} {detail}")
    line = f"status: {execution['status']}"
    if execution["error_message"]:
        line += f"  ({execution['error_message']})"
    click.echo(line)
    return str(execution["status"])
