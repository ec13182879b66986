"""Dagster resources of the code location.

``lifecycle_db``       :class:`LifecycleDatabase` — where the orchestration schema lives, and the
                       application connections of the run (:class:`RunConnections`).
``lifecycle_request``  :class:`ExecutionRequest` — per-run input (context, execution id), set in
                       the run config under ``resources.lifecycle_request.config``.
``lifecycle_agents``   the :class:`~lifecycle_dagster.agents.AgentRegistry` stage ops call: the
                       built-in agents, or the registry ``LIFECYCLE_DAGSTER_AGENTS`` names
                       (``MODULE:FUNCTION``, as ``agent serve --registry`` takes it).
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import dagster as dg
import psycopg
import pydantic

from lifecycle_dagster import tracing
from lifecycle_dagster.agents import AgentRegistry
from lifecycle_dagster.agents.loading import load_registry
from lifecycle_dagster.engine.heartbeat import Heartbeat
from lifecycle_dagster.settings import Settings
from lifecycle_dagster.store.db import (
    Connection,
    application_name,
    give_back,
    resolve_dsn,
    reusable,
    reused_connection,
    take_connection,
)

#: seconds the run's op connection may sit unused before the next op checks it with a round trip
PING_AFTER_IDLE_S = 1.0


class RunConnections:
    """The application connections of one Dagster run in this process, at most two at a time:

    - the op connection (``application_name`` ``lifecycle-dagster op <run>``): taken at the first
      :meth:`connection` from the process's idle connections (or opened), used by each op of the
      run in turn, handed back at :meth:`close` for the next run of the process;
    - the run's one :class:`~lifecycle_dagster.engine.heartbeat.Heartbeat` (``lifecycle-dagster
      heartbeat <run>``), started by the first :meth:`beat` (a stage op), stopped at :meth:`close`.

    A stage op waiting for a queue task LISTENs on the op connection (no third connection).
    ``dsn``: called once, at the first use (it may start the embedded
    server). ``run_id``: the Dagster run (``None`` outside a run: no heartbeat). Safe across
    threads: an op asking while another op holds the op connection (two ops at once in one process,
    which Dagster's in-process and multiprocess executors never do) gets one of its own for its
    block. Never used across a fork: each process makes its own (see
    :func:`~lifecycle_dagster.store.db.take_connection`).
    """

    def __init__(self, dsn: Callable[[], str], run_id: str | None) -> None:
        self.run_id = run_id
        self._dsn_fn = dsn
        self._dsn: str | None = None
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._conn: Connection | None = None
        self._busy = False
        self._heartbeat: Heartbeat | None = None
        self._idle_since = time.monotonic()

    @property
    def dsn(self) -> str:
        """The URI the run connects to."""
        if self._dsn is None:
            self._dsn = self._dsn_fn()
        return self._dsn

    def beat(self, execution_id: str | None = None) -> None:
        """Start the run's heartbeat unless it beats already (no-op outside a run): stage ops and
        undo ops alike. ``execution_id``: the execution the run works on, named in the heartbeat's
        log lines (None: not known yet, e.g. the first op creates it)."""
        with self._lock:
            if self._heartbeat is None and self.run_id:
                self._heartbeat = Heartbeat(self.dsn, self.run_id, execution_id=execution_id)
                self._heartbeat.start()
            elif self._heartbeat is not None and execution_id:
                self._heartbeat.execution_id = execution_id

    @contextlib.contextmanager
    def connection(self) -> Iterator[Connection]:
        """The run's op connection (autocommit, dict rows) for the block. After a
        :class:`psycopg.OperationalError` or when left in a transaction it is closed, and the next
        block opens another.

        Raises:
            RuntimeError: used in another process than the one that made this object (a fork).
            psycopg.OperationalError: a connection could not be made.
        """
        if os.getpid() != self._pid:
            raise RuntimeError("RunConnections is used in a forked process; each process makes its own")
        with self._lock:
            mine = not self._busy
            self._busy = self._busy or mine
            conn, self._conn = (self._conn, None) if mine else (None, self._conn)
        if not mine:  # another op of this run holds the op connection right now
            with reused_connection(self.dsn, application_name("op", self.run_id)) as other:
                yield other
            return
        try:
            if conn is not None and not self._usable(conn):
                conn.close()
                conn = None
            if conn is None:
                conn = take_connection(self.dsn, application_name("op", self.run_id))
            yield conn
        except psycopg.OperationalError:
            if conn is not None:
                conn.close()
            raise
        finally:
            with self._lock:
                self._conn, self._busy, self._idle_since = conn, False, time.monotonic()

    def _usable(self, conn: Connection) -> bool:
        """Whether the kept op connection can serve the next op: open and idle, and, when it sat
        unused longer than :data:`PING_AFTER_IDLE_S` (a retry's wait, during which the server may
        have restarted or ended the session), answering a ``SELECT 1``."""
        if not reusable(conn):
            return False
        if time.monotonic() - self._idle_since <= PING_AFTER_IDLE_S:
            return True
        try:
            conn.execute("SELECT 1")
            return True
        except psycopg.Error:
            return False

    def close(self) -> None:
        """Stop the heartbeat; hand the op connection back to the process's idle connections;
        export the run's pending spans (a run worker may exit right after)."""
        with self._lock:
            heartbeat, self._heartbeat = self._heartbeat, None
            conn, self._conn = self._conn, None
        if heartbeat is not None:
            heartbeat.stop()
        if conn is not None and os.getpid() == self._pid:
            give_back(self.dsn, conn)
        tracing.flush()


class LifecycleDatabase(dg.ConfigurableResource):  # type: ignore[type-arg]
    """The orchestration database, and the application connections of the run.

    ``dsn``: libpq URI; empty (the default) means ``DATABASE_URL`` (unset in a run, step or Celery
    worker: :class:`~lifecycle_dagster.store.db.DatabaseUrlMissing`, never a private embedded server;
    see :func:`lifecycle_dagster.store.db.resolve_dsn`).

    Initialised once per run by the in-process executor (``execute_in_process``, ``lifecycle-dagster
    run`` and ``compensate``, and every run under ``LIFECYCLE_DAGSTER_EXECUTOR=in_process``) and once
    per step under the multiprocess and Celery executors (each step process or Celery task): its
    :attr:`run` (:class:`RunConnections`) bounds the application connections to two at a time (op +
    heartbeat) per run, or per step, and is closed when the run (or step) ends.
    """

    dsn: str = ""
    _run: RunConnections | None = pydantic.PrivateAttr(default=None)

    def resolved_dsn(self) -> str:
        """The URI to connect to."""
        return self.dsn or resolve_dsn()

    @contextlib.contextmanager
    def yield_for_execution(self, context: dg.InitResourceContext) -> Iterator[LifecycleDatabase]:
        """Dagster's per-run lifecycle: :attr:`run` for the run, closed at its end."""
        self._run = RunConnections(self.resolved_dsn, context.run_id)
        try:
            yield self
        finally:
            run, self._run = self._run, None
            run.close()

    @property
    def run(self) -> RunConnections:
        """The connections of the run this resource was initialised for.

        Raises:
            RuntimeError: the resource was not initialised by Dagster for a run.
        """
        if self._run is None:
            raise RuntimeError("lifecycle_db is used outside a Dagster run (no yield_for_execution)")
        return self._run


class ExecutionRequest(dg.ConfigurableResource):  # type: ignore[type-arg]
    """What one run executes.

    ``context``: the execution context (a JSON object, e.g. a customer profile) for a run that
    creates its execution; ``context_file``: a JSON file to read it from instead, by an ABSOLUTE
    path (the first stage op reads it, in whichever process or machine runs that step: a relative
    path would be read from each worker's directory, so it is refused); ``execution_id``: an
    existing ``workflow_executions`` row to adopt (the ``lifecycle/execution_id`` run tag takes
    precedence). When an execution is adopted, the row's own context is used.
    """

    context: dict[str, Any] = {}  # noqa: RUF012  (pydantic copies field defaults)
    context_file: str = ""
    execution_id: str = ""

    @pydantic.field_validator("context_file")
    @classmethod
    def _context_file_is_absolute(cls, value: str) -> str:
        if value and not Path(value).expanduser().is_absolute():
            raise ValueError(
                "context_file must be an absolute path (a relative one would be read from each worker's "
                f"directory): {value!r}; give its absolute path, or the context itself under `context`"
            )
        return value

    @pydantic.field_validator("execution_id")
    @classmethod
    def _execution_id_is_a_uuid(cls, value: str) -> str:
        if value:
            try:
                uuid.UUID(value)
            except ValueError:
                raise ValueError(f"execution_id must be a UUID, got {value!r}") from None
        return value

    def resolved_context(self) -> dict[str, Any]:
        """``context`` merged over the content of ``context_file``.

        Raises:
            dagster.Failure: the file is missing, not JSON, or not a JSON object.
        """
        base: dict[str, Any] = {}
        if self.context_file:
            path = Path(self.context_file).expanduser()
            try:
                loaded = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                raise dg.Failure(f"context_file {str(path)!r} could not be read as JSON: {exc}") from exc
            if not isinstance(loaded, dict):
                raise dg.Failure(f"context_file {str(path)!r} must hold a JSON object")
            base = loaded
        return {**base, **self.context}


def declared_request(required: Sequence[str], description: str | None = None) -> dg.ResourceDefinition:
    """The ``lifecycle_request`` resource of a job whose DAG declares its context (``context`` in
    the ``dag_schema``): :class:`ExecutionRequest`, its config field ``context`` a permissive
    object whose ``required`` keys are REQUIRED fields (any JSON value, each documented), so a run
    config giving a context without one of them is refused at launch, naming the missing key (the
    Launchpad shows it). ``context`` itself stays optional: a run adopting an execution (the
    sensors launch with the ``lifecycle/execution_id`` tag only) or reading ``context_file`` gives
    none; the stage op checks those (see ``job_factory``)."""
    about = f" ({description})" if description else ""
    keys = {
        key: dg.Field(dg.Any, description=f"required by the workflow's context declaration{about}") for key in required
    }
    schema = {
        "context": dg.Field(
            dg.Permissive(keys),  # type: ignore[no-untyped-call]
            is_required=False,
            description=f"the execution context (a JSON object){about}; it must hold {', '.join(required)}",
        ),
        "context_file": dg.Field(
            str, default_value="", description="a JSON file holding the context (relative to the working directory)"
        ),
        "execution_id": dg.Field(
            str, default_value="", description="an existing workflow_executions row to adopt (its own context is used)"
        ),
    }
    return dg.ResourceDefinition(
        resource_fn=lambda init: ExecutionRequest(**init.resource_config),
        config_schema=schema,
        description="what one run executes: its context (required keys declared by the workflow) or execution",
    )


#: names the registry of the code location's python agents: ``MODULE:FUNCTION`` (unset: the built-in five)
AGENTS_ENV = "LIFECYCLE_DAGSTER_AGENTS"


class AgentsSettingError(ValueError):
    """``LIFECYCLE_DAGSTER_AGENTS`` names no usable registry. Not a problem of one definition: the
    code location cannot load any job, so its load fails with this (the message names the variable
    and its value), and ``validate --all`` exits 1 with it."""


def configured_registry() -> AgentRegistry:
    """The registry ``LIFECYCLE_DAGSTER_AGENTS`` names (see
    :func:`lifecycle_dagster.agents.loading.load_registry`), else the five built-in agents.

    Raises:
        AgentsSettingError: the module, the function or what it returned is not usable (naming the
            variable).
    """
    ref = Settings.from_env().agents
    try:
        return load_registry(ref)
    except ValueError as exc:
        raise AgentsSettingError(
            f"{AGENTS_ENV}={ref!r} names no usable agent registry ({exc}); the code location loads no "
            f"job until it is fixed or unset (unset: the built-in agents)"
        ) from exc


def agents_resource(registry: AgentRegistry | None = None) -> dg.ResourceDefinition:
    """A resource that hands stage ops ``registry`` (default: :func:`configured_registry`).

    Raises:
        AgentsSettingError: no ``registry`` given and ``LIFECYCLE_DAGSTER_AGENTS`` is not usable.
    """
    return dg.ResourceDefinition.hardcoded_resource(
        registry if registry is not None else configured_registry(), "the agent registry"
    )


def default_resources() -> dict[str, Any]:
    """The resources every generated job is bound to (the agent registry loaded once per call:
    build every job of a load with one such dict).

    Raises:
        AgentsSettingError: ``LIFECYCLE_DAGSTER_AGENTS`` is not usable.
    """
    return {
        "lifecycle_db": LifecycleDatabase(),
        "lifecycle_request": ExecutionRequest.configure_at_launch(),
        "lifecycle_agents": agents_resource(),
    }
