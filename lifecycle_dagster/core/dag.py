"""Pure-Python model of a workflow definition's ``dag_schema`` (stdlib only, no database).

A ``dag_schema`` is a JSON object::

    {"stages": [{"id": "discover", "capability": "opportunity", "next": ["qualify"],
                 "description": "...", "retry": {...}, "timeout_s": 30,
                 "compensate": "undo_discover" | false}, ...],        # required, non-empty
     "edges": [{"from": "discover", "to": "qualify"}, ...],          # optional
     "defaults": {"retry": {...}, "timeout_s": 60},                   # optional
     "on_failure": "compensate" | "hold",                             # optional, default compensate
     "context": {"required": ["customer"], "example": {"customer": "ACME"},
                 "description": "..."},                               # optional
     "schedule": {"cron": "0 9 * * 1-5", "timezone": "Europe/Berlin",  # optional: a Dagster
                  "context": {...}, "enabled": true}}                  # schedule (dag_schedule)

``context`` declares the execution context a run must be given: ``required`` (unique non-empty
strings: the keys the context must hold), ``example`` (an object holding every required key: the
Launchpad's default run config) and ``description`` (a string), each optional.

A ``retry`` object takes ``max_attempts`` (integer 1..1000), ``base_delay_s`` and ``max_delay_s``
(>= 0, max >= base), ``multiplier`` (>= 1), ``jitter`` (none|full|equal) and ``non_retryable``
(array of non-empty strings). The graph's edges are the union of every ``next`` and ``edges``.
A ``schedule`` (rules: :mod:`lifecycle_dagster.core.dag_schedule`) makes the code location insert
one pending execution per cron tick, in ``timezone`` (default UTC), with ``context`` (default {}).

Rules the database-side validator shares with this one (``tests/dag_cases.json`` pins them):

* a missing ``stages`` is ``empty_dag``, a missing/non-string ``id`` is ``bad_stage_id``, a missing
  or ``""`` capability is ``missing_capability``, a missing edge ``from``/``to`` is ``wrong_type``;
  ``null`` is never accepted for an optional key; bools are not numbers; a number must be one a
  double can hold (``1e400`` overflows, ``1e-400`` rounds to 0: ``bad_value`` saying so; Python's
  JSON readers round these before this module sees them, the database sees them as written);
  ``max_attempts`` may be any integral number (``3.0``);
* the stage id ``compensate`` is reserved (``bad_stage_id``): its op would have the name of the
  definition's compensation job, ``<name>__v<version>__compensate``, and Dagster refuses two
  definitions of one name in a code location (undo ops, ``<job>__UNDO__<stage>``, cannot collide:
  stage ids have no capital letters);
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
  in ``defaults`` or ``context``;
* limits: at most :data:`MAX_STAGES` entries in ``stages`` and :data:`MAX_EDGES` edge entries (the
  entries of ``edges`` plus those of every stage's ``next`` array); a document over either limit
  gets only that problem (``bad_value`` at ``stages`` or ``edges``), nothing else is checked;
* (Python only: ``jsonb`` cannot hold them) a string must not contain a NUL character or a lone
  UTF-16 surrogate; messages print both escaped.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, cast

from lifecycle_dagster.core.dag_graph import GraphRules, topological_order
from lifecycle_dagster.core.dag_schedule import check_schedule
from lifecycle_dagster.core.dag_structure import (
    JITTER_MODES,
    MAX_EDGES,
    MAX_STAGES,
    ON_FAILURE_MODES,
    RESERVED_STAGE_IDS,
    STAGE_ID_PATTERN,
    TOP,
    Problem,
    StructureRules,
    kind,
)

__all__ = [
    "JITTER_MODES",
    "MAX_EDGES",
    "MAX_STAGES",
    "ON_FAILURE_MODES",
    "RESERVED_STAGE_IDS",
    "STAGE_ID_PATTERN",
    "ContextSpec",
    "Dag",
    "DagValidationError",
    "Problem",
    "RetrySpec",
    "ScheduleSpec",
    "Stage",
    "parse_dag",
    "validate_dag",
]


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
class ScheduleSpec:
    """A ``schedule`` object: a 5-field ``cron`` evaluated in ``timezone`` (an IANA name), the
    ``context`` (a JSON object) of each execution it inserts, and whether the Dagster schedule is
    ``enabled`` (running) until someone stops it."""

    cron: str
    timezone: str = "UTC"
    context: Mapping[str, Any] = field(default_factory=dict, hash=False)
    enabled: bool = True


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
class ContextSpec:
    """The ``context`` declaration of a DAG (empty when it has none)."""

    required: tuple[str, ...] = ()
    example: Mapping[str, Any] | None = None
    description: str | None = None


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
    context: ContextSpec = ContextSpec()
    schedule: ScheduleSpec | None = None

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
        """Every stage id, parents first (Kahn's algorithm with :class:`graphlib.TopologicalSorter`;
        among the ready stages the one declared first goes first). ``ValueError`` if the edges have
        a cycle (never for a parsed Dag)."""
        return topological_order([s.id for s in self.stages], self.edges)


class _Validator(StructureRules):
    """Walks a document, applying the structure rules (:mod:`~lifecycle_dagster.core.dag_structure`)
    and the graph rules (:mod:`~lifecycle_dagster.core.dag_graph`) in the order the database's
    ``lifecycle.dag_validate`` reports them."""

    def run(self, obj: object) -> None:
        if not isinstance(obj, dict):
            self.add("not_an_object", TOP, "", f"must be a JSON object, got {kind(obj)}")
            return
        if self.too_big(obj):
            return
        raw_stages = self.top(obj)
        check_schedule(self, obj)
        graph = GraphRules(self, raw_stages)
        graph.duplicates()
        for i, raw in enumerate(raw_stages):
            self.stage_edges(i, raw, graph)
        raw_edges = obj.get("edges", [])
        if not isinstance(raw_edges, list):
            self.add("wrong_type", TOP, "edges", f"edges must be an array, got {kind(raw_edges)}")
        elif "edges" in obj:
            for k, raw_edge in enumerate(raw_edges):
                self.edge_entry(k, raw_edge, graph)
            self.mismatches(raw_stages, raw_edges, graph.nodes)
        graph.cycles()

    def stage_edges(self, i: int, raw: object, graph: GraphRules) -> None:
        """Check ``stages[i]``, then each entry of its ``next``: the first of wrong_type,
        unknown_stage, self_loop, duplicate_edge."""
        where, targets = self.stage(i, raw)
        local: list[str] = []
        for k, target in enumerate(targets or ()):
            if self.is_stage_id(target, where, f"next[{k}]"):
                graph.next_target(where, f"next[{k}]", where.stages[0], target, local)

    def edge_entry(self, k: int, raw: object, graph: GraphRules) -> None:
        """Check ``edges[k]``: its shape, each end (wrong_type or unknown_stage), then the pair."""
        where, ends = self.edge(k, raw, graph.declared)
        if ends is None:
            return
        for key, end in zip(("from", "to"), ends, strict=True):
            if self.is_stage_id(end, where, key):
                graph.edge_end(where, key, end)
        graph.listed_edge(where, ends)


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
    declared = doc.get("context", {})
    return Dag(
        stages=stages,
        edges=tuple(sorted(pairs, key=lambda p: (index[p[0]], index[p[1]]))),
        default_retry=_retry(defaults.get("retry")),
        default_timeout_s=_float(defaults, "timeout_s"),
        on_failure=doc.get("on_failure", "compensate"),
        context=ContextSpec(
            required=tuple(declared.get("required", ())),
            example=declared.get("example"),
            description=declared.get("description"),
        ),
        schedule=_schedule(doc.get("schedule")),
    )


def _schedule(raw: Mapping[str, Any] | None) -> ScheduleSpec | None:
    if raw is None:
        return None
    return ScheduleSpec(
        cron=raw["cron"],
        timezone=raw.get("timezone", "UTC"),
        context=dict(raw.get("context", {})),
        enabled=raw.get("enabled", True),
    )
