"""Cost per decision by venue, and the saving against all-cloud, per agent, from the journal.

Every routed call leaves a ``venue_decided`` record in its run's journal; these figures
are read back from those records, so they cover every run the journal still holds.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from edgeos.state import Database, journal

#: The journal record kind of a routed call.
DECISION_KIND = "venue_decided"
#: The venue of a deferred call whose deadline passed: it returned the task's default.
DEFAULTED = "default"


@dataclass
class AgentCosts:
    """One agent's routed calls."""

    agent: str
    decisions: int = 0
    escalations: int = 0
    #: Escalations given up on when the call's SLO ran out: the edge answer stood.
    late_escalations: int = 0
    cost: float = 0.0
    all_cloud_cost: float = 0.0
    #: Calls and cost by the venue that answered.
    by_venue: dict[str, tuple[int, float]] = field(default_factory=dict)
    #: Generative calls: prompt and generated tokens by the venue that answered.
    tokens: dict[str, tuple[int, int]] = field(default_factory=dict)

    @property
    def saving(self) -> float:
        """What all-cloud would have cost more (negative: routing cost more)."""
        return self.all_cloud_cost - self.cost

    @property
    def cost_per_decision(self) -> float:
        """Average cost of one routed call."""
        return self.cost / self.decisions if self.decisions else 0.0


def agent_costs(db: Database, agent: str | None = None) -> list[AgentCosts]:
    """Routing costs per agent (or of one agent), by agent name."""
    sql = "SELECT r.agent, j.payload FROM journal j JOIN runs r ON r.id = j.run_id WHERE j.kind = ?"
    params: list[str] = [DECISION_KIND]
    if agent is not None:
        sql += " AND r.agent = ?"
        params.append(agent)
    found: dict[str, AgentCosts] = {}
    conn = db.reader()
    for name, payload in conn.execute(sql, params):
        record = journal.load_payload(payload, conn)
        costs = found.setdefault(name, AgentCosts(name))
        venue = str(record.get("escalated_to") or record["venue"])
        cost = float(record.get("cost") or 0.0)
        costs.decisions += 1
        costs.escalations += 1 if record.get("escalated_to") else 0
        costs.late_escalations += 1 if record.get("escalation_late") else 0
        costs.cost += cost
        costs.all_cloud_cost += float(record.get("all_cloud_cost") or 0.0)
        calls, spent = costs.by_venue.get(venue, (0, 0.0))
        costs.by_venue[venue] = (calls + 1, spent + cost)
        if record.get("kind") == "chat":
            prompt, generated = costs.tokens.get(venue, (0, 0))
            costs.tokens[venue] = (prompt + int(record.get("prompt_tokens") or 0),
                                   generated + int(record.get("completion_tokens") or 0))  # fmt: skip
    return [found[name] for name in sorted(found)]


def explain(record: dict[str, Any]) -> list[str]:
    """A ``venue_decided`` record as readable lines: where, why, and the alternatives."""
    where = str(record.get("escalated_to") or record["venue"])
    if where == DEFAULTED:
        return [f"{record['model']} returned its declared default; privacy {record['privacy']}",
                *(f"because {reason}" for reason in record.get("reasons", []))]  # fmt: skip
    head = (
        f"{record['model']} ran on {where} ({record.get('venue_model', record['model'])} "
        f"{record.get('version', '')}, {record.get('latency_ms', 0):g} ms, cost "
        f"{record.get('cost', 0):g}; all-cloud {record.get('all_cloud_cost', 0):g}); privacy "
        f"{record['privacy']}, SLO {_or_none(record.get('slo_ms'), ' ms')}, quality floor "
        f"{_or_none(record.get('min_quality'))}"
    )
    if record.get("kind") == "chat":
        head += (f"; {record.get('prompt_tokens', 0)} tokens in, "
                 f"{record.get('completion_tokens', 0)} out")  # fmt: skip
    lines = [head, *(f"because {reason}" for reason in record.get("reasons", []))]
    for alt in record.get("alternatives", []):
        if alt["venue"] == where:
            continue
        expected = _or_none(alt.get("expected_ms"), " ms")
        lines.append(
            f"not {alt['venue']}: expected {expected}, cost {alt['cost']:g}, quality "
            f"{_or_none(alt.get('quality'))}: {alt['why']}"
        )
    return lines


def _or_none(value: Any, unit: str = "") -> str:
    return "none" if value is None else f"{value:g}{unit}"
