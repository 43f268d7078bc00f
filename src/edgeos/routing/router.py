"""The router: decide where a call runs, run it there, measure it, account for it.

A remote venue that turns out unreachable is marked offline and the call is decided
again without it (never onto a venue the rules exclude), so a lost link costs one
failed attempt, not the call. In cascade mode a low-confidence edge answer escalates;
if the escalation cannot be reached, the edge answer stands and the record says why.

Every routed call comes back with its record for the run's journal: the decision
(reasons, alternatives with their expected latency and cost) and the outcome (venue,
model version, latency, cost, what all-cloud would have cost).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from edgeos.errors import EdgeOSError, UnavailableError
from edgeos.protocol.privacy import stricter
from edgeos.routing.decide import CallDeferred, Needs, Option, Plan, decide
from edgeos.routing.monitor import LinkMonitor
from edgeos.routing.venues import LocalVenue, Venue, VenueAnswer

if TYPE_CHECKING:
    from edgeos.telemetry import MetricsRegistry

#: Called before each venue call with the model and the call's price: a supervisor's
#: rate limit and cost budget (it may sleep, or raise to stop the call).
BeforeCall = Callable[[str, float], None]


@dataclass(frozen=True)
class Routed:
    """A routed call's outputs and its journal record."""

    outputs: dict[str, Any]
    venue: str
    model: str
    version: str
    latency_ms: float
    cost: float
    record: dict[str, Any]


def confidence(outputs: Mapping[str, Any]) -> float:
    """How sure a classifier is: the largest value of its first output (its class scores)."""
    import numpy as np

    first = np.asarray(next(iter(outputs.values())), dtype=np.float64).reshape(-1)
    return float(first.max()) if first.size else 0.0


