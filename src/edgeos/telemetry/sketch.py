"""DDSketch: a mergeable quantile sketch with a relative-accuracy guarantee.

A value ``x > 0`` is counted in bin ``ceil(log_gamma(x))`` with
``gamma = (1 + alpha) / (1 - alpha)``; a quantile is answered with the bin's
representative ``2 * gamma**i / (gamma + 1)``, which is within ``alpha`` (relative) of
the true quantile of the values counted. Two sketches with the same ``alpha`` merge by
adding their bins, so percentiles over a whole fleet are exact to ``alpha`` and not an
average of per-device percentiles (Masson, Rim and Lee, VLDB 2019).

Our own small implementation rather than the ``ddsketch`` package: that package's
encoding is protobuf (one more dependency on every device) and its stores are general;
latencies, costs and durations need only non-negative values and a dense, compact wire
form. Values are non-negative: zeros have a counter of their own, a negative value is
refused.

Encoding (:meth:`DDSketch.to_bytes`), all integers unsigned LEB128 varints, in whichever
of two layouts is shorter::

    b"DD1"  layout  alpha:f64  count_zero  min:f64  max:f64  sum:f64  bins
    layout 0 (sparse): n_bins  first_index (zigzag)  first_count  (index_delta  count)*
    layout 1 (dense):  first_index (zigzag)  n_span  count*  (one per index, zeros too)

Latencies of a busy minute (hundreds of values, a few dozen bins) are about 100 bytes.
:meth:`DDSketch.from_bytes` refuses anything malformed with :class:`SketchError` naming
the problem.
"""

from __future__ import annotations

import itertools
import math
import struct
from collections.abc import Iterable, Mapping
from typing import NamedTuple

from edgeos.errors import ConfigError

#: Relative accuracy of every sketch edgeos keeps: quantiles within 1 %.
DEFAULT_ALPHA = 0.01
#: Bins kept at most; past it the lowest bins are folded together (accuracy is then kept
#: for the upper quantiles, the ones latency reports are about).
MAX_BINS = 2048
_MAGIC = b"DD1"
_SPARSE, _DENSE = 0, 1
_F64 = struct.Struct("<d")
_HEAD = struct.Struct("<3sBd")
_FIGURES = struct.Struct("<3d")
#: The largest count a bin or sketch may claim when decoded (no real sketch is near it).
_MAX_COUNT = 1 << 53


class SketchError(ConfigError):
    """A sketch encoding is malformed, or two sketches cannot be merged."""


