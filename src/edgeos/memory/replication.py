"""Replication of long-term memory: a durable change log shipped to a target, resumably.

Every insert and delete of a record appends to ``memory_changes`` in the same transaction
(the triggers of migration ``0008_memory``), so the log holds every change in commit
order under a sequence number that never goes back. :func:`sync` asks the target how far
it has durably applied this node's log, ships the changes past that in batches (a put
carries the record as it is, read at shipping time; records never change after they are
written, except for use counts that stay local), and the target applies each batch
idempotently, keyed by sequence: a change it already has is skipped. A sync cut off at
any point (a kill, a lost link) resumes where the target says it is, and never
duplicates. Entries every registered target has applied are pruned; a target whose
position the pruning overtook gets every live record again (a snapshot) before the rest.

:class:`FileTarget` keeps a node's changes in append-only files (``DIR/NODE/*.jsonl``), a
plain backup; the fleet's target (``edgeos.sync.memory_target``) ships them to the
fleet's memory backup. :func:`restore` reads a node's live records back, e.g. onto the
device that replaces it.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import os
import re
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import orjson

from edgeos.errors import ConfigError, InvalidRequestError
from edgeos.files import fsync_dir
from edgeos.memory import store
from edgeos.state import Database

#: Changes shipped per batch, and log entries kept for in-process indexes to follow even
#: when every target has them.
BATCH = 256
KEEP_ENTRIES = 10_000
#: A file target starts a new segment past this size.
SEGMENT_BYTES = 8 * 1024 * 1024

_NODE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


@dataclass(frozen=True)
class Change:
    """One entry of the change log, ready to ship.

    ``body`` is the record (JSON-ready, the vector as base64 float32) for a put whose
    record still exists, else None (a delete, or a put already undone by a later delete).
    """

    seq: int
    op: str
    agent: str
    record: str
    body: dict[str, Any] | None

    def to_json(self) -> dict[str, Any]:
        """The change as one JSON object."""
        return {"seq": self.seq, "op": self.op, "agent": self.agent, "record": self.record,
                "body": self.body}  # fmt: skip


class ReplicationTarget(Protocol):
    """Where a node's memory changes go. Implementations must be idempotent by ``seq``."""

    name: str

    def position(self, node: str) -> int:
        """The highest sequence of ``node``'s log durably applied (0: none)."""
        ...

    def apply(self, node: str, changes: Sequence[Change]) -> int:
        """Durably apply changes in order, skipping those at or below the position;
        returns the new position."""
        ...

    def records(self, node: str) -> Iterator[dict[str, Any]]:
        """Every record ``node`` holds as far as the target knows (put, never deleted)."""
        ...


@dataclass(frozen=True)
class Synced:
    """What one :func:`sync` did."""

    shipped: int
    position: int
    snapshot: bool


def check_node(node: str) -> str:
    """A node id fit to name files and rows: letters, digits, ``.``, ``_``, ``-``."""
    if not isinstance(node, str) or not _NODE.match(node):
        raise InvalidRequestError(
            f"node id {node!r} must be 1-128 of A-Z a-z 0-9 . _ - starting with a letter or digit"
        )
    return node


def pending(db: Database, after: int, limit: int = BATCH) -> list[Change]:
    """The log's changes past ``after``, with the bodies of the records put."""
    conn = db.reader()
    conn.execute("BEGIN")  # the entries and the bodies from one snapshot
    try:
        rows = conn.execute(
            "SELECT c.seq, c.op, c.agent, c.record, r.subject, r.text, r.metadata, "
            "r.importance, r.model, r.created_at, r.expires_at, v.vector "
            "FROM memory_changes c LEFT JOIN memory_records r ON c.op = 'put' AND r.seq = "
            "c.record_seq LEFT JOIN memory_vectors v ON v.seq = r.seq "
            "WHERE c.seq > ? ORDER BY c.seq LIMIT ?",
            (after, limit),
        ).fetchall()
    finally:
        conn.execute("COMMIT")
    changes = []
    for seq, op, agent, record, subject, text, meta, imp, model, created, expires, vec in rows:
        body = None
        if op == "put" and text is not None:
            body = {
                "id": record, "agent": agent, "subject": subject, "text": text,
                "metadata": orjson.loads(meta), "importance": imp, "model": model,
                "created_at": created, "expires_at": expires,
                "vector": base64.b64encode(vec).decode(),
            }  # fmt: skip
        changes.append(Change(int(seq), op, agent, record, body))
    return changes


