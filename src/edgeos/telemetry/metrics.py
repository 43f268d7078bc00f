"""Counters and histograms with labels, rendered in the Prometheus text format (0.0.4).

Small on purpose: the node exposes a handful of metric families, and a dependency-free
implementation keeps an idle node light.
"""

from __future__ import annotations

import bisect
import threading
from collections.abc import Sequence
from typing import TypeVar

LabelValues = tuple[str, ...]

# Seconds; spans a tiny model on a fast core (50 us) to a slow cloud call (10 s).
DEFAULT_BUCKETS: tuple[float, ...] = (
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip


class _Family:
    """A metric family: one name, one help text, a fixed set of label names."""

    kind = ""

    def __init__(self, name: str, help: str, labels: Sequence[str]) -> None:
        self.name = name
        self.help = help
        self.labels = tuple(labels)
        self._lock = threading.Lock()

    def _key(self, values: Sequence[str]) -> LabelValues:
        if len(values) != len(self.labels):
            raise ValueError(f"{self.name} takes labels {self.labels}, got {tuple(values)}")
        return tuple(values)

    def _label_text(self, values: LabelValues, extra: str = "") -> str:
        pairs = [f'{k}="{_escape(v)}"' for k, v in zip(self.labels, values, strict=True)]
        if extra:
            pairs.append(extra)
        return "{" + ",".join(pairs) + "}" if pairs else ""

    def render(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]


_F = TypeVar("_F", bound=_Family)


class Counter(_Family):
    """A monotonically increasing count per label set."""

    kind = "counter"

    def __init__(self, name: str, help: str, labels: Sequence[str] = ()) -> None:
        super().__init__(name, help, labels)
        self._values: dict[LabelValues, float] = {}

    def inc(self, *labels: str, amount: float = 1.0) -> None:
        """Add ``amount`` to the series for these label values."""
        key = self._key(labels)
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount

    def value(self, *labels: str) -> float:
        """The current count for these label values (0 if never incremented)."""
        return self._values.get(self._key(labels), 0.0)

    def render(self) -> list[str]:
        lines = super().render()
        with self._lock:
            items = sorted(self._values.items())
        lines += [f"{self.name}{self._label_text(k)} {_num(v)}" for k, v in items]
        return lines


class Histogram(_Family):
    """Observations counted into fixed buckets, with their sum and count."""

    kind = "histogram"

    def __init__(
        self,
        name: str,
        help: str,
        labels: Sequence[str] = (),
        buckets: Sequence[float] = DEFAULT_BUCKETS,
    ) -> None:
        super().__init__(name, help, labels)
        self.buckets = tuple(sorted(buckets))
        self._series: dict[LabelValues, list[float]] = {}

    def observe(self, value: float, *labels: str) -> None:
        """Record one observation for these label values."""
        key = self._key(labels)
        index = bisect.bisect_left(self.buckets, value)
        with self._lock:
            series = self._series.get(key)
            if series is None:
                # per-bucket counts, then +Inf, then sum
                series = self._series[key] = [0.0] * (len(self.buckets) + 2)
            series[index] += 1
            series[-1] += value

    def count(self, *labels: str) -> int:
        """How many observations were recorded for these label values."""
        series = self._series.get(self._key(labels))
        return 0 if series is None else int(sum(series[:-1]))

    def render(self) -> list[str]:
        lines = super().render()
        with self._lock:
            items = sorted((k, list(v)) for k, v in self._series.items())
        for key, series in items:
            cumulative = 0.0
            for bound, n in zip(self.buckets, series, strict=False):
                cumulative += n
                le = f'le="{_num(bound)}"'
                lines.append(f"{self.name}_bucket{self._label_text(key, le)} {_num(cumulative)}")
            cumulative += series[len(self.buckets)]
            inf = self._label_text(key, 'le="+Inf"')
            lines.append(f"{self.name}_bucket{inf} {_num(cumulative)}")
            lines.append(f"{self.name}_sum{self._label_text(key)} {_num(series[-1])}")
            lines.append(f"{self.name}_count{self._label_text(key)} {_num(cumulative)}")
        return lines


class MetricsRegistry:
    """The metric families of one process, rendered together at ``/metrics``."""

    def __init__(self) -> None:
        self._families: dict[str, _Family] = {}

    def counter(self, name: str, help: str, labels: Sequence[str] = ()) -> Counter:
        """Create (or return the existing) counter family ``name``."""
        return self._add(Counter(name, help, labels))

    def histogram(
        self,
        name: str,
        help: str,
        labels: Sequence[str] = (),
        buckets: Sequence[float] = DEFAULT_BUCKETS,
    ) -> Histogram:
        """Create (or return the existing) histogram family ``name``."""
        return self._add(Histogram(name, help, labels, buckets))

    def _add(self, family: _F) -> _F:
        existing = self._families.setdefault(family.name, family)
        if type(existing) is not type(family) or existing.labels != family.labels:
            raise ValueError(f"metric {family.name} is already registered differently")
        return existing

    def render(self) -> str:
        """Every family in the Prometheus text exposition format."""
        lines: list[str] = []
        for family in self._families.values():
            lines += family.render()
        return "\n".join(lines) + "\n"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))