class DDSketch:
    """Counts of non-negative values in logarithmic bins; see the module docstring."""

    __slots__ = ("_bins", "_log_gamma", "alpha", "count", "gamma", "max", "min", "sum", "zeros")

    def __init__(self, alpha: float = DEFAULT_ALPHA) -> None:
        if not 0.0 < alpha < 1.0:
            raise SketchError(f"relative accuracy alpha must be between 0 and 1, got {alpha}")
        self.alpha = alpha
        self.gamma = (1.0 + alpha) / (1.0 - alpha)
        self._log_gamma = math.log(self.gamma)
        self._bins: dict[int, int] = {}
        self.zeros = 0
        self.count = 0
        self.sum = 0.0
        self.min = math.inf
        self.max = -math.inf

    def add(self, value: float, weight: int = 1) -> None:
        """Count ``value`` (``weight`` times)."""
        if not value >= 0.0 or math.isinf(value):
            raise ValueError(f"a sketch counts finite non-negative values, got {value}")
        if value == 0.0:
            self.zeros += weight
        else:
            index = math.ceil(math.log(value) / self._log_gamma)
            self._bins[index] = self._bins.get(index, 0) + weight
            if len(self._bins) > MAX_BINS:
                self._collapse()
        self.count += weight
        self.sum += value * weight
        self.min = min(self.min, value)
        self.max = max(self.max, value)

    def extend(self, values: Iterable[float]) -> None:
        """Count every value of ``values``."""
        for value in values:
            self.add(value)

    def merge(self, other: DDSketch) -> None:
        """Add ``other``'s counts to this sketch (same ``alpha`` required)."""
        if other.alpha != self.alpha:
            raise SketchError(
                f"cannot merge sketches of different accuracy ({self.alpha} and {other.alpha})"
            )
        bins = self._bins
        for index, n in other._bins.items():
            bins[index] = bins.get(index, 0) + n
        if len(bins) > MAX_BINS:
            self._collapse()
        self.zeros += other.zeros
        self.count += other.count
        self.sum += other.sum
        self.min = min(self.min, other.min)
        self.max = max(self.max, other.max)

    @classmethod
    def of_counts(
        cls,
        bins: Mapping[int, int],
        *,
        zeros: int,
        total: float,
        low: float,
        high: float,
        alpha: float = DEFAULT_ALPHA,
    ) -> DDSketch:
        """A sketch from bin counts and figures summed elsewhere (the fleet adds many
        stored sketches' :func:`dense_parts` at once)."""
        sketch = cls(alpha)
        sketch._bins = {int(i): int(n) for i, n in bins.items() if n}
        if len(sketch._bins) > MAX_BINS:
            sketch._collapse()
        sketch.zeros = zeros
        sketch.count = zeros + sum(sketch._bins.values())
        sketch.sum = total
        if sketch.count:
            sketch.min, sketch.max = low, high
        return sketch

    def quantile(self, q: float) -> float | None:
        """The ``q`` quantile (0 to 1) within the relative accuracy; None when empty."""
        if not 0.0 <= q <= 1.0:
            raise ValueError(f"a quantile is between 0 and 1, got {q}")
        if self.count == 0:
            return None
        rank = q * (self.count - 1)
        seen = self.zeros
        if rank < seen:
            return 0.0
        for index in sorted(self._bins):
            seen += self._bins[index]
            if rank < seen:
                value = 2.0 * self.gamma**index / (self.gamma + 1.0)
                return min(max(value, self.min), self.max)
        return self.max

    @property
    def mean(self) -> float | None:
        """The exact mean of the values counted; None when empty."""
        return self.sum / self.count if self.count else None

    def __len__(self) -> int:
        return self.count

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, DDSketch):
            return NotImplemented
        return (
            self.alpha == other.alpha
            and self._bins == other._bins
            and (self.zeros, self.count, self.sum) == (other.zeros, other.count, other.sum)
            and (self.count == 0 or (self.min, self.max) == (other.min, other.max))
        )

    __hash__ = None  # type: ignore[assignment]  # mutable

    def _collapse(self) -> None:
        """Fold the lowest bins into one so that at most MAX_BINS remain."""
        indexes = sorted(self._bins)
        extra = indexes[: len(indexes) - MAX_BINS + 1]
        target = indexes[len(extra)]
        self._bins[target] += sum(self._bins.pop(i) for i in extra)

    # -- encoding ---------------------------------------------------------------------
    def to_bytes(self) -> bytes:
        """The compact binary form (see the module docstring)."""
        head = bytearray(_F64.pack(self.alpha))
        _put_varints(head, (self.zeros,))
        empty = self.count == 0
        for value in (0.0 if empty else self.min, 0.0 if empty else self.max, self.sum):
            head += _F64.pack(value)
        indexes = sorted(self._bins)
        bins = self._bins
        # Both layouts as numbers first, and only the shorter one encoded: the fleet
        # encodes a merged sketch for every batch it takes.
        sparse = [len(indexes)]
        previous = 0
        for position, index in enumerate(indexes):
            sparse.append(_zigzag(index) if position == 0 else index - previous)
            sparse.append(bins[index])
            previous = index
        layout, values = _SPARSE, sparse
        if indexes:
            low, high = indexes[0], indexes[-1]
            dense = [_zigzag(low), high - low + 1]
            dense.extend(bins.get(index, 0) for index in range(low, high + 1))
            if _encoded_length(dense) < _encoded_length(sparse):
                layout, values = _DENSE, dense
        _put_varints(head, values)
        return _MAGIC + bytes([layout]) + bytes(head)

    @classmethod
    def from_bytes(cls, data: bytes) -> DDSketch:
        """A sketch from :meth:`to_bytes`; SketchError naming what is wrong otherwise."""
        if not isinstance(data, bytes | bytearray | memoryview):
            raise SketchError(f"a sketch encoding is bytes, got {type(data).__name__}")
        reader = _Reader(bytes(data))
        if reader.take(3) != _MAGIC:
            raise SketchError("not a sketch encoding (bad magic)")
        layout = reader.take(1)[0]
        if layout not in (_SPARSE, _DENSE):
            raise SketchError(f"unknown sketch layout {layout}")
        sketch = cls(reader.f64("alpha"))
        sketch.zeros = reader.varint("zero count")
        low, high, total = reader.f64("min"), reader.f64("max"), reader.f64("sum")
        # The bins in one pass: the fleet decodes many thousands of sketches per query.
        values = _varints(reader.data, reader.at)
        if layout == _SPARSE:
            n_bins = values[0] if values else 0
            if n_bins > MAX_BINS:
                raise SketchError(f"sketch has {n_bins} bins, at most {MAX_BINS} are allowed")
            _check_length(values, 1 + 2 * n_bins)
            steps, counts = values[1::2], values[2::2]
            if n_bins:
                steps[0] = _unzigzag(steps[0])
                if 0 in steps[1:]:
                    raise SketchError("sketch bins are not in increasing order")
            indexes = list(itertools.accumulate(steps))
            if 0 in counts:
                bad = indexes[counts.index(0)]
                raise SketchError(f"sketch bin {bad} has a count of 0")
        else:
            if len(values) < 2:
                raise SketchError("sketch encoding is truncated")
            first, span = _unzigzag(values[0]), values[1]
            if not 1 <= span <= 4 * MAX_BINS:
                raise SketchError(f"sketch spans {span} bins, 1 to {4 * MAX_BINS} are allowed")
            _check_length(values, 2 + span)
            if values[2] == 0 or values[-1] == 0:
                raise SketchError("sketch bin at an end of the span has a count of 0")
            pairs = [(first + k, n) for k, n in enumerate(values[2:]) if n]
            indexes, counts = [i for i, _ in pairs], [n for _, n in pairs]
            if len(indexes) > MAX_BINS:
                raise SketchError(f"sketch has {len(indexes)} bins, at most {MAX_BINS}")
        if indexes:
            _in_range(indexes[0])
            _in_range(indexes[-1])
        sketch._bins = dict(zip(indexes, counts, strict=True))
        count = sketch.zeros + sum(sketch._bins.values())
        if count > _MAX_COUNT:
            raise SketchError(f"sketch claims {count} values: too many")
        sketch.count = count
        if not all(math.isfinite(v) and v >= 0.0 for v in (low, high, total)):
            raise SketchError("sketch min, max and sum must be finite and non-negative")
        if count and low > high:
            raise SketchError(f"sketch min {low} is above its max {high}")
        if count == 0 and (low, high, total) != (0.0, 0.0, 0.0):
            raise SketchError("an empty sketch has min, max and sum 0")
        if count:
            sketch.min, sketch.max = low, high
        sketch.sum = total
        return sketch


