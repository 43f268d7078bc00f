"""The HTTP connector: an effect is a JSON request carrying an ``Idempotency-Key`` header.

How an answer is read:

- **2xx**: delivered. The result is ``{"status": code, "body": ...}``, the body parsed as
  JSON when it says it is JSON and is at most 8 KiB, else its text cut to 1000
  characters; ``"duplicate": true`` is added when the answer carries
  ``Idempotent-Replayed: true``.
- **409 Conflict** is read by what its body says about the key (``classify_conflict``):

  - the key was *already used / processed / a duplicate / replayed*: the receiver applied
    this effect before (our earlier attempt got through but its answer was lost), so it
    counts as delivered, with ``"duplicate": true`` in the result;
  - the key is *in use / in progress / being processed* (the idempotency-key draft's
    "request still being processed"): retryable, the first attempt may yet finish;
  - any other conflict is a business conflict: not retryable.

  "Says something about the key" means the body mentions the key itself or the words
  "idempotency"/"idempotent"; a 409 that does not is never taken as a success.
- **408, 429 and 5xx**: retryable, with ``Retry-After`` honoured when given.
- **other 4xx** (and 3xx, which are not followed): not retryable.
- **transport errors** (refused, reset, timed out): retryable. A timeout may hide a request
  that was applied; the retry carries the same key, so the receiver deduplicates it.

Whether a failed request may have been applied (``maybe_applied``): not when the
connection could not be made, nor when the receiver answered, except 502 and 504, where
a gateway lost the answer of a server that may have acted; yes when the request was sent
and the answer did not come (read timeouts, connections lost mid-call).

An operation declared with ``batch`` (:class:`~edgeos.connectors.config.HttpBatch`) is not
sent per effect: its delivery hands the message (``{"key", "payload"}``) to the node's
outbound queue (:attr:`HttpConnector.outbound`), and that hand-off, on disk, is the
effect's delivery (result ``{"outbound": "queued" | "dropped", "priority": ...}``). The
queue's task sends the messages later in batches through :func:`outbound_sender`: one
``POST`` to the batch path per batch, whose ``Idempotency-Key`` is the hash of its body,
so a batch sent again after a failure or a restart carries the same key and ``seq``.
"""

from __future__ import annotations

import asyncio
import email.utils
import hashlib
import math
import re
import time
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC
from typing import Any, Literal

import httpx
import orjson

from edgeos.connectors.base import Connector, DeliveryError, OutboundHandoff, UnknownOperation
from edgeos.connectors.config import HttpConnectorConfig, HttpOperation
from edgeos.connectors.secret_refs import has_refs, resolve
from edgeos.errors import ConfigError, UnavailableError
from edgeos.telemetry.tracing import current_delivery

#: A receiver cannot park an effect for longer than this with Retry-After.
MAX_RETRY_AFTER = 24 * 3600.0
#: Bodies larger than this are kept as (cut) text, not parsed: results stay small.
MAX_JSON_BODY = 8192
MAX_TEXT = 1000

_DUPLICATE_WORDS = re.compile(r"already|duplicate|replay|\bused\b|processed|completed")
_IN_PROGRESS_WORDS = re.compile(
    r"in[ _-]?progress|in[ _-]?use|being processed|processing|concurrent|locked"
)

ConflictKind = Literal["duplicate", "in_progress", "conflict"]


def parse_retry_after(value: str | None, *, now: float) -> float | None:
    """Seconds to wait from a ``Retry-After`` value, or None if absent or unreadable.

    RFC 9110 allows delay-seconds (``120``) or an HTTP-date; a date in the past means
    "now" (0). Fractional seconds are accepted though the RFC has only digits, and the
    wait is capped at :data:`MAX_RETRY_AFTER` so a broken receiver cannot park an effect
    for years.
    """
    if value is None or not value.strip():
        return None
    text = value.strip()
    try:
        seconds = float(text)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(text)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:  # "-0000" parses naive; HTTP-dates are always GMT
            when = when.replace(tzinfo=UTC)
        seconds = when.timestamp() - now
    if math.isnan(seconds):
        return None
    return min(max(seconds, 0.0), MAX_RETRY_AFTER)


def classify_conflict(body: str, key: str) -> ConflictKind:
    """Read a 409 body: was the key already used, is it in use, or is this another conflict?"""
    text = body.lower()
    about_key = (key and key.lower() in text) or "idempoten" in text
    if not about_key:
        return "conflict"
    # "in use" is checked first: "key in use" must not pass for "key used".
    if _IN_PROGRESS_WORDS.search(text):
        return "in_progress"
    if _DUPLICATE_WORDS.search(text):
        return "duplicate"
    return "conflict"


