"""Batch rules of a ``dag_schema`` (stdlib only): the optional top-level ``batch`` object.

``"batch": {"max_executions": 500, "max_wait_s": 2}``: ``max_executions`` (required) is an integer
from 1 to :data:`MAX_BATCH_EXECUTIONS` (an integral number such as ``500.0`` counts, as for
``retry.max_attempts``); ``max_wait_s`` (optional, default :data:`DEFAULT_BATCH_WAIT_S`) a number
from 0 to :data:`MAX_BATCH_WAIT_S`. No other key. Booleans are not numbers, and a number must be
one a double can hold. ``"batch": null``, like no ``batch`` key, means no batching (the one
top-level key whose ``null`` is accepted). The database's ``lifecycle.dag_check_batch``
(``sql/schema/02_dag_validation.sql``) applies the same rules with the same messages, in the same
order: the object's type, its unknown keys (in code-point order), ``max_executions``, ``max_wait_s``.
"""

from __future__ import annotations

from typing import Any

from lifecycle_dagster.core.dag_structure import (
    MISSING,
    NOT_A_DOUBLE,
    TOP,
    Report,
    Where,
    _finite,
    _show,
    kind,
    quote,
)

#: the keys of a ``batch`` object
BATCH_KEYS = ("max_executions", "max_wait_s")
#: the most executions one batch may hold (``max_executions`` is from 1 to this)
MAX_BATCH_EXECUTIONS = 10000
#: the longest a batch may wait to fill, in seconds (``max_wait_s`` is from 0 to this)
MAX_BATCH_WAIT_S = 3600.0
#: ``max_wait_s`` when a ``batch`` object does not give it
DEFAULT_BATCH_WAIT_S = 5.0
#: where the batch's problems are: messages name each key by its path (``batch.max_wait_s``)
BATCH = Where("batch", "workflow DAG", (), "batch.")

_EXECUTIONS_RULE = f"an integer from 1 to {MAX_BATCH_EXECUTIONS}"
_WAIT_RULE = f"a number from 0 to {MAX_BATCH_WAIT_S:g}"


def _number(report: Report, value: object, key: str, rule: str) -> float | None:
    """``value`` (of ``batch.<key>``) when it is a number a double can hold; else add the problem
    (``wrong_type`` naming ``rule``, or ``bad_value``) and return None."""
    name = f"batch.{key}"
    if not isinstance(value, int | float) or isinstance(value, bool):
        report.add("wrong_type", BATCH, key, f"{name} must be {rule}, got {kind(value)}")
        return None
    if not _finite(value):
        report.add("bad_value", BATCH, key, f"{name} {NOT_A_DOUBLE}, got {_show(value)}")
        return None
    return value


def check_batch(report: Report, obj: dict[str, Any]) -> None:
    """Add the problems of ``obj["batch"]`` (absent or ``null``: none) to ``report``."""
    raw = obj.get("batch")
    if raw is None:
        return
    if not isinstance(raw, dict):
        report.add("wrong_type", TOP, "batch", f"batch must be an object or null, got {kind(raw)}")
        return
    for key in sorted(str(k) for k in raw if k not in BATCH_KEYS):
        report.add("unknown_key", BATCH, key, f"unknown key {quote('batch.' + key)}")
    most = _number(report, raw.get("max_executions", MISSING), "max_executions", _EXECUTIONS_RULE)
    if most is not None and not (float(most).is_integer() and 1 <= most <= MAX_BATCH_EXECUTIONS):
        report.add(
            "bad_value", BATCH, "max_executions", f"batch.max_executions must be {_EXECUTIONS_RULE}, got {_show(most)}"
        )
    if "max_wait_s" not in raw:
        return
    wait = _number(report, raw["max_wait_s"], "max_wait_s", _WAIT_RULE)
    if wait is not None and not 0 <= wait <= MAX_BATCH_WAIT_S:
        report.add("bad_value", BATCH, "max_wait_s", f"batch.max_wait_s must be {_WAIT_RULE}, got {_show(wait)}")
