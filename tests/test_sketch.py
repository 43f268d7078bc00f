"""DDSketch: merged shards answer fleet-wide percentiles within the relative accuracy."""

from __future__ import annotations

import math

import numpy as np
import pytest

from edgeos.telemetry.sketch import (
    DEFAULT_ALPHA,
    MAX_BINS,
    DDSketch,
    SketchError,
    dense_parts,
    sparse_parts,
)

QUANTILES = (0.0, 0.01, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99, 0.999, 1.0)


def _distributions(rng: np.random.Generator) -> dict[str, np.ndarray]:
    n = 20_000
    return {
        "lognormal latency": rng.lognormal(mean=-4.0, sigma=1.0, size=n),
        "exponential": rng.exponential(scale=0.05, size=n),
        "pareto tail": (rng.pareto(1.5, size=n) + 1) * 0.002,
        "bimodal": np.concatenate(
            [rng.normal(0.01, 0.001, n // 2).clip(1e-6), rng.normal(2.0, 0.2, n // 2).clip(1e-6)]
        ),
        "uniform with zeros": np.concatenate([np.zeros(500), rng.uniform(0, 10, n)]),
    }


def _exact(values: np.ndarray, q: float) -> float:
    # The sketch answers the value of rank floor(q * (n - 1)): compare with the same.
    ordered = np.sort(values)
    return float(ordered[math.floor(q * (len(ordered) - 1))])


@pytest.mark.parametrize("shards", [1, 3, 16])
def test_merged_shards_match_exact_percentiles(shards: int) -> None:
    rng = np.random.default_rng(shards)
    for name, values in _distributions(rng).items():
        parts = np.array_split(rng.permutation(values), shards)
        # Each shard is a device; the fleet merges what they send, as bytes.
        merged = DDSketch()
        for part in parts:
            sketch = DDSketch()
            sketch.extend(part.tolist())
            merged.merge(DDSketch.from_bytes(sketch.to_bytes()))
        assert merged.count == len(values)
        assert merged.sum == pytest.approx(float(values.sum()))
        for q in QUANTILES:
            got, want = merged.quantile(q), _exact(values, q)
            assert got is not None
            assert abs(got - want) <= DEFAULT_ALPHA * want + 1e-12, (name, q, got, want)


def test_averaging_per_shard_percentiles_would_be_wrong() -> None:
    # Why sketches: one slow device's p99 is hidden by an average of p99s, not by a merge.
    rng = np.random.default_rng(7)
    fast = [rng.lognormal(-5, 0.3, 10_000) for _ in range(9)]
    slow = rng.lognormal(0, 0.3, 10_000)
    sketches = []
    for values in [*fast, slow]:
        sketch = DDSketch()
        sketch.extend(values.tolist())
        sketches.append(sketch)
    merged = DDSketch()
    for sketch in sketches:
        merged.merge(sketch)
    exact = _exact(np.concatenate([*fast, slow]), 0.99)
    averaged = sum(s.quantile(0.99) or 0.0 for s in sketches) / len(sketches)
    assert abs((merged.quantile(0.99) or 0.0) - exact) <= DEFAULT_ALPHA * exact
    assert averaged < exact / 2


def test_encoding_round_trip_and_size() -> None:
    rng = np.random.default_rng(1)
    sketch = DDSketch()
    sketch.extend(rng.lognormal(-4, 1, 50_000).tolist())
    sketch.add(0.0, weight=3)
    data = sketch.to_bytes()
    assert data[3] == 1  # dense: most bins between the ends are used
    assert DDSketch.from_bytes(data) == sketch
    assert len(data) < 1200  # fifty thousand latencies in about a kilobyte
    spread = DDSketch()
    spread.extend([1e-6, 1.0, 1e6])
    assert spread.to_bytes()[3] == 0  # sparse: three bins far apart
    assert DDSketch.from_bytes(spread.to_bytes()) == spread
    empty = DDSketch()
    assert DDSketch.from_bytes(empty.to_bytes()) == empty
    assert empty.quantile(0.5) is None


def test_bins_are_bounded() -> None:
    sketch = DDSketch(alpha=0.001)
    sketch.extend(10.0**e for e in np.linspace(-9, 9, 20_000).tolist())
    assert len(sketch._bins) <= MAX_BINS
    top = sketch.quantile(0.99)
    assert top is not None
    assert abs(top - _exact(np.logspace(-9, 9, 20_000), 0.99)) < 0.01 * top
    assert DDSketch.from_bytes(sketch.to_bytes()) == sketch


def test_refuses_bad_values_and_mismatched_merges() -> None:
    sketch = DDSketch()
    for bad in (-1.0, math.nan, math.inf):
        with pytest.raises(ValueError, match="finite non-negative"):
            sketch.add(bad)
    with pytest.raises(SketchError, match="different accuracy"):
        sketch.merge(DDSketch(alpha=0.02))
    with pytest.raises(SketchError, match="alpha"):
        DDSketch(alpha=1.5)


def _valid() -> bytes:
    sketch = DDSketch()
    sketch.extend([0.001, 0.002, 0.5, 3.0])
    return sketch.to_bytes()


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        (b"", "truncated"),
        (b"XX1" + _valid()[3:], "bad magic"),
        (_valid()[:-1], "truncated"),
        (_valid() + b"\x00", "unexpected values"),
        (_valid()[:3] + b"\x07" + _valid()[4:], "unknown sketch layout"),
        (_valid()[:4] + b"\x00" * 8 + _valid()[12:], "alpha"),
        (_valid()[:12] + b"\xff" * 12, "too large"),
        (_valid()[:13] + bytes.fromhex("000000000000f8ff") + _valid()[21:], "not a number"),
    ],
)
def test_refuses_malformed_encodings(data: bytes, problem: str) -> None:
    with pytest.raises(SketchError, match=problem):
        DDSketch.from_bytes(data)


