"""A minute of KPIs per agent and per model version, as the uplink sends them.

Read from the records the node keeps anyway, the same ones :mod:`edgeos.agents.kpis` and
the health probe read: finished runs (decision latency, success, cost, recovery), answered
escalations (overrides), observations (drift, at most every few minutes), and the model
host's inference latency histogram, which keeps a sketch of what it observed since the
last minute was collected (:meth:`edgeos.telemetry.metrics.Histogram.take_window`).
"""

from __future__ import annotations

import base64
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

from edgeos.agents.kpis import times_to_recovery
from edgeos.protocol.telemetry import MINUTE_S, KpiRecord
from edgeos.state import Database
from edgeos.sync.health import DRIFT_EVERY_S, LATENCY_FAMILY
from edgeos.telemetry.metrics import Counter, Histogram, MetricsRegistry
from edgeos.telemetry.sketch import DDSketch

ERRORS_FAMILY = "edgeos_inference_errors_total"
_T = TypeVar("_T", Histogram, Counter)


def encode_sketch(sketch: DDSketch) -> str:
    """A sketch as it travels in a KPI record."""
    return base64.b64encode(sketch.to_bytes()).decode()


@dataclass
class KpiCollector:
    """Turns the node's records into :class:`KpiRecord` rows, one closed minute at a time."""

    db: Database
    metrics: MetricsRegistry | None = None
    clock: Callable[[], float] = time.time
    _drift_at: float = -DRIFT_EVERY_S
    _errors_seen: dict[tuple[str, ...], float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        latency = self._family(LATENCY_FAMILY, Histogram)
        if latency is not None:
            latency.windowed()

    def _family(self, name: str, kind: type[_T]) -> _T | None:
        found = self.metrics.family(name) if self.metrics is not None else None
        return found if isinstance(found, kind) else None

    def minute(self, start: int) -> list[KpiRecord]:
        """The records of the minute beginning at ``start`` (Unix seconds, a multiple of 60)."""
        end = start + MINUTE_S
        reader = self.db.reader()
        rows = reader.execute(
            "SELECT agent, state, created_at, finished_at, cost FROM runs WHERE finished_at >= ? "
            "AND finished_at < ? AND state IN ('succeeded', 'failed', 'cancelled') "
            "ORDER BY finished_at",
            (start, end),
        ).fetchall()
        answers = reader.execute(
            "SELECT r.agent, count(*), coalesce(sum(e.override), 0) FROM escalations e "
            "JOIN runs r ON r.id = e.run_id WHERE e.state = 'answered' AND e.answered_at >= ? "
            "AND e.answered_at < ? GROUP BY r.agent",
            (start, end),
        ).fetchall()
        by_agent: dict[str, KpiRecord] = {}

        def record(agent: str) -> KpiRecord:
            if agent not in by_agent:
                by_agent[agent] = KpiRecord(minute=start, agent=agent)
            return by_agent[agent]

        sketches: dict[str, DDSketch] = {}
        finished: dict[str, list[tuple[str, float | None]]] = {}
        for agent, state, created, done, cost in rows:
            kpi = record(agent)
            kpi.runs += 1
            kpi.succeeded += state == "succeeded"
            kpi.failed += state == "failed"
            kpi.cost += float(cost)
            finished.setdefault(agent, []).append((state, done))
            if state == "succeeded":
                sketches.setdefault(agent, DDSketch()).add(max(0.0, done - created))
        for agent, runs in finished.items():
            recovered = times_to_recovery(runs, _unrecovered_failure(self.db, agent, start))
            by_agent[agent].recoveries = len(recovered)
            by_agent[agent].recovery_s = sum(recovered)
        for agent, sketch in sketches.items():
            by_agent[agent].decision = encode_sketch(sketch)
        for agent, answered, overrides in answers:
            kpi = record(agent)
            kpi.answered, kpi.overrides = int(answered), int(overrides)
        for agent, value in self._drift().items():
            record(agent).drift = value
        return [*by_agent.values(), *self._models(start)]

    def _models(self, start: int) -> list[KpiRecord]:
        """Per model version: the inference latencies since the last call, and errors."""
        latency = self._family(LATENCY_FAMILY, Histogram)
        window: dict[tuple[str, ...], DDSketch] = {}
        if latency is not None:
            latency.windowed()  # a host made after this collector: from now on
            window = latency.take_window()
        errors = self._family(ERRORS_FAMILY, Counter)
        failed: dict[tuple[str, ...], int] = {}
        if errors is not None:
            for key, total in errors.values().items():
                delta = total - self._errors_seen.get(key, 0.0)
                self._errors_seen[key] = total
                if delta > 0:
                    failed[key] = int(delta)
        records = []
        for key in sorted(set(window) | set(failed)):
            model, version = (*key, "", "")[:2]
            sketch = window.get(key)
            records.append(
                KpiRecord(
                    minute=start, model=model, version=version, errors=failed.get(key, 0),
                    inference=encode_sketch(sketch) if sketch is not None and sketch.count else None,
                )
            )  # fmt: skip
        return records

    def _drift(self) -> dict[str, float]:
        """Each agent's largest drift over its models, every DRIFT_EVERY_S (else nothing)."""
        now = self.clock()
        if now - self._drift_at < DRIFT_EVERY_S:
            return {}
        self._drift_at = now
        pairs = self.db.reader().execute("SELECT DISTINCT agent, model FROM observations")
        worst: dict[str, float] = {}
        pairs_list = pairs.fetchall()
        if not pairs_list:
            return worst
        from edgeos.agents.learning import drift  # numpy: only when there is something

        for agent, model in pairs_list:
            value = drift(self.db, agent, model).worst
            if value is not None:
                worst[agent] = max(value, worst.get(agent, 0.0))
        return worst


def _unrecovered_failure(db: Database, agent: str, before: float) -> float | None:
    """When the agent's failures still unrecovered at ``before`` began, if any: walks back
    from ``before`` to the last success (the index on finished_at keeps that short)."""
    rows = db.reader().execute(
        # "+agent": walk the finished_at index backwards, not all the agent's runs.
        "SELECT state, finished_at FROM runs WHERE finished_at < ? AND +agent = ? "
        "AND state IN ('succeeded', 'failed') ORDER BY finished_at DESC",
        (before, agent),
    )
    began = None
    for state, finished in rows:
        if state == "succeeded":
            break
        began = float(finished)
    return began
