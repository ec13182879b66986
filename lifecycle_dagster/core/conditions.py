"""Conditions on edges (stdlib only): JSON containment exactly as PostgreSQL's ``jsonb @>``.

An edge of a workflow DAG may carry ``when`` and ``unless`` patterns (``docs/branches.md``). A
pattern is a JSON object whose keys are ``output`` and/or ``context``; it is tested against the
document ``{"output": <the upstream stage's output>, "context": <the execution's context>}`` by
:func:`contains`, the Python mirror of the database's ``@>`` (PostgreSQL 15 docs, section 8.14.3
"jsonb Containment and Existence",
https://www.postgresql.org/docs/15/datatype-json.html#JSON-CONTAINMENT). The database decides at
run time; this module lets a definition be reasoned about (and tested) without one.
``tests/condition_cases.json`` pins both to the same answers.

JSON values are the decoded ones of :func:`json.loads`: ``dict`` (any :class:`~collections.abc.Mapping`
with string keys), ``list`` or ``tuple``, ``str``, ``bool``, ``None``, ``int``, ``float`` and
:class:`decimal.Decimal`. Numbers compare by value, as ``numeric`` does; a ``float`` holds the
number the JSON text was rounded to, so decode with ``parse_float=Decimal`` where digits beyond a
double's precision matter (``1.00000000000000001`` is not ``1`` in the database).
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from decimal import Decimal
from fractions import Fraction
from typing import Any

__all__ = ["PATTERN_KEYS", "contains", "edge_fires", "json_key"]

#: the keys a ``when``/``unless`` pattern may have (at least one)
PATTERN_KEYS = ("output", "context")


def _is_number(value: object) -> bool:
    return isinstance(value, int | float | Decimal) and not isinstance(value, bool)


def _is_array(value: object) -> bool:
    return isinstance(value, list | tuple)


def _scalar_equal(a: Any, b: Any) -> bool:
    """Two JSON scalars are equal: same type (a bool is never a number), equal value."""
    if _is_number(a) and _is_number(b):
        return bool(a == b)
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if a is None or b is None:
        return a is b
    return isinstance(a, str) and isinstance(b, str) and a == b


def _is_container(value: object) -> bool:
    return isinstance(value, Mapping) or _is_array(value)


def _deep_contains(doc: Any, pattern: Any) -> bool:
    """``doc @> pattern`` below the top level (PostgreSQL's ``JsonbDeepContains``): an object
    contains an object having each of its keys with a containing value; an array contains an
    array each of whose elements is an element of it (a scalar) or contained by one of its
    container elements (an array or object); containers of different types never contain."""
    if isinstance(doc, Mapping) and isinstance(pattern, Mapping):
        for key, wanted in pattern.items():
            if key not in doc:
                return False
            have = doc[key]
            if _is_container(wanted) or _is_container(have):
                if not (_is_container(wanted) and _is_container(have) and _deep_contains(have, wanted)):
                    return False
            elif not _scalar_equal(have, wanted):
                return False
        return True
    if _is_array(doc) and _is_array(pattern):
        nested = [d for d in doc if _is_container(d)]
        for wanted in pattern:
            if _is_container(wanted):
                if not any(_deep_contains(d, wanted) for d in nested):
                    return False
            elif not any(not _is_container(d) and _scalar_equal(d, wanted) for d in doc):
                return False
        return True
    return False


def contains(doc: Any, pattern: Any) -> bool:
    """Whether ``doc @> pattern`` in PostgreSQL (15 docs, 8.14.3 "jsonb Containment and
    Existence"): both are decoded JSON values (module docstring).

    * an object contains an object that has only keys it has, each with a value it contains
      (``{}`` is contained by every object);
    * an array contains an array each of whose elements it contains: a scalar element must be one
      of its elements, an array or object element must be contained by one of its array or object
      elements (order and duplicates do not matter; ``[]`` is contained by every array);
    * a scalar contains only an equal scalar: strings by their characters, numbers by value
      (``1``, ``1.0`` and ``1e0`` are equal), ``true`` is not ``1``, ``null`` only ``null``;
    * the one exception, at the top level only: an array contains a scalar that is one of its
      elements (``[1, 2] @> 1``; but ``[[1]] @> 1`` and ``{"a": [1]} @> {"a": 1}`` are false);
    * nothing else: an object never contains an array or a scalar, nor a scalar an array.
    """
    if not _is_container(pattern):
        if _is_array(doc):
            return any(not _is_container(d) and _scalar_equal(d, pattern) for d in doc)
        return not isinstance(doc, Mapping) and _scalar_equal(doc, pattern)
    if not _is_container(doc):
        return False
    return _deep_contains(doc, pattern)


def edge_fires(
    when: Mapping[str, Any] | None,
    unless: Mapping[str, Any] | None,
    output: Mapping[str, Any],
    context: Mapping[str, Any],
) -> bool:
    """Whether an edge fires after its upstream stage completed with ``output`` in an execution
    whose context is ``context``: ``when`` (a pattern, or ``None``: no condition) is contained by
    ``{"output": output, "context": context}`` and ``unless`` (likewise) is not. Patterns are JSON
    objects with the keys ``output`` and/or ``context`` (``docs/branches.md``); containment is
    :func:`contains`, PostgreSQL's ``@>`` (15 docs, 8.14.3 "jsonb Containment and Existence")."""
    doc = {"output": output, "context": context}
    if when is not None and not contains(doc, when):
        return False
    return unless is None or not contains(doc, unless)


def json_key(value: Any) -> Hashable:
    """A hashable key equal for two JSON values exactly when the database's jsonb ``=`` holds:
    object key order does not matter, numbers compare by value (``1`` equals ``1.0``), a bool is
    not a number, array order and duplicates matter."""
    if isinstance(value, Mapping):
        return ("object", frozenset((k, json_key(v)) for k, v in value.items()))
    if _is_array(value):
        return ("array", tuple(json_key(v) for v in value))
    if _is_number(value):
        try:
            return ("number", Fraction(value))
        except (ValueError, OverflowError):  # NaN or infinity: no JSON number, but never raise
            return ("number", repr(value))
    if isinstance(value, bool) or value is None:
        return ("literal", value)
    return ("string", value)
