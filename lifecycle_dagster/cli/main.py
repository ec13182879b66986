"""The ``lifecycle-dagster`` command line.

Database: ``DATABASE_URL`` or the embedded server (see :mod:`lifecycle_dagster.settings`).
Exit codes: 0 success; 1 the work failed (an execution that did not complete, an invalid DAG);
2 usage errors (click's own).
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import click

from lifecycle_dagster.cli.common import EXIT_WAITING, dagster_home, execute_here, main, print_execution
from lifecycle_dagster.cli.common import dsn as _dsn
from lifecycle_dagster.cli.next_steps import print_summary
from lifecycle_dagster.cli.output import (
    BackgroundProgress,
    is_idle_tick_line,
    progress_view,
    read_progress,
)
from lifecycle_dagster.settings import Settings
from lifecycle_dagster.store import migrate, transitions
from lifecycle_dagster.store.db import connect
from lifecycle_dagster.store.fetch import fetch_one
from lifecycle_dagster.store.sqlfiles import query, seed_sql


def _upgrade_and_seed(dsn: str) -> None:
    try:
        migrate.upgrade(dsn)
    except migrate.MigrationError as exc:
        raise click.ClickException(str(exc)) from exc
    with connect(dsn) as conn:
        conn.execute(seed_sql())


# --------------------------------------------------------------------------------------------
@main.group()
def db() -> None:
    """The orchestration database: migrations, seed, the embedded server."""


@db.command("upgrade")
@click.option("--check", is_flag=True, help="Show the plan (migrations, adoption, rejects, repairs); change nothing.")
@click.option("--repair", is_flag=True, help="First put back the shipped definitions of drifted objects (see doctor).")
@click.option("--json", "as_json", is_flag=True, help="One JSON document instead of lines.")
def db_upgrade(check: bool, repair: bool, as_json: bool) -> None:
    """Apply pending migrations (safe to re-run and to run concurrently), in one transaction.

    On a database that already holds the runbook's tables (a Supabase project), the first upgrade
    adopts them: the originals move to the schema lifecycle_adopted, untouched; their rows are
    copied into the new tables; a row that breaks a rule is reported (table, id, rule) and kept
    in lifecycle.adoption_rejects instead of failing the upgrade."""
    try:
        report = migrate.run_upgrade(_dsn(), check=check, repair=repair)
    except migrate.MigrationError as exc:
        raise click.ClickException(str(exc)) from exc
    if as_json:
        click.echo(json.dumps(_upgrade_document(report), ensure_ascii=False))
    else:
        _echo_upgrade(report, check=check, repair=repair)


def _upgrade_document(report: migrate.UpgradeReport) -> dict[str, Any]:
    """``db upgrade --json``'s document of an upgrade report (:func:`migrate.run_upgrade`)."""
    return {
        "check": report.check,
        "applied": [f"{m.version:04d}_{m.name}" for m in report.applied],
        "repaired": [{"kind": k, "object": o, "action": a} for k, o, a in report.repaired],
        "adopted": {t: {"copied": c, "rejected": r} for t, (c, r) in report.adopted.items()},
        "rejects": [vars(r) for r in report.rejects],
        "columns_not_carried": [{"table": t, "column": c} for t, c in report.columns_not_carried],
        "schema_applied": report.schema_applied,
        "schema_changed": report.schema_changed,
        "drift": [{"kind": k, "object": o, "problem": p} for k, o, p in report.drift],
    }


def _echo_upgrade(report: migrate.UpgradeReport, *, check: bool, repair: bool) -> None:
    """``db upgrade``'s lines: what was (or, with --check, would be) repaired, adopted, applied, copied."""
    would = "would " if check else ""
    if check:
        click.echo("plan (--check: nothing is changed)")
    for kind, obj, action in report.repaired:
        click.echo(f"{would}repair {kind} {obj}: {action}")
    if report.adopted:
        click.echo(
            f"{would}adopt the existing tables {', '.join(report.adopted)} "
            "(the originals move to the schema lifecycle_adopted, unchanged)"
        )
    for m in report.applied:
        click.echo(f"{would}apply {m.version:04d}_{m.name}" if check else f"applied {m.version:04d}_{m.name}")
    if report.schema_applied:
        changed = report.schema_changed
        what = "all new" if len(changed) == len(report.schema_applied) else f"changed: {', '.join(changed) or 'none'}"
        verb = "would apply" if check else "applied"
        click.echo(f"{verb} sql/schema/ ({len(report.schema_applied)} files; {what})")
    for table, (copied, rejected) in report.adopted.items():
        click.echo(f"{would}copy {table}: {copied} row{'s' if copied != 1 else ''}, {rejected} rejected")
    _echo_rejects(report, check=check)
    if not (report.applied or report.repaired or report.adopted or report.schema_applied):
        click.echo("database is up to date")
    if report.drift and not (repair or report.schema_applied):
        n = len(report.drift)
        click.echo(
            f"but {n} object{'s' if n != 1 else ''} of ours differ{'s' if n == 1 else ''} from the shipped schema: "
            "`lifecycle-dagster doctor` lists them, `lifecycle-dagster db upgrade --repair` restores them"
        )


