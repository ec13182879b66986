"""Pure-Python model of a workflow definition's ``dag_schema`` (stdlib only, no database).

A ``dag_schema`` is a JSON object::

    {"stages": [{"id": "discover", "capability": "opportunity", "next": ["qualify"],
                 "description": "...", "retry": {...}, "timeout_s": 30,
                 "compensate": "undo_discover" | false},             # an agent stage
                {"id": "sign_off", "kind": "approval",                # an approval stage
                 "approvers": ["role:finance", "<uuid>"], "timeout_s": 86400,
                 "on_timeout": "reject" | "approve" | "fail",
                 "on_reject": "end" | "fail" | "branch",
                 "next": ["report", {"to": "deliver", "when": P, "unless": P}]},
                ...],                                                 # required, non-empty
     "edges": [{"from": "discover", "to": "qualify", "when": P, "unless": P}, ...],  # optional
     "defaults": {"retry": {...}, "timeout_s": 60},                   # optional
     "on_failure": "compensate" | "hold",                             # optional, default compensate
     "context": {"required": ["customer"], "example": {"customer": "ACME"},
                 "description": "..."},                               # optional
     "schedule": {"cron": "0 9 * * 1-5", "timezone": "Europe/Berlin",  # optional: a Dagster
                  "context": {...}, "enabled": true},                  # schedule (dag_schedule)
     "batch": {"max_executions": 500, "max_wait_s": 2}}               # optional, or null (dag_batch)

``context`` declares the execution context a run must be given: ``required`` (unique non-empty
strings: the keys the context must hold), ``example`` (an object holding every required key: the
Launchpad's default run config) and ``description`` (a string), each optional.

A ``retry`` object takes ``max_attempts`` (integer 1..1000), ``base_delay_s`` and ``max_delay_s``
(>= 0, max >= base), ``multiplier`` (>= 1), ``jitter`` (none|full|equal) and ``non_retryable``
(array of non-empty strings). The graph's edges are the union of every ``next`` and ``edges``.

A ``next`` entry is a stage id or an object ``{"to": <stage id>, "when": P, "unless": P}`` (``to``
required). An edge (either form) may carry the patterns ``when`` and ``unless``: a pattern P is a
non-empty object whose keys are ``output`` and/or ``context``, with any JSON values; the edge fires
when ``{"output": <the upstream output>, "context": <the execution's context>}`` contains ``when``
and does not contain ``unless`` (jsonb ``@>``: :mod:`lifecycle_dagster.core.conditions`,
``docs/branches.md``).

A stage's ``kind`` is ``agent`` (the default) or ``approval``. An approval stage waits for a
person: it has ``approvers`` (required: a non-empty array of unique strings, each a UUID, any case,
or ``role:<name>``, :data:`APPROVER_PATTERN`), optional ``timeout_s``, ``on_timeout`` (reject,
approve, fail; default reject) and ``on_reject`` (end, fail, branch; default end), and no
``capability``, ``retry`` or ``compensate``; an agent stage has none of ``approvers``,
``on_timeout``, ``on_reject``.
A ``schedule`` (rules: :mod:`lifecycle_dagster.core.dag_schedule`) makes the code location insert
one pending execution per cron tick, in ``timezone`` (default UTC), with ``context`` (default {}).
A ``batch`` (rules: :mod:`lifecycle_dagster.core.dag_batch`) declares batching: ``max_executions``
(required, an integer 1..10000) and ``max_wait_s`` (a number 0..3600, default 5); ``null`` or no
``batch`` key: no batching (:attr:`Dag.batch` is None).

Rules the database-side validator shares with this one (``tests/dag_cases.json`` pins them):

* a missing ``stages`` is ``empty_dag``, a missing/non-string ``id`` is ``bad_stage_id``, a missing
  or ``""`` capability of an agent stage is ``missing_capability``, a missing edge ``from``/``to``
  or ``next`` entry ``to`` is ``wrong_type``;
* stage kinds: ``kind`` not a string is ``wrong_type``, another string ``bad_value`` (then neither
  kind's rules apply to that stage); in an approval stage ``capability``, ``retry`` and
  ``compensate`` are each ``bad_value`` ("an approval stage has no ..."), a missing ``approvers``
  is ``bad_value`` ("an approval stage needs approvers"), a non-array ``wrong_type``, an empty one
  ``bad_value``, and each entry yields at most one problem, the first of wrong_type (not a string),
  bad_value (not a UUID nor ``role:<name>``), bad_value (repeats an earlier one); in an agent
  stage ``approvers``, ``on_timeout`` and ``on_reject`` are each ``bad_value`` ("only an approval
  stage has ...");
* a pattern (``when``/``unless``) not an object is ``wrong_type``; an empty one or one with a key
  other than ``output``/``context`` is one ``bad_value`` (naming the other keys in code-point
  order); a ``next`` entry neither a string nor an object is ``wrong_type``; unknown keys of an
  object entry are ``unknown_key`` (``stages[i].next[k].label``);
  ``null`` is never accepted for an optional key, but for the top-level ``batch`` (no batching);
  bools are not numbers; a number must be one a double can hold (``1e400`` overflows, ``1e-400``
  rounds to 0: ``bad_value`` saying so; Python's JSON readers round these before this module sees
  them, the database sees them as written);
  ``max_attempts`` may be any integral number (``3.0``);
* the stage id ``compensate`` is reserved (``bad_stage_id``): its op would have the name of the
  definition's compensation job, ``<name>__v<version>__compensate``, and Dagster refuses two
  definitions of one name in a code location (undo ops, ``<job>__UNDO__<stage>``, cannot collide:
  stage ids have no capital letters);
* a stage is *declared* when its ``id`` is a non-empty string, even an invalid one (references to it
  are not ``unknown_stage``); each reference (``next`` entry or its ``to``, edge ``from``/``to``)
  yields at most one problem, the first of wrong_type, unknown_stage, self_loop, duplicate_edge
  (wrong_type and unknown_stage at ``next[k].to`` for an object entry, at ``edges[k].from``/``to``;
  the others at ``next[k]``, ``edges[k]``); the same (from, to) twice is a duplicate_edge whatever
  the conditions; a reference's patterns are checked besides (``stages[i].next[k].when``,
  ``edges[k].unless``);
* ``duplicate_stage`` is reported once per valid id declared more than once;
* within a stage, problems come in this order: id, unknown keys, kind, capability, description,
  retry, timeout_s, compensate, approvers, on_timeout, on_reject, then each ``next`` entry;
* ``next_edges_mismatch``: for each stage with a valid, unique id and a ``next`` array, when
  ``edges`` is an array, the entries of ``next`` with a string target and the edges from that
  stage with a string ``to`` must be the same set of (to, when, unless), conditions compared as
  jsonb ``=`` compares them (a string entry, an absent and a ``null`` condition are no condition);
  one problem per stage, naming the targets when they differ, else the targets whose conditions do;
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

import copy
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, cast

from lifecycle_dagster.core.conditions import edge_fires
from lifecycle_dagster.core.dag_batch import DEFAULT_BATCH_WAIT_S, check_batch
from lifecycle_dagster.core.dag_graph import GraphRules, topological_order
from lifecycle_dagster.core.dag_schedule import check_schedule
from lifecycle_dagster.core.dag_structure import (
    APPROVER_PATTERN,
    JITTER_MODES,
    MAX_EDGES,
    MAX_STAGES,
    MISSING,
    NEXT_ENTRY_KEYS,
    ON_FAILURE_MODES,
    ON_REJECT_MODES,
    ON_TIMEOUT_MODES,
    RESERVED_STAGE_IDS,
    STAGE_ID_PATTERN,
    STAGE_KINDS,
    TOP,
    Problem,
    StructureRules,
    Where,
    kind,
)

__all__ = [
    "APPROVER_PATTERN",
    "JITTER_MODES",
    "MAX_EDGES",
    "MAX_STAGES",
    "ON_FAILURE_MODES",
    "ON_REJECT_MODES",
    "ON_TIMEOUT_MODES",
    "RESERVED_STAGE_IDS",
    "STAGE_ID_PATTERN",
    "STAGE_KINDS",
    "Approval",
    "Batch",
    "ContextSpec",
    "Dag",
    "DagValidationError",
    "Edge",
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
class Batch:
    """A ``batch`` object: at most ``max_executions`` executions (1..10000) per batch, and how long,
    in seconds (0..3600, default 5), a batch waits to fill (``max_wait_s``)."""

    max_executions: int
    max_wait_s: float = DEFAULT_BATCH_WAIT_S


@dataclass(frozen=True)
class Approval:
    """What an approval stage waits for: a decision by one of ``approvers`` (user ids and
    ``role:<name>``), within ``timeout_s`` seconds (``None``: until decided or cancelled), and what a
    timeout (``on_timeout``: reject, approve, fail) and a rejection (``on_reject``: end, fail,
    branch) do (``docs/branches.md``)."""

    approvers: tuple[str, ...]
    timeout_s: float | None = None
    on_timeout: str = "reject"
    on_reject: str = "end"


@dataclass(frozen=True)
class Stage:
    """One stage; ``None`` for each optional key that was not given.

    ``next`` is the ids of the stage's own ``next`` entries as declared (the ``to`` of an object
    entry; :attr:`Dag.edges` is the graph, :meth:`Dag.edges_from` has the conditions);
    ``compensate`` is a capability name, ``False`` (opted out) or ``None`` (not given). ``kind`` is
    ``"agent"`` or ``"approval"``; an approval stage has ``approval`` and ``capability`` ``""``.
    """

    id: str
    capability: str
    next: tuple[str, ...] | None = None
    description: str | None = None
    retry: RetrySpec | None = None
    timeout_s: float | None = None
    compensate: str | bool | None = None
    kind: str = "agent"
    approval: Approval | None = None


@dataclass(frozen=True)
class Edge:
    """An edge from stage ``source`` to stage ``target`` with its ``when`` and ``unless`` patterns
    (``None``: no condition)."""

    source: str
    target: str
    when: Mapping[str, Any] | None = field(default=None, hash=False)
    unless: Mapping[str, Any] | None = field(default=None, hash=False)

    def fires(self, output: Mapping[str, Any], context: Mapping[str, Any]) -> bool:
        """Whether the edge fires after ``source`` completed with ``output`` in an execution with
        ``context``: :func:`lifecycle_dagster.core.conditions.edge_fires` (jsonb ``@>``)."""
        return edge_fires(self.when, self.unless, output, context)


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
    ``edge_specs`` are the same edges with their conditions, in order of first declaration (each
    stage's ``next`` entries, stages in order, then ``edges``); when empty (a Dag built by hand),
    :meth:`edges_from` and :meth:`edges_to` give the pairs of ``edges`` without conditions.
    The methods taking a stage id raise ``KeyError`` when there is no such stage.
    """

    stages: tuple[Stage, ...]
    edges: tuple[tuple[str, str], ...]
    default_retry: RetrySpec | None = None
    default_timeout_s: float | None = None
    on_failure: str = "compensate"
    context: ContextSpec = ContextSpec()
    schedule: ScheduleSpec | None = None
    #: the DAG's ``batch``; None when it has none (or ``null``): no batching
    batch: Batch | None = None
    edge_specs: tuple[Edge, ...] = ()

    @cached_property
    def _specs(self) -> tuple[Edge, ...]:
        return self.edge_specs or tuple(Edge(a, b) for a, b in self.edges)

    def edges_from(self, stage_id: str) -> tuple[Edge, ...]:
        """The edges from ``stage_id``, with their conditions, in order of first declaration."""
        self.stage(stage_id)
        return tuple(e for e in self._specs if e.source == stage_id)

    def edges_to(self, stage_id: str) -> tuple[Edge, ...]:
        """The edges to ``stage_id``, with their conditions, in order of first declaration."""
        self.stage(stage_id)
        return tuple(e for e in self._specs if e.target == stage_id)

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
        check_batch(self, obj)
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
        for k, entry in enumerate(targets or ()):
            rel = f"next[{k}]"
            if isinstance(entry, str):
                graph.next_target(where, rel, where.stages[0], entry, local)
            elif isinstance(entry, dict):
                self.next_object(where, rel, entry, graph, local)
            else:
                self.add("wrong_type", where, rel, f"{rel} must be a stage id or an object, got {kind(entry)}")

    def next_object(self, where: Where, rel: str, entry: dict[str, Any], graph: GraphRules, local: list[str]) -> None:
        """Check the object entry ``rel`` (``next[k]``) of a stage's ``next``: its keys, its ``to``
        (one problem at most, as for a string entry), its ``when`` and ``unless``."""
        self.keys(entry, NEXT_ENTRY_KEYS, Where(f"{where.path}.{rel}", where.label, where.stages, f"{rel}."))
        target = entry.get("to", MISSING)
        if self.is_stage_id(target, where, f"{rel}.to"):
            graph.next_target(where, rel, where.stages[0], target, local, f"{rel}.to")
        self.pattern(entry.get("when", MISSING), f"{rel}.when", where)
        self.pattern(entry.get("unless", MISSING), f"{rel}.unless", where)

    def edge_entry(self, k: int, raw: object, graph: GraphRules) -> None:
        """Check ``edges[k]``: its shape, each end (wrong_type or unknown_stage), the pair, then its
        ``when`` and ``unless``."""
        where, ends = self.edge(k, raw, graph.declared)
        if ends is None or not isinstance(raw, dict):
            return
        for key, end in zip(("from", "to"), ends, strict=True):
            if self.is_stage_id(end, where, key):
                graph.edge_end(where, key, end)
        graph.listed_edge(where, ends)
        self.pattern(raw.get("when", MISSING), "when", where)
        self.pattern(raw.get("unless", MISSING), "unless", where)


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
    stages = tuple(_stage(s) for s in doc["stages"])
    index = {s.id: i for i, s in enumerate(stages)}
    specs = _edge_specs(doc)
    defaults = doc.get("defaults", {})
    declared = doc.get("context", {})
    return Dag(
        stages=stages,
        edges=tuple(sorted(((e.source, e.target) for e in specs), key=lambda p: (index[p[0]], index[p[1]]))),
        default_retry=_retry(defaults.get("retry")),
        default_timeout_s=_float(defaults, "timeout_s"),
        on_failure=doc.get("on_failure", "compensate"),
        context=ContextSpec(
            required=tuple(declared.get("required", ())),
            example=declared.get("example"),
            description=declared.get("description"),
        ),
        schedule=_schedule(doc.get("schedule")),
        batch=_batch(doc.get("batch")),
        edge_specs=specs,
    )


