"""The demo's supplier: a real HTTP service on loopback, the target of the node's connectors.

``POST /orders`` takes a reorder ``{"store", "sku", "qty", ...}`` and ``POST /messages`` a
customer message ``{"to", "text", ...}``. Both require an ``Idempotency-Key`` header and
apply a request once per key, as payment and ordering APIs do: a repeat with the same
body gets the stored answer again with ``Idempotent-Replayed: true``; a repeat with
another body is refused with 409. ``GET /stats`` counts what was applied and refused, and
``GET /orders`` lists the orders.

To show that deduplication matters, the service can be told to lose some answers
(``drop_reply_rate``): it applies the request and then closes the connection without
replying, as when a network drops an acknowledgement. The node cannot know the order went
through, so it sends it again with the same key, and the supplier replays its answer.

Accepted orders become :class:`~edgeos.demo.store.Shipment` s that the store receives at its
next simulated day (an expedited delivery): :meth:`SupplierService.take_shipments`. SKUs
the supplier rations (``fill_rates``) are shipped short: that share of what was ordered.
"""

from __future__ import annotations

import json
import math
import random
import threading
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any

from edgeos.demo.store import Shipment

MAX_BODY = 64 * 1024


@dataclass
class SupplierStats:
    """What the supplier has seen, per kind of request."""

    orders: int = 0
    """Orders applied (one per distinct key)."""
    messages: int = 0
    """Messages applied (one per distinct key)."""
    replays: int = 0
    """Repeats of an applied key, answered from the record and not applied again."""
    mismatched: int = 0
    """Repeats of a key with another body, refused with 409."""
    dropped_replies: int = 0
    """Requests applied whose answer the service deliberately lost."""
    requests: int = 0
    """Every POST received, including refused and malformed ones."""
    per_key: Counter[str] = field(default_factory=Counter)
    """How many requests carried each idempotency key."""

    def as_dict(self) -> dict[str, int]:
        """The counts, as ``GET /stats`` shows them."""
        return {
            "orders": self.orders,
            "messages": self.messages,
            "replays": self.replays,
            "mismatched": self.mismatched,
            "dropped_replies": self.dropped_replies,
            "requests": self.requests,
        }


@dataclass(frozen=True)
class Applied:
    """One applied request: what was asked, and the answer stored for replays."""

    kind: str
    key: str
    body: dict[str, Any]
    answer: dict[str, Any]


_REQUIRED: dict[str, dict[str, type]] = {
    "order": {"store": str, "sku": str, "qty": int},
    "message": {"to": str, "text": str},
}
_ROUTES = {"/orders": "order", "/messages": "message"}


