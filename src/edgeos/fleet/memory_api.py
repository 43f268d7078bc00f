"""Memory backups over HTTP: devices replicate their memory, replacements read it back.

Device (mTLS), ``DEVICE`` being the device's own id unless said otherwise:

- ``GET  /api/v1/memory/DEVICE`` → ``MemoryBackup`` (position; whom it replaces)
- ``POST /api/v1/memory/DEVICE/changes`` ``MemoryBatch`` → ``MemoryBackup``
- ``GET  /api/v1/memory/DEVICE/records?after=&limit=`` → ``MemoryRecordsPage``; also
  for the device it replaces
- ``DELETE /api/v1/memory/REPLACED`` → ``MemoryBackup``: only by the device that replaces
  REPLACED, once it restored and backed up its records: they are dropped here

Operator: ``GET /api/v1/devices/{id}/memory`` (read) → ``MemoryBackup``;
``POST /api/v1/devices/{id}/replacement-token`` ``{"ttl_s", "group"}`` (admin) → a
one-use join token enrolling the device's replacement.

Every refusal is audited in a transaction of its own and changes nothing else.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import sqlalchemy as sa
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from sqlalchemy.engine import Connection
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from edgeos.errors import ConfigError, ConflictError, EdgeOSError
from edgeos.fleet import memory_backups, operators
from edgeos.fleet.auth import DeviceIdentity, require_device, require_operator
from edgeos.fleet.context import FleetContext, fleet_context
from edgeos.fleet.db import audit_refusal, write_audit
from edgeos.fleet.web import json_response, parse_body, query_int
from edgeos.protocol.fleet import API, MAX_MEMORY_BATCH_BYTES, MAX_MEMORY_PAGE, MemoryBatch

T = TypeVar("T")


class ReplacementTokenCreate(BaseModel):
    """``POST /api/v1/devices/{id}/replacement-token``: the group defaults to the device's."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    ttl_s: float = Field(default=3600.0, gt=0)
    group: str | None = Field(default=None, min_length=1, max_length=128)


def _refused(ctx: FleetContext, actor: str, action: str, target: str, exc: Exception) -> None:
    audit_refusal(ctx.db, actor=actor, action=action, target=target, detail=str(exc))


Check = Callable[[Connection, str, str], None]


def _as_device(
    ctx: FleetContext, identity: DeviceIdentity, action: str, owner: str, check: Check,
    work: Callable[[Connection], T], *, write: bool,
) -> T:  # fmt: skip
    """Run ``work`` on ``owner``'s backup for ``identity`` if ``check`` lets it (one of
    ``memory_backups.check_*``). Refusals are audited."""
    target = f"device/{owner}/memory"
    try:
        with ctx.db.begin() if write else ctx.db.read() as conn:
            check(conn, identity.device_id, owner)
            return work(conn)
    except sa.exc.IntegrityError as exc:
        # Two first batches of one device at once: the other one won.
        raise ConflictError(f"the memory backup of device {owner} moved meanwhile") from exc
    except EdgeOSError as exc:
        _refused(ctx, identity.actor, action, target, exc)
        raise


