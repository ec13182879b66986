"""Log lines as JSON: one object per line (``--log-format json``, ``LIFECYCLE_DAGSTER_LOG_FORMAT=json``).

Each line holds ``ts`` (ISO 8601, UTC), ``level``, ``logger`` and ``message``, then whichever of
:data:`FIELDS` the call passed in ``extra`` (``log.info("...", extra={"execution_id": ...,
"stage": ..., "attempt": ..., "task_id": ...})``), ``trace_id`` (32 hex digits) when an
OpenTelemetry span is current (the package is optional: without it there is none), and ``exc``
(the traceback) when one is logged. Standard library only.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any, TextIO

#: the ``extra`` keys copied into a JSON line, in this order
FIELDS = ("execution_id", "stage", "attempt", "task_id", "run_id", "agent", "capability", "duration_ms", "trace_id")
#: marks the handler :func:`configure` installs, so configuring twice replaces it
_HANDLER_NAME = "lifecycle_dagster.json"


def current_trace_id() -> str | None:
    """The trace id (32 lower-case hex digits) of the current OpenTelemetry span, or None (no span,
    or the ``opentelemetry`` package is not installed)."""
    try:
        from opentelemetry import trace
    except ImportError:
        return None
    ctx = trace.get_current_span().get_span_context()
    return format(ctx.trace_id, "032x") if ctx.is_valid else None


class JsonFormatter(logging.Formatter):
    """Formats a record as one JSON object (see the module docstring); values that are not JSON
    are written as their ``str``."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key in FIELDS:
            value = getattr(record, key, None)
            if value is not None:
                out[key] = value
        if "trace_id" not in out:
            trace_id = current_trace_id()
            if trace_id is not None:
                out["trace_id"] = trace_id
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str, ensure_ascii=False)


def configure(fmt: str, *, logger: str | None = None, stream: TextIO | None = None) -> logging.Logger:
    """Send ``logger``'s records (None: the root logger) at INFO and above to ``stream`` (default
    stderr) as ``fmt``: ``json`` (:class:`JsonFormatter`) or ``text`` (``time level message``).
    A named logger then stops passing its records to the root's handlers (no line twice).
    Calling it again replaces the handler it installed. Returns the logger.

    Raises:
        ValueError: ``fmt`` is neither ``json`` nor ``text``.
    """
    if fmt not in ("json", "text"):
        raise ValueError(f"log format must be json or text, got {fmt!r}")
    target = logging.getLogger(logger)
    for h in [h for h in target.handlers if h.get_name() == _HANDLER_NAME]:
        target.removeHandler(h)
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.set_name(_HANDLER_NAME)
    handler.setFormatter(
        JsonFormatter() if fmt == "json" else logging.Formatter("%(asctime)s %(levelname)s %(message)s")
    )
    target.addHandler(handler)
    target.setLevel(logging.INFO)
    if logger is not None:
        target.propagate = False
    return target
