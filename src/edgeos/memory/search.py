"""Recall: the records nearest a query vector, filtered first, then ranked.

Each process keeps one :class:`~edgeos.memory.index.VectorIndex` per agent and embedding
model, built from ``memory_vectors`` on first use and brought up to date before every
search by reading the change log past the last change it applied (one indexed query when
nothing changed). Writes by other processes (the CLI forgetting someone) are seen the same
way. When the log was pruned past what the index had applied, it is built again.

Ranking: the most similar candidates (a few times ``k``) are scored
``similarity * w_s + recency * w_r + importance * w_i``, recency being 1 for a record made
now and halving every ``half_life``; the ``k`` best are returned.
"""

from __future__ import annotations

import sqlite3
import threading
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray

from edgeos.errors import ConfigError
from edgeos.memory import store
from edgeos.memory.index import VectorIndex
from edgeos.memory.store import MemoryRecord

if TYPE_CHECKING:
    from edgeos.manifests.agent import MemoryRanking
    from edgeos.state import Database

#: Candidates ranked per result when recency or importance weigh in.
CANDIDATES_PER_RESULT = 4
MIN_CANDIDATES = 32


@dataclass
class _Cached:
    index: VectorIndex | None
    seq: int
    lock: threading.Lock


_caches: weakref.WeakKeyDictionary[Database, dict[tuple[str, str], _Cached]] = (
    weakref.WeakKeyDictionary()
)
_caches_lock = threading.Lock()


def index_for(db: Database, agent: str, model: str) -> VectorIndex | None:
    """The agent's index for ``model``, current with the database; None if it holds nothing."""
    with _caches_lock:
        per_db = _caches.setdefault(db, {})
        cached = per_db.setdefault((agent, model), _Cached(None, -1, threading.Lock()))
    with cached.lock:
        conn = db.reader()
        conn.execute("BEGIN")  # one snapshot for the checks and the reads
        try:
            top_row = conn.execute(
                "SELECT seq FROM sqlite_sequence WHERE name = 'memory_changes'"
            ).fetchone()
            top = int(top_row[0]) if top_row else 0
            if cached.seq == top:
                return cached.index
            first = conn.execute("SELECT min(seq) FROM memory_changes").fetchone()[0]
            if cached.seq < 0 or first is None or first > cached.seq + 1:
                cached.index = _load(conn, agent, model)
            else:
                cached.index = _apply(conn, cached.index, agent, model, cached.seq, top)
            cached.seq = top
            return cached.index
        finally:
            conn.execute("COMMIT")


_ROWS = (
    "SELECT r.seq, r.importance, r.created_at, r.expires_at, v.vector FROM memory_records r "
    "JOIN memory_vectors v ON v.seq = r.seq WHERE r.agent = ? AND r.model = ?"
)


def _add_rows(index: VectorIndex | None, rows: list[Any]) -> VectorIndex | None:
    if not rows:
        return index
    dim = index.dim if index is not None else len(rows[0][4]) // 4
    # Vectors of another size (an embedding model replaced by one of another dimension)
    # cannot share the index: they stay out of it until they are embedded again.
    rows = [r for r in rows if len(r[4]) == dim * 4]
    if not rows:
        return index
    vectors = np.frombuffer(b"".join(r[4] for r in rows), np.float32).reshape(len(rows), dim)
    if index is None:
        index = VectorIndex(dim)
    keys = np.array([r[0] for r in rows], np.int64)
    importance = np.array([r[1] for r in rows], np.float64)
    created = np.array([r[2] for r in rows], np.float64)
    expires = np.array([np.inf if r[3] is None else r[3] for r in rows], np.float64)
    index.add(keys, vectors, importance, created, expires)
    return index


def _load(conn: sqlite3.Connection, agent: str, model: str) -> VectorIndex | None:
    rows = conn.execute(_ROWS, (agent, model)).fetchall()
    return _add_rows(None, rows)


def _apply(
    conn: sqlite3.Connection,
    index: VectorIndex | None,
    agent: str,
    model: str,
    after: int,
    top: int,
) -> VectorIndex | None:
    changes = conn.execute(
        "SELECT op, record_seq FROM memory_changes WHERE agent = ? AND seq > ? AND seq <= ?",
        (agent, after, top),
    ).fetchall()
    # Every record changed leaves the index, then those put that still exist go back in
    # as they are now (of this model: one embedded again for another leaves this index):
    # the same end state as applying the changes one by one (rowids are never reused).
    if index is not None:
        index.remove([int(key) for _, key in changes])
    put = sorted({int(key) for op, key in changes if op == "put"})
    for start in range(0, len(put), 500):
        chunk = put[start : start + 500]
        marks = ",".join("?" * len(chunk))
        rows = conn.execute(f"{_ROWS} AND r.seq IN ({marks})", (agent, model, *chunk)).fetchall()
        index = _add_rows(index, rows)
    return index


def recall(
    db: Database,
    *,
    agent: str,
    model: str,
    query: NDArray[np.float32],
    k: int,
    where: Mapping[str, list[str]],
    ranking: MemoryRanking,
    now: float,
) -> list[MemoryRecord]:
    """The ``k`` best records for a query vector among those matching ``where``."""
    index = index_for(db, agent, model)
    if index is None:
        return []
    if index.dim != len(query):
        raise ConfigError(
            f"agent '{agent}' holds memory embedded in {index.dim} dimensions, but model "
            f"'{model}' now gives {len(query)}: the records must be embedded again"
        )
    allowed: NDArray[np.int64] | None = None
    if where:
        allowed = index.rows_of(store.filtered(db.reader(), agent, where))
        if len(allowed) == 0:
            return []
    weighted = ranking.recency > 0 or ranking.importance > 0
    wanted = max(k * CANDIDATES_PER_RESULT, MIN_CANDIDATES) if weighted else k
    hits = index.search(query, wanted, now=now, allowed=allowed)
    similarity = hits.scores.astype(np.float64)
    score = ranking.similarity * similarity
    if weighted:
        age = np.maximum(now - index.created[hits.rows], 0.0)
        score = score + ranking.recency * np.power(0.5, age / ranking.half_life)
        score = score + ranking.importance * index.importance[hits.rows]
    best = np.argsort(-score, kind="stable")[:k]
    keys = [int(index.keys[hits.rows[i]]) for i in best]
    records = store.fetch(db.reader(), keys)
    out = []
    for i, key in zip(best, keys, strict=True):
        record = records.get(key)
        if record is not None:  # removed since the index read it: not returned
            out.append(replace(record, similarity=float(similarity[i]), score=float(score[i])))
    return out
