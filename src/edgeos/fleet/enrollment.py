"""Enrollment: a device with a join token and a CSR gets its identity.

The join token says which group the device joins; the CSR must name the device id the
device chose; the CA signs a short-lived certificate for it. A device id that is active
already is refused; a revoked one may come back, with a new join token, which lifts the
revocation. A join token that names a device to replace revokes that device and records
the new one as its replacement (:mod:`edgeos.fleet.memory_backups`). A refused
enrollment changes nothing but the audit log.
"""

from __future__ import annotations

import importlib.util
import time
from collections.abc import Callable
from datetime import timedelta

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from edgeos.errors import AuthenticationError, ConflictError, EdgeOSError
from edgeos.fleet import tables
from edgeos.fleet.context import FleetContext
from edgeos.fleet.db import audit_refusal, write_audit
from edgeos.fleet.memory_backups import take_over
from edgeos.fleet.operators import use_join_token
from edgeos.protocol.fleet import EnrollRequest, EnrollResponse
from edgeos.security.tokens import parse_token, same


def rollout_hook() -> Callable[[Connection, str], None] | None:
    """``rollouts.assign_new_device`` when the rollouts module is installed, else None.

    A device that joins, or whose labels change, gets what completed rollouts deployed
    to its group and labels.
    """
    if importlib.util.find_spec("edgeos.fleet.rollouts") is None:
        return None
    from edgeos.fleet import rollouts

    hook: Callable[[Connection, str], None] | None = getattr(rollouts, "assign_new_device", None)
    return hook


def enroll(ctx: FleetContext, request: EnrollRequest) -> EnrollResponse:
    """Enroll the device ``request`` describes; every refusal is audited, nothing else kept."""
    now = time.time()
    actor = f"device:{request.device_id}"
    try:
        secret, pin = parse_token(request.join_token)
        if not same(pin, ctx.pin):
            raise AuthenticationError("the join token was made by another fleet (CA pin differs)")
        with ctx.db.begin() as conn:
            token_id, group = use_join_token(conn, secret, now=now)
            returning = _check_device(conn, request.device_id)
            issued = ctx.ca.issue_device(
                request.csr_pem,
                device_id=request.device_id,
                group=group,
                validity=timedelta(seconds=ctx.config.cert_validity_s),
            )
            _store_device(conn, request, group, now, returning=returning)
            conn.execute(
                sa.insert(tables.certificates).values(
                    serial=issued.serial, device_id=request.device_id,
                    not_after=issued.not_after, issued_at=now, revoked=False,
                )
            )  # fmt: skip
            hook = rollout_hook()
            if hook is not None:
                hook(conn, request.device_id)
            replaced = take_over(conn, token_id, request.device_id, now=now)
            write_audit(
                conn, actor=actor, action="enroll", target=f"device/{request.device_id}",
                outcome="ok", detail=f"group {group}, join token {token_id}"
                + (", revocation lifted" if returning else "")
                + (f", replaces device {replaced} (revoked)" if replaced else ""),
            )  # fmt: skip
    except EdgeOSError as exc:
        audit_refusal(
            ctx.db, actor=actor, action="enroll", target=f"device/{request.device_id}",
            detail=str(exc),
        )  # fmt: skip
        raise
    return EnrollResponse(
        device_id=request.device_id,
        group=group,
        certificate_pem=issued.pem,
        ca_pem=ctx.ca_pem,
        tuf_root=ctx.tuf.trusted_root().decode(),
        sync_interval_s=ctx.config.sync_interval_s,
    )


def _check_device(conn: Connection, device_id: str) -> bool:
    """True if ``device_id`` was revoked and comes back; ConflictError if it is active."""
    d = tables.devices
    status = conn.execute(sa.select(d.c.status).where(d.c.id == device_id)).scalar()
    if status == "active":
        raise ConflictError(
            f"device {device_id} is enrolled and active: a device renews its certificate "
            "through sync; to replace it, revoke it first"
        )
    return status is not None


def _store_device(
    conn: Connection, request: EnrollRequest, group: str, now: float, *, returning: bool
) -> None:
    d = tables.devices
    inventory = request.inventory.model_dump_json()
    if returning:
        # A device that comes back keeps its labels; it starts afresh otherwise.
        conn.execute(
            sa.update(d).where(d.c.id == request.device_id).values(
                group_name=group, status="active", inventory=inventory, health="{}",
                actual="[]", revision=0, enrolled_at=now, last_seen=now,
            )
        )  # fmt: skip
        return
    conn.execute(
        sa.insert(d).values(
            id=request.device_id, group_name=group, status="active", labels="{}",
            inventory=inventory, health="{}", actual="[]", revision=0,
            enrolled_at=now, last_seen=now,
        )
    )  # fmt: skip
