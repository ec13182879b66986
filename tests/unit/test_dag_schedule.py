"""The schedule rules (lifecycle_dagster.core.dag_schedule) against Dagster's own cron handling, and
the tick keys of Dagster's tick times across daylight-saving changes (no database)."""

from __future__ import annotations

import json
import random
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from dagster._utils.schedules import cron_string_iterator, is_valid_cron_string

from lifecycle_dagster.core.dag import parse_dag
from lifecycle_dagster.core.dag_schedule import CRON_FIELDS, cron_problem, tick_key

DEF = "0b3c9a4e-0000-4000-8000-000000000001"


def _random_field(rng: random.Random, low: int, high: int) -> str:
    def number() -> str:
        return str(rng.randint(low - 1, high + 1))

    def item() -> str:
        base = rng.choice(["*", number(), f"{number()}-{number()}"])
        return base + (f"/{rng.randint(0, 70)}" if rng.random() < 0.3 else "")

    return ",".join(item() for _ in range(rng.randint(1, 3)))


def test_every_cron_the_rule_accepts_dagster_accepts_and_can_tick() -> None:
    """2000 random crons near the rule's edges: each one the rule accepts is valid for Dagster and
    has a next tick (Dagster's iterator fails on a day that never occurs)."""
    rng = random.Random(15)
    accepted = refused = 0
    for _ in range(2000):
        cron = " ".join(_random_field(rng, low, high) for _, low, high in CRON_FIELDS)
        if cron_problem(cron) is not None:
            refused += 1
            continue
        accepted += 1
        assert is_valid_cron_string(cron), cron
        start = datetime(2026, 1, 1, tzinfo=UTC).timestamp()
        assert next(cron_string_iterator(start, cron, "Europe/Berlin")) is not None, cron
    assert accepted > 100 and refused > 1000, (accepted, refused)


@pytest.mark.parametrize(
    ("cron", "why"),
    [
        ("0 9 * * MON", "the day of week field 'MON' is not *"),
        ("0 0 31 4 *", "no listed day of month occurs in a listed month"),
        ("0 9 * * * *", "it has 6 fields"),
        ("1-5/2 * * * *", None),
        ("5/15 * * * 7", None),
    ],
)
def test_cron_problem_names_the_field(cron: str, why: str | None) -> None:
    problem = cron_problem(cron)
    assert (problem is None) if why is None else (problem is not None and problem.startswith(why)), problem


def test_parse_dag_gives_the_schedule_with_its_defaults() -> None:
    dag = parse_dag({"stages": [{"id": "a", "capability": "w"}], "schedule": {"cron": "0 9 * * 1-5"}})
    assert dag.schedule is not None
    assert (dag.schedule.cron, dag.schedule.timezone, dict(dag.schedule.context), dag.schedule.enabled) == (
        "0 9 * * 1-5",
        "UTC",
        {},
        True,
    )
    assert parse_dag({"stages": [{"id": "a", "capability": "w"}]}).schedule is None


def test_tick_key_is_the_instant_in_utc() -> None:
    berlin = datetime(2026, 3, 29, 3, 0, tzinfo=ZoneInfo("Europe/Berlin"))
    assert tick_key(DEF, berlin) == f"schedule:{DEF}:2026-03-29T01:00:00Z"
    with pytest.raises(ValueError, match="timezone-aware"):
        tick_key(DEF, datetime(2026, 3, 29, 3, 0))


def _ticks(cron: str, tz: str, first: date, days: int) -> list[datetime]:
    start = datetime(first.year, first.month, first.day, tzinfo=ZoneInfo(tz)).timestamp()
    end = start + days * 86400
    out = []
    for tick in cron_string_iterator(start, cron, tz):
        if tick.timestamp() >= end:
            return out
        out.append(tick)
    return out


# (cron, zone, the day of the change, the tick's instant in UTC on that day): Dagster runs a
# time that does not exist (spring) at the first time after the gap, and a time that occurs
# twice (autumn) once, at the later of the two (docs: customizing-execution-timezone)
DST = [
    ("0 2 * * *", "Europe/Berlin", date(2026, 3, 29), "2026-03-29T01:00:00Z"),  # 02:00 skipped: 03:00 CEST
    ("0 2 * * *", "Europe/Berlin", date(2026, 10, 25), "2026-10-25T01:00:00Z"),  # 02:00 twice: the CET one
    ("30 1 * * *", "Europe/Berlin", date(2026, 3, 29), "2026-03-29T00:30:00Z"),  # before the gap
    ("30 1 * * *", "America/New_York", date(2026, 3, 8), "2026-03-08T06:30:00Z"),  # before the gap (EST)
    ("30 1 * * *", "America/New_York", date(2026, 11, 1), "2026-11-01T06:30:00Z"),  # 01:30 twice: the EST one
    ("0 2 * * *", "America/New_York", date(2026, 3, 8), "2026-03-08T07:00:00Z"),  # 02:00 skipped: 03:00 EDT
]


@pytest.mark.parametrize(("cron", "zone", "day", "instant"), DST, ids=[f"{c}|{z}|{d}" for c, z, d, _ in DST])
def test_one_tick_and_one_key_per_day_across_a_daylight_saving_change(
    cron: str, zone: str, day: date, instant: str
) -> None:
    first = day - timedelta(days=3)
    ticks = _ticks(cron, zone, first, 7)
    keys = [tick_key(DEF, t) for t in ticks]
    # one tick per local day, none doubled or lost, and every key distinct
    assert [t.astimezone(ZoneInfo(zone)).date() for t in ticks] == [first + timedelta(days=i) for i in range(7)]
    assert len(set(keys)) == 7
    assert f"schedule:{DEF}:{instant}" in keys


def test_validate_prints_the_schedule_and_its_next_ticks(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from lifecycle_dagster.cli.main import main

    path = tmp_path / "daily.json"
    doc = {"name": "daily", "stages": [{"id": "a", "capability": "w"}], "schedule": {"cron": "0 9 * * 1-5"}}
    path.write_text(json.dumps(doc), encoding="utf-8")
    result = CliRunner().invoke(main, ["validate", "--offline", str(path)])
    assert result.exit_code == 0, result.output
    assert f"{path}: schedule '0 9 * * 1-5' in UTC (running by default): next ticks " in result.output
    doc["schedule"] = {"cron": "0 9 * * MON", "every": "day"}
    path.write_text(json.dumps(doc), encoding="utf-8")
    result = CliRunner().invoke(main, ["validate", "--offline", str(path)])
    assert result.exit_code == 1
    assert "workflow DAG: unknown key 'schedule.every'" in result.output
    assert "workflow DAG: schedule.cron '0 9 * * MON' is not a valid cron: the day of week field 'MON'" in result.output


def test_next_ticks_follow_the_wall_clock_across_the_spring_change() -> None:
    from lifecycle_dagster.core.dag import ScheduleSpec
    from lifecycle_dagster.location.schedules import next_ticks

    ticks = next_ticks(ScheduleSpec("0 2 * * *", "Europe/Berlin"), 3, datetime(2026, 3, 28, 1, 0, tzinfo=UTC))
    assert [t.isoformat() for t in ticks] == [
        "2026-03-29T03:00:00+02:00",
        "2026-03-30T02:00:00+02:00",
        "2026-03-31T02:00:00+02:00",
    ]
