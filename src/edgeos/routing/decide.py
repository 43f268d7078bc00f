"""The venue decision for one call: rules first, then the cheapest venue expected to do.

Rules remove venues, each with its reason: a task whose data is ``local-only`` never
leaves the device; the fleet's policy may keep a privacy class on the edge; a venue that
does not serve the model cannot run it; an offline venue cannot be reached. Among the
venues left, the cheapest one expected to meet the latency SLO and the quality floor
wins, latency being the p95 of the venue's recent calls plus what is queued before this
one (or its declared latency until it has been measured). When none is expected to meet
both, the fastest that meets the quality floor wins, and the reasons say so.

In cascade mode the call runs on the device first and escalates to the venue the same
rules choose off the device when the edge model is less confident than the threshold.

With a link down (offline autonomy): when no reachable venue meets the call's quality
floor and SLO but an offline one would, a task whose ``fallback`` is ``edge`` runs where
it can now, at lower quality, and the record says so; a task whose ``fallback`` is
``wait`` (or that nothing reachable can run) is deferred: :class:`CallDeferred` names the
venues it waits for.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from edgeos.errors import ConfigError
from edgeos.protocol.privacy import DEFAULT_PRIVACY, PRIVACY_CLASSES
from edgeos.routing.monitor import LinkState
from edgeos.routing.venues import RoutingError, Venue, VenueInfo

#: What a call does when the venue it needs is offline: run on what is reachable (at
#: lower quality), or wait for the venue to come back.
FALLBACKS = ("edge", "wait")


class CallDeferred(RoutingError):
    """The call must wait for an offline venue (its task does not allow a lower-quality
    answer, or nothing reachable can run it).

    In a run, the step parks until a venue in ``awaiting`` is back or the task's deadline
    applies its declared default; elsewhere it is the RoutingError it derives from.
    """

    def __init__(self, model: str, awaiting: list[str], reason: str) -> None:
        super().__init__(f"{model}: {reason}; waiting for {', '.join(awaiting)}")
        self.model = model
        self.awaiting = awaiting
        self.reason = reason
        #: Set by the run's ``ctx``: the call's id, how long it may wait, its default.
        self.call: str | None = None
        self.wait_s = 0.0
        self.default: dict[str, Any] | None = None


@dataclass(frozen=True)
class Needs:
    """What a call needs: the privacy of its data, a latency SLO, a quality floor, and
    the confidence under which an edge answer escalates (cascade mode)."""

    privacy: str = DEFAULT_PRIVACY
    slo_ms: float | None = None
    min_quality: float | None = None
    cascade: float | None = None
    #: With the venue it needs offline: ``edge`` (run where it can, at lower quality) or
    #: ``wait`` (defer until the venue is back).
    fallback: str = "edge"

    def __post_init__(self) -> None:
        if self.fallback not in FALLBACKS:
            raise ConfigError(
                f"fallback must be one of {', '.join(FALLBACKS)}, got {self.fallback!r}"
            )
        if self.privacy not in PRIVACY_CLASSES:
            raise ConfigError(
                f"unknown privacy class {self.privacy!r} (one of {', '.join(PRIVACY_CLASSES)})"
            )
        for name in ("slo_ms", "min_quality", "cascade"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int | float) or value < 0):
                raise ConfigError(f"{name} must be a non-negative number, got {value!r}")
        for name in ("min_quality", "cascade"):
            value = getattr(self, name)
            if value is not None and value > 1:
                raise ConfigError(f"{name} is between 0 and 1, got {value!r}")


@dataclass(frozen=True)
class Option:
    """One venue considered for a call, and why it was or was not eligible."""

    venue: str
    model: str
    on_device: bool
    expected_ms: float | None
    cost: float
    quality: float | None
    eligible: bool
    why: str
    #: Allowed by every rule, but its link is down now.
    offline: bool = False


@dataclass(frozen=True)
class Plan:
    """The decision: where the call runs, why, and every alternative considered."""

    model: str
    needs: Needs
    chosen: Option
    reasons: list[str]
    options: list[Option]
    #: Cascade mode: where a low-confidence edge answer escalates (None: nowhere).
    escalation: Option | None = None
    #: What the call would cost on the cheapest remote venue serving it (all-cloud).
    all_cloud_cost: float = 0.0
    #: The offline venue the call would have run on, when it fell back (lower quality).
    fallback_from: str | None = None
    #: Cascade mode: offline venues off the device an escalation would wait for.
    awaiting: tuple[str, ...] = ()

    def record(self) -> dict[str, Any]:
        """The decision as the journal keeps it."""
        return {
            "model": self.model,
            "privacy": self.needs.privacy,
            "slo_ms": self.needs.slo_ms,
            "min_quality": self.needs.min_quality,
            "cascade": self.needs.cascade,
            "venue": self.chosen.venue,
            "expected_ms": self.chosen.expected_ms,
            "reasons": list(self.reasons),
            # vars(), not asdict(): the fields are plain values, and asdict's deep copy
            # was most of the cost of routing a call to the edge.
            "alternatives": [dict(vars(o)) for o in self.options if o.venue != self.chosen.venue],
            "all_cloud_cost": self.all_cloud_cost,
            **({"fallback_from": self.fallback_from} if self.fallback_from else {}),
        }


def expected_latency(venue: Venue, link: LinkState) -> float | None:
    """p95 of recent calls plus the calls queued ahead, else the declared latency.

    Only calls past the venue's ``concurrency`` queue: the others run alongside this
    one, and their load is already in the measured p95.
    """
    if link.p95_ms is not None:
        parallel = max(venue.info.concurrency, 1)
        ahead = max(0, link.in_flight - parallel + 1)
        return link.p95_ms + ahead * (link.p50_ms or link.p95_ms) / parallel
    return venue.info.latency_ms


def decide(
    model: str,
    needs: Needs,
    venues: Sequence[Venue],
    links: Callable[[str], LinkState],
    *,
    cloud_rule: Callable[[str], str] | None = None,
    price: Callable[[VenueInfo], float] | None = None,
) -> Plan:
    """Choose a venue for one call of ``model``; RoutingError when rules leave none.

    ``price`` gives a venue's expected price for this call (generative calls: per token);
    by default its price per call.
    """
    price = price or _per_call
    options = [_consider(model, needs, v, links(v.info.name), cloud_rule, price) for v in venues]
    remote_prices = [price(v.info) for v in venues if not v.info.on_device and v.offer(model)]
    all_cloud = min(remote_prices) if remote_prices else 0.0
    eligible = [o for o in options if o.eligible]
    offline = [o for o in options if o.offline]
    edge_first = needs.cascade is not None and any(o.on_device for o in eligible)
    if offline and not edge_first and not any(_meets(o, needs) for o in eligible):
        return _without(model, needs, options, eligible, offline, all_cloud)
    if not eligible:
        raise RoutingError(
            f"no venue may run {model!r} for data of privacy class {needs.privacy!r}: "
            + "; ".join(f"{o.venue}: {o.why}" for o in options)
        )
    if needs.cascade is not None:
        edge = [o for o in eligible if o.on_device]
        if edge:
            first = min(edge, key=_speed)
            remote = [o for o in eligible if not o.on_device]
            # An escalation that would miss the SLO is worse than the edge's answer in time.
            in_time = [o for o in remote if _meets_slo(o, needs)]
            escalation, _ = _best(in_time, needs) if in_time else (None, [])
            reasons = [
                f"cascade: run on {first.venue} first; escalate when its confidence is under "
                f"{needs.cascade:g}"
            ]
            awaiting = tuple(o.venue for o in offline if not o.on_device)
            if not remote and awaiting:
                reasons.append(f"escalation would go to {', '.join(awaiting)}, offline now")
            elif not remote:
                reasons.append("no venue off the device may run it: no escalation")
            elif escalation is None:
                reasons.append(
                    f"no venue off the device is expected within the {needs.slo_ms:g} ms SLO: "
                    "no escalation"
                )
            else:
                reasons.append(f"escalation goes to {escalation.venue}")
            return Plan(model, needs, first, reasons, options, escalation, all_cloud,
                        awaiting=() if remote else awaiting)  # fmt: skip
    chosen, reasons = _best(eligible, needs)
    return Plan(model, needs, chosen, reasons, options, None, all_cloud)


def _consider(
    model: str,
    needs: Needs,
    venue: Venue,
    link: LinkState,
    cloud_rule: Callable[[str], str] | None,
    price: Callable[[VenueInfo], float],
) -> Option:
    info = venue.info
    offer = venue.offer(model)
    expected = expected_latency(venue, link)

    def option(eligible: bool, why: str) -> Option:
        return Option(
            info.name, offer.model if offer else model, info.on_device,
            None if expected is None else round(expected, 3), price(info),
            offer.quality if offer else None, eligible, why,
        )  # fmt: skip

    if not info.on_device and needs.privacy == "local-only":
        return option(False, "privacy local-only: the data never leaves the device")
    if not info.on_device and cloud_rule is not None and cloud_rule(needs.privacy) == "edge":
        return option(False, f"fleet policy keeps {needs.privacy} data on the edge")
    if offer is None:
        return option(False, f"does not serve {model}")
    if not link.online:
        return replace(option(False, f"offline ({link.last_error or 'not answering'})"),
                       offline=True)  # fmt: skip
    return option(True, "eligible")


def _per_call(info: VenueInfo) -> float:
    return info.price_per_call


def _without(
    model: str,
    needs: Needs,
    options: list[Option],
    eligible: list[Option],
    offline: list[Option],
    all_cloud: float,
) -> Plan:
    """No reachable venue meets the call's needs: fall back to one that is, or defer."""
    ideal, _ = _best(offline, needs)
    if needs.fallback == "edge" and eligible:
        chosen, reasons = _best(eligible, needs)
        quality = "unknown" if chosen.quality is None else f"{chosen.quality:g}"
        reasons.insert(
            0,
            f"offline fallback: {ideal.venue} (quality "
            f"{'unknown' if ideal.quality is None else f'{ideal.quality:g}'}) is offline; "
            f"{chosen.venue} (quality {quality}) instead, as the task allows lower quality",
        )
        return Plan(model, needs, chosen, reasons, options, None, all_cloud, ideal.venue)
    why = (
        "the task waits rather than take a lower-quality answer"
        if eligible
        else "no reachable venue may run it"
    )
    raise CallDeferred(model, [o.venue for o in offline], f"{ideal.venue} is offline and {why}")


