"""Generative (chat) calls across venues: the node's generative host or an OpenAI-compatible
endpoint, decided by the same rules as tensor calls and priced per token.

A venue that can chat has a ``chat(model, request)`` method besides the :class:`Venue`
protocol: :class:`~edgeos.routing.venues.LocalVenue` when the node has a generative host,
and :class:`OpenAIVenue` for any endpoint speaking ``POST /v1/chat/completions`` (llama.cpp's
server, Ollama, vLLM, another edgeos node). Output held to a JSON Schema is asked of the
venue through ``response_format`` (constrained decoding where the backend supports it);
what comes back is checked again by the caller, which trusts no venue.
"""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator, Callable, Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from edgeos.errors import UnavailableError
from edgeos.protocol.privacy import stricter
from edgeos.routing.decide import Needs, Plan, decide
from edgeos.routing.venues import Offer, RoutingError, VenueInfo, key_headers, masked

if TYPE_CHECKING:
    import httpx

    from edgeos.routing.router import BeforeCall, Router
    from edgeos.routing.venues import Venue

#: Tokens a prompt is assumed to take per character until a venue has counted them:
#: only for the price a decision expects, never for what is charged.
TOKENS_PER_CHAR = 0.3
#: Output tokens a decision expects when the call sets no ``max_tokens``.
DEFAULT_MAX_TOKENS = 256


@dataclass(frozen=True)
class ChatRequest:
    """One generative call: OpenAI-style messages and sampling, and an optional JSON Schema
    the answer is held to."""

    messages: tuple[Mapping[str, Any], ...]
    max_tokens: int | None = None
    temperature: float = 0.0
    seed: int | None = None
    schema: Mapping[str, Any] | None = None

    def expected_tokens(self) -> tuple[int, int]:
        """Prompt and output tokens a decision prices before anything has run."""
        chars = sum(len(str(m.get("content", ""))) for m in self.messages)
        return int(chars * TOKENS_PER_CHAR) + 1, self.max_tokens or DEFAULT_MAX_TOKENS


@dataclass(frozen=True)
class ChatAnswer:
    """A venue's answer: the text, how it ended and the tokens counted."""

    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    version: str = ""


def _plan(
    router: Router, model: str, request: ChatRequest, needs: Needs, reasons: list[str]
) -> tuple[Plan, Venue]:
    """The venue a chat call goes to, by the rules of tensor calls with the expected tokens'
    price; what made its privacy stricter goes in ``reasons``."""
    venues = [v for v in router.venues if can_chat(v)]
    prompt_est, output_est = request.expected_tokens()

    def price(info: VenueInfo) -> float:
        return token_price(info, prompt_est, output_est)

    needs = replace(needs, cascade=None)
    # A generative model registered here with a stricter privacy class keeps its data so.
    declared = router._model_privacy(model)
    if declared is not None and stricter(needs.privacy, declared) != needs.privacy:
        reason = f"model {model} is declared {declared}: its data is kept {declared}"
        if reason not in reasons:
            reasons.append(reason)
        needs = replace(needs, privacy=declared)
    plan = decide(model, needs, venues, router.monitor.state, cloud_rule=router.cloud_rule,
                  price=price)  # fmt: skip
    return plan, next(v for v in venues if v.info.name == plan.chosen.venue)


def relay_venue(router: Router, model: str, request: ChatRequest) -> tuple[OpenAIVenue, str]:
    """The endpoint off the device that a chat request for ``model`` (not served here) goes
    to, and the model's name there; RoutingError when the rules leave none."""
    plan, venue = _plan(router, model, request, Needs(), [])
    if not isinstance(venue, OpenAIVenue):
        raise RoutingError(f"model {model} is served on {venue.info.name}, not relayed")
    return venue, plan.chosen.model


#: How the node's metrics name the calls its OpenAI-compatible API relays: no agent made them.
RELAYED = "(relayed)"


def relayed_record(venue: VenueInfo, usage: Mapping[str, Any] | None) -> dict[str, Any]:
    """What :meth:`Router.account` counts for a call relayed to ``venue``: its tokens as the
    answer's ``usage`` gives them (none when the venue sent none: a stream the client did
    not ask usage of) at the venue's prices."""
    usage = usage or {}
    prompt = int(usage.get("prompt_tokens") or 0)
    completion = int(usage.get("completion_tokens") or 0)
    cost = token_price(venue, prompt, completion)
    return {"kind": "chat", "venue": venue.name, "cost": cost, "all_cloud_cost": cost,
            "prompt_tokens": prompt, "completion_tokens": completion}  # fmt: skip


