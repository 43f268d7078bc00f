"""The operator API: tokens, join tokens, devices, artifacts, the audit log.

Each handler checks the caller's scope first, then does its work in one transaction
on the thread pool. A change is audited with the change; a refused change is audited
on its own, and nothing else is kept.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import sqlalchemy as sa
from pydantic import BaseModel
from sqlalchemy.engine import Connection
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from edgeos.errors import ConfigError
from edgeos.fleet import devices, memory_backups, operators, tables
from edgeos.fleet.api_models import (
    JoinTokenCreate,
    JoinTokenCreated,
    LabelsUpdate,
    TokenCreate,
    TokenCreated,
)
from edgeos.fleet.artifacts import list_artifacts, publish
from edgeos.fleet.audited import audited_body, audited_change
from edgeos.fleet.auth import require_operator
from edgeos.fleet.context import FleetContext, fleet_context
from edgeos.fleet.db import audit_refusal
from edgeos.fleet.enrollment import rollout_hook
from edgeos.fleet.web import json_response, query_int
from edgeos.protocol.fleet import API, ArtifactRef

T = TypeVar("T")
M = TypeVar("M", bound=BaseModel)


def _read(ctx: FleetContext, work: Callable[[Connection], T]) -> T:
    with ctx.db.read() as conn:
        return work(conn)


async def whoami(request: Request) -> Response:
    op = await require_operator(request, "read")
    return json_response({"id": op.id, "name": op.name, "scopes": sorted(op.scopes)})


async def create_token(request: Request) -> Response:
    op = await require_operator(request, "admin")
    ctx = fleet_context(request)
    body = await audited_body(request, TokenCreate, op, "token.create")

    def work(conn: Connection) -> TokenCreated:
        token_id, token = operators.create_operator_token(
            conn, name=body.name, scopes=body.scopes, created_by=op.actor, pin=ctx.pin
        )
        scopes = sorted(operators.expand_scopes(body.scopes), key=operators.SCOPES.index)
        return TokenCreated(id=token_id, name=body.name, scopes=scopes, token=token)

    made = await run_in_threadpool(
        audited_change, ctx, op, "token.create", f"token/{body.name}", work
    )
    return json_response(made, 201)


async def list_tokens(request: Request) -> Response:
    await require_operator(request, "admin")
    ctx = fleet_context(request)
    return json_response(await run_in_threadpool(_read, ctx, operators.operator_tokens))


async def revoke_token(request: Request) -> Response:
    op = await require_operator(request, "admin")
    ctx, token_id = fleet_context(request), request.path_params["token_id"]

    def work(conn: Connection) -> None:
        operators.revoke_operator_token(conn, token_id)

    await run_in_threadpool(audited_change, ctx, op, "token.revoke", f"token/{token_id}", work)
    return json_response({"id": token_id, "revoked": True})


async def create_join_token(request: Request) -> Response:
    op = await require_operator(request, "admin")
    ctx = fleet_context(request)
    body = await audited_body(request, JoinTokenCreate, op, "join-token.create")

    def work(conn: Connection) -> JoinTokenCreated:
        group = body.group
        if body.replaces is not None:
            # The device must exist; its replacement joins its group unless told.
            group = group or memory_backups.replacement_target(conn, body.replaces)
        made = operators.create_join_token(
            conn, group=str(group), ttl_s=body.ttl_s, uses=body.uses, created_by=op.actor,
            pin=ctx.pin, replaces=body.replaces,
        )  # fmt: skip
        return JoinTokenCreated(id=made.id, token=made.token, group=made.group,
                                expires_at=made.expires_at, uses=made.uses,
                                replaces=body.replaces)  # fmt: skip

    def described(made: JoinTokenCreated) -> tuple[str, str | None]:
        if made.replaces is None:
            return f"group/{made.group}", None
        return f"device/{made.replaces}", (
            f"join token {made.id} for group {made.group}, replaces device {made.replaces}"
        )

    target = f"device/{body.replaces}" if body.replaces else f"group/{body.group}"
    made = await run_in_threadpool(
        audited_change, ctx, op, "join-token.create", target, work, describe=described
    )
    return json_response(made, 201)


async def list_devices(request: Request) -> Response:
    await require_operator(request, "read")
    ctx = fleet_context(request)
    labels = devices.parse_label_terms(request.query_params.getlist("label"))
    group = request.query_params.get("group")
    status = request.query_params.get("status")
    limit = query_int(request, "limit", 1000, low=1, high=1_000_000)

    def work(conn: Connection) -> list[dict[str, Any]]:
        return devices.list_devices(conn, group=group, labels=labels, status=status, limit=limit)

    return json_response(await run_in_threadpool(_read, ctx, work))


async def show_device(request: Request) -> Response:
    await require_operator(request, "read")
    ctx, device_id = fleet_context(request), request.path_params["device_id"]
    return json_response(
        await run_in_threadpool(_read, ctx, lambda conn: devices.show_device(conn, device_id))
    )


async def put_labels(request: Request) -> Response:
    op = await require_operator(request, "deploy")
    ctx, device_id = fleet_context(request), request.path_params["device_id"]
    body = await audited_body(request, LabelsUpdate, op, "device.label")

    def work(conn: Connection) -> dict[str, str]:
        labels = devices.set_labels(conn, device_id, body.labels)
        hook = rollout_hook()
        if hook is not None:
            hook(conn, device_id)
        return labels

    target = f"device/{device_id}"
    labels = await run_in_threadpool(audited_change, ctx, op, "device.label", target, work)
    return json_response({"id": device_id, "labels": labels})


async def revoke_device(request: Request) -> Response:
    op = await require_operator(request, "admin")
    ctx, device_id = fleet_context(request), request.path_params["device_id"]

    def work(conn: Connection) -> bool:
        return devices.revoke_device(conn, device_id)

    target = f"device/{device_id}"
    changed = await run_in_threadpool(audited_change, ctx, op, "device.revoke", target, work)
    return json_response({"id": device_id, "status": "revoked", "changed": changed})


async def publish_artifact(request: Request) -> Response:
    op = await require_operator(request, "deploy")
    ctx = fleet_context(request)
    params = request.path_params
    try:
        ref = ArtifactRef(kind=params["kind"], name=params["name"], version=params["version"])
    except ValueError as exc:
        error = ConfigError(
            f"artifact {params['kind']}/{params['name']}@{params['version']}: {exc}"
        )
        await run_in_threadpool(
            lambda: audit_refusal(ctx.db, actor=op.actor, action="publish",
                                  target=request.url.path, detail=str(error))
        )  # fmt: skip
        raise error from exc
    data = await _read_upload(request, ctx.config.max_artifact_bytes)
    row = await run_in_threadpool(lambda: publish(ctx, ref, data, actor=op.actor))
    return json_response(row, 201)


async def _read_upload(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ConfigError(f"artifact of {declared} bytes: the fleet accepts at most {limit}")
    chunks = bytearray()
    async for chunk in request.stream():
        chunks += chunk
        if len(chunks) > limit:
            raise ConfigError(f"artifact larger than {limit} bytes: refused")
    if not chunks:
        raise ConfigError("the artifact's bytes are the request body, and it is empty")
    return bytes(chunks)


async def get_artifacts(request: Request) -> Response:
    await require_operator(request, "read")
    ctx, kind = fleet_context(request), request.query_params.get("kind")
    return json_response(await run_in_threadpool(_read, ctx, lambda c: list_artifacts(c, kind)))


async def get_audit(request: Request) -> Response:
    await require_operator(request, "admin")
    ctx = fleet_context(request)
    limit = query_int(request, "limit", 100, low=1, high=100_000)
    filters = {k: request.query_params.get(k) for k in ("actor", "action", "outcome")}

    def work(conn: Connection) -> list[dict[str, Any]]:
        a = tables.audit
        query = sa.select(a).order_by(a.c.id.desc()).limit(limit)
        for column, value in filters.items():
            if value:
                query = query.where(a.c[column] == value)
        return [dict(row) for row in conn.execute(query).mappings()]

    return json_response(await run_in_threadpool(_read, ctx, work))


def admin_routes() -> list[Route]:
    """Every operator route of this module."""
    return [
        Route(f"{API}/whoami", whoami, methods=["GET"]),
        Route(f"{API}/tokens", create_token, methods=["POST"]),
        Route(f"{API}/tokens", list_tokens, methods=["GET"]),
        Route(f"{API}/tokens/{{token_id}}", revoke_token, methods=["DELETE"]),
        Route(f"{API}/join-tokens", create_join_token, methods=["POST"]),
        Route(f"{API}/devices", list_devices, methods=["GET"]),
        Route(f"{API}/devices/{{device_id}}", show_device, methods=["GET"]),
        Route(f"{API}/devices/{{device_id}}/labels", put_labels, methods=["PUT"]),
        Route(f"{API}/devices/{{device_id}}/revoke", revoke_device, methods=["POST"]),
        Route(f"{API}/artifacts/{{kind}}/{{name}}/{{version}}", publish_artifact, methods=["POST"]),
        Route(f"{API}/artifacts", get_artifacts, methods=["GET"]),
        Route(f"{API}/audit", get_audit, methods=["GET"]),
    ]
