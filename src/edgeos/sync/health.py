"""How the node's work has gone since its last switch: what rollout gates judge.

- runs and failed runs: agent runs finished since the switch;
- decisions and overrides: runs finished, and people's answers that overrode the agent;
- inference p99: from the model host's latency histogram, counted from when the probe
  first saw this switch (a bucket's upper bound, as Prometheus would estimate it);
- drift: the largest population stability index of what models see (at most every few
  minutes: it reads up to 1200 observations per agent and model);
- status: ``failing`` when most runs fail, ``degraded`` when some do, a version was
  refused, or inputs drift; ``ok`` otherwise, with the detail saying why.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable

from edgeos.protocol.fleet import Health
from edgeos.state import Database
from edgeos.sync import state
from edgeos.telemetry import MetricsRegistry

LATENCY_FAMILY = "edgeos_inference_latency_seconds"
DRIFT_EVERY_S = 300.0
DRIFT_LIMIT = 0.2

_BUCKET = re.compile(LATENCY_FAMILY + r'_bucket\{.*le="([^"]+)"\} (\S+)$')


class HealthProbe:
    """Collects :class:`Health` for the sync report."""

    def __init__(
        self,
        db: Database,
        metrics: MetricsRegistry | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.db = db
        self.metrics = metrics
        self.clock = clock
        self._since = -1.0
        self._baseline: dict[float, float] = {}
        self._drift: tuple[float, float | None] = (-DRIFT_EVERY_S, None)

    def collect(self, problems: list[str] | None = None) -> Health:
        """Health since the last switch; ``problems`` (e.g. refused versions) degrade it."""
        since = state.health_since(self.db)
        latency = self._latency()
        if since != self._since:
            self._since, self._baseline = since, latency
        reader = self.db.reader()
        runs, failed = reader.execute(
            "SELECT count(*), coalesce(sum(state = 'failed'), 0) FROM runs "
            "WHERE finished_at >= ? AND state IN ('succeeded', 'failed')",
            (since,),
        ).fetchone()
        overrides = reader.execute(
            "SELECT count(*) FROM escalations WHERE state = 'answered' AND override = 1 "
            "AND answered_at >= ?",
            (since,),
        ).fetchone()[0]
        drift = self._worst_drift()
        notes = list(problems or [])
        status = "ok"
        if runs and failed / runs > 0.1:
            notes.append(f"{failed} of {runs} runs failed")
            status = "failing" if runs >= 2 and failed / runs >= 0.5 else "degraded"
        if drift is not None and drift > DRIFT_LIMIT:
            notes.append(f"input drift {drift:.2f} (PSI) above {DRIFT_LIMIT}")
        if notes and status == "ok":
            status = "degraded"
        figures = {
            "since": since, "runs": int(runs), "runs_failed": int(failed),
            "decisions": int(runs), "overrides": int(overrides),
            "inference_p99_ms": _p99_ms(latency, self._baseline), "drift": drift,
            "status": status, "detail": "; ".join(notes)[:1000] or None,
        }  # fmt: skip
        return Health.model_validate(figures)

    def _latency(self) -> dict[float, float]:
        """Cumulative observations per bucket bound, summed over every model version."""
        if self.metrics is None:
            return {}
        buckets: dict[float, float] = {}
        for line in self.metrics.render().splitlines():
            match = _BUCKET.match(line)
            if match:
                bound = float(match.group(1).replace("+Inf", "inf"))
                buckets[bound] = buckets.get(bound, 0.0) + float(match.group(2))
        return buckets

    def _worst_drift(self) -> float | None:
        now = self.clock()
        at, value = self._drift
        if now - at < DRIFT_EVERY_S:
            return value
        value = None
        pairs = (
            self.db.reader().execute("SELECT DISTINCT agent, model FROM observations").fetchall()
        )
        if pairs:
            from edgeos.agents.learning import drift

            scores = [drift(self.db, agent, model).worst for agent, model in pairs]
            known = [s for s in scores if s is not None]
            value = max(known) if known else None
        self._drift = (now, value)
        return value


def _p99_ms(now: dict[float, float], baseline: dict[float, float]) -> float | None:
    """The p99 of the observations made between ``baseline`` and ``now`` (cumulative
    buckets), as the upper bound of the bucket it falls in; None without observations."""
    bounds = sorted(now)
    counts = [now[b] - baseline.get(b, 0.0) for b in bounds]
    total = counts[-1] if counts else 0.0
    if total <= 0:
        return None
    finite = [b for b in bounds if b != float("inf")]
    for bound, cumulative in zip(bounds, counts, strict=True):
        if cumulative >= 0.99 * total:
            # Past the last finite bound, the largest one is all the histogram can say.
            return (bound if bound != float("inf") else (finite[-1] if finite else 0.0)) * 1000
    return None