def token_price(info: VenueInfo, prompt_tokens: int, completion_tokens: int) -> float:
    """What a venue charges for one call of that many tokens in and out."""
    return (
        info.price_per_call
        + prompt_tokens * info.price_per_input_token
        + completion_tokens * info.price_per_output_token
    )


def can_chat(venue: Venue) -> bool:
    """Whether the venue serves generative calls."""
    chat = getattr(venue, "chat", None)
    return callable(chat) and getattr(venue, "generative", True) is not None


@dataclass(frozen=True)
class ChatRouted:
    """A routed chat call's answer and its ``venue_decided`` record."""

    answer: ChatAnswer
    venue: str
    model: str
    latency_ms: float
    cost: float
    record: dict[str, Any]


def route_chat(
    router: Router,
    agent: str,
    model: str,
    request: ChatRequest,
    needs: Needs,
    *,
    before_call: BeforeCall | None = None,
) -> ChatRouted:
    """Decide where a chat call runs, run it, measure it and price it by its tokens.

    The rules are those of tensor calls (``local-only`` stays on the device; the cheapest
    venue expected to meet the SLO and quality floor); the price weighed is the venue's per
    call plus the expected tokens at its prices. A remote venue that does not answer is
    marked offline and the call decided again without it. Cascades do not apply: a
    generated text has no confidence to escalate on.
    """
    venues = [v for v in router.venues if can_chat(v)]
    failovers: list[str] = []
    while True:
        plan, venue = _plan(router, model, request, needs, failovers)
        if before_call is not None:
            before_call(plan.chosen.model, plan.chosen.cost)
        started = time.perf_counter()
        with router.monitor.calling(venue.info.name):
            try:
                answer: ChatAnswer = venue.chat(plan.chosen.model, request)  # type: ignore[attr-defined]
            except UnavailableError as exc:
                router.monitor.link_failed(venue.info.name, str(exc))
                if plan.chosen.on_device:
                    raise
                failovers.append(f"{venue.info.name} did not answer ({exc}): decided again")
                continue
        latency = time.perf_counter() - started
        router.monitor.call_succeeded(venue.info.name, latency, len(answer.text))
        break
    tokens = (answer.prompt_tokens, answer.completion_tokens)
    cost = token_price(venue.info, *tokens)
    remote = [token_price(v.info, *tokens) for v in venues
              if not v.info.on_device and v.offer(model)]  # fmt: skip
    record = {
        **plan.record(), "kind": "chat", "venue_model": plan.chosen.model,
        "version": answer.version, "latency_ms": round(latency * 1000, 3), "cost": cost,
        "all_cloud_cost": min(remote) if remote else 0.0,
        "prompt_tokens": answer.prompt_tokens, "completion_tokens": answer.completion_tokens,
        "finish_reason": answer.finish_reason, "reasons": [*failovers, *plan.reasons],
    }  # fmt: skip
    router.account(agent, record)
    return ChatRouted(answer, venue.info.name, plan.chosen.model, latency * 1000, cost, record)