def _speed(option: Option) -> float:
    return option.expected_ms if option.expected_ms is not None else 0.0


def _meets(option: Option, needs: Needs) -> bool:
    return _meets_quality(option, needs) and _meets_slo(option, needs)


def _meets_quality(option: Option, needs: Needs) -> bool:
    if needs.min_quality is None:
        return True
    return option.quality is not None and option.quality >= needs.min_quality


def _meets_slo(option: Option, needs: Needs) -> bool:
    # A venue not measured yet is given its chance: its first calls measure it.
    if needs.slo_ms is None or option.expected_ms is None:
        return True
    return option.expected_ms <= needs.slo_ms


def _best(eligible: list[Option], needs: Needs) -> tuple[Option, list[str]]:
    good = [o for o in eligible if _meets(o, needs)]
    if good:
        chosen = min(good, key=lambda o: (o.cost, _speed(o), not o.on_device))
        slo = "" if needs.slo_ms is None else f" within the {needs.slo_ms:g} ms SLO"
        expected = (
            "not measured yet" if chosen.expected_ms is None else f"p95 {chosen.expected_ms:g} ms"
        )
        reason = f"cheapest venue expected to answer{slo} ({expected}, cost {chosen.cost:g})"
        if needs.min_quality is not None:
            reason += f" at quality >= {needs.min_quality:g}"
        return chosen, [reason]
    floor = [o for o in eligible if _meets_quality(o, needs)]
    if floor:
        chosen = min(floor, key=_speed)
        return chosen, [
            f"no venue is expected to meet the {needs.slo_ms:g} ms SLO: the fastest that meets "
            f"the quality floor ({_speed(chosen):g} ms expected)"
        ]
    chosen = max(eligible, key=lambda o: (o.quality or 0.0, -_speed(o)))
    return chosen, [
        f"no venue meets the quality floor {needs.min_quality:g}: the best available "
        f"(quality {chosen.quality if chosen.quality is not None else 'unknown'})"
    ]
