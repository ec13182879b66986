"""Pure-Python model of a workflow definition's ``dag_schema`` (stdlib only, no database).

A ``dag_schema`` is a JSON object::

    {"stages": [{"id": "discover", "capability": "opportunity", "next": ["qualify"],
                 "description": "...", "retry": {...}, "timeout_s": 30,
                 "compensate": "undo_discover" | false}, ...],        # required, non-empty
     "edges": [{"from": "discover", "to": "qualify"}, ...],          # optional
     "defaults": {"retry": {...}, "timeout_s": 60},                   # optional
     "on_failure": "compensate" | "hold"}                             # optional, default compensate

A ``retry`` object takes ``max_attempts`` (integer 1..1000), ``base_delay_s`` and ``max_delay_s``
(>= 0, max >= base), ``multiplier`` (>= 1), ``jitter`` (none|full|equal) and ``non_retryable``
(array of non-empty strings). The graph's edges are the union of every ``next`` and ``edges``.

Rules the database-side validator shares with this one (``tests/dag_cases.json`` pins them):

* a missing ``stages`` is ``empty_dag``, a missing/non-string ``id`` is ``bad_stage_id``, a missing
  or ``""`` capability is ``missing_capability``, a missing edge ``from``/``to`` is ``wrong_type``;
  ``null`` is never accepted for an optional key; numbers must be finite doubles and bools are not
  numbers; ``max_attempts`` may be any integral number (``3.0``);
* a stage is *declared* when its ``id`` is a non-empty string, even an invalid one (references to it
  are not ``unknown_stage``); each reference (``next`` entry, edge ``from``/``to``) yields at most
  one problem, the first of wrong_type, unknown_stage, self_loop, duplicate_edge;
* ``duplicate_stage`` is reported once per valid id declared more than once;
* ``next_edges_mismatch``: for each stage with a valid, unique id and a ``next`` array, when
  ``edges`` is an array, the string entries of ``next`` must equal the string ``to`` of the edges
  whose ``from`` is that stage;
* cycles are looked for among stages with a valid, unique id and the well-formed edges between
  them: one ``cycle`` problem per strongly connected component of 2+ stages (all its members);
* ``Problem.stages``: the stage for anything inside ``stages[i]`` (plus the target for a duplicate
  ``next`` entry), the declared endpoints for anything inside ``edges[k]``, none at top level or
  in ``defaults``;
* limits: at most :data:`MAX_STAGES` entries in ``stages`` and :data:`MAX_EDGES` edge entries (the
  entries of ``edges`` plus those of every stage's ``next`` array); a document over either limit
  gets only that problem (``bad_value`` at ``stages`` or ``edges``), nothing else is checked;
* (Python only: ``jsonb`` cannot hold them) a string must not contain a NUL character or a lone
  UTF-16 surrogate; messages print both escaped.
"""

from __future__ import annotations

import heapq
import math
import re
from collections import Counter, deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import Any, cast

STAGE_ID_PATTERN = r"^[a-z][a-z0-9_]{0,62}$"
ON_FAILURE_MODES = ("compensate", "hold")
JITTER_MODES = ("none", "full", "equal")
#: most entries ``stages`` may have (the database's lifecycle.dag_validate has the same limit)
MAX_STAGES = 500
#: most edge entries a DAG may have: the entries of ``edges`` plus those of every ``next`` array
MAX_EDGES = 5000

_ID_RE = re.compile(STAGE_ID_PATTERN)
_TOP_KEYS = ("stages", "edges", "defaults", "on_failure")
_STAGE_KEYS = ("id", "capability", "next", "description", "retry", "timeout_s", "compensate")
_RETRY_KEYS = ("max_attempts", "base_delay_s", "max_delay_s", "multiplier", "jitter", "non_retryable")
_MISSING: Any = object()
_SURROGATE = re.compile("[\ud800-\udfff]")


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


class DagValidationError(ValueError):
    """Raised by :func:`parse_dag`; ``problems`` holds every problem found.

    ``str(err)`` is ``"invalid workflow DAG (N problem(s)):"`` then ``"\\n  - <message>"`` per problem.
    """

    def __init__(self, problems: Iterable[Problem]) -> None:
        self.problems: tuple[Problem, ...] = tuple(problems)
        lines = "".join(f"\n  - {p.message}" for p in self.problems)
        super().__init__(f"invalid workflow DAG ({len(self.problems)} problem(s)):{lines}")

    def __reduce__(self) -> tuple[type[DagValidationError], tuple[tuple[Problem, ...]]]:
        return (type(self), (self.problems,))


