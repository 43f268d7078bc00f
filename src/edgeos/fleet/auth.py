"""Who is asking: operators by bearer token, devices by client certificate.

Every refusal is written to the audit log, in a transaction of its own, before the
error reaches the caller.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.engine import Connection
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request

from edgeos.errors import AuthenticationError, EdgeOSError, PermissionDeniedError
from edgeos.fleet import tables
from edgeos.fleet.context import FleetContext, fleet_context
from edgeos.fleet.db import audit_refusal
from edgeos.fleet.operators import SCOPES, expand_scopes
from edgeos.security.tls import peer_certificate
from edgeos.security.tokens import hash_secret, parse_token, same


@dataclass(frozen=True)
class Operator:
    """An authenticated operator token: its id, its name and every scope it grants."""

    id: str
    name: str
    scopes: frozenset[str]

    @property
    def actor(self) -> str:
        """How the audit log names this operator."""
        return f"operator:{self.name}"


@dataclass(frozen=True)
class DeviceIdentity:
    """An authenticated device: the certificate's id, its group and serial."""

    device_id: str
    group: str
    serial: str

    @property
    def actor(self) -> str:
        """How the audit log names this device."""
        return f"device:{self.device_id}"


def _what(request: Request) -> str:
    return f"{request.method} {request.url.path}"


async def require_operator(request: Request, scope: str) -> Operator:
    """The operator whose bearer token ``request`` carries, if it grants ``scope``.

    AuthenticationError (401) without a token, or for an unknown, malformed, foreign or
    revoked one; PermissionDeniedError (403) when the token lacks the scope.
    """
    if scope not in SCOPES:
        raise ValueError(f"unknown scope {scope!r}")
    ctx = fleet_context(request)
    header = request.headers.get("authorization", "")
    return await run_in_threadpool(check_operator, ctx, header, scope, _what(request))


def check_operator(ctx: FleetContext, header: str, scope: str, what: str) -> Operator:
    """The operator of ``header`` (an ``Authorization`` value, ``Bearer TOKEN``) if its
    token grants ``scope``; blocking (it reads the database), for a thread.

    ``what`` names the action in the audit log (``"POST /ui/login"``). Refusals are
    audited, then raised: AuthenticationError for a missing, malformed, foreign, unknown
    or revoked token, PermissionDeniedError for a token without the scope.
    """
    actor = "anonymous"
    try:
        kind, _, token = header.partition(" ")
        if kind.lower() != "bearer" or not token.strip():
            raise AuthenticationError("an operator token is required: Authorization: Bearer TOKEN")
        secret, pin = parse_token(token)
        if not same(pin, ctx.pin):
            raise AuthenticationError("the token was made by another fleet (its CA pin differs)")
        t = tables.operator_tokens
        with ctx.db.read() as conn:
            row = conn.execute(
                sa.select(t.c.id, t.c.name, t.c.scopes, t.c.revoked_at).where(
                    t.c.token_hash == hash_secret(secret)
                )
            ).first()
        if row is None:
            raise AuthenticationError("unknown operator token")
        actor = f"operator:{row.name}"
        if row.revoked_at is not None:
            raise AuthenticationError(f"operator token {row.id} was revoked")
        operator = Operator(row.id, row.name, expand_scopes(row.scopes.split(",")))
        if scope not in operator.scopes:
            raise PermissionDeniedError(
                f"operator token {row.id} ({row.name}) lacks the {scope!r} scope for {what}"
            )
    except EdgeOSError as exc:
        audit_refusal(ctx.db, actor=actor, action="authorize", target=what, detail=str(exc))
        raise
    return operator


async def require_device(request: Request) -> DeviceIdentity:
    """The device whose client certificate ``request`` came with.

    The certificate must chain to the fleet CA, be within its validity, carry a serial the
    fleet issued to that device and did not revoke, and the device must be active;
    otherwise AuthenticationError (401), audited.
    """
    ctx = fleet_context(request)
    pem = peer_certificate(request.scope)
    what = _what(request)

    def check() -> DeviceIdentity:
        try:
            with ctx.db.read() as conn:
                return authenticate_device(ctx, conn, pem, now=time.time())
        except AuthenticationError as exc:
            audit_refusal(ctx.db, actor=device_actor(ctx, pem), action="authenticate",
                          target=what, detail=str(exc))  # fmt: skip
            raise

    return await run_in_threadpool(check)


# Built once: the statement's cache key is then computed once, not on every sync.
_CERTIFICATE_STATUS = (
    sa.select(
        tables.certificates.c.device_id,
        tables.certificates.c.revoked,
        tables.devices.c.status,
        tables.devices.c.group_name,
    )
    .join(tables.devices, tables.devices.c.id == tables.certificates.c.device_id)
    .where(tables.certificates.c.serial == sa.bindparam("serial"))
)


def authenticate_device(
    ctx: FleetContext, conn: Connection, pem: str | None, *, now: float
) -> DeviceIdentity:
    """The device presenting certificate ``pem``, checked against the CA and the database.

    For callers that already hold a transaction (sync); raises AuthenticationError.
    """
    if not pem:
        raise AuthenticationError("a device client certificate is required (mutual TLS)")
    cert = ctx.certificates.get(pem)
    if cert is None:
        try:
            cert = ctx.ca.verify_device(pem)
        except EdgeOSError as exc:
            raise AuthenticationError(f"client certificate refused: {exc}") from exc
        ctx.certificates.put(pem, cert)
    if not cert.not_before <= now < cert.not_after:
        raise AuthenticationError(
            f"the certificate of device {cert.device_id} is not valid now (expired or not yet valid)"
        )
    row = conn.execute(_CERTIFICATE_STATUS, {"serial": cert.serial}).first()
    if row is None or row.device_id != cert.device_id:
        raise AuthenticationError(
            f"certificate serial {cert.serial} was not issued to device {cert.device_id}"
        )
    if row.revoked or row.status != "active":
        raise AuthenticationError(f"device {cert.device_id} is revoked")
    return DeviceIdentity(cert.device_id, row.group_name, cert.serial)


def device_actor(ctx: FleetContext, pem: str | None) -> str:
    """How the audit log names whoever presented ``pem``: its device id when readable."""
    if not pem:
        return "anonymous"
    cached = ctx.certificates.get(pem)
    if cached is not None:
        return f"device:{cached.device_id}"
    from edgeos.security.certs import certificate_info

    try:
        # Unverified: the question mark says the name is only what the certificate claims.
        return f"device:{certificate_info(pem).device_id}?"
    except EdgeOSError:  # a certificate too broken to name: still audit the refusal
        return "unknown-device"