class SupplierService:
    """``with SupplierService() as s:`` serves on a free loopback port until the block ends."""

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        drop_reply_rate: float = 0.0,
        seed: int = 3,
        fill_rates: Mapping[str, float] | None = None,
    ) -> None:
        if not 0.0 <= drop_reply_rate < 1.0:
            raise ValueError("drop_reply_rate must be in [0, 1)")
        self.fill_rates = dict(fill_rates or {})
        if not all(0.0 < rate <= 1.0 for rate in self.fill_rates.values()):
            raise ValueError("fill rates must be in (0, 1]")
        self.stats = SupplierStats()
        self.applied: dict[str, Applied] = {}
        self._lock = threading.Lock()
        self._unshipped: list[Shipment] = []
        self._drop_rate = drop_reply_rate
        self._rng = random.Random(seed)
        self.server = ThreadingHTTPServer((host, 0), self._handler())
        self.server.daemon_threads = True
        self.url = f"http://{host}:{self.server.server_address[1]}"
        self._thread = threading.Thread(
            target=self.server.serve_forever, name="supplier", daemon=True
        )
        self._started = False
        self._closed = False

    # -- life cycle -------------------------------------------------------------------
    def start(self) -> SupplierService:
        """Serve in a background thread."""
        self._thread.start()
        self._started = True
        return self

    def stop(self) -> None:
        """Stop serving and close the socket. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        if self._started:
            self.server.shutdown()
            self._thread.join()
        self.server.server_close()

    @property
    def running(self) -> bool:
        """True while the service thread is alive."""
        return self._thread.is_alive()

    def __enter__(self) -> SupplierService:
        return self.start()

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # -- what the store and the demo read ------------------------------------------------
    def take_shipments(self) -> list[Shipment]:
        """Orders applied since the last call, as shipments on their way to the store."""
        with self._lock:
            shipped, self._unshipped = self._unshipped, []
        return shipped

    def snapshot(self) -> dict[str, int]:
        """A consistent copy of the counts."""
        with self._lock:
            return self.stats.as_dict()

    def keys(self, kind: str) -> dict[str, int]:
        """How many requests each applied key of ``kind`` ("order" or "message") carried."""
        with self._lock:
            return {k: self.stats.per_key[k] for k, a in self.applied.items() if a.kind == kind}

    # -- HTTP ---------------------------------------------------------------------------
    def _apply(self, kind: str, key: str, body: dict[str, Any]) -> tuple[int, dict[str, Any], bool]:
        """Apply once per key; returns (status, answer, replayed)."""
        with self._lock:
            self.stats.per_key[key] += 1
            earlier = self.applied.get(key)
            if earlier is not None:
                if earlier.kind != kind or earlier.body != body:
                    self.stats.mismatched += 1
                    return (
                        409,
                        {"error": f"Idempotency-Key {key} was sent before with another request"},
                        False,
                    )
                self.stats.replays += 1
                return 200, earlier.answer, True
            if kind == "order":
                self.stats.orders += 1
                answer = {"order_id": f"PO-{self.stats.orders:05d}", "status": "accepted"}
                shipped = math.floor(body["qty"] * self.fill_rates.get(body["sku"], 1.0))
                self._unshipped.append(
                    Shipment(answer["order_id"], body["store"], body["sku"], shipped)
                )
            else:
                self.stats.messages += 1
                answer = {"message_id": f"MSG-{self.stats.messages:05d}", "status": "sent"}
            self.applied[key] = Applied(kind, key, body, answer)
            return 201, answer, False

    def _drop_this_reply(self) -> bool:
        with self._lock:
            drop = self._rng.random() < self._drop_rate
            if drop:
                self.stats.dropped_replies += 1
            return drop

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        service = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path == "/stats":
                    self._reply(200, service.snapshot())
                elif self.path == "/orders":
                    with service._lock:
                        orders = [
                            {"key": a.key, **a.body, **a.answer}
                            for a in service.applied.values()
                            if a.kind == "order"
                        ]
                    self._reply(200, {"orders": orders})
                else:
                    self._reply(404, {"error": f"no such resource {self.path}"})

            def do_POST(self) -> None:
                with service._lock:
                    service.stats.requests += 1
                kind = _ROUTES.get(self.path)
                if kind is None:
                    self._reply(404, {"error": f"no such resource {self.path}"})
                    return
                key = self.headers.get("Idempotency-Key", "").strip()
                if not key:
                    self._reply(400, {"error": "an Idempotency-Key header is required"})
                    return
                body, problem = self._read_body(kind)
                if body is None:
                    self._reply(422, {"error": problem})
                    return
                status, answer, replayed = service._apply(kind, key, body)
                if status == 201 and service._drop_this_reply():
                    # Applied, but the answer is lost on the way: the client sees a
                    # connection closed without a response and must try again.
                    self.close_connection = True
                    return
                self._reply(status, answer, replayed=replayed)

            def _read_body(self, kind: str) -> tuple[dict[str, Any] | None, str]:
                try:
                    length = int(self.headers.get("Content-Length", "0"))
                except ValueError:
                    return None, "Content-Length is not a number"
                if not 0 < length <= MAX_BODY:
                    return None, f"the body must be JSON of 1 to {MAX_BODY} bytes"
                try:
                    body = json.loads(self.rfile.read(length))
                except ValueError as exc:
                    return None, f"the body is not JSON: {exc}"
                if not isinstance(body, dict):
                    return None, "the body must be a JSON object"
                for name, kind_of in _REQUIRED[kind].items():
                    value = body.get(name)
                    if not isinstance(value, kind_of) or isinstance(value, bool):
                        return None, f"field {name!r} must be a {kind_of.__name__}"
                if kind == "order" and body["qty"] <= 0:
                    return None, "field 'qty' must be positive"
                return body, ""

            def _reply(self, status: int, doc: Any, *, replayed: bool = False) -> None:
                data = json.dumps(doc).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                if replayed:
                    self.send_header("Idempotent-Replayed", "true")
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:
                """Quiet: the demo reports counts, not a request log."""

        return Handler
