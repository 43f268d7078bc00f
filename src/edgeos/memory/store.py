"""The rows of long-term memory: records, their vectors, the filter fields derived from them.

Every function that writes takes the caller's connection inside a write transaction (a
step's commit, or a command's own): memory changes commit or roll back with whatever else
the transaction does. The triggers of migrations ``0008_memory`` and
``0013_memory_models`` keep ``memory_usage`` and the change log (``memory_changes``) in
step with every insert and delete, and every change of a record's model, size or expiry
(re-embedding, a policy's TTL), whichever code path makes it. Standard library only
(plus orjson): vectors stay bytes here.
"""

from __future__ import annotations

import math
import sqlite3
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

from edgeos.errors import InvalidRequestError

#: A filter value: a JSON scalar, or a list of them (any of them matches).
Scalar = str | int | float | bool
#: Longest subject, metadata (as JSON) and filter list accepted.
MAX_SUBJECT_CHARS = 256
MAX_METADATA_BYTES = 64 * 1024
MAX_FILTER_VALUES = 256


@dataclass(frozen=True)
class NewRecord:
    """A checked ``remember``, ready to be written."""

    id: str
    agent: str
    text: str
    metadata: dict[str, Any]
    subject: str | None
    importance: float
    model: str
    created_at: float
    expires_at: float | None
    vector: bytes
    run_id: str | None = None
    #: (field, canonical JSON value) rows for the filterable metadata fields.
    fields: list[tuple[str, str]] = field(default_factory=list)

    @property
    def size(self) -> int:
        """What the record counts against ``max_bytes``: text, metadata, subject, vector."""
        meta = len(orjson.dumps(self.metadata))
        return (
            len(self.text.encode()) + meta + len((self.subject or "").encode()) + len(self.vector)
        )


@dataclass(frozen=True)
class MemoryRecord:
    """A record as recall and search return it."""

    id: str
    text: str
    metadata: dict[str, Any]
    subject: str | None
    importance: float
    created_at: float
    expires_at: float | None
    #: Cosine similarity to the query, and the ranking score (see ``memory.ranking``).
    similarity: float = 0.0
    score: float = 0.0

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready form (what a step in a worker process receives)."""
        return {
            "id": self.id, "text": self.text, "metadata": self.metadata,
            "subject": self.subject, "importance": self.importance,
            "created_at": self.created_at, "expires_at": self.expires_at,
            "similarity": self.similarity, "score": self.score,
        }  # fmt: skip


# -- checks --------------------------------------------------------------------------------
def canonical(value: Any) -> str:
    """The text a filter value is stored and matched as (so 1 and "1" differ)."""
    return orjson.dumps(value).decode()


def is_scalar(value: Any) -> bool:
    """Whether a value can be a filter value (finite numbers, text, booleans)."""
    if isinstance(value, float):
        return math.isfinite(value)
    return isinstance(value, str | int | bool)


def field_rows(
    metadata: Mapping[str, Any], fields: Sequence[str], where: str
) -> list[tuple[str, str]]:
    """The filter rows of a record's metadata: one per value of each listed field."""
    rows: list[tuple[str, str]] = []
    for name in fields:
        if name not in metadata or metadata[name] is None:
            continue
        value = metadata[name]
        values = value if isinstance(value, list) else [value]
        for item in values:
            if not is_scalar(item):
                raise InvalidRequestError(
                    f"{where}: metadata field {name!r} is filterable, so its value must be "
                    f"text, a number, a boolean or a list of them, not {item!r}"
                )
            rows.append((name, canonical(item)))
    return sorted(set(rows))


def check_where(
    where: Mapping[str, Any] | None, fields: Sequence[str], where_: str
) -> dict[str, list[str]]:
    """A recall filter as ``{field: [canonical values]}``; InvalidRequestError naming the
    field when it is not ``subject`` or a listed field, or a value is not a scalar."""
    if where is None:
        return {}
    if not isinstance(where, Mapping):
        raise InvalidRequestError(f"{where_}: where must be a mapping of field to value")
    out: dict[str, list[str]] = {}
    for name, value in where.items():
        if name != "subject" and name not in fields:
            known = ", ".join(["subject", *fields])
            raise InvalidRequestError(
                f"{where_}: unknown filter field {name!r} (filterable: {known}; list more "
                "under memory.fields in agent.yaml)"
            )
        values = value if isinstance(value, list | tuple) else [value]
        if not values or len(values) > MAX_FILTER_VALUES:
            raise InvalidRequestError(
                f"{where_}: filter {name!r} needs 1 to {MAX_FILTER_VALUES} values"
            )
        for item in values:
            if not is_scalar(item):
                raise InvalidRequestError(
                    f"{where_}: filter {name!r} value {item!r} is not text, a number or a boolean"
                )
        out[name] = [v if name == "subject" else canonical(v) for v in values]
    return out