def _echo_rejects(report: migrate.UpgradeReport, *, check: bool) -> None:
    """The adopted rows not copied, and the adopted columns not carried over."""
    for r in report.rejects:
        click.echo(f"REJECTED {r.table} id={r.row_id} rule={r.rule}: {r.message}")
    if report.rejects:
        click.echo(
            f"{len(report.rejects)} row{'s' if len(report.rejects) != 1 else ''} not copied: "
            f"{'would be ' if check else ''}kept in lifecycle_adopted and listed in lifecycle.adoption_rejects"
        )
    for table, column in report.columns_not_carried:
        click.echo(f"column {table}.{column} is not ours: its values stay in lifecycle_adopted.{table}")


@db.command("seed")
def db_seed() -> None:
    """Install the runbook's lifecycle_v1, its agents and their capabilities where absent."""
    dsn = _dsn()
    _upgrade_and_seed(dsn)
    click.echo("seeded (only what was absent)")


@db.command("start")
def db_start() -> None:
    """Start the embedded server and keep it running after every command using it has exited,
    until `db stop`; print its URL."""
    settings = Settings.from_env()
    if not settings.embedded:
        raise click.ClickException("DATABASE_URL is set: there is no embedded server to start")
    from lifecycle_dagster.store.embedded import ensure_server

    click.echo(ensure_server(settings.pgdata, keep_running=True))


@db.command("stop")
def db_stop() -> None:
    """Stop the embedded server (and undo `db start`), whichever commands still use it."""
    from lifecycle_dagster.store.embedded import stop_server

    stopped = stop_server(Settings.from_env().pgdata)
    click.echo("stopped" if stopped else "not running")


@db.command("url")
def db_url() -> None:
    """Print the database URL in use (starting the embedded server for this command only)."""
    click.echo(_dsn())
    if not os.environ.get("DATABASE_URL"):
        click.echo(
            "note: the embedded server stops when this command exits unless `lifecycle-dagster db start` keeps it up",
            err=True,
        )


# --------------------------------------------------------------------------------------------
@main.command("home")
def home_cmd() -> None:
    """Prepare DAGSTER_HOME (dagster.yaml with Postgres storage) and print its path."""

    dsn = _dsn()
    settings = Settings.from_env()
    click.echo(str(dagster_home(settings, dsn)))


#: the --context option of run and start
_context_option = click.option(
    "--context",
    "context_file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    required=True,
    help="JSON file holding the execution context (a JSON object).",
)


@main.command("run")
@click.argument("workflow")
@_context_option
def run_cmd(workflow: str, context_file: Path) -> None:
    """Run the active version of WORKFLOW end to end in this process (no daemon needed).

    Prints the execution id, each stage's status and output summary, and the final status.
    Exits 0 when the execution completed, 3 when it waits for a decision on an approval stage
    (``decide``, then ``resume``), 1 otherwise.
    """
    context = _read_context(context_file)

    settings = Settings.from_env()
    dsn = _dsn()
    _upgrade_and_seed(dsn)
    from lifecycle_dagster.core.dag import DagValidationError
    from lifecycle_dagster.location.job_factory import EXECUTION_ID_TAG, build_job

    with connect(dsn) as conn:
        row = conn.execute(query("active_definition_by_name"), {"name": workflow}).fetchone()
        if row is None:
            raise click.ClickException(f"no active version of workflow '{workflow}'")
        try:
            job = build_job(row)
        except (DagValidationError, ValueError) as exc:
            raise click.ClickException(f"{workflow} v{row['version']}: {exc}") from exc
        run_id = str(uuid.uuid4())  # bound at insert: a running daemon's launch sensor never launches it too
        execution_id = transitions.execution_create(
            conn, definition_id=row["id"], context=context, created_by=None, run_id=run_id
        )
    click.echo(f"execution {execution_id}  ({workflow} v{row['version']}, job {job.name})")

    os.environ.setdefault("DAGSTER_HOME", str(dagster_home(settings, dsn)))
    started = time.monotonic()
    with BackgroundProgress(dsn, execution_id):  # the stages' progress on stderr
        result = execute_here(dsn, job, {EXECUTION_ID_TAG: execution_id}, run_id=run_id)
    status = print_execution(dsn, execution_id)
    click.echo(f"dagster run {result.run_id}: {'success' if result.success else 'failure'}")
    if not result.success and status == "in_progress":  # the engine could not record why: show Dagster's
        for event in result.all_events:
            if event.event_type_value == "STEP_FAILURE" and event.step_failure_data.error:
                click.echo(f"  {event.step_key}: {event.step_failure_data.error.message.strip()[:500]}", err=True)
    print_summary(dsn, execution_id, time.monotonic() - started)
    sys.exit(0 if status == "completed" else EXIT_WAITING if status == "waiting" else 1)


