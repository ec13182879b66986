"""The tamper-evident audit feed: the canonical form of an event and the verification of its chain.

``workflow_events`` is append-only and hash-chained in the database (``sql/schema/08_audit.sql``):
one stream per execution and one *global* stream for events with ``execution_id`` NULL. Each event
stores ``prev_hash`` (its stream's previous hash; the genesis ``"0" * 64`` for the first event, or
the hash of the newest event removed by retention, kept in ``lifecycle.audit_checkpoints``) and

    hash = hex(SHA-256(UTF-8(prev_hash + "\\n" + canonical_event)))

where the canonical event is the canonical JSON (:func:`canonical_json`) of
``{"event_type", "execution_id", "id", "metadata", "stage_id", "timestamp"}`` with the timestamp in
UTC as ``YYYY-MM-DDTHH:MM:SS.ffffffZ``. This module recomputes those hashes from the rows, in
Python, with the same canonical form as the database's ``lifecycle.audit_canonical_event``, so a
row edited behind the triggers' back (by a superuser who disabled them) is found.

The canonical JSON follows RFC 8785 (JSON Canonicalization Scheme,
https://www.rfc-editor.org/rfc/rfc8785) as far as practical: keys sorted, no insignificant
whitespace, strings escaped as RFC 8785 (and Postgres's ``to_json(text)``) do. Two deviations,
shared with the SQL function: keys are ordered by Unicode code point (Postgres ``COLLATE "C"`` on
UTF-8) rather than by UTF-16 code unit, and numbers are written as jsonb prints them (an exact
decimal without exponent, trailing zeros kept, ``-0`` as ``0``) rather than as ECMAScript doubles.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from lifecycle_dagster.store.db import Connection
from lifecycle_dagster.store.sqlfiles import query

GENESIS = "0" * 64
"""``prev_hash`` of the first event of a stream with no retention checkpoint (64 hex zeros)."""

GLOBAL_STREAM = "global"
"""The name of the stream of events whose ``execution_id`` is NULL."""


def parse_jsonb_text(text: str) -> Any:
    """Decode a JSON text (as Postgres prints jsonb) keeping every number exact.

    Numbers become :class:`decimal.Decimal` (integers too, so no digit limit applies); objects
    ``dict``, arrays ``list``, strings ``str``, ``true``/``false``/``null`` ``bool``/``None``.

    Raises:
        ValueError: not JSON (``json.JSONDecodeError``), or NaN / Infinity.
    """

    def refuse(constant: str) -> None:
        raise ValueError(f"{constant} is not JSON")

    return json.loads(text, parse_float=Decimal, parse_int=Decimal, parse_constant=refuse)


def _number(value: Decimal) -> str:
    """A number as Postgres's numeric prints it: plain decimal, scale kept, no negative zero."""
    if not value.is_finite():
        raise ValueError(f"{value} is not a JSON number")
    if value.is_zero():
        value = abs(value)
    return format(value, "f")


def canonical_json(value: Any) -> str:
    """The canonical JSON text of ``value`` (see the module docstring; RFC 8785 as far as practical).

    Equal to the database's ``lifecycle.canonical_json(jsonb)`` of the same document. ``value`` is
    a decoded JSON document: ``dict`` (string keys), ``list``/``tuple``, ``str``, ``bool``, ``None``,
    ``int``, ``float`` or ``Decimal``. For exact numbers decode with :func:`parse_jsonb_text`: a
    ``float`` is written as the shortest decimal that round-trips (``repr``), which is what Postgres
    stores when it is sent through ``json.dumps``, but not necessarily what a jsonb decoded into
    floats held.

    Raises:
        ValueError: NaN or infinity. TypeError: a value that is not JSON (or a non-string key).
    """
    parts: list[str] = []
    _write(value, parts)
    return "".join(parts)


def _write(value: Any, out: list[str]) -> None:
    if value is None:
        out.append("null")
    elif value is True:
        out.append("true")
    elif value is False:
        out.append("false")
    elif isinstance(value, str):
        out.append(json.dumps(value, ensure_ascii=False))
    elif isinstance(value, int):
        out.append(str(value))
    elif isinstance(value, float):
        out.append(_number(Decimal(repr(value))))
    elif isinstance(value, Decimal):
        out.append(_number(value))
    elif isinstance(value, Mapping):
        out.append("{")
        for i, key in enumerate(sorted(value)):
            if not isinstance(key, str):
                raise TypeError(f"JSON object keys are strings, got {type(key).__name__}")
            if i:
                out.append(",")
            out.append(json.dumps(key, ensure_ascii=False))
            out.append(":")
            _write(value[key], out)
        out.append("}")
    elif isinstance(value, list | tuple):
        out.append("[")
        for i, item in enumerate(value):
            if i:
                out.append(",")
            _write(item, out)
        out.append("]")
    else:
        raise TypeError(f"{type(value).__name__} is not a JSON value")


def format_timestamp(ts: datetime) -> str:
    """An event time in the canonical form: UTC, ``YYYY-MM-DDTHH:MM:SS.ffffffZ`` (microseconds).

    Raises:
        ValueError: a naive datetime (no time zone).
    """
    if ts.tzinfo is None:
        raise ValueError("an event timestamp must carry its time zone")
    u = ts.astimezone(UTC)
    return f"{u.year:04d}-{u.month:02d}-{u.day:02d}T{u.hour:02d}:{u.minute:02d}:{u.second:02d}.{u.microsecond:06d}Z"


def canonical_event(row: Mapping[str, Any]) -> bytes:
    """The UTF-8 bytes of one event's canonical form (``lifecycle.audit_canonical_event`` in SQL).

    ``row`` holds ``id`` (int), ``execution_id`` (UUID or its text, or None), ``event_type`` (str),
    ``stage_id`` (str or None), ``metadata`` (the jsonb's text as Postgres prints it — exact —, or
    a decoded document, see :func:`canonical_json`) and ``timestamp`` (an aware datetime).

    Raises:
        KeyError: a field is missing. ValueError, TypeError: a value has no canonical form.
    """
    metadata = row["metadata"]
    if isinstance(metadata, str | bytes):
        metadata = parse_jsonb_text(metadata.decode() if isinstance(metadata, bytes) else metadata)
    execution_id = row["execution_id"]
    document = {
        "event_type": row["event_type"],
        "execution_id": None if execution_id is None else str(execution_id),
        "id": int(row["id"]),
        "metadata": metadata,
        "stage_id": row["stage_id"],
        "timestamp": format_timestamp(row["timestamp"]),
    }
    return canonical_json(document).encode("utf-8")


def event_hash(prev_hash: str, row: Mapping[str, Any]) -> str:
    """``hex(SHA-256(UTF-8(prev_hash) + b"\\n" + canonical_event(row)))``: 64 lowercase hex digits."""
    return hashlib.sha256(prev_hash.encode("utf-8") + b"\n" + canonical_event(row)).hexdigest()


# ---------------------------------------------------------------------------------------------
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
