"""Bytes per device per day of the demo agent's standard telemetry, edgeos vs OTLP/JSON.

    python bench/telemetry.py [--hours 24] [--seed 1]

A day of the demo's shapes, minute by minute: the inventory agent runs on every
``pos.sales`` event (about one a second, busier in the day than at night); each run
scores 12 SKUs with the stockout-risk model and recalls memory (the embedding model) for
the SKUs at risk; a few runs escalate to a person, who sometimes overrides the model;
one run in a few hundred fails and the next success recovers. These are written to a
real node database and the model host's latency histogram, and the real uplink turns
them into one-minute KPI records (per agent and per model version, latencies as
sketches) and batches (JSON, zstd) at its default interval and caps.

Side by side, the same figures as OTLP/JSON (``ExportMetricsServiceRequest``, the
proto3 JSON mapping: 64-bit integers as strings, enums as numbers), without batching:
one request per metric per minute, latencies as exponential histograms at scale 6
(about the sketches' 1 % accuracy), uncompressed, as an OTLP/HTTP exporter with JSON
sends them. Also shown, for fairness: one request per minute with every metric, and
that gzip-compressed. Bytes are request bodies (HTTP headers excluded on both sides).
Goal: edgeos at least 10x smaller than OTLP/JSON without batching, and under 1 MB.
"""

from __future__ import annotations

import argparse
import gzip
import math
import sys
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import orjson
from rich.console import Console
from rich.table import Table

from edgeos.protocol.telemetry import MINUTE_S
from edgeos.state import Database
from edgeos.sync.telemetry_uplink import TelemetryUplink, UplinkConfig
from edgeos.telemetry.metrics import MetricsRegistry

GOAL_RATIO = 10.0
GOAL_BYTES = 1_000_000
DAY0 = 1_798_761_600  # a UTC midnight
AGENT, MODELS = "inventory", (("stockout-risk", "4"), ("all-minilm-l6-v2", "1"))
SKUS_PER_RUN = 12


class Clock:
    """The bench's wall clock, moved a minute at a time."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@dataclass
class Minute:
    """What happened in one minute: the figures both formats carry."""

    start: int
    decisions: list[float]
    failed: int
    answered: int
    overrides: int
    cost: float
    inference: dict[tuple[str, str], list[float]]


def simulate(minute: int, rng: np.random.Generator) -> Minute:
    """One minute of the demo: load follows the store's day."""
    hour = (minute - DAY0) / 3600 % 24
    load = 0.35 + 0.65 * max(0.0, math.sin(math.pi * (hour - 6) / 15)) if 6 <= hour < 21 else 0.35
    runs = int(rng.poisson(60 * load))
    decisions = rng.lognormal(math.log(0.045), 0.35, runs).tolist()
    escalated = int(rng.binomial(runs, 0.05))
    at_risk = int(rng.binomial(runs * SKUS_PER_RUN, 0.08))
    return Minute(
        start=minute,
        decisions=decisions,
        failed=int(rng.binomial(runs, 0.004)),
        answered=escalated,
        overrides=int(rng.binomial(escalated, 0.3)),
        cost=round(runs * 0.00012, 6),
        inference={
            MODELS[0]: rng.lognormal(math.log(0.00018), 0.25, runs * SKUS_PER_RUN).tolist(),
            MODELS[1]: rng.lognormal(math.log(0.0061), 0.2, at_risk).tolist(),
        },
    )


def record(db: Database, m: Minute, latency: Any) -> None:
    """Write the minute where the node keeps it: runs, escalations, the latency histogram."""
    rows, escalations = [], []
    for i, seconds in enumerate(m.decisions):
        done = m.start + (i + 0.5) * MINUTE_S / max(1, len(m.decisions))
        state = "failed" if i < m.failed else "succeeded"
        run_id = str(uuid.uuid4())
        rows.append((run_id, AGENT, state, done - seconds, done, done, m.cost / len(m.decisions)))
        if i < m.answered:
            escalations.append((str(uuid.uuid4()), run_id, done, int(i < m.overrides)))
    with db.transaction() as conn:
        conn.executemany(
            "INSERT INTO runs (id, agent, agent_version, trigger, input, state, seed, created_at,"
            " updated_at, finished_at, cost) VALUES (?, ?, '1.0', 'event', '{}', ?, 0, ?, ?, ?, ?)",
            rows,
        )
        conn.executemany(
            "INSERT INTO escalations (id, run_id, step, question, options, default_choice, "
            "deadline, state, answered_at, override) VALUES (?, ?, 'reason', 'q', '[]', 'a', 0, "
            "'answered', ?, ?)",
            escalations,
        )
    for (model, version), values in m.inference.items():
        child = latency.child(model, version)
        for value in values:
            child.observe(value)


