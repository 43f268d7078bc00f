"""Where a model call can run: the contract every venue keeps, and the node's own host.

A venue is this node's model host (:class:`LocalVenue`), an Open Inference Protocol (V2)
endpoint (:class:`edgeos.routing.v2_venue.V2Venue`), or the fleet's cloud venue (a V2
venue reached with the device certificate). The router speaks only :class:`Venue`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from edgeos.errors import EdgeOSError, UnavailableError

if TYPE_CHECKING:
    from edgeos.routing.chat import ChatAnswer, ChatRequest
    from edgeos.runtime import ModelHost
    from edgeos.runtime.generative import GenerativeHost

#: The name of the node's own venue when ``venues.yaml`` does not declare one.
LOCAL = "edge"


class RoutingError(EdgeOSError):
    """No venue may run a call (privacy, policy, capability, links); names each reason."""

    http_status = 409


def key_headers(venue: str, api_key: Callable[[], str] | None) -> tuple[dict[str, str], str]:
    """The request headers that present a venue's API key, and the key (to mask it in what
    the venue says back); none without a key. The key is read for each request (from the
    node's vault), so a rotated key applies at once; one that cannot be read makes the
    venue unavailable, and the error never quotes it."""
    if api_key is None:
        return {}, ""
    try:
        key = api_key()
    except EdgeOSError as exc:
        raise UnavailableError(f"venue {venue}: API key: {exc}") from None
    return {"Authorization": f"Bearer {key}"}, key


def masked(text: str, key: str) -> str:
    """``text`` without the API key, should a venue have echoed it."""
    return text.replace(key, "***") if key else text


@dataclass(frozen=True)
class Offer:
    """One model a venue serves: its name there and the venue's declared quality."""

    model: str
    quality: float | None = None


@dataclass(frozen=True)
class VenueInfo:
    """What a venue declares about itself."""

    name: str
    #: True for the node's own host: data given to it never leaves the device.
    on_device: bool
    price_per_call: float = 0.0
    #: Generative calls: the price of each prompt token and of each generated token.
    price_per_input_token: float = 0.0
    price_per_output_token: float = 0.0
    #: Expected latency until calls have been measured (ms).
    latency_ms: float | None = None
    #: Calls the venue runs at once from this node; a call past them waits its turn.
    concurrency: int = 1
    timeout_s: float = 5.0
    #: Models served, by the name agents ask for; empty on a local venue: all registered.
    models: Mapping[str, Offer] = field(default_factory=dict)


@dataclass(frozen=True)
class VenueAnswer:
    """A venue's outputs for one call, and the bytes it moved (for throughput)."""

    outputs: dict[str, Any]
    version: str
    moved_bytes: int = 0


class Venue(Protocol):
    """A place that runs model calls."""

    info: VenueInfo

    def offer(self, model: str) -> Offer | None:
        """What the venue serves under ``model`` (None: it does not)."""

    def infer(self, model: str, inputs: Mapping[str, Any]) -> VenueAnswer:
        """Run ``model`` (the venue's name for it) on ``inputs``.

        UnavailableError when the venue cannot be reached (the link is down); other
        EdgeOSErrors when it refused the call.
        """

    def probe(self) -> None:
        """A light health check; UnavailableError when the venue does not answer."""

    def close(self) -> None:
        """Release connections. Safe to call twice."""


class LocalVenue:
    """The node's own model host (and its generative host, for chat calls)."""

    def __init__(
        self,
        host: ModelHost,
        info: VenueInfo | None = None,
        generative: GenerativeHost | None = None,
    ) -> None:
        self.host = host
        self.info = info or VenueInfo(LOCAL, on_device=True)
        self.generative = generative

    def offer(self, model: str) -> Offer | None:
        """A declared model, or (when none are declared) any model registered here."""
        if self.info.models:
            return self.info.models.get(model)
        try:
            self.host.resolve(model)
        except EdgeOSError:
            return None
        return Offer(model)

    def infer(self, model: str, inputs: Mapping[str, Any]) -> VenueAnswer:
        """Run the model on this node."""
        result = self.host.infer(model, inputs)
        return VenueAnswer(result.outputs, result.version)

    def chat(self, model: str, request: ChatRequest) -> ChatAnswer:
        """Generate on this node (from a thread without an event loop)."""
        from edgeos.routing.chat import local_chat

        if self.generative is None:
            raise RoutingError(f"venue {self.info.name} has no generative host")
        return local_chat(self.generative, model, request)

    def probe(self) -> None:
        """The host is in this process: always reachable."""

    def close(self) -> None:
        """The host belongs to the node, which closes it."""
