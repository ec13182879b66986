"""``lifecycle-dagster agent serve``: run an external worker for a queue agent."""

from __future__ import annotations

import signal
import threading
from typing import Any

import click

from lifecycle_dagster.cli.common import dsn as _dsn
from lifecycle_dagster.cli.common import main


@main.group("agent")
def agent_group() -> None:
    """External agents that take their work from task_queue."""


@agent_group.command("serve")
@click.option("--agent", "agent_name", required=True, help="The agents.name this worker serves.")
@click.option("--concurrency", default=1, show_default=True, type=click.IntRange(1, 256))
@click.option("--lease-s", default=30.0, show_default=True, type=click.FloatRange(0.1), help="Lease length, seconds.")
@click.option(
    "--poll-s", default=1.0, show_default=True, type=click.FloatRange(0.05), help="Polling fallback, seconds."
)
@click.option("--grace-s", default=30.0, show_default=True, type=click.FloatRange(0), help="Shutdown grace, seconds.")
@click.option(
    "--max-task-s",
    default=None,
    type=click.FloatRange(0),
    help="Seconds the agent may run on one task at most; the stage's timeout ends it sooner. At the "
    "limit the agent (run in a child process) is killed, the task failed with code 'timeout' "
    "(retryable) and the slot freed. 0: no limit but the stage's timeout (a task without one runs "
    "in this process and cannot be stopped). [default: LIFECYCLE_DAGSTER_MAX_TASK_S, else "
    "LIFECYCLE_DAGSTER_QUEUE_WAIT_S, 3600]",
)
@click.option(
    "--registry",
    "registry_ref",
    default="lifecycle_dagster.agents:default_registry",
    show_default=True,
    help="MODULE:FUNCTION returning the AgentRegistry that holds the agent's code (MODULE alone: MODULE:registry).",
)
@click.option(
    "--log-format",
    type=click.Choice(["text", "json"]),
    default=None,
    help="text: 'time level message'; json: one JSON object per line with execution_id, stage, attempt, "
    "task_id (and trace_id when a span is current). [default: LIFECYCLE_DAGSTER_LOG_FORMAT, else text]",
)
@click.option(
    "--metrics-port",
    default=None,
    type=click.IntRange(0, 65535),
    help="Serve this worker's Prometheus metrics on http://HOST:PORT/metrics (0: a free port, printed).",
)
@click.option("--metrics-host", default="0.0.0.0", show_default=True, help="Address the metrics server binds.")
def serve_cmd(
    agent_name: str,
    concurrency: int,
    lease_s: float,
    poll_s: float,
    grace_s: float,
    max_task_s: float | None,
    registry_ref: str,
    log_format: str | None,
    metrics_port: int | None,
    metrics_host: str,
) -> None:
    """Claim and run the agent's tasks until SIGTERM or SIGINT (running tasks finish first).

    A task with a time limit (its stage's timeout, or --max-task-s) runs its agent in a child
    process that is killed at the limit; the agent must then be a module-level class (picklable).
    """
    from lifecycle_dagster.agents.loading import load_registry
    from lifecycle_dagster.core.logs import configure
    from lifecycle_dagster.queue.worker import Worker
    from lifecycle_dagster.settings import Settings

    try:
        configure(log_format or Settings.from_env().log_format)
        limit = Settings.from_env().max_task_s if max_task_s is None else max_task_s
        registry = load_registry(registry_ref)
        worker = Worker(
            _dsn(),
            agent_name,
            registry,
            concurrency=concurrency,
            lease_s=lease_s,
            poll_s=poll_s,
            grace_s=grace_s,
            max_task_s=limit or None,
        )
    except (ValueError, KeyError) as exc:
        raise click.ClickException(str(exc.args[0] if exc.args else exc)) from exc
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    click.echo(f"serving {agent_name} as {worker.worker_id} (concurrency {concurrency})")
    server = None if metrics_port is None else _serve_metrics(worker.metrics.registry, metrics_host, metrics_port)
    try:
        worker.run(stop)
    finally:
        if server is not None:
            server.shutdown()
            server.server_close()
    click.echo(f"stopped after {worker.completed} completed task(s)")


def _serve_metrics(registry: Any, host: str, port: int) -> Any:
    """Serve the worker's metrics registry on ``host:port`` (a thread); print the address."""
    from lifecycle_dagster.store.metrics import serve_registry

    try:
        server = serve_registry(registry, host, port)
    except OSError as exc:
        raise click.ClickException(f"cannot serve metrics on {host}:{port}: {exc}") from exc
    click.echo(f"metrics on http://{host}:{server.server_port}/metrics")
    return server


@agent_group.command("limits")
def limits_cmd() -> None:
    """Set each capability's Dagster pool (``lifecycle_<capability>``, the pool of its stage ops) to
    the sum of the concurrency limits (agents.config ->> 'concurrency') of the active agents serving
    it; a capability with an agent that has no limit is left unlimited. Prints what it set.
    """
    from dagster import DagsterInstance

    from lifecycle_dagster.cli.common import dagster_home as _home
    from lifecycle_dagster.location.job_factory import capability_pool
    from lifecycle_dagster.settings import Settings
    from lifecycle_dagster.store.db import connect
    from lifecycle_dagster.store.sqlfiles import query

    dsn = _dsn()
    with connect(dsn) as conn:
        rows = conn.execute(query("capability_limits")).fetchall()
    instance = DagsterInstance.from_config(str(_home(Settings.from_env(), dsn)))
    try:
        for r in rows:
            pool = capability_pool(str(r["capability"]))
            if r["slots"] is None:
                click.echo(f"{pool}: unlimited (an agent of it has no concurrency limit)")
                continue
            instance.event_log_storage.set_concurrency_slots(pool, int(r["slots"]))
            click.echo(f"{pool}: {int(r['slots'])}")
    finally:
        instance.dispose()
