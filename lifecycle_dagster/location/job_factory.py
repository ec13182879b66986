"""``build_job(definition) -> JobDefinition``: one Dagster job per workflow definition version.

A pure, deterministic function of one ``workflow_definitions`` row (no database, no clock).

Naming policy:

- the job of a version is ``<name>__v<version>``; it stays loaded while the version is active or
  an unfinished execution is pinned to it;
- the **stable job** ``<name>`` (:func:`stable_job`) runs the workflow's ACTIVE version: the same
  graph and op definitions as that version's job under the workflow's name (names cannot contain
  ``__``, so it never clashes with a versioned job); which version it runs changes when the code
  location reloads after an activation, and each run is pinned to the snapshot stored at launch;
- each stage's op DEFINITION is ``<name>__v<version>__<stage>`` (unique across the code location;
  the stage id ``compensate`` is reserved, so no op is named like a compensation job), but its
  NODE in the job is aliased to the stage id, so step keys, the Gantt chart and step selections
  read ``discover``, ``qualify``;
- the compensation job is ``<name>__v<version>__compensate``, its nodes ``undo_<stage>``.

:func:`build_jobs` skips a row whose names are taken. Each edge is a dependency through a
``Nothing`` input named ``upstream`` (a fan-in stage waits for all its parents). Data does not
flow through Dagster: each op reads its ancestors' outputs from Postgres.
"""

import contextlib
import json
import re
import time
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import dagster as dg
import psycopg

from lifecycle_dagster.core.dag import Dag, DagValidationError, parse_dag
from lifecycle_dagster.core.retry import MAX_WAIT_S, resolve_policy
from lifecycle_dagster.engine.approval import ApprovalOutcome, reach_approval
from lifecycle_dagster.engine.batch import (
    BatchStageOutcome,
    ensure_batch,
    left_at_ensure,
    live_members,
    run_batch_stage,
    settle,
)
from lifecycle_dagster.engine.compensation import (
    TAKEOVER_TAG,
    UndoFailed,
    UndoOutcome,
    UndoRetry,
    UndoSpec,
    UndoStopped,
    compensation_job_name,
    run_undo,
    undo_op_name,
)
from lifecycle_dagster.engine.stage import (
    NOT_RUNNABLE,
    StageError,
    StageOutcome,
    StageRetry,
    StageSpec,
    execution_of_runs,
    next_stages,
    run_stage,
)
from lifecycle_dagster.location.executors import executor_def
from lifecycle_dagster.location.resources import (
    ExecutionRequest,
    LifecycleDatabase,
    declared_request,
    default_resources,
)
from lifecycle_dagster.settings import Settings
from lifecycle_dagster.store.transitions import batch_leave, batch_stage_edges
from lifecycle_dagster.store.versions import WORKFLOW_NAME_PATTERN

#: run tag naming the workflow_executions row a run executes
EXECUTION_ID_TAG = "lifecycle/execution_id"
#: run tag marking a run that resumes its execution (set by the resume sensor)
RESUME_TAG = "lifecycle/resume"
#: the run a resume or continuation run continues (the run that reached an approval, or failed)
CONTINUES_TAG = "lifecycle/continues"
#: Dagster's tag on a re-execution of an earlier run: it resumes that run's execution too
PARENT_RUN_TAG = "dagster/parent_run_id"
#: a stage op whose database connection is lost runs again, this many attempts in all, backing off
#: up to DB_LOST_MAX_DELAY_S (a Postgres restart takes seconds)
DB_LOST_RETRIES = 8
DB_LOST_MAX_DELAY_S = 10.0
_NAME_RE = re.compile(WORKFLOW_NAME_PATTERN)
#: Dagster's tag naming the first run of a chain of re-executions
ROOT_RUN_TAG = "dagster/root_run_id"
#: run tag naming the batch a batch run carries (docs/batches.md); its run key is ``batch:<id>``
BATCH_TAG = "lifecycle/batch"
#: run tag: how many executions the batch run carries
BATCH_SIZE_TAG = "lifecycle/batch_size"


@dataclass(frozen=True)
class DefinitionRow:
    """The columns of ``workflow_definitions`` a job is built from."""

    id: str
    name: str
    version: int
    description: str | None
    dag_schema: Any
    #: the row is its workflow's active version (``is_active``; False when the row does not say)
    is_active: bool = False

    @classmethod
    def from_mapping(cls, row: Mapping[str, Any]) -> "DefinitionRow":
        """Read a row given as a mapping (a query row or a JSON fixture). The DAG is ``dag_schema``
        (decoded) or ``dag_schema_json`` (its JSON text, as the snapshot carries it).

        Raises:
            ValueError: a column is missing or has the wrong type, or the DAG text cannot be decoded.
        """
        try:
            if "dag_schema" in row:
                dag_schema = row["dag_schema"]
            else:
                try:
                    dag_schema = json.loads(row["dag_schema_json"])
                except RecursionError:
                    raise ValueError("dag_schema is nested too deeply to decode") from None
            name, version = row["name"], row["version"]
            if not (isinstance(name, str) and _NAME_RE.fullmatch(name) and "__" not in name and name[-1] != "_"):
                raise ValueError(
                    f"name {name!r} must match {WORKFLOW_NAME_PATTERN} without __ and not end in _ "
                    "(it names the Dagster job)"
                )
            if isinstance(version, bool) or not isinstance(version, int) or version < 1:
                raise ValueError(f"version {version!r} of {name} must be an integer >= 1")
            return cls(
                id=str(row["id"]),
                name=name,
                version=version,
                description=row.get("description"),
                dag_schema=dag_schema,
                is_active=row.get("is_active") is True,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"not a usable workflow_definitions row: {exc}") from exc

    @property
    def label(self) -> str:
        """``name v<version>`` for messages."""
        return f"{self.name} v{self.version}"


