"""The node's router, from ``venues.yaml`` (or, without one, the model host alone)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from edgeos.errors import ConfigError
from edgeos.routing.monitor import LinkMonitor
from edgeos.routing.router import Router
from edgeos.routing.v2_venue import ClientCertificate, V2Venue
from edgeos.routing.venues import LOCAL, LocalVenue, Offer, Venue, VenueInfo

if TYPE_CHECKING:
    from edgeos.routing.config import RoutingConfig
    from edgeos.runtime import ModelHost
    from edgeos.runtime.generative import GenerativeHost
    from edgeos.telemetry import MetricsRegistry

#: Where the fleet serves its cloud venue, below its URL.
FLEET_VENUE_PATH = "/api/v1/cloud"


def key_scope(venue: str) -> str:
    """The vault scope a venue's API key must be granted to."""
    return f"venues.{venue}"


def build_router(
    host: ModelHost,
    config: RoutingConfig | None = None,
    *,
    source: str = "venues.yaml",
    fleet_url: str | None = None,
    certificate: ClientCertificate | None = None,
    cloud_rule: Callable[[str], str] | None = None,
    metrics: MetricsRegistry | None = None,
    generative: GenerativeHost | None = None,
    secrets: Callable[[str, str], str] | None = None,
) -> Router:
    """A router over the venues of ``config`` plus the local host (implicit if undeclared).

    A ``fleet`` venue needs the node to follow a fleet (``fleet_url`` and the device
    ``certificate``); ConfigError naming ``source`` and the venue otherwise. ``secrets``
    (``secrets(name, scope)``, the node's vault) reads the API keys of openai venues,
    each granted to the scope ``venues.<venue name>``.
    """
    venues: list[Venue] = []
    declared_local = False
    for name, venue in (config.venues if config else {}).items():
        info = VenueInfo(
            name, on_device=venue.type == "local", price_per_call=venue.price_per_call,
            price_per_input_token=venue.price_per_input_token,
            price_per_output_token=venue.price_per_output_token,
            latency_ms=venue.latency_ms, timeout_s=venue.timeout,
            models={k: Offer(m.model or k, m.quality) for k, m in venue.models.items()},
        )  # fmt: skip
        if venue.type == "local":
            venues.append(LocalVenue(host, info, generative))
            declared_local = True
        elif venue.type in ("v2", "openai"):
            assert venue.url is not None  # checked by the config
            key = _api_key(venue.api_key_secret, key_scope(name), secrets, source)
            if venue.type == "v2":
                venues.append(V2Venue(info, venue.url, api_key=key))
            else:
                from edgeos.routing.chat import OpenAIVenue

                venues.append(OpenAIVenue(info, venue.url, api_key=key))
        else:
            url = venue.url or (fleet_url.rstrip("/") + FLEET_VENUE_PATH if fleet_url else None)
            if url is None or certificate is None:
                raise ConfigError(
                    f"{source}: field 'venues.{name}.type': a fleet venue needs this node to "
                    "be enrolled in a fleet (set fleet_url and join it)"
                )
            venues.append(V2Venue(info, url, certificate=certificate))
    if not declared_local:
        venues.insert(0, LocalVenue(host, VenueInfo(LOCAL, on_device=True), generative))
    monitor = LinkMonitor(
        venues,
        interval=config.probe_interval if config else 2.0,
        window=config.window if config else 200,
    )
    return Router(venues, monitor, cloud_rule=cloud_rule, metrics=metrics)


def _api_key(
    secret: str | None, scope: str, secrets: Callable[[str, str], str] | None, source: str
) -> Callable[[], str] | None:
    """What reads a venue's API key at each request (None: the venue has no key)."""
    if secret is None:
        return None

    def read() -> str:
        if secrets is None:
            raise ConfigError(f"{source}: the API key of {scope} is in the node's vault, "
                              "which this process does not read")  # fmt: skip
        return secrets(secret, scope)

    return read
