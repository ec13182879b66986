"""Prometheus metrics read from the database, and serving a metrics registry over HTTP.

:class:`DatabaseCollector` is a ``prometheus_client`` collector: each scrape runs the
``metrics_*`` queries of ``sql/queries.sql`` on one connection it keeps (opened again on the next
scrape when a query fails) and yields the families listed in ``docs/observability.md#metrics``.
It only reads.

Figures drawn from events (stage attempts, retries, lease expiries) are cumulative counters and
histograms, read incrementally so a scrape stays cheap however long the history: the collector
keeps the totals of the events older than a cutoff (the database's clock minus ``settle_s``
seconds, 30 by default) and, on each scrape, adds the events between the previous cutoff and the
new one (a range of ``workflow_events_timestamp_idx``), then adds, without keeping them, the events
after the new cutoff. The first scrape reads the whole history once. An event whose transaction
commits more than ``settle_s`` seconds after its timestamp was taken is missed by a collector that
had already passed it; one deleted (``audit_prune``) after it was counted stays counted until the
collector restarts (Prometheus reads the drop as a counter reset).

:func:`serve_registry` serves any registry on ``GET /metrics`` (a ``wsgiref`` server in a thread):
a scrape that raises answers 500 with the error, and the server keeps serving.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Iterator
from datetime import UTC, datetime
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import psycopg
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from lifecycle_dagster.store.db import Connection, connect
from lifecycle_dagster.store.sqlfiles import query

#: upper bounds (seconds) of the duration histograms' buckets (+Inf is added)
DURATION_BUCKETS_S: tuple[float, ...] = (
    0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0,
)  # fmt: skip
#: seconds after which an event is taken as committed for good (kept in the running totals)
SETTLE_S = 30.0
#: breaker states, in the order of ``lifecycle_breaker_state``'s series
BREAKER_STATES = ("closed", "half_open", "open")
_EARLIEST = datetime(1, 1, 1, tzinfo=UTC)
_LATEST = datetime(9999, 12, 31, tzinfo=UTC)

#: (workflow, version, stage, capability, agent, outcome, bucket) -> [attempts, seconds]
AttemptTotals = dict[tuple[str, str, str, str, str, str, int | None], list[float]]
#: (capability, agent) -> lease expiries
ExpiryTotals = dict[tuple[str, str], float]


def _add(into: dict[Any, Any], rows: Iterable[dict[str, Any]], key: Callable[[dict[str, Any]], Any]) -> None:
    """Add ``rows``' ``n`` (and ``seconds`` when present) into ``into`` under ``key(row)``."""
    for r in rows:
        k = key(r)
        if "seconds" in r:
            got = into.setdefault(k, [0.0, 0.0])
            got[0] += float(r["n"])
            got[1] += float(r["seconds"])
        else:
            into[k] = into.get(k, 0.0) + float(r["n"])


def _attempt_key(r: dict[str, Any]) -> tuple[str, str, str, str, str, str, int | None]:
    bucket = None if r["bucket"] is None else int(r["bucket"])
    return (r["workflow"], r["version"], r["stage"], r["capability"], r["agent"], r["outcome"], bucket)