def capability_pool(capability: str) -> str:
    """The Dagster pool of the stage ops of a capability: ``lifecycle_<capability>``, with each
    whitespace character and ``%`` percent-encoded (UTF-8), since a Dagster pool name has no
    whitespace (``lifecycle_lead%20scoring``); any other capability is kept as it is."""
    encoded = re.sub(r"[\s%]", lambda m: "".join(f"%{b:02X}" for b in m[0].encode("utf-8")), capability)
    return f"lifecycle_{encoded}"


def job_name(name: str, version: int) -> str:
    """The job of a definition version: ``<name>__v<version>``."""
    return f"{name}__v{version}"


def op_name(job: str, stage_id: str) -> str:
    """The op of a stage: ``<job>__<stage_id>``."""
    return f"{job}__{stage_id}"


def undo_node(stage_id: str) -> str:
    """The node (step key) of a stage's undo op in the compensation job: ``undo_<stage>``."""
    return f"undo_{stage_id}"


def _bounded(timeout_s: float | None) -> float | None:
    return None if timeout_s is None else min(timeout_s, MAX_WAIT_S)


@contextlib.contextmanager
def _as_dagster_errors(context: dg.OpExecutionContext) -> Iterator[None]:
    """A recorded retry becomes Dagster's RetryRequested, a stage that failed or stopped for good a
    Failure (not retried by Dagster)."""
    try:
        yield
    except StageRetry as exc:
        context.log.warning(f"stage '{exc.stage_id}': {exc}")
        # the database counts the attempts (a lost connection is not one): Dagster's retry number,
        # which counts those too, never refuses a retry the database recorded
        retries = context.retry_number + max(1, exc.max_attempts - exc.attempt)
        raise dg.RetryRequested(max_retries=retries, seconds_to_wait=exc.delay_s) from exc
    except StageError as exc:
        raise dg.Failure(
            description=f"stage '{exc.stage_id}' {type(exc).__name__[5:].lower()}: {exc}",
            metadata={"execution_id": exc.execution_id, "error_code": exc.code, "attempt": exc.attempt},
            allow_retries=False,
        ) from exc


def _retry_when_db_lost(
    context: dg.OpExecutionContext,
    stage_id: str,
    execution_id: str | None,
    exc: psycopg.OperationalError,
    attempts: int = 1,
) -> dg.RetryRequested:
    """The connection went away (a server restart, a terminated session, a failover): run the stage
    again once the database is back, up to DB_LOST_RETRIES times on top of the ``attempts - 1``
    retries the stage's own attempts may take (Dagster's retry number counts both). An adopted
    execution resumes: a completion that committed before the connection died is kept, an
    interrupted attempt goes on as the same attempt (``lifecycle.stage_start`` adopts its task).
    Without an execution id (nothing to resume) or out of retries, ``exc`` is raised."""
    budget = DB_LOST_RETRIES + max(0, attempts - 1)
    if not execution_id or context.retry_number + 1 >= budget:
        raise exc
    delay = min(DB_LOST_MAX_DELAY_S, 0.5 * 2 ** min(context.retry_number, 8))
    context.log.warning(f"stage '{stage_id}': database connection lost ({exc}); again in {delay:g} s")
    return dg.RetryRequested(max_retries=context.retry_number + 1, seconds_to_wait=delay)


def _stage_metadata(outcome: StageOutcome) -> dict[str, Any]:
    """The output metadata of a stage op: what the attempt did (or that it was already done)."""
    if outcome.already_completed:
        return {"execution_id": outcome.execution_id, "attempt": outcome.attempt, "already_completed": True}
    summary = outcome.output.get("summary")
    return {
        "execution_id": outcome.execution_id,
        "agent": outcome.agent_name,
        "task_id": outcome.task_id or "",
        "attempt": outcome.attempt,
        "duration_ms": dg.MetadataValue.float(round(outcome.duration_ms, 3)),
        "summary": str(summary) if summary is not None else "",
        "execution_status": outcome.execution_status,
    }


def _new_context(context: dg.OpExecutionContext, request: ExecutionRequest, required: Sequence[str]) -> dict[str, Any]:
    """The context of the execution a run creates: the request's, refused when the DAG declares
    ``required`` keys and the run config gave no ``lifecycle_request`` (the job's default config,
    the declared example, is never run by accident: a client must name its context) or the context
    lacks one of them (e.g. read from ``context_file``).

    Raises:
        dagster.Failure: as above, naming the missing keys and where to fill them in.
    """
    ctx = request.resolved_context()
    if not required:
        return ctx
    resources = context.run.run_config.get("resources")
    given = resources.get("lifecycle_request") if isinstance(resources, Mapping) else None
    missing = list(required) if not given else [k for k in required if k not in ctx]
    if missing:
        raise dg.Failure(
            description=(
                f"this run creates an execution but its context lacks {', '.join(missing)}: set "
                "resources.lifecycle_request.config.context (or context_file) in the run config, holding "
                f"{', '.join(required)} (the job's default run config, shown by the Launchpad, is an example)"
            ),
            allow_retries=False,
        )
    return ctx


