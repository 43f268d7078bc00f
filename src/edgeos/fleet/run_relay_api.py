"""The relay of run envelopes over HTTP, for devices (mTLS) only.

- ``POST /api/v1/runs/envelopes``: a sealed run (an ``Envelope``) for another device;
  the sender must be the device that sealed it.
- ``GET /api/v1/runs/envelopes``: the envelopes waiting for the asking device.
- ``DELETE /api/v1/runs/envelopes/{envelope_id}``: the asking device took one.
- ``GET /api/v1/revocations``: the device certificates revoked and still within their
  validity (``Revocations``): what a device must refuse runs from, however they arrive.

Refusals are audited in a transaction of their own and change nothing else.
"""

from __future__ import annotations

import time

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from edgeos.errors import EdgeOSError
from edgeos.fleet import devices, run_relay
from edgeos.fleet.audited import audited_body
from edgeos.fleet.auth import require_device
from edgeos.fleet.context import fleet_context
from edgeos.fleet.db import audit_refusal
from edgeos.fleet.web import json_response
from edgeos.protocol.fleet import API
from edgeos.protocol.migration import Envelope, Revocations

PATH = f"{API}/runs/envelopes"


async def send_envelope(request: Request) -> Response:
    identity = await require_device(request)
    ctx = fleet_context(request)
    envelope = await audited_body(request, Envelope, identity, "run.relay")

    def work() -> None:
        try:
            with ctx.db.begin() as conn:
                run_relay.store(conn, identity.device_id, envelope, now=time.time())
        except EdgeOSError as exc:
            audit_refusal(ctx.db, actor=identity.actor, action="run.relay",
                          target=f"device/{envelope.statement.destination}", detail=str(exc))  # fmt: skip
            raise

    await run_in_threadpool(work)
    return Response(status_code=202)


async def fetch_envelopes(request: Request) -> Response:
    identity = await require_device(request)
    ctx = fleet_context(request)

    def work() -> list[bytes]:
        with ctx.db.begin() as conn:
            return run_relay.waiting(conn, identity.device_id, now=time.time())

    bodies = await run_in_threadpool(work)
    # Kept as their sources sent them: each is a RunEnvelopes item already.
    content = b'{"envelopes":[' + b",".join(bodies) + b"]}"
    return Response(content, media_type="application/json")


async def acknowledge_envelope(request: Request) -> Response:
    identity = await require_device(request)
    ctx = fleet_context(request)
    envelope_id = request.path_params["envelope_id"]

    def work() -> None:
        with ctx.db.begin() as conn:
            run_relay.acknowledge(conn, identity.device_id, envelope_id)

    await run_in_threadpool(work)
    return Response(status_code=204)


async def fetch_revocations(request: Request) -> Response:
    await require_device(request)
    ctx = fleet_context(request)

    def work() -> Revocations:
        with ctx.db.read() as conn:
            return devices.revocations(conn, now=time.time())

    return json_response(await run_in_threadpool(work))


def run_relay_routes() -> list[Route]:
    """The device routes of the relay."""
    return [
        Route(PATH, send_envelope, methods=["POST"]),
        Route(PATH, fetch_envelopes, methods=["GET"]),
        Route(f"{PATH}/{{envelope_id}}", acknowledge_envelope, methods=["DELETE"]),
        Route(f"{API}/revocations", fetch_revocations, methods=["GET"]),
    ]
