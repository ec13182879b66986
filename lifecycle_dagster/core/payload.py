"""Payload safety at the boundary between agents and Postgres.

Postgres ``text`` and ``jsonb`` cannot hold a NUL character, ``jsonb`` refuses lone UTF-16
surrogates, and a huge output would bloat every later stage's input. Agent *outputs* that break
these rules are rejected with a clear error (the attempt fails); error *texts* are sanitised so
that recording a failure can never fail.

Limits (the database applies the same ones, ``sql/schema/01_guards.sql``): a payload (an
agent output, an execution context) is at most :func:`max_output_bytes` bytes as UTF-8 JSON and
nests at most :data:`MAX_JSON_DEPTH` objects or arrays deep: deeper documents cannot even be read
back by Python's ``json`` module (a ``RecursionError``).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from typing import Any

from lifecycle_dagster.settings import Settings

#: longest error text stored, in characters
MAX_ERROR_CHARS = 4000
#: deepest nesting of objects and arrays in a payload (``{}`` is 1 level, ``{"a": []}`` 2)
MAX_JSON_DEPTH = 100

_SURROGATE = re.compile("[\ud800-\udfff]")
_PLAIN_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_SCALARS = (str, int, float, bool, type(None))


class OutOfRange(float):
    """A JSON number a double cannot hold (``1e400`` overflows, ``1e-400`` rounds to 0), as read
    from a definition file: an infinite float, so every number check refuses it (the DAG
    validator with its "a number a double can hold" reason, as the database does, never as 0),
    that prints as written."""

    text: str

    def __new__(cls, text: str) -> OutOfRange:
        number = super().__new__(cls, "-inf" if text.lstrip().startswith("-") else "inf")
        number.text = text
        return number

    def __repr__(self) -> str:
        return self.text


def json_float(text: str) -> float:
    """The float of a JSON number's ``text`` (for ``json.loads``'s ``parse_float``), or an
    :class:`OutOfRange` when a double cannot hold it."""
    value = float(text)
    mantissa = re.split("[eE]", text, maxsplit=1)[0]
    if math.isinf(value) or (value == 0.0 and any(c in "123456789" for c in mantissa)):
        return OutOfRange(text)
    return value


_MAX_PATH_CHARS = 120


def max_output_bytes() -> int:
    """The output size limit in bytes: ``LIFECYCLE_DAGSTER_MAX_OUTPUT_BYTES`` or 8 MiB.

    Raises:
        ValueError: the variable is not a positive integer.
    """
    return Settings.from_env().max_output_bytes


def json_path(parts: list[str | int]) -> str:
    """``$.a[0]["b c"]``: a JSON path for messages (keys escaped as JSON strings, so a NUL or a lone
    surrogate in a key prints as ``\\u0000``; long paths are cut in the middle)."""
    text = "$" + "".join(
        f"[{p}]" if isinstance(p, int) else (f".{p}" if _PLAIN_KEY.fullmatch(p) else f"[{json.dumps(p)}]")
        for p in parts
    )
    if len(text) > _MAX_PATH_CHARS:
        text = text[: _MAX_PATH_CHARS // 2] + "…" + text[-_MAX_PATH_CHARS // 2 :]
    return text


def _key_text(key: object) -> str | None:
    """A key as json.dumps writes it, or None when json.dumps refuses it."""
    if isinstance(key, str):
        return key
    if isinstance(key, bool):
        return "true" if key else "false"
    if key is None:
        return "null"
    if isinstance(key, int):
        return str(key)
    if isinstance(key, float) and math.isfinite(key):
        return repr(key)
    return None


def _string_problem(text: str, what: str, where: str) -> str | None:
    if "\x00" in text:
        return f"{what} contains a NUL character at {where}, which Postgres cannot store"
    if _SURROGATE.search(text):
        return f"{what} contains a lone UTF-16 surrogate at {where}, which is not valid Unicode"
    return None


def find_problem(value: object, what: str = "agent output") -> str | None:
    """The first thing (depth first, in document order) that keeps ``value`` from being stored as
    JSON in Postgres, naming where it is: a NUL character or a lone surrogate in a string or a key,
    NaN or an infinity, a value of a type JSON does not have, nesting deeper than
    :data:`MAX_JSON_DEPTH`. ``None`` when there is none. Iterative: any depth is safe to check.
    """
    stack: list[tuple[object, tuple[str | int, ...]]] = [(value, ())]
    while stack:
        item, parts = stack.pop()
        if isinstance(item, str):
            problem = _string_problem(item, what, json_path(list(parts)))
            if problem:
                return problem
        elif isinstance(item, OutOfRange):
            return f"{what} holds {item!r} at {json_path(list(parts))}: a number a double cannot hold"
        elif isinstance(item, float) and not math.isfinite(item):
            return f"{what} is not JSON: {item!r} at {json_path(list(parts))} (JSON has no NaN or infinity)"
        elif isinstance(item, _SCALARS):
            continue
        elif isinstance(item, dict | list | tuple):
            if len(parts) + 1 > MAX_JSON_DEPTH:  # each step of the path is one enclosing level
                return (
                    f"{what} is nested more than {MAX_JSON_DEPTH} levels deep (objects and arrays)"
                    f" at {json_path(list(parts))}"
                )
            children: list[tuple[object, tuple[str | int, ...]]] = []
            pairs = item.items() if isinstance(item, dict) else enumerate(item)
            for key, child in pairs:
                step: str | int = key
                if isinstance(item, dict):
                    text = _key_text(key)
                    if text is None:
                        return f"{what} is not JSON: a key of type {type(key).__name__} at {json_path(list(parts))}"
                    problem = _string_problem(text, what, f"the key {json_path([*parts, text])}")
                    if problem:
                        return problem
                    step = text
                if child is None or isinstance(child, bool | int):
                    continue  # nothing to check, nothing to remember
                children.append((child, (*parts, step)))
            stack.extend(reversed(children))
        else:
            return f"{what} is not JSON: {type(item).__name__} at {json_path(list(parts))}"
    return None


def _too_deep(value: object) -> bool:
    """Whether ``value`` nests more than :data:`MAX_JSON_DEPTH` levels (containers only: cheap)."""
    stack: list[tuple[object, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            return True
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list | tuple) else ()
        stack.extend((child, depth + 1) for child in children if isinstance(child, dict | list | tuple))
    return False


def check_output(output: object, limit: int | None = None, what: str = "agent output") -> str | None:
    """Why ``output`` cannot be stored as ``what`` (a stage output, a context), or None when it can.

    It must be a JSON object of JSON types (no NaN or infinity), with no NUL character and no lone
    surrogate in any string or key, nested at most :data:`MAX_JSON_DEPTH` levels deep, and at most
    ``limit`` bytes (default :func:`max_output_bytes`) as UTF-8 JSON. The message names the JSON
    path of what is wrong.
    """
    if not isinstance(output, dict):
        if what == "agent output":
            return f"agent returned {type(output).__name__}, not a JSON object"
        return f"{what} is a {type(output).__name__}, not a JSON object"
    try:
        text = json.dumps(output, allow_nan=False, ensure_ascii=False)
    except (TypeError, ValueError, RecursionError) as exc:
        return find_problem(output, what) or f"{what} is not JSON: {exc}"
    try:
        size = len(text.encode("utf-8"))
    except UnicodeEncodeError:  # a lone surrogate somewhere: say where
        return find_problem(output, what) or f"{what} contains a lone UTF-16 surrogate, which is not valid Unicode"
    if "\\u0000" in text:  # a NUL somewhere, or only the six characters \u0000 in a string
        problem = find_problem(output, what)
        if problem:
            return problem
    if _too_deep(output):
        return find_problem(output, what)  # says where
    limit = limit if limit is not None else max_output_bytes()
    if size > limit:
        return f"{what} is {size} bytes, over the {limit}-byte limit"
    found = output.get("artifacts")
    if found is not None and not (
        isinstance(found, list)
        and all(isinstance(a, dict) and isinstance(a.get("kind"), str) and isinstance(a.get("key"), str) for a in found)
    ):
        return f'{what}: "artifacts" must be a list of {{"kind": string, "key": string, "data": ...}}'
    problem = end_problem(output)
    return None if problem is None else f"{what}: {problem}"


#: an early end's outcome (docs/branches.md): a name, as ``workflow_executions.outcome`` takes it
OUTCOME_RE = re.compile(r"^[a-z][a-z0-9_]{0,62}$")
#: an early end's reason, at most this many characters
MAX_END_REASON = 1000


def end_problem(output: Mapping[str, Any]) -> str | None:
    """What is wrong with ``output["end"]`` (None: no ``end``, or a good one): it must be
    ``{"outcome": <name>, "reason": <string of at most 1000 characters>}`` (reason optional).
    The same rule as SQL's ``lifecycle.end_problem``, word for word."""
    if "end" not in output:
        return None
    end = output["end"]
    if not isinstance(end, dict):
        return 'output.end must be an object {"outcome", "reason"}'
    if any(k not in ("outcome", "reason") for k in end):
        return 'output.end takes only "outcome" and "reason"'
    outcome = end.get("outcome")
    if not isinstance(outcome, str) or not OUTCOME_RE.fullmatch(outcome):
        return "output.end.outcome must be a name matching ^[a-z][a-z0-9_]{0,62}$"
    if "reason" in end and (not isinstance(end["reason"], str) or len(end["reason"]) > MAX_END_REASON):
        return "output.end.reason must be a string of at most 1000 characters"
    return None


def safe_text(value: Any, limit: int = MAX_ERROR_CHARS) -> str:
    """``str(value)`` made storable: NUL becomes ``\\x00``, lone surrogates become ``\\udXXX``,
    and text past ``limit`` characters is cut with a note of how much was cut."""
    text = str(value).replace("\x00", "\\x00")
    text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    if len(text) > limit:
        text = f"{text[:limit]}… ({len(text) - limit} more characters)"
    return text
