"""Counters and histograms with labels, rendered in the Prometheus text format (0.0.4).

Small on purpose: the node exposes a handful of metric families, and a dependency-free
implementation keeps an idle node light.
"""

from __future__ import annotations

import bisect
import math
import threading
from collections.abc import Callable, Sequence
from typing import TypeVar

from edgeos.telemetry.sketch import DDSketch

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
        if not all(isinstance(v, str) for v in values):
            raise ValueError(f"{self.name}: label values must be strings, got {tuple(values)}")
        return tuple(values)

    def _label_text(self, values: LabelValues, extra: str = "") -> str:
        pairs = [f'{k}="{_escape(v)}"' for k, v in zip(self.labels, values, strict=True)]
        if extra:
            pairs.append(extra)
        return "{" + ",".join(pairs) + "}" if pairs else ""

    def render(self) -> list[str]:
        help_text = self.help.replace("\\", "\\\\").replace("\n", "\\n")
        return [f"# HELP {self.name} {help_text}", f"# TYPE {self.name} {self.kind}"]


_F = TypeVar("_F", bound=_Family)


class Counter(_Family):
    """A monotonically increasing count per label set."""

    kind = "counter"

    def __init__(self, name: str, help: str, labels: Sequence[str] = ()) -> None:
        super().__init__(name, help, labels)
        self._values: dict[LabelValues, float] = {}

    def inc(self, *labels: str, amount: float = 1.0) -> None:
        """Add ``amount`` to the series for these label values."""
        if amount < 0:
            raise ValueError(
                f"{self.name} is a counter: it cannot go down (negative amount {amount})"
            )
        key = self._key(labels)
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount

    def child(self, *labels: str) -> CounterChild:
        """A handle on one series, for hot paths that increment it often."""
        key = self._key(labels)
        with self._lock:
            self._values.setdefault(key, 0.0)
        return CounterChild(self, key)

    def value(self, *labels: str) -> float:
        """The current count for these label values (0 if never incremented)."""
        return self._values.get(self._key(labels), 0.0)

    def values(self) -> dict[LabelValues, float]:
        """Every series' current count, by label values."""
        with self._lock:
            return dict(self._values)

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
        self._children: dict[LabelValues, HistogramChild] = {}
        # Sketches of the observations since the last take_window(); None until asked for.
        self._window: dict[LabelValues, DDSketch] | None = None

    def observe(self, value: float, *labels: str) -> None:
        """Record one observation for these label values."""
        self.child(*labels).observe(value)

    def child(self, *labels: str) -> HistogramChild:
        """A handle on one series, for hot paths that observe it often."""
        key = self._key(labels)
        with self._lock:
            child = self._children.get(key)
            if child is None:
                # per-bucket counts, then +Inf, then sum
                series = [0.0] * (len(self.buckets) + 2)
                child = self._children[key] = HistogramChild(self, key, series)
        return child

    def windowed(self) -> None:
        """From now on, also keep a :class:`DDSketch` of each series' observations, for
        :meth:`take_window` (the telemetry uplink's exact percentiles; buckets are too
        coarse for a p99)."""
        with self._lock:
            if self._window is None:
                self._window = {}

    def take_window(self) -> dict[LabelValues, DDSketch]:
        """The sketches of each series' observations since the previous call (or since
        :meth:`windowed`), and start new ones."""
        self._snapshot()  # folds what is buffered into the current window
        with self._lock:
            window, self._window = self._window or {}, {}
        return window

    def counts(self) -> dict[LabelValues, int]:
        """Observations recorded so far, per label values."""
        return {key: int(sum(series[:-1])) for key, series in self._snapshot()}

    def count(self, *labels: str) -> int:
        """How many observations were recorded for these label values."""
        return self.counts().get(self._key(labels), 0)

    def _snapshot(self) -> list[tuple[LabelValues, list[float]]]:
        with self._lock:
            children = list(self._children.items())
        for _, child in children:
            child.fold()
        with self._lock:
            return sorted((k, list(c._series)) for k, c in children)

    def render(self) -> list[str]:
        lines = super().render()
        items = self._snapshot()
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


