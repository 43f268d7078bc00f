"""The in-process vector index: exact below its threshold, IVF above it, filters before the
top-k on both paths, deletions and expiry honoured, rebuilt as it grows."""

from __future__ import annotations

import math

import numpy as np
import pytest
from numpy.typing import NDArray

from edgeos.memory import index as index_module
from edgeos.memory.index import VectorIndex

DIM = 32


def clustered(n: int, seed: int = 0) -> NDArray[np.float32]:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((20, DIM))
    x = centres[rng.integers(0, 20, n)] + 0.5 * rng.standard_normal((n, DIM))
    out: NDArray[np.float32] = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    return out


def filled(x: NDArray[np.float32], *, expires: float = math.inf) -> VectorIndex:
    index = VectorIndex(DIM)
    n = len(x)
    index.add(
        np.arange(1, n + 1, dtype=np.int64), x, np.full(n, 0.5), np.zeros(n), np.full(n, expires)
    )
    return index


def exact(x: NDArray[np.float32], q: NDArray[np.float32], k: int) -> set[int]:
    return {int(i) + 1 for i in np.argsort(-(x @ q))[:k]}


@pytest.fixture
def small_thresholds(monkeypatch: pytest.MonkeyPatch) -> None:
    # The IVF path on a few thousand vectors instead of tens of thousands.
    monkeypatch.setattr(index_module, "EXACT_MAX", 500)
    monkeypatch.setattr(index_module, "FILTER_EXACT_MAX", 50)


def test_exact_search_below_the_threshold() -> None:
    x = clustered(2000)
    index = filled(x)
    assert index.lists == 0
    for q in x[:20]:
        hits = index.search(q, 10, now=0.0)
        assert {int(k) for k in index.keys[hits.rows]} == exact(x, q, 10)
        assert np.all(np.diff(hits.scores) <= 0)


def test_ivf_recall_and_filters(small_thresholds: None) -> None:
    x = clustered(4000)
    index = filled(x)
    assert index.lists > 0
    recall = np.mean(
        [len({int(k) for k in index.keys[index.search(q, 10, now=0.0).rows]} & exact(x, q, 10))
         / 10 for q in x[:50]]
    )  # fmt: skip
    assert recall >= 0.9
    # A filter allowing a few rows far from the query, large enough to take the IVF path:
    # every one of the k must still come back.
    rng = np.random.default_rng(1)
    allowed = rng.choice(4000, 120, replace=False).astype(np.int64)
    hits = index.search(x[0], 100, now=0.0, allowed=index_rows(index, allowed + 1))
    assert len(hits.rows) == 100
    assert set(index.keys[hits.rows].tolist()) <= set((allowed + 1).tolist())
    few = index.search(x[0], 10, now=0.0, allowed=index_rows(index, allowed[:30] + 1))
    assert len(few.rows) == 10  # a small filter: an exact scan of the allowed rows


def index_rows(index: VectorIndex, keys: NDArray[np.int64]) -> NDArray[np.int64]:
    return np.array([index.row_of(int(k)) for k in keys], np.int64)


def test_removed_and_expired_rows_are_never_returned(small_thresholds: None) -> None:
    x = clustered(1500)
    index = filled(x)
    q = x[0]
    nearest = [int(k) for k in index.keys[index.search(q, 5, now=0.0).rows]]
    index.remove(nearest)
    after = {int(k) for k in index.keys[index.search(q, 5, now=0.0).rows]}
    assert not after & set(nearest)
    assert len(after) == 5
    soon = VectorIndex(DIM)
    soon.add(np.array([1, 2], np.int64), x[:2], np.full(2, 0.5), np.zeros(2),
             np.array([10.0, math.inf]))  # fmt: skip
    assert soon.keys[soon.search(x[0], 2, now=11.0).rows].tolist() == [2]


def test_the_index_grows_and_shrinks_through_its_thresholds(small_thresholds: None) -> None:
    x = clustered(3000)
    index = VectorIndex(DIM)
    for start in range(0, 3000, 250):
        end = start + 250
        keys = np.arange(start + 1, end + 1, dtype=np.int64)
        index.add(keys, x[start:end], np.full(250, 0.5), np.zeros(250), np.full(250, math.inf))
    assert len(index) == 3000
    assert index.lists > 0
    index.remove(list(range(1, 2801)))
    assert len(index) == 200
    assert index.lists == 0  # back to exact search
    hits = index.search(x[2900], 3, now=0.0)
    assert {int(k) for k in index.keys[hits.rows]} == {
        i + 2801 for i in np.argsort(-(x[2800:] @ x[2900]))[:3]
    }
