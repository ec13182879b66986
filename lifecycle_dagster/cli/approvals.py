"""``decide`` and ``resume``: approval stages and continuation runs (docs/branches.md).

Registered on :data:`lifecycle_dagster.cli.common.main` (main.py imports this module)."""

from __future__ import annotations

import getpass
import sys
import time
import uuid

import click
import psycopg

from lifecycle_dagster.cli.common import EXIT_WAITING, execute_here, main, print_execution
from lifecycle_dagster.cli.common import dsn as _dsn
from lifecycle_dagster.cli.next_steps import print_summary
from lifecycle_dagster.cli.output import BackgroundProgress
from lifecycle_dagster.store import transitions
from lifecycle_dagster.store.db import connect
from lifecycle_dagster.store.fetch import fetch_one
from lifecycle_dagster.store.sqlfiles import query

_DECIDED = {
    transitions.DecideStatus.COMPLETED: "the execution completed",
    transitions.DecideStatus.FAILED: "the execution failed (a running daemon compensates it, "
    "or: lifecycle-dagster compensate {id})",
    transitions.DecideStatus.CONTINUING: "its next stages are pending: a running daemon starts the continuation run "
    "within about 10 s, or run it here: lifecycle-dagster resume {id}",
    transitions.DecideStatus.WAITING: "the execution still waits (another approval stage)",
    transitions.DecideStatus.IN_PROGRESS: "its run goes on",
}
_PAST = {"approve": "approved", "reject": "rejected"}
_REFUSED = {
    transitions.DecideStatus.REFUSED_UNKNOWN_STAGE: "it has no stage '{stage}'",
    transitions.DecideStatus.REFUSED_NOT_APPROVAL: "stage '{stage}' is not an approval stage",
    transitions.DecideStatus.REFUSED_NOT_WAITING: "stage '{stage}' does not wait for a decision (decided already, "
    "not reached yet, or the execution stopped): lifecycle-dagster status {id}",
    transitions.DecideStatus.REFUSED_NOT_APPROVER: "the decider is not one of the stage's approvers",
}


def _uuid(value: str) -> str:
    try:
        return str(uuid.UUID(value))
    except ValueError as exc:
        raise click.BadParameter(f"{value!r} is not an execution id (a UUID)") from exc


@main.command("decide")
@click.argument("execution_id")
@click.argument("stage")
@click.argument("decision", type=click.Choice(["approve", "reject"]))
@click.option("--comment", default=None, help="Why (at most 4000 characters); recorded with the decision.")
@click.option("--as", "actor", default=None, help="Who decides, as recorded (default: cli:<your user name>).")
def decide_cmd(execution_id: str, stage: str, decision: str, comment: str | None, actor: str | None) -> None:
    """Decide the approval stage STAGE that execution EXECUTION_ID waits on, as an operator (any
    approver list): one transaction; the decision becomes the stage's output. Exits 1 when the
    decision is refused (not waiting, decided already, not an approval stage)."""
    eid = _uuid(execution_id)
    who = actor or f"cli:{getpass.getuser()}"
    try:
        with connect(_dsn()) as conn:
            status = transitions.approval_decide(
                conn, execution_id=eid, stage_id=stage, decision=decision, comment=comment, actor=who, operator=True
            )
    except (psycopg.errors.NoDataFound, psycopg.errors.InvalidParameterValue) as exc:
        raise click.ClickException(str(exc.diag.message_primary or exc)) from exc
    if status.refused:
        click.echo(f"refused ({status}): {_REFUSED[status].format(stage=stage, id=eid)}", err=True)
        sys.exit(1)
    click.echo(f"{_PAST[decision]} stage '{stage}' of execution {eid} as {who}: {_DECIDED[status].format(id=eid)}")


@main.command("resume")
@click.argument("execution_id")
def resume_cmd(execution_id: str) -> None:
    """Run the continuation of EXECUTION_ID in this process: after a decision, the stages it made
    pending (completed stages return their output from Postgres without running again). A running
    daemon's resume sensor does this by itself. Exits 0 when the execution completed, 3 when it
    waits for a decision again, 1 otherwise."""
    from lifecycle_dagster.location.job_factory import CONTINUES_TAG, EXECUTION_ID_TAG, RESUME_TAG, build_job

    eid = _uuid(execution_id)
    dsn = _dsn()
    with connect(dsn) as conn:
        execution = conn.execute(query("execution"), {"execution_id": eid}).fetchone()
        if execution is None:
            raise click.ClickException(f"no execution {eid}")
        pending = conn.execute(query("pending_stages"), {"execution_id": eid}).fetchall()
        if execution["status"] != "in_progress" or not pending:
            raise click.ClickException(_not_resumable(eid, str(execution["status"])))
        row = fetch_one(conn, "definition_of_execution", {"execution_id": eid})
    previous = execution["dagster_run_id"] or ""
    stages = ", ".join(r["stage_id"] for r in pending)
    click.echo(f"continuing execution {eid} ({row['name']} v{row['version']}): {stages}")
    tags = {EXECUTION_ID_TAG: eid, RESUME_TAG: pending[0]["stage_id"], CONTINUES_TAG: previous}
    started = time.monotonic()
    with BackgroundProgress(dsn, eid):  # the stages' progress on stderr, as `run` shows it
        result = execute_here(dsn, build_job(row), tags)
    status = print_execution(dsn, eid)
    click.echo(f"dagster run {result.run_id}: {'success' if result.success else 'failure'}")
    print_summary(dsn, eid, time.monotonic() - started)
    sys.exit(0 if status == "completed" else EXIT_WAITING if status == "waiting" else 1)


def _not_resumable(execution_id: str, status: str) -> str:
    why = {
        "waiting": "it waits for a decision: lifecycle-dagster decide {id} STAGE approve|reject",
        "failed": "it failed: lifecycle-dagster retry {id} runs its failed stage again",
        "pending": "it has not started: the launch sensor starts it",
    }.get(status, "nothing of it is pending")
    return f"execution {execution_id} is {status}: " + why.format(id=execution_id)
