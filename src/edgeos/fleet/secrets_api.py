"""Secret grants over HTTP: operators grant, list and revoke; devices fetch theirs sealed.

Operator routes need the ``deploy`` scope (``admin`` implies it); each change runs in one
transaction with its audit row, and a refusal is audited alone. The value travels only in
the body of the grant request and is never echoed, logged or audited. A device gets its
grants from ``GET /api/v1/secrets``, each sealed to the key of the certificate it
presented (see :mod:`edgeos.fleet.secret_grants`).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy.engine import Connection
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from edgeos.errors import AuthenticationError
from edgeos.fleet import secret_grants
from edgeos.fleet.audited import audited_body, audited_change
from edgeos.fleet.auth import require_device, require_operator
from edgeos.fleet.context import FleetContext, fleet_context
from edgeos.fleet.db import device_revision, write_audit
from edgeos.fleet.secret_grants import GrantTarget
from edgeos.fleet.web import json_response
from edgeos.protocol.fleet import API, SecretGrants
from edgeos.security.tls import peer_certificate


class GrantCreate(BaseModel):
    """``POST /api/v1/secret-grants``: a secret for one device or one group."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1, max_length=64)
    value: str = Field(min_length=1, repr=False)
    device: str | None = Field(default=None, max_length=64)
    group: str | None = Field(default=None, max_length=128)
    scopes: list[str] = Field(min_length=1, max_length=64)
    expires_s: float = Field(gt=0, description="lifetime in seconds")


class _Keys:
    """The secrets key of each data directory, read once (replicas share the file)."""

    def __init__(self) -> None:
        self._keys: dict[Path, bytes] = {}
        self._lock = threading.Lock()

    def __call__(self, ctx: FleetContext) -> bytes:
        with self._lock:
            key = self._keys.get(ctx.config.keys_dir)
            if key is None:
                key = self._keys[ctx.config.keys_dir] = secret_grants.load_secrets_key(
                    ctx.config.keys_dir
                )
            return key


def _described(target: str) -> Callable[[dict[str, Any]], tuple[str, str]]:
    """The audit row of a grant change: the grant, its version, scopes and expiry; never
    the value."""

    def describe(grant: dict[str, Any]) -> tuple[str, str]:
        return target, (
            f"grant {grant['id']} version {grant['version']}, scopes "
            f"{','.join(grant['scopes'])}, expires at {grant['expires_at']:.0f}"
        )

    return describe


def secrets_routes() -> list[Route]:
    """The grant routes for operators and the fetch route for devices."""
    keys = _Keys()

    async def create(request: Request) -> Response:
        op = await require_operator(request, "deploy")
        ctx = fleet_context(request)
        body = await audited_body(request, GrantCreate, op, "secret.grant")
        target = GrantTarget(device_id=body.device, group=body.group)

        def work(conn: Connection) -> dict[str, Any]:
            return secret_grants.create_grant(
                conn, keys(ctx), name=body.name, value=body.value, target=target,
                scopes=body.scopes, expires_s=body.expires_s, actor=op.actor,
            )  # fmt: skip

        what = f"secret/{body.name} to {target}"
        made = await run_in_threadpool(
            audited_change, ctx, op, "secret.grant", what, work, describe=_described(what)
        )
        return json_response(made, 201)

    async def list_all(request: Request) -> Response:
        await require_operator(request, "deploy")
        ctx, q = fleet_context(request), request.query_params

        def work() -> list[dict[str, Any]]:
            with ctx.db.read() as conn:
                return secret_grants.list_grants(
                    conn, name=q.get("name"), device_id=q.get("device"), group=q.get("group"),
                    active_only=q.get("active") in ("1", "true"),
                )  # fmt: skip

        return json_response(await run_in_threadpool(work))

    async def revoke(request: Request) -> Response:
        op = await require_operator(request, "deploy")
        ctx, grant_id = fleet_context(request), request.path_params["grant_id"]

        def work(conn: Connection) -> dict[str, Any]:
            return secret_grants.revoke_grant(conn, grant_id, actor=op.actor)

        what = f"grant/{grant_id}"
        return json_response(
            await run_in_threadpool(
                audited_change, ctx, op, "secret.revoke", what, work, describe=_described(what)
            )
        )

    async def fetch(request: Request) -> Response:
        device = await require_device(request)
        ctx = fleet_context(request)
        pem = peer_certificate(request.scope)

        def work() -> SecretGrants:
            from cryptography import x509
            from cryptography.hazmat.primitives.asymmetric import ec

            public_key = x509.load_pem_x509_certificate(str(pem).encode()).public_key()
            if not isinstance(public_key, ec.EllipticCurvePublicKey):  # the CA issues EC only
                raise AuthenticationError("the device certificate does not hold an EC key")
            # A read: when a grant for a group moves its devices' revisions, they all ask
            # at once; only a delivery is written (to the audit log).
            with ctx.db.read() as conn:
                grants = secret_grants.sealed_grants(
                    conn, keys(ctx), device_id=device.device_id, group=device.group,
                    public_key=public_key,
                )  # fmt: skip
                revision = device_revision(conn, device.device_id)
            if grants:
                with ctx.db.begin() as conn:
                    write_audit(
                        conn, actor=device.actor, action="secret.deliver",
                        target=f"device/{device.device_id}", outcome="ok",
                        detail=", ".join(f"{g.grant_id} ({g.name} v{g.version})" for g in grants),
                    )  # fmt: skip
            return SecretGrants(revision=revision, grants=grants)

        return json_response(await run_in_threadpool(work))

    return [
        Route(f"{API}/secret-grants", create, methods=["POST"]),
        Route(f"{API}/secret-grants", list_all, methods=["GET"]),
        Route(f"{API}/secret-grants/{{grant_id}}", revoke, methods=["DELETE"]),
        Route(f"{API}/secrets", fetch, methods=["GET"]),
    ]
