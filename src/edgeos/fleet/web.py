"""JSON in and out for the fleet's handlers, and errors as ``ErrorBody``."""

from __future__ import annotations

import re
from typing import Any, TypeVar

import orjson
from pydantic import BaseModel, ValidationError
from starlette.requests import Request
from starlette.responses import Response

from edgeos.errors import ConfigError, EdgeOSError
from edgeos.protocol.fleet import ErrorBody

M = TypeVar("M", bound=BaseModel)

#: The largest JSON body a fleet endpoint reads (artifacts are uploaded raw, not as JSON).
MAX_JSON_BYTES = 1024 * 1024


def json_response(doc: Any, status: int = 200) -> Response:
    """``doc`` (a pydantic model or plain data) as a JSON response."""
    if isinstance(doc, BaseModel):
        content = doc.model_dump_json().encode()
    else:
        content = orjson.dumps(doc, option=orjson.OPT_NON_STR_KEYS)
    return Response(content, status_code=status, media_type="application/json")


def error_code(exc: EdgeOSError) -> str:
    """A stable machine-readable code from the error's class: ``PermissionDeniedError`` →
    ``permission_denied``."""
    name = type(exc).__name__.removesuffix("Error") or "error"
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


def error_response(exc: EdgeOSError) -> Response:
    """The ErrorBody of ``exc`` with its HTTP status."""
    return json_response(ErrorBody(error=error_code(exc), message=str(exc)), exc.http_status)


async def read_json(request: Request) -> Any:
    """The request's JSON body; ConfigError (400) when it is too large or not JSON."""
    raw = await request.body()
    if len(raw) > MAX_JSON_BYTES:
        raise ConfigError(f"request body of {len(raw)} bytes: at most {MAX_JSON_BYTES}")
    try:
        return orjson.loads(raw or b"{}")
    except orjson.JSONDecodeError as exc:
        raise ConfigError(f"request body is not valid JSON: {exc}") from exc


async def parse_body(request: Request, model: type[M]) -> M:
    """The request's JSON body as ``model``; ConfigError naming each bad field."""
    doc = await read_json(request)
    try:
        return model.model_validate(doc)
    except ValidationError as exc:
        problems = "; ".join(
            f"field '{'.'.join(str(p) for p in err['loc']) or '(body)'}': {err['msg']}"
            for err in exc.errors()
        )
        raise ConfigError(f"{model.__name__}: {problems}") from exc


def query_int(request: Request, name: str, default: int, *, low: int, high: int) -> int:
    """An integer query parameter within [low, high]; ConfigError otherwise."""
    raw = request.query_params.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError as exc:
        raise ConfigError(f"query parameter {name}={raw!r}: not an integer") from exc
    if not low <= value <= high:
        raise ConfigError(f"query parameter {name}={value}: use {low} to {high}")
    return value