def _zigzag(index: int) -> int:
    return (index << 1) ^ (index >> 63)  # bin indexes go below 0 (values under 1)


def _unzigzag(value: int) -> int:
    return (value >> 1) ^ -(value & 1)


class DenseParts(NamedTuple):
    """An encoded sketch in the dense layout with one-byte counts, read without decoding."""

    alpha: float
    zeros: int
    min: float
    max: float
    sum: float
    #: The bin index of ``counts[0]``; ``counts[k]`` is the count of bin ``first + k``.
    first: int
    counts: bytes


class _Head(NamedTuple):
    """The checked head of an encoding both fast readers take: its figures, its first
    varint (the bin count or the first index) and where the rest starts."""

    zeros: int
    min: float
    max: float
    sum: float
    varint: int
    at: int


def _fast_head(data: bytes, layout: int) -> _Head | None:
    """``data``'s head when it is ``layout`` at the default alpha with a one-byte zero
    count and sound figures; None otherwise (the full decoder says what is wrong)."""
    if len(data) < 40 or data[:3] != _MAGIC or data[3] != layout or data[12] >= 0x80:
        return None
    _, _, alpha = _HEAD.unpack_from(data)
    low, high, total = _FIGURES.unpack_from(data, 13)
    if (
        alpha != DEFAULT_ALPHA
        or not all(math.isfinite(v) and v >= 0.0 for v in (low, high, total))
        or low > high
    ):
        return None
    try:
        varint, at = _varint_at(data, 37)
    except SketchError:
        return None
    return _Head(data[12], low, high, total, varint, at)


