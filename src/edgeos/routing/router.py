"""The router: decide where a call runs, run it there, measure it, account for it.

A remote venue that turns out unreachable is marked offline and the call is decided
again without it (never onto a venue the rules exclude), so a lost link costs one
failed attempt, not the call. In cascade mode a low-confidence edge answer escalates;
if the escalation cannot be reached, the edge answer stands and the record says why.
An escalation of a call with a latency SLO gets only what is left of the SLO: past it
the edge answer stands, the cloud's late answer is dropped, and the record says so.

Every routed call comes back with its record for the run's journal: the decision
(reasons, alternatives with their expected latency and cost) and the outcome (venue,
model version, latency, cost, what all-cloud would have cost).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import wait
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from edgeos.errors import EdgeOSError, UnavailableError
from edgeos.protocol.privacy import stricter
from edgeos.routing.decide import CallDeferred, Needs, Option, Plan, decide
from edgeos.routing.monitor import LinkMonitor
from edgeos.routing.venues import LocalVenue, Venue, VenueAnswer
from edgeos.threads import IdleThreadPool

if TYPE_CHECKING:
    from edgeos.telemetry import MetricsRegistry

#: Called before each venue call with the model and the call's price: a supervisor's
#: rate limit and cost budget (it may sleep, or raise to stop the call).
BeforeCall = Callable[[str, float], None]

#: Kept back from what is left of a call's SLO when bounding its escalation, as a share
#: of the SLO and at least ``SLO_MARGIN_MIN_S``: the time it takes to hand the edge answer
#: back once the cloud's is given up on, a few ms on a busy device.
SLO_MARGIN = 0.05
SLO_MARGIN_MIN_S = 0.002


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


@dataclass(frozen=True)
class _Late:
    """An escalation given up on: the time left in the SLO ran out before its answer."""

    #: How long the call waited for the venue (0: no time was left to try).
    waited_s: float
    #: Whether the request went out (it is paid); False: it never left the device.
    sent: bool


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
        # SLO-bounded escalations run here, so the caller can stop waiting for them;
        # one pool per venue, as many threads as the calls it takes at once.
        self._escalations: dict[str, IdleThreadPool] = {}
        self._pools_lock = threading.Lock()
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
            self._late = metrics.counter(
                "edgeos_routing_escalations_late_total",
                "Escalations given up on when the call's SLO ran out (the edge answer stood), "
                "by agent and venue.",
                ("agent", "venue"),
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
        with self._pools_lock:
            pools, self._escalations = list(self._escalations.values()), {}
        for pool in pools:
            pool.shutdown(wait=False, cancel_futures=True)
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
        arrived: float | None = None,
    ) -> Routed:
        """Decide, call, measure and account; RoutingError when no venue may run it.

        A model registered on this node with a stricter privacy class than the call's
        keeps its data under that class: the stricter one decides. The SLO runs from
        ``arrived`` (a ``time.perf_counter()`` reading: when a request that queued
        before this call came in), by default from this call: an escalation gets what
        the wait, the edge and the decision left of it.
        """
        began = time.perf_counter() if arrived is None else arrived
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
            unsure = f"confidence {sure:.3f} < {plan.needs.cascade:g}"
            if sure < plan.needs.cascade and plan.escalation is None and plan.awaiting:
                if plan.needs.fallback == "wait":
                    raise CallDeferred(model, list(plan.awaiting), f"{unsure}, escalation offline")
                reasons.append(f"{unsure}, escalation offline: the edge answer stands (fallback)")
                outcome["fallback_from"] = plan.awaiting[0]
            elif sure < plan.needs.cascade and plan.escalation is not None:
                to = plan.escalation
                try:
                    escalated = self._escalate(to, inputs, before_call, _left(plan.needs, began))
                except UnavailableError as exc:
                    if plan.needs.fallback == "wait":
                        raise CallDeferred(
                            model, [to.venue], f"escalation did not answer ({exc})"
                        ) from exc
                    reasons.append(
                        f"{unsure}, but {to.venue} did not answer ({exc}): the edge answer stands"
                    )
                else:
                    if isinstance(escalated, _Late):
                        reasons.append(_late_reason(unsure, to.venue, escalated, plan.needs))
                        # The caller waited that long; a request that went out is paid.
                        total_latency += escalated.waited_s
                        cost += to.cost if escalated.sent else 0.0
                        outcome.update(
                            escalation_late=to.venue, cost=cost,
                            latency_ms=round(total_latency * 1000, 3),
                        )  # fmt: skip
                    else:
                        reasons.append(f"{unsure}: escalated to {to.venue}")
                        outputs, venue = escalated[0].outputs, to
                        cost += to.cost
                        total_latency += escalated[1]
                        outcome.update(
                            escalated_to=venue.venue, venue_model=venue.model,
                            version=escalated[0].version,
                            latency_ms=round(total_latency * 1000, 3), cost=cost,
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

    def _escalate(
        self,
        option: Option,
        inputs: Mapping[str, Any],
        before_call: BeforeCall | None,
        left_s: float | None,
    ) -> tuple[VenueAnswer, float] | _Late:
        """Call the escalation venue, waiting at most ``left_s`` (None: until it answers)."""
        if left_s is None:
            return self._call(option, inputs, before_call)
        if left_s <= 0:
            return _Late(0.0, sent=False)
        if before_call is not None:
            before_call(option.model, option.cost)
        started = time.perf_counter()
        future = self._pool(option.venue).submit(self._call, option, inputs, None)
        if wait([future], timeout=left_s).not_done:
            # A call still queued for a thread never leaves the device. One under way
            # cannot be stopped mid-request: it ends on its thread (answer or timeout),
            # still measuring the venue's latency for later decisions, and is dropped.
            return _Late(time.perf_counter() - started, sent=not future.cancel())
        return future.result()

    def _pool(self, venue: str) -> IdleThreadPool:
        with self._pools_lock:
            pool = self._escalations.get(venue)
            if pool is None:
                pool = self._escalations[venue] = IdleThreadPool(
                    max(self._by_name[venue].info.concurrency, 1),
                    thread_name_prefix=f"edgeos-escalate-{venue}",
                )
            return pool

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
        if record.get("escalation_late"):
            self._late.inc(agent, str(record["escalation_late"]))
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


def _left(needs: Needs, began: float) -> float | None:
    """Seconds left in the call's SLO, less the margin (None: the call has no SLO)."""
    if needs.slo_ms is None:
        return None
    slo = needs.slo_ms / 1000
    return slo - max(slo * SLO_MARGIN, SLO_MARGIN_MIN_S) - (time.perf_counter() - began)


def _late_reason(unsure: str, venue: str, late: _Late, needs: Needs) -> str:
    slo = f"the {needs.slo_ms:g} ms SLO"
    if late.waited_s == 0:
        return f"{unsure}, but no time was left in {slo} to escalate: the edge answer stands"
    if not late.sent:
        return (
            f"{unsure}: the escalation to {venue} was still waiting for a connection when {slo} "
            f"ran out ({late.waited_s * 1000:.0f} ms later): withdrawn, the edge answer stands"
        )
    return (
        f"{unsure}: escalated to {venue}, which had not answered when {slo} ran out "
        f"({late.waited_s * 1000:.0f} ms later): the edge answer stands, {venue}'s late answer "
        "is dropped"
    )
