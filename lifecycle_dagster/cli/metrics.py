"""``lifecycle-dagster metrics serve``: the database-side Prometheus metrics over HTTP."""

from __future__ import annotations

import signal
import threading

import click

from lifecycle_dagster.cli.common import dsn as _dsn
from lifecycle_dagster.cli.common import main


@main.group("metrics")
def metrics_group() -> None:
    """Prometheus metrics read from the database."""


@metrics_group.command("serve")
@click.option("--port", required=True, type=click.IntRange(0, 65535), help="Port to serve on (0: a free one, printed).")
@click.option("--host", default="0.0.0.0", show_default=True, help="Address to bind.")
@click.option(
    "--settle-s",
    default=30.0,
    show_default=True,
    type=click.FloatRange(0),
    help="Seconds after which an event is taken as committed for good and kept in the running totals.",
)
def serve_cmd(port: int, host: str, settle_s: float) -> None:
    """Serve http://HOST:PORT/metrics until SIGTERM or SIGINT: each scrape runs a few queries on
    one connection (opened again after a failure; a failed scrape answers 500 with the error).
    The whole history of events is read once before serving (seconds at a million events).
    Every metric, its labels and units: docs/observability.md#metrics.
    """
    import psycopg
    from prometheus_client import CollectorRegistry

    from lifecycle_dagster.store.metrics import DatabaseCollector, serve_registry

    collector = DatabaseCollector(_dsn(), settle_s=settle_s)
    registry = CollectorRegistry()
    registry.register(collector)
    try:  # the first scrape reads the whole history: done before serving, not in a scraper's timeout
        collector.warm()
    except psycopg.Error as exc:
        click.echo(f"warning: the first read failed ({exc}); each scrape tries again", err=True)
    try:
        server = serve_registry(registry, host, port)
    except OSError as exc:
        raise click.ClickException(f"cannot serve metrics on {host}:{port}: {exc}") from exc
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    click.echo(f"metrics on http://{host}:{server.server_port}/metrics")
    try:
        stop.wait()
    finally:
        server.shutdown()
        server.server_close()
        collector.close()