def test_refuses_inconsistent_fields() -> None:
    good = bytearray(_valid())
    # min (bytes 13..21) above max (21..29)
    bad = bytes(good[:13] + good[21:29] + good[13:21] + good[29:])
    with pytest.raises(SketchError, match="above its max"):
        DDSketch.from_bytes(bad)
    # a bin with a count of zero
    zero_count = bytes(good[:-1] + b"\x00")
    with pytest.raises(SketchError, match="count of 0"):
        DDSketch.from_bytes(zero_count)
    dense = DDSketch()
    dense.extend([0.010, 0.0102, 0.0104])
    data = dense.to_bytes()
    assert data[3] == 1
    with pytest.raises(SketchError, match="end of the span"):
        DDSketch.from_bytes(data[:-1] + b"\x00")


def test_the_fleets_sum_of_stored_sketches_equals_merging_them() -> None:
    from edgeos.fleet.telemetry_store import SketchSum

    rng = np.random.default_rng(5)
    merged, summed = DDSketch(), SketchSum()
    layouts = {"dense": 0, "sparse": 0, "other": 0}
    for n in range(80):
        sketch = DDSketch()
        if n % 4 == 0:  # sparse: a few values far apart; or counts past one byte
            sketch.extend([1e-6 * (n + 1), 1.0, 1e5])
        elif n % 4 == 1:
            sketch.extend(rng.lognormal(-8, 0.1, 5000).tolist())
        elif n % 4 == 2:
            sketch.extend(rng.lognormal(-3, 0.3, 100).tolist())
            sketch.add(0.0, weight=2)
        else:  # a device's minute of latencies, spread: sparse with one-byte steps
            sketch.extend(rng.lognormal(-3, 0.5, 60).tolist())
        data = sketch.to_bytes()
        kind = "dense" if dense_parts(data) else "sparse" if sparse_parts(data) else "other"
        layouts[kind] += 1
        merged.merge(sketch)
        summed.add(data)
    assert all(layouts.values()), layouts  # every path of the sum was taken
    total = summed.sketch()
    assert total.sum == pytest.approx(merged.sum)  # added in another order
    total.sum = merged.sum
    assert total == merged
    with pytest.raises(SketchError):
        summed.add(b"DD1\x01" + b"\x00" * 40)
    # A malformed sparse one is refused too, not added through the fast path.
    spread = DDSketch()
    spread.extend([0.010, 0.013, 0.02])
    good = spread.to_bytes()
    assert sparse_parts(good) is not None
    with pytest.raises(SketchError, match="count of 0"):
        summed.add(good[:-1] + b"\x00")