def _stage(raw: Mapping[str, Any]) -> Stage:
    """The :class:`Stage` of a valid stage object."""
    approval = None
    if raw.get("kind") == "approval":
        approval = Approval(
            approvers=tuple(raw["approvers"]),
            timeout_s=_float(raw, "timeout_s"),
            on_timeout=raw.get("on_timeout", "reject"),
            on_reject=raw.get("on_reject", "end"),
        )
    return Stage(
        id=raw["id"],
        capability=raw.get("capability", ""),
        next=tuple(t if isinstance(t, str) else t["to"] for t in raw["next"]) if "next" in raw else None,
        description=raw.get("description"),
        retry=_retry(raw.get("retry")),
        timeout_s=_float(raw, "timeout_s"),
        compensate=raw.get("compensate"),
        kind=raw.get("kind", "agent"),
        approval=approval,
    )


def _edge_specs(doc: Mapping[str, Any]) -> tuple[Edge, ...]:
    """Every edge of a valid DAG with its conditions, in order of first declaration (``next``
    entries, stage by stage, then ``edges``; the validator made both forms agree)."""
    found: dict[tuple[str, str], Edge] = {}
    entries = [(s["id"], t if isinstance(t, dict) else {"to": t}) for s in doc["stages"] for t in s.get("next", ())]
    entries += [(e["from"], e) for e in doc.get("edges", [])]
    for source, entry in entries:
        if (source, entry["to"]) not in found:
            when, unless = (copy.deepcopy(entry.get(k)) for k in ("when", "unless"))
            found[(source, entry["to"])] = Edge(source, entry["to"], when, unless)
    return tuple(found.values())


def _schedule(raw: Mapping[str, Any] | None) -> ScheduleSpec | None:
    if raw is None:
        return None
    return ScheduleSpec(
        cron=raw["cron"],
        timezone=raw.get("timezone", "UTC"),
        context=dict(raw.get("context", {})),
        enabled=raw.get("enabled", True),
    )


def _batch(raw: Mapping[str, Any] | None) -> Batch | None:
    if raw is None:
        return None
    return Batch(
        max_executions=int(raw["max_executions"]),
        max_wait_s=float(raw.get("max_wait_s", DEFAULT_BATCH_WAIT_S)),
    )