def sync(db: Database, target: ReplicationTarget, node: str, *, batch: int = BATCH) -> Synced:
    """Ship every change the target lacks; resumes wherever an earlier sync stopped."""
    check_node(node)
    position = target.position(node)
    snapshot = _snapshot_if_pruned(db, position)
    shipped = 0
    while True:
        changes = pending(db, position, batch)
        if not changes:
            break
        position = target.apply(node, changes)
        shipped += len(changes)
        with db.transaction() as conn:
            conn.execute(
                "INSERT INTO memory_replicas (target, position, updated_at) VALUES (?, ?, ?) "
                "ON CONFLICT (target) DO UPDATE SET position = excluded.position, "
                "updated_at = excluded.updated_at",
                (f"{target.name}:{node}", position, time.time()),
            )
    prune(db)
    return Synced(shipped, position, snapshot)


def _top(conn: Any) -> int:
    """The last sequence the change log ever gave (pruned entries included; 0: none)."""
    row = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'memory_changes'").fetchone()
    return int(row[0]) if row else 0


def last_seq(db: Database) -> int:
    """The last sequence of this node's change log (0: memory never changed here)."""
    return _top(db.reader())


def behind(db: Database, target: str, node: str) -> bool:
    """Whether the log has changes past what target ``target`` (a target's ``name``) was
    last known to hold of ``node``: from the node's database alone, without asking it."""
    conn = db.reader()
    row = conn.execute(
        "SELECT position FROM memory_replicas WHERE target = ?", (f"{target}:{node}",)
    ).fetchone()
    return _top(conn) > (int(row[0]) if row else 0)


def _snapshot_if_pruned(db: Database, position: int) -> bool:
    """Log every live record again when entries past ``position`` were pruned."""
    with db.transaction() as conn:
        first = conn.execute("SELECT min(seq) FROM memory_changes").fetchone()[0]
        top = _top(conn)
        if top <= position or (first is not None and first <= position + 1):
            return False
        conn.execute(
            "INSERT INTO memory_changes (agent, op, record, record_seq, at) "
            "SELECT agent, 'put', id, seq, ? FROM memory_records ORDER BY seq",
            (time.time(),),
        )
        return True


def prune(db: Database) -> int:
    """Drop log entries every registered target has applied (keeping the newest
    :data:`KEEP_ENTRIES` for in-process indexes); returns how many went."""
    with db.transaction() as conn:
        lowest = conn.execute("SELECT min(position) FROM memory_replicas").fetchone()[0]
        limit = _top(conn) - KEEP_ENTRIES
        if lowest is not None:
            limit = min(limit, int(lowest))
        if limit <= 0:
            return 0
        return int(conn.execute("DELETE FROM memory_changes WHERE seq <= ?", (limit,)).rowcount)


def restore(db: Database, target: ReplicationTarget, node: str, *, batch: int = BATCH) -> int:
    """Write the records ``node`` replicated to ``target`` into this node's memory.

    Records already here (by id) are left alone, so a restore can be repeated (or resumed
    after it was cut off: each ``batch`` records commit together, and the target is read
    between transactions, never inside one); expired ones are skipped. The records join
    this node's change log like any other. Returns how many were written.
    """
    check_node(node)
    written = 0
    chunk: list[dict[str, Any]] = []
    for body in target.records(node):
        chunk.append(body)
        if len(chunk) >= batch:
            written += _restore_chunk(db, chunk)
            chunk = []
    return written + (_restore_chunk(db, chunk) if chunk else 0)