# -- writes --------------------------------------------------------------------------------
def insert(conn: sqlite3.Connection, record: NewRecord) -> int:
    """Write a record, its vector and its filter rows; returns its rowid."""
    cursor = conn.execute(
        "INSERT INTO memory_records (id, agent, subject, text, metadata, importance, model, "
        "created_at, expires_at, last_used_at, bytes, run_id) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (record.id, record.agent, record.subject, record.text,
         orjson.dumps(record.metadata).decode(), record.importance, record.model,
         record.created_at, record.expires_at, record.created_at, record.size, record.run_id),
    )  # fmt: skip
    seq = int(cursor.lastrowid or 0)
    conn.execute("INSERT INTO memory_vectors (seq, vector) VALUES (?, ?)", (seq, record.vector))
    conn.executemany(
        "INSERT INTO memory_fields (agent, name, value, seq) VALUES (?, ?, ?, ?)",
        [(record.agent, name, value, seq) for name, value in record.fields],
    )
    return seq


def delete_where(conn: sqlite3.Connection, clause: str, params: Sequence[Any]) -> list[str]:
    """Delete the records a WHERE clause selects (vectors and fields cascade); their ids.

    ``secure_delete`` is on for the statement: SQLite overwrites the freed bytes with
    zeros, so the text is gone from the database pages, not just unlinked.
    """
    ids = [r[0] for r in conn.execute(f"SELECT id FROM memory_records WHERE {clause}", params)]
    if not ids:
        return []
    previous = conn.execute("PRAGMA secure_delete").fetchone()[0]
    conn.execute("PRAGMA secure_delete = ON")
    try:
        conn.execute(f"DELETE FROM memory_records WHERE {clause}", params)
    finally:
        conn.execute(f"PRAGMA secure_delete = {int(previous)}")
    return ids


def delete_ids(conn: sqlite3.Connection, agent: str | None, ids: Iterable[str]) -> list[str]:
    """Delete records by id (of one agent, or any when ``agent`` is None)."""
    gone: list[str] = []
    chunk: list[str] = []
    for record_id in [*ids, None]:
        if record_id is not None:
            chunk.append(record_id)
        if chunk and (record_id is None or len(chunk) == 500):
            marks = ",".join("?" * len(chunk))
            clause = f"id IN ({marks})" + (" AND agent = ?" if agent is not None else "")
            params = [*chunk, *([agent] if agent is not None else [])]
            gone += delete_where(conn, clause, params)
            chunk = []
    return gone


def touch(conn: sqlite3.Connection, ids: Iterable[str], at: float) -> None:
    """Mark records as used (recalled) at ``at``: least recently used goes first."""
    conn.executemany(
        "UPDATE memory_records SET last_used_at = max(last_used_at, ?), uses = uses + 1 "
        "WHERE id = ?",
        [(at, i) for i in ids],
    )


# -- reads ---------------------------------------------------------------------------------
def usage(conn: sqlite3.Connection, agent: str) -> tuple[int, int]:
    """(records, bytes) an agent holds."""
    row = conn.execute(
        "SELECT records, bytes FROM memory_usage WHERE agent = ?", (agent,)
    ).fetchone()
    return (0, 0) if row is None else (int(row[0]), int(row[1]))


def filtered(conn: sqlite3.Connection, agent: str, where: Mapping[str, list[str]]) -> list[int]:
    """Rowids of the agent's records that match every filter (any of a field's values)."""
    parts: list[str] = []
    params: list[Any] = []
    for name, values in where.items():
        marks = ",".join("?" * len(values))
        if name == "subject":
            parts.append(f"SELECT seq FROM memory_records WHERE agent = ? AND subject IN ({marks})")
            params += [agent, *values]
        else:
            parts.append(
                f"SELECT seq FROM memory_fields WHERE agent = ? AND name = ? AND value IN ({marks})"
            )
            params += [agent, name, *values]
    # One row of comma-separated rowids: thousands of rows one by one cost milliseconds.
    row = conn.execute(
        f"SELECT group_concat(seq) FROM ({' INTERSECT '.join(parts)})", params
    ).fetchone()
    return [int(seq) for seq in row[0].split(",")] if row and row[0] else []


_RECORD = "seq, id, text, metadata, subject, importance, created_at, expires_at"


def fetch(conn: sqlite3.Connection, seqs: Sequence[int]) -> dict[int, MemoryRecord]:
    """Records by rowid (those that still exist)."""
    if not seqs:
        return {}
    marks = ",".join("?" * len(seqs))
    rows = conn.execute(f"SELECT {_RECORD} FROM memory_records WHERE seq IN ({marks})", seqs)
    return {int(r[0]): _record(r) for r in rows}


def _record(row: Sequence[Any]) -> MemoryRecord:
    _, rid, text, metadata, subject, importance, created, expires = row
    return MemoryRecord(rid, text, orjson.loads(metadata), subject, importance, created, expires)


def get(conn: sqlite3.Connection, record_id: str) -> MemoryRecord | None:
    """One record by id."""
    row = conn.execute(
        f"SELECT {_RECORD} FROM memory_records WHERE id = ?", (record_id,)
    ).fetchone()
    return None if row is None else _record(row)
