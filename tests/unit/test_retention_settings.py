"""Durations (``--older-than``, ``LIFECYCLE_DAGSTER_RETENTION``) and the retention setting."""

from __future__ import annotations

from datetime import timedelta

import pytest

from lifecycle_dagster.settings import DEFAULT_RETENTION, Settings, format_duration, parse_duration


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("90d", timedelta(days=90)),
        ("12h", timedelta(hours=12)),
        ("30m", timedelta(minutes=30)),
        (" 2W ", timedelta(weeks=2)),
        ("3600s", timedelta(hours=1)),
    ],
)
def test_durations_parse(text: str, expected: timedelta) -> None:
    assert parse_duration(text) == expected


@pytest.mark.parametrize("text", ["", "90", "d", "1.5h", "-1d", "90 days", "1y", "36501d", "9999999999s"])
def test_bad_durations_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match="duration"):
        parse_duration(text)


def test_durations_format_in_their_largest_unit() -> None:
    assert [format_duration(parse_duration(t)) for t in ("90d", "36h", "120m", "14d", "61s")] == [
        "90d",
        "36h",
        "2h",
        "2w",
        "61s",
    ]


def test_the_retention_setting() -> None:
    def setting(value: str | None) -> timedelta | None:
        env = {} if value is None else {"LIFECYCLE_DAGSTER_RETENTION": value}
        return Settings(database_url=None, data_dir=None, dagster_home=None, env=env).retention  # type: ignore[arg-type]

    assert setting(None) == DEFAULT_RETENTION == timedelta(days=90)
    assert setting("off") is None and setting("OFF") is None
    assert setting("30d") == timedelta(days=30)
    for bad in ("59m", "soon"):
        with pytest.raises(ValueError, match="LIFECYCLE_DAGSTER_RETENTION"):
            setting(bad)
