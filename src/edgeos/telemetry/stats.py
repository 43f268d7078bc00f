"""Latency summaries: the percentiles every report in edgeos speaks in."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class LatencySummary:
    """Percentiles of a latency sample, in milliseconds."""

    count: int
    mean_ms: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    max_ms: float

    @classmethod
    def of(cls, seconds: Sequence[float]) -> LatencySummary:
        """Summarise latencies given in seconds."""
        if len(seconds) == 0:
            raise ValueError("no latencies to summarise")
        import numpy as np  # here, not at module level: the node imports this module idle

        ms = np.asarray(seconds, dtype=np.float64) * 1000.0
        p50, p95, p99 = np.percentile(ms, [50, 95, 99])
        return cls(len(ms), float(ms.mean()), float(p50), float(p95), float(p99), float(ms.max()))


def time_calls(
    fn: Callable[[], object],
    *,
    iterations: int,
    warmup: int = 10,
    max_seconds: float | None = None,
) -> list[float]:
    """Call ``fn`` repeatedly and return each call's wall time in seconds.

    Stops early after ``max_seconds`` (with at least a few samples) so a slow model
    cannot stall a report.
    """
    for _ in range(warmup):
        fn()
    samples: list[float] = []
    deadline = None if max_seconds is None else time.perf_counter() + max_seconds
    clock = time.perf_counter
    for _ in range(iterations):
        start = clock()
        fn()
        end = clock()
        samples.append(end - start)
        if deadline is not None and end > deadline and len(samples) >= 5:
            break
    return samples
