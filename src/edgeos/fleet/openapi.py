"""The OpenAPI 3.1 document of the fleet API, built from the app's routes.

Every route is listed; the ones below are described with their request and response
models (their JSON Schemas come from the pydantic models themselves) and the
credentials they need. A route added without a description is still listed, so the
document never hides an endpoint.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel
from starlette.routing import BaseRoute, Route

from edgeos.fleet.api_models import (
    JoinTokenCreate,
    JoinTokenCreated,
    LabelsUpdate,
    TokenCreate,
    TokenCreated,
)
from edgeos.protocol.fleet import (
    EnrollRequest,
    EnrollResponse,
    ErrorBody,
    SyncRequest,
    SyncResponse,
)

# (method, path) → (summary, credential, request model, response model).
# Credential: None (public), "device" (mTLS) or an operator scope.
_DESCRIBED: dict[tuple[str, str], tuple[str, str | None, type[BaseModel] | None, type[BaseModel] | None]] = {
    ("GET", "/api/v1/ca"): ("The fleet CA certificate (PEM); check it against your token's pin", None, None, None),
    ("GET", "/api/v1/health"): ("Liveness", None, None, None),
    ("POST", "/api/v1/enroll"): ("Enroll a device with a join token and a CSR", None, EnrollRequest, EnrollResponse),
    ("POST", "/api/v1/sync"): ("Report state, get the desired state (long poll with wait_s)", "device", SyncRequest, SyncResponse),
    ("GET", "/api/v1/whoami"): ("The calling operator token", "read", None, None),
    ("POST", "/api/v1/tokens"): ("Create an operator token", "admin", TokenCreate, TokenCreated),
    ("GET", "/api/v1/tokens"): ("List operator tokens", "admin", None, None),
    ("DELETE", "/api/v1/tokens/{token_id}"): ("Revoke an operator token", "admin", None, None),
    ("POST", "/api/v1/join-tokens"): ("Create a join token for a group", "admin", JoinTokenCreate, JoinTokenCreated),
    ("GET", "/api/v1/devices"): ("List devices (?group=, ?label=K=V, ?status=, ?limit=)", "read", None, None),
    ("GET", "/api/v1/devices/{device_id}"): ("One device, its assignments and certificates", "read", None, None),
    ("PUT", "/api/v1/devices/{device_id}/labels"): ("Replace a device's labels", "deploy", LabelsUpdate, None),
    ("POST", "/api/v1/devices/{device_id}/revoke"): ("Revoke a device", "admin", None, None),
    ("POST", "/api/v1/artifacts/{kind}/{name}/{version}"): ("Publish an artifact (raw body)", "deploy", None, None),
    ("GET", "/api/v1/artifacts"): ("List published artifacts (?kind=)", "read", None, None),
    ("GET", "/api/v1/audit"): ("The audit log, newest first (?limit=, ?actor=, ?action=, ?outcome=)", "admin", None, None),
    ("POST", "/api/v1/rollouts"): ("Start a rollout: artifact, target, waves, soak_s, gates", "deploy", None, None),
    ("GET", "/api/v1/rollouts"): ("List rollouts", "read", None, None),
    ("GET", "/api/v1/rollouts/{rollout_id}"): ("A rollout's status, wave by wave", "read", None, None),
    ("POST", "/api/v1/rollouts/{rollout_id}/pause"): ("Pause a rollout", "deploy", None, None),
    ("POST", "/api/v1/rollouts/{rollout_id}/resume"): ("Resume a paused rollout", "deploy", None, None),
    ("POST", "/api/v1/rollouts/{rollout_id}/abort"): ("Abort: roll back every device it moved", "deploy", None, None),
    ("GET", "/tuf/metadata/{file}"): ("TUF metadata (consistent snapshots)", "device", None, None),
    ("GET", "/tuf/targets/{path}"): ("A TUF target file HASH.NAME", "device", None, None),
}  # fmt: skip

_PARAM = re.compile(r"\{([^}:]+)(?::[^}]*)?\}")


def _ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def _operation(method: str, path: str, schemas: dict[str, Any]) -> dict[str, Any]:
    summary, credential, request, response = _DESCRIBED.get(
        (method, path), ("(see docs/fleet.md)", None, None, None)
    )
    op: dict[str, Any] = {"summary": summary, "operationId": f"{method.lower()}{path}"}
    params = _PARAM.findall(path)
    if params:
        op["parameters"] = [
            {"name": p, "in": "path", "required": True, "schema": {"type": "string"}}
            for p in params
        ]
    if credential == "device":
        op["security"] = [{"deviceCertificate": []}]
    elif credential is not None:
        op["security"] = [{"operatorToken": []}]
        op["x-edgeos-scope"] = credential
    if request is not None:
        schemas[request.__name__] = request
        op["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": _ref(request)}},
        }
    if path.startswith("/api/v1/artifacts/"):
        op["requestBody"] = {
            "required": True,
            "content": {
                "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}
            },
        }
    ok: dict[str, Any] = {"description": "OK"}
    if response is not None:
        schemas[response.__name__] = response
        ok["content"] = {"application/json": {"schema": _ref(response)}}
    error = {"description": "Refused", "content": {"application/json": {"schema": _ref(ErrorBody)}}}
    op["responses"] = {"200": ok, "default": error}
    return op


def openapi_document(routes: Sequence[BaseRoute], version: str) -> dict[str, Any]:
    """The OpenAPI document describing ``routes``."""
    models: dict[str, Any] = {"ErrorBody": ErrorBody}
    paths: dict[str, dict[str, Any]] = {}
    for route in routes:
        if not isinstance(route, Route):
            continue
        path = _PARAM.sub(lambda m: "{" + m.group(1) + "}", route.path)
        for method in sorted(route.methods or ()):
            if method == "HEAD":
                continue
            paths.setdefault(path, {})[method.lower()] = _operation(method, path, models)
    paths.setdefault("/api/v1/openapi.json", {})["get"] = {
        "summary": "This document",
        "responses": {"200": {"description": "OK"}},
    }
    schemas: dict[str, Any] = {}
    for name, model in models.items():
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas.update(schema.pop("$defs", {}))
        schemas[name] = schema
    return {
        "openapi": "3.1.0",
        "info": {"title": "edgeos fleet", "version": version},
        "paths": dict(sorted(paths.items())),
        "components": {
            "schemas": schemas,
            "securitySchemes": {
                "operatorToken": {"type": "http", "scheme": "bearer"},
                "deviceCertificate": {"type": "mutualTLS"},
            },
        },
    }