def _restore_chunk(db: Database, bodies: list[dict[str, Any]]) -> int:
    now = time.time()
    written = 0
    with db.transaction() as conn:
        for body in bodies:
            if body["expires_at"] is not None and body["expires_at"] <= now:
                continue
            if conn.execute("SELECT 1 FROM memory_records WHERE id = ?", (body["id"],)).fetchone():
                continue
            record = store.NewRecord(
                id=body["id"], agent=body["agent"], text=body["text"],
                metadata=body["metadata"], subject=body["subject"],
                importance=float(body["importance"]), model=body["model"],
                created_at=float(body["created_at"]), expires_at=body["expires_at"],
                vector=base64.b64decode(body["vector"]),
                fields=_fields_of(conn, body),
            )  # fmt: skip
            store.insert(conn, record)
            written += 1
    return written


def _agent_fields(conn: Any, agent: str) -> list[str] | None:
    """The ``memory.fields`` of an agent installed here; None when it is not installed."""
    row = conn.execute("SELECT manifest FROM agents WHERE name = ?", (agent,)).fetchone()
    if row is None:
        return None
    fields: list[str] = orjson.loads(row[0]).get("memory", {}).get("fields", [])
    return fields


def _fields_of(conn: Any, body: dict[str, Any]) -> list[tuple[str, str]]:
    """The filter rows of a restored record: its agent's fields, when the agent is here."""
    return _field_rows(_agent_fields(conn, body["agent"]) or [], body)


def _field_rows(fields: list[str], body: dict[str, Any]) -> list[tuple[str, str]]:
    try:
        return store.field_rows(body["metadata"], fields, f"restored record {body['id']}")
    except InvalidRequestError:  # the record was written under other fields: unfiltered
        return []


def agents_not_installed(db: Database) -> list[str]:
    """Agents that hold records here but are not installed (yet): a replacement device
    restores its memory before the fleet has deployed its agents."""
    rows = db.reader().execute(
        "SELECT DISTINCT agent FROM memory_records WHERE agent NOT IN (SELECT name FROM agents) "
        "ORDER BY agent"
    )
    return [agent for (agent,) in rows]


def index_fields(db: Database, agents: Sequence[str]) -> list[str]:
    """Give the records of each of ``agents`` now installed the filter rows of its
    ``memory.fields`` where they have none (restored before the agent came), so filtered
    recall finds them; returns those of ``agents`` still not installed."""
    missing = []
    with db.transaction() as conn:
        for agent in agents:
            fields = _agent_fields(conn, agent)
            if fields is None:
                missing.append(agent)
                continue
            records = conn.execute(
                "SELECT seq, id, metadata FROM memory_records r WHERE agent = ? AND NOT EXISTS "
                "(SELECT 1 FROM memory_fields f WHERE f.seq = r.seq)",
                (agent,),
            ).fetchall()
            for seq, record, metadata in records:
                body = {"agent": agent, "id": record, "metadata": orjson.loads(metadata)}
                conn.executemany(
                    "INSERT OR IGNORE INTO memory_fields (agent, name, value, seq) "
                    "VALUES (?, ?, ?, ?)",
                    [(agent, name, value, seq) for name, value in _field_rows(fields, body)],
                )
    return missing


