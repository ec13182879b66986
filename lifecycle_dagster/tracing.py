"""OpenTelemetry traces: the process's tracer, spans continued from a W3C ``traceparent``.

Configured only by the standard ``OTEL_*`` variables (:attr:`Settings.traces_exporters
<lifecycle_dagster.settings.Settings.traces_exporters>`): with ``OTEL_TRACES_EXPORTER`` (``console``,
``otlp``) or an OTLP endpoint set, the first span of a process installs an SDK ``TracerProvider``
(once per process, as the global provider unless one is installed already) with a batching
processor per exporter; ``otlp`` is OTLP over HTTP/protobuf to ``OTEL_EXPORTER_OTLP_ENDPOINT``
(``/v1/traces`` appended) or ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``. With none set, the SDK is never
imported, :func:`enabled` is False and :func:`span` yields the API's invalid (no-op) span without
touching the tracer: no cost beyond that check.

Processes: each process configures itself at its first span (a Dagster run worker, each step
process of the multiprocess executor, an ``agent serve`` worker). Agent children forked from the
forkserver (:mod:`lifecycle_dagster.agents.invoke`) make no spans; an http agent gets the
traceparent as a value. Spans are batched: :func:`flush` exports what is pending (a run's
resources call it when they close; the provider also flushes at interpreter exit).

Names and attributes (``ATTR_*``): ``execution <workflow>`` (an execution's root, ended at once),
``stage <stage_id>`` (one attempt), ``agent <name>`` (one agent call), ``undo <stage_id>``,
``worker <agent>`` (a task run by ``agent serve``).
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from lifecycle_dagster.settings import Settings

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider

log = logging.getLogger(__name__)

#: the instrumentation scope of every span
TRACER_NAME = "lifecycle_dagster"
#: ``service.name`` when neither ``OTEL_SERVICE_NAME`` nor ``OTEL_RESOURCE_ATTRIBUTES`` names one
DEFAULT_SERVICE_NAME = "lifecycle-dagster"

ATTR_EXECUTION_ID = "lifecycle.execution_id"
ATTR_WORKFLOW = "lifecycle.workflow"
ATTR_VERSION = "lifecycle.version"
ATTR_STAGE = "lifecycle.stage"
ATTR_ATTEMPT = "lifecycle.attempt"
ATTR_AGENT = "lifecycle.agent"
ATTR_CAPABILITY = "lifecycle.capability"
ATTR_OUTCOME = "lifecycle.outcome"
ATTR_ERROR_CODE = "lifecycle.error_code"
ATTR_TASK_ID = "lifecycle.task_id"
ATTR_RUN_ID = "dagster.run_id"

#: a span attribute value (OpenTelemetry accepts these scalars)
AttributeValue = str | bool | int | float

_lock = threading.Lock()
_configured = False
#: a provider given by :func:`use_provider` (tests, an embedding application), ahead of the global one
_override: Any = None
_propagator = TraceContextTextMapPropagator()


def configure() -> bool:
    """Install the SDK provider the ``OTEL_*`` variables ask for, once per process; return
    :func:`enabled`. A bad setting is logged (naming the variable) and leaves tracing off: tracing
    never stops a stage."""
    global _configured
    if not _configured:
        with _lock:
            if not _configured:
                _configured = True
                try:
                    exporters = Settings.from_env().traces_exporters
                except ValueError as exc:
                    log.error("traces are off: %s", exc)
                    exporters = ()
                if exporters and isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider):
                    trace.set_tracer_provider(_sdk_provider(exporters))
    return enabled()


def _sdk_provider(exporters: tuple[str, ...]) -> TracerProvider:
    """An SDK provider with a :class:`BatchSpanProcessor` per exporter (``console``, ``otlp``)."""
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter

    resource = Resource.create()
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: DEFAULT_SERVICE_NAME}))
    provider = TracerProvider(resource=resource)
    for name in exporters:
        exporter: SpanExporter = ConsoleSpanExporter() if name == "console" else OTLPSpanExporter()
        provider.add_span_processor(BatchSpanProcessor(exporter))
    return provider


def use_provider(provider: Any) -> None:
    """Make spans with ``provider`` (an SDK ``TracerProvider``) instead of the configured one;
    None goes back to the configured one. For tests and applications that embed the engine."""
    global _override
    _override = provider


def _provider() -> Any:
    return _override if _override is not None else trace.get_tracer_provider()


def enabled() -> bool:
    """Whether spans are recorded: a provider was given or installed (else the API's no-op)."""
    return not isinstance(_provider(), trace.ProxyTracerProvider | trace.NoOpTracerProvider)


def tracer() -> trace.Tracer:
    """The tracer of :data:`TRACER_NAME` (the API's no-op tracer when tracing is off)."""
    configure()
    return _provider().get_tracer(TRACER_NAME)  # type: ignore[no-any-return]


def flush(timeout_ms: int = 5000) -> None:
    """Export the spans the batching processors still hold (no-op when tracing is off)."""
    force_flush = getattr(_provider(), "force_flush", None)
    if force_flush is not None and enabled():
        force_flush(timeout_ms)


def context_of(trace_parent: str | None) -> Context:
    """The context whose current span is the one ``trace_parent`` names (W3C ``traceparent``);
    an empty context (a new trace) for None or a malformed value."""
    return _propagator.extract({"traceparent": trace_parent}) if trace_parent else Context()


def trace_parent_of(span: trace.Span) -> str | None:
    """The W3C ``traceparent`` of ``span`` (``00-<trace id>-<span id>-<flags>``), None for an invalid one."""
    ctx = span.get_span_context()
    if not ctx.is_valid:
        return None
    return f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{int(ctx.trace_flags):02x}"


def start_root(name: str, attributes: Mapping[str, AttributeValue]) -> trace.Span:
    """A span opening a new trace (not ended: the caller ends it, or drops it unended to export nothing)."""
    return tracer().start_span(name, context=Context(), attributes=dict(attributes))


@contextlib.contextmanager
def span(
    name: str,
    *,
    parent: str | None = None,
    attributes: Mapping[str, AttributeValue] | None = None,
    kind: SpanKind = SpanKind.INTERNAL,
    start_time_ns: int | None = None,
) -> Iterator[trace.Span]:
    """A span for the block, current inside it: a child of ``parent`` (a ``traceparent``) when
    given, else of the current span. An exception leaving the block is recorded and sets status
    ERROR. With tracing off, yields the no-op span and does nothing else."""
    if not configure():
        yield trace.INVALID_SPAN
        return
    context = context_of(parent) if parent else None
    with tracer().start_as_current_span(
        name, context=context, kind=kind, attributes=dict(attributes or {}), start_time=start_time_ns
    ) as current:
        yield current


def end_with(current: trace.Span, outcome: str, error_code: str | None = None, message: str | None = None) -> None:
    """Set ``lifecycle.outcome`` (and ``lifecycle.error_code``); a code means status ERROR."""
    current.set_attribute(ATTR_OUTCOME, outcome)
    if error_code:
        current.set_attribute(ATTR_ERROR_CODE, error_code)
        current.set_status(Status(StatusCode.ERROR, message or error_code))


def current_trace_parent() -> str | None:
    """The W3C ``traceparent`` of the current span (None: no span, or tracing is off)."""
    return trace_parent_of(trace.get_current_span())