@main.command("start")
@click.argument("workflow")
@_context_option
@click.option("--wait", is_flag=True, help="Follow the execution until it ends, with a progress bar.")
@click.option("--timeout", "timeout_s", default=600.0, show_default=True, help="Seconds to wait with --wait.")
def start_cmd(workflow: str, context_file: Path, wait: bool, timeout_s: float) -> None:
    """Start WORKFLOW by inserting a pending execution; the daemon's launch sensor runs it
    (`lifecycle-dagster run` executes in this process instead; both leave the same rows).
    Prints the execution id. With --wait, exits 0 only when it completed.
    """
    context = _read_context(context_file)
    dsn = _dsn()
    with connect(dsn) as conn:
        row = conn.execute(query("active_definition_by_name"), {"name": workflow}).fetchone()
        if row is None:
            raise click.ClickException(f"no active version of workflow '{workflow}'")
        execution_id = transitions.execution_create(conn, definition_id=row["id"], context=context, created_by=None)
    click.echo(execution_id)
    if not wait:
        return
    started = time.monotonic()
    _follow(dsn, execution_id, timeout_s)
    status = print_execution(dsn, execution_id)
    print_summary(dsn, execution_id, time.monotonic() - started)
    sys.exit(0 if status == "completed" else 1)


def _follow(dsn: str, execution_id: str, timeout_s: float) -> None:
    """Show the execution's progress per stage on stderr (a live table on a terminal, else a line
    per change: :func:`progress_view`) until its status leaves pending, in_progress and compensating.

    Raises:
        click.ClickException: still going after ``timeout_s`` seconds.
    """
    started = time.monotonic()
    hinted = False
    view = progress_view()
    try:
        with connect(dsn) as conn:
            while True:
                p, stages = read_progress(conn, execution_id)
                if p is None:
                    raise click.ClickException(f"no execution {execution_id}")
                view.update(p, stages)
                if p["status"] not in ("pending", "in_progress", "compensating"):
                    return
                waited = time.monotonic() - started
                if waited > timeout_s:
                    raise click.ClickException(f"still {p['status']} after {timeout_s:g} s")
                if not hinted and p["status"] == "pending" and waited > 30:
                    view.note("still pending after 30 s: is dagster-daemon running? (lifecycle-dagster dev starts one)")
                    hinted = True
                time.sleep(0.5)
    finally:
        view.close()


