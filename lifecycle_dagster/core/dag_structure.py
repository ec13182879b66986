"""Structure rules of a ``dag_schema`` (stdlib only): the document's shape, value types, stage ids,
size limits, ``next``/``edges`` agreement (conditions included), the ``when``/``unless`` patterns,
the stage kinds (``agent``, ``approval``) and their keys, the ``retry``/``timeout_s``/``compensate``
fields and the ``context`` declaration.

:mod:`lifecycle_dagster.core.dag` documents the schema and every rule and walks the document,
applying these and the graph rules of :mod:`lifecycle_dagster.core.dag_graph` in the order the
database's ``lifecycle.dag_validate`` reports them (``sql/schema/02_dag_validation.sql``). This
module also holds what both rule families share: :class:`Problem`, :class:`Where` and
:class:`Report`, which builds each problem's path, stages and message.
"""

from __future__ import annotations

import math
import re
from collections.abc import Hashable, Iterable, Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, TypeGuard

from lifecycle_dagster.core.conditions import PATTERN_KEYS, json_key

STAGE_ID_PATTERN = r"^[a-z][a-z0-9_]{0,62}$"
ON_FAILURE_MODES = ("compensate", "hold")
JITTER_MODES = ("none", "full", "equal")
#: a stage's ``kind``; absent means ``agent``
STAGE_KINDS = ("agent", "approval")
#: an approval stage's ``on_timeout`` (default ``reject``) and ``on_reject`` (default ``end``)
ON_TIMEOUT_MODES = ("reject", "approve", "fail")
ON_REJECT_MODES = ("end", "fail", "branch")
#: an entry of an approval stage's ``approvers``: a user id (a UUID, any case) or ``role:<name>``
APPROVER_PATTERN = (
    r"^([0-9A-Fa-f]{8}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{12}|role:[A-Za-z0-9_.:-]{1,63})$"
)
#: most entries ``stages`` may have (the database's lifecycle.dag_validate has the same limit)
MAX_STAGES = 500
#: most edge entries a DAG may have: the entries of ``edges`` plus those of every ``next`` array
MAX_EDGES = 5000

