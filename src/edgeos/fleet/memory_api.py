"""Memory backups over HTTP: devices replicate their memory, replacements read it back.

Device (mTLS), ``DEVICE`` being the device's own id unless said otherwise:

- ``GET  /api/v1/memory/DEVICE`` → ``MemoryBackup`` (position; whom it replaces)
- ``POST /api/v1/memory/DEVICE/changes`` ``MemoryBatch`` → ``MemoryBackup``
- ``GET  /api/v1/memory/DEVICE/records?after=&limit=`` → ``MemoryRecordsPage``; also
  for the device it replaces
- ``DELETE /api/v1/memory/REPLACED`` → ``MemoryBackup``: only by the device that replaces
  REPLACED, once it restored and backed up its records: they are dropped here

Operator: ``GET /api/v1/devices/{id}/memory`` (read) → ``MemoryBackup``. A replacement
is enrolled with a join token made with ``replaces`` (``POST /api/v1/join-tokens``).

Every refusal is audited in a transaction of its own and changes nothing else.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import sqlalchemy as sa
from pydantic import ValidationError
from sqlalchemy.engine import Connection
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from edgeos.errors import ConfigError, ConflictError, EdgeOSError
from edgeos.fleet import memory_backups
from edgeos.fleet.auth import DeviceIdentity, require_device, require_operator
from edgeos.fleet.context import FleetContext, fleet_context
from edgeos.fleet.db import audit_refusal, write_audit
from edgeos.fleet.web import json_response, query_int
from edgeos.protocol.fleet import API, MAX_MEMORY_BATCH_BYTES, MAX_MEMORY_PAGE, MemoryBatch

T = TypeVar("T")


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


def memory_routes() -> list[Route]:
    """Every route of this module."""
    return [
        Route(f"{API}/memory/{{device_id}}", get_backup, methods=["GET"]),
        Route(f"{API}/memory/{{device_id}}", release_backup, methods=["DELETE"]),
        Route(f"{API}/memory/{{device_id}}/changes", post_changes, methods=["POST"]),
        Route(f"{API}/memory/{{device_id}}/records", get_records, methods=["GET"]),
        Route(f"{API}/devices/{{device_id}}/memory", show_device_backup, methods=["GET"]),
    ]
