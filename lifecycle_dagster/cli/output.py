"""How the command line prints tables and follows an execution: rich on a terminal, plain text
otherwise.

On a terminal (the stream is a TTY): rich tables (bold header, statuses coloured, columns fitted to
the terminal's width, long cells wrapped) and a live progress bar on stderr. Otherwise (a pipe, a
file, a test): the same tables as plain columns two spaces apart, one row per line, no colour and
no box drawing, so the text stays greppable; and one progress line on stderr per change. The
choice is the stream's ``isatty()`` alone (``FORCE_COLOR`` does not turn a pipe into a table of
box characters). ``--json`` documents never pass through here.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Collection, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, Protocol, TextIO

import click

#: the colour of a status or breaker state on a terminal
_STYLES = {
    "completed": "green",
    "closed": "green",
    "rolled_back": "green",
    "in_progress": "yellow",
    "compensating": "yellow",
    "half_open": "yellow",
    "pending": "cyan",
    "waiting": "cyan",
    "skipped": "dim",
    "failed": "red",
    "cancelled": "red",
    "compensation_failed": "bold red",
    "open": "red",
}


#: the narrowest a prose column is squeezed to before the table is printed wider than the terminal
_PROSE_MIN = 12
#: a column of cells without blanks up to this long is kept whole on a terminal (a UUID is 36)
_WHOLE_UP_TO = 40


def is_terminal(stream: TextIO | None = None) -> bool:
    """Whether ``stream`` (default: stdout) is a terminal."""
    stream = sys.stdout if stream is None else stream
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or closed
        return False


def print_table(headers: Sequence[str], rows: Sequence[Sequence[str]], *, right: Collection[int] = ()) -> None:
    """Print ``rows`` (cells already text) under ``headers`` on stdout; the columns whose index is in
    ``right`` are right-aligned. On a terminal: a rich table. Otherwise: plain columns two spaces
    apart, each as wide as its widest cell, trailing blanks removed."""
    if is_terminal():
        _rich_table(headers, rows, right)
        return
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(headers)]
    for line in [list(headers), *rows]:
        cells = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(line, widths, strict=True))]
        click.echo("  ".join(cells).rstrip())


def _rich_table(headers: Sequence[str], rows: Sequence[Sequence[str]], right: Collection[int]) -> None:
    from rich import box
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    table = Table(box=box.SIMPLE_HEAD, header_style="bold", padding=(0, 1, 0, 0), pad_edge=False, show_edge=False)
    widest = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(headers)]
    # identifiers, times and numbers (short, no blank) are never broken, so an id can be copied
    # whole; prose wraps at words. When the whole cells do not fit the terminal, the lines are
    # printed wider than it (the terminal wraps them) rather than folding an id.
    whole = [widest[i] <= _WHOLE_UP_TO and not any(" " in r[i] for r in rows) for i in range(len(headers))]
    needed = sum(w if keep else min(w, _PROSE_MIN) for w, keep in zip(widest, whole, strict=True))
    console = Console(highlight=False)
    console = Console(highlight=False, width=max(console.width, needed + 2 * (len(headers) - 1)))
    for i, header in enumerate(headers):
        table.add_column(
            header,
            justify="right" if i in right else "left",
            no_wrap=whole[i],
            min_width=widest[i] if whole[i] else None,
            overflow="fold",
        )
    for row in rows:
        table.add_row(*(Text(cell, style=_STYLES.get(cell, "")) for cell in row))  # Text: no markup in cells
    console.print(table)


# --------------------------------------------------------------------------------------------
# `dev`'s log

#: the daemon's lines of a sensor tick that neither launched nor failed (dagster.daemon.SensorDaemon
#: at INFO): one "Checking for new runs" line per sensor and tick, and its "skipped" line
_IDLE_TICK_MARKS = ("Checking for new runs for sensor: ", " skipped: ")


def is_idle_tick_line(line: str) -> bool:
    """Whether ``line`` (one line of `dagster dev`'s output, colour codes and all) is the daemon
    logging a sensor tick that launched nothing and did not fail: `dev` leaves those out. Ticks
    that launch ("Launching run for ...", "Completed launch of run ...") or fail (ERROR lines)
    are kept, and so is everything else."""
    return "dagster.daemon.SensorDaemon" in line and any(mark in line for mark in _IDLE_TICK_MARKS)


# --------------------------------------------------------------------------------------------
# following an execution


def stage_cells(stage: Mapping[str, Any], now: datetime) -> list[str]:
    """``[stage, status, attempt, agent, duration]`` of a row of the named query
    ``ops_execution_stages``: status ``not_started`` before its first attempt, the duration in
    seconds (``1.25 s``; to ``now`` while it runs, blank before it starts)."""
    started, completed = stage["started_at"], stage["completed_at"]
    duration = ""
    if started is not None:
        duration = f"{max(((completed or now) - started).total_seconds(), 0.0):.2f} s"
    status = str(stage["status"] or "not_started")
    ran = status not in ("skipped", "waiting")  # a skipped or approval stage made no attempt
    return [
        str(stage["stage"]),
        status,
        str(stage["attempts"] or "") if ran else "",
        str(stage["agent"] or ""),
        duration if ran else "",
    ]


class ProgressView(Protocol):
    """Where the progress of an execution is shown (stderr): ``update`` takes a row of the named
    query ``execution_progress`` and the rows of ``ops_execution_stages``."""

    def update(self, p: Mapping[str, Any], stages: Sequence[Mapping[str, Any]]) -> None: ...

    def note(self, text: str) -> None: ...

    def close(self) -> None: ...


#: the statuses an execution rests in (a summary line says them)
_ENDED = ("completed", "waiting", "failed", "cancelled", "rolled_back", "compensation_failed")


class _Lines:
    """Plain lines on stderr: one per stage each time its status or attempt changes
    (``stage qualify: completed (attempt 1, agent Assessment Agent, 0.41 s)``), after one when the
    execution's own status or waiting reason changes while it is not at rest."""

    def __init__(self) -> None:
        self._seen: dict[str, tuple[str, str]] = {}
        self._last = ""

    def update(self, p: Mapping[str, Any], stages: Sequence[Mapping[str, Any]]) -> None:
        line = f"execution {p['status']}" + (f" ({p['pending_reason']})" if p["pending_reason"] else "")
        if line != self._last and p["status"] not in _ENDED:  # the end is said by the summary
            click.echo(line, err=True)
            self._last = line
        now = datetime.now(UTC)
        for stage in stages:
            name, status, attempt, agent, duration = stage_cells(stage, now)
            if status == "not_started" or self._seen.get(name) == (status, attempt):
                continue
            self._seen[name] = (status, attempt)
            parts = [f"attempt {attempt}" if attempt else "", f"agent {agent}" if agent else ""]
            if stage["completed_at"] is not None and duration:
                parts.append(duration)
            detail = ", ".join(x for x in parts if x)
            click.echo(f"stage {name}: {status}" + (f" ({detail})" if detail else ""), err=True)

    def note(self, text: str) -> None:
        click.echo(text, err=True)

    def close(self) -> None:
        pass


class _Table:
    """A live rich table on stderr: one row per stage (stage, status, attempt, agent, duration),
    under a line with the stages done of all, the execution's status and the time elapsed."""

    def __init__(self) -> None:
        from rich.console import Console
        from rich.live import Live

        self._started = datetime.now(UTC)
        self._console = Console(stderr=True, highlight=False)
        self._live = Live(console=self._console, refresh_per_second=4, transient=False)
        self._live.start()

    def update(self, p: Mapping[str, Any], stages: Sequence[Mapping[str, Any]]) -> None:
        from rich import box
        from rich.table import Table
        from rich.text import Text

        now = datetime.now(UTC)
        title = f"{p['done']}/{p['stages']} stages  {p['status']}  {(now - self._started).total_seconds():.0f} s"
        if p["pending_reason"]:
            title += f"  ({p['pending_reason']})"
        table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, header_style="bold")
        for header in ("stage", "status", "attempt", "agent", "duration"):
            table.add_column(header, justify="right" if header in ("attempt", "duration") else "left")
        for stage in stages:
            cells = stage_cells(stage, now)
            table.add_row(*(Text(c, style=_STYLES.get(c, "")) for c in cells))
        self._live.update(table)

    def note(self, text: str) -> None:
        self._console.print(text, markup=False)

    def close(self) -> None:
        self._live.stop()