@dataclass(frozen=True)
class RetrySpec:
    """A ``retry`` object; ``None`` for each key that was not given."""

    max_attempts: int | None = None
    base_delay_s: float | None = None
    max_delay_s: float | None = None
    multiplier: float | None = None
    jitter: str | None = None
    non_retryable: tuple[str, ...] | None = None


@dataclass(frozen=True)
class Stage:
    """One stage; ``None`` for each optional key that was not given.

    ``next`` is the stage's own ``next`` list as declared (:attr:`Dag.edges` is the graph);
    ``compensate`` is a capability name, ``False`` (opted out) or ``None`` (not given).
    """

    id: str
    capability: str
    next: tuple[str, ...] | None = None
    description: str | None = None
    retry: RetrySpec | None = None
    timeout_s: float | None = None
    compensate: str | bool | None = None


@dataclass(frozen=True)
class Dag:
    """A valid workflow DAG, as built by :func:`parse_dag`.

    ``stages`` are in declaration order; ``edges`` are ``(from, to)`` id pairs, the union of every
    ``next`` and ``edges``, deduplicated and sorted by (index of from, index of to).
    The methods taking a stage id raise ``KeyError`` when there is no such stage.
    """

    stages: tuple[Stage, ...]
    edges: tuple[tuple[str, str], ...]
    default_retry: RetrySpec | None = None
    default_timeout_s: float | None = None
    on_failure: str = "compensate"

    @cached_property
    def _by_id(self) -> dict[str, Stage]:
        return {s.id: s for s in self.stages}

    @cached_property
    def _links(self) -> tuple[dict[str, tuple[str, ...]], dict[str, tuple[str, ...]]]:
        """(parents, children) of every stage, each in declaration order."""
        index = {s.id: i for i, s in enumerate(self.stages)}
        ups: dict[str, list[str]] = {s.id: [] for s in self.stages}
        downs: dict[str, list[str]] = {s.id: [] for s in self.stages}
        for a, b in self.edges:
            ups[b].append(a)
            downs[a].append(b)
        by_index = index.__getitem__
        return (
            {k: tuple(sorted(v, key=by_index)) for k, v in ups.items()},
            {k: tuple(sorted(v, key=by_index)) for k, v in downs.items()},
        )

    def stage(self, stage_id: str) -> Stage:
        """The stage called ``stage_id``."""
        try:
            return self._by_id[stage_id]
        except KeyError:
            raise KeyError(f"workflow DAG has no stage {stage_id!r}") from None

    def _linked(self, stage_id: str, end: int) -> tuple[str, ...]:
        self.stage(stage_id)
        return self._links[end][stage_id]

    def parents(self, stage_id: str) -> tuple[str, ...]:
        """Ids of the stages with an edge to ``stage_id``, in declaration order."""
        return self._linked(stage_id, 0)

    def children(self, stage_id: str) -> tuple[str, ...]:
        """Ids of the stages ``stage_id`` has an edge to, in declaration order."""
        return self._linked(stage_id, 1)

    def ancestors(self, stage_id: str) -> tuple[str, ...]:
        """Ids of every stage ``stage_id`` transitively depends on, in topological order."""
        return self._closure(stage_id, 0)

    def descendants(self, stage_id: str) -> tuple[str, ...]:
        """Ids of every stage that transitively depends on ``stage_id``, in topological order."""
        return self._closure(stage_id, 1)

    def _closure(self, stage_id: str, direction: int) -> tuple[str, ...]:
        self.stage(stage_id)
        links = self._links[direction]
        seen: set[str] = set()
        todo = [stage_id]
        while todo:
            for linked in links[todo.pop()]:
                if linked not in seen:
                    seen.add(linked)
                    todo.append(linked)
        return tuple(s for s in self._order if s in seen)

    @cached_property
    def _order(self) -> tuple[str, ...]:
        return self.topological_order()

    def topological_order(self) -> tuple[str, ...]:
        """Every stage id, parents first (Kahn's algorithm; among the ready stages the one declared
        first goes first). ``ValueError`` if the edges have a cycle (never for a parsed Dag)."""
        index = {s.id: i for i, s in enumerate(self.stages)}
        indegree = [0] * len(self.stages)
        children: list[list[int]] = [[] for _ in self.stages]
        for a, b in self.edges:
            indegree[index[b]] += 1
            children[index[a]].append(index[b])
        ready = [i for i, d in enumerate(indegree) if d == 0]  # ascending, hence already a heap
        order: list[str] = []
        while ready:
            i = heapq.heappop(ready)
            order.append(self.stages[i].id)
            for c in children[i]:
                indegree[c] -= 1
                if indegree[c] == 0:
                    heapq.heappush(ready, c)
        if len(order) != len(self.stages):
            raise ValueError("workflow DAG has a cycle")
        return tuple(order)