class HistogramCount(_Family):
    """A counter whose values are a histogram's observation counts.

    Lets a hot path record one observation and still expose a plain request counter.
    """

    kind = "counter"

    def __init__(self, name: str, help: str, histogram: Histogram) -> None:
        super().__init__(name, help, histogram.labels)
        self.histogram = histogram

    def value(self, *labels: str) -> float:
        """The current count for these label values."""
        return float(self.histogram.count(*labels))

    def render(self) -> list[str]:
        lines = super().render()
        counts = sorted(self.histogram.counts().items())
        lines += [f"{self.name}{self._label_text(k)} {v}" for k, v in counts]
        return lines


class CounterChild:
    """One series of a counter, with its label values bound."""

    __slots__ = ("_family", "_key")

    def __init__(self, family: Counter, key: LabelValues) -> None:
        self._family = family
        self._key = key

    def inc(self, amount: float = 1.0) -> None:
        """Add ``amount`` to this series."""
        if amount < 0:
            raise ValueError(
                f"{self._family.name} is a counter: it cannot go down (negative amount {amount})"
            )
        family = self._family
        with family._lock:
            family._values[self._key] += amount


class HistogramChild:
    """One series of a histogram, with its label values bound.

    ``observe`` only appends to a buffer (atomic in CPython, so no lock on the hot path);
    the buffer is folded into the buckets when it fills up and before every read.
    """

    __slots__ = ("_append", "_family", "_key", "_pending", "_series")

    FOLD_AT = 1024

    def __init__(self, family: Histogram, key: LabelValues, series: list[float]) -> None:
        self._family = family
        self._key = key
        self._series = series
        self._pending: list[float] = []
        self._append = self._pending.append

    def observe(self, value: float) -> None:
        """Record one observation in this series."""
        self._append(value)
        if len(self._pending) >= self.FOLD_AT:
            self.fold()

    def fold(self) -> None:
        """Move buffered observations into the buckets."""
        pending = self._pending
        buckets = self._family.buckets
        with self._family._lock:
            n = len(pending)
            values = pending[:n]
            # Observations appended meanwhile sit past n and survive this deletion.
            del pending[:n]
            series = self._series
            for value in values:
                series[bisect.bisect_left(buckets, value)] += 1
            series[-1] += sum(values)
            window = self._family._window
            if window is not None and values:
                sketch = window.get(self._key)
                if sketch is None:
                    sketch = window[self._key] = DDSketch()
                sketch.extend(v for v in values if 0.0 <= v < math.inf)


class MetricsRegistry:
    """The metric families of one process, rendered together at ``/metrics``."""

    def __init__(self) -> None:
        self._families: dict[str, _Family] = {}
        self._collectors: list[Callable[[], list[str]]] = []

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

    def collector(self, collect: Callable[[], list[str]]) -> None:
        """Add a function that renders exposition lines of its own at every scrape.

        For figures that are cheaper to compute when asked than to keep up to date.
        """
        self._collectors.append(collect)

    def histogram_count(self, name: str, help: str, histogram: Histogram) -> HistogramCount:
        """A counter family that reports ``histogram``'s observation counts."""
        return self._add(HistogramCount(name, help, histogram))

    def family(self, name: str) -> object | None:
        """The family registered as ``name``, if any (callers check its type)."""
        return self._families.get(name)

    def _add(self, family: _F) -> _F:
        existing = self._families.setdefault(family.name, family)
        if (
            type(existing) is not type(family)
            or existing.labels != family.labels
            or getattr(existing, "buckets", None) != getattr(family, "buckets", None)
            or getattr(existing, "histogram", None) is not getattr(family, "histogram", None)
        ):
            raise ValueError(f"metric {family.name} is already registered differently")
        return existing

    def render(self) -> str:
        """Every family in the Prometheus text exposition format."""
        lines: list[str] = []
        for family in list(self._families.values()):
            lines += family.render()
        for collect in list(self._collectors):
            lines += collect()
        return "\n".join(lines) + "\n"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))
