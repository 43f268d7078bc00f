"""The in-process search structure over an agent's vectors: exact when small, IVF when large.

The vectors' truth is the node database (``memory_vectors``, written in the transactions
of the steps that remembered them); this is a derived copy in RAM that a process builds
on its first recall and keeps current by reading the change log (see
:mod:`edgeos.memory.store`). Losing it loses nothing: a restart builds it again.

Why not a vector extension inside SQLite: ``sqlite-vec`` (the obvious one) scans every
vector of a query in brute force (about 140 ms for 100k 384-dimension vectors on two
cores, ``bench/memory.py``), and Python builds without loadable-extension support (this
project's own interpreter among them) cannot load it at all. Here, up to
:data:`EXACT_MAX` vectors a query is one matrix-vector product (exact); above that an
inverted-file index (k-means lists, the nearest lists probed) reads a few percent of them.

Filters come before the top-k, never after: a query passes the rows it may return, a
small set is scanned exactly, a large one is probed list by list until enough allowed
rows were seen (or every list was), so a filtered query returns ``k`` results whenever
``k`` exist.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

#: Up to this many vectors, every query scans all of them (exact, a few ms at most).
EXACT_MAX = 20_000
#: A filtered query whose allowed rows are at most this many scans them exactly (gathering
#: scattered rows costs about as much per row as reading a list): a broader one probes lists.
FILTER_EXACT_MAX = 2_048
#: Rows added since the lists were built that are scanned in full by every query; past
#: this share of the index the lists are rebuilt.
TAIL_SHARE = 0.05
#: The share of the vectors an IVF query reads at least (the nearest lists first): 0.97
#: recall@10 on 100k unclustered sentence-like vectors, ~3 ms (``bench/memory.py``).
PROBE_SHARE = 0.12
#: k-means iterations and the sample they train on (per list).
KMEANS_ITERATIONS = 8
KMEANS_SAMPLE_PER_LIST = 48

Vectors = NDArray[np.float32]


@dataclass(frozen=True)
class Hits:
    """Rows of the index and their cosine similarity to the query, best first."""

    rows: NDArray[np.int64]
    scores: NDArray[np.float32]


class VectorIndex:
    """Unit vectors with per-row attributes; thread-safe search and updates."""

    def __init__(self, dim: int, *, seed: int = 0) -> None:
        self.dim = dim
        self._lock = threading.RLock()
        self._rng = np.random.default_rng(seed)
        self._x: Vectors = np.zeros((0, dim), np.float32)
        self._alive: NDArray[np.bool_] = np.zeros(0, np.bool_)
        #: Per row: the record's rowid in ``memory_records``.
        self.keys: NDArray[np.int64] = np.zeros(0, np.int64)
        #: Per row: importance, creation time, expiry (inf: never), for ranking and masks.
        self.importance: NDArray[np.float64] = np.zeros(0)
        self.created: NDArray[np.float64] = np.zeros(0)
        self.expires: NDArray[np.float64] = np.zeros(0)
        self._row_of: dict[int, int] = {}
        self._n = 0
        self._dead = 0
        # IVF: centroids, and rows [0, _sorted) laid out list by list (_offsets).
        self._centroids: Vectors | None = None
        self._offsets: NDArray[np.int64] = np.zeros(1, np.int64)
        self._assign: NDArray[np.int64] = np.zeros(0, np.int64)
        self._sorted = 0
        self._trained_at = 0

    # -- size ---------------------------------------------------------------------------
    def __len__(self) -> int:
        return self._n - self._dead

    @property
    def lists(self) -> int:
        """How many IVF lists the index has (0: exact search)."""
        return 0 if self._centroids is None else len(self._centroids)

    def nbytes(self) -> int:
        """Bytes of RAM the index holds."""
        return int(self._x.nbytes + self.keys.nbytes * 5 + self._alive.nbytes)

    def row_of(self, key: int) -> int | None:
        """The row of a record's rowid, if it is in the index."""
        return self._row_of.get(key)

    def rows_of(self, keys: list[int]) -> NDArray[np.int64]:
        """The rows of those record rowids that are in the index."""
        get = self._row_of.get
        rows = np.array([get(key, -1) for key in keys], np.int64)
        return rows[rows >= 0]

    # -- updates ------------------------------------------------------------------------
    def add(
        self,
        keys: NDArray[np.int64],
        vectors: Vectors,
        importance: NDArray[np.float64],
        created: NDArray[np.float64],
        expires: NDArray[np.float64],
    ) -> None:
        """Add rows (keys already present are replaced)."""
        if vectors.shape[1:] != (self.dim,):
            raise ValueError(f"vectors have shape {vectors.shape}, the index holds {self.dim}")
        with self._lock:
            present = [int(k) for k in keys if int(k) in self._row_of]
            if present:
                self.remove(present)
            count = len(keys)
            self._reserve(self._n + count)
            end = self._n + count
            self._x[self._n : end] = vectors
            self._alive[self._n : end] = True
            self.keys[self._n : end] = keys
            self.importance[self._n : end] = importance
            self.created[self._n : end] = created
            self.expires[self._n : end] = expires
            if self._centroids is not None:
                self._assign[self._n : end] = _nearest(vectors, self._centroids)
            for offset, key in enumerate(keys.tolist()):
                self._row_of[key] = self._n + offset
            self._n = end
            self._maintain()

    def remove(self, keys: list[int]) -> None:
        """Drop rows by record rowid (unknown keys are ignored)."""
        with self._lock:
            for key in keys:
                row = self._row_of.pop(key, None)
                if row is not None and self._alive[row]:
                    self._alive[row] = False
                    self._dead += 1
            self._maintain()

    # -- search -------------------------------------------------------------------------
    def search(
        self,
        query: Vectors,
        count: int,
        *,
        now: float,
        allowed: NDArray[np.int64] | None = None,
    ) -> Hits:
        """The ``count`` rows most similar to ``query`` that are alive, not expired at
        ``now`` and (when given) among the ``allowed`` rows."""
        # A float64 query would make numpy convert the whole matrix on every product.
        query = np.ascontiguousarray(query, dtype=np.float32)
        with self._lock:
            if count <= 0 or len(self) == 0:
                return Hits(np.zeros(0, np.int64), np.zeros(0, np.float32))
            if allowed is not None:
                if len(allowed) <= FILTER_EXACT_MAX or self._centroids is None:
                    return self._scan_rows(query, count, allowed, now)
                mask = np.zeros(self._n, np.bool_)
                mask[allowed] = True
                return self._probe(query, count, now, mask)
            if self._centroids is None:
                return self._scan_all(query, count, now)
            return self._probe(query, count, now, None)

    def _usable(self, rows: NDArray[np.int64] | slice, now: float) -> NDArray[np.bool_]:
        ok: NDArray[np.bool_] = self._alive[rows] & (self.expires[rows] > now)
        return ok

    def _scan_all(self, query: Vectors, count: int, now: float) -> Hits:
        scores = self._x[: self._n] @ query
        ok = self._usable(slice(0, self._n), now)
        return _top(np.arange(self._n, dtype=np.int64)[ok], scores[ok], count)

    def _scan_rows(self, query: Vectors, count: int, rows: NDArray[np.int64], now: float) -> Hits:
        # In row order: the gather then reads memory forwards.
        rows = np.sort(rows[self._usable(rows, now)])
        return _top(rows, self._x[rows] @ query, count)

    def _probe(
        self, query: Vectors, count: int, now: float, mask: NDArray[np.bool_] | None
    ) -> Hits:
        assert self._centroids is not None
        order = np.argsort(-(self._centroids @ query))
        sizes = np.diff(self._offsets)
        # Rows added since the lists were built are read by every query.
        found_rows = [np.arange(self._sorted, self._n, dtype=np.int64)]
        found_scores = [self._x[self._sorted : self._n] @ query]
        budget = max(int(PROBE_SHARE * self._n), 4 * count)
        read = 0
        usable = 0
        position = 0
        while position < len(order):
            # Probe lists nearest first until the share is read and enough rows qualify.
            target = order[position]
            position += 1
            start, end = int(self._offsets[target]), int(self._offsets[target + 1])
            if start == end:
                continue
            found_rows.append(np.arange(start, end, dtype=np.int64))
            found_scores.append(self._x[start:end] @ query)
            read += int(sizes[target])
            if mask is not None:
                usable += int(np.count_nonzero(mask[start:end]))
            else:
                usable = read
            if read >= budget and usable >= count:
                break
        rows = np.concatenate(found_rows)
        scores = np.concatenate(found_scores)
        ok = self._usable(rows, now)
        if mask is not None:
            ok &= mask[rows]
        hits = _top(rows[ok], scores[ok], count)
        if len(hits.rows) < count and position < len(order):
            # Expired or dead rows took places: the lists not read may still hold enough.
            pool = mask if mask is not None else self._alive[: self._n]
            return self._scan_rows(query, count, np.flatnonzero(pool).astype(np.int64), now)
        return hits

    # -- upkeep -------------------------------------------------------------------------
    def _reserve(self, size: int) -> None:
        if size <= len(self._x):
            return
        capacity = max(size, int(len(self._x) * 1.5), 1024)

        def grow(a: NDArray[Any], fill: Any = 0) -> NDArray[Any]:
            new = np.full((capacity, *a.shape[1:]), fill, dtype=a.dtype)
            new[: self._n] = a[: self._n]
            return new

        self._x = grow(self._x)
        self._alive = grow(self._alive, False)
        self.keys = grow(self.keys)
        self.importance = grow(self.importance)
        self.created = grow(self.created)
        self.expires = grow(self.expires, math.inf)
        self._assign = grow(self._assign)

    def _maintain(self) -> None:
        alive = len(self)
        if alive <= EXACT_MAX:
            if self._centroids is not None:
                self._centroids = None
                self._sorted = 0
            if self._dead > max(1024, alive):
                self._rebuild(train=False)
            return
        if self._centroids is None or alive > 2 * self._trained_at:
            self._rebuild(train=True)
        elif self._n - self._sorted > TAIL_SHARE * alive or self._dead > 0.2 * alive:
            self._rebuild(train=False)

    def _rebuild(self, *, train: bool) -> None:
        """Drop dead rows; (re)train the lists if asked; lay the rows out list by list."""
        rows = np.flatnonzero(self._alive[: self._n])
        if len(rows) > EXACT_MAX:
            if train or self._centroids is None:
                self._centroids = _kmeans(self._x[rows], _list_count(len(rows)), self._rng)
                self._trained_at = len(rows)
                self._assign[rows] = _nearest(self._x[rows], self._centroids)
            assignment = self._assign[rows]
            rows = rows[np.argsort(assignment, kind="stable")]
            counts = np.bincount(assignment, minlength=len(self._centroids))
            self._offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        else:
            self._centroids = None
            self._offsets = np.zeros(1, np.int64)
        n = len(rows)
        self._x = np.ascontiguousarray(self._x[rows])
        self.keys = self.keys[rows]
        self.importance = self.importance[rows]
        self.created = self.created[rows]
        self.expires = self.expires[rows]
        self._assign = self._assign[rows]
        self._alive = np.ones(n, np.bool_)
        self._n = n
        self._dead = 0
        self._sorted = n if self._centroids is not None else 0
        self._row_of = {key: row for row, key in enumerate(self.keys.tolist())}


