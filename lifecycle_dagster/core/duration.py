"""Durations written as a number and a unit: ``30m``, ``12h``, ``90d`` (the retention horizon of
``lifecycle-dagster prune --older-than`` and ``LIFECYCLE_DAGSTER_RETENTION``)."""

from __future__ import annotations

import re
from datetime import timedelta

__all__ = ["MAX_DAYS", "UNITS", "format_duration", "parse_duration"]

#: the units a duration may use, in seconds
UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}

#: the longest duration accepted, in days (100 years)
MAX_DAYS = 36500

_DURATION = re.compile(r"^\s*(\d{1,9})\s*([smhdw])\s*$")


def parse_duration(text: str) -> timedelta:
    """``"90d"`` -> 90 days: a whole number (at most 9 digits) and one unit of :data:`UNITS`
    (``s``, ``m``, ``h``, ``d``, ``w``), case-insensitive, at most :data:`MAX_DAYS` days.

    Raises:
        ValueError: anything else (the message quotes the text and shows the form).
    """
    m = _DURATION.match(text.lower()) if isinstance(text, str) else None
    if m is None:
        raise ValueError(f"not a duration: {text!r} (a whole number and a unit s, m, h, d or w, e.g. 90d, 12h, 30m)")
    seconds = int(m.group(1)) * UNITS[m.group(2)]
    if seconds > MAX_DAYS * 86400:
        raise ValueError(f"duration too long: {text!r} (at most {MAX_DAYS}d)")
    return timedelta(seconds=seconds)


def format_duration(value: timedelta) -> str:
    """The shortest exact form of ``value`` in the largest unit that divides it (``90d``, ``36h``)."""
    seconds = int(value.total_seconds())
    for unit, size in sorted(UNITS.items(), key=lambda kv: -kv[1]):
        if seconds and seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"
