"""Telemetry on the fleet's HTTP API, and the fleet's own metrics at ``/metrics``.

Device (mTLS):
- ``POST /api/v1/telemetry``: a zstd-compressed :class:`~edgeos.protocol.telemetry.TelemetryBatch`
  → :class:`~edgeos.protocol.telemetry.TelemetryAck`. Refused, audited and without any
  change to stored data: no or a revoked certificate (401), another device's batch (403),
  a body too large, not zstd, not a batch, or with a bad KPI record or sketch (400), a
  replay (409: a batch accepted before, or older; see ``telemetry_store.ingest`` for how a
  device whose sequence started again is told apart).

Operator (``read`` scope), over :mod:`edgeos.fleet.telemetry_store` (times are Unix
seconds; ``start`` defaults to an hour before ``end``, ``end`` to now):
- ``GET /api/v1/telemetry/kpis?start=&end=&bucket=&device=&group=&agent=&model=``
  → ``{"points": [KpiPoint...]}``
- ``GET /api/v1/telemetry/kpis/{device|agent|model}?start=&end=&...`` → ``{key: KpiPoint}``
- ``GET /api/v1/telemetry/devices?group=`` → ``[DeviceTelemetry...]``
- ``GET /api/v1/telemetry/events?kind=&device=&start=&end=&limit=`` → ``[TelemetryEvent...]``
- ``GET /metrics``: Prometheus text: requests by method, route and status with their
  latency, devices by status (and how many were seen lately), telemetry batches, records
  and bytes received, batches refused by reason.
"""

from __future__ import annotations

import math
import time
from typing import Any

import sqlalchemy as sa
from starlette.concurrency import run_in_threadpool
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from edgeos.errors import (
    AuthenticationError,
    ConfigError,
    ConflictError,
    EdgeOSError,
    PermissionDeniedError,
)
from edgeos.fleet import tables, telemetry_store
from edgeos.fleet.auth import require_device, require_operator
from edgeos.fleet.context import fleet_context
from edgeos.fleet.db import FleetDatabase, audit_refusal
from edgeos.fleet.web import json_response, query_int
from edgeos.protocol.fleet import API
from edgeos.protocol.telemetry import MAX_BATCH_BYTES
from edgeos.telemetry.metrics import MetricsRegistry

#: Seconds within which a device counts as seen lately (a few sync intervals).
SEEN_LATELY_S = 300.0
_REASONS = {
    AuthenticationError: "unauthenticated",
    PermissionDeniedError: "foreign",
    ConflictError: "replayed",
    ConfigError: "malformed",
}


class FleetMetrics:
    """The fleet replica's metrics, and the middleware that times every request."""

    def __init__(self, db: FleetDatabase) -> None:
        self.db = db
        self.registry = MetricsRegistry()
        self.requests = self.registry.histogram(
            "edgeos_fleet_request_duration_seconds",
            "Time to answer HTTP requests, by method, route and status.",
            ("method", "route", "status"),
        )
        self.registry.histogram_count(
            "edgeos_fleet_requests_total", "HTTP requests answered.", self.requests
        )
        self.batches = self.registry.counter(
            "edgeos_fleet_telemetry_batches_total",
            "Telemetry batches received, by outcome (stored, or why refused).",
            ("outcome",),
        )
        self.records = self.registry.counter(
            "edgeos_fleet_telemetry_records_total", "Telemetry records stored, by kind.", ("kind",)
        )
        self.bytes = self.registry.counter(
            "edgeos_fleet_telemetry_bytes_total", "Compressed telemetry bytes stored."
        )
        self.registry.collector(self._devices)

    def _devices(self) -> list[str]:
        d = tables.devices
        recent = time.time() - SEEN_LATELY_S
        with self.db.read() as conn:
            by_status = conn.execute(sa.select(d.c.status, sa.func.count()).group_by(d.c.status))
            counts = {str(s): int(n) for s, n in by_status}
            seen = conn.execute(
                sa.select(sa.func.count()).where(d.c.status == "active", d.c.last_seen >= recent)
            ).scalar_one()
        lines = [
            "# HELP edgeos_fleet_devices Devices enrolled, by status.",
            "# TYPE edgeos_fleet_devices gauge",
            *(f'edgeos_fleet_devices{{status="{s}"}} {n}' for s, n in sorted(counts.items())),
            f"# HELP edgeos_fleet_devices_seen Active devices that synced in the last "
            f"{SEEN_LATELY_S:.0f} s.",
            "# TYPE edgeos_fleet_devices_seen gauge",
            f"edgeos_fleet_devices_seen {seen}",
        ]
        return lines

    def middleware(self) -> Middleware:
        """Starlette middleware timing every request into :attr:`requests`."""
        return Middleware(_Timing, metrics=self)


