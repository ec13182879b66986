"""The tamper-evident audit feed: verification of its hash chains against the stored rows.

``workflow_events`` is append-only and hash-chained in the database (``sql/schema/08_audit.sql``):
one stream per execution and one *global* stream for events with ``execution_id`` NULL. Each event
stores ``prev_hash`` (its stream's previous hash; the genesis ``"0" * 64`` for the first event, or
the hash of the newest event removed by retention, kept in ``lifecycle.audit_checkpoints``) and
``hash`` = :func:`~lifecycle_dagster.core.canonical.event_hash` of ``prev_hash`` and the event.
This module recomputes those hashes from the rows, in Python, with the canonical form of
:mod:`lifecycle_dagster.core.canonical` (the same as the database's
``lifecycle.audit_canonical_event``), so a row edited behind the triggers' back (by a superuser who
disabled them) is found. It also compares each stream's newest stored event with the stream's
*head* (``lifecycle.audit_heads``, written by the chain trigger where a DELETE on
``workflow_events`` cannot reach): a stream, or its newest events, removed outside
``lifecycle.audit_prune`` is found too.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from lifecycle_dagster.core.canonical import event_hash
from lifecycle_dagster.store.db import Connection
from lifecycle_dagster.store.sqlfiles import query

__all__ = [
    "GENESIS",
    "GLOBAL_STREAM",
    "BrokenLink",
    "VerifyReport",
    "checkpoint_heads",
    "stream_heads",
    "verify",
    "verify_rows",
]

GENESIS = "0" * 64
"""``prev_hash`` of the first event of a stream with no retention checkpoint (64 hex zeros)."""

GLOBAL_STREAM = "global"
"""The name of the stream of events whose ``execution_id`` is NULL."""


@dataclass(frozen=True)
class BrokenLink:
    """The first event of a stream whose stored chain does not match the recomputed one.

    ``stream`` is the execution id or ``"global"``; ``field`` is ``"hash"`` (the row's content does
    not give its stored hash: the row was altered), ``"prev_hash"`` (the link to the previous
    event is wrong: an event was removed, inserted or reordered), ``"missing"`` (no hash on an
    event after chained ones) or ``"head"`` (the stream's newest events, or the whole stream, were
    removed outside retention: ``event_id`` is the stream's head, the newest event ever chained,
    ``expected`` its hash and ``stored`` the hash of the newest event left, or of the newest
    retention checkpoint); ``expected`` and ``stored`` are the two values (``None`` when absent).
    """

    stream: str
    event_id: int
    field: str
    expected: str | None
    stored: str | None

    def describe(self) -> str:
        """One line naming the stream, the event id and both values."""
        what = {
            "hash": "hash mismatch",
            "prev_hash": "prev_hash mismatch",
            "missing": "hash missing",
            "head": "events removed (the stream's head is not its newest stored event)",
        }[self.field]
        return (
            f"stream {self.stream}: event {self.event_id}: {what}: "
            f"expected {self.expected or 'none'}, stored {self.stored or 'none'}"
        )


@dataclass
class VerifyReport:
    """What :func:`verify_rows` found: ``events`` checked, ``streams`` seen, ``unchained`` events
    (stored before the chain existed: NULL hash at the start of a stream, not verifiable) and one
    :class:`BrokenLink` per broken stream, in stream order."""

    events: int = 0
    streams: int = 0
    unchained: int = 0
    broken: list[BrokenLink] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when no stream is broken."""
        return not self.broken


def verify_rows(
    rows: Iterable[Mapping[str, Any]],
    heads: Mapping[str | None, str | None],
    tips: Mapping[str | None, tuple[int, str]] | None = None,
) -> VerifyReport:
    """Recompute the chains of ``rows`` (grouped by stream, each stream in id order).

    ``heads`` maps a stream's ``execution_id`` (None: the global stream) to the ``last_hash`` of its
    newest retention checkpoint: the ``prev_hash`` its first remaining event must carry (a stream
    absent from ``heads``, or mapped to None, starts from :data:`GENESIS`). Each row is shaped as
    for :func:`canonical_event`, plus ``prev_hash`` and ``hash``. ``tips`` maps a stream to its
    head ``(last_event_id, last_hash)`` (:func:`stream_heads`): the newest stored event of the
    stream (or, for a stream with no event left, its newest checkpoint) must be that event; every
    stream of ``tips`` is checked, with rows or without. Only the first broken link of a stream
    is reported (what follows it cannot be trusted either).
    """
    report = VerifyReport()
    walk: _Stream | None = None
    seen: set[str | None] = set()
    for row in rows:
        execution_id = row["execution_id"]
        stream_key = None if execution_id is None else str(execution_id)
        if walk is None or stream_key != walk.key:
            if walk is not None:
                walk.finish(report, tips)
            walk = _Stream(stream_key, heads.get(stream_key) or GENESIS)
            seen.add(stream_key)
            report.streams += 1
        report.events += 1
        walk.step(row, report)
    if walk is not None:
        walk.finish(report, tips)
    for key, (tip_id, tip_hash) in sorted((tips or {}).items(), key=lambda kv: kv[0] or ""):
        if key not in seen and (heads.get(key) or GENESIS) != tip_hash:
            report.streams += 1  # a stream removed whole: counted with the broken ones
            report.broken.append(BrokenLink(key or GLOBAL_STREAM, tip_id, "head", tip_hash, heads.get(key)))
    return report


