"""The default batch (``LIFECYCLE_DAGSTER_BATCH``): ``parse_batch`` and the setting."""

from __future__ import annotations

import pytest

from lifecycle_dagster.core import dag_batch
from lifecycle_dagster.core.dag import Batch, parse_dag
from lifecycle_dagster.settings import (
    BATCH_DEFAULT_WAIT_S,
    BATCH_MAX_EXECUTIONS,
    BATCH_MAX_WAIT_S,
    Settings,
    parse_batch,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("500/2", (500, 2.0)),
        ("500", (500, 5.0)),
        ("1", (1, 5.0)),
        ("10000/3600", (10000, 3600.0)),
        ("7/0", (7, 0.0)),
        ("7/0.25", (7, 0.25)),
        ("7/.5", (7, 0.5)),
        (" 20 / 1.5 ", (20, 1.5)),
    ],
)
def test_batches_parse(text: str, expected: tuple[int, float]) -> None:
    value = parse_batch(text)
    assert value == expected
    assert isinstance(value[0], int) and isinstance(value[1], float)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "off",
        "0",
        "10001",
        "-1",
        "2.5",
        "1e3",
        "500/",
        "/2",
        "500/-1",
        "500/3600.5",
        "500/1e3",
        "500/inf",
        "500/nan",
        "500/2/3",
        "500 2",
        "500s",
        "\u0665",  # an Arabic-Indic digit five: only ASCII digits
        "true",
    ],
)
def test_bad_batches_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match="batch"):
        parse_batch(text)


def test_the_bounds_are_those_of_a_dags_batch() -> None:
    assert BATCH_MAX_EXECUTIONS == dag_batch.MAX_BATCH_EXECUTIONS
    assert BATCH_MAX_WAIT_S == dag_batch.MAX_BATCH_WAIT_S
    assert BATCH_DEFAULT_WAIT_S == dag_batch.DEFAULT_BATCH_WAIT_S


@pytest.mark.parametrize("text", ["1", "500/2", "10000/3600", "3/0"])
def test_a_parsed_batch_is_the_batch_of_a_dag_that_declares_it(text: str) -> None:
    most, wait = parse_batch(text)
    dag = parse_dag(
        {"stages": [{"id": "a", "capability": "work"}], "batch": {"max_executions": most, "max_wait_s": wait}}
    )
    assert dag.batch == Batch(*parse_batch(text))
    if "/" not in text:
        assert parse_dag(
            {"stages": [{"id": "a", "capability": "w"}], "batch": {"max_executions": most}}
        ).batch == Batch(most, wait)


def test_the_batch_setting() -> None:
    def setting(value: str | None) -> tuple[int, float] | None:
        env = {} if value is None else {"LIFECYCLE_DAGSTER_BATCH": value}
        return Settings(database_url=None, data_dir=None, dagster_home=None, env=env).batch  # type: ignore[arg-type]

    assert setting(None) is None and setting("") is None and setting("  ") is None
    assert setting("off") is None and setting("OFF") is None
    assert setting("500/2") == (500, 2.0)
    assert setting(" 50 ") == (50, 5.0)
    for bad in ("0", "500/4000", "lots", "500/2s"):
        with pytest.raises(ValueError, match="LIFECYCLE_DAGSTER_BATCH") as caught:
            setting(bad)
        assert repr(bad) in str(caught.value)


@pytest.mark.parametrize("value", ["0", "20000", "10/x", "abc"])
def test_a_bad_batch_setting_fails_the_code_location_load(value: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Not every definition skipped with the sensors gone while the load says it succeeded: the
    load fails, naming the variable (as a bad LIFECYCLE_DAGSTER_EXECUTOR does)."""
    from lifecycle_dagster.location.job_factory import build_jobs

    monkeypatch.setenv("LIFECYCLE_DAGSTER_BATCH", value)
    with pytest.raises(ValueError, match="LIFECYCLE_DAGSTER_BATCH"):
        build_jobs([])
