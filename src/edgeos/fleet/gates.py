"""Health gates: when a rollout wave may go on.

A gate is ``METRIC<=LIMIT``. The metrics come from the devices' health reports:

- ``failure_rate``: failed runs / runs, summed over the devices
- ``override_rate``: human overrides / decisions, summed over the devices
- ``p99_ms``: the worst device's inference p99 latency
- ``drift``: the worst device's drift score

The limit is absolute (``failure_rate<=0.05``), an increase over the baseline
(``failure_rate<=+0.02``) or a ratio to it (``p99_ms<=x1.5``). The wave is the devices
running the new version; the baseline is the target devices still on another one.

A gate judges only what it has figures for: a metric nobody reported, or a relative limit
with no baseline to compare with, cannot fail, and the verdict says so.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal, cast

from edgeos.errors import ConfigError
from edgeos.protocol.fleet import Health

Metric = Literal["failure_rate", "p99_ms", "override_rate", "drift"]
METRICS: tuple[Metric, ...] = ("failure_rate", "p99_ms", "override_rate", "drift")
LimitMode = Literal["absolute", "increase", "ratio"]

_GATE = re.compile(r"^\s*([a-z0-9_]+)\s*<=\s*([+x]?)\s*(\d+(?:\.\d+)?|\.\d+)\s*$")
_MODES: dict[str, LimitMode] = {"": "absolute", "+": "increase", "x": "ratio"}
# Float sums such as 0.02 + 0.05 land a hair above 0.07: a value equal to its limit passes.
_EPSILON = 1e-9


@dataclass(frozen=True)
class Gate:
    """A parsed gate; ``text`` is its canonical spelling."""

    metric: Metric
    mode: LimitMode
    limit: float

    @property
    def text(self) -> str:
        """The gate as an operator writes it."""
        prefix = {"absolute": "", "increase": "+", "ratio": "x"}[self.mode]
        return f"{self.metric}<={prefix}{self.limit:g}"


def parse_gate(text: str) -> Gate:
    """The gate ``text`` describes; ConfigError naming the gate and what is wrong otherwise."""
    match = _GATE.match(text)
    if not match:
        raise ConfigError(
            f"gate {text!r}: write METRIC<=LIMIT, e.g. failure_rate<=0.05, "
            "failure_rate<=+0.02 or p99_ms<=x1.5"
        )
    metric, prefix, number = match.groups()
    if metric not in METRICS:
        raise ConfigError(f"gate {text!r}: unknown metric {metric!r}; use {', '.join(METRICS)}")
    limit = float(number)
    if not math.isfinite(limit):
        raise ConfigError(f"gate {text!r}: the limit must be a finite number")
    return Gate(metric=cast(Metric, metric), mode=_MODES[prefix], limit=limit)


def parse_gates(texts: Iterable[str]) -> list[Gate]:
    """Every gate parsed; the first malformed one raises ConfigError."""
    return [parse_gate(text) for text in texts]


@dataclass(frozen=True)
class Metrics:
    """The gate metrics of a set of devices; None where no device reported the figure."""

    devices: int
    failure_rate: float | None
    p99_ms: float | None
    override_rate: float | None
    drift: float | None

    def get(self, metric: Metric) -> float | None:
        """One metric by name."""
        value: float | None = getattr(self, metric)
        return value


def metrics_of(healths: Iterable[Health]) -> Metrics:
    """The metrics of devices that reported these health summaries."""
    items = list(healths)
    runs = sum(h.runs for h in items)
    decisions = sum(h.decisions for h in items)
    p99s = [h.inference_p99_ms for h in items if h.inference_p99_ms is not None]
    drifts = [h.drift for h in items if h.drift is not None]
    return Metrics(
        devices=len(items),
        failure_rate=sum(h.runs_failed for h in items) / runs if runs else None,
        p99_ms=max(p99s) if p99s else None,
        override_rate=sum(h.overrides for h in items) / decisions if decisions else None,
        drift=max(drifts) if drifts else None,
    )


@dataclass(frozen=True)
class GateResult:
    """What one gate said about one wave."""

    gate: str
    passed: bool
    #: True when the gate could not judge (no figures, or no baseline for a relative limit).
    undecided: bool
    reason: str
    value: float | None
    baseline: float | None
    limit: float | None


@dataclass(frozen=True)
class Verdict:
    """Every gate's result for one wave: it passes when no gate failed."""

    wave: int
    results: tuple[GateResult, ...]

    @property
    def passed(self) -> bool:
        """True when no gate failed (undecided gates do not fail)."""
        return all(r.passed for r in self.results)

    @property
    def reason(self) -> str:
        """The failing gates' reasons, or a summary when all passed."""
        failed = [r.reason for r in self.results if not r.passed]
        if failed:
            return "; ".join(failed)
        if not self.results:
            return f"wave {self.wave}: no gates"
        return "; ".join(r.reason for r in self.results)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready form (for the audit log and the status API)."""
        return {
            "wave": self.wave,
            "passed": self.passed,
            "reason": self.reason,
            "gates": [asdict(r) for r in self.results],
        }


def evaluate(
    gates: Sequence[Gate], *, wave: int, new: Metrics, baseline: Metrics | None
) -> Verdict:
    """Judge wave number ``wave`` (1-based) running the new version against ``baseline``.

    ``baseline`` is None when no target device is left on another version (the last wave
    holds them all): relative limits then cannot be judged and only absolute ones apply.
    """
    return Verdict(wave, tuple(_judge(g, wave, new, baseline) for g in gates))


def _judge(gate: Gate, wave: int, new: Metrics, baseline: Metrics | None) -> GateResult:
    value = new.get(gate.metric)
    base = baseline.get(gate.metric) if baseline is not None else None

    def undecided(why: str) -> GateResult:
        return GateResult(
            gate.text, True, True, f"{gate.text}: {why}; cannot fail", value, base, None
        )

    if value is None:
        return undecided(f"no device in wave {wave} reported {gate.metric}")
    if gate.mode == "absolute":
        limit = gate.limit
        bound = _fmt(gate.metric, limit)
    else:
        if baseline is None:
            return undecided("no baseline (every target device runs the new version)")
        if base is None:
            return undecided(f"no baseline device reported {gate.metric}")
        if gate.mode == "increase":
            limit = base + gate.limit
            bound = f"baseline {_fmt(gate.metric, base)} + {_fmt(gate.metric, gate.limit)}"
        else:
            limit = base * gate.limit
            bound = f"baseline {_fmt(gate.metric, base)} x {gate.limit:g}"
    passed = value <= limit + _EPSILON
    shown = f"{gate.metric} {_fmt(gate.metric, value)} in wave {wave}"
    reason = f"{shown} {'<=' if passed else '>'} {bound}"
    return GateResult(gate.text, passed, False, reason, value, base, limit)


def _fmt(metric: Metric, value: float) -> str:
    text = f"{value:.1f}" if metric == "p99_ms" else f"{value:.2f}"
    # Few decimals read well, but must not make 0.071 look like the limit 0.07.
    if abs(float(text) - value) >= _EPSILON:
        text = f"{value:.4g}"
    return f"{text} ms" if metric == "p99_ms" else text
