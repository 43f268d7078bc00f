"""The cloud venue: the fleet serves its published models over the Open Inference Protocol.

Devices reach it as they reach the rest of the fleet, with their certificate (mutual
TLS); a forged, expired or revoked certificate is refused (401) and audited before any
model runs. The models are the model artifacts operators publish (``edgeos fleet
publish model ...``): each name is served at its most recently published version,
loaded into ONNX Runtime in the fleet process on its first call (in-process scale).

Under ``/api/v1/cloud``, the V2 REST routes a venue needs:

- ``GET  /api/v1/cloud/v2/health/ready`` (and ``/live``): the link monitor's probe;
- ``GET  /api/v1/cloud/v2/models/{model}``: metadata (inputs with their datatypes);
- ``POST /api/v1/cloud/v2/models/{model}/infer``: JSON or binary tensors, as on a node.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from edgeos.errors import InvalidModelError, InvalidRequestError, ModelNotFoundError
from edgeos.fleet import tables
from edgeos.fleet.auth import require_device
from edgeos.fleet.context import FleetContext, fleet_context
from edgeos.fleet.packing import read_archive
from edgeos.fleet.web import json_response
from edgeos.protocol.datatypes import DatatypeInfo, from_ort_type
from edgeos.protocol.fleet import API
from edgeos.protocol.v2 import HEADER_LENGTH, decode_infer_request, encode_infer_response

#: Where the cloud venue's V2 routes live.
CLOUD = f"{API}/cloud"


@dataclass(frozen=True)
class _Served:
    name: str
    version: str
    session: Any  # onnxruntime.InferenceSession
    inputs: dict[str, tuple[DatatypeInfo, list[int]]]
    outputs: list[tuple[str, DatatypeInfo, list[int]]]


def _shape(dims: list[Any]) -> list[int]:
    return [d if isinstance(d, int) else -1 for d in dims]


class CloudModels:
    """ONNX Runtime sessions of published model artifacts, by name and version."""

    def __init__(self) -> None:
        self._served: dict[tuple[str, str], _Served] = {}
        self._lock = threading.Lock()

    def get(self, ctx: FleetContext, name: str) -> _Served:
        """The latest published version of model ``name``, loaded; ModelNotFoundError if none."""
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
            served = self._served.get((name, row.version))
            if served is not None:
                return served
            blob = conn.execute(
                sa.select(tables.blobs.c.data).where(tables.blobs.c.sha256 == row.sha256)
            ).scalar_one_or_none()
        if blob is None:
            raise ModelNotFoundError(f"model {name} {row.version}: its artifact bytes are missing")
        with self._lock:
            served = self._served.get((name, row.version))
            if served is None:
                served = self._served[(name, row.version)] = _load(
                    ctx, name, str(row.version), bytes(blob)
                )
        return served


def _load(ctx: FleetContext, name: str, version: str, data: bytes) -> _Served:
    import onnxruntime as ort

    files = read_archive(
        data, f"model/{name}/{version}", max_bytes=ctx.config.max_artifact_bytes * 4
    )
    model = next(body for path, body in files.items() if path.endswith(".onnx"))
    options = ort.SessionOptions()
    # As on a node: a shared box must not burn CPU spinning between calls.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.intra_op_num_threads = 1
    try:
        session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types
        raise InvalidModelError(f"model {name} {version} does not load: {exc}") from exc
    inputs: dict[str, tuple[DatatypeInfo, list[int]]] = {}
    outputs: list[tuple[str, DatatypeInfo, list[int]]] = []
    for arg in session.get_inputs():
        info = from_ort_type(arg.type)
        if info is None:
            raise InvalidModelError(f"model {name} input {arg.name} has a type V2 cannot carry")
        inputs[arg.name] = (info, _shape(arg.shape))
    for arg in session.get_outputs():
        info = from_ort_type(arg.type)
        if info is None:
            raise InvalidModelError(f"model {name} output {arg.name} has a type V2 cannot carry")
        outputs.append((arg.name, info, _shape(arg.shape)))
    return _Served(name, version, session, inputs, outputs)


def _run(served: _Served, body: bytes, header: str | None) -> tuple[bytes, int | None]:
    try:
        length = None if header is None else int(header)
    except ValueError as exc:
        raise InvalidRequestError(f"{HEADER_LENGTH} must be an integer, got {header!r}") from exc
    request = decode_infer_request(body, length)
    feeds = {}
    for tensor in request.inputs:
        known = served.inputs.get(tensor.name)
        if known is None:
            raise InvalidRequestError(f"model {served.name} has no input {tensor.name!r}")
        feeds[tensor.name] = tensor.data.astype(known[0].numpy, copy=False)
    missing = sorted(set(served.inputs) - set(feeds))
    if missing:
        raise InvalidRequestError(f"model {served.name} needs input(s) {', '.join(missing)}")
    try:
        arrays = served.session.run(None, feeds)
    except Exception as exc:  # onnxruntime's own errors: shapes, values
        raise InvalidRequestError(f"model {served.name} refused the inputs: {exc}") from exc
    names = [name for name, _, _ in served.outputs]
    return encode_infer_response(
        model_name=served.name,
        model_version=served.version,
        outputs=list(zip(names, arrays, strict=True)),
        request_id=request.id,
    )


def cloud_venue_routes() -> list[Route]:
    """The cloud venue's routes, every one for enrolled devices only."""
    models = CloudModels()

    async def ready(request: Request) -> Response:
        await require_device(request)
        return json_response({"ready": True})

    async def metadata(request: Request) -> Response:
        await require_device(request)
        ctx = fleet_context(request)
        served = await run_in_threadpool(models.get, ctx, request.path_params["model"])
        return json_response(
            {
                "name": served.name,
                "versions": [served.version],
                "platform": "onnxruntime_onnx",
                "inputs": [
                    {"name": n, "datatype": i.name, "shape": s}
                    for n, (i, s) in served.inputs.items()
                ],
                "outputs": [
                    {"name": n, "datatype": i.name, "shape": s} for n, i, s in served.outputs
                ],
            }
        )

    async def infer(request: Request) -> Response:
        await require_device(request)
        ctx = fleet_context(request)
        served = await run_in_threadpool(models.get, ctx, request.path_params["model"])
        body = await request.body()
        content, head = await run_in_threadpool(
            _run, served, body, request.headers.get(HEADER_LENGTH)
        )
        if head is None:
            return Response(content, media_type="application/json")
        return Response(
            content,
            media_type="application/octet-stream",
            headers={"Inference-Header-Content-Length": str(head)},
        )

    v2 = f"{CLOUD}/v2"
    return [
        Route(f"{v2}/models/{{model}}/infer", infer, methods=["POST"]),
        Route(f"{v2}/health/ready", ready, methods=["GET"]),
        Route(f"{v2}/health/live", ready, methods=["GET"]),
        Route(f"{v2}/models/{{model}}", metadata, methods=["GET"]),
    ]
