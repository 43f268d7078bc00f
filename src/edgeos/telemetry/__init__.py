"""Metrics, tracing and the telemetry uplink. Imports nothing else from edgeos."""

from edgeos.telemetry.metrics import (
    Counter,
    CounterChild,
    Histogram,
    HistogramChild,
    MetricsRegistry,
)

__all__ = ["Counter", "CounterChild", "Histogram", "HistogramChild", "MetricsRegistry"]
