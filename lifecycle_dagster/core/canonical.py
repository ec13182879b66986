"""The canonical form of an audit event (pure: no database), as the database computes it.

``workflow_events`` is hash-chained in the database (``sql/schema/08_audit.sql``); each event's

    hash = hex(SHA-256(UTF-8(prev_hash + "\\n" + canonical_event)))

where the canonical event is the canonical JSON (:func:`canonical_json`) of
``{"event_type", "execution_id", "id", "metadata", "stage_id", "timestamp"}`` with the timestamp in
UTC as ``YYYY-MM-DDTHH:MM:SS.ffffffZ``. This module computes that form and hash in Python exactly as
``lifecycle.audit_canonical_event`` and ``lifecycle.canonical_json`` do;
:mod:`lifecycle_dagster.store.audit` uses it to verify the stored chains.

The canonical JSON is this project's own form, version :data:`CANONICAL_FORM_VERSION`: object keys
sorted by Unicode code point (Postgres ``COLLATE "C"`` on UTF-8), no whitespace, strings escaped as
Postgres's ``to_json(text)`` escapes them (``json.dumps(ensure_ascii=False)``: ``\\"``, ``\\\\``,
``\\n``... and ``\\u00XX`` for the other control characters), and numbers written as jsonb prints
them: an exact decimal without exponent, trailing zeros kept, ``-0`` as ``0``. It is not RFC 8785
(JCS), which orders keys by UTF-16 code unit and writes numbers as ECMAScript doubles.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

CANONICAL_FORM_VERSION = 1
"""The version of the canonical form above. Every stored hash was computed with it, so changing the
form (key order, escaping, number printing, the event's fields or timestamp format) breaks every
chain: do that only as a new version that the database and this module both implement."""


def parse_jsonb_text(text: str) -> Any:
    """Decode a JSON text (as Postgres prints jsonb) keeping every number exact.

    Numbers become :class:`decimal.Decimal` (integers too, so no digit limit applies); objects
    ``dict``, arrays ``list``, strings ``str``, ``true``/``false``/``null`` ``bool``/``None``.

    Raises:
        ValueError: not JSON (``json.JSONDecodeError``), or NaN / Infinity.
    """

    def refuse(constant: str) -> None:
        raise ValueError(f"{constant} is not JSON")

    return json.loads(text, parse_float=Decimal, parse_int=Decimal, parse_constant=refuse)


def _number(value: Decimal) -> str:
    """A number as Postgres's numeric prints it: plain decimal, scale kept, no negative zero."""
    if not value.is_finite():
        raise ValueError(f"{value} is not a JSON number")
    if value.is_zero():
        value = abs(value)
    return format(value, "f")


def canonical_json(value: Any) -> str:
    """The canonical JSON text of ``value`` (form :data:`CANONICAL_FORM_VERSION`, module docstring).

    Equal to the database's ``lifecycle.canonical_json(jsonb)`` of the same document. ``value`` is
    a decoded JSON document: ``dict`` (string keys), ``list``/``tuple``, ``str``, ``bool``, ``None``,
    ``int``, ``float`` or ``Decimal``. For exact numbers decode with :func:`parse_jsonb_text`: a
    ``float`` is written as the shortest decimal that round-trips (``repr``), which is what Postgres
    stores when it is sent through ``json.dumps``, but not necessarily what a jsonb decoded into
    floats held.

    Raises:
        ValueError: NaN or infinity. TypeError: a value that is not JSON (or a non-string key).
    """
    parts: list[str] = []
    _write(value, parts)
    return "".join(parts)


def _write(value: Any, out: list[str]) -> None:
    if value is None:
        out.append("null")
    elif value is True:
        out.append("true")
    elif value is False:
        out.append("false")
    elif isinstance(value, str):
        out.append(json.dumps(value, ensure_ascii=False))
    elif isinstance(value, int):
        out.append(str(value))
    elif isinstance(value, float):
        out.append(_number(Decimal(repr(value))))
    elif isinstance(value, Decimal):
        out.append(_number(value))
    elif isinstance(value, Mapping):
        out.append("{")
        for i, key in enumerate(sorted(value)):
            if not isinstance(key, str):
                raise TypeError(f"JSON object keys are strings, got {type(key).__name__}")
            if i:
                out.append(",")
            out.append(json.dumps(key, ensure_ascii=False))
            out.append(":")
            _write(value[key], out)
        out.append("}")
    elif isinstance(value, list | tuple):
        out.append("[")
        for i, item in enumerate(value):
            if i:
                out.append(",")
            _write(item, out)
        out.append("]")
    else:
        raise TypeError(f"{type(value).__name__} is not a JSON value")


def format_timestamp(ts: datetime) -> str:
    """An event time in the canonical form: UTC, ``YYYY-MM-DDTHH:MM:SS.ffffffZ`` (microseconds).

    Raises:
        ValueError: a naive datetime (no time zone).
    """
    if ts.tzinfo is None:
        raise ValueError("an event timestamp must carry its time zone")
    u = ts.astimezone(UTC)
    return f"{u.year:04d}-{u.month:02d}-{u.day:02d}T{u.hour:02d}:{u.minute:02d}:{u.second:02d}.{u.microsecond:06d}Z"


def canonical_event(row: Mapping[str, Any]) -> bytes:
    """The UTF-8 bytes of one event's canonical form (``lifecycle.audit_canonical_event`` in SQL).

    ``row`` holds ``id`` (int), ``execution_id`` (UUID or its text, or None), ``event_type`` (str),
    ``stage_id`` (str or None), ``metadata`` (the jsonb's text as Postgres prints it — exact —, or
    a decoded document, see :func:`canonical_json`) and ``timestamp`` (an aware datetime).

    Raises:
        KeyError: a field is missing. ValueError, TypeError: a value has no canonical form.
    """
    metadata = row["metadata"]
    if isinstance(metadata, str | bytes):
        metadata = parse_jsonb_text(metadata.decode() if isinstance(metadata, bytes) else metadata)
    execution_id = row["execution_id"]
    document = {
        "event_type": row["event_type"],
        "execution_id": None if execution_id is None else str(execution_id),
        "id": int(row["id"]),
        "metadata": metadata,
        "stage_id": row["stage_id"],
        "timestamp": format_timestamp(row["timestamp"]),
    }
    return canonical_json(document).encode("utf-8")


def event_hash(prev_hash: str, row: Mapping[str, Any]) -> str:
    """``hex(SHA-256(UTF-8(prev_hash) + b"\\n" + canonical_event(row)))``: 64 lowercase hex digits."""
    return hashlib.sha256(prev_hash.encode("utf-8") + b"\n" + canonical_event(row)).hexdigest()


__all__ = [
    "CANONICAL_FORM_VERSION",
    "canonical_event",
    "canonical_json",
    "event_hash",
    "format_timestamp",
    "parse_jsonb_text",
]