def progress_view() -> ProgressView:
    """A live table of the stages when stderr is a terminal, else plain lines."""
    return _Table() if is_terminal(sys.stderr) else _Lines()


def summary_line(p: Mapping[str, Any], elapsed_s: float) -> str:
    """``summary: completed, 5/5 stages done, 3.2 s`` from a row of ``execution_progress``; an
    early end says its outcome and the stages it skipped (``summary: completed (not_qualified),
    2/6 stages done, 4 skipped, 0.9 s``)."""
    status = p["status"] if p.get("outcome") in (None, "completed") else f"{p['status']} ({p['outcome']})"
    skipped = f", {p['skipped']} skipped" if p.get("skipped") else ""
    return f"summary: {status}, {p['done']}/{p['stages']} stages done{skipped}, {elapsed_s:.1f} s"


class BackgroundProgress:
    """While a job executes in this process: the execution's progress on stderr (a live table on
    a terminal, else plain lines: :func:`progress_view`), fed by polling the named queries
    ``execution_progress`` and ``ops_execution_stages`` every ``interval_s`` seconds in a thread,
    and once more when the block ends, so the display ends where the execution did. Use as a
    context manager; a display error never stops the run."""

    def __init__(self, dsn: str, execution_id: str, interval_s: float = 0.5) -> None:
        self._dsn, self._execution_id, self._interval_s = dsn, execution_id, interval_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> BackgroundProgress:
        self._thread = threading.Thread(target=self._poll, name="lifecycle-progress", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _poll(self) -> None:
        from lifecycle_dagster.store.db import connect

        view = progress_view()
        try:
            with connect(self._dsn) as conn:
                while True:
                    stopping = self._stop.is_set()  # then one last update: the display ends where the run did
                    p, stages = read_progress(conn, self._execution_id)
                    if p is not None:
                        view.update(p, stages)
                    if stopping:
                        return
                    self._stop.wait(self._interval_s)
        except Exception:  # the display only: the run goes on, and its outcome is printed after it
            return
        finally:
            view.close()


def read_progress(conn: Any, execution_id: str) -> tuple[Mapping[str, Any] | None, list[Mapping[str, Any]]]:
    """The row of ``execution_progress`` (None: no such execution) and the rows of
    ``ops_execution_stages`` of ``execution_id``, read on the psycopg connection ``conn``."""
    from lifecycle_dagster.store.sqlfiles import query

    params = {"execution_id": execution_id}
    p = conn.execute(query("execution_progress"), params).fetchone()
    return p, list(conn.execute(query("ops_execution_stages"), params).fetchall())