# -- a target made of files ------------------------------------------------------------
class FileTarget:
    """Append-only JSON-lines files per node, in a directory (a disk, a mount, a share).

    The position is read from the files themselves (the last complete line), never kept
    apart from them, so there is no moment at which a kill leaves the two disagreeing: a
    torn last line (a kill mid-write) is cut off, and the change is shipped again. Deleted
    records' puts are dropped from the files when the delete arrives (the files rewritten
    whole, then renamed), so an erasure reaches the backup too.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.name = f"file:{directory}"

    def position(self, node: str) -> int:
        """The last sequence in ``node``'s files (a torn last line is cut off first)."""
        with self._locked(node) as folder:
            return self._recover(folder)

    def apply(self, node: str, changes: Sequence[Change]) -> int:
        """Append the changes past the position, durably; drop deleted records' puts."""
        with self._locked(node) as folder:
            position = self._recover(folder)
            fresh = [c for c in changes if c.seq > position]
            if not fresh:
                return position
            segment = self._segments(folder)[-1] if self._segments(folder) else None
            if segment is None or segment.stat().st_size > SEGMENT_BYTES:
                segment = folder / f"{fresh[0].seq:012d}.jsonl"
            data = b"".join(orjson.dumps(c.to_json()) + b"\n" for c in fresh)
            new = not segment.exists()
            with segment.open("ab") as out:
                out.write(data)
                out.flush()
                os.fsync(out.fileno())
            if new:
                fsync_dir(folder)
            deleted = {c.record for c in fresh if c.op == "delete"}
            if deleted:
                self._drop_puts(folder, deleted)
            return fresh[-1].seq

    def records(self, node: str) -> Iterator[dict[str, Any]]:
        """Live records of ``node``: the last put of each id not deleted after it."""
        live: dict[str, dict[str, Any]] = {}
        with self._locked(node) as folder:
            self._recover(folder)
            for segment in self._segments(folder):
                for line in segment.read_bytes().splitlines():
                    change = orjson.loads(line)
                    if change["op"] == "put" and change["body"] is not None:
                        live[change["record"]] = change["body"]
                    elif change["op"] == "delete":
                        live.pop(change["record"], None)
        yield from live.values()

    def changes(self, node: str) -> list[dict[str, Any]]:
        """Every change kept for ``node``, in order (for checks and tools)."""
        with self._locked(node) as folder:
            self._recover(folder)
            return [
                orjson.loads(line)
                for segment in self._segments(folder)
                for line in segment.read_bytes().splitlines()
            ]

    # -- internals ----------------------------------------------------------------------
    @contextlib.contextmanager
    def _locked(self, node: str) -> Iterator[Path]:
        folder = self.directory / check_node(node)
        try:
            folder.mkdir(parents=True, exist_ok=True)
            lock = (folder / ".lock").open("a")
        except OSError as exc:
            raise ConfigError(f"cannot use replication directory {folder}: {exc}") from exc
        with lock:
            # One writer per node's files: two syncs at once would interleave appends.
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield folder

    @staticmethod
    def _segments(folder: Path) -> list[Path]:
        return sorted(folder.glob("*.jsonl"))

    def _recover(self, folder: Path) -> int:
        """The position, after cutting a torn last line off the last segment."""
        for segment in reversed(self._segments(folder)):
            data = segment.read_bytes()
            end = data.rfind(b"\n") + 1
            if end < len(data):  # a partial line at the end: a write cut short
                with segment.open("r+b") as f:
                    f.truncate(end)
                    os.fsync(f.fileno())
                data = data[:end]
            if data:
                return int(orjson.loads(data[data.rfind(b"\n", 0, -1) + 1 :])["seq"])
            segment.unlink()  # empty: nothing was written to it
        return 0

    def _drop_puts(self, folder: Path, deleted: set[str]) -> None:
        for segment in self._segments(folder):
            lines = segment.read_bytes().splitlines(keepends=True)
            keep = [
                line
                for line in lines
                if not (b'"op":"put"' in line and orjson.loads(line)["record"] in deleted)
            ]
            if len(keep) == len(lines):
                continue
            tmp = segment.with_suffix(".tmp")
            with tmp.open("wb") as out:
                out.write(b"".join(keep))
                out.flush()
                os.fsync(out.fileno())
            tmp.replace(segment)
            fsync_dir(folder)
