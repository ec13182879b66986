"""Payload safety at the boundary between agents and Postgres.

Postgres ``text`` and ``jsonb`` cannot hold a NUL character, ``jsonb`` refuses lone UTF-16
surrogates, and a huge output would bloat every later stage's input. Agent *outputs* that break
these rules are rejected with a clear error (the attempt fails); error *texts* are sanitised so
that recording a failure can never fail.
"""

from __future__ import annotations

import json
import os
from typing import Any

#: default limit of one agent output, in bytes of UTF-8 JSON (LIFECYCLE_DAGSTER_MAX_OUTPUT_BYTES)
DEFAULT_MAX_OUTPUT_BYTES = 8 * 1024 * 1024
#: longest error text stored, in characters
MAX_ERROR_CHARS = 4000


def max_output_bytes() -> int:
    """The output size limit in bytes: ``LIFECYCLE_DAGSTER_MAX_OUTPUT_BYTES`` or 8 MiB.

    Raises:
        ValueError: the variable is not a positive integer.
    """
    raw = os.environ.get("LIFECYCLE_DAGSTER_MAX_OUTPUT_BYTES")
    if not raw:
        return DEFAULT_MAX_OUTPUT_BYTES
    value = int(raw)
    if value <= 0:
        raise ValueError(f"LIFECYCLE_DAGSTER_MAX_OUTPUT_BYTES must be > 0, got {raw!r}")
    return value


def check_output(output: object, limit: int | None = None, what: str = "agent output") -> str | None:
    """Why ``output`` cannot be stored as ``what`` (a stage output, a context), or None when it can.

    It must be a JSON object of JSON types (no NaN or infinity), with no NUL character and no lone
    surrogate in any string or key, and at most ``limit`` bytes (default :func:`max_output_bytes`)
    as UTF-8 JSON.
    """
    if not isinstance(output, dict):
        if what == "agent output":
            return f"agent returned {type(output).__name__}, not a JSON object"
        return f"{what} is a {type(output).__name__}, not a JSON object"
    try:
        text = json.dumps(output, allow_nan=False, ensure_ascii=False)
    except (TypeError, ValueError, RecursionError) as exc:
        return f"{what} is not JSON: {exc}"
    if "\x00" in text or "\\u0000" in text:
        return f"{what} contains a NUL character, which Postgres cannot store"
    try:
        size = len(text.encode("utf-8"))
    except UnicodeEncodeError:
        return f"{what} contains a lone UTF-16 surrogate, which is not valid Unicode"
    limit = limit if limit is not None else max_output_bytes()
    if size > limit:
        return f"{what} is {size} bytes, over the {limit}-byte limit"
    found = output.get("artifacts")
    if found is not None and not (
        isinstance(found, list)
        and all(isinstance(a, dict) and isinstance(a.get("kind"), str) and isinstance(a.get("key"), str) for a in found)
    ):
        return f'{what}: "artifacts" must be a list of {{"kind": string, "key": string, "data": ...}}'
    return None


def safe_text(value: Any, limit: int = MAX_ERROR_CHARS) -> str:
    """``str(value)`` made storable: NUL becomes ``\\x00``, lone surrogates become ``\\udXXX``,
    and text past ``limit`` characters is cut with a note of how much was cut."""
    text = str(value).replace("\x00", "\\x00")
    text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    if len(text) > limit:
        text = f"{text[:limit]}… ({len(text) - limit} more characters)"
    return text