def _ancestor_runs(tags: Mapping[str, str]) -> list[str]:
    """The runs a re-execution descends from, nearest first: its parent run, then its root run."""
    return [r for r in (tags.get(PARENT_RUN_TAG), tags.get(ROOT_RUN_TAG)) if r]


#: (run id, execution id) pairs this process has tagged or seen tagged (bounded: oldest dropped)
_TAGGED: dict[tuple[str, str], None] = {}
_TAGGED_MAX = 256


def tag_run(context: dg.OpExecutionContext, execution_id: str) -> None:
    """Give the op's run the ``lifecycle/execution_id`` tag when it lacks it, whoever launched it
    (the Launchpad, GraphQL, ``dagster job execute``): once per run and process (the run's stored
    tags are read once; ``context.run.tags`` is fixed at launch). A run tagged with another
    execution keeps its tag (the execution ensured is the tagged one anyway). Dagster's storage
    failing to tag is logged, not raised: the stage still runs (the next op tries again)."""
    key = (context.run_id, execution_id)
    if context.run.tags.get(EXECUTION_ID_TAG) or key in _TAGGED:
        return
    try:
        run = context.instance.get_run_by_id(context.run_id)
        if run is not None and EXECUTION_ID_TAG not in run.tags:
            context.instance.add_run_tags(context.run_id, {EXECUTION_ID_TAG: execution_id})
            context.log.info(f"run tagged {EXECUTION_ID_TAG}={execution_id}")
    except Exception as exc:  # Dagster's run storage (any backend) could not be read or written
        context.log.warning(f"could not tag the run {EXECUTION_ID_TAG}={execution_id}: {exc}")
        return
    if len(_TAGGED) >= _TAGGED_MAX:
        del _TAGGED[next(iter(_TAGGED))]
    _TAGGED[key] = None


def _completed_line(stage_id: str, outcome: StageOutcome) -> str:
    """The INFO line of a completed stage: agent, attempt and duration (or that it was done before)."""
    how = (
        "by an earlier run (nothing ran)"
        if outcome.already_completed
        else f"agent {outcome.agent_name}, attempt {outcome.attempt}, {outcome.duration_ms:.0f} ms"
    )
    return f"stage '{stage_id}' completed: {how} (execution {outcome.execution_id})"


def _stage_spec(row: DefinitionRow, dag: Dag, stage_id: str) -> StageSpec:
    stage = dag.stage(stage_id)
    return StageSpec(
        definition_id=row.id,
        stage_id=stage.id,
        capability=stage.capability,
        ancestors={a: dag.stage(a).capability for a in dag.ancestors(stage.id)},
        policy=resolve_policy(dag, stage.id),
        timeout_s=_bounded(stage.timeout_s if stage.timeout_s is not None else dag.default_timeout_s),
    )


def edge_output(child: str) -> str:
    """The name of a stage op's output that feeds the op of stage ``child``: the op yields it when
    the edge fired (docs/branches.md), so Dagster skips the ops of a branch not taken."""
    return f"to_{child}"


#: the output every stage op yields, whatever it found: its metadata says what the stage did
RESULT_OUTPUT = "result"


def _outputs(dag: Dag, stage_id: str) -> dict[str, dg.Out]:
    outs = {RESULT_OUTPUT: dg.Out(dg.Nothing, description="always yielded; its metadata says what the stage did")}
    for child in dag.children(stage_id):
        outs[edge_output(child)] = dg.Out(dg.Nothing, is_required=False, description=f"the edge to '{child}' fired")
    return outs


def _yield_outputs(
    context: dg.OpExecutionContext, conn_source: Any, spec: StageSpec, outcome: StageOutcome, metadata: dict[str, Any]
) -> Iterator[dg.Output[None]]:
    """The op's outputs: ``result`` with ``metadata``, and one per fired edge of a completed stage."""
    fired: tuple[str, ...] = ()
    if outcome.state == "completed" and outcome.execution_id:
        with conn_source.connection() as conn:
            fired = next_stages(conn, outcome.execution_id, spec.stage_id)
    yield dg.Output(None, RESULT_OUTPUT, metadata={**metadata, "state": outcome.state, "next": ", ".join(fired)})
    for child in fired:
        yield dg.Output(None, edge_output(child))


def _left_line(stage_id: str, outcome: StageOutcome) -> str:
    why = {
        "skipped": "skipped: no edge into it fired",
        "blocked": "not run: an upstream approval stage waits for its decision",
        "ended": "skipped: a stage ended the execution early",
        "waiting": "waits for its decision",
    }.get(outcome.state, outcome.state)
    return f"stage '{stage_id}' {why} (execution {outcome.execution_id})"


