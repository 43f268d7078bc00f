"""The OpenAPI 3.1 document of the fleet API, built from the app's routes.

Every route is described below with its request and response (JSON Schemas from the
pydantic models themselves, or the media type of a raw body) and the credentials it
needs. A route added without a description is still listed, with the summary
:data:`UNDESCRIBED`, so the document never hides an endpoint; the tests fail on it.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any, NamedTuple

from pydantic import BaseModel
from starlette.routing import BaseRoute, Route

from edgeos.fleet.alerts_api import AlertRuleCreate
from edgeos.fleet.api_models import (
    JoinTokenCreate,
    JoinTokenCreated,
    LabelsUpdate,
    TokenCreate,
    TokenCreated,
)
from edgeos.fleet.approvals_api import ApprovalAnswer
from edgeos.fleet.secrets_api import GrantCreate
from edgeos.protocol.fleet import (
    EnrollRequest,
    EnrollResponse,
    ErrorBody,
    EscalationAnswers,
    EscalationReport,
    MemoryBackup,
    MemoryBatch,
    MemoryRecordsPage,
    SecretGrants,
    SyncRequest,
    SyncResponse,
)
from edgeos.protocol.migration import Envelope, Revocations, RunEnvelopes
from edgeos.protocol.telemetry import CONTENT_TYPE as TELEMETRY_BATCH
from edgeos.protocol.telemetry import TelemetryAck

#: The summary of a route nobody described.
UNDESCRIBED = "(undescribed: see docs/fleet.md)"

# Raw request bodies, by media type.
_BYTES = "application/octet-stream"
_V2 = "application/json"  # or binary tensors after the JSON header (Open Inference Protocol)


class _Op(NamedTuple):
    summary: str
    #: None (public), "device" (mTLS) or an operator scope.
    credential: str | None
    #: A pydantic model (a JSON body), a media type (a raw body), or None.
    request: type[BaseModel] | str | None = None
    response: type[BaseModel] | None = None


_DESCRIBED: dict[tuple[str, str], _Op] = {
    ("GET", "/api/v1/ca"): _Op("The fleet CA certificate (PEM); check it against your token's pin", None),
    ("GET", "/api/v1/health"): _Op("Liveness", None),
    ("POST", "/api/v1/enroll"): _Op("Enroll a device with a join token and a CSR", None, EnrollRequest, EnrollResponse),
    ("POST", "/api/v1/sync"): _Op("Report state, get the desired state (long poll with wait_s)", "device", SyncRequest, SyncResponse),
    ("GET", "/api/v1/whoami"): _Op("The calling operator token", "read"),
    ("POST", "/api/v1/tokens"): _Op("Create an operator token", "admin", TokenCreate, TokenCreated),
    ("GET", "/api/v1/tokens"): _Op("List operator tokens", "admin"),
    ("DELETE", "/api/v1/tokens/{token_id}"): _Op("Revoke an operator token", "admin"),
    ("POST", "/api/v1/join-tokens"): _Op("Create a join token for a group, or a one-use token for the replacement of a device (replaces)", "admin", JoinTokenCreate, JoinTokenCreated),
    ("GET", "/api/v1/devices"): _Op("List devices (?group=, ?label=K=V, ?status=, ?limit=)", "read"),
    ("GET", "/api/v1/devices/{device_id}"): _Op("One device, its assignments and certificates", "read"),
    ("PUT", "/api/v1/devices/{device_id}/labels"): _Op("Replace a device's labels", "deploy", LabelsUpdate),
    ("POST", "/api/v1/devices/{device_id}/revoke"): _Op("Revoke a device", "admin"),
    ("GET", "/api/v1/devices/{device_id}/memory"): _Op("A device's memory backup: position, records, bytes, whom it replaces", "read", None, MemoryBackup),
    ("POST", "/api/v1/artifacts/{kind}/{name}/{version}"): _Op("Publish an artifact (raw body)", "deploy", _BYTES),
    ("GET", "/api/v1/artifacts"): _Op("List published artifacts (?kind=)", "read"),
    ("GET", "/api/v1/audit"): _Op("The audit log, newest first (?limit=, ?actor=, ?action=, ?outcome=)", "admin"),
    ("POST", "/api/v1/rollouts"): _Op("Start a rollout: artifact, target, waves, soak_s, gates", "deploy"),
    ("GET", "/api/v1/rollouts"): _Op("List rollouts", "read"),
    ("GET", "/api/v1/rollouts/{rollout_id}"): _Op("A rollout's status, wave by wave", "read"),
    ("POST", "/api/v1/rollouts/{rollout_id}/pause"): _Op("Pause a rollout", "deploy"),
    ("POST", "/api/v1/rollouts/{rollout_id}/resume"): _Op("Resume a paused rollout", "deploy"),
    ("POST", "/api/v1/rollouts/{rollout_id}/abort"): _Op("Abort: roll back every device it moved", "deploy"),
    ("POST", "/api/v1/alerts/rules"): _Op("Create an alert rule: condition, target, per, window, webhook (and its signing secret)", "deploy", AlertRuleCreate),
    ("GET", "/api/v1/alerts/rules"): _Op("List alert rules (webhooks as their origin, never a secret)", "read"),
    ("DELETE", "/api/v1/alerts/rules/{rule_id}"): _Op("Delete an alert rule", "deploy"),
    ("GET", "/api/v1/alerts"): _Op("What fires now: rule, subject, value, since", "read"),
    ("GET", "/api/v1/alerts/notifications"): _Op("Notifications sent and how their delivery went (?limit=)", "read"),
    ("POST", "/api/v1/secret-grants"): _Op("Grant a secret to a device or a group, with scopes and an expiry (answers without the value)", "deploy", GrantCreate),
    ("GET", "/api/v1/secret-grants"): _Op("List secret grants, never their values (?name=, ?device=, ?group=, ?active=)", "deploy"),
    ("DELETE", "/api/v1/secret-grants/{grant_id}"): _Op("Revoke a secret grant: its value is erased, devices drop it at their next sync", "deploy"),
    ("GET", "/api/v1/secrets"): _Op("The device's grants in force, each sealed to its certificate's key", "device", None, SecretGrants),
    ("POST", "/api/v1/escalations"): _Op("Report the device's open escalations; get the operators' answers waiting for it", "device", EscalationReport, EscalationAnswers),
    ("GET", "/api/v1/approvals"): _Op("Escalations waiting for an operator (?state=, ?device=)", "read"),
    ("POST", "/api/v1/approvals/{device_id}/{escalation_id}"): _Op("Answer an escalation; the device gets the answer at its next report", "deploy", ApprovalAnswer),
    ("POST", "/api/v1/runs/envelopes"): _Op("Relay a run the device sealed to another device of the fleet", "device", Envelope),
    ("GET", "/api/v1/runs/envelopes"): _Op("Runs sealed for the device, waiting to be taken over", "device", None, RunEnvelopes),
    ("DELETE", "/api/v1/runs/envelopes/{envelope_id}"): _Op("The device took an envelope (accepted or refused it for good)", "device"),
    ("GET", "/api/v1/revocations"): _Op("Device certificates revoked and still within their validity: a device refuses runs they sealed", "device", None, Revocations),
    ("GET", "/api/v1/memory/{device_id}"): _Op("The device's own memory backup: the last change applied", "device", None, MemoryBackup),
    ("DELETE", "/api/v1/memory/{device_id}"): _Op("Release a replaced device's backup once its replacement holds the records (the replacement only)", "device", None, MemoryBackup),
    ("POST", "/api/v1/memory/{device_id}/changes"): _Op("Apply memory changes past the backup's position, idempotently", "device", MemoryBatch, MemoryBackup),
    ("GET", "/api/v1/memory/{device_id}/records"): _Op("Live records of a backup in id order (?after=, ?limit=): the device's own or the one it replaces", "device", None, MemoryRecordsPage),
    ("POST", "/api/v1/cloud/v2/models/{model}/infer"): _Op("Run a published model in the fleet's cloud venue (Open Inference Protocol V2)", "device", _V2),
    ("GET", "/api/v1/cloud/v2/health/ready"): _Op("The cloud venue is ready", "device"),
    ("GET", "/api/v1/cloud/v2/health/live"): _Op("The cloud venue is live", "device"),
    ("GET", "/api/v1/cloud/v2/models/{model}"): _Op("A model the cloud venue serves: version, inputs, outputs (V2 metadata)", "device"),
    ("POST", "/api/v1/telemetry"): _Op("A zstd telemetry batch of KPIs, alerts, traces and logs, numbered by sequence", "device", TELEMETRY_BATCH, TelemetryAck),
    ("GET", "/api/v1/telemetry/kpis"): _Op("KPI series over a range (?start=, ?end=, ?bucket=, ?device=, ?group=, ?agent=, ?model=)", "read"),
    ("GET", "/api/v1/telemetry/kpis/{dimension}"): _Op("KPI summaries broken down by device, agent or model", "read"),
    ("GET", "/api/v1/telemetry/devices"): _Op("Devices and when each last sent telemetry", "read"),
    ("GET", "/api/v1/telemetry/events"): _Op("Alerts, traces and logs devices sent (?kind=, ?device=, ?start=, ?end=, ?limit=)", "read"),
    ("GET", "/metrics"): _Op("Prometheus text: requests, devices, telemetry received", "read"),
    ("GET", "/tuf/metadata/{file}"): _Op("TUF metadata (consistent snapshots)", "device"),
    ("GET", "/tuf/targets/{path}"): _Op("A TUF target file HASH.NAME", "device"),
}  # fmt: skip


def described() -> frozenset[tuple[str, str]]:
    """The (method, path) of every route this module describes."""
    return frozenset(_DESCRIBED)


_PARAM = re.compile(r"\{([^}:]+)(?::[^}]*)?\}")


def _ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def _operation(method: str, path: str, schemas: dict[str, Any]) -> dict[str, Any]:
    summary, credential, request, response = _DESCRIBED.get((method, path), _Op(UNDESCRIBED, None))
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
    if isinstance(request, str):
        raw = {"type": "string", "format": "binary"}
        op["requestBody"] = {"required": True, "content": {request: {"schema": raw}}}
    elif request is not None:
        schemas[request.__name__] = request
        op["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": _ref(request)}},
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