class DatabaseCollector(Collector):
    """The database-side figures (see the module docstring); ``collect()`` raises
    ``psycopg.Error`` when the database cannot be read (the scrape fails, the next one reconnects)."""

    def __init__(
        self, dsn: str, *, settle_s: float = SETTLE_S, buckets: tuple[float, ...] = DURATION_BUCKETS_S
    ) -> None:
        self.dsn = dsn
        self.settle_s = settle_s
        self.buckets = buckets
        self._lock = threading.Lock()
        self._conn: Connection | None = None
        #: events up to this time are in the totals below (None: nothing read yet)
        self._cutoff: datetime | None = None
        self._attempts: AttemptTotals = {}
        self._expiries: ExpiryTotals = {}

    def collect(self) -> Iterator[Metric]:
        """One scrape: the families of ``docs/observability.md#metrics``.

        Raises:
            psycopg.Error: a query failed (the connection is dropped and opened again next time).
        """
        with self._lock:
            started = time.perf_counter()
            try:
                families = self._scrape(self._connection())
            except psycopg.Error:
                self.close()
                raise
            duration = GaugeMetricFamily(
                "lifecycle_metrics_scrape_duration_seconds", "Seconds the last scrape's queries took."
            )
            duration.add_metric([], time.perf_counter() - started)
        yield from families
        yield duration

    def warm(self) -> None:
        """Run a first scrape now (it reads the whole history of events once), discarding its output.

        Raises:
            psycopg.Error: as :meth:`collect`.
        """
        for _ in self.collect():
            pass

    def close(self) -> None:
        """Close the connection (the next scrape opens another)."""
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _connection(self) -> Connection:
        if self._conn is None or self._conn.closed or self._conn.broken:
            self._conn = connect(self.dsn, application_name="lifecycle-dagster metrics")
        return self._conn

    def _scrape(self, conn: Connection) -> list[Metric]:
        """Run the queries in one read-only snapshot; advance the running totals; build the families."""
        bounds = list(self.buckets)
        with conn.transaction():
            conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
            clock = conn.execute(query("metrics_clock"), {"settle_s": self.settle_s}).fetchone()
            assert clock is not None
            cutoff: datetime = clock["cutoff"]
            after = self._cutoff or _EARLIEST
            settled: tuple[AttemptTotals, ExpiryTotals] = ({}, {})
            if cutoff > after:
                settled = self._events(conn, after, cutoff, bounds)
            fresh = self._events(conn, max(after, cutoff), _LATEST, bounds)
            executions = conn.execute(query("metrics_executions")).fetchall()
            breakers = conn.execute(query("metrics_breakers")).fetchall()
            queue = conn.execute(query("metrics_queue")).fetchall()
        if cutoff > after:  # the whole scrape read: keep what settled
            _add(self._attempts, _rows(settled[0]), _attempt_key)
            _add(self._expiries, _expiry_rows(settled[1]), lambda r: (r["capability"], r["agent"]))
            self._cutoff = cutoff
        attempts: AttemptTotals = {k: list(v) for k, v in self._attempts.items()}
        _add(attempts, _rows(fresh[0]), _attempt_key)
        expiries = dict(self._expiries)
        _add(expiries, _expiry_rows(fresh[1]), lambda r: (r["capability"], r["agent"]))
        return [
            *_attempt_families(attempts, self.buckets),
            _expiry_family(expiries),
            *_execution_families(executions),
            _breaker_family(breakers),
            *_queue_families(queue),
        ]

    @staticmethod
    def _events(
        conn: Connection, after: datetime, until: datetime, bounds: list[float]
    ) -> tuple[AttemptTotals, ExpiryTotals]:
        """The stage attempts and lease expiries of events in (after, until]."""
        params = {"after": after, "until": until, "bounds": bounds}
        attempts: AttemptTotals = {}
        _add(attempts, conn.execute(query("metrics_stage_attempts"), params).fetchall(), _attempt_key)
        expiries: ExpiryTotals = {}
        _add(
            expiries,
            conn.execute(query("metrics_lease_expiries"), params).fetchall(),
            lambda r: (r["capability"], r["agent"]),
        )
        return attempts, expiries


def _rows(totals: AttemptTotals) -> Iterator[dict[str, Any]]:
    keys = ("workflow", "version", "stage", "capability", "agent", "outcome", "bucket")
    for k, (n, seconds) in totals.items():
        yield {**dict(zip(keys, k, strict=True)), "n": n, "seconds": seconds}


def _expiry_rows(totals: ExpiryTotals) -> Iterator[dict[str, Any]]:
    for (capability, agent), n in totals.items():
        yield {"capability": capability, "agent": agent, "n": n}


def _le(bound: float) -> str:
    """A bucket bound as Prometheus writes it (``1.0``, ``+Inf``)."""
    return "+Inf" if bound == float("inf") else repr(float(bound))


def _histogram(
    name: str, doc: str, labels: list[str], groups: dict[tuple[str, ...], list[float]], buckets: tuple[float, ...]
) -> HistogramMetricFamily:
    """A histogram family from ``{labels: [count per bucket index..., +Inf overflow, sum]}``."""
    family = HistogramMetricFamily(name, doc, labels=labels)
    for key, counts in sorted(groups.items()):
        cumulative, running = [], 0.0
        for le, n in zip((*buckets, float("inf")), counts[:-1], strict=True):
            running += n
            cumulative.append((_le(le), running))
        family.add_metric(list(key), cumulative, sum_value=counts[-1])
    return family


def _attempt_families(totals: AttemptTotals, buckets: tuple[float, ...]) -> list[Metric]:
    """Stage attempt durations, outcomes and retries; claim-to-complete per capability and agent."""
    by_stage: dict[tuple[str, ...], list[float]] = {}
    by_task: dict[tuple[str, ...], list[float]] = {}
    outcomes = CounterMetricFamily(
        "lifecycle_stage_outcomes",
        "Stage attempts that ended, by outcome (completed, failed, retrying).",
        labels=["workflow", "version", "stage", "agent", "outcome"],
    )
    retries: dict[tuple[str, ...], float] = {}
    counted: dict[tuple[str, ...], float] = {}
    for (workflow, version, stage, capability, agent, outcome, bucket), (n, seconds) in totals.items():
        key = (workflow, version, stage, agent, outcome)
        counted[key] = counted.get(key, 0.0) + n
        if outcome == "retrying":
            retries[key[:3]] = retries.get(key[:3], 0.0) + n
        if bucket is None:
            continue
        for groups, labels in ((by_stage, (workflow, version, stage)), (by_task, (capability, agent))):
            counts = groups.setdefault(labels, [0.0] * (len(buckets) + 2))
            counts[bucket] += n
            counts[-1] += seconds
    for outcome_key, n in sorted(counted.items()):
        outcomes.add_metric(list(outcome_key), n)
    retried = CounterMetricFamily(
        "lifecycle_stage_retries",
        "Stage attempts that ended in a scheduled retry.",
        labels=["workflow", "version", "stage"],
    )
    for stage_key, n in sorted(retries.items()):
        retried.add_metric(list(stage_key), n)
    return [
        _histogram(
            "lifecycle_stage_attempt_duration_seconds",
            "Stage attempt duration, from its task's claim to the attempt's end, in seconds.",
            ["workflow", "version", "stage"],
            by_stage,
            buckets,
        ),
        outcomes,
        retried,
        _histogram(
            "lifecycle_task_claim_to_complete_seconds",
            "Seconds from a stage task's claim to its result, by capability and agent.",
            ["capability", "agent"],
            by_task,
            buckets,
        ),
    ]