def _q(text: str) -> str:
    """``text`` in single quotes, control characters and lone surrogates escaped (a message stays
    one line and can be printed and stored)."""
    return "'" + re.sub("[\x00-\x1f\x7f\ud800-\udfff]", lambda m: repr(m[0])[1:-1], text) + "'"


def _kind(value: object) -> str:
    names = {
        type(None): "null",
        bool: "a boolean",
        int: "a number",
        float: "a number",
        str: "a string",
        list: "an array",
        dict: "an object",
    }
    return "nothing" if value is _MISSING else names.get(type(value), type(value).__name__)


def _finite(value: float) -> bool:
    try:
        return math.isfinite(float(value))
    except OverflowError:  # an int too large for a double
        return False


def _show(value: float) -> str:
    try:
        text = repr(value)
    except ValueError:  # an int with more digits than Python will print
        return "a huge number"
    return text if len(text) <= 24 else text[:20] + "..."


@dataclass(frozen=True)
class _Where:
    path: str  # JSON path of the object being checked
    label: str  # how messages name it: "stage 'a'", "stages[3]", "defaults", ...
    stages: tuple[str, ...]  # the stages its problems concern
    field: str = ""  # how messages name its keys' parent: "retry." inside a retry object


class _Validator:
    def __init__(self) -> None:
        self.problems: list[Problem] = []

    def add(self, code: str, where: _Where, rel: str, text: str, stages: Iterable[str] = ()) -> None:
        path = where.path + ("." if where.path and rel[:1] not in ("", "[") else "") + rel
        ids = tuple(dict.fromkeys(s for s in (*where.stages, *stages) if s))
        self.problems.append(Problem(code, ids, path, f"{where.label}: {text}"))

    def keys(self, obj: Mapping[Any, Any], allowed: tuple[str, ...], where: _Where) -> None:
        for key in obj:
            if key not in allowed:
                self.add("unknown_key", where, str(key), f"unknown key {_q(where.field + str(key))}")

    def string(self, value: object, rel: str, where: _Where, choices: tuple[str, ...] = ()) -> None:
        """Check an optional string (absent: ``_MISSING``), one of ``choices`` if given."""
        name = where.field + rel
        if value is _MISSING:
            return
        if not isinstance(value, str):
            self.add("wrong_type", where, rel, f"{name} must be a string, got {_kind(value)}")
        elif choices and value not in choices:
            self.add("bad_value", where, rel, f"{name} must be one of {', '.join(choices)}, got {_q(value)}")
        elif "\0" in value:
            self.add("bad_value", where, rel, f"{name} must not contain a NUL character")
        elif _SURROGATE.search(value):
            self.add("bad_value", where, rel, f"{name} must not contain a lone UTF-16 surrogate")

    def number(
        self,
        obj: Mapping[str, Any],
        key: str,
        where: _Where,
        minimum: float,
        positive: bool = False,
        integral: bool = False,
    ) -> float | None:
        """Check an optional number; return it when present and valid."""
        value, name = obj.get(key, _MISSING), where.field + key
        if value is _MISSING:
            return None
        if not isinstance(value, int | float) or isinstance(value, bool):
            self.add("wrong_type", where, key, f"{name} must be a number, got {_kind(value)}")
            return None
        ok = _finite(value) and (value > minimum if positive else value >= minimum)
        if integral:
            ok = ok and float(value).is_integer() and value <= 1000
        if not ok:
            rule = "an integer from 1 to 1000" if integral else f"{'>' if positive else '>='} {minimum:g}"
            self.add("bad_value", where, key, f"{name} must be {rule}, got {_show(value)}")
            return None
        return value

    def retry(self, value: object, where: _Where) -> None:
        if not isinstance(value, dict):
            self.add("wrong_type", where, "", f"retry must be an object, got {_kind(value)}")
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
        self.string(value.get("jitter", _MISSING), "jitter", where, JITTER_MODES)
        names = value.get("non_retryable", [])
        if not isinstance(names, list):
            self.add("wrong_type", where, "non_retryable", f"retry.non_retryable must be an array, got {_kind(names)}")
            return
        for k, name in enumerate(names):
            if name == "":
                self.add("bad_value", where, f"non_retryable[{k}]", f"retry.non_retryable[{k}] is empty")
            self.string(name, f"non_retryable[{k}]", where)

    def stage(self, i: int, raw: object, declared: set[str]) -> list[tuple[str, str]]:
        """Check ``stages[i]``; return its well-formed ``next`` edges."""
        sid = raw.get("id", _MISSING) if isinstance(raw, dict) else _MISSING
        label = sid if isinstance(sid, str) else ""
        where = _Where(f"stages[{i}]", f"stage {_q(label)}" if label else f"stages[{i}]", (label,))
        if not isinstance(raw, dict):
            self.add("wrong_type", where, "", f"a stage must be an object, got {_kind(raw)}")
            return []
        if not _ID_RE.fullmatch(label):
            shown = _q(label) if isinstance(sid, str) else _kind(sid)
            self.add("bad_stage_id", where, "id", f"id must match {STAGE_ID_PATTERN}, got {shown}")
        self.keys(raw, _STAGE_KEYS, where)
        capability = raw.get("capability", _MISSING)
        if capability is _MISSING or capability == "":
            self.add("missing_capability", where, "capability", "capability is missing or empty")
        self.string(capability, "capability", where)
        self.string(raw.get("description", _MISSING), "description", where)
        if "retry" in raw:
            self.retry(raw["retry"], _Where(f"{where.path}.retry", where.label, where.stages, "retry."))
        self.number(raw, "timeout_s", where, 0, positive=True)
        compensate = raw.get("compensate", False)
        if compensate is True or compensate == "":
            self.add("bad_value", where, "compensate", "compensate must be a capability name or false")
        elif compensate is not False:
            self.string(compensate, "compensate", where)
        targets = raw.get("next", [])
        if not isinstance(targets, list):
            self.add("wrong_type", where, "next", f"next must be an array, got {_kind(targets)}")
            return []
        edges: list[tuple[str, str]] = []
        for k, target in enumerate(targets):
            rel = f"next[{k}]"
            if not isinstance(target, str):
                self.add("wrong_type", where, rel, f"{rel} must be a stage id, got {_kind(target)}")
            elif target not in declared:
                self.add("unknown_stage", where, rel, f"edge to unknown stage {_q(target)}")
            elif target == label:
                self.add("self_loop", where, rel, f"edge to itself ({rel})")
            elif (label, target) in edges:
                self.add("duplicate_edge", where, rel, f"edge to {_q(target)} is listed twice", [target])
            else:
                edges.append((label, target))
        return edges

    def edge(self, k: int, raw: object, declared: set[str], seen: set[tuple[str, str]]) -> None:
        """Check ``edges[k]``; add it to ``seen`` when well-formed."""
        ends = [raw.get(e, _MISSING) if isinstance(raw, dict) else _MISSING for e in ("from", "to")]
        shown = [_q(e) if isinstance(e, str) else _kind(e) for e in ends]
        known = tuple(e for e in ends if isinstance(e, str) and e in declared)
        label = f"edges[{k}] (from {shown[0]} to {shown[1]})" if isinstance(raw, dict) else f"edges[{k}]"
        where = _Where(f"edges[{k}]", label, known)
        if not isinstance(raw, dict):
            self.add("wrong_type", where, "", f"an edge must be an object, got {_kind(raw)}")
            return
        self.keys(raw, ("from", "to"), where)
        for key, end in zip(("from", "to"), ends, strict=True):
            if not isinstance(end, str):
                self.add("wrong_type", where, key, f"{key} must be a stage id, got {_kind(end)}")
            elif end not in declared:
                self.add("unknown_stage", where, key, f"unknown stage {_q(end)}")
        if len(known) == 2:
            pair = (known[0], known[1])
            if pair[0] == pair[1]:
                self.add("self_loop", where, "", f"edge from stage {_q(pair[0])} to itself")
            elif pair in seen:
                self.add("duplicate_edge", where, "", "edge is listed twice")
            else:
                seen.add(pair)

    def run(self, obj: object) -> None:
        top = _Where("", "workflow DAG", ())
        if not isinstance(obj, dict):
            self.add("not_an_object", top, "", f"must be a JSON object, got {_kind(obj)}")
            return
        if self.too_big(obj, top):
            return
        self.keys(obj, _TOP_KEYS, top)
        self.string(obj.get("on_failure", _MISSING), "on_failure", top, ON_FAILURE_MODES)
        defaults = obj.get("defaults", {})
        if not isinstance(defaults, dict):
            self.add("wrong_type", top, "defaults", f"defaults must be an object, got {_kind(defaults)}")
        else:
            self.keys(defaults, ("retry", "timeout_s"), _Where("defaults", "defaults", ()))
            if "retry" in defaults:
                self.retry(defaults["retry"], _Where("defaults.retry", "defaults", (), "retry."))
            self.number(defaults, "timeout_s", _Where("defaults", "defaults", ()), 0, positive=True)
        raw_stages = obj.get("stages", [])
        if not isinstance(raw_stages, list):
            self.add("wrong_type", top, "stages", f"stages must be an array, got {_kind(raw_stages)}")
            raw_stages = []
        elif not raw_stages:
            self.add("empty_dag", top, "stages", "stages is missing or empty")
        ids = [s.get("id") if isinstance(s, dict) else None for s in raw_stages]
        declared = {s for s in ids if isinstance(s, str) and s}
        counts = Counter(s for s in ids if isinstance(s, str) and _ID_RE.fullmatch(s))
        for sid, count in counts.items():
            if count > 1:
                at = [f"stages[{i}]" for i, s in enumerate(ids) if s == sid]
                self.add(
                    "duplicate_stage",
                    _Where(at[1], f"stage {_q(sid)}", (sid,)),
                    "",
                    f"declared {count} times ({', '.join(at)})",
                )
        nodes = {s for s, count in counts.items() if count == 1}
        graph = {edge for i, raw in enumerate(raw_stages) for edge in self.stage(i, raw, declared)}
        raw_edges = obj.get("edges", [])
        if not isinstance(raw_edges, list):
            self.add("wrong_type", top, "edges", f"edges must be an array, got {_kind(raw_edges)}")
        elif "edges" in obj:
            listed: set[tuple[str, str]] = set()
            for k, raw_edge in enumerate(raw_edges):
                self.edge(k, raw_edge, declared, listed)
            graph |= listed
            self.mismatches(raw_stages, raw_edges, nodes)
        order = [s for s in ids if isinstance(s, str) and s in nodes]
        self.cycles(order, [(a, b) for a, b in graph if a in nodes and b in nodes])

    def too_big(self, obj: Mapping[str, Any], top: _Where) -> bool:
        """Check the size limits; True when the document is over one (then nothing else is checked)."""
        raw_stages, raw_edges = obj.get("stages"), obj.get("edges")
        stages = len(raw_stages) if isinstance(raw_stages, list) else 0
        edges = len(raw_edges) if isinstance(raw_edges, list) else 0
        if isinstance(raw_stages, list):
            edges += sum(len(s["next"]) for s in raw_stages if isinstance(s, dict) and isinstance(s.get("next"), list))
        if stages > MAX_STAGES:
            self.add("bad_value", top, "stages", f"stages has {stages} entries, over the limit of {MAX_STAGES}")
        if edges > MAX_EDGES:
            self.add(
                "bad_value",
                top,
                "edges",
                f"the DAG has {edges} edge entries (edges and next), over the limit of {MAX_EDGES}",
            )
        return stages > MAX_STAGES or edges > MAX_EDGES

    def mismatches(self, raw_stages: list[Any], raw_edges: list[Any], nodes: set[str]) -> None:
        for i, raw in enumerate(raw_stages):
            sid = raw.get("id") if isinstance(raw, dict) else None
            if not (isinstance(sid, str) and sid in nodes and isinstance(raw.get("next"), list)):
                continue
            listed: set[str] = {t for t in raw["next"] if isinstance(t, str)}
            linked: set[str] = {
                e["to"]
                for e in raw_edges
                if isinstance(e, dict) and e.get("from") == sid and isinstance(e.get("to"), str)
            }
            if listed != linked:
                self.add(
                    "next_edges_mismatch",
                    _Where(f"stages[{i}]", f"stage {_q(sid)}", (sid,)),
                    "next",
                    f"next {sorted(listed)} disagrees with the edges from {_q(sid)} to {sorted(linked)}",
                )

    def cycles(self, nodes: list[str], edges: list[tuple[str, str]]) -> None:
        """One problem per strongly connected component of 2+ stages (Kosaraju, iterative)."""
        rank = {n: i for i, n in enumerate(nodes)}
        adj: dict[str, list[str]] = {n: [] for n in nodes}
        radj: dict[str, list[str]] = {n: [] for n in nodes}
        for a, b in sorted(edges, key=lambda e: (rank[e[0]], rank[e[1]])):
            adj[a].append(b)
            radj[b].append(a)
        finished: list[str] = []
        seen: set[str] = set()
        for root in nodes:
            stack = [] if root in seen else [(root, iter(adj[root]))]
            seen.add(root)
            while stack:
                child = next((c for c in stack[-1][1] if c not in seen), None)
                if child is None:
                    finished.append(stack.pop()[0])
                else:
                    seen.add(child)
                    stack.append((child, iter(adj[child])))
        components: list[list[str]] = []
        seen.clear()
        for root in reversed(finished):
            component, todo = ([], []) if root in seen else ([root], [root])
            seen.add(root)
            while todo:
                for parent in radj[todo.pop()]:
                    if parent not in seen:
                        seen.add(parent)
                        component.append(parent)
                        todo.append(parent)
            if len(component) > 1:
                components.append(sorted(component, key=rank.__getitem__))
        for component in sorted(components, key=lambda c: rank[c[0]]):
            path = " -> ".join(_cycle_path(component, adj))
            where = _Where(f"stages[{rank[component[0]]}]", "cycle", tuple(component))
            self.add("cycle", where, "", f"{path} (stages {', '.join(map(_q, component))})")