def _run_stage_op(context: dg.OpExecutionContext, spec: StageSpec, required: Sequence[str]) -> StageOutcome:
    """Run the stage of op ``context`` (the run's connection and heartbeat), Dagster's way."""
    db: LifecycleDatabase = context.resources.lifecycle_db
    request: ExecutionRequest = context.resources.lifecycle_request
    tags = context.run.tags
    execution_id = tags.get(EXECUTION_ID_TAG) or request.execution_id or None
    run = db.run  # the run's op connection and its one heartbeat (see RunConnections)
    run.beat(execution_id)
    try:
        with run.connection() as conn, _as_dagster_errors(context):
            if not execution_id and PARENT_RUN_TAG in tags:  # a re-execution of an untagged run
                execution_id = execution_of_runs(conn, spec.definition_id, _ancestor_runs(tags))
            resume = bool(execution_id) and (RESUME_TAG in tags or PARENT_RUN_TAG in tags)
            outcome = run_stage(
                conn,
                spec,
                run_id=context.run_id,
                attempt=1,  # the database numbers the attempts (Dagster's retries count lost connections too)
                registry=context.resources.lifecycle_agents,
                execution_id=execution_id,
                context={} if execution_id else _new_context(context, request, required),
                resume=resume,
                on_execution=lambda eid: tag_run(context, eid),
            )
    except psycopg.OperationalError as exc:
        raise _retry_when_db_lost(context, spec.stage_id, execution_id, exc, spec.policy.max_attempts) from exc
    run.beat(outcome.execution_id)  # the heartbeat's log lines name the execution
    return outcome


def _batch_bound(context: dg.OpExecutionContext, conn: Any, spec: StageSpec, batch_id: str) -> None:
    """Bind the batch run's members (the first op of the run in this process); settle the ones that
    could not start as their own failed runs would be."""
    try:
        left = left_at_ensure(ensure_batch(conn, spec, batch_id=batch_id, run_id=context.run_id))
    except NOT_RUNNABLE as exc:
        raise dg.Failure(
            description=f"batch {batch_id} cannot run in this run: {exc.diag.message_primary or exc}",
            metadata={"batch_id": batch_id},
            allow_retries=False,
        ) from exc
    if left:
        context.log.warning(f"batch {batch_id}: {len(left)} execution(s) could not start and left the batch")
        settle(conn, left, run_id=context.run_id, stage_id=spec.stage_id)


def _run_batch_op(context: dg.OpExecutionContext, spec: StageSpec) -> BatchStageOutcome:
    """Run the stage for every execution of the run's batch (docs/batches.md). Only a lost
    database connection fails the op (retried as for one execution)."""
    db: LifecycleDatabase = context.resources.lifecycle_db
    batch_id = context.run.tags[BATCH_TAG]
    db.run.beat(None)
    try:
        with db.run.connection() as conn:
            _batch_bound(context, conn, spec, batch_id)
            outcome = run_batch_stage(
                conn,
                spec,
                batch_id=batch_id,
                run_id=context.run_id,
                registry=context.resources.lifecycle_agents,
                concurrency=Settings.from_env().batch_concurrency,
            )
            settle(conn, outcome.left, run_id=context.run_id, stage_id=spec.stage_id)
    except psycopg.OperationalError as exc:
        raise _retry_when_db_lost(context, spec.stage_id, batch_id, exc, spec.policy.max_attempts) from exc
    return outcome


def _batch_outputs(
    context: dg.OpExecutionContext, spec: StageSpec, outcome: BatchStageOutcome
) -> Iterator[dg.Output[None]]:
    """A batch op's outputs: ``result`` with the counts, and one per edge that fired for any member."""
    counts = ", ".join(f"{n} {state}" for state, n in sorted(outcome.states.items())) or "no execution left"
    context.log.info(
        f"stage '{spec.stage_id}' for batch {outcome.batch_id}: {counts} ({outcome.calls} agent call(s), "
        f"{outcome.duration_ms:.0f} ms)"
    )
    for execution_id, why in sorted(outcome.left.items()):
        context.log.warning(f"execution {execution_id} left the batch at stage '{spec.stage_id}': {why}")
    metadata: dict[str, Any] = {
        "batch_id": outcome.batch_id,
        "executions": outcome.members,
        "agent_calls": outcome.calls,
        "duration_ms": dg.MetadataValue.float(round(outcome.duration_ms, 3)),
        "left_batch": len(outcome.left),
        **{f"count_{state}": n for state, n in sorted(outcome.states.items())},
    }
    yield dg.Output(None, RESULT_OUTPUT, metadata={**metadata, "next": ", ".join(outcome.fired)})
    for child in outcome.fired:
        yield dg.Output(None, edge_output(child))


