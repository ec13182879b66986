"""One trace per execution: the root span stored on the execution row, and the attributes its spans share.

The first run that traces an execution (its first stage op, with tracing on: see
:mod:`lifecycle_dagster.tracing`) opens a root span ``execution <workflow>`` in a new trace and
stores its ``traceparent`` on the row (``lifecycle.execution_set_trace_parent``, first writer wins:
another run's root, stored first, is kept and this one is dropped unexported); the root is ended at
once. Every later span of the execution, in whichever run or process (a retry, a resume, a
compensation run), is a child of the stored root, and a task inserted afterwards carries it to its
worker (``task_queue.trace_parent``, copied by ``lifecycle.task_fill``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from lifecycle_dagster import tracing
from lifecycle_dagster.store.db import Connection
from lifecycle_dagster.store.fetch import fetch_one
from lifecycle_dagster.store.transitions import execution_set_trace_parent


@dataclass(frozen=True)
class ExecutionTrace:
    """An execution's trace: ``trace_parent`` (its root span's W3C traceparent) and the attributes
    every span of the execution carries (execution id, workflow, version)."""

    trace_parent: str
    attributes: dict[str, tracing.AttributeValue] = field(default_factory=dict)

    def with_attributes(self, more: Mapping[str, tracing.AttributeValue | None]) -> dict[str, tracing.AttributeValue]:
        """The shared attributes plus ``more`` (None values left out)."""
        return {**self.attributes, **{k: v for k, v in more.items() if v is not None}}


#: the traces this process knows, by (database, execution id): an execution's trace never changes
_TRACES: dict[tuple[str, str], ExecutionTrace] = {}
_TRACES_MAX = 1024


def execution_trace(conn: Connection, execution_id: str, run_id: str) -> ExecutionTrace | None:
    """The trace of ``execution_id``, opened and stored on its row when it has none (see the module
    docstring); None when tracing is off (no database round trip then). ``run_id``: the Dagster
    run asking, recorded on a root span it opens.

    Raises:
        lifecycle_dagster.store.fetch.RowMissing: no such execution.
        psycopg.Error: the database could not be reached.
    """
    if not tracing.configure():
        return None
    key = (f"{conn.info.host}:{conn.info.port}/{conn.info.dbname}", execution_id)
    found = _TRACES.get(key)
    if found is not None:
        return found
    row = fetch_one(conn, "execution_trace", {"execution_id": execution_id})
    attributes: dict[str, tracing.AttributeValue] = {
        tracing.ATTR_EXECUTION_ID: execution_id,
        tracing.ATTR_WORKFLOW: str(row["workflow"]),
        tracing.ATTR_VERSION: int(row["version"]),
    }
    trace_parent = row["trace_parent"] or _open_root(conn, execution_id, run_id, attributes)
    if trace_parent is None:
        return None
    if len(_TRACES) >= _TRACES_MAX:
        del _TRACES[next(iter(_TRACES))]
    _TRACES[key] = ExecutionTrace(str(trace_parent), attributes)
    return _TRACES[key]


def _open_root(
    conn: Connection, execution_id: str, run_id: str, attributes: dict[str, tracing.AttributeValue]
) -> str | None:
    """Open the execution's root span and store it; return the traceparent the row holds (this
    root's, or another run's stored first, in which case this root is never exported)."""
    root = tracing.start_root(f"execution {attributes[tracing.ATTR_WORKFLOW]}", attributes)
    root.set_attribute(tracing.ATTR_RUN_ID, run_id)
    mine = tracing.trace_parent_of(root)
    if mine is None:
        return None
    stored = execution_set_trace_parent(conn, execution_id=execution_id, trace_parent=mine)
    if stored == mine:
        root.end()
    return stored