ID_RE = re.compile(STAGE_ID_PATTERN)
#: the value of an absent key (``None`` is JSON ``null``, which is never accepted for one)
MISSING: Any = object()
_TOP_KEYS = ("stages", "edges", "defaults", "on_failure", "context", "schedule", "batch")
_CONTEXT_KEYS = ("required", "example", "description")
_STAGE_KEYS = (
    "id",
    "kind",
    "capability",
    "next",
    "description",
    "retry",
    "timeout_s",
    "compensate",
    "approvers",
    "on_timeout",
    "on_reject",
)
#: keys only an approval stage has; an agent stage's keys an approval stage has not
APPROVAL_ONLY_KEYS = ("approvers", "on_timeout", "on_reject")
AGENT_ONLY_KEYS = ("capability", "retry", "compensate")
EDGE_KEYS = ("from", "to", "when", "unless")
NEXT_ENTRY_KEYS = ("to", "when", "unless")
APPROVER_RE = re.compile(APPROVER_PATTERN)
_RETRY_KEYS = ("max_attempts", "base_delay_s", "max_delay_s", "multiplier", "jitter", "non_retryable")
_SURROGATE = re.compile("[\ud800-\udfff]")
#: why a number is refused that a double cannot hold (JSON 1e400, 1e-400; a Python inf or 10**400)
NOT_A_DOUBLE = "must be a number a double can hold (finite, and not so small that it rounds to 0)"
#: stage ids that would give a stage op the name of a generated Dagster name: the op of stage
#: ``compensate`` would be ``<job>__compensate``, the compensation job's name
RESERVED_STAGE_IDS = ("compensate",)


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a ``dag_schema``.

    ``code``: not_an_object, empty_dag, duplicate_stage, bad_stage_id, unknown_stage, self_loop,
    cycle, missing_capability, unknown_key, wrong_type, bad_value, next_edges_mismatch or
    duplicate_edge. ``stages``: the ids concerned (never ``''``; empty for DAG-level problems).
    ``path``: where, e.g. ``"stages[2].retry.max_attempts"``, ``"edges[0].to"``, ``""`` for the
    whole document. ``message``: a sentence quoting each of ``stages`` in single quotes.
    """

    code: str
    stages: tuple[str, ...]
    path: str
    message: str


def quote(text: str) -> str:
    """``text`` in single quotes, control characters and lone surrogates escaped (a message stays
    one line and can be printed and stored)."""
    return "'" + re.sub("[\x00-\x1f\x7f\ud800-\udfff]", lambda m: repr(m[0])[1:-1], text) + "'"


def kind(value: object) -> str:
    """How messages name the JSON type of ``value``: ``"a string"``, ``"null"``, ``"nothing"``..."""
    names = {
        type(None): "null",
        bool: "a boolean",
        int: "a number",
        float: "a number",
        str: "a string",
        list: "an array",
        dict: "an object",
    }
    return "nothing" if value is MISSING else names.get(type(value), type(value).__name__)


def _finite(value: float) -> bool:
    try:
        return math.isfinite(float(value))
    except OverflowError:  # an int too large for a double
        return False


def _show(value: float) -> str:
    """``value`` as the database prints a jsonb number: positional, never an exponent (``1e+308``
    and ``1e-07`` print all their digits, ``3.0`` stays ``3.0``; an infinite float, which no jsonb
    holds, as ``inf``), cut to 20 characters and ``...`` past 24."""
    try:
        finite_float = isinstance(value, float) and math.isfinite(value)  # inf: Python's reading of 1e400
        text = format(Decimal(repr(value)), "f") if finite_float else repr(value)
    except ValueError:  # an int with more digits than Python will print
        return "a huge number"
    return text if len(text) <= 24 else text[:20] + "..."


@dataclass(frozen=True)
class Where:
    """The object being checked: its JSON ``path``, how messages name it (``label``: ``"stage
    'a'"``, ``"stages[3]"``, ``"defaults"``...), the ``stages`` its problems concern and ``field``,
    how messages name its keys' parent (``"retry."`` inside a retry object)."""

    path: str
    label: str
    stages: tuple[str, ...]
    field: str = ""


TOP = Where("", "workflow DAG", ())


class Report:
    """The problems found so far, in the order they were found."""

    def __init__(self) -> None:
        self.problems: list[Problem] = []

    def add(self, code: str, where: Where, rel: str, text: str, stages: Iterable[str] = ()) -> None:
        """Add the problem ``code`` at ``rel`` (a key or ``[k]``) inside ``where``."""
        path = where.path + ("." if where.path and rel[:1] not in ("", "[") else "") + rel
        ids = tuple(dict.fromkeys(s for s in (*where.stages, *stages) if s))
        self.problems.append(Problem(code, ids, path, f"{where.label}: {text}"))


class StructureRules(Report):
    """The structure rules; each method adds the problems it finds to :attr:`problems`."""

    def keys(self, obj: Mapping[Any, Any], allowed: tuple[str, ...], where: Where) -> None:
        for key in obj:
            if key not in allowed:
                self.add("unknown_key", where, str(key), f"unknown key {quote(where.field + str(key))}")

    def string(self, value: object, rel: str, where: Where, choices: tuple[str, ...] = ()) -> None:
        """Check an optional string (absent: ``MISSING``), one of ``choices`` if given."""
        name = where.field + rel
        if value is MISSING:
            return
        if not isinstance(value, str):
            self.add("wrong_type", where, rel, f"{name} must be a string, got {kind(value)}")
        elif choices and value not in choices:
            self.add("bad_value", where, rel, f"{name} must be one of {', '.join(choices)}, got {quote(value)}")
        elif "\0" in value:
            self.add("bad_value", where, rel, f"{name} must not contain a NUL character")
        elif _SURROGATE.search(value):
            self.add("bad_value", where, rel, f"{name} must not contain a lone UTF-16 surrogate")

    def number(
        self,
        obj: Mapping[str, Any],
        key: str,
        where: Where,
        minimum: float,
        positive: bool = False,
        integral: bool = False,
    ) -> float | None:
        """Check an optional number; return it when present and valid."""
        value, name = obj.get(key, MISSING), where.field + key
        if value is MISSING:
            return None
        if not isinstance(value, int | float) or isinstance(value, bool):
            self.add("wrong_type", where, key, f"{name} must be a number, got {kind(value)}")
            return None
        if not _finite(value):
            self.add("bad_value", where, key, f"{name} {NOT_A_DOUBLE}, got {_show(value)}")
            return None
        ok = value > minimum if positive else value >= minimum
        if integral:
            ok = ok and float(value).is_integer() and value <= 1000
        if not ok:
            rule = "an integer from 1 to 1000" if integral else f"{'>' if positive else '>='} {minimum:g}"
            self.add("bad_value", where, key, f"{name} must be {rule}, got {_show(value)}")
            return None
        return value

    def retry(self, value: object, where: Where) -> None:
        if not isinstance(value, dict):
            self.add("wrong_type", where, "", f"retry must be an object, got {kind(value)}")
            return
        self.keys(value, _RETRY_KEYS, where)
        self.number(value, "max_attempts", where, 1, integral=True)
        base = self.number(value, "base_delay_s", where, 0)
        most = self.number(value, "max_delay_s", where, 0)
        if base is not None and most is not None and most < base:
            self.add(
                "bad_value",
                where,
                "max_delay_s",
                f"retry.max_delay_s ({most:g}) must be >= retry.base_delay_s ({base:g})",
            )
        self.number(value, "multiplier", where, 1)
        self.string(value.get("jitter", MISSING), "jitter", where, JITTER_MODES)
        names = value.get("non_retryable", [])
        if not isinstance(names, list):
            self.add("wrong_type", where, "non_retryable", f"retry.non_retryable must be an array, got {kind(names)}")
            return
        for k, name in enumerate(names):
            if name == "":
                self.add("bad_value", where, f"non_retryable[{k}]", f"retry.non_retryable[{k}] is empty")
            self.string(name, f"non_retryable[{k}]", where)

    def context(self, value: object) -> None:
        """Check the ``context`` declaration: an object with ``required`` (unique non-empty
        strings), ``example`` (an object holding every required key) and ``description`` (a
        string), each optional."""
        where = Where("context", "context", (), "context.")
        if not isinstance(value, dict):
            self.add("wrong_type", TOP, "context", f"context must be an object, got {kind(value)}")
            return
        self.keys(value, _CONTEXT_KEYS, where)
        self.string(value.get("description", MISSING), "description", where)
        required = value.get("required", [])
        if not isinstance(required, list):
            self.add("wrong_type", where, "required", f"context.required must be an array, got {kind(required)}")
            required = []
        for k, key in enumerate(required):
            rel = f"required[{k}]"
            if key == "":
                self.add("bad_value", where, rel, f"context.{rel} is empty")
            elif isinstance(key, str) and key in required[:k]:
                self.add("bad_value", where, rel, f"context.{rel} repeats {quote(key)}")
            self.string(key, rel, where)
        example = value.get("example", MISSING)
        if example is MISSING:
            return
        if not isinstance(example, dict):
            self.add("wrong_type", where, "example", f"context.example must be an object, got {kind(example)}")
            return
        for key in dict.fromkeys(k for k in required if isinstance(k, str) and k):
            if key not in example:
                self.add("bad_value", where, "example", f"context.example lacks the required key {quote(key)}")

    def too_big(self, obj: Mapping[str, Any]) -> bool:
        """Check the size limits; True when the document is over one (then nothing else is checked)."""
        raw_stages, raw_edges = obj.get("stages"), obj.get("edges")
        stages = len(raw_stages) if isinstance(raw_stages, list) else 0
        edges = len(raw_edges) if isinstance(raw_edges, list) else 0
        if isinstance(raw_stages, list):
            edges += sum(len(s["next"]) for s in raw_stages if isinstance(s, dict) and isinstance(s.get("next"), list))
        if stages > MAX_STAGES:
            self.add("bad_value", TOP, "stages", f"stages has {stages} entries, over the limit of {MAX_STAGES}")
        if edges > MAX_EDGES:
            self.add(
                "bad_value",
                TOP,
                "edges",
                f"the DAG has {edges} edge entries (edges and next), over the limit of {MAX_EDGES}",
            )
        return stages > MAX_STAGES or edges > MAX_EDGES

    def top(self, obj: Mapping[str, Any]) -> list[Any]:
        """Check the top-level keys, ``on_failure`` and ``defaults``; return ``stages`` (``[]`` when
        it is not an array)."""
        self.keys(obj, _TOP_KEYS, TOP)
        self.string(obj.get("on_failure", MISSING), "on_failure", TOP, ON_FAILURE_MODES)
        if "context" in obj:
            self.context(obj["context"])
        defaults = obj.get("defaults", {})
        if not isinstance(defaults, dict):
            self.add("wrong_type", TOP, "defaults", f"defaults must be an object, got {kind(defaults)}")
        else:
            self.keys(defaults, ("retry", "timeout_s"), Where("defaults", "defaults", ()))
            if "retry" in defaults:
                self.retry(defaults["retry"], Where("defaults.retry", "defaults", (), "retry."))
            self.number(defaults, "timeout_s", Where("defaults", "defaults", ()), 0, positive=True)
        raw_stages = obj.get("stages", [])
        if not isinstance(raw_stages, list):
            self.add("wrong_type", TOP, "stages", f"stages must be an array, got {kind(raw_stages)}")
            return []
        if not raw_stages:
            self.add("empty_dag", TOP, "stages", "stages is missing or empty")
        return raw_stages

    def stage(self, i: int, raw: object) -> tuple[Where, list[Any] | None]:
        """Check ``stages[i]`` but its ``next`` entries; return where it is and its ``next`` array
        (``None`` when the stage is not an object or ``next`` not an array)."""
        sid = raw.get("id", MISSING) if isinstance(raw, dict) else MISSING
        label = sid if isinstance(sid, str) else ""
        where = Where(f"stages[{i}]", f"stage {quote(label)}" if label else f"stages[{i}]", (label,))
        if not isinstance(raw, dict):
            self.add("wrong_type", where, "", f"a stage must be an object, got {kind(raw)}")
            return where, None
        self.stage_id(sid, where)
        self.keys(raw, _STAGE_KEYS, where)
        stage_kind = self.stage_kind(raw, where)
        self.capability(raw, where, stage_kind)
        self.string(raw.get("description", MISSING), "description", where)
        if "retry" in raw and stage_kind == "agent":
            self.retry(raw["retry"], Where(f"{where.path}.retry", where.label, where.stages, "retry."))
        elif "retry" in raw and stage_kind == "approval":
            self.add("bad_value", where, "retry", "an approval stage has no retry")
        self.number(raw, "timeout_s", where, 0, positive=True)
        self.compensate(raw, where, stage_kind)
        self.approval(raw, where, stage_kind)
        targets = raw.get("next", [])
        if not isinstance(targets, list):
            self.add("wrong_type", where, "next", f"next must be an array, got {kind(targets)}")
            return where, None
        return where, targets

    def stage_id(self, sid: object, where: Where) -> None:
        """``bad_stage_id`` for an id that does not match :data:`STAGE_ID_PATTERN` or is reserved."""
        label = sid if isinstance(sid, str) else ""
        if not ID_RE.fullmatch(label):
            shown = quote(label) if isinstance(sid, str) else kind(sid)
            self.add("bad_stage_id", where, "id", f"id must match {STAGE_ID_PATTERN}, got {shown}")
        elif label in RESERVED_STAGE_IDS:
            self.add(
                "bad_stage_id",
                where,
                "id",
                f"id {quote(label)} is reserved: its op would be named like the compensation job"
                " (<name>__v<version>__compensate)",
            )

    def stage_kind(self, raw: Mapping[str, Any], where: Where) -> str | None:
        """Check ``kind``; return ``"agent"`` (also when absent), ``"approval"`` or ``None`` when it
        is invalid (then the rules of neither kind apply to the stage)."""
        value = raw.get("kind", MISSING)
        self.string(value, "kind", where, STAGE_KINDS)
        if value is MISSING:
            return "agent"
        return value if isinstance(value, str) and value in STAGE_KINDS else None

    def capability(self, raw: Mapping[str, Any], where: Where, stage_kind: str | None) -> None:
        capability = raw.get("capability", MISSING)
        if stage_kind == "approval":
            if capability is not MISSING:
                self.add("bad_value", where, "capability", "an approval stage has no capability")
            return
        if stage_kind != "agent":
            return
        if capability is MISSING or capability == "":
            self.add("missing_capability", where, "capability", "capability is missing or empty")
        self.string(capability, "capability", where)

    def compensate(self, raw: Mapping[str, Any], where: Where, stage_kind: str | None) -> None:
        if stage_kind == "approval" and "compensate" in raw:
            self.add("bad_value", where, "compensate", "an approval stage has no compensate")
        if stage_kind != "agent":
            return
        compensate = raw.get("compensate", False)
        if compensate is True or compensate == "":
            self.add("bad_value", where, "compensate", "compensate must be a capability name or false")
        elif compensate is not False:
            self.string(compensate, "compensate", where)

    def approval(self, raw: Mapping[str, Any], where: Where, stage_kind: str | None) -> None:
        """The keys of an approval stage: ``approvers`` (required), ``on_timeout``, ``on_reject``;
        in an agent stage each is ``bad_value``."""
        if stage_kind == "agent":
            for key in APPROVAL_ONLY_KEYS:
                if key in raw:
                    self.add("bad_value", where, key, f"only an approval stage has {key}")
            return
        if stage_kind != "approval":
            return
        self.approvers(raw.get("approvers", MISSING), where)
        self.string(raw.get("on_timeout", MISSING), "on_timeout", where, ON_TIMEOUT_MODES)
        self.string(raw.get("on_reject", MISSING), "on_reject", where, ON_REJECT_MODES)

    def approvers(self, value: object, where: Where) -> None:
        """A non-empty array of unique strings, each matching :data:`APPROVER_PATTERN`."""
        if value is MISSING:
            self.add("bad_value", where, "approvers", "an approval stage needs approvers")
        elif not isinstance(value, list):
            self.add("wrong_type", where, "approvers", f"approvers must be an array, got {kind(value)}")
        elif not value:
            self.add("bad_value", where, "approvers", "approvers is empty: an approval stage needs approvers")
        entries: list[Any] = value if isinstance(value, list) else []
        for k, approver in enumerate(entries):
            rel = f"approvers[{k}]"
            if not isinstance(approver, str):
                self.add("wrong_type", where, rel, f"{rel} must be a string, got {kind(approver)}")
            elif not APPROVER_RE.fullmatch(approver):
                self.add(
                    "bad_value",
                    where,
                    rel,
                    f"{rel} must be a user id (a UUID) or role:<name> (name: [A-Za-z0-9_.:-], 1 to 63), got "
                    + quote(approver),
                )
            elif approver in entries[:k]:
                self.add("bad_value", where, rel, f"{rel} repeats {quote(approver)}")

    def pattern(self, value: object, rel: str, where: Where) -> None:
        """Check an optional ``when``/``unless`` pattern: a non-empty object whose keys are
        ``output`` and/or ``context`` (their values may be any JSON)."""
        name = where.field + rel
        if value is MISSING:
            return
        if not isinstance(value, dict):
            self.add("wrong_type", where, rel, f"{name} must be an object, got {kind(value)}")
            return
        other = sorted(str(k) for k in value if k not in PATTERN_KEYS)
        if not value or other:
            got = ", ".join(map(quote, other)) if other else "{}"
            self.add(
                "bad_value", where, rel, f"{name} must have the key output, context or both, and no other; got {got}"
            )

    def edge(self, k: int, raw: object, declared: set[str]) -> tuple[Where, list[Any] | None]:
        """Check the shape of ``edges[k]``; return where it is and its ``[from, to]`` (each
        ``MISSING`` when absent; ``None`` when the edge is not an object)."""
        ends = [raw.get(e, MISSING) if isinstance(raw, dict) else MISSING for e in ("from", "to")]
        shown = [quote(e) if isinstance(e, str) else kind(e) for e in ends]
        known = tuple(e for e in ends if isinstance(e, str) and e in declared)
        label = f"edges[{k}] (from {shown[0]} to {shown[1]})" if isinstance(raw, dict) else f"edges[{k}]"
        where = Where(f"edges[{k}]", label, known)
        if not isinstance(raw, dict):
            self.add("wrong_type", where, "", f"an edge must be an object, got {kind(raw)}")
            return where, None
        self.keys(raw, EDGE_KEYS, where)
        return where, ends

    def is_stage_id(self, value: object, where: Where, rel: str) -> TypeGuard[str]:
        """Check that a reference (``next[k]``, ``next[k].to``, an edge's ``from``/``to``) is a string."""
        if isinstance(value, str):
            return True
        self.add("wrong_type", where, rel, f"{rel} must be a stage id, got {kind(value)}")
        return False

    def mismatches(self, raw_stages: list[Any], raw_edges: list[Any], nodes: set[str]) -> None:
        """``next_edges_mismatch`` for each stage with an id in ``nodes`` and a ``next`` array: its
        entries and the edges from it must be the same set of (to, when, unless), compared as jsonb
        compares them (a string entry, an absent and a ``null`` condition are no condition)."""
        for i, raw in enumerate(raw_stages):
            sid = raw.get("id") if isinstance(raw, dict) else None
            if not (isinstance(sid, str) and sid in nodes and isinstance(raw.get("next"), list)):
                continue
            listed = _links(t if isinstance(t, dict) else {"to": t} for t in raw["next"])
            linked = _links(e for e in raw_edges if isinstance(e, dict) and e.get("from") == sid)
            if listed == linked:
                continue
            where = Where(f"stages[{i}]", f"stage {quote(sid)}", (sid,))
            to_listed, to_linked = sorted({t[0] for t in listed}), sorted({t[0] for t in linked})
            if to_listed != to_linked:
                text = f"next {to_listed} disagrees with the edges from {quote(sid)} to {to_linked}"
            else:
                differ = ", ".join(quote(t) for t in sorted({t[0] for t in listed ^ linked}))
                text = f"the when/unless of next disagree with those of the edges from {quote(sid)} (to {differ})"
            self.add("next_edges_mismatch", where, "next", text)


def _links(entries: Iterable[Any]) -> set[tuple[str, Hashable, Hashable]]:
    """``(to, when, unless)`` of each ``next`` entry or edge (an object) whose ``to`` is a string,
    conditions as :func:`~lifecycle_dagster.core.conditions.json_key` (absent: as ``null``)."""
    return {
        (e["to"], json_key(e.get("when")), json_key(e.get("unless")))
        for e in entries
        if isinstance(e, dict) and isinstance(e.get("to"), str)
    }
