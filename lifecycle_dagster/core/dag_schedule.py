"""Schedule rules of a ``dag_schema`` (stdlib only): the optional top-level ``schedule`` object.

``"schedule": {"cron": "0 9 * * 1-5", "timezone": "Europe/Berlin", "context": {...},
"enabled": true}``: ``cron`` is required; ``timezone`` defaults to ``UTC``, ``context`` (the JSON
object each scheduled execution starts with) to ``{}``, ``enabled`` (whether the Dagster schedule
runs until someone stops it) to ``true``. The database's ``lifecycle.dag_check_schedule``
(``sql/schema/02_dag_validation.sql``) applies the same rules with the same messages.

The cron rule is a subset of what Dagster accepts (``dagster._utils.schedules.is_valid_cron_string``),
chosen so both validators can apply it exactly: five fields separated by single spaces (minute
0-59, hour 0-23, day of month 1-31, month 1-12, day of week 0-7, 0 and 7 both Sunday), each a
comma-separated list of items ``*``, ``n``, ``a-b`` (``a <= b``), each optionally with a step
``/s`` (``s >= 1``); numbers are one or two digits. No names (``MON``), macros (``@daily``),
``L``, ``?`` or ``#``. A day of month that never occurs in a listed month (``0 0 31 4 *``,
``0 0 30 2 *``) is refused: Dagster's tick iterator fails on such a schedule.

The timezone is an IANA name that both Python's :mod:`zoneinfo` (``available_timezones()``) and
Postgres (``pg_timezone_names``, without its ``posix/`` and ``right/`` copies and ``posixrules``) know.
"""

from __future__ import annotations

import re
import zoneinfo
from datetime import UTC, datetime
from functools import cache
from typing import Any

from lifecycle_dagster.core.dag_structure import MISSING, TOP, Report, Where, kind, quote

#: the keys of a ``schedule`` object
SCHEDULE_KEYS = ("cron", "timezone", "context", "enabled")
#: each cron field: its name in messages and its range
CRON_FIELDS = (("minute", 0, 59), ("hour", 0, 23), ("day of month", 1, 31), ("month", 1, 12), ("day of week", 0, 7))
_ITEM = re.compile(r"(\*|[0-9]{1,2}(?:-[0-9]{1,2})?)(?:/([0-9]{1,2}))?")
#: days in each month (February: 29, Dagster runs a 29 Feb schedule in leap years)
_MONTH_DAYS = (31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)
#: where the schedule's problems are: messages name each key by its path (``schedule.cron``)
SCHEDULE = Where("schedule", "workflow DAG", (), "schedule.")


def _item_values(item: str, low: int, high: int) -> list[int] | None:
    """The values one cron item stands for, or None when it breaks the rule."""
    m = _ITEM.fullmatch(item)
    if m is None:
        return None
    base, step = m.group(1), int(m.group(2) or "1")
    if base == "*":
        first, last = low, high
    else:
        ends = [int(n) for n in base.split("-")]
        first, last = ends[0], ends[-1]
        if "-" not in base and m.group(2):  # n/s: from n to the end of the range
            last = high
    if step < 1 or not (low <= first <= last <= high):
        return None
    return list(range(first, last + 1, step))


def cron_field_values(field: str, low: int, high: int) -> list[int] | None:
    """The values a cron field stands for (``field``: one of the five, ``low``..``high`` its
    range), or None when it breaks the rule (module docstring)."""
    values: list[int] = []
    for item in field.split(","):
        found = _item_values(item, low, high)
        if found is None:
            return None
        values += found
    return values


def cron_problem(cron: str) -> str | None:
    """Why ``cron`` breaks the rule (the module docstring), in words, or None when it is valid."""
    if cron == "":
        return "it is empty"
    fields = cron.split(" ")
    if len(fields) != 5:
        return f"it has {len(fields)} fields separated by single spaces, not 5"
    values: list[list[int]] = []
    for field, (name, low, high) in zip(fields, CRON_FIELDS, strict=True):
        found = cron_field_values(field, low, high)
        if found is None:
            return (
                f"the {name} field {quote(field)} is not *, a number from {low} to {high}, a range a-b"
                " (a <= b), a step (*/s, n/s or a-b/s, s >= 1) or a comma-separated list of these"
            )
        values.append(found)
    if min(values[2]) > max(_MONTH_DAYS[m - 1] for m in values[3]):
        return "no listed day of month occurs in a listed month"
    return None


@cache
def known_timezones() -> frozenset[str]:
    """The IANA names :mod:`zoneinfo` knows on this machine (``available_timezones()``, cached)."""
    return frozenset(zoneinfo.available_timezones())


def tick_key(definition_id: str, tick: datetime) -> str:
    """The key of one schedule tick: ``schedule:<definition id>:<tick instant, UTC,
    YYYY-MM-DDTHH:MM:SSZ>``; the execution a tick inserts carries it (unique in the database).

    Raises:
        ValueError: ``tick`` has no timezone (its instant is unknown).
    """
    if tick.tzinfo is None or tick.utcoffset() is None:
        raise ValueError(f"a schedule tick needs a timezone-aware time, got {tick.isoformat()}")
    return f"schedule:{definition_id}:{tick.astimezone(UTC).strftime('%Y-%m-%dT%H:%M:%SZ')}"


def check_schedule(report: Report, obj: dict[str, Any]) -> None:
    """Add the problems of ``obj["schedule"]`` (absent: none) to ``report``."""
    if "schedule" not in obj:
        return
    raw = obj["schedule"]
    if not isinstance(raw, dict):
        report.add("wrong_type", TOP, "schedule", f"schedule must be an object, got {kind(raw)}")
        return
    for key in raw:
        if key not in SCHEDULE_KEYS:
            report.add("unknown_key", SCHEDULE, str(key), f"unknown key {quote('schedule.' + str(key))}")
    cron = raw.get("cron", MISSING)
    if not isinstance(cron, str):
        report.add("wrong_type", SCHEDULE, "cron", f"schedule.cron must be a string, got {kind(cron)}")
    elif (why := cron_problem(cron)) is not None:
        report.add("bad_value", SCHEDULE, "cron", f"schedule.cron {quote(cron)} is not a valid cron: {why}")
    timezone = raw.get("timezone", "UTC")
    if not isinstance(timezone, str):
        report.add("wrong_type", SCHEDULE, "timezone", f"schedule.timezone must be a string, got {kind(timezone)}")
    elif timezone not in known_timezones():
        report.add(
            "bad_value",
            SCHEDULE,
            "timezone",
            f"schedule.timezone must be an IANA time zone name (Europe/Berlin, UTC...), got {quote(timezone)}",
        )
    context = raw.get("context", {})
    if not isinstance(context, dict):
        report.add("wrong_type", SCHEDULE, "context", f"schedule.context must be an object, got {kind(context)}")
    enabled = raw.get("enabled", True)
    if not isinstance(enabled, bool):
        report.add("wrong_type", SCHEDULE, "enabled", f"schedule.enabled must be a boolean, got {kind(enabled)}")