# Failures before the request left: nothing can have been applied.
_NOT_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout, httpx.ProxyError,
             httpx.UnsupportedProtocol, httpx.LocalProtocolError)  # fmt: skip
# Answers of a gateway whose upstream may have acted before the answer was lost.
_GATEWAY_LOST = {502, 504}


class HttpConnector:
    """Delivers effects as JSON requests to one HTTP API (one ``httpx.AsyncClient``)."""

    #: Every request carries ``Idempotency-Key``, which the API is expected to honour.
    idempotency_keys = True

    def __init__(
        self,
        name: str,
        *,
        base_url: str,
        operations: Mapping[str, HttpOperation],
        headers: Mapping[str, str] | None = None,
        timeout_s: float = 10.0,
        clock: Callable[[], float] = time.time,
        secrets: Callable[[str], str] | None = None,
    ) -> None:
        """``secrets(name)`` resolves ``${secret:NAME}`` in header values at each request
        (so a rotation applies at once): the vault as far as the binding's scopes allow."""
        self.name = name
        self._secrets = secrets
        self.base_url = base_url
        self.operations = dict(operations)
        self.headers = dict(headers or {})
        self.timeout_s = timeout_s
        self._clock = clock
        self._client: httpx.AsyncClient | None = None
        #: Where effects of operations declared ``batch`` go (set by the node); without
        #: it they are sent one by one like the others.
        self.outbound: OutboundHandoff | None = None
        # Messages end up in the outbox and the journal: never with credentials in them.
        self._shown_url = str(httpx.URL(base_url).copy_with(username=None, password=None))

    @classmethod
    def from_config(
        cls, config: HttpConnectorConfig, secrets: Callable[[str], str] | None = None
    ) -> HttpConnector:
        """The connector for a validated binding."""
        return cls(
            config.name,
            base_url=config.base_url,
            operations=config.operations,
            headers=config.headers,
            timeout_s=config.timeout_s,
            secrets=secrets,
        )

    async def deliver(
        self, operation: str, payload: dict[str, Any], key: str
    ) -> dict[str, Any] | None:
        """Send ``payload`` as JSON to the operation's endpoint with ``Idempotency-Key``."""
        op = self.operations.get(operation)
        if op is None:
            raise UnknownOperation(self.name, operation, list(self.operations))
        try:
            body = orjson.dumps(payload)
        except TypeError as exc:
            raise DeliveryError(
                self.name, operation, f"payload is not JSON: {exc}", retryable=False
            ) from exc
        if op.batch is not None and self.outbound is not None:
            kept = await asyncio.to_thread(
                self.outbound.put, f"{self.name}.{operation}", {"key": key, "payload": payload},
                priority=op.batch.priority,
            )  # fmt: skip
            return {"outbound": "queued" if kept else "dropped", "priority": op.batch.priority}
        where = f"{op.method} {self._shown_url.rstrip('/')}{op.path}"
        # The delivery worker traces the attempt; HTTP passes the span on to the receiver.
        span = current_delivery()
        response = await self._send(op.method, op.path, operation, where, body, key,
                                    span.traceparent)  # fmt: skip
        span.set_status_code(response.status_code)
        return self._read(operation, where, key, response)

    async def send_batch(self, operation: str, body: bytes) -> None:
        """POST one batch of the operation's queued messages to its batch path, keyed by
        the hash of ``body``; DeliveryError as for an effect."""
        op = self.operations.get(operation)
        if op is None or op.batch is None:
            raise DeliveryError(
                self.name, operation, "no operation declared with batch in connectors.yaml",
                retryable=False,
            )  # fmt: skip
        where = f"POST {self._shown_url.rstrip('/')}{op.batch.path}"
        key = hashlib.sha256(body).hexdigest()
        response = await self._send("POST", op.batch.path, operation, where, body, key, None)
        self._read(operation, where, key, response)

    async def _send(
        self, method: str, path: str, operation: str, where: str, body: bytes, key: str,
        traceparent: str | None,
    ) -> httpx.Response:  # fmt: skip
        headers = {
            "Idempotency-Key": key,
            "Content-Type": "application/json",
            **self._secret_headers(operation),
        }
        if traceparent is not None:  # W3C Trace Context: the receiver joins the run's trace
            headers["traceparent"] = traceparent
        try:
            return await self._http().request(method, path, content=body, headers=headers)
        except httpx.TransportError as exc:
            # Refused, reset, timed out: the target may be down or slow; the effect may or
            # may not have been applied, and a retry with the same key is safe either way.
            what = type(exc).__name__
            detail = str(exc) or "no detail"
            raise DeliveryError(
                self.name, operation, f"{where} failed: {what} ({detail})", retryable=True,
                maybe_applied=not isinstance(exc, _NOT_SENT),
            ) from exc  # fmt: skip
        except httpx.HTTPError as exc:
            raise DeliveryError(
                self.name, operation, f"{where} failed: {type(exc).__name__} ({exc})",
                retryable=False,
            ) from exc  # fmt: skip

    async def close(self) -> None:
        """Close the HTTP client and its pooled connections. Safe to call twice."""
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()

    # -- internals --------------------------------------------------------------------
    def _secret_headers(self, operation: str) -> dict[str, str]:
        # ``${secret:NAME}`` in a header value: filled from the vault at each request.
        return {
            k: resolve(v, self._secrets, binding=self.name, operation=operation).text
            for k, v in self.headers.items()
            if has_refs(v)
        }

    def _http(self) -> httpx.AsyncClient:
        # Created on first use, inside the event loop that will use its connections.
        if self._client is None:
            self._client = httpx.AsyncClient(
                base_url=self.base_url,
                # Headers naming secrets are added per request, never kept on the client.
                headers={k: v for k, v in self.headers.items() if not has_refs(v)},
                timeout=self.timeout_s,
                follow_redirects=False,
            )
        return self._client

    def _read(
        self, operation: str, where: str, key: str, response: httpx.Response
    ) -> dict[str, Any]:
        status = response.status_code
        if 200 <= status < 300:
            result: dict[str, Any] = {"status": status, "body": _body(response)}
            # Stripe's convention, also used by others: the answer is a stored replay.
            if response.headers.get("Idempotent-Replayed", "").lower() == "true":
                result["duplicate"] = True
            return result
        text = response.text
        answer = f"{where} answered {status} {response.reason_phrase}".rstrip()
        snippet = f": {text[:200]}" if text.strip() else ""
        if status == 409:
            kind = classify_conflict(text, key)
            if kind == "duplicate":
                return {"status": status, "body": _body(response), "duplicate": True}
            if kind == "in_progress":
                retry_after = parse_retry_after(
                    response.headers.get("Retry-After"), now=self._clock()
                )
                raise DeliveryError(
                    self.name, operation,
                    f"{answer} (an earlier attempt with this key is still in progress)"
                    f"{snippet}",
                    retryable=True, retry_after=retry_after,
                )  # fmt: skip
        if status in (408, 429) or status >= 500:
            retry_after = parse_retry_after(response.headers.get("Retry-After"), now=self._clock())
            raise DeliveryError(
                self.name, operation, f"{answer}{snippet}", retryable=True,
                retry_after=retry_after, maybe_applied=status in _GATEWAY_LOST,
            )  # fmt: skip
        if 300 <= status < 400:
            location = response.headers.get("Location", "?")
            answer += f" (redirects are not followed: Location {location})"
        raise DeliveryError(self.name, operation, f"{answer}{snippet}", retryable=False)


