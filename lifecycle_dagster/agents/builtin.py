"""The five built-in lifecycle agents and the customer profile they share.

Profile (the execution context)::

    {"customer": "ACME Corp",                 # non-empty string
     "currency": "USD",                       # three upper-case letters
     "segments": [                            # non-empty list; names unique
        {"name": "Manufacturing",             # non-empty string
         "annual_spend": 1200000,             # number > 0
         "process_cost": 450000,              # number, 0 <= process_cost <= annual_spend
         "automation_rate": 0.2}],            # number, 0 <= automation_rate <= 1
     "actuals": {"Manufacturing": 61250.5}}   # optional; segment name -> realised value >= 0

Every agent validates the whole profile; bad input raises ``AgentError(code="bad_input")``
naming the field path.  Money is ``round(x, 2)``, ratios ``round(x, 4)``, and every reported
total is ``round(sum(items), 2)``.  Formulas (constants below):

* Opportunity: ``potential = round(process_cost * (1 - automation_rate) * SAVINGS_FACTOR, 2)``;
  a segment whose potential is below ``MIN_OPPORTUNITY`` is dropped.  Opportunity ids are
  ``"OPP-<1-based position of the segment>"``.
* Assessment: ``score = round(potential / annual_spend, 4)``; qualified iff
  ``score >= QUALIFY_THRESHOLD``, otherwise rejected.  When no opportunity qualifies (none
  scored, or every one rejected), the output also holds
  ``"end": {"outcome": "not_qualified", "reason": "3 opportunities scored, none reached the
  threshold 0.05 (best: OPP-3 Office Operations, score 0.0367)"}`` (``examples/initech.json``):
  the execution completes there with that outcome (``docs/branches.md``) instead of running the
  later stages on nothing.  When at least one qualifies there is no ``end`` key: the output is
  exactly as it always was.
* Design: ``target = round(potential * CONFIDENCE, 2)`` per qualified opportunity.
* Realization: ``realised = actuals[segment]`` (0 when absent),
  ``attainment = round(realised / target, 4)``; actuals of segments without a target are
  passed through as ``untargeted_actuals``.
* Integrity: see :class:`IntegrityAgent`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, NamedTuple

from lifecycle_dagster.agents.base import AgentError, AgentRegistry, CompensationTask, Task, artifacts

SAVINGS_FACTOR = 0.35  # share of the non-automated process cost an initiative can save
MIN_OPPORTUNITY = 10_000.0  # potentials below this are not worth pursuing
QUALIFY_THRESHOLD = 0.05  # minimum potential / annual_spend
CONFIDENCE = 0.8  # share of the potential committed to as a target
NOT_QUALIFIED = "not_qualified"  # the outcome of an execution the Assessment Agent ends

BUILTIN_CAPABILITIES: Mapping[str, str] = MappingProxyType(
    {
        "opportunity": "Opportunity Agent",
        "assessment": "Assessment Agent",
        "design": "Design Agent",
        "execution": "Realization Agent",
        "governance": "Integrity Agent",
    }
)


@dataclass(frozen=True)
class Segment:
    name: str
    annual_spend: float
    process_cost: float
    automation_rate: float


@dataclass(frozen=True)
class Profile:
    customer: str
    currency: str
    segments: tuple[Segment, ...]
    actuals: Mapping[str, float]

    def money(self, amount: float) -> str:
        return f"{amount:,.2f} {self.currency}"


class Item(NamedTuple):
    """One entry of an upstream list: its opportunity id, segment and money amount."""

    id: str
    segment: str
    amount: float


def _bad(message: str) -> AgentError:
    return AgentError("bad_input", message)


def _num(value: Any, path: str, what: str = "a non-negative number", high: float = math.inf) -> float:
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not number or not math.isfinite(value) or not 0 <= value <= high:
        raise _bad(f"{path} must be {what}")
    return float(value)


def _total(amounts: Iterable[float]) -> float:
    return round(sum(amounts), 2)


def _summary(text: str) -> str:
    return text if len(text) < 120 else text[:116] + "..."


def _record(item: Item, **fields: Any) -> dict[str, Any]:
    return {"id": item.id, "segment": item.segment, **fields}


def parse_profile(context: Mapping[str, Any]) -> Profile:
    """Validate the customer profile (see the module docstring) and return it typed."""
    customer, currency = context.get("customer"), context.get("currency")
    if not isinstance(customer, str) or not customer.strip():
        raise _bad("context.customer must be a non-empty string")
    if not (isinstance(currency, str) and len(currency) == 3 and currency.isalpha()):
        raise _bad("context.currency must be a three-letter upper-case code such as 'USD'")
    if not currency.isupper():
        raise _bad("context.currency must be a three-letter upper-case code such as 'USD'")
    raw_segments = context.get("segments")
    if not isinstance(raw_segments, list) or not raw_segments:
        raise _bad("context.segments must be a non-empty list")
    segments: list[Segment] = []
    for i, raw in enumerate(raw_segments):
        path = f"context.segments[{i}]"
        if not isinstance(raw, Mapping):
            raise _bad(f"{path} must be an object")
        name = raw.get("name")
        if not isinstance(name, str) or not name.strip():
            raise _bad(f"{path}.name must be a non-empty string")
        if any(s.name == name for s in segments):
            raise _bad(f"{path}.name {name!r} is already used by an earlier segment")
        spend = _num(raw.get("annual_spend"), f"{path}.annual_spend", "a positive number")
        if spend == 0:
            raise _bad(f"{path}.annual_spend must be a positive number")
        cost = _num(raw.get("process_cost"), f"{path}.process_cost")
        if cost > spend:
            raise _bad(f"{path}.process_cost must not exceed annual_spend")
        rate = _num(raw.get("automation_rate"), f"{path}.automation_rate", "a number in [0, 1]", 1)
        segments.append(Segment(name, spend, cost, rate))
    raw_actuals = context.get("actuals", {})
    if not isinstance(raw_actuals, Mapping):
        raise _bad("context.actuals must be an object")
    actuals: dict[str, float] = {}
    for key, value in raw_actuals.items():
        if all(s.name != key for s in segments):
            raise _bad(f"context.actuals.{key} does not name a segment in context.segments")
        actuals[key] = _num(value, f"context.actuals.{key}")
    return Profile(customer, currency, tuple(segments), actuals)


def _items(output: Mapping[str, Any], capability: str, key: str, field: str) -> list[Item]:
    """Read an upstream list ``output[key]`` of ``{"id", "segment", field: amount}`` objects."""
    path = f"{capability}.output.{key}"
    if not isinstance(output.get(key), list):
        raise _bad(f"{path} must be a list")
    items: list[Item] = []
    for i, entry in enumerate(output[key]):
        if not isinstance(entry, Mapping):
            raise _bad(f"{path}[{i}] must be an object")
        for text_field in ("id", "segment"):
            if not isinstance(entry.get(text_field), str):
                raise _bad(f"{path}[{i}].{text_field} must be a string")
        amount = _num(entry.get(field), f"{path}[{i}].{field}")
        items.append(Item(entry["id"], entry["segment"], amount))
    return items


class OpportunityAgent:
    """Opportunity: ``potential = process_cost * (1 - automation_rate) * SAVINGS_FACTOR``
    per segment; potentials below ``MIN_OPPORTUNITY`` are listed as ``dropped``."""

    name = "Opportunity Agent"

    def run(self, task: Task) -> dict[str, Any]:
        p = parse_profile(task.context)
        found: list[dict[str, Any]] = []
        dropped: list[dict[str, Any]] = []
        for position, s in enumerate(p.segments, start=1):
            potential = round(s.process_cost * (1 - s.automation_rate) * SAVINGS_FACTOR, 2)
            item = Item(f"OPP-{position}", s.name, potential)
            if potential >= MIN_OPPORTUNITY:
                found.append(_record(item, potential_value=potential))
            else:
                dropped.append({"segment": s.name, "potential_value": potential})
        total = _total(o["potential_value"] for o in found)
        text = f"{len(found)} opportunities worth {p.money(total)}, {len(dropped)} too small"
        return {
            "opportunities": found,
            "dropped": dropped,
            "total_potential": total,
            "artifacts": artifacts("opportunity", found),
            "summary": _summary(f"{p.customer}: {text}"),
        }

    def compensate(self, task: CompensationTask) -> dict[str, Any]:
        """Undo: void exactly the artifacts this stage wrote."""
        return _undo(task)


def _not_qualified_reason(rejected: list[dict[str, Any]]) -> str:
    """The ``end.reason`` of an assessment where nothing qualified: the figures, in one sentence."""
    count = len(rejected)
    noun = "opportunity" if count == 1 else "opportunities"
    text = f"{count} {noun} scored, none reached the threshold {QUALIFY_THRESHOLD}"
    if rejected:
        best = max(rejected, key=lambda r: r["score"])
        text += f" (best: {best['id']} {best['segment']}, score {best['score']:.4f})"
    return text


class AssessmentAgent:
    """Assessment: ``score = round(potential / annual_spend, 4)``; qualified iff
    ``score >= QUALIFY_THRESHOLD``; ``total_qualified`` sums the qualified potentials.
    When nothing qualifies, the output also carries ``end`` (outcome ``not_qualified``): the
    execution ends there, cleanly, instead of designing zero targets."""

    name = "Assessment Agent"

    def run(self, task: Task) -> dict[str, Any]:
        p = parse_profile(task.context)
        spend = {s.name: s.annual_spend for s in p.segments}
        opportunities = task.output_of("opportunity")
        qualified: list[dict[str, Any]] = []
        rejected: list[dict[str, Any]] = []
        for o in _items(opportunities, "opportunity", "opportunities", "potential_value"):
            if o.segment not in spend:
                raise _bad(f"opportunity {o.id}: segment {o.segment!r} is not in context.segments")
            score = round(o.amount / spend[o.segment], 4)
            ok = score >= QUALIFY_THRESHOLD
            reason = f"score {score:.4f} {'>=' if ok else '<'} threshold {QUALIFY_THRESHOLD}"
            record = _record(o, potential_value=o.amount, score=score, reason=reason)
            (qualified if ok else rejected).append(record)
        total = _total(q["potential_value"] for q in qualified)
        text = f"{len(qualified)} of {len(qualified) + len(rejected)} opportunities qualified"
        output: dict[str, Any] = {
            "qualified": qualified,
            "rejected": rejected,
            "total_qualified": total,
            "artifacts": artifacts("score", qualified + rejected),
            "summary": _summary(f"{p.customer}: {text}, worth {p.money(total)}"),
        }
        if not qualified:
            output["end"] = {"outcome": NOT_QUALIFIED, "reason": _not_qualified_reason(rejected)}
        return output

    def compensate(self, task: CompensationTask) -> dict[str, Any]:
        """Undo: void exactly the artifacts this stage wrote."""
        return _undo(task)


class DesignAgent:
    """Design: ``target = round(potential * CONFIDENCE, 2)`` per qualified opportunity."""

    name = "Design Agent"

    def run(self, task: Task) -> dict[str, Any]:
        p = parse_profile(task.context)
        qualified = _items(task.output_of("assessment"), "assessment", "qualified", "potential_value")
        targets = [
            _record(q, potential_value=q.amount, target_value=round(q.amount * CONFIDENCE, 2)) for q in qualified
        ]
        total = _total(t["target_value"] for t in targets)
        return {
            "targets": targets,
            "total_target": total,
            "artifacts": artifacts("target", targets),
            "summary": _summary(f"{p.customer}: {len(targets)} targets totalling {p.money(total)}"),
        }

    def compensate(self, task: CompensationTask) -> dict[str, Any]:
        """Undo: void exactly the artifacts this stage wrote."""
        return _undo(task)


class RealizationAgent:
    """Realization: ``realised = context.actuals[segment]`` (0 if absent) per target and
    ``attainment = round(realised / target, 4)`` (overall: total_realised / total_target).
    Actuals of segments without a target are passed through as ``untargeted_actuals``."""

    name = "Realization Agent"

    def run(self, task: Task) -> dict[str, Any]:
        p = parse_profile(task.context)
        targets = _items(task.output_of("design"), "design", "targets", "target_value")
        realisations: list[dict[str, Any]] = []
        for t in targets:
            realised = round(p.actuals.get(t.segment, 0.0), 2)
            attainment = round(realised / t.amount, 4) if t.amount else None
            realisations.append(_record(t, target_value=t.amount, realised_value=realised, attainment=attainment))
        targeted = {t.segment for t in targets}
        untargeted = {s: round(v, 2) for s, v in sorted(p.actuals.items()) if s not in targeted}
        total_realised = _total(r["realised_value"] for r in realisations)
        total_target = _total(t.amount for t in targets)
        text = f"realised {p.money(total_realised)} of {p.money(total_target)} targeted"
        return {
            "realisations": realisations,
            "untargeted_actuals": untargeted,
            "total_realised": total_realised,
            "artifacts": artifacts("realised_value", realisations),
            "attainment": round(total_realised / total_target, 4) if total_target else None,
            "summary": _summary(f"{p.customer}: {text}"),
        }

    def compensate(self, task: CompensationTask) -> dict[str, Any]:
        """Undo: void exactly the artifacts this stage wrote."""
        return _undo(task)


_RECONCILED = (  # capability, item list, item amount, reported total
    ("opportunity", "opportunities", "potential_value", "total_potential"),
    ("assessment", "qualified", "potential_value", "total_qualified"),
    ("design", "targets", "target_value", "total_target"),
    ("execution", "realisations", "realised_value", "total_realised"),
)
CHECKS = (
    "upstream_complete",
    "totals_reconcile",
    "realised_within_potential",
    "no_untargeted_actuals",
)


class IntegrityAgent:
    """Integrity (governance) runs every check and lists every problem found:

    1. upstream_complete: the opportunity, assessment, design and execution stages each
       produced a non-empty output;
    2. totals_reconcile: each stage's total equals the sum of its items, in whole cents
       (``round(total * 100) == round(sum * 100)``); malformed outputs are problems too;
    3. realised_within_potential: each realisation's ``realised_value`` is at most the
       ``potential_value`` of the opportunity with the same id;
    4. no_untargeted_actuals: the execution stage's ``untargeted_actuals`` is empty.

    Any problem raises ``AgentError("integrity_failed", "integrity failed: " + "; ".join(...))``.
    """

    name = "Integrity Agent"

    def run(self, task: Task) -> dict[str, Any]:
        p = parse_profile(task.context)
        problems: list[str] = []
        items: dict[str, list[Item]] = {}
        untargeted: Any = {}
        for capability, key, field, total_key in _RECONCILED:
            try:
                output = task.output_of(capability)
                if not output:
                    raise AgentError("empty", f"the {capability} stage produced an empty output")
                if capability == "execution":
                    untargeted = output.get("untargeted_actuals", {})
                items[capability] = _items(output, capability, key, field)
                total = _num(output.get(total_key), f"{capability}.output.{total_key}")
            except AgentError as e:
                problems.append(str(e))
                continue
            expected = _total(i.amount for i in items[capability])
            if round(total * 100) != round(expected * 100):
                problems.append(
                    f"{capability} {total_key} {p.money(total)} does not equal the sum of its items {p.money(expected)}"
                )
        potentials = {o.id: o.amount for o in items.get("opportunity", [])}
        for r in items.get("execution", []) if "opportunity" in items else []:
            if r.id not in potentials:
                problems.append(f"realisation {r.id} ({r.segment}) matches no opportunity")
            elif r.amount > potentials[r.id]:
                problems.append(
                    f"realised value {p.money(r.amount)} for {r.segment} ({r.id}) exceeds its "
                    f"potential {p.money(potentials[r.id])}"
                )
        if not isinstance(untargeted, Mapping):
            problems.append("execution.output.untargeted_actuals must be an object")
            untargeted = {}
        for segment, amount in sorted(untargeted.items()):
            shown = p.money(amount) if isinstance(amount, (int, float)) else repr(amount)
            problems.append(f"actuals of {shown} reported for {segment}, which was never targeted")
        if problems:
            raise AgentError("integrity_failed", "integrity failed: " + "; ".join(problems))
        return {
            "checks": list(CHECKS),
            "passed": True,
            "summary": _summary(f"{p.customer}: all {len(CHECKS)} integrity checks passed"),
        }


def _undo(task: CompensationTask) -> dict[str, Any]:
    void = task.artifacts()
    kinds = sorted({a["kind"] for a in void})
    return {"void": void, "summary": _summary(f"voided {len(void)} {'/'.join(kinds) or 'artifacts'}")}


def default_registry() -> AgentRegistry:
    """A registry holding the five built-in agents (see BUILTIN_CAPABILITIES)."""
    agents = (OpportunityAgent(), AssessmentAgent(), DesignAgent(), RealizationAgent())
    return AgentRegistry((*agents, IntegrityAgent()))
