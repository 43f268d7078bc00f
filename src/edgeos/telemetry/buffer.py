"""The bounded on-disk buffer of telemetry waiting for the fleet, in the node database.

Records have a kind and a priority: ``alert`` 0, ``kpi`` 1, ``trace`` 2, ``log`` 3 (lower
is more important). The buffer holds at most ``max_bytes`` of payload (the batch sent and
not yet acknowledged counts too). When a record does not fit, records are dropped in the
**declared order** :data:`DROP_ORDER` (logs, then traces, then KPIs, then alerts; oldest
first within a kind), but only records as important as the new one or less: a log never
pushes out a KPI, it is dropped itself. What was dropped is counted per kind and reported
with the next batch, so the fleet knows what it did not get.

A batch (:meth:`TelemetryBuffer.take_batch`) moves the most important records, oldest
first, out of the buffer and into the one pending batch row, in one transaction; the
batch stays until :meth:`TelemetryBuffer.acknowledge`. A node that is offline for a day
keeps its newest and most important telemetry, within the bound.

Other layers put records through :func:`enqueue` without knowing who sends them::

    from edgeos.telemetry.buffer import enqueue
    enqueue("trace", span_as_dict, trace_id=span_trace_id_hex, schema=contract_input_schema)

``enqueue`` hands the record to the sink the fleet link installed (:func:`set_sink`):
it samples traces by ``trace_id`` (every span of a kept trace is kept), pseudonymizes the
fields ``schema`` marks personal, masks secrets, and writes what is left to this buffer.
Without a fleet link there is no sink and ``enqueue`` returns False at once.

The same bounded, prioritised, batching buffer serves other outbound traffic through a
:class:`Channel` of its own (its tables and its kinds with their priorities): the routing
layer's queue of messages for cloud services is one (``edgeos.routing.outbound``).

This module takes any store with ``transaction()`` and ``reader()`` (the node's
``Database``), so the telemetry layer stays free of the state layer.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Protocol

import orjson

#: Each kind's priority: lower numbers are kept longer and sent first.
PRIORITIES: dict[str, int] = {"alert": 0, "kpi": 1, "trace": 2, "log": 3}


@dataclass(frozen=True)
class Channel:
    """One buffered outbound stream: its tables and its kinds of record.

    ``records`` has the columns of ``telemetry_buffer``, ``batches`` those of
    ``telemetry_batch``, and ``state`` a row ``id = 1`` with ``next_seq`` and ``dropped``.
    """

    records: str
    batches: str
    state: str
    #: Each kind's priority: lower numbers are kept longer and sent first.
    priorities: dict[str, int]

    @property
    def drop_order(self) -> tuple[str, ...]:
        """The order records are dropped in when the buffer is full."""
        return tuple(sorted(self.priorities, key=self.priorities.__getitem__, reverse=True))


#: The telemetry uplink's channel.
TELEMETRY = Channel("telemetry_buffer", "telemetry_batch", "telemetry_uplink", PRIORITIES)
#: The order records are dropped in when the buffer is full (oldest first within a kind).
DROP_ORDER: tuple[str, ...] = TELEMETRY.drop_order


class Store(Protocol):
    """What the buffer needs of the node database."""

    def transaction(self) -> AbstractContextManager[sqlite3.Connection]:
        """A write transaction."""
        ...

    def reader(self) -> sqlite3.Connection:
        """A read connection of the calling thread."""
        ...


@dataclass(frozen=True)
class Record:
    """One buffered record, its payload still JSON text."""

    id: int
    kind: str
    at: float
    payload: str


@dataclass(frozen=True)
class PendingBatch:
    """The batch sent (or about to be) and not yet acknowledged."""

    seq: int
    records: int
    body: bytes


@dataclass(frozen=True)
class BufferUsage:
    """What the buffer holds now."""

    records: dict[str, int]
    bytes: int
    max_bytes: int
    pending: PendingBatch | None
    dropped: dict[str, int]


class Sink(Protocol):
    """Who receives :func:`enqueue`'d records: the fleet link's uplink."""

    def __call__(
        self,
        kind: str,
        payload: dict[str, Any],
        *,
        at: float | None,
        trace_id: str | None,
        schema: dict[str, Any] | None,
    ) -> bool:
        """Take the record (True) or leave it (False: sampled out, dropped)."""
        ...


_sink: Sink | None = None


def set_sink(sink: Sink | None) -> None:
    """Install (or, with None, remove) the receiver of :func:`enqueue`."""
    global _sink
    _sink = sink


def accepting() -> bool:
    """Whether records offered now may be kept (a fleet link set a sink): what is costly to
    build need not be built otherwise."""
    return _sink is not None


def enqueue(
    kind: str,
    payload: dict[str, Any],
    *,
    at: float | None = None,
    trace_id: str | None = None,
    schema: dict[str, Any] | None = None,
) -> bool:
    """Offer a record (``alert``, ``kpi``, ``trace`` or ``log``) for the fleet.

    ``payload`` is JSON-able; ``trace_id`` (hex) lets trace sampling keep or drop a whole
    trace; ``schema`` is the JSON Schema of the payload whose ``x-personal`` fields are
    pseudonymized before the record is stored. True when the record was kept for sending.
    """
    if kind not in PRIORITIES:
        raise ValueError(f"telemetry kind {kind!r}: use one of {', '.join(PRIORITIES)}")
    sink = _sink
    if sink is None:
        return False
    return sink(kind, payload, at=at, trace_id=trace_id, schema=schema)


class TelemetryBuffer:
    """The buffer over the node database; see the module docstring."""

    def __init__(
        self,
        db: Store,
        *,
        max_bytes: int,
        clock: Callable[[], float] = time.time,
        channel: Channel = TELEMETRY,
    ) -> None:
        if max_bytes < 1024:
            raise ValueError(f"a telemetry buffer needs at least 1024 bytes, got {max_bytes}")
        self.db = db
        self.max_bytes = max_bytes
        self.clock = clock
        self.channel = channel
        self._lock = threading.Lock()
        conn = db.reader()
        stored = conn.execute(f"SELECT coalesce(sum(size), 0) FROM {channel.records}").fetchone()
        pending = conn.execute(f"SELECT coalesce(sum(length(body)), 0) FROM {channel.batches}")
        self._bytes = int(stored[0]) + int(pending.fetchone()[0])

    # -- putting ------------------------------------------------------------------------
    def put(self, kind: str, payload: dict[str, Any], *, at: float | None = None) -> bool:
        """Store a record; False when it was dropped itself (the buffer is full of more
        important records). May drop less important ones, per :data:`DROP_ORDER`."""
        channel = self.channel
        priority = channel.priorities.get(kind)
        if priority is None:
            raise ValueError(f"record kind {kind!r}: use one of {', '.join(channel.priorities)}")
        text = orjson.dumps(payload).decode()
        size = len(text)
        when = self.clock() if at is None else at
        with self._lock, self.db.transaction() as conn:
            need = self._bytes + size - self.max_bytes
            freed, victims = 0, []
            if need > 0:
                for row_id, row_size, row_kind in _drop_candidates(conn, channel, priority):
                    victims.append((row_id, row_kind))
                    freed += row_size
                    if freed >= need:
                        break
            if need > 0 and freed < need:
                _count_dropped(conn, channel, {kind: 1})
                return False
            if victims:
                conn.executemany(
                    f"DELETE FROM {channel.records} WHERE id = ?", [(v[0],) for v in victims]
                )
                counts: dict[str, int] = {}
                for _, row_kind in victims:
                    counts[row_kind] = counts.get(row_kind, 0) + 1
                _count_dropped(conn, channel, counts)
            conn.execute(
                f"INSERT INTO {channel.records} (priority, kind, at, size, payload) "
                "VALUES (?, ?, ?, ?, ?)",
                (priority, kind, when, size, text),
            )
            self._bytes += size - freed
        return True

    # -- batches ------------------------------------------------------------------------
    def pending(self) -> PendingBatch | None:
        """The batch waiting for its acknowledgement, if any."""
        row = (
            self.db.reader()
            .execute(f"SELECT seq, records, body FROM {self.channel.batches} ORDER BY seq LIMIT 1")
            .fetchone()
        )
        return None if row is None else PendingBatch(int(row[0]), int(row[1]), bytes(row[2]))

    def take_batch(
        self,
        build: Callable[[int, list[Record], dict[str, int]], bytes | None],
        *,
        max_payload_bytes: int,
        max_priority: int | None = None,
    ) -> PendingBatch | None:
        """Move up to ``max_payload_bytes`` of the most important, oldest records into a
        new pending batch whose body ``build(seq, records, dropped)`` makes; with
        ``max_priority``, only records of that priority or a more important one.

        ``build`` may return None to say the body is too large for what may be sent now:
        the batch is then retried with half the records, down to one. None when there is
        a pending batch already, nothing to send, or not even one record may be sent.
        """
        reader, channel = self.db.reader(), self.channel
        idle = reader.execute(
            f"SELECT NOT EXISTS (SELECT 1 FROM {channel.records}) AND (SELECT dropped = '{{}}' "
            f"FROM {channel.state} WHERE id = 1)"
        ).fetchone()[0]
        if idle:  # checked without a write transaction: the uplink asks every few seconds
            return None
        with self._lock, self.db.transaction() as conn:
            if conn.execute(f"SELECT 1 FROM {channel.batches}").fetchone() is not None:
                return None
            records = _oldest_first(conn, channel, max_payload_bytes, max_priority)
            seq, dropped_text = conn.execute(
                f"SELECT next_seq, dropped FROM {channel.state} WHERE id = 1"
            ).fetchone()
            dropped: dict[str, int] = orjson.loads(dropped_text)
            if not records and not dropped:
                return None
            body = build(seq, records, dropped)
            while body is None and len(records) > 1:
                records = records[: len(records) // 2]
                body = build(seq, records, dropped)
            if body is None:
                return None
            conn.executemany(
                f"DELETE FROM {channel.records} WHERE id = ?", [(r.id,) for r in records]
            )
            conn.execute(
                f"INSERT INTO {channel.batches} (seq, created_at, records, body) "
                "VALUES (?, ?, ?, ?)",
                (seq, self.clock(), len(records), body),
            )
            conn.execute(
                f"UPDATE {channel.state} SET next_seq = ?, dropped = '{{}}' WHERE id = 1",
                (seq + 1,),
            )
            self._bytes += len(body) - sum(len(r.payload) for r in records)
        return PendingBatch(seq, len(records), body)

    def acknowledge(self, seq: int) -> None:
        """The fleet has batch ``seq`` (or refused it for good): forget it."""
        with self._lock, self.db.transaction() as conn:
            batches = self.channel.batches
            row = conn.execute(f"SELECT length(body) FROM {batches} WHERE seq = ?", (seq,))
            found = row.fetchone()
            if found is not None:
                conn.execute(f"DELETE FROM {batches} WHERE seq = ?", (seq,))
                self._bytes -= int(found[0])

    # -- looking --------------------------------------------------------------------------
    def usage(self) -> BufferUsage:
        """Records per kind, bytes held, the pending batch, drops not yet reported."""
        conn, channel = self.db.reader(), self.channel
        counts = dict(conn.execute(f"SELECT kind, count(*) FROM {channel.records} GROUP BY kind"))
        dropped = conn.execute(f"SELECT dropped FROM {channel.state} WHERE id = 1").fetchone()
        return BufferUsage(
            records={k: int(v) for k, v in counts.items()},
            bytes=self._bytes,
            max_bytes=self.max_bytes,
            pending=self.pending(),
            dropped=orjson.loads(dropped[0]),
        )


def _drop_candidates(
    conn: sqlite3.Connection, channel: Channel, priority: int
) -> Iterator[tuple[int, int, str]]:
    """Records a new one of ``priority`` may push out, in the declared drop order."""
    yield from conn.execute(
        f"SELECT id, size, kind FROM {channel.records} WHERE priority >= ? "
        "ORDER BY priority DESC, id",
        (priority,),
    )


def _oldest_first(
    conn: sqlite3.Connection, channel: Channel, max_bytes: int, max_priority: int | None
) -> list[Record]:
    """The most important records (of ``max_priority`` or more important, if given),
    oldest first within a priority, up to ``max_bytes``."""
    taken: list[Record] = []
    total = 0
    for row_id, kind, at, payload in conn.execute(
        f"SELECT id, kind, at, payload FROM {channel.records} WHERE priority <= ? "
        "ORDER BY priority, id",
        (len(channel.priorities) if max_priority is None else max_priority,),
    ):
        if taken and total + len(payload) > max_bytes:
            break
        taken.append(Record(int(row_id), str(kind), float(at), str(payload)))
        total += len(payload)
    return taken


def _count_dropped(conn: sqlite3.Connection, channel: Channel, counts: dict[str, int]) -> None:
    (text,) = conn.execute(f"SELECT dropped FROM {channel.state} WHERE id = 1").fetchone()
    dropped: dict[str, int] = orjson.loads(text)
    for kind, n in counts.items():
        dropped[kind] = dropped.get(kind, 0) + n
    conn.execute(
        f"UPDATE {channel.state} SET dropped = ? WHERE id = 1", (orjson.dumps(dropped).decode(),)
    )
