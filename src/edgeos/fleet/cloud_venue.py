"""The cloud venue: the fleet serves its published models over the Open Inference Protocol.

Devices reach it as they reach the rest of the fleet, with their certificate (mutual
TLS); a forged, expired or revoked certificate is refused (401) and audited before any
model runs. The models are the model artifacts operators publish (``edgeos fleet
publish model ...``): each name is served at its most recently published version.

These routes are the front door: they check the device, decode and check the V2 request
against the model's signature and encode the answer. Running the model is a
``CloudBackend``'s job (``edgeos.fleet.cloud_backend``): in ONNX Runtime in the fleet
process, loaded on its first call (the default), or on a Ray cluster when the fleet's
``cloud_ray`` setting names one (``edgeos.fleet.cloud_ray``, the ``ray`` extra).

Under ``/api/v1/cloud``, the V2 REST routes a venue needs:

- ``GET  /api/v1/cloud/v2/health/ready``: the link monitor's probe: 503 when the backend
  cannot run models now (a Ray cluster that does not answer); ``/live``: the fleet answers;
- ``GET  /api/v1/cloud/v2/models/{model}``: metadata (inputs with their datatypes);
- ``POST /api/v1/cloud/v2/models/{model}/infer``: JSON or binary tensors, as on a node.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from edgeos.errors import InvalidRequestError, ModelNotFoundError
from edgeos.fleet import tables
from edgeos.fleet.auth import require_device
from edgeos.fleet.cloud_backend import (
    CloudBackend,
    InProcessBackend,
    PublishedModel,
    Ran,
    Signature,
)
from edgeos.fleet.context import FleetContext, fleet_context
from edgeos.fleet.packing import read_archive
from edgeos.fleet.web import json_response
from edgeos.protocol.fleet import API
from edgeos.protocol.v2 import (
    HEADER_LENGTH,
    InferRequest,
    decode_infer_request,
    encode_infer_response,
)

if TYPE_CHECKING:
    import numpy as np

#: Where the cloud venue's V2 routes live.
CLOUD = f"{API}/cloud"
#: The response header naming the replica that ran the model (backends with replicas).
REPLICA_HEADER = "X-Edgeos-Replica"
#: Answers up to this many bytes of tensors are encoded on the event loop: handing them to
#: the thread pool would cost more than encoding them.
INLINE_ANSWER_BYTES = 64 * 1024


def latest_model(ctx: FleetContext, name: str) -> PublishedModel:
    """The latest published version of model ``name``; ModelNotFoundError if none."""
    a = tables.artifacts
    with ctx.db.read() as conn:
        row = conn.execute(
            sa.select(a.c.version, a.c.sha256)
            .where(a.c.kind == "model", a.c.name == name)
            .order_by(a.c.published_at.desc())
            .limit(1)
        ).first()
    if row is None:
        raise ModelNotFoundError(f"the cloud venue serves no model {name!r}")
    return PublishedModel(name, str(row.version), str(row.sha256))


def model_file(ctx: FleetContext, model: PublishedModel) -> bytes:
    """The ONNX file inside a published model artifact, from the fleet's blob store."""
    with ctx.db.read() as conn:
        blob = conn.execute(
            sa.select(tables.blobs.c.data).where(tables.blobs.c.sha256 == model.sha256)
        ).scalar_one_or_none()
    if blob is None:
        raise ModelNotFoundError(
            f"model {model.name} {model.version}: its artifact bytes are missing"
        )
    files = read_archive(
        bytes(blob),
        f"model/{model.name}/{model.version}",
        max_bytes=ctx.config.max_artifact_bytes * 4,
    )
    return next(body for path, body in files.items() if path.endswith(".onnx"))


def open_backend(ctx: FleetContext) -> CloudBackend:
    """The backend ``ctx``'s settings ask for (blocking: connecting to Ray takes seconds)."""
    if ctx.config.cloud_ray is None:
        return InProcessBackend(lambda model: model_file(ctx, model))
    from edgeos.fleet.cloud_ray import RayBackend, deploy

    handle = deploy(ctx.config.cloud_ray, ctx.config.cloud_replicas)
    return RayBackend(handle, lambda model: model_file(ctx, model))


