"""Open Inference Protocol (KServe V2) REST routes over a :class:`ModelHost`.

Errors use the protocol's shape, ``{"error": "..."}``, with 400 for a bad request and 404
for an unknown model or version. Requests without a Content-Type are accepted, as Triton
does, because ``tritonclient`` sends none.
"""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from edgeos import __version__
from edgeos.errors import EdgeOSError, InvalidRequestError, NotFoundError
from edgeos.protocol.v2 import (
    HEADER_LENGTH,
    decode_infer_request,
    encode_infer_response,
    error_body,
)
from edgeos.runtime.host import ModelHost

JSON = "application/json"


def v2_routes(host: ModelHost) -> list[Route]:
    """The protocol's routes, served from ``host``."""
    api = _V2(host)
    model = "/v2/models/{model}"
    versioned = "/v2/models/{model}/versions/{version}"
    # Routes are matched in order: the hot one first.
    return [
        Route(f"{model}/infer", api.infer, methods=["POST"]),
        Route(f"{versioned}/infer", api.infer, methods=["POST"]),
        Route("/v2", api.server_metadata, methods=["GET"]),
        Route("/v2/health/live", api.live, methods=["GET"]),
        Route("/v2/health/ready", api.live, methods=["GET"]),
        Route(model, api.model_metadata, methods=["GET"]),
        Route(versioned, api.model_metadata, methods=["GET"]),
        Route(f"{model}/ready", api.model_ready, methods=["GET"]),
        Route(f"{versioned}/ready", api.model_ready, methods=["GET"]),
    ]


def error_response(exc: EdgeOSError) -> Response:
    """An EdgeOSError as the protocol's error body with the error's HTTP status."""
    return Response(error_body(str(exc)), status_code=exc.http_status, media_type=JSON)


def _json(doc: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(doc), status_code=status, media_type=JSON)


class _V2:
    def __init__(self, host: ModelHost) -> None:
        self.host = host

    async def server_metadata(self, request: Request) -> Response:
        return _json(
            {"name": "edgeos", "version": __version__, "extensions": ["binary_tensor_data"]}
        )

    async def live(self, request: Request) -> Response:
        return _json({"live": True})

    async def model_metadata(self, request: Request) -> Response:
        name, version = _target(request)
        try:
            manifest = self.host.resolve(name, version)
            versions = (
                [version]
                if version is not None
                else [m.version for m in self.host.registry.versions(name)]
            )
        except EdgeOSError as exc:
            return error_response(exc)
        return _json(
            {
                "name": manifest.name,
                "versions": versions,
                "platform": "onnxruntime_onnx",
                "inputs": [t.model_dump() for t in manifest.inputs],
                "outputs": [t.model_dump() for t in manifest.outputs],
            }
        )

    async def model_ready(self, request: Request) -> Response:
        name, version = _target(request)
        try:
            manifest = self.host.resolve(name, version)
            await asyncio.get_running_loop().run_in_executor(
                None, self.host.load, manifest.name, manifest.version
            )
        except NotFoundError as exc:
            return error_response(exc)
        except EdgeOSError as exc:
            return Response(error_body(str(exc)), status_code=503, media_type=JSON)
        return _json({"name": manifest.name, "version": manifest.version, "ready": True})

    async def infer(self, request: Request) -> Response:
        name, version = _target(request)
        try:
            manifest = self.host.resolve(name, version)
        except EdgeOSError as exc:
            self.host.record_error(name, version or "")
            return error_response(exc)
        key = (manifest.name, manifest.version)
        try:
            header = _header_length(request.headers.get(HEADER_LENGTH))
            decoded = decode_infer_request(await request.body(), header)
            inputs = {}
            for tensor in decoded.inputs:
                if tensor.name in inputs:
                    raise InvalidRequestError(f"input '{tensor.name}' is given twice")
                inputs[tensor.name] = tensor.data
        except EdgeOSError as exc:
            self.host.record_error(*key)
            return error_response(exc)
        wanted = [o.name for o in decoded.outputs] if decoded.outputs else None
        try:
            result = await self.host.infer_async(
                manifest.name, inputs, version=manifest.version, outputs=wanted
            )
        except EdgeOSError as exc:  # counted by the host
            return error_response(exc)
        if decoded.outputs is not None:
            binary = {o.name for o in decoded.outputs if o.binary}
        else:
            binary = set(result.outputs) if decoded.binary_output_default else set()
        try:
            body, head_length = encode_infer_response(
                model_name=result.model,
                model_version=result.version,
                outputs=list(result.outputs.items()),
                binary=binary,
                request_id=decoded.id,
            )
        except EdgeOSError as exc:
            self.host.record_error(*key)
            return error_response(exc)
        if head_length is None:
            return Response(body, media_type=JSON)
        return Response(
            body,
            media_type="application/octet-stream",
            headers={"Inference-Header-Content-Length": str(head_length)},
        )


def _target(request: Request) -> tuple[str, str | None]:
    params = request.path_params
    return params["model"], params.get("version")


def _header_length(value: str | None) -> int | None:
    if value is None:
        return None
    try:
        return int(value)
    except ValueError as exc:
        raise InvalidRequestError(
            f"Inference-Header-Content-Length must be an integer, got {value!r}"
        ) from exc
