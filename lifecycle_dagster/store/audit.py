"""The tamper-evident audit feed: verification of its hash chains against the stored rows.

``workflow_events`` is append-only and hash-chained in the database (``sql/schema/08_audit.sql``):
one stream per execution and one *global* stream for events with ``execution_id`` NULL. Each event
stores ``prev_hash`` (its stream's previous hash; the genesis ``"0" * 64`` for the first event, or
the hash of the newest event removed by retention, kept in ``lifecycle.audit_checkpoints``) and
``hash`` = :func:`~lifecycle_dagster.core.canonical.event_hash` of ``prev_hash`` and the event.
This module recomputes those hashes from the rows, in Python, with the canonical form of
:mod:`lifecycle_dagster.core.canonical` (the same as the database's
``lifecycle.audit_canonical_event``), so a row edited behind the triggers' back (by a superuser who
disabled them) is found.
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
    event is wrong: an event was removed, inserted or reordered) or ``"missing"`` (no hash on an
    event after chained ones); ``expected`` and ``stored`` are the two values (``None`` when absent).
    """

    stream: str
    event_id: int
    field: str
    expected: str | None
    stored: str | None

    def describe(self) -> str:
        """One line naming the stream, the event id and both values."""
        what = {"hash": "hash mismatch", "prev_hash": "prev_hash mismatch", "missing": "hash missing"}[self.field]
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


def verify_rows(rows: Iterable[Mapping[str, Any]], heads: Mapping[str | None, str | None]) -> VerifyReport:
    """Recompute the chains of ``rows`` (grouped by stream, each stream in id order).

    ``heads`` maps a stream's ``execution_id`` (None: the global stream) to the ``last_hash`` of its
    newest retention checkpoint: the ``prev_hash`` its first remaining event must carry (a stream
    absent from ``heads``, or mapped to None, starts from :data:`GENESIS`). Each row is shaped as
    for :func:`canonical_event`, plus ``prev_hash`` and ``hash``. Only the first broken link of a
    stream is reported (what follows it cannot be trusted either).
    """
    report = VerifyReport()
    current: object = object()  # no stream yet
    expected_prev: str | None = None
    chained = broken = False
    for row in rows:
        execution_id = row["execution_id"]
        stream_key = None if execution_id is None else str(execution_id)
        if stream_key != current:
            current = stream_key
            report.streams += 1
            expected_prev = heads.get(stream_key) or GENESIS
            chained = broken = False
        report.events += 1
        if broken:
            continue
        stream = stream_key or GLOBAL_STREAM
        event_id = int(row["id"])
        stored_prev, stored_hash = row["prev_hash"], row["hash"]
        if stored_hash is None and stored_prev is None and not chained:
            report.unchained += 1
            continue
        prev = expected_prev or GENESIS
        if stored_hash is None:
            report.broken.append(BrokenLink(stream, event_id, "missing", event_hash(prev, row), None))
            broken = True
            continue
        if stored_prev != prev:
            report.broken.append(BrokenLink(stream, event_id, "prev_hash", prev, stored_prev))
            broken = True
            continue
        recomputed = event_hash(prev, row)
        if recomputed != stored_hash:
            report.broken.append(BrokenLink(stream, event_id, "hash", recomputed, stored_hash))
            broken = True
            continue
        chained = True
        expected_prev = stored_hash
    return report


def checkpoint_heads(conn: Connection) -> dict[str | None, str | None]:
    """``{execution_id or None: last_hash}`` of each stream's newest retention checkpoint."""
    return {r["execution_id"]: r["last_hash"] for r in conn.execute(query("audit_checkpoints")).fetchall()}


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
        with conn.cursor(name="lifecycle_audit_verify") as cur:
            cur.itersize = itersize
            if execution_id is None:
                cur.execute(query("audit_events_all"))
            else:
                cur.execute(query("audit_events_of_execution"), {"execution_id": execution_id})
            return verify_rows(_iterate(cur), heads)


def _iterate(cur: Any) -> Iterator[Mapping[str, Any]]:
    yield from cur