def _top(rows: NDArray[np.int64], scores: NDArray[np.float32], count: int) -> Hits:
    if len(rows) > count:
        part = np.argpartition(-scores, count - 1)[:count]
        rows, scores = rows[part], scores[part]
    order = np.argsort(-scores, kind="stable")
    return Hits(rows[order], scores[order].astype(np.float32))


def _list_count(n: int) -> int:
    # About 2 * sqrt(n) lists of a few hundred rows each: k-means stays quick to train
    # and a query reads only the few lists nearest to it.
    return int(min(1024, max(64, 2 * math.isqrt(n))))


def _nearest(x: Vectors, centroids: Vectors, chunk: int = 16_384) -> NDArray[np.int64]:
    out = np.empty(len(x), np.int64)
    for start in range(0, len(x), chunk):
        out[start : start + chunk] = np.argmax(x[start : start + chunk] @ centroids.T, axis=1)
    return out


def _kmeans(x: Vectors, k: int, rng: np.random.Generator) -> Vectors:
    """Spherical k-means (cosine) on a sample: centroids of unit length."""
    sample_size = min(len(x), k * KMEANS_SAMPLE_PER_LIST)
    sample = x[rng.choice(len(x), sample_size, replace=False)]
    centroids = sample[rng.choice(sample_size, k, replace=False)].copy()
    for _ in range(KMEANS_ITERATIONS):
        assignment = _nearest(sample, centroids)
        order = np.argsort(assignment, kind="stable")
        members, starts = np.unique(assignment[order], return_index=True)
        sums = np.zeros_like(centroids)
        sums[members] = np.add.reduceat(sample[order], starts, axis=0)
        empty = np.setdiff1d(np.arange(k), members)
        # An empty list takes a random sample point: no list stays useless.
        sums[empty] = sample[rng.choice(sample_size, len(empty), replace=False)]
        norms = np.linalg.norm(sums, axis=1, keepdims=True)
        centroids = (sums / np.maximum(norms, 1e-12)).astype(np.float32)
    return centroids