def _cycle_path(component: list[str], adj: dict[str, list[str]]) -> list[str]:
    """A shortest cycle through the component's first stage, e.g. ``[a, b, c, a]``."""
    start, members = component[0], set(component)
    previous: dict[str, str] = {}
    queue = deque([start])
    while queue:
        node = queue.popleft()
        for child in adj[node]:
            if child == start:
                path = [node]
                while path[-1] != start:
                    path.append(previous[path[-1]])
                return [*reversed(path), start]
            if child in members and child not in previous:
                previous[child] = node
                queue.append(child)
    raise AssertionError("a strongly connected component always has a cycle")


def validate_dag(obj: object) -> list[Problem]:
    """Every problem of ``obj`` as a ``dag_schema`` (rules: module docstring), ``[]`` when valid.

    ``obj`` may be any JSON value (or other Python object); this never raises.
    """
    validator = _Validator()
    validator.run(obj)
    return validator.problems


def _float(raw: Mapping[str, Any], key: str) -> float | None:
    return float(raw[key]) if key in raw else None


def _retry(raw: Mapping[str, Any] | None) -> RetrySpec | None:
    if raw is None:
        return None
    return RetrySpec(
        max_attempts=int(raw["max_attempts"]) if "max_attempts" in raw else None,
        base_delay_s=_float(raw, "base_delay_s"),
        max_delay_s=_float(raw, "max_delay_s"),
        multiplier=_float(raw, "multiplier"),
        jitter=raw.get("jitter"),
        non_retryable=tuple(raw["non_retryable"]) if "non_retryable" in raw else None,
    )


