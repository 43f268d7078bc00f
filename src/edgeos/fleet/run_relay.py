"""The fleet's relay of run envelopes: a device hands a sealed run to another device.

The fleet checks who sends (the device must be the envelope's source) and to whom (an
active device of this fleet), keeps the envelope until its destination fetches and
acknowledges it or it expires, and nudges the destination so its long poll wakes (no
other device's does). It does not open the run: the destination verifies the
signature, the chain and every part itself.
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError

from edgeos.errors import ConflictError, NotFoundError, PermissionDeniedError, VerificationError
from edgeos.fleet import tables
from edgeos.fleet.db import nudge_device
from edgeos.protocol.migration import MAX_RELAYED, Envelope


def store(conn: Connection, sender: str, envelope: Envelope, *, now: float) -> None:
    """Keep ``envelope`` for its destination; refused (nothing kept) when ``sender`` did
    not seal it, it has expired, or its destination is not an active device here."""
    statement = envelope.statement
    if statement.source != sender:
        raise PermissionDeniedError(
            f"device {sender} sent envelope {statement.envelope_id}, sealed by device "
            f"{statement.source}: a device relays only the runs it sealed"
        )
    if statement.expires_at <= now:
        raise VerificationError(f"envelope {statement.envelope_id} has expired")
    status = conn.execute(
        sa.select(tables.devices.c.status).where(tables.devices.c.id == statement.destination)
    ).scalar()
    if status is None:
        raise NotFoundError(f"no device {statement.destination} in this fleet")
    if status != "active":
        raise PermissionDeniedError(
            f"device {statement.destination} is {status}: it cannot take over a run"
        )
    try:
        with conn.begin_nested():
            conn.execute(
                tables.run_envelopes.insert().values(
                    id=statement.envelope_id, source=sender, destination=statement.destination,
                    run_id=statement.run_id, expires_at=statement.expires_at, created_at=now,
                    body=envelope.to_bytes(),
                )
            )  # fmt: skip
    except IntegrityError as exc:
        raise ConflictError(f"envelope {statement.envelope_id} was relayed already") from exc
    nudge_device(conn, statement.destination)  # it fetches after the sync this wakes


def waiting(conn: Connection, device_id: str, *, now: float) -> list[bytes]:
    """The envelopes for ``device_id`` that have not expired, oldest first (at most
    :data:`MAX_RELAYED`); expired ones of any device are dropped."""
    conn.execute(tables.run_envelopes.delete().where(tables.run_envelopes.c.expires_at <= now))
    rows = conn.execute(
        sa.select(tables.run_envelopes.c.body)
        .where(tables.run_envelopes.c.destination == device_id)
        .order_by(tables.run_envelopes.c.created_at, tables.run_envelopes.c.id)
        .limit(MAX_RELAYED)
    )
    return [bytes(body) for (body,) in rows]


def acknowledge(conn: Connection, device_id: str, envelope_id: str) -> None:
    """The destination took the envelope (accepted or refused it for good): drop it."""
    removed = conn.execute(
        tables.run_envelopes.delete().where(
            tables.run_envelopes.c.id == envelope_id,
            tables.run_envelopes.c.destination == device_id,
        )
    ).rowcount
    if not removed:
        raise NotFoundError(f"no envelope {envelope_id} waits for device {device_id}")
