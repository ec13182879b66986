"""``lifecycle-dagster list | status | breakers | limits | doctor``: what an operator looks at.

Registered on :data:`lifecycle_dagster.cli.main.main` (cli.py imports this module last). Each command
prints a readable table, or with ``--json`` ONE JSON document on stdout (an object; times are ISO
8601 with their UTC offset, durations in seconds, absent values null) for scripts. Exit codes as in
:mod:`lifecycle_dagster.cli.main`: 0 success; 1 an unknown execution or agent, or (``doctor``) anything
wrong with the database's schema; 2 usage errors.
"""

from __future__ import annotations

import json
import re
import sys
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import click

from lifecycle_dagster.cli.common import dsn as _dsn
from lifecycle_dagster.cli.common import main
from lifecycle_dagster.cli.output import is_terminal, print_table
from lifecycle_dagster.store import migrate, transitions
from lifecycle_dagster.store.db import Connection, connect
from lifecycle_dagster.store.fetch import fetch_one
from lifecycle_dagster.store.sqlfiles import query

EXECUTION_STATUSES = (
    "pending",
    "in_progress",
    "waiting",
    "completed",
    "failed",
    "cancelled",
    "compensating",
    "rolled_back",
    "compensation_failed",
)
_RELATIVE = re.compile(r"^(\d+)([smhd])$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}


# --------------------------------------------------------------------------------------------
# output


def _json_value(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.astimezone(UTC).isoformat()
    if isinstance(value, uuid.UUID):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _emit_json(document: dict[str, Any]) -> None:
    click.echo(json.dumps(document, default=_json_value, ensure_ascii=False))


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, datetime):
        return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """A table (:func:`~lifecycle_dagster.cli.output.print_table`); None as '-'."""
    print_table(headers, [[_cell(v) for v in row] for row in rows])


def _since(value: str | None) -> datetime | None:
    """``1h``, ``30m``, ``2d``, ``45s`` ago, or an ISO 8601 time (UTC when it has no offset)."""
    if value is None:
        return None
    m = _RELATIVE.match(value.strip())
    if m:
        return datetime.now(UTC) - timedelta(**{_UNITS[m.group(2)]: int(m.group(1))})
    try:
        when = datetime.fromisoformat(value.strip())
    except ValueError:
        raise click.BadParameter(
            f"{value!r}: expected an ISO 8601 time (2026-01-31T12:00:00Z) or an age like 30m, 1h, 2d, 45s",
            param_hint="--since",
        ) from None
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def _execution_id(value: str) -> str:
    try:
        return str(uuid.UUID(value))
    except ValueError:
        raise click.ClickException(f"not an execution id: {value!r} (expected a UUID)") from None


# --------------------------------------------------------------------------------------------
# list


@main.command("list")
@click.option("--workflow", help="Only executions of this workflow (any version).")
@click.option("--status", type=click.Choice(EXECUTION_STATUSES), help="Only executions in this status.")
@click.option("--since", "since", help="Only executions created since: ISO 8601, or an age (30m, 1h, 2d).")
@click.option("--limit", type=click.IntRange(min=1), default=50, show_default=True, help="At most this many.")
@click.option("--json", "as_json", is_flag=True, help='One JSON document: {"executions": [...]}.')
def list_cmd(workflow: str | None, status: str | None, since: str | None, limit: int, as_json: bool) -> None:
    """Executions, newest first: workflow, version, status, current stage, created, updated and the
    Dagster run (``manual``: driven by hand, inserted as in_progress with no run)."""
    params = {"workflow": workflow, "status": status, "since": _since(since), "limit": limit}
    with connect(_dsn()) as conn:
        rows = [dict(r) for r in conn.execute(query("ops_executions"), params).fetchall()]
    if as_json:
        _emit_json({"executions": rows})
        return
    if not rows:
        click.echo("no executions")
        return
    _table(
        ("ID", "WORKFLOW", "VERSION", "STATUS", "STAGE", "CREATED", "UPDATED", "RUN"),
        [
            (
                r["id"],
                r["workflow"],
                r["version"],
                r["status"] if r["outcome"] in (None, "completed") else f"{r['status']} ({r['outcome']})",
                r["current_stage"],
                r["created_at"],
                r["updated_at"],
                "manual" if r["manual"] else r["dagster_run_id"],
            )
            for r in rows
        ],
    )


# --------------------------------------------------------------------------------------------
# status


@main.command("status")
@click.argument("execution_id")
@click.option("--json", "as_json", is_flag=True, help='One JSON document: {"execution": {...}, "stages": [...]}.')
def status_cmd(execution_id: str, as_json: bool) -> None:
    """An execution and each stage of its DAG: status, attempts, duration, agent, error. Exits 1
    when no execution has this id."""
    eid = _execution_id(execution_id)
    with connect(_dsn()) as conn:
        execution = conn.execute(query("ops_execution"), {"execution_id": eid}).fetchone()
        if execution is None:
            raise click.ClickException(f"no execution {eid} (lifecycle-dagster list shows the executions)")
        stages = [dict(r) for r in conn.execute(query("ops_execution_stages"), {"execution_id": eid}).fetchall()]
    if as_json:
        _emit_json({"execution": dict(execution), "stages": stages})
        return
    e = execution
    click.echo(f"execution {e['id']}  {e['workflow']} v{e['version']}")
    click.echo(f"  status:   {e['status']}" + (f"  ({e['error_message']})" if e["error_message"] else ""))
    if e["outcome"]:
        click.echo(f"  outcome:  {e['outcome']}" + (f"  ({e['outcome_reason']})" if e["outcome_reason"] else ""))
    if e["pending_reason"]:
        click.echo(f"  waiting:  {e['pending_reason']}")
    click.echo(f"  stage:    {_cell(e['current_stage'])}")
    click.echo(f"  created:  {_cell(e['created_at'])}  updated: {_cell(e['updated_at'])}")
    click.echo(f"  run:      {'manual' if e['manual'] else _cell(e['dagster_run_id'])}")
    if e["batch_id"]:
        click.echo(f"  batch:    {_batch_line(e)}")
    if e["compensation_run_id"]:
        click.echo(f"  undo run: {e['compensation_run_id']}")
    click.echo("")
    _table(
        ("STAGE", "STATUS", "ATTEMPTS", "DURATION", "AGENT", "ERROR"),
        [
            (
                s["stage"],
                s["status"] or "not_started",
                s["attempts"],
                None if s["duration_s"] is None else f"{s['duration_s']:.3f}s",
                s["agent"] or ("(approval)" if s["kind"] == "approval" else None),
                s["error"] or _waits(s),
            )
            for s in stages
        ],
    )


def _batch_line(e: Any) -> str:
    """The batch an execution was launched in: its id, size and run, and whether and why it left."""
    left = f"; left it: {e['batch_left_reason']} at {_cell(e['batch_left_at'])}" if e["batch_left_at"] else ""
    run = f", run {e['batch_run_id']}" if e["batch_run_id"] else ", not launched yet"
    return f"{e['batch_id']} ({e['batch_size']} executions{left}){run}"


def _waits(stage: dict[str, Any]) -> str | None:
    """What a waiting approval stage waits for (None: it does not wait)."""
    if stage["status"] != "waiting":
        return None
    until = stage["wait_until"]
    return "waits for a decision" + (f" until {_cell(until)}" if until else " (no deadline)")


# --------------------------------------------------------------------------------------------
# breakers


@main.command("breakers")
@click.option("--reset", "reset_agent", metavar="AGENT", help="Close this agent's breaker now (reason 'reset').")
@click.option("--json", "as_json", is_flag=True, help='One JSON document: {"reset": ..., "breakers": [...]}.')
def breakers_cmd(reset_agent: str | None, as_json: bool) -> None:
    """Circuit breakers per agent and per capability: state, since when, when an open one
    half-opens, and the current window's calls, failures, failure rate and p95 latency. With
    ``--reset AGENT``, the agent's open or half-open breaker closes first (lifecycle.breaker_reset,
    a breaker_closed event with reason 'reset'); an unknown agent exits 1."""
    import psycopg

    reset: dict[str, Any] | None = None
    with connect(_dsn()) as conn:
        if reset_agent is not None:
            try:
                previous = transitions.breaker_reset(conn, agent=reset_agent).value
            except psycopg.errors.NoDataFound as exc:
                raise click.ClickException(
                    f"unknown agent {reset_agent!r} (lifecycle-dagster breakers lists them)"
                ) from exc
            reset = {"agent": reset_agent, "previous_state": previous, "closed": previous != "closed"}
        rows = [dict(r) for r in conn.execute(query("ops_breakers")).fetchall()]
    if as_json:
        _emit_json({"reset": reset, "breakers": rows})
        return
    if reset is not None:
        if reset["closed"]:
            click.echo(f"reset: the breaker of agent '{reset_agent}' is closed (it was {reset['previous_state']})")
        else:
            click.echo(f"reset: the breaker of agent '{reset_agent}' was already closed: nothing to do")
    if not rows:
        click.echo("no agents")
        return
    _table(
        ("SCOPE", "NAME", "STATE", "SINCE", "HALF-OPENS AT", "CALLS", "FAILURES", "RATE", "P95 MS", "SERVES"),
        [
            (
                r["scope"],
                r["name"] if r["active"] else f"{r['name']} (inactive)",
                r["state"],
                r["state_since"],
                r["half_open_at"],
                r["calls"],
                r["failures"],
                None if r["rate"] is None else round(float(r["rate"]), 4),
                r["p95_ms"],
                r["serves"],
            )
            for r in rows
        ],
    )


# --------------------------------------------------------------------------------------------
# limits


@main.command("limits")
@click.option("--capability", metavar="NAME", help="Set (--per-s) or --clear this capability's rate limit first.")
@click.option("--per-s", "per_s", type=float, help="With --capability: calls a second, in (0, 1000000].")
@click.option("--burst", type=float, help="With --per-s: calls at once, in [1, 1e9] (default max(1, per-s)).")
@click.option("--clear", is_flag=True, help="With --capability: remove its rate limit.")
@click.option("--json", "as_json", is_flag=True, help='One JSON document: {"changed": ..., "limits": [...]}.')
def limits_cmd(capability: str | None, per_s: float | None, burst: float | None, clear: bool, as_json: bool) -> None:
    """Rate limits (docs/rate-limits.md): each agent's config.rate_limit and each capability's
    limit, its calls a second (PER_S), bucket size (BURST), the tokens it holds now, the calls
    started in the last 60 s and the tokens ever taken. With ``--capability NAME --per-s R
    [--burst B]`` the capability's limit is set first (``--clear``: removed; lifecycle.capability_limit_set);
    a bad value exits 1 with the database's message. Agents' limits are set in their config."""
    import psycopg

    if capability is None and (per_s is not None or burst is not None or clear):
        raise click.UsageError("--per-s, --burst and --clear need --capability")
    if capability is not None and (per_s is None) == (not clear):
        raise click.UsageError("--capability needs --per-s R (set) or --clear (remove), not both")
    changed: dict[str, Any] | None = None
    with connect(_dsn()) as conn:
        if capability is not None:
            try:
                status = transitions.capability_limit_set(conn, capability=capability, per_s=per_s, burst=burst)
            except psycopg.errors.CheckViolation as exc:
                raise click.ClickException(str(exc.diag.message_primary or exc)) from exc
            changed = {"capability": capability, "status": status.value, "per_s": per_s, "burst": burst}
            served = conn.execute(query("capability_breakers"), {"capability": capability}).fetchall()
            if not any(r["scope"] == "agent" for r in served):  # a typo, or an agent still to come
                click.echo(f"note: no agent serves capability '{capability}' (yet)", err=True)
        rows = [dict(r) for r in conn.execute(query("ops_limits")).fetchall()]
    if as_json:
        _emit_json({"changed": changed, "limits": rows})
        return
    if changed is not None:
        click.echo(f"capability '{capability}': limit {changed['status']}")
    if not rows:
        click.echo("no rate limits (set config.rate_limit on an agent, or: limits --capability NAME --per-s R)")
        return
    _table(
        ("SCOPE", "NAME", "PER_S", "BURST", "TOKENS", "CALLS 60S", "TAKEN", "LAST TAKEN"),
        [
            (
                r["scope"],
                r["name"],
                float(r["per_s"]),
                float(r["burst"]),
                round(float(r["tokens"]), 3),
                r["calls_60s"],
                r["taken"],
                r["last_taken_at"],
            )
            for r in rows
        ],
    )


# --------------------------------------------------------------------------------------------
# doctor

#: the runbook's section that, re-applied after migrating, leaves this object behind
_RUNBOOK_SECTIONS = {
    "perform_workflow_compensation": 2,
    "retry_stage": 3,
    "trip_circuit_breaker": 4,
    "workflow_audit_feed": 5,
}


@dataclass(frozen=True)
class Problem:
    """One thing ``doctor`` found wrong: what, about which object, and what to do."""

    kind: str  # migration | schema_file | function | view | table | trigger | policy | privileges | role | fingerprints
    object: str
    problem: str  # missing | changed | extra | pending | unknown
    message: str
    fix: str


def _defined_in(kind: str, name: str) -> str | None:
    """The ``sql/schema/`` file that defines ``name`` (``schema.name`` of a function or view)."""
    what = {"function": "FUNCTION", "view": "VIEW"}.get(kind)
    if what is None:
        return None
    pattern = re.compile(rf"CREATE\s+OR\s+REPLACE\s+{what}\s+{re.escape(name)}\b", re.IGNORECASE)
    for f in migrate.discover_schema():
        if pattern.search(f.sql):
            return f"sql/schema/{f.name}"
    return None


def _runbook_note(name: str) -> str:
    section = _RUNBOOK_SECTIONS.get(name.rsplit(".", 1)[-1])
    return f" (the runbook's section {section} re-applied?)" if section else ""


def migration_problems(done: dict[int, tuple[str, str]]) -> list[Problem]:
    """Every migration applied (``done``: :func:`lifecycle_dagster.store.migrate.applied`), with the
    checksum of the file shipped now."""
    problems: list[Problem] = []
    shipped = migrate.discover()
    by_version = {m.version: m for m in shipped}
    for version, (name, checksum) in sorted(done.items()):
        mig = by_version.get(version)
        label = f"{version:04d}_{name}"
        if mig is None:
            problems.append(
                Problem(
                    "migration",
                    label,
                    "unknown",
                    f"migration {label} is applied but not shipped with this code",
                    "the database was upgraded by a newer lifecycle-dagster: use that version",
                )
            )
        elif mig.name != name or mig.checksum != checksum:
            problems.append(
                Problem(
                    "migration",
                    label,
                    "changed",
                    f"migration {label} was applied with checksum {checksum[:12]}…, the file shipped now "
                    f"({mig.path.name}) has {mig.checksum[:12]}…",
                    "applied migrations never change: restore the file as released and add a new migration",
                )
            )
    for mig in shipped:
        if mig.version not in done:
            label = f"{mig.version:04d}_{mig.name}"
            problems.append(
                Problem(
                    "migration", label, "pending", f"migration {label} is not applied", "lifecycle-dagster db upgrade"
                )
            )
    return problems


def schema_file_problems(applied: dict[str, str]) -> list[Problem]:
    """Every ``sql/schema/`` file whose text differs from what the database last applied
    (``applied``: :func:`lifecycle_dagster.store.migrate.applied_schema`), or that it never applied."""
    problems: list[Problem] = []
    shipped = {f.name: f.checksum for f in migrate.discover_schema()}
    for name in sorted(shipped.keys() | applied.keys()):
        if applied.get(name) == shipped.get(name):
            continue
        what = "is not applied" if name not in applied else "changed since it was applied"
        if name not in shipped:
            what = "was applied but is not shipped with this code"
        problems.append(
            Problem(
                "schema_file",
                f"sql/schema/{name}",
                "pending",
                f"sql/schema/{name} {what}",
                "lifecycle-dagster db upgrade",
            )
        )
    return problems


def role_problems(conn: Connection) -> list[Problem]:
    """Supabase's client roles holding a role that reaches our objects (service_role, the owner of
    schema lifecycle, a superuser or BYPASSRLS role) or such an attribute themselves. Roles are
    the cluster's, not ours: doctor reports, --repair leaves them."""
    problems = []
    for r in conn.execute(query("client_role_escalations")):
        role, member_of = r["role"], r["member_of"]
        if member_of:
            message = f"role {role} is a member of {member_of}: it has that role's privileges on every object of ours"
            fix = f"REVOKE {member_of} FROM {role};  (roles are cluster-wide: db upgrade --repair leaves them alone)"
        else:
            message = f"role {role} is a superuser or bypasses row-level security"
            fix = f"ALTER ROLE {role} NOSUPERUSER NOBYPASSRLS;  (db upgrade --repair leaves roles alone)"
        problems.append(Problem("role", role, "changed", message, fix))
    return problems


def schema_problems(conn: Connection) -> tuple[int, list[Problem]]:
    """(objects checked, problems): the catalog now against the fingerprints recorded when migrating."""
    present = conn.execute(query("schema_fingerprints_present")).fetchone()
    if present is None or not present["present"]:
        return 0, [
            Problem(
                "fingerprints",
                "lifecycle.schema_fingerprints",
                "missing",
                "no schema fingerprints recorded (sql/schema/ was never applied)",
                "lifecycle-dagster db upgrade",
            )
        ]
    recorded = {(r["kind"], r["object"]): r["md5"] for r in conn.execute(query("schema_fingerprints_recorded"))}
    now = {(r["kind"], r["object"]): r["md5"] for r in conn.execute(query("schema_fingerprints_now"))}
    problems: list[Problem] = []
    extra_objects = {obj for (kind, obj) in now.keys() - recorded.keys() if kind in ("function", "view", "table")}
    for key in sorted(recorded.keys() | now.keys()):
        kind, obj = key
        name = obj.split("(", 1)[0].split(" ", 1)[-1]
        if key in recorded and key in now:
            if recorded[key] == now[key]:
                continue
            problems.append(_changed(kind, obj, name))
        elif key in recorded:
            problems.append(_missing(kind, obj, name))
        elif not (kind == "privileges" and obj.split(" ", 1)[1] in extra_objects):
            problems.append(_extra(kind, obj, name))
    return len(recorded), problems


REPAIR = "lifecycle-dagster db upgrade --repair"


def _changed(kind: str, obj: str, name: str) -> Problem:
    note = _runbook_note(name)
    message = {
        "function": f"function {obj}: the installed definition is not the shipped one{note}",
        "view": f"view {obj}: the installed definition is not the shipped one{note}",
        "table": f"table {obj}: row-level security is not as shipped (enabled, not forced)",
        "privileges": f"{obj}: privileges differ from the shipped ones",
    }.get(kind, f"{kind} {obj}: not the shipped definition")
    return Problem(kind, obj, "changed", message, REPAIR)


def _missing(kind: str, obj: str, name: str) -> Problem:
    if kind == "privileges":
        return Problem(kind, obj, "missing", f"{obj}: gone", "re-create it (see the other problems)")
    if kind == "table":
        return Problem(kind, obj, "missing", f"table {obj} is missing", "restore it from a backup: its rows are gone")
    return Problem(kind, obj, "missing", f"{kind} {obj} is missing", REPAIR)


def _extra(kind: str, obj: str, name: str) -> Problem:
    note = _runbook_note(name)
    if kind == "function":
        overload = " another overload of a shipped function" if _defined_in(kind, name) else ""
        fix = f"{REPAIR} (it drops the runbook's overloads)" if note else f"DROP FUNCTION {obj}; (if it is not yours)"
        return Problem(kind, obj, "extra", f"function {obj} is not shipped:{overload or ' not ours'}{note}", fix)
    if kind == "view":
        return Problem(kind, obj, "extra", f"view {obj} is not shipped{note}", f"DROP VIEW {obj}; (if it is not yours)")
    if kind == "table":
        return Problem(
            kind,
            obj,
            "extra",
            f"table {obj} is not covered by sql/schema/12_security.sql (row-level security, grants)",
            "a table added by a migration gets its RLS, policies and grants in sql/schema/12_security.sql",
        )
    if kind == "policy":
        return Problem(kind, obj, "extra", f"policy {obj} is not shipped: it may widen what a role sees", REPAIR)
    return Problem(kind, obj, "extra", f"{kind} {obj} is not shipped", "drop it if it is not yours")


@main.command("retry")
@click.argument("execution_id")
def retry_cmd(execution_id: str) -> None:
    """Re-execute a failed execution whose compensation has not started (e.g. under on_failure:
    hold) from its failed stage, in this process: a Dagster re-execution of its last run (tagged
    dagster/parent_run_id and dagster/root_run_id, so the UI groups it with the failed run). Each
    completed stage returns its output from Postgres without running again; each failed stage runs
    its next attempt. Exits 0 only when the execution completed."""
    from dagster import DagsterInstance

    from lifecycle_dagster.cli.common import dagster_home as _home
    from lifecycle_dagster.cli.common import execute_here, print_execution
    from lifecycle_dagster.location.job_factory import EXECUTION_ID_TAG, PARENT_RUN_TAG, ROOT_RUN_TAG, build_job
    from lifecycle_dagster.settings import Settings

    eid = _execution_id(execution_id)
    dsn = _dsn()
    with connect(dsn) as conn:
        execution = conn.execute(query("execution"), {"execution_id": eid}).fetchone()
        if execution is None:
            raise click.ClickException(f"no execution {eid}")
        if execution["status"] != "failed":
            hint = {
                "compensating": "its compensation has started",
                "rolled_back": "it was compensated",
                "compensation_failed": "its compensation failed (lifecycle-dagster compensate retries that)",
                "cancelled": "it was cancelled",
            }.get(execution["status"], "only a failed execution is retried")
            raise click.ClickException(f"execution {eid} is {execution['status']}: {hint}")
        row = fetch_one(conn, "definition_of_execution", {"execution_id": eid})
    tags = {EXECUTION_ID_TAG: eid}
    parent = execution["dagster_run_id"]
    if parent:
        instance = DagsterInstance.from_config(str(_home(Settings.from_env(), dsn)))
        try:
            previous = instance.get_run_by_id(parent)
        finally:
            instance.dispose()
        tags[PARENT_RUN_TAG] = parent
        tags[ROOT_RUN_TAG] = (previous.root_run_id if previous else None) or parent
    click.echo(f"retrying execution {eid} ({row['name']} v{row['version']}) after run {parent or '(none)'}")
    result = execute_here(dsn, build_job(row), tags)
    status = print_execution(dsn, eid)
    click.echo(f"dagster run {result.run_id}: {'success' if result.success else 'failure'}")
    sys.exit(0 if status == "completed" else 1)


@main.command("doctor")
@click.option("--json", "as_json", is_flag=True, help='One JSON document: {"ok": ..., "problems": [...]}.')
@click.option(
    "--invariants",
    "with_invariants",
    is_flag=True,
    help="Also check the data's invariants (every execution at rest, stages completed and compensated "
    "once and in order, breaker counts, audit chains, leases); each violation makes it exit 1.",
)
def doctor_cmd(as_json: bool, with_invariants: bool) -> None:
    """Check the database against the shipped schema: every migration applied with its checksum,
    and every function, view, trigger, policy, RLS setting and privilege of ours still as the
    upgrade left it (fingerprints recorded after applying sql/schema/). Lists each difference (a function
    body replaced, an extra overload, a view redefined) with what to do; exits 1 when anything is
    wrong. With ``--invariants``, also every violation of lifecycle_dagster.store.invariants (an
    execution not at rest is reported as not quiesced: run it when the work has settled)."""
    import psycopg

    dsn = _dsn()
    with psycopg.connect(dsn, autocommit=True) as plain:
        done = migrate.applied(plain)
        files = migrate.applied_schema(plain) if done else {}
    problems = migration_problems(done) + schema_file_problems(files)
    with connect(dsn) as conn:
        checked, found = schema_problems(conn)
        found += role_problems(conn)
        violations = _invariant_violations(conn) if with_invariants else None
    problems += found
    applied = len(done)
    if as_json:
        document: dict[str, Any] = {
            "ok": not problems and not violations,
            "migrations_applied": applied,
            "objects_checked": checked,
            "problems": [asdict(p) for p in problems],
        }
        if violations is not None:
            document["violations"] = [asdict(v) for v in violations]
        _emit_json(document)
    else:
        _echo_problems(problems)
        if violations is not None:
            _echo_violations(violations)
        if problems:
            click.echo(f"doctor: {len(problems)} problem{'s' if len(problems) != 1 else ''}")
        elif violations:
            click.echo(f"doctor: schema as shipped, {len(violations)} invariant violation(s)")
        else:
            click.echo(f"doctor: ok ({applied} migrations applied as shipped, {checked} schema objects as shipped)")
    sys.exit(1 if problems or violations else 0)


def _echo_problems(problems: Sequence[Problem]) -> None:
    """On a terminal, a table of each problem and its fix; otherwise two lines each (``PROBLEM
    <message>``, ``  fix: <what to do>``), one grep away."""
    if problems and is_terminal():
        print_table(("PROBLEM", "FIX"), [(p.message, p.fix) for p in problems])
        return
    for p in problems:
        click.echo(f"PROBLEM {p.message}")
        click.echo(f"  fix: {p.fix}")


# --------------------------------------------------------------------------------------------
# doctor --invariants


def _invariant_violations(conn: Connection) -> list[Any]:
    """Every violation of :mod:`lifecycle_dagster.store.invariants` (``Violation`` dataclasses)."""
    from lifecycle_dagster.store.invariants import check

    return list(check(conn))


def _echo_violations(violations: Sequence[Any]) -> None:
    """One line per violation (NOT QUIESCED for work not at rest), then a count per rule."""
    for v in violations:
        label = "NOT QUIESCED" if v.rule == "not_quiesced" else f"VIOLATION [{v.rule}]"
        click.echo(f"{label} {v.message}")
    if not violations:
        click.echo("invariants: ok (every execution at rest, no violation)")
        return
    counts: dict[str, int] = {}
    for v in violations:
        counts[v.rule] = counts.get(v.rule, 0) + 1
    click.echo(
        f"invariants: {len(violations)} violation{'s' if len(violations) != 1 else ''} ("
        + ", ".join(f"{rule}: {n}" for rule, n in sorted(counts.items()))
        + ")"
    )