def outbound_sender(connectors: Mapping[str, Connector]) -> Callable[[str, bytes], Awaitable[None]]:
    """How the node's outbound queue sends a batch to a service (``binding.operation``):
    through the binding's HTTP connector; UnavailableError when it may go through later
    (refused, 5xx, 429), the connector's DeliveryError when the service refuses it."""

    async def send(service: str, body: bytes) -> None:
        binding, _, operation = service.partition(".")
        connector = connectors.get(binding)
        if not isinstance(connector, HttpConnector):
            raise ConfigError(
                f"outbound messages for {service}: connectors.yaml has no http binding "
                f"{binding!r} any more"
            )
        try:
            await connector.send_batch(operation, body)
        except DeliveryError as exc:
            if exc.retryable:
                raise UnavailableError(str(exc)) from exc
            raise

    return send


def _body(response: httpx.Response) -> Any:
    """The answer's body, small enough to keep in the outbox row."""
    content = response.content
    if not content:
        return None
    media = response.headers.get("Content-Type", "").split(";")[0].strip().lower()
    if (media == "application/json" or media.endswith("+json")) and len(content) <= MAX_JSON_BODY:
        try:
            return orjson.loads(content)
        except orjson.JSONDecodeError:
            pass
    return response.text[:MAX_TEXT]
