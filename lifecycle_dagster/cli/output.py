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


def progress_line(p: Mapping[str, Any]) -> str:
    """``[###--] 3/5 in_progress target_design (reason)`` from a row of the named query
    ``execution_progress``."""
    total, done = int(p["stages"]), int(p["done"])
    line = f"[{'#' * done}{'-' * max(total - done, 0)}] {done}/{total} {p['status']}"
    if p["current_stage"]:
        line += f" {p['current_stage']}"
    if p["pending_reason"]:
        line += f" ({p['pending_reason']})"
    return line


class ProgressView(Protocol):
    """Where the progress of an execution is shown (stderr)."""

    def update(self, p: Mapping[str, Any]) -> None: ...

    def note(self, text: str) -> None: ...

    def close(self) -> None: ...


class _Lines:
    """One line on stderr each time the progress changes (:func:`progress_line`)."""

    def __init__(self) -> None:
        self._last = ""

    def update(self, p: Mapping[str, Any]) -> None:
        line = progress_line(p)
        if line != self._last:
            click.echo(line, err=True)
            self._last = line

    def note(self, text: str) -> None:
        click.echo(text, err=True)

    def close(self) -> None:
        pass


class _Bar:
    """A rich progress bar on stderr: stages done of all, status, current stage, time elapsed."""

    def __init__(self) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

        self._progress = Progress(
            SpinnerColumn(),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.description}"),
            TimeElapsedColumn(),
            console=Console(stderr=True, highlight=False),
        )
        self._task = self._progress.add_task("starting", total=None)
        self._progress.start()

    def update(self, p: Mapping[str, Any]) -> None:
        description = " ".join(str(v) for v in (p["status"], p["current_stage"]) if v)
        if p["pending_reason"]:
            description += f" ({p['pending_reason']})"
        self._progress.update(self._task, total=int(p["stages"]), completed=int(p["done"]), description=description)

    def note(self, text: str) -> None:
        self._progress.console.print(text, markup=False)

    def close(self) -> None:
        self._progress.stop()


def progress_view() -> ProgressView:
    """A progress bar when stderr is a terminal, else progress lines."""
    return _Bar() if is_terminal(sys.stderr) else _Lines()


class BackgroundProgress:
    """While a job executes in this process: a progress bar on stderr fed by polling the named query
    ``execution_progress`` every ``interval_s`` seconds in a thread, only when stderr is a
    terminal (elsewhere nothing is shown). Use as a context manager."""

    def __init__(self, dsn: str, execution_id: str, interval_s: float = 0.5) -> None:
        self._dsn, self._execution_id, self._interval_s = dsn, execution_id, interval_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> BackgroundProgress:
        if is_terminal(sys.stderr):
            self._thread = threading.Thread(target=self._poll, name="lifecycle-progress", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _poll(self) -> None:
        from lifecycle_dagster.store.db import connect
        from lifecycle_dagster.store.sqlfiles import query

        view = _Bar()
        try:
            with connect(self._dsn) as conn:
                while True:
                    stopping = self._stop.is_set()  # then one last update: the bar ends where the run did
                    p = conn.execute(query("execution_progress"), {"execution_id": self._execution_id}).fetchone()
                    if p is not None:
                        view.update(p)
                    if stopping:
                        return
                    self._stop.wait(self._interval_s)
        except Exception:  # the display only: the run goes on, and its outcome is printed after it
            return
        finally:
            view.close()