def _stage_op(row: DefinitionRow, dag: Dag, stage_id: str) -> dg.OpDefinition:
    stage = dag.stage(stage_id)
    if stage.approval is not None:
        return _approval_op(row, dag, stage_id)
    spec = _stage_spec(row, dag, stage_id)
    required = dag.context.required

    def compute(context: dg.OpExecutionContext) -> Iterator[dg.Output[None]]:
        if BATCH_TAG in context.run.tags:
            yield from _batch_outputs(context, spec, _run_batch_op(context, spec))
            return
        outcome = _run_stage_op(context, spec, required)
        if outcome.state == "completed":
            context.log.info(_completed_line(spec.stage_id, outcome))
            metadata = _stage_metadata(outcome)
        else:
            context.log.info(_left_line(spec.stage_id, outcome))
            metadata = {"execution_id": outcome.execution_id}
        yield from _yield_outputs(context, context.resources.lifecycle_db.run, spec, outcome, metadata)

    return dg.op(
        name=op_name(job_name(row.name, row.version), stage.id),
        ins={"upstream": dg.In(dg.Nothing)} if dag.parents(stage.id) else {},
        out=_outputs(dag, stage.id),
        description=stage.description or f"stage '{stage.id}' (capability '{stage.capability}')",
        tags={"lifecycle/stage": stage.id, "lifecycle/capability": stage.capability},
        required_resource_keys={"lifecycle_db", "lifecycle_request", "lifecycle_agents"},
        # a Dagster pool per capability: `lifecycle-dagster agent limits` sets it from the agents'
        # concurrency limits (no limit set: unlimited)
        pool=capability_pool(stage.capability),
    )(compute)


def _reach_approval_op(context: dg.OpExecutionContext, spec: StageSpec, required: Sequence[str]) -> ApprovalOutcome:
    db: LifecycleDatabase = context.resources.lifecycle_db
    request: ExecutionRequest = context.resources.lifecycle_request
    tags = context.run.tags
    execution_id = tags.get(EXECUTION_ID_TAG) or request.execution_id or None
    db.run.beat(execution_id)
    try:
        with db.run.connection() as conn, _as_dagster_errors(context):
            if not execution_id and PARENT_RUN_TAG in tags:
                execution_id = execution_of_runs(conn, spec.definition_id, _ancestor_runs(tags))
            return reach_approval(
                conn,
                spec,
                run_id=context.run_id,
                execution_id=execution_id,
                context={} if execution_id else _new_context(context, request, required),
                resume=bool(execution_id) and (RESUME_TAG in tags or PARENT_RUN_TAG in tags),
                on_execution=lambda eid: tag_run(context, eid),
            )
    except psycopg.OperationalError as exc:
        raise _retry_when_db_lost(context, spec.stage_id, execution_id, exc) from exc


def _run_batch_approval_op(context: dg.OpExecutionContext, spec: StageSpec) -> BatchStageOutcome:
    """An approval stage in a batch run: each member reaches it as its own run would (it waits for
    its decision; each is continued alone by the resume sensor once decided)."""
    db: LifecycleDatabase = context.resources.lifecycle_db
    batch_id = context.run.tags[BATCH_TAG]
    db.run.beat(None)
    t0 = time.perf_counter()
    states: Counter[str] = Counter()
    left: dict[str, str] = {}
    try:
        with db.run.connection() as conn:
            _batch_bound(context, conn, spec, batch_id)
            for execution_id in live_members(conn, batch_id=batch_id, run_id=context.run_id):
                try:
                    found = reach_approval(
                        conn, spec, run_id=context.run_id, execution_id=execution_id, context={}, resume=False
                    )
                    states[found.outcome.state] += 1
                except StageError as exc:
                    states["stopped"] += 1
                    left[execution_id] = f"stopped: {exc}"
                    batch_leave(conn, execution_id=execution_id, reason="stopped")
            settle(conn, left, run_id=context.run_id, stage_id=spec.stage_id)
            fired = batch_stage_edges(conn, batch_id=batch_id, run_id=context.run_id, stage_id=spec.stage_id)
    except psycopg.OperationalError as exc:
        raise _retry_when_db_lost(context, spec.stage_id, batch_id, exc) from exc
    return BatchStageOutcome(batch_id, spec.stage_id, dict(states), fired, left, 0, (time.perf_counter() - t0) * 1000.0)


def _approval_op(row: DefinitionRow, dag: Dag, stage_id: str) -> dg.OpDefinition:
    """The op of an approval stage: it records that the stage waits and ends (the run ends
    successfully, its branch skipped); in a continuation run it yields the decided edges."""
    stage = dag.stage(stage_id)
    approval = stage.approval
    assert approval is not None
    spec = _stage_spec(row, dag, stage_id)
    required = dag.context.required

    def compute(context: dg.OpExecutionContext) -> Iterator[dg.Output[None]]:
        if BATCH_TAG in context.run.tags:
            yield from _batch_outputs(context, spec, _run_batch_approval_op(context, spec))
            return
        found = _reach_approval_op(context, spec, required)
        outcome = found.outcome
        metadata: dict[str, Any] = {"execution_id": outcome.execution_id, "approvers": ", ".join(approval.approvers)}
        if outcome.state == "waiting":
            until = found.wait_until.isoformat() if found.wait_until else "no deadline"
            metadata["waits_until"] = until
            context.log.info(
                f"stage '{stage_id}' waits for a decision by {', '.join(approval.approvers)} (until {until}): "
                f"lifecycle-dagster decide {outcome.execution_id} {stage_id} approve|reject"
            )
        elif outcome.state == "completed":
            metadata["decision"] = str(outcome.output.get("decision", ""))
            metadata["decided_by"] = str(outcome.output.get("decided_by", ""))
        else:
            context.log.info(_left_line(stage_id, outcome))
        yield from _yield_outputs(context, context.resources.lifecycle_db.run, spec, outcome, metadata)

    return dg.op(
        name=op_name(job_name(row.name, row.version), stage.id),
        ins={"upstream": dg.In(dg.Nothing)} if dag.parents(stage.id) else {},
        out=_outputs(dag, stage.id),
        description=stage.description or f"approval stage '{stage.id}' (approvers: {', '.join(approval.approvers)})",
        tags={"lifecycle/stage": stage.id, "lifecycle/kind": "approval"},
        required_resource_keys={"lifecycle_db", "lifecycle_request", "lifecycle_agents"},
    )(compute)