async def _read_batch(request: Request) -> MemoryBatch:
    """The body as a MemoryBatch, read no further than the limit; ConfigError otherwise."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_MEMORY_BATCH_BYTES:
        raise ConfigError(
            f"memory batch of {declared} bytes: at most {MAX_MEMORY_BATCH_BYTES}; split it"
        )
    raw = bytearray()
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > MAX_MEMORY_BATCH_BYTES:
            raise ConfigError(f"memory batch larger than {MAX_MEMORY_BATCH_BYTES} bytes: split it")
    try:
        return MemoryBatch.model_validate_json(bytes(raw))
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "(body)"
        raise ConfigError(
            f"MemoryBatch: {exc.error_count()} problem(s), first: field '{where}': {first['msg']}"
        ) from exc


async def get_backup(request: Request) -> Response:
    identity = await require_device(request)
    ctx, owner = fleet_context(request), request.path_params["device_id"]

    def work() -> Any:
        return _as_device(ctx, identity, "memory.position", owner, memory_backups.check_owner,
                          lambda c: memory_backups.backup(c, owner), write=False)  # fmt: skip

    return json_response(await run_in_threadpool(work))


async def post_changes(request: Request) -> Response:
    identity = await require_device(request)
    ctx, owner = fleet_context(request), request.path_params["device_id"]
    try:
        batch = await _read_batch(request)
    except EdgeOSError as exc:
        target = f"device/{owner}/memory"
        await run_in_threadpool(_refused, ctx, identity.actor, "memory.write", target, exc)
        raise

    def work() -> Any:
        return _as_device(
            ctx, identity, "memory.write", owner, memory_backups.check_owner,
            lambda c: memory_backups.apply_changes(c, owner, batch.changes), write=True,
        )  # fmt: skip

    return json_response(await run_in_threadpool(work))


async def get_records(request: Request) -> Response:
    identity = await require_device(request)
    ctx, owner = fleet_context(request), request.path_params["device_id"]
    after = request.query_params.get("after") or None
    limit = query_int(request, "limit", MAX_MEMORY_PAGE, low=1, high=MAX_MEMORY_PAGE)

    def work() -> Any:
        return _as_device(
            ctx, identity, "memory.read", owner, memory_backups.check_reader,
            lambda c: memory_backups.live_records(c, owner, after=after, limit=limit),
            write=False,
        )  # fmt: skip

    return json_response(await run_in_threadpool(work))


async def release_backup(request: Request) -> Response:
    identity = await require_device(request)
    ctx, owner = fleet_context(request), request.path_params["device_id"]

    def release(conn: Connection) -> Any:
        released = memory_backups.release(conn, owner)
        write_audit(conn, actor=identity.actor, action="memory.release",
                    target=f"device/{owner}/memory", outcome="ok",
                    detail=f"restored onto device {identity.device_id}, which replaces it")  # fmt: skip
        return released

    def work() -> Any:
        return _as_device(ctx, identity, "memory.release", owner,
                          memory_backups.check_replacement, release, write=True)  # fmt: skip

    return json_response(await run_in_threadpool(work))


async def show_device_backup(request: Request) -> Response:
    await require_operator(request, "read")
    ctx, device_id = fleet_context(request), request.path_params["device_id"]

    def work() -> Any:
        with ctx.db.read() as conn:
            return memory_backups.device_backup(conn, device_id)

    return json_response(await run_in_threadpool(work))


async def create_replacement_token(request: Request) -> Response:
    op = await require_operator(request, "admin")
    ctx, replaced = fleet_context(request), request.path_params["device_id"]
    action, target = "join-token.create", f"device/{replaced}"

    def work(body: ReplacementTokenCreate) -> dict[str, Any]:
        try:
            with ctx.db.begin() as conn:
                # The device must exist; its replacement joins its group unless told.
                group = memory_backups.replacement_target(conn, replaced)
                group = body.group or group
                made = operators.create_join_token(
                    conn, group=group, ttl_s=body.ttl_s, uses=1, created_by=op.actor,
                    pin=ctx.pin, replaces=replaced,
                )  # fmt: skip
                write_audit(conn, actor=op.actor, action=action, target=target, outcome="ok",
                            detail=f"join token {made.id} for group {group}, replaces "
                            f"device {replaced}")  # fmt: skip
        except EdgeOSError as exc:
            _refused(ctx, op.actor, action, target, exc)
            raise
        return {"id": made.id, "token": made.token, "group": made.group,
                "expires_at": made.expires_at, "uses": made.uses, "replaces": replaced}  # fmt: skip

    try:
        body = await parse_body(request, ReplacementTokenCreate)
    except EdgeOSError as exc:
        await run_in_threadpool(_refused, ctx, op.actor, action, target, exc)
        raise
    return json_response(await run_in_threadpool(work, body), 201)


def memory_routes() -> list[Route]:
    """Every route of this module."""
    return [
        Route(f"{API}/memory/{{device_id}}", get_backup, methods=["GET"]),
        Route(f"{API}/memory/{{device_id}}", release_backup, methods=["DELETE"]),
        Route(f"{API}/memory/{{device_id}}/changes", post_changes, methods=["POST"]),
        Route(f"{API}/memory/{{device_id}}/records", get_records, methods=["GET"]),
        Route(f"{API}/devices/{{device_id}}/memory", show_device_backup, methods=["GET"]),
        Route(
            f"{API}/devices/{{device_id}}/replacement-token",
            create_replacement_token,
            methods=["POST"],
        ),
    ]
