"""Learning from what agents did: feedback as a training set, and drift in what models see.

Drift is measured with the population stability index (PSI) between a reference window
(older observations) and the most recent ones, for the model's confidence and for each
input feature. Rule of thumb: under 0.1 stable, 0.1 to 0.2 moderate, over 0.2 a shift
worth a person's look; edgeos raises its drift signal above ``threshold`` (0.2).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from edgeos.state import Database

if TYPE_CHECKING:
    import numpy as np

    Array = np.ndarray[Any, Any]

# numpy is imported by the functions that compute, not here: the node imports this module
# (for its /metrics collector) at start-up, and an idle node must not load numpy.


def psi(reference: Array, recent: Array, bins: int = 10) -> float:
    """Population stability index of ``recent`` against ``reference`` (1-D samples).

    Bin edges are the reference's quantiles, so each bin holds about the same share of
    the reference; empty bins get a small floor so the index stays finite.
    """
    import numpy as np

    reference = np.asarray(reference, dtype=np.float64)
    recent = np.asarray(recent, dtype=np.float64)
    if reference.size == 0 or recent.size == 0:
        raise ValueError("PSI needs samples in both windows")
    edges = np.unique(np.quantile(reference, np.linspace(0, 1, bins + 1)))
    if edges.size < 2:  # a constant reference: any change at all is a shift
        same = np.mean(recent == reference[0])
        return 0.0 if same == 1.0 else float((1 - same) * np.log((1 - same) / 1e-4))
    edges[0], edges[-1] = -np.inf, np.inf
    expected = np.histogram(reference, edges)[0] / reference.size
    actual = np.histogram(recent, edges)[0] / recent.size
    expected = np.clip(expected, 1e-4, None)
    actual = np.clip(actual, 1e-4, None)
    return float(np.sum((actual - expected) * np.log(actual / expected)))


@dataclass(frozen=True)
class DriftReport:
    """Drift of one agent's use of one model."""

    agent: str
    model: str
    reference_n: int
    recent_n: int
    confidence_psi: float | None
    feature_psi: list[float] = field(default_factory=list)
    threshold: float = 0.2

    @property
    def worst(self) -> float | None:
        """The largest PSI found (confidence or any feature)."""
        values = [v for v in (self.confidence_psi, *self.feature_psi) if v is not None]
        return max(values) if values else None

    @property
    def drifting(self) -> bool:
        """True when any PSI is above the threshold: the drift signal."""
        worst = self.worst
        return worst is not None and worst > self.threshold


def drift(
    db: Database,
    agent: str,
    model: str,
    *,
    recent: int = 200,
    reference: int = 1000,
    threshold: float = 0.2,
) -> DriftReport:
    """Compare the last ``recent`` observations with the ``reference`` before them."""
    rows = (
        db.reader()
        .execute(
            "SELECT confidence, inputs FROM observations WHERE agent = ? AND model = ? "
            "ORDER BY id DESC LIMIT ?",
            (agent, model, recent + reference),
        )
        .fetchall()
    )
    rows.reverse()
    new, old = rows[-recent:], rows[: max(0, len(rows) - recent)]
    if len(new) < min(recent, 30) or len(old) < 30:
        return DriftReport(agent, model, len(old), len(new), None, [], threshold)
    import numpy as np

    conf_old = np.array([r[0] for r in old], dtype=np.float64)
    conf_new = np.array([r[0] for r in new], dtype=np.float64)
    x_old = np.stack([np.frombuffer(r[1], dtype=np.float32) for r in old])
    x_new = np.stack([np.frombuffer(r[1], dtype=np.float32) for r in new])
    features = [psi(x_old[:, i], x_new[:, i]) for i in range(x_old.shape[1])]
    return DriftReport(
        agent, model, len(old), len(new), psi(conf_old, conf_new), features, threshold
    )


def models_observed(db: Database, agent: str) -> list[str]:
    """Models an agent has classified with."""
    rows = db.reader().execute(
        "SELECT DISTINCT model FROM observations WHERE agent = ? ORDER BY model", (agent,)
    )
    return [r[0] for r in rows]


def export_feedback(db: Database, agent: str) -> Iterator[str]:
    """The agent's feedback as JSON lines: one training example per line."""
    rows = db.reader().execute(
        "SELECT run_id, at, decision, outcome, correction FROM feedback WHERE agent = ? "
        "ORDER BY id",
        (agent,),
    )
    for run_id, at, decision, outcome, correction in rows:
        yield json.dumps(
            {
                "run_id": run_id,
                "at": at,
                "decision": json.loads(decision),
                "outcome": None if outcome is None else json.loads(outcome),
                "correction": None if correction is None else json.loads(correction),
            },
            sort_keys=True,
        )