def _aliased(
    ops: Mapping[str, dg.OpDefinition],
    inputs: Mapping[str, tuple[str, Sequence[str]]],
    alias: Any,
    output: Any = lambda upstream, stage: "result",
) -> "dict[dg.NodeInvocation, dict[str, dg.IDependencyDefinition]]":
    """The dependencies of a graph whose node of stage ``s`` is op ``ops[s]`` invoked as
    ``alias(s)`` (its step key), with ``inputs[s] = (input name, upstream stages)``: a node with no
    upstream stage has no entry in ``inputs``; ``output(u, s)`` names the output of ``u`` that
    feeds ``s``."""
    deps: dict[dg.NodeInvocation, dict[str, dg.IDependencyDefinition]] = {}
    for stage_id, op in ops.items():
        node = dg.NodeInvocation(op.name, alias=alias(stage_id))
        if stage_id in inputs:
            name, upstream = inputs[stage_id]
            deps[node] = {
                name: dg.MultiDependencyDefinition(
                    [dg.DependencyDefinition(alias(u), output(u, stage_id)) for u in upstream]
                )
            }
        else:
            deps[node] = {}
    return deps


def _graph(row: DefinitionRow, dag: Dag) -> dg.GraphDefinition:
    """The graph of a definition version: one node per stage, named (aliased) by its stage id, so
    the step keys, the run's Gantt chart and step selections read ``discover``, ``qualify``; its
    op definitions keep their location-wide unique names ``<job>__<stage>``."""
    order = dag.topological_order()
    ops = {stage_id: _stage_op(row, dag, stage_id) for stage_id in order}
    inputs = {s: ("upstream", dag.parents(s)) for s in order if dag.parents(s)}
    return dg.GraphDefinition(
        name=job_name(row.name, row.version),
        node_defs=list(ops.values()),
        dependencies=_aliased(ops, inputs, lambda s: s, lambda _upstream, stage: edge_output(stage)),
        description=row.description or f"workflow {row.label}",
    )


#: job tags carrying a batched version's plan (docs/batches.md)
BATCH_MAX_TAG = "lifecycle/batch_max_executions"
BATCH_WAIT_TAG = "lifecycle/batch_max_wait_s"


@dataclass(frozen=True, order=True)
class BatchPlan:
    """How the launch sensor batches a version's executions: at most ``max_executions`` per run,
    waiting at most ``max_wait_s`` seconds to fill one."""

    definition_id: str
    max_executions: int
    max_wait_s: float


def _batch_tags(dag: Dag) -> dict[str, str]:
    """The job tags of the DAG's ``batch`` (else of ``LIFECYCLE_DAGSTER_BATCH``); none: not batched."""
    if dag.batch is not None:
        size, wait = dag.batch.max_executions, dag.batch.max_wait_s
    else:
        default = Settings.from_env().batch
        if default is None:
            return {}
        size, wait = default
    return {BATCH_MAX_TAG: str(size), BATCH_WAIT_TAG: repr(float(wait))}


def batch_plan(job: dg.JobDefinition) -> BatchPlan | None:
    """The batch plan of a forward job (None: its executions run one per run)."""
    tags = job.tags
    if BATCH_MAX_TAG not in tags or "lifecycle/definition_id" not in tags:
        return None
    return BatchPlan(tags["lifecycle/definition_id"], int(tags[BATCH_MAX_TAG]), float(tags[BATCH_WAIT_TAG]))


def _to_job(
    graph: dg.GraphDefinition, name: str, row: DefinitionRow, dag: Dag, resources: Mapping[str, Any] | None
) -> dg.JobDefinition:
    """The job of ``graph``. A DAG declaring its ``context`` gets a ``lifecycle_request`` whose
    config requires the declared keys (:func:`declared_request`), and its ``example`` as the job's
    default run config (the Launchpad's default)."""
    order = dag.topological_order()
    resource_defs = dict(resources) if resources is not None else default_resources()
    declared = dag.context
    config = None
    if declared.required or declared.example is not None:
        resource_defs["lifecycle_request"] = declared_request(declared.required, declared.description)
    if declared.example is not None:
        config = {"resources": {"lifecycle_request": {"config": {"context": dict(declared.example)}}}}
    return graph.to_job(
        name=name,
        tags={
            "lifecycle/workflow": row.name,
            "lifecycle/version": str(row.version),
            "lifecycle/definition_id": row.id,
            **_batch_tags(dag),
        },
        metadata={"stages": len(order), "topological_order": ", ".join(order)},
        resource_defs=resource_defs,
        config=config,
        executor_def=executor_def(),  # LIFECYCLE_DAGSTER_EXECUTOR (location/executors.py)
    )