class OpenAIVenue:
    """An OpenAI-compatible chat endpoint off the device, by its base URL (``.../v1``).

    ``api_key`` reads the venue's API key (from the node's vault) for each request
    (:func:`~edgeos.routing.venues.key_headers`); no error or record quotes the key.
    """

    def __init__(self, info: VenueInfo, url: str, api_key: Callable[[], str] | None = None) -> None:
        self.info = info
        self.url = url.rstrip("/")
        self._api_key = api_key
        self._client: httpx.Client | None = None

    def _http(self) -> httpx.Client:
        if self._client is None:
            import httpx

            self._client = httpx.Client(timeout=self.info.timeout_s)
        return self._client

    def _request(self, method: str, path: str, body: Any = None) -> tuple[httpx.Response, str]:
        """One request with the API key, and the key (to mask it in what the venue says);
        UnavailableError when it cannot be made."""
        import httpx

        headers, key = key_headers(self.info.name, self._api_key)
        try:
            response = self._http().request(method, f"{self.url}{path}", json=body,
                                            headers=headers)  # fmt: skip
        except httpx.HTTPError as exc:
            raise UnavailableError(f"venue {self.info.name}: {masked(str(exc), key)}") from None
        return response, key

    def offer(self, model: str) -> Offer | None:
        """A model declared for this venue in ``venues.yaml``."""
        return self.info.models.get(model)

    def infer(self, model: str, inputs: Mapping[str, Any]) -> Any:
        """Tensor calls are not what a chat endpoint serves."""
        raise RoutingError(f"venue {self.info.name} serves chat completions, not tensor calls")

    def chat(self, model: str, request: ChatRequest) -> ChatAnswer:
        """``POST {url}/chat/completions``; UnavailableError when the endpoint cannot be
        reached or is overloaded, RoutingError when it refuses or answers nonsense."""
        body: dict[str, Any] = {
            "model": model, "messages": list(request.messages),
            "temperature": request.temperature,
        }  # fmt: skip
        if request.max_tokens is not None:
            body["max_tokens"] = request.max_tokens
        if request.seed is not None:
            body["seed"] = request.seed
        if request.schema is not None:
            body["response_format"] = {
                "type": "json_schema",
                "json_schema": {"name": "answer", "schema": dict(request.schema), "strict": True},
            }
        response, key = self._request("POST", "/chat/completions", body)
        if response.status_code in (429, 502, 503, 504):
            raise UnavailableError(f"venue {self.info.name} answered {response.status_code}")
        if response.status_code != 200:
            raise RoutingError(
                f"venue {self.info.name} refused the chat call ({response.status_code}): "
                f"{masked(response.text[:200], key)}"
            )
        try:
            doc = response.json()
            choice = doc["choices"][0]
            usage = doc.get("usage") or {}
            return ChatAnswer(
                str(choice["message"].get("content") or ""), str(choice.get("finish_reason")),
                int(usage.get("prompt_tokens", 0)), int(usage.get("completion_tokens", 0)),
                str(doc.get("system_fingerprint") or ""),
            )  # fmt: skip
        except (ValueError, KeyError, IndexError, TypeError, AttributeError) as exc:
            raise RoutingError(
                f"venue {self.info.name}: not an OpenAI chat completion ({exc!r})"
            ) from exc

    def relay(self, body: Mapping[str, Any]) -> tuple[int, bytes]:
        """``POST {url}/chat/completions`` with an OpenAI request as it came (its model the
        venue's name): the venue's status and body, to hand back as they are."""
        response, key = self._request("POST", "/chat/completions", dict(body))
        if response.status_code in (502, 503, 504):
            raise UnavailableError(f"venue {self.info.name} answered {response.status_code}")
        return response.status_code, masked(response.text, key).encode()

    async def relay_stream(self, body: Mapping[str, Any]) -> AsyncGenerator[bytes]:
        """The same with ``stream: true``: the venue's server-sent events as they come.
        Before the first piece, an error is raised (UnavailableError when the venue cannot
        be reached, RoutingError when it refuses) rather than streamed."""
        import httpx

        headers, key = key_headers(self.info.name, self._api_key)
        url = f"{self.url}/chat/completions"
        try:
            async with (
                httpx.AsyncClient(timeout=self.info.timeout_s) as client,
                client.stream("POST", url, json=dict(body), headers=headers) as response,
            ):
                if response.status_code != 200:
                    text = masked((await response.aread()).decode(errors="replace"), key)
                    kind = (
                        UnavailableError
                        if response.status_code in (429, 502, 503, 504)
                        else RoutingError
                    )
                    raise kind(f"venue {self.info.name} refused the chat call "
                               f"({response.status_code}): {text[:200]}")  # fmt: skip
                async for piece in response.aiter_raw():
                    yield piece
        except httpx.HTTPError as exc:
            raise UnavailableError(f"venue {self.info.name}: {masked(str(exc), key)}") from None

    def probe(self) -> None:
        """``GET {url}/models``; UnavailableError when it does not answer."""
        response, _ = self._request("GET", "/models")
        if response.status_code >= 500:
            raise UnavailableError(f"venue {self.info.name} answered {response.status_code}")

    def close(self) -> None:
        """Close the connection pool. Safe to call twice."""
        if self._client is not None:
            self._client.close()
            self._client = None


def local_chat(generative: Any, model: str, request: ChatRequest) -> ChatAnswer:
    """Run a chat call on the node's generative host, from a thread with no event loop
    (a step's worker thread)."""
    import asyncio

    from edgeos.runtime.generative import Sampling
    from edgeos.runtime.structured import json_schema_text

    loaded = generative.model(model)
    schema = None
    if request.schema is not None:
        schema = json_schema_text(request.schema)
    sampling = Sampling(max_tokens=request.max_tokens, temperature=request.temperature,
                        seed=request.seed, schema=schema)  # fmt: skip
    prompt = loaded.chat.prompt(list(request.messages))
    text, finish = asyncio.run(loaded.complete(prompt, sampling))
    return ChatAnswer(text, finish.reason, finish.prompt_tokens, finish.completion_tokens,
                      loaded.manifest.version)  # fmt: skip