def edgeos_bytes(minutes: list[Minute], workdir: Path) -> tuple[int, int, int]:
    """Compressed batch bytes the real uplink sends for these minutes; (bytes, batches,
    KPI records)."""
    clock = Clock(minutes[0].start)
    registry = MetricsRegistry()
    latency = registry.histogram(
        "edgeos_inference_latency_seconds", "Inference latency.", ("model", "version")
    )
    config = UplinkConfig()
    device_id = str(uuid.UUID(int=1))
    sent = batches = records = 0
    with Database(workdir / "node.db") as db:
        uplink = TelemetryUplink(db, config, metrics=registry, clock=clock)
        uplink.collect()  # the first start: from this minute on
        for m in minutes:
            record(db, m, latency)
            clock.now = m.start + MINUTE_S
            records += uplink.collect()
            while (batch := uplink.next_batch(device_id)) is not None:
                uplink._spent(len(batch.body))  # what send() counts before the bytes leave
                uplink.buffer.acknowledge(batch.seq)
                sent += len(batch.body)
                batches += 1
    return sent, batches, records


# -- OTLP/JSON -------------------------------------------------------------------------------

OTLP_SCALE = 6  # base 2**(2**-6): 1.1 % relative error, about the sketches' 1 %


def _attrs(**pairs: str) -> list[dict[str, Any]]:
    return [{"key": k, "value": {"stringValue": v}} for k, v in pairs.items()]


def _exp_histogram(values: list[float]) -> dict[str, Any]:
    factor = 2**OTLP_SCALE / math.log(2)
    indexes = [math.ceil(math.log(v) * factor) - 1 for v in values if v > 0]
    lo = min(indexes) if indexes else 0
    counts = [0] * ((max(indexes) - lo + 1) if indexes else 0)
    for i in indexes:
        counts[i - lo] += 1
    point: dict[str, Any] = {
        "count": str(len(values)), "sum": sum(values), "scale": OTLP_SCALE,
        "zeroCount": str(len(values) - len(indexes)),
        "positive": {"offset": lo, "bucketCounts": [str(c) for c in counts]},
    }  # fmt: skip
    if values:
        point.update(min=min(values), max=max(values))
    return point


def otlp_metrics(m: Minute) -> list[dict[str, Any]]:
    """The minute's figures as OTLP metrics (delta temporality, one data point each)."""
    start, end = str(m.start * 10**9), str((m.start + MINUTE_S) * 10**9)
    agent = _attrs(agent=AGENT)

    def point(attrs: list[dict[str, Any]], **value: Any) -> dict[str, Any]:
        return {"attributes": attrs, "startTimeUnixNano": start, "timeUnixNano": end, **value}

    def counter(
        name: str, unit: str, value: int | float, attrs: list[dict[str, Any]]
    ) -> dict[str, Any]:
        v = {"asInt": str(value)} if isinstance(value, int) else {"asDouble": value}
        return {"name": name, "unit": unit, "sum": {"dataPoints": [point(attrs, **v)],
                "aggregationTemporality": 1, "isMonotonic": True}}  # fmt: skip

    def histogram(name: str, values: list[float], attrs: list[dict[str, Any]]) -> dict[str, Any]:
        return {"name": name, "unit": "s", "exponentialHistogram": {
            "dataPoints": [point(attrs, **_exp_histogram(values))], "aggregationTemporality": 1}}  # fmt: skip

    runs = len(m.decisions)
    metrics = [
        histogram("edgeos.agent.decision.duration", m.decisions[m.failed :], agent),
        counter("edgeos.agent.runs", "{run}", runs, agent),
        counter("edgeos.agent.runs.succeeded", "{run}", runs - m.failed, agent),
        counter("edgeos.agent.runs.failed", "{run}", m.failed, agent),
        counter("edgeos.agent.escalations.answered", "{answer}", m.answered, agent),
        counter("edgeos.agent.escalations.overridden", "{answer}", m.overrides, agent),
        counter("edgeos.agent.cost", "{credit}", m.cost, agent),
    ]
    for (model, version), values in m.inference.items():
        if values:
            attrs = _attrs(model=model, version=version)
            metrics.append(histogram("edgeos.model.inference.duration", values, attrs))
    return metrics