def _expiry_family(totals: ExpiryTotals) -> Metric:
    family = CounterMetricFamily(
        "lifecycle_task_lease_expiries",
        "Task leases that expired and were reaped (requeued, failed or cancelled).",
        labels=["capability", "agent"],
    )
    for key, n in sorted(totals.items()):
        family.add_metric(list(key), n)
    return family


def _execution_families(rows: list[dict[str, Any]]) -> list[Metric]:
    """Executions by status (gauge) and finished compensations by outcome (counter)."""
    executions = GaugeMetricFamily(
        "lifecycle_executions", "Executions by workflow, version and status.", labels=["workflow", "version", "status"]
    )
    compensations: dict[tuple[str, str], float] = {}
    for r in sorted(rows, key=lambda r: (r["workflow"], r["version"], r["status"])):
        executions.add_metric([r["workflow"], r["version"], r["status"]], float(r["n"]))
        if r["status"] in ("rolled_back", "compensation_failed"):
            key = (r["workflow"], r["status"])
            compensations[key] = compensations.get(key, 0.0) + float(r["n"])
    family = CounterMetricFamily(
        "lifecycle_compensations",
        "Compensations that finished, by outcome (rolled_back, compensation_failed).",
        labels=["workflow", "outcome"],
    )
    for key, n in sorted(compensations.items()):
        family.add_metric(list(key), n)
    return [executions, family]


def _breaker_family(rows: list[dict[str, Any]]) -> Metric:
    """One series per breaker and state: 1 for its current state, 0 for the others."""
    family = GaugeMetricFamily(
        "lifecycle_breaker_state",
        "Circuit breaker state: 1 on the series of the current state (closed, half_open, open), else 0.",
        labels=["scope", "agent", "capability", "state"],
    )
    for r in sorted(rows, key=lambda r: (r["scope"], r["agent"], r["capability"])):
        for state in BREAKER_STATES:
            family.add_metric([r["scope"], r["agent"], r["capability"], state], 1.0 if r["state"] == state else 0.0)
    return family


def _queue_families(rows: list[dict[str, Any]]) -> list[Metric]:
    depth = GaugeMetricFamily("lifecycle_queue_depth", "Pending tasks per capability.", labels=["capability"])
    age = GaugeMetricFamily(
        "lifecycle_queue_oldest_pending_age_seconds",
        "Seconds since the oldest pending task of the capability was created (0: none pending).",
        labels=["capability"],
    )
    for r in sorted(rows, key=lambda r: r["capability"]):
        depth.add_metric([r["capability"]], float(r["depth"]))
        age.add_metric([r["capability"]], float(r["oldest_age_s"]))
    return [depth, age]


# -- serving -------------------------------------------------------------------------------------
class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """Scrapes are not logged."""


def metrics_app(registry: CollectorRegistry) -> Callable[..., list[bytes]]:
    """A WSGI app: ``GET /metrics`` (or ``/``) answers the registry in the text format; a scrape
    that raises answers 500 with the error's type and message; other paths 404."""

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        if environ.get("PATH_INFO", "/") not in ("/", "/metrics"):
            start_response("404 Not Found", [("Content-Type", "text/plain; charset=utf-8")])
            return [b"not found: try /metrics\n"]
        try:
            body = generate_latest(registry)
        except Exception as exc:  # the server keeps serving; the scraper sees why
            start_response("500 Internal Server Error", [("Content-Type", "text/plain; charset=utf-8")])
            return [f"scrape failed: {type(exc).__name__}: {exc}\n".encode()]
        start_response("200 OK", [("Content-Type", CONTENT_TYPE_LATEST)])
        return [body]

    return app


def serve_registry(registry: CollectorRegistry, host: str, port: int) -> WSGIServer:
    """Serve ``registry`` (see :func:`metrics_app`) on ``host:port`` (0: a free port; the bound one
    is ``server.server_port``) from a daemon thread; stop it with ``server.shutdown()`` then
    ``server.server_close()``.

    Raises:
        OSError: the address cannot be bound.
    """
    server = make_server(host, port, metrics_app(registry), handler_class=_QuietHandler)
    threading.Thread(target=server.serve_forever, name=f"metrics-{server.server_port}", daemon=True).start()
    return server
