"""Graph rules of a ``dag_schema`` (stdlib only): references to unknown stages, duplicate stages and
edges, self loops and cycles; and the topological order of a valid DAG.

:mod:`lifecycle_dagster.core.dag` walks the document and applies these after the structure rules of
:mod:`lifecycle_dagster.core.dag_structure` that make them meaningful (a reference is checked here
once it is known to be a string). Topological order and cycle detection use
:class:`graphlib.TopologicalSorter`; the cycle *messages* (one per strongly connected component,
with a shortest cycle through its first declared stage) are computed here as the database's twin
``lifecycle.dag_validate`` computes them, since graphlib reports one cycle of its own choosing.
"""

from __future__ import annotations

import heapq
from collections import Counter, deque
from collections.abc import Iterable, Sequence
from graphlib import CycleError, TopologicalSorter
from typing import Any

from lifecycle_dagster.core.dag_structure import ID_RE, Report, Where, quote


class GraphRules:
    """The graph rules for the stages ``raw_stages``; problems are added to ``report``.

    ``declared``: every non-empty string id (references to one are not ``unknown_stage``);
    ``nodes``: the valid ids declared once, the stages cycles are looked for among; ``graph``: the
    well-formed edges seen so far (``next`` entries and ``edges`` entries).
    """

    def __init__(self, report: Report, raw_stages: list[Any]) -> None:
        self.report = report
        self.ids = [s.get("id") if isinstance(s, dict) else None for s in raw_stages]
        self.declared = {s for s in self.ids if isinstance(s, str) and s}
        self.counts = Counter(s for s in self.ids if isinstance(s, str) and ID_RE.fullmatch(s))
        self.nodes = {s for s, count in self.counts.items() if count == 1}
        self.graph: set[tuple[str, str]] = set()
        self._listed: set[tuple[str, str]] = set()

    def duplicates(self) -> None:
        """``duplicate_stage`` once per valid id declared more than once, at its second entry."""
        for sid, count in self.counts.items():
            if count > 1:
                at = [f"stages[{i}]" for i, s in enumerate(self.ids) if s == sid]
                self.report.add(
                    "duplicate_stage",
                    Where(at[1], f"stage {quote(sid)}", (sid,)),
                    "",
                    f"declared {count} times ({', '.join(at)})",
                )

    def next_target(
        self, where: Where, rel: str, source: str, target: str, local: list[str], to_rel: str | None = None
    ) -> None:
        """Check the target ``target`` (a string) of the ``next`` entry ``rel`` of stage ``source``
        (``local``: its targets accepted so far, whatever their conditions); the first of
        unknown_stage (at ``to_rel``, ``next[k].to`` for an object entry, else at ``rel``),
        self_loop, duplicate_edge (at ``rel``), else an edge."""
        if target not in self.declared:
            self.report.add("unknown_stage", where, to_rel or rel, f"edge to unknown stage {quote(target)}")
        elif target == source:
            self.report.add("self_loop", where, rel, f"edge to itself ({rel})")
        elif target in local:
            self.report.add("duplicate_edge", where, rel, f"edge to {quote(target)} is listed twice", [target])
        else:
            local.append(target)
            self.graph.add((source, target))

    def edge_end(self, where: Where, key: str, end: str) -> None:
        """``unknown_stage`` when the string ``from``/``to`` ``end`` of an edge is not declared."""
        if end not in self.declared:
            self.report.add("unknown_stage", where, key, f"unknown stage {quote(end)}")

    def listed_edge(self, where: Where, ends: list[Any]) -> None:
        """With both ends declared: self_loop, duplicate_edge (listed earlier in ``edges``), or an edge."""
        known = [e for e in ends if isinstance(e, str) and e in self.declared]
        if len(known) != 2:
            return
        pair = (known[0], known[1])
        if pair[0] == pair[1]:
            self.report.add("self_loop", where, "", f"edge from stage {quote(pair[0])} to itself")
        elif pair in self._listed:
            self.report.add("duplicate_edge", where, "", "edge is listed twice")
        else:
            self._listed.add(pair)
            self.graph.add(pair)

    def cycles(self) -> None:
        """One ``cycle`` problem per strongly connected component of 2+ of :attr:`nodes`, in the
        order of their first declared stage, through the edges of :attr:`graph` between them."""
        order = [s for s in self.ids if isinstance(s, str) and s in self.nodes]
        rank = {n: i for i, n in enumerate(order)}
        edges = sorted(
            ((a, b) for a, b in self.graph if a in rank and b in rank), key=lambda e: (rank[e[0]], rank[e[1]])
        )
        stuck = _unordered(order, edges)
        if not stuck:
            return
        adj: dict[str, list[str]] = {n: [] for n in stuck}
        for a, b in edges:
            if a in adj and b in adj:
                adj[a].append(b)
        for component in _components(stuck, adj, rank):
            path = " -> ".join(_cycle_path(component, adj))
            where = Where(f"stages[{self.ids.index(component[0])}]", "cycle", tuple(component))
            self.report.add("cycle", where, "", f"{path} (stages {', '.join(map(quote, component))})")


def _unordered(nodes: list[str], edges: Iterable[tuple[str, str]]) -> list[str]:
    """The ``nodes`` a topological sort cannot reach (on a cycle or downstream of one), in order;
    ``[]`` when the graph is acyclic."""
    sorter: TopologicalSorter[str] = TopologicalSorter({n: () for n in nodes})
    for a, b in edges:
        sorter.add(b, a)
    try:
        sorter.prepare()
    except CycleError:
        pass  # graphlib still hands out every node it can order
    else:
        return []
    ordered: set[str] = set()
    while ready := sorter.get_ready():
        ordered.update(ready)
        sorter.done(*ready)
    return [n for n in nodes if n not in ordered]


def _components(nodes: list[str], adj: dict[str, list[str]], rank: dict[str, int]) -> list[list[str]]:
    """The strongly connected components of 2+ ``nodes`` (Kosaraju, iterative), each sorted by
    ``rank``, sorted by the rank of their first member."""
    radj: dict[str, list[str]] = {n: [] for n in nodes}
    for a in nodes:
        for b in adj[a]:
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
    return sorted(components, key=lambda c: rank[c[0]])


def _cycle_path(component: list[str], adj: dict[str, list[str]]) -> list[str]:
    """A shortest cycle through the component's first stage, e.g. ``[a, b, c, a]`` (breadth first,
    children in declaration order, as ``lifecycle.dag_validate`` finds it)."""
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
    raise RuntimeError(f"no cycle through {start!r} in a strongly connected component (a bug)")


def topological_order(ids: Sequence[str], edges: Iterable[tuple[str, str]]) -> tuple[str, ...]:
    """Every id of ``ids``, parents first: among the stages ready, the one declared first goes first
    (Kahn's algorithm with a priority queue; not batch by batch).

    Raises:
        ValueError: the edges have a cycle. KeyError: an edge names an id not in ``ids``.
    """
    index = {s: i for i, s in enumerate(ids)}
    sorter: TopologicalSorter[int] = TopologicalSorter({i: () for i in range(len(ids))})
    for a, b in edges:
        sorter.add(index[b], index[a])
    try:
        sorter.prepare()
    except CycleError as exc:
        raise ValueError("workflow DAG has a cycle") from exc
    ready = list(sorter.get_ready())
    heapq.heapify(ready)
    order: list[str] = []
    while ready:
        i = heapq.heappop(ready)
        order.append(ids[i])
        sorter.done(i)
        for j in sorter.get_ready():
            heapq.heappush(ready, j)
    return tuple(order)