def parse_dag(obj: object) -> Dag:
    """Validate ``obj`` as a ``dag_schema`` (see the module docstring) and build its :class:`Dag`.

    Raises :class:`DagValidationError` listing every problem when it is not valid.
    """
    problems = validate_dag(obj)
    if problems:
        raise DagValidationError(problems)
    doc = cast(dict[str, Any], obj)
    stages = tuple(
        Stage(
            id=s["id"],
            capability=s["capability"],
            next=tuple(s["next"]) if "next" in s else None,
            description=s.get("description"),
            retry=_retry(s.get("retry")),
            timeout_s=_float(s, "timeout_s"),
            compensate=s.get("compensate"),
        )
        for s in doc["stages"]
    )
    index = {s.id: i for i, s in enumerate(stages)}
    pairs = {(s.id, t) for s in stages for t in s.next or ()}
    pairs |= {(e["from"], e["to"]) for e in doc.get("edges", [])}
    defaults = doc.get("defaults", {})
    return Dag(
        stages=stages,
        edges=tuple(sorted(pairs, key=lambda p: (index[p[0]], index[p[1]]))),
        default_retry=_retry(defaults.get("retry")),
        default_timeout_s=_float(defaults, "timeout_s"),
        on_failure=doc.get("on_failure", "compensate"),
    )