def _read_context(path: Path) -> dict[str, Any]:
    """The execution context in ``path``: a JSON object Postgres can store."""
    from lifecycle_dagster.core.payload import check_output
    from lifecycle_dagster.store.versions import strict_json

    try:
        context = strict_json(path.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as exc:
        raise click.ClickException(f"{path}: not valid JSON: {exc}") from exc
    if not isinstance(context, dict):
        raise click.ClickException(f"{path}: the context must be a JSON object")
    problem = check_output(context, what="the context")
    if problem:
        raise click.ClickException(f"{path}: {problem}")
    return context


@main.command("cancel")
@click.argument("execution_id")
@click.option("--reason", default="cancelled by operator", show_default=True, help="Recorded with the event.")
@click.option("--no-compensate", is_flag=True, help="Leave the completed stages as they are (no compensation).")
def cancel_cmd(execution_id: str, reason: str, no_compensate: bool) -> None:
    """Cancel an execution: no stage starts or completes after this, and its Dagster run is
    terminated where the instance can (runs launched through it; runs of `run` or `dagster job
    execute` stop at their next check). Says which side won; exits 1 when the execution had
    already finished.
    """
    import psycopg

    dsn = _dsn()
    try:
        with connect(dsn) as conn:
            row = transitions.execution_cancel(
                conn, execution_id=execution_id, reason=reason, compensate=not no_compensate
            )
    except (psycopg.errors.NoDataFound, psycopg.errors.InvalidTextRepresentation) as exc:
        raise click.ClickException(exc.diag.message_primary or str(exc)) from exc
    if not row.cancelled:
        click.echo(f"not cancelled: execution {execution_id} is already {row.status}")
        sys.exit(1)
    click.echo(f"cancelled execution {execution_id} (was {row.previous_status})")
    if not no_compensate:
        click.echo(
            "its completed stages are undone by the reconciler (dagster-daemon) or by: "
            f"lifecycle-dagster compensate {execution_id}"
        )
    run_id = row.dagster_run_id
    if run_id:
        click.echo(f"dagster run {run_id}: {_terminate_run(run_id)}")


def _terminate_run(run_id: str) -> str:
    """Ask the Dagster instance to cancel or terminate a run; say what happened."""
    from dagster import DagsterInstance

    settings = Settings.from_env()
    if not (settings.dagster_home / "dagster.yaml").exists():
        return "no Dagster home here; its stage ops stop at their next check"
    instance = DagsterInstance.from_config(str(settings.dagster_home))
    try:
        run = instance.get_run_by_id(run_id)
        if run is None:
            return "not in this Dagster instance; its stage ops stop at their next check"
        if run.is_finished:
            return f"already {run.status.value}"
        try:
            done = instance.run_coordinator.cancel_run(run_id)
        except Exception as exc:  # the launcher cannot reach the run (launched elsewhere)
            return f"could not be terminated ({type(exc).__name__}: {exc}); its stage ops stop at their next check"
        return "termination requested" if done else "could not be terminated; its stage ops stop at their next check"
    finally:
        instance.dispose()


@main.command("compensate")
@click.argument("execution_id")
@click.option("--reason", default="compensation requested by operator", show_default=True)
@click.option("--no-wait", is_flag=True, help="Only start compensation; the daemon's reconciler runs it.")
def compensate_cmd(execution_id: str, reason: str, no_wait: bool) -> None:
    """Compensate a failed or cancelled execution (lifecycle.compensation_start, which the runbook's
    perform_workflow_compensation wraps), then run its compensation job in this process: completed
    stages are undone in reverse order. Exits 0 when the execution ends rolled_back.
    """

    from lifecycle_dagster.location.job_factory import EXECUTION_ID_TAG, build_compensation_job

    dsn = _dsn()
    with connect(dsn) as conn:
        transitions.compensation_start(conn, execution_id=execution_id, reason=reason)
        execution = fetch_one(conn, "execution", {"execution_id": execution_id})
        row = fetch_one(conn, "definition_of_execution", {"execution_id": execution_id})
    if execution["status"] == "compensating" and not no_wait:
        result = execute_here(dsn, build_compensation_job(row), {EXECUTION_ID_TAG: execution_id})
        click.echo(f"dagster run {result.run_id}: {'success' if result.success else 'failure'}")
    status = print_execution(dsn, execution_id)
    sys.exit(0 if status == "rolled_back" or (no_wait and status == "compensating") else 1)


@main.command("dev", context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.pass_context
def dev_cmd(ctx: click.Context) -> None:
    """Run `dg dev` (workspace.yaml, else the module lifecycle_dagster) on this database and
    Dagster home; extra arguments are passed on. The embedded server stays up while it runs. Its
    log leaves out the daemon's lines of sensor ticks that neither launched a run nor failed.
    Ctrl-C or SIGTERM stops everything it started within about 2 s.
    """

    dsn = _dsn()
    _upgrade_and_seed(dsn)
    home = dagster_home(Settings.from_env(), dsn)
    target = ["-w", "workspace.yaml"] if Path("workspace.yaml").exists() else ["-m", "lifecycle_dagster"]
    # unbuffered: its output reaches us through a pipe (for the log filter) line by line
    env = {**os.environ, "DATABASE_URL": dsn, "DAGSTER_HOME": str(home), "PYTHONUNBUFFERED": "1"}
    args = [sys.executable, "-m", "dagster_dg_cli.cli", "dev", *target, *ctx.args]
    # the embedded server this process may stop at exit: its shutdown checkpoint is written while
    # dev's processes stop, so that stopping the server afterwards is quick
    on_stop = (lambda: _checkpoint(dsn)) if Settings.from_env().embedded else None
    sys.exit(_run_process_group(args, env, drop_line=is_idle_tick_line, on_stop=on_stop))


def _checkpoint(dsn: str) -> None:
    """Ask the server of ``dsn`` for a checkpoint (superuser only; anything failing is ignored)."""
    import psycopg

    with contextlib.suppress(psycopg.Error), psycopg.connect(dsn, autocommit=True, connect_timeout=2) as conn:
        conn.execute("CHECKPOINT")


#: how long `dev`'s processes get to stop on their own after SIGINT before the rest is killed
DEV_STOP_GRACE_S = 0.5


def _run_process_group(
    args: list[str],
    env: dict[str, str],
    grace_s: float = DEV_STOP_GRACE_S,
    drop_line: Callable[[str], bool] | None = None,
    on_stop: Callable[[], None] | None = None,
) -> int:
    """Run ``args`` in its own process group and return its exit status (0 after a stop). SIGINT or SIGTERM to us
    is passed on as SIGINT to the whole group, as a terminal's Ctrl-C is: `dg dev` (which, as
    `dagster dev` does, maps SIGTERM to SIGINT itself), its webserver, daemon and code servers each start their own
    shutdown at once instead of one after the other. Whatever of the group is still there
    ``grace_s`` seconds later is killed (a code server otherwise waits for the runs it started;
    a run worker killed so is caught by the execution heartbeat and resumed). This process then
    returns normally and releases the embedded server it holds.

    ``drop_line``: when given, the group's output (stdout and stderr) is copied to our stderr line
    by line, leaving out the lines it returns True for. ``on_stop``: called in a thread when a stop
    is asked for, while the group stops."""
    import signal
    import threading

    pipe = subprocess.PIPE if drop_line is not None else None
    proc = subprocess.Popen(
        args, env=env, start_new_session=True, stdout=pipe, stderr=subprocess.STDOUT if pipe else None
    )
    copier = None
    if drop_line is not None and proc.stdout is not None:
        copier = threading.Thread(target=_copy_lines, args=(proc.stdout, drop_line), name="dev-log", daemon=True)
        copier.start()
    stopping = threading.Event()

    def stop(signum: int, _frame: object) -> None:
        if not stopping.is_set():
            stopping.set()
            _signal_group(proc.pid, signal.SIGINT)
            if on_stop is not None:
                threading.Thread(target=on_stop, name="dev-stop", daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    while True:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=0.05)
        if stopping.wait(0) or proc.returncode is not None:
            break
    deadline = time.monotonic() + grace_s
    while _signal_group(proc.pid, 0) and time.monotonic() < deadline:  # the group, not only dg dev
        time.sleep(0.05)
    _signal_group(proc.pid, signal.SIGKILL)
    code = proc.wait()
    if copier is not None:
        copier.join(timeout=0.5)
    return 0 if stopping.is_set() else code  # a stop asked for is not a failure


def _signal_group(group: int, sig: int) -> bool:
    """Send ``sig`` to the process group ``group``; False when none of it is left."""
    try:
        os.killpg(group, sig)
    except ProcessLookupError:
        return False
    return True


def _copy_lines(source: IO[bytes], drop_line: Callable[[str], bool]) -> None:
    """Copy ``source`` to our stderr line by line until its end, leaving out the lines
    ``drop_line`` returns True for (decoded as UTF-8, bad bytes replaced)."""
    out = sys.stderr.buffer
    for line in iter(source.readline, b""):
        if drop_line(line.decode("utf-8", "replace")):
            continue
        with contextlib.suppress(OSError, ValueError):  # our stderr closed: keep draining the pipe
            out.write(line)
            out.flush()


# the other command groups register their commands on ``main`` when imported
from lifecycle_dagster.cli import agent as _cli_agent  # noqa: E402,F401
from lifecycle_dagster.cli import approvals as _cli_approvals  # noqa: E402,F401
from lifecycle_dagster.cli import audit as _cli_audit  # noqa: E402,F401
from lifecycle_dagster.cli import metrics as _cli_metrics  # noqa: E402,F401
from lifecycle_dagster.cli import ops as _cli_ops  # noqa: E402,F401
from lifecycle_dagster.cli import retention as _cli_retention  # noqa: E402,F401
from lifecycle_dagster.cli import versions as _cli_versions  # noqa: E402,F401