def build_job(definition: Mapping[str, Any], resources: Mapping[str, Any] | None = None) -> dg.JobDefinition:
    """Build the job of one ``workflow_definitions`` row: ``<name>__v<version>``, one node per
    stage named by the stage id (its step key).

    ``definition``: ``{"id", "name", "version", "description", "dag_schema"}`` (or
    ``"dag_schema_json"``, the DAG's JSON text). ``resources``: what the job is bound to (default:
    :func:`~lifecycle_dagster.location.resources.default_resources`).

    Raises:
        ValueError: the row lacks a column.
        lifecycle_dagster.core.dag.DagValidationError: the DAG is invalid (every problem listed).
        lifecycle_dagster.location.resources.AgentsSettingError: no ``resources`` given and
            ``LIFECYCLE_DAGSTER_AGENTS`` is not usable.
        lifecycle_dagster.location.executors.ExecutorSettingError: ``LIFECYCLE_DAGSTER_EXECUTOR`` is
            not usable.
    """
    row = DefinitionRow.from_mapping(definition)
    dag = parse_dag(row.dag_schema)
    return _to_job(_graph(row, dag), job_name(row.name, row.version), row, dag, resources)


def stable_job(versioned: dg.JobDefinition, workflow: str) -> dg.JobDefinition:
    """The stable job of a workflow, named ``workflow`` (e.g. ``lifecycle_v1``): the job of its
    ACTIVE version ``versioned`` under the workflow's name, on the same graph and op definitions
    (so no Dagster name is defined twice), tags and resources. Clients submit it without knowing
    versions; each run is pinned, like every run, to the snapshot stored at launch, so a run keeps
    the version that was active when it was launched."""
    return versioned.graph.to_job(
        name=workflow,
        tags={**versioned.tags, "lifecycle/stable": "true"},
        metadata=versioned.metadata,
        resource_defs=dict(versioned.resource_defs),
        config=versioned.run_config,
        executor_def=versioned.executor_def,
        description=f"the active version of workflow {workflow} ({versioned.name} since the last reload)",
    )


@dataclass(frozen=True)
class SkippedDefinition:
    """A definition the code location could not build, with why."""

    name: str
    version: int
    error: str


def _dagster_defs(job: dg.JobDefinition) -> dict[str, object]:
    """The definitions Dagster requires to be uniquely named across a code location, by name: the
    job, its graph and each op (one definition per name: ``Conflicting definitions found in
    repository``; one definition used by two jobs, as a stable job shares its version's graph, is
    fine)."""
    defs: dict[str, object] = {node.name: node for node in job.all_node_defs}
    defs[job.graph.name] = job.graph
    defs[job.name] = job.graph  # a job is its graph's: a versioned job and its graph share a name
    return defs


def _name_clash(row_jobs: Sequence[dg.JobDefinition], taken: Mapping[str, str]) -> str | None:
    """Why the jobs of one row cannot join a code location whose names are ``taken`` (name -> the
    row that has it), or None: a name the row itself gives two definitions, or one already used."""
    own: dict[str, tuple[str, object]] = {}
    for job in row_jobs:
        for name, definition in sorted(_dagster_defs(job).items()):
            if name in own and own[name][1] is not definition:
                return f"the Dagster name '{name}' is used by both its job '{own[name][0]}' and its job '{job.name}'"
            if name in taken:
                return f"the Dagster name '{name}' is already used by workflow {taken[name]}"
            own.setdefault(name, (job.name, definition))
    return None


def _skipped(raw: object, error: str) -> SkippedDefinition:
    """A row that cannot be built, named as well as it can be (the row itself may be what is wrong)."""
    get = raw.get if isinstance(raw, Mapping) else (lambda _key: None)
    version = get("version")
    return SkippedDefinition(
        str(get("name")), version if isinstance(version, int) and not isinstance(version, bool) else 0, error
    )


def build_jobs(
    rows: Sequence[Mapping[str, Any]],
) -> tuple[list[dg.JobDefinition], list[SkippedDefinition]]:
    """Build every row's job and compensation job. A row that cannot be built (an invalid DAG or
    row, any error building it, or a Dagster name another row already uses) is skipped and reported
    with why, never fatal: one definition never takes the code location down. The resources (the
    agent registry) are loaded once, before any row, even when there is none.

    Raises:
        lifecycle_dagster.location.resources.AgentsSettingError: ``LIFECYCLE_DAGSTER_AGENTS`` is not
            usable: no job could run, so the load fails (never every row skipped).
        lifecycle_dagster.location.executors.ExecutorSettingError: ``LIFECYCLE_DAGSTER_EXECUTOR`` is
            not usable (the same).
        ValueError: ``LIFECYCLE_DAGSTER_BATCH`` is not usable (the same; the message names it).
    """
    resources = default_resources()
    executor_def()  # a bad LIFECYCLE_DAGSTER_EXECUTOR fails the load, as a bad registry does
    _ = Settings.from_env().batch  # so does a bad LIFECYCLE_DAGSTER_BATCH (else every row would be skipped)
    jobs: list[dg.JobDefinition] = []
    skipped: list[SkippedDefinition] = []
    taken: dict[str, str] = {}
    for raw in rows:
        try:
            row_jobs = [build_job(raw, resources), build_compensation_job(raw, resources)]
            row = DefinitionRow.from_mapping(raw)
            if row.is_active:  # the stable job: the workflow's name runs its active version
                row_jobs.insert(0, stable_job(row_jobs[0], row.name))
        except (DagValidationError, ValueError, RecursionError, dg.DagsterInvalidDefinitionError) as exc:
            skipped.append(_skipped(raw, str(exc)))
            continue
        except Exception as exc:  # whatever one row raises, the others still load
            skipped.append(_skipped(raw, f"cannot build its jobs: {type(exc).__name__}: {exc}"))
            continue
        clash = _name_clash(row_jobs, taken)
        if clash is not None:
            skipped.append(_skipped(raw, clash))
            continue
        label = DefinitionRow.from_mapping(raw).label
        taken.update((name, label) for job in row_jobs for name in _dagster_defs(job))
        jobs.extend(row_jobs)
    return jobs, skipped


