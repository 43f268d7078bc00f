"""Metrics, tracing and the telemetry uplink. Imports nothing else from edgeos."""

from edgeos.telemetry.metrics import Counter, Histogram, MetricsRegistry

__all__ = ["Counter", "Histogram", "MetricsRegistry"]