def dense_parts(data: bytes) -> DenseParts | None:
    """``data``'s parts when it is the dense layout with counts under 128 (most sketches
    of latencies are), checked; None otherwise (use :meth:`DDSketch.from_bytes`)."""
    head = _fast_head(data, _DENSE)
    if head is None:
        return None
    try:
        span, at = _varint_at(data, head.at)
    except SketchError:
        return None
    counts = bytes(data[at:])
    first = _unzigzag(head.varint)
    if (
        len(counts) != span
        or not counts
        or max(counts) >= 0x80
        or not counts[0]
        or not counts[-1]
        or abs(first) > 1 << 20
        or abs(first + span) > 1 << 20
    ):
        return None
    return DenseParts(DEFAULT_ALPHA, head.zeros, head.min, head.max, head.sum, first, counts)


class SparseParts(NamedTuple):
    """An encoded sketch in the sparse layout with one-byte steps and counts, read without
    decoding."""

    alpha: float
    zeros: int
    min: float
    max: float
    sum: float
    #: The bin index of ``counts[0]``; bin ``k`` is ``steps[k - 1]`` above bin ``k - 1``.
    first: int
    steps: bytes
    counts: bytes


def sparse_parts(data: bytes) -> SparseParts | None:
    """``data``'s parts when it is the sparse layout whose steps between bins and counts
    are all under 128 (a minute of latencies spread over a few dozen bins), checked; None
    otherwise (use :meth:`DDSketch.from_bytes`)."""
    head = _fast_head(data, _SPARSE)
    if head is None:
        return None
    n_bins = head.varint
    try:
        first, at = _varint_at(data, head.at)
    except SketchError:
        return None
    pairs = bytes(data[at:])
    first = _unzigzag(first)
    if (
        not 1 <= n_bins <= MAX_BINS
        or len(pairs) != 2 * n_bins - 1
        or max(pairs) >= 0x80
        or 0 in pairs  # no bin is empty and no step is zero
        or abs(first) > 1 << 20
        or abs(first) + 0x80 * n_bins > 1 << 20
    ):
        return None
    return SparseParts(
        DEFAULT_ALPHA, head.zeros, head.min, head.max, head.sum, first, pairs[1::2], pairs[0::2]
    )


def _varint_at(data: bytes, at: int) -> tuple[int, int]:
    """The varint at ``at`` and where the next value starts."""
    value = shift = 0
    while at < len(data) and shift <= 63:
        byte = data[at]
        at += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, at
        shift += 7
    raise SketchError("sketch encoding is truncated or a value is too large")


def _varints(data: bytes, at: int) -> list[int]:
    """Every varint from ``at`` to the end."""
    out: list[int] = []
    append = out.append
    value = shift = 0
    for byte in data[at:]:
        if not shift and byte < 0x80:
            append(byte)  # the usual case: one byte
            continue
        value |= (byte & 0x7F) << shift
        if byte & 0x80:
            shift += 7
            if shift > 63:
                raise SketchError("sketch bin value is too large")
        else:
            append(value)
            value = shift = 0
    if shift:
        raise SketchError("sketch encoding is truncated")
    return out


def _check_length(values: list[int], expected: int) -> None:
    if len(values) < expected:
        raise SketchError("sketch encoding is truncated")
    if len(values) > expected:
        raise SketchError(f"{len(values) - expected} unexpected values after the sketch")


def _in_range(index: int) -> int:
    if abs(index) > 1 << 20:
        raise SketchError(f"sketch bin index {index} is out of range")
    return index


def _put_varints(out: bytearray, values: Iterable[int]) -> None:
    """Append each of ``values`` (non-negative) as a varint."""
    append = out.append
    for value in values:
        while value >= 0x80:
            append((value & 0x7F) | 0x80)
            value >>= 7
        append(value)


def _encoded_length(values: Iterable[int]) -> int:
    """How many bytes :func:`_put_varints` takes for ``values``."""
    return sum(1 if value < 0x80 else (value.bit_length() + 6) // 7 for value in values)


class _Reader:
    """Reads a sketch encoding front to back; every short read is a SketchError."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.at = 0

    @property
    def remaining(self) -> int:
        return len(self.data) - self.at

    def take(self, n: int) -> bytes:
        if self.remaining < n:
            raise SketchError("sketch encoding is truncated")
        chunk = self.data[self.at : self.at + n]
        self.at += n
        return chunk

    def f64(self, what: str) -> float:
        value: float = _F64.unpack(self.take(8))[0]
        if math.isnan(value):
            raise SketchError(f"sketch {what} is not a number")
        return value

    def varint(self, what: str) -> int:
        value = shift = 0
        while True:
            if shift > 63:
                raise SketchError(f"sketch {what} is too large")
            byte = self.take(1)[0]
            value |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                return value
