"""The figures an operator judges an agent by, measured from the node's own records.

End-to-end decision latency (p50, p99), task success rate, human override rate, cost per
decision and mean time to recovery (from a failed run to the next success).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from edgeos.agents.learning import drift, models_observed
from edgeos.state import Database
from edgeos.telemetry.stats import LatencySummary


@dataclass(frozen=True)
class AgentKPIs:
    """One agent's figures over its most recent finished runs."""

    agent: str
    finished: int
    succeeded: int
    failed: int
    latency: LatencySummary | None
    answered_by_people: int
    overrides: int
    total_cost: float
    recovery_seconds: list[float]
    open_escalations: int

    @property
    def success_rate(self) -> float | None:
        """Succeeded over finished (cancelled runs excluded)."""
        decided = self.succeeded + self.failed
        return self.succeeded / decided if decided else None

    @property
    def override_rate(self) -> float | None:
        """Answers by people that differed from the agent's proposal, over all their answers."""
        return self.overrides / self.answered_by_people if self.answered_by_people else None

    @property
    def cost_per_decision(self) -> float | None:
        """Model cost per finished run."""
        return self.total_cost / self.finished if self.finished else None

    @property
    def mttr_seconds(self) -> float | None:
        """Mean time from a failed run to the next successful one."""
        if not self.recovery_seconds:
            return None
        return sum(self.recovery_seconds) / len(self.recovery_seconds)

    def rows(self) -> list[tuple[str, str]]:
        """Labelled, formatted figures for a table."""

        def pct(v: float | None) -> str:
            return "n/a" if v is None else f"{v:.1%}"

        lat = self.latency
        return [
            ("finished runs", f"{self.finished} ({self.succeeded} succeeded, {self.failed} failed)"),
            ("decision latency p50", "n/a" if lat is None else f"{lat.p50_ms:.1f} ms"),
            ("decision latency p99", "n/a" if lat is None else f"{lat.p99_ms:.1f} ms"),
            ("task success rate", pct(self.success_rate)),
            ("human override rate", f"{pct(self.override_rate)} of {self.answered_by_people} answers"),
            ("cost per decision", "n/a" if self.cost_per_decision is None else f"{self.cost_per_decision:.5f}"),
            ("mean time to recovery", "n/a" if self.mttr_seconds is None else f"{self.mttr_seconds:.1f} s"),
            ("open escalations", str(self.open_escalations)),
        ]  # fmt: skip


def times_to_recovery(
    finished: list[tuple[str, float | None]], failed_at: float | None = None
) -> list[float]:
    """Times from a failure to the next success, over ``(state, finished_at)`` of runs in
    the order they finished; ``failed_at`` is a failure still unrecovered before them."""
    recovery: list[float] = []
    for state, at in finished:
        if state == "failed" and failed_at is None:
            failed_at = at
        elif state == "succeeded" and failed_at is not None and at is not None:
            recovery.append(at - failed_at)
            failed_at = None
    return recovery


def agent_kpis(db: Database, agent: str, window: int = 1000) -> AgentKPIs:
    """Figures over the agent's last ``window`` finished runs."""
    conn = db.reader()
    rows = conn.execute(
        "SELECT state, created_at, finished_at, cost FROM runs WHERE agent = ? AND "
        "state IN ('succeeded', 'failed', 'cancelled') ORDER BY id DESC LIMIT ?",
        (agent, window),
    ).fetchall()
    rows.reverse()
    latencies = [f - c for s, c, f, _ in rows if s == "succeeded" and f is not None]
    recovery = times_to_recovery([(state, finished) for state, _, finished, _ in rows])
    answered, overrides = conn.execute(
        "SELECT count(*), coalesce(sum(e.override), 0) FROM escalations e JOIN runs r "
        "ON r.id = e.run_id WHERE r.agent = ? AND e.state = 'answered'",
        (agent,),
    ).fetchone()
    open_count = conn.execute(
        "SELECT count(*) FROM escalations e JOIN runs r ON r.id = e.run_id "
        "WHERE r.agent = ? AND e.state = 'open'",
        (agent,),
    ).fetchone()[0]
    return AgentKPIs(
        agent=agent,
        finished=len(rows),
        succeeded=sum(1 for r in rows if r[0] == "succeeded"),
        failed=sum(1 for r in rows if r[0] == "failed"),
        latency=LatencySummary.of(latencies) if latencies else None,
        answered_by_people=int(answered),
        overrides=int(overrides),
        total_cost=sum(r[3] for r in rows),
        recovery_seconds=recovery,
        open_escalations=int(open_count),
    )


_GAUGES = (
    ("edgeos_agent_success_ratio", "Succeeded over finished runs, per agent.", "success_rate"),
    ("edgeos_agent_override_ratio", "Human answers that overrode the agent.", "override_rate"),
    ("edgeos_agent_cost_per_decision", "Model cost per finished run.", "cost_per_decision"),
    ("edgeos_agent_mttr_seconds", "Mean time from a failed run to the next success.",
     "mttr_seconds"),
)  # fmt: skip


def agent_metrics(db: Database) -> Callable[[], list[str]]:
    """A metrics collector: every agent's KPIs in the Prometheus text format."""

    def collect() -> list[str]:
        names = [r[0] for r in db.reader().execute("SELECT name FROM agents ORDER BY name")]
        kpis = [agent_kpis(db, name) for name in names]
        lines = [
            "# HELP edgeos_agent_decision_latency_seconds End-to-end decision latency.",
            "# TYPE edgeos_agent_decision_latency_seconds summary",
        ]
        for k in kpis:
            if k.latency is not None:
                for q, ms in (("0.5", k.latency.p50_ms), ("0.99", k.latency.p99_ms)):
                    lines.append(
                        f'edgeos_agent_decision_latency_seconds{{agent="{k.agent}",quantile="{q}"}} '
                        f"{ms / 1000:.6f}"
                    )
        lines += [
            "# HELP edgeos_agent_runs_finished_total Finished runs per agent and outcome.",
            "# TYPE edgeos_agent_runs_finished_total counter",
        ]
        for k in kpis:
            for outcome, n in (("succeeded", k.succeeded), ("failed", k.failed)):
                lines.append(
                    f'edgeos_agent_runs_finished_total{{agent="{k.agent}",outcome="{outcome}"}} {n}'
                )
        lines += [
            "# HELP edgeos_agent_drift_psi Largest population stability index of what a model "
            "sees (recent vs reference).",
            "# TYPE edgeos_agent_drift_psi gauge",
        ]
        for name in names:
            for model in models_observed(db, name):
                report = drift(db, name, model)
                if report.worst is not None:
                    lines.append(
                        f'edgeos_agent_drift_psi{{agent="{name}",model="{model}"}} {report.worst:.6g}'
                    )
        for name, help_text, attr in _GAUGES:
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} gauge"]
            for k in kpis:
                value = getattr(k, attr)
                if value is not None:
                    lines.append(f'{name}{{agent="{k.agent}"}} {value:.6g}')
        return lines

    return collect