class _Stream:
    """The walk along one stream's rows (see :func:`verify_rows`)."""

    def __init__(self, key: str | None, start: str) -> None:
        self.key = key
        self.name = key or GLOBAL_STREAM
        self.expected_prev = start
        self.chained = False
        self.broken = False

    def step(self, row: Mapping[str, Any], report: VerifyReport) -> None:
        """Check one row against the chain so far; record the first broken link."""
        if self.broken:
            return
        event_id = int(row["id"])
        stored_prev, stored_hash = row["prev_hash"], row["hash"]
        if stored_hash is None and stored_prev is None and not self.chained:
            report.unchained += 1
            return
        prev = self.expected_prev
        link: BrokenLink | None = None
        if stored_hash is None:
            link = BrokenLink(self.name, event_id, "missing", event_hash(prev, row), None)
        elif stored_prev != prev:
            link = BrokenLink(self.name, event_id, "prev_hash", prev, stored_prev)
        else:
            recomputed = event_hash(prev, row)
            if recomputed != stored_hash:
                link = BrokenLink(self.name, event_id, "hash", recomputed, stored_hash)
        if link is not None:
            report.broken.append(link)
            self.broken = True
            return
        self.chained = True
        self.expected_prev = stored_hash

    def finish(self, report: VerifyReport, tips: Mapping[str | None, tuple[int, str]] | None) -> None:
        """At the stream's last row: its newest event must be the stream's head."""
        tip = (tips or {}).get(self.key)
        if self.broken or tip is None or tip[1] == self.expected_prev:
            return
        report.broken.append(BrokenLink(self.name, tip[0], "head", tip[1], self.expected_prev))


def checkpoint_heads(conn: Connection) -> dict[str | None, str | None]:
    """``{execution_id or None: last_hash}`` of each stream's newest retention checkpoint."""
    return {r["execution_id"]: r["last_hash"] for r in conn.execute(query("audit_checkpoints")).fetchall()}


def stream_heads(conn: Connection, execution_id: str | None = None) -> dict[str | None, tuple[int, str]]:
    """``{execution_id or None: (last_event_id, last_hash)}``: the head of every stream, or of
    ``execution_id``'s only, as the chain trigger last wrote it (``lifecycle.audit_heads``)."""
    found = conn.execute(query("audit_heads"), {"execution_id": execution_id}).fetchall()
    return {r["execution_id"]: (int(r["last_event_id"]), str(r["last_hash"])) for r in found}


def verify(conn: Connection, execution_id: str | None = None, *, itersize: int = 5000) -> VerifyReport:
    """Verify the chain of one execution's stream, or of every stream (``execution_id`` None).

    Reads the rows with a server-side cursor (``itersize`` rows at a time) inside one read-only
    REPEATABLE READ transaction, so the rows and the checkpoints are one consistent snapshot.
    ``conn`` must be in autocommit mode (as :func:`lifecycle_dagster.store.db.connect` opens it).

    Raises:
        psycopg.Error: the database refused a query (e.g. ``execution_id`` is not a UUID).
    """
    with conn.transaction():
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        heads = checkpoint_heads(conn)
        tips = stream_heads(conn, execution_id)
        with conn.cursor(name="lifecycle_audit_verify") as cur:
            cur.itersize = itersize
            if execution_id is None:
                cur.execute(query("audit_events_all"))
            else:
                cur.execute(query("audit_events_of_execution"), {"execution_id": execution_id})
            return verify_rows(_iterate(cur), heads, tips)


def _iterate(cur: Any) -> Iterator[Mapping[str, Any]]:
    yield from cur