def otlp_request(metrics: list[dict[str, Any]], device_id: str) -> bytes:
    resource = {"attributes": _attrs(**{"service.name": "edgeos-node",
                "service.version": "0.1.0", "host.name": "store-0042",
                "device.id": device_id})}  # fmt: skip
    doc = {"resourceMetrics": [{"resource": resource, "scopeMetrics": [
        {"scope": {"name": "edgeos", "version": "0.1.0"}, "metrics": metrics}]}]}  # fmt: skip
    return orjson.dumps(doc)


def otlp_bytes(minutes: list[Minute]) -> dict[str, tuple[int, int]]:
    """(bytes, requests) of the three OTLP/JSON ways of sending the minutes."""
    device_id = str(uuid.UUID(int=1))
    unbatched = per_minute = gzipped = requests = 0
    for m in minutes:
        metrics = otlp_metrics(m)
        for metric in metrics:
            unbatched += len(otlp_request([metric], device_id))
            requests += 1
        body = otlp_request(metrics, device_id)
        per_minute += len(body)
        gzipped += len(gzip.compress(body))
    n = len(minutes)
    return {
        "OTLP/JSON, a request per metric per minute": (unbatched, requests),
        "OTLP/JSON, a request per minute": (per_minute, n),
        "OTLP/JSON, a request per minute, gzip": (gzipped, n),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hours", type=float, default=24.0, help="simulated hours (24: a day)")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    console = Console()
    rng = np.random.default_rng(args.seed)
    count = max(2, int(args.hours * 60))
    with console.status(f"simulating {count} minutes of the demo agent"):
        minutes = [simulate(DAY0 + i * MINUTE_S, rng) for i in range(count)]
        with tempfile.TemporaryDirectory() as tmp:
            ours, batches, records = edgeos_bytes(minutes, Path(tmp))
        theirs = otlp_bytes(minutes)
    per_day = 24 * 60 / count
    table = Table(title=f"Telemetry of one device, the demo agent, one-minute resolution "
                  f"({count} minutes measured, scaled to a day)")  # fmt: skip
    table.add_column("format")
    table.add_column("requests/day", justify="right")
    table.add_column("bytes/day", justify="right")
    table.add_column("vs edgeos", justify="right")
    table.add_row("edgeos uplink (KPI records, sketches, zstd batches)",
                  f"{batches * per_day:,.0f}", f"{ours * per_day:,.0f}", "1.0x")  # fmt: skip
    for label, (size, requests) in theirs.items():
        table.add_row(label, f"{requests * per_day:,.0f}", f"{size * per_day:,.0f}",
                      f"{size / ours:,.1f}x")  # fmt: skip
    console.print(table)
    unbatched = theirs["OTLP/JSON, a request per metric per minute"][0]
    ratio, daily = unbatched / ours, ours * per_day
    console.print(f"{records} KPI records in {batches} batches; "
                  f"{daily / (24 * 60):,.0f} bytes a minute")  # fmt: skip
    met = ratio >= GOAL_RATIO and daily < GOAL_BYTES
    console.print(
        f"goal: at least {GOAL_RATIO:.0f}x smaller than OTLP/JSON without batching and under "
        f"1 MB a day: {ratio:,.1f}x, {daily / 1e6:.2f} MB: {'met' if met else 'NOT met'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