class Router:
    """Routes model calls across venues, watching their links and counting their cost."""

    def __init__(
        self,
        venues: Sequence[Venue],
        monitor: LinkMonitor,
        *,
        cloud_rule: Callable[[str], str] | None = None,
        metrics: MetricsRegistry | None = None,
    ) -> None:
        self.venues = list(venues)
        self.monitor = monitor
        #: The fleet's policy: the venue (edge, cloud, any) a privacy class may use.
        self.cloud_rule = cloud_rule
        self._by_name = {v.info.name: v for v in self.venues}
        self._metrics = metrics
        if metrics is not None:
            self._calls = metrics.counter(
                "edgeos_routing_calls_total", "Routed model calls by agent and venue.",
                ("agent", "venue"),
            )  # fmt: skip
            self._cost = metrics.counter(
                "edgeos_routing_cost_total", "Cost of routed calls by agent and venue.",
                ("agent", "venue"),
            )  # fmt: skip
            self._all_cloud = metrics.counter(
                "edgeos_routing_all_cloud_cost_total",
                "What the same calls would have cost on the cheapest cloud venue, by agent.",
                ("agent",),
            )
            self._tokens = metrics.counter(
                "edgeos_routing_tokens_total",
                "Tokens of routed generative calls by agent, venue and direction (input, output).",
                ("agent", "venue", "direction"),
            )
            metrics.collector(self._lines)

    def start(self) -> None:
        """Start probing the remote venues."""
        self.monitor.start()

    def close(self) -> None:
        """Stop probing and close every venue's connections. Safe to call twice."""
        self.monitor.stop()
        for venue in self.venues:
            venue.close()

    def reachable(self) -> list[str]:
        """Venues seen answering (a probe or a call) and not failing since.

        What a deferred call waits for: a venue is online until proven otherwise for the
        decision, but a node that has just started has not seen a remote venue yet.
        """
        return [
            s.venue
            for s in self.monitor.states()
            if s.online
            and (s.rtt_ms is not None or s.calls or self._by_name[s.venue].info.on_device)
        ]

    def plan(self, model: str, needs: Needs) -> Plan:
        """Decide where a call of ``model`` would run now (nothing is called)."""
        return decide(model, needs, self.venues, self.monitor.state, cloud_rule=self.cloud_rule)

    def route(
        self,
        agent: str,
        model: str,
        inputs: Mapping[str, Any],
        needs: Needs,
        *,
        before_call: BeforeCall | None = None,
    ) -> Routed:
        """Decide, call, measure and account; RoutingError when no venue may run it.

        A model registered on this node with a stricter privacy class than the call's
        keeps its data under that class: the stricter one decides.
        """
        failovers: list[str] = []
        declared = self._model_privacy(model)
        if declared is not None and stricter(needs.privacy, declared) != needs.privacy:
            failovers.append(f"model {model} is declared {declared}: its data is kept {declared}")
            needs = replace(needs, privacy=declared)
        while True:
            plan = self.plan(model, needs)
            try:
                answer, latency = self._call(plan.chosen, inputs, before_call)
            except UnavailableError as exc:
                if plan.chosen.on_device:
                    raise
                failovers.append(f"{plan.chosen.venue} did not answer ({exc}): decided again")
                continue  # the venue is offline now: the next plan goes without it
            break
        outcome: dict[str, Any] = {
            "venue": plan.chosen.venue, "venue_model": plan.chosen.model,
            "version": answer.version, "latency_ms": round(latency * 1000, 3),
            "cost": plan.chosen.cost,
        }  # fmt: skip
        outputs, venue, cost, total_latency = answer.outputs, plan.chosen, plan.chosen.cost, latency
        reasons = [*failovers, *plan.reasons]
        if plan.needs.cascade is not None and plan.chosen.on_device:
            sure = confidence(answer.outputs)
            outcome["confidence"] = round(sure, 6)
            if sure < plan.needs.cascade and plan.escalation is None and plan.awaiting:
                unsure = f"confidence {sure:.3f} < {plan.needs.cascade:g}"
                if plan.needs.fallback == "wait":
                    raise CallDeferred(model, list(plan.awaiting), f"{unsure}, escalation offline")
                reasons.append(f"{unsure}, escalation offline: the edge answer stands (fallback)")
                outcome["fallback_from"] = plan.awaiting[0]
            elif sure < plan.needs.cascade and plan.escalation is not None:
                try:
                    escalated, more = self._call(plan.escalation, inputs, before_call)
                except UnavailableError as exc:
                    if plan.needs.fallback == "wait":
                        raise CallDeferred(
                            model, [plan.escalation.venue], f"escalation did not answer ({exc})"
                        ) from exc
                    reasons.append(
                        f"confidence {sure:.3f} < {plan.needs.cascade:g}, but "
                        f"{plan.escalation.venue} did not answer ({exc}): the edge answer stands"
                    )
                else:
                    reasons.append(
                        f"confidence {sure:.3f} < {plan.needs.cascade:g}: escalated to "
                        f"{plan.escalation.venue}"
                    )
                    outputs, venue = escalated.outputs, plan.escalation
                    cost += plan.escalation.cost
                    total_latency += more
                    outcome.update(
                        escalated_to=venue.venue, venue_model=venue.model,
                        version=escalated.version, latency_ms=round(total_latency * 1000, 3),
                        cost=cost,
                    )  # fmt: skip
            elif sure >= plan.needs.cascade:
                reasons.append(f"confidence {sure:.3f} >= {plan.needs.cascade:g}: no escalation")
        record = {**plan.record(), **outcome, "reasons": reasons}
        self.account(agent, record)
        return Routed(outputs, str(record["venue"]), venue.model, str(record["version"]),
                      total_latency * 1000, cost, record)  # fmt: skip

    def _model_privacy(self, model: str) -> str | None:
        for venue in self.venues:
            if isinstance(venue, LocalVenue):
                try:
                    return venue.host.resolve(model).privacy
                except EdgeOSError:
                    return None  # not registered here: only a venue off the device serves it
        return None

    def _call(
        self, option: Option, inputs: Mapping[str, Any], before_call: BeforeCall | None
    ) -> tuple[VenueAnswer, float]:
        if before_call is not None:
            before_call(option.model, option.cost)
        venue = self._by_name[option.venue]
        started = time.perf_counter()
        with self.monitor.calling(option.venue):
            try:
                answer = venue.infer(option.model, inputs)
            except UnavailableError as exc:
                self.monitor.link_failed(option.venue, str(exc))
                raise
        latency = time.perf_counter() - started
        self.monitor.call_succeeded(option.venue, latency, answer.moved_bytes)
        return answer, latency

    def account(self, agent: str, record: Mapping[str, Any]) -> None:
        """Count a routed call's ``venue_decided`` record in the node's metrics (a chat
        call's tokens too)."""
        if self._metrics is None:
            return
        venue = str(record.get("escalated_to") or record["venue"])
        self._calls.inc(agent, venue)
        self._cost.inc(agent, venue, amount=float(record["cost"]))
        self._all_cloud.inc(agent, amount=float(record["all_cloud_cost"]))
        if record.get("kind") == "chat":
            self._tokens.inc(agent, venue, "input", amount=float(record["prompt_tokens"]))
            self._tokens.inc(agent, venue, "output", amount=float(record["completion_tokens"]))

    def _lines(self) -> list[str]:
        # The saving is a gauge, not a counter: a cascade that escalates pays for two
        # calls, so it can go down.
        paid: dict[str, float] = {}
        for (agent, _venue), value in self._cost.values().items():
            paid[agent] = paid.get(agent, 0.0) + value
        states = self.monitor.states()
        return [
            "# HELP edgeos_routing_saving All-cloud cost minus the cost paid, by agent.",
            "# TYPE edgeos_routing_saving gauge",
            *(
                f'edgeos_routing_saving{{agent="{agent}"}} {total - paid.get(agent, 0.0):.6f}'
                for (agent,), total in sorted(self._all_cloud.values().items())
            ),
            "# HELP edgeos_venue_up Whether the venue answered its last call or probe.",
            "# TYPE edgeos_venue_up gauge",
            *(f'edgeos_venue_up{{venue="{s.venue}"}} {int(s.online)}' for s in states),
            "# HELP edgeos_venue_latency_p95_ms p95 latency of the venue's recent calls.",
            "# TYPE edgeos_venue_latency_p95_ms gauge",
            *(
                f'edgeos_venue_latency_p95_ms{{venue="{s.venue}"}} {s.p95_ms:.3f}'
                for s in states
                if s.p95_ms is not None
            ),
        ]