def _undo_here(context: dg.OpExecutionContext, db: LifecycleDatabase, spec: UndoSpec, execution_id: str) -> UndoOutcome:
    """One undo attempt on the run's connection, its outcomes mapped to Dagster's retry or failure."""
    with db.run.connection() as conn:
        try:
            outcome = run_undo(
                conn,
                spec,
                execution_id=execution_id,
                run_id=context.run_id,
                attempt=context.retry_number + 1,
                registry=context.resources.lifecycle_agents,
                takeover=TAKEOVER_TAG in context.run.tags,
            )
        except UndoRetry as exc:
            context.log.warning(str(exc))
            raise dg.RetryRequested(max_retries=exc.max_attempts, seconds_to_wait=exc.delay_s) from exc
        except (UndoFailed, UndoStopped) as exc:
            raise dg.Failure(str(exc), metadata={"execution_id": execution_id}, allow_retries=False) from exc
    return outcome


def _undo_op(row: DefinitionRow, dag: Dag, stage_id: str) -> dg.OpDefinition:
    stage = dag.stage(stage_id)
    spec = UndoSpec(
        stage_id=stage.id,
        capability=stage.capability,
        compensate=stage.compensate,
        dependents=dag.descendants(stage.id),
        policy=resolve_policy(dag, stage.id),
        timeout_s=_bounded(stage.timeout_s if stage.timeout_s is not None else dag.default_timeout_s),
    )
    has_dependents = bool(dag.children(stage.id))

    def compute(context: dg.OpExecutionContext) -> None:
        db: LifecycleDatabase = context.resources.lifecycle_db
        tags = context.run.tags
        execution_id = tags.get(EXECUTION_ID_TAG)
        if not execution_id:
            raise dg.Failure(f"a compensation run needs the {EXECUTION_ID_TAG} tag", allow_retries=False)
        db.run.beat(execution_id)  # the run's heartbeat: a killed compensation run is taken over
        try:
            outcome = _undo_here(context, db, spec, execution_id)
        except psycopg.OperationalError as exc:
            raise _retry_when_db_lost(context, spec.stage_id, execution_id, exc) from exc
        context.add_output_metadata(
            {
                "execution_id": execution_id,
                "action": outcome.action,
                "voided": outcome.voided,
                "summary": outcome.summary,
                "execution_status": outcome.execution_status,
            }
        )

    return dg.op(
        name=undo_op_name(job_name(row.name, row.version), stage.id),
        ins={"after_dependents": dg.In(dg.Nothing)} if has_dependents else {},
        out=dg.Out(dg.Nothing),
        description=f"undo stage '{stage.id}' once every stage that depended on it is undone",
        tags={"lifecycle/stage": stage.id, "lifecycle/compensation": "true"},
        required_resource_keys={"lifecycle_db", "lifecycle_agents"},
    )(compute)


def build_compensation_job(
    definition: Mapping[str, Any], resources: Mapping[str, Any] | None = None
) -> dg.JobDefinition:
    """The compensation job of one ``workflow_definitions`` row: ``<job>__compensate``, one undo op
    per stage (node and step key ``undo_<stage>``), each waiting for the undo ops of the stages that
    depended on it (the forward edges reversed). Runs carry the ``lifecycle/execution_id`` tag.
    ``resources``: as :func:`build_job`.

    Raises:
        ValueError / DagValidationError / AgentsSettingError: as :func:`build_job`.
    """
    row = DefinitionRow.from_mapping(definition)
    dag = parse_dag(row.dag_schema)
    forward = job_name(row.name, row.version)
    order = tuple(reversed(dag.topological_order()))
    ops = {stage_id: _undo_op(row, dag, stage_id) for stage_id in order}
    inputs = {s: ("after_dependents", dag.children(s)) for s in order if dag.children(s)}
    deps = _aliased(ops, inputs, undo_node)
    name = compensation_job_name(forward)
    graph = dg.GraphDefinition(
        name=name,
        node_defs=list(ops.values()),
        dependencies=deps,
        description=f"compensation of workflow {row.label}: undo completed stages in reverse order",
    )
    return graph.to_job(
        name=name,
        tags={
            "lifecycle/workflow": row.name,
            "lifecycle/version": str(row.version),
            "lifecycle/definition_id": row.id,
            "lifecycle/compensation": "true",
        },
        metadata={"stages": len(order), "undo_order": ", ".join(order)},
        resource_defs=dict(resources) if resources is not None else default_resources(),
        executor_def=executor_def(),  # LIFECYCLE_DAGSTER_EXECUTOR (location/executors.py)
    )