class _Timing:
    """Pure ASGI (no body buffering: long polls and uploads pass straight through)."""

    def __init__(self, app: ASGIApp, metrics: FleetMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def sending(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            route = scope.get("route")
            # The route's template, not the path: a label per device id would never end.
            path = getattr(route, "path", None) or "unmatched"
            self.metrics.requests.observe(
                time.perf_counter() - started, scope["method"], path, str(status)
            )


def telemetry_routes(metrics: FleetMetrics) -> list[Route]:
    """The telemetry endpoints and ``/metrics``."""

    async def receive(request: Request) -> Response:
        ctx = fleet_context(request)
        what = f"{request.method} {request.url.path}"
        actor = "anonymous"
        try:
            device = await require_device(request)  # audits its own refusals
            actor = device.actor
            body = await _body(request)
            batch = await run_in_threadpool(telemetry_store.decode_batch, body)
            ack = await run_in_threadpool(
                telemetry_store.ingest, ctx.db, device.device_id, batch, len(body)
            )
        except EdgeOSError as exc:
            reason = next((r for t, r in _REASONS.items() if isinstance(exc, t)), "failed")
            metrics.batches.inc(reason)
            if not isinstance(exc, AuthenticationError):
                await run_in_threadpool(
                    audit_refusal, ctx.db, actor=actor, action="telemetry", target=what,
                    detail=str(exc),
                )  # fmt: skip
            raise
        metrics.batches.inc("stored")
        metrics.bytes.inc(amount=len(body))
        for record in batch.records:
            metrics.records.inc(record.kind)
        return json_response(ack)

    async def kpis(request: Request) -> Response:
        await require_operator(request, "read")
        q = _filters(request)
        bucket = query_int(request, "bucket", 300, low=60, high=86_400)
        points = await run_in_threadpool(
            lambda: telemetry_store.kpi_series(metrics.db, bucket_s=bucket, **q)
        )
        return json_response({"points": [p.to_json() for p in points]})

    async def kpis_by(request: Request) -> Response:
        await require_operator(request, "read")
        q = _filters(request)
        dimension = request.path_params["dimension"]
        found = await run_in_threadpool(lambda: telemetry_store.kpi_by(metrics.db, dimension, **q))
        return json_response({k: p.to_json() for k, p in found.items()})

    async def devices(request: Request) -> Response:
        await require_operator(request, "read")
        group = request.query_params.get("group")
        found = await run_in_threadpool(
            lambda: telemetry_store.latest_per_device(metrics.db, group=group)
        )
        return json_response([d.to_json() for d in found])

    async def events(request: Request) -> Response:
        await require_operator(request, "read")
        kind = request.query_params.get("kind")
        if kind is not None and kind not in ("alert", "trace", "log"):
            raise ConfigError(f"query parameter kind={kind!r}: use alert, trace or log")
        found = await run_in_threadpool(
            lambda: telemetry_store.events(
                metrics.db, kind=kind, device_id=request.query_params.get("device"),
                start=_float(request, "start"), end=_float(request, "end"),
                limit=query_int(request, "limit", 100, low=1, high=1000),
            )
        )  # fmt: skip
        return json_response([e.to_json() for e in found])

    async def scrape(request: Request) -> Response:
        await require_operator(request, "read")
        text = await run_in_threadpool(metrics.registry.render)
        return Response(text, media_type="text/plain; version=0.0.4; charset=utf-8")

    return [
        Route(f"{API}/telemetry", receive, methods=["POST"]),
        Route(f"{API}/telemetry/kpis", kpis, methods=["GET"]),
        Route(f"{API}/telemetry/kpis/{{dimension}}", kpis_by, methods=["GET"]),
        Route(f"{API}/telemetry/devices", devices, methods=["GET"]),
        Route(f"{API}/telemetry/events", events, methods=["GET"]),
        Route("/metrics", scrape, methods=["GET"]),
    ]


async def _body(request: Request) -> bytes:
    """The request body, refused once it passes the batch limit (not read further)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > MAX_BATCH_BYTES:
        raise ConfigError(f"telemetry batch of {declared} bytes: at most {MAX_BATCH_BYTES}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BATCH_BYTES:
            raise ConfigError(f"telemetry batch of more than {MAX_BATCH_BYTES} bytes: refused")
        chunks.append(chunk)
    return b"".join(chunks)


def _float(request: Request, name: str) -> float | None:
    raw = request.query_params.get(name)
    if raw is None:
        return None
    try:
        value = float(raw)
    except ValueError as exc:
        raise ConfigError(f"query parameter {name}={raw!r}: not a number") from exc
    if not math.isfinite(value):
        raise ConfigError(f"query parameter {name}={raw!r}: not a finite number")
    return value


def _filters(request: Request) -> dict[str, Any]:
    end = _float(request, "end") or time.time()
    start = _float(request, "start")
    params = request.query_params
    return {
        "start": end - 3600.0 if start is None else start,
        "end": end,
        "device_id": params.get("device"),
        "group": params.get("group"),
        "agent": params.get("agent"),
        "model": params.get("model"),
    }
