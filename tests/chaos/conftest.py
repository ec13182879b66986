"""Fixtures of the chaos suite: the scale, the shared world (one deployment on the test server for
the scenarios that do not restart Postgres) and the figures each scenario records."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from chaos_world import FIGURES, RESULTS, World, running


@pytest.fixture(scope="session")
def chaos_scale(request: pytest.FixtureRequest) -> int:
    scale = int(request.config.getoption("--chaos-scale"))
    if scale < 1:
        raise pytest.UsageError("--chaos-scale must be >= 1")
    return scale


@pytest.fixture(scope="module")
def shared_world(server_dsn: str, template_db: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    """One running deployment for the scenarios that share it (they run in order; each ends with
    every execution so far at rest)."""
    tmp = tmp_path_factory.mktemp("chaos")
    with running(World(server_dsn, tmp, template=template_db)) as world:
        yield world


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not FIGURES:
        return
    terminalreporter.section("chaos figures")
    terminalreporter.write_line(
        f"{'scenario':<20} {'scale':>5} {'executions':>10} {'faults':>6} {'quiesce s':>9} {'violations':>10}  outcomes"
    )
    for f in FIGURES:
        quiesce = "-" if f.quiesce_s is None else f"{f.quiesce_s:.1f}"
        outcomes = ", ".join(f"{k} {v}" for k, v in sorted(f.outcomes.items()))
        terminalreporter.write_line(
            f"{f.scenario:<20} {f.scale:>5} {f.executions:>10} {f.faults_total:>6} {quiesce:>9} "
            f"{len(f.violations):>10}  {outcomes}"
        )
        terminalreporter.write_line(f"{'':<20} faults: " + ", ".join(f"{k} {v}" for k, v in sorted(f.faults.items())))
    terminalreporter.write_line(f"(also in {RESULTS}/scale<N>/<scenario>.json)")