def _decoded(
    ctx: FleetContext, name: str, body: bytes, header: str | None
) -> tuple[PublishedModel, InferRequest]:
    """The model asked for and the decoded request (blocking: a database read, parsing)."""
    model = latest_model(ctx, name)
    try:
        length = None if header is None else int(header)
    except ValueError as exc:
        raise InvalidRequestError(f"{HEADER_LENGTH} must be an integer, got {header!r}") from exc
    return model, decode_infer_request(body, length)


def _feeds(
    model: PublishedModel, signature: Signature, request: InferRequest
) -> dict[str, np.ndarray[Any, Any]]:
    """The request's tensors as the model's inputs; InvalidRequestError if they are not."""
    feeds = {}
    for tensor in request.inputs:
        known = signature.inputs.get(tensor.name)
        if known is None:
            raise InvalidRequestError(f"model {model.name} has no input {tensor.name!r}")
        feeds[tensor.name] = tensor.data.astype(known[0].numpy, copy=False)
    missing = sorted(set(signature.inputs) - set(feeds))
    if missing:
        raise InvalidRequestError(f"model {model.name} needs input(s) {', '.join(missing)}")
    return feeds


def _answer(
    model: PublishedModel, signature: Signature, ran: Ran, request_id: str | None
) -> tuple[bytes, int | None]:
    names = [name for name, _, _ in signature.outputs]
    return encode_infer_response(
        model_name=model.name,
        model_version=model.version,
        outputs=list(zip(names, ran.arrays, strict=True)),
        request_id=request_id,
    )


def cloud_venue_routes() -> list[Route]:
    """The cloud venue's routes, every one for enrolled devices only."""
    backends: list[CloudBackend] = []  # the app's one backend, opened on the first call

    async def backend(ctx: FleetContext) -> CloudBackend:
        if not backends:
            opened = await run_in_threadpool(open_backend, ctx)
            if not backends:  # another first call may have opened one meanwhile
                backends.append(opened)
        return backends[0]

    async def live(request: Request) -> Response:
        await require_device(request)
        return json_response({"live": True})

    async def ready(request: Request) -> Response:
        await require_device(request)
        await (await backend(fleet_context(request))).ready()
        return json_response({"ready": True})

    async def metadata(request: Request) -> Response:
        await require_device(request)
        ctx = fleet_context(request)
        model = await run_in_threadpool(latest_model, ctx, request.path_params["model"])
        signature = await (await backend(ctx)).signature(model)
        return json_response(
            {
                "name": model.name,
                "versions": [model.version],
                "platform": "onnxruntime_onnx",
                "inputs": [
                    {"name": n, "datatype": i.name, "shape": s}
                    for n, (i, s) in signature.inputs.items()
                ],
                "outputs": [
                    {"name": n, "datatype": i.name, "shape": s} for n, i, s in signature.outputs
                ],
            }
        )

    async def infer(request: Request) -> Response:
        await require_device(request)
        ctx = fleet_context(request)
        body = await request.body()
        model, decoded = await run_in_threadpool(
            _decoded, ctx, request.path_params["model"], body, request.headers.get(HEADER_LENGTH)
        )
        runner = await backend(ctx)
        signature = await runner.signature(model)
        ran = await runner.run(model, _feeds(model, signature, decoded))
        if sum(array.nbytes for array in ran.arrays) <= INLINE_ANSWER_BYTES:
            content, head = _answer(model, signature, ran, decoded.id)
        else:
            content, head = await run_in_threadpool(_answer, model, signature, ran, decoded.id)
        headers = {} if ran.replica is None else {REPLICA_HEADER: ran.replica}
        if head is None:
            return Response(content, media_type="application/json", headers=headers)
        headers["Inference-Header-Content-Length"] = str(head)
        return Response(content, media_type="application/octet-stream", headers=headers)

    v2 = f"{CLOUD}/v2"
    return [
        Route(f"{v2}/models/{{model}}/infer", infer, methods=["POST"]),
        Route(f"{v2}/health/ready", ready, methods=["GET"]),
        Route(f"{v2}/health/live", live, methods=["GET"]),
        Route(f"{v2}/models/{{model}}", metadata, methods=["GET"]),
    ]
