"""Devices' long-term memory, backed up by the fleet, and devices that replace others.

A device ships its memory change log here (:mod:`edgeos.memory.replication` is the
protocol): the backup keeps the position (the last sequence applied) and the live
records, each as the body the device sent. A batch is applied in one transaction, each
change only if its sequence is past the position, so a batch sent twice (an answer lost
on the way back) changes nothing the second time. A delete removes the record's row, so
an erasure on the device leaves nothing of the record here either.

A join token can name a device it replaces: the device that enrolls with it is recorded
as the replacement, the replaced device is revoked, and the replacement may read the
replaced device's backup (to restore it) but never write it; once its own backup holds
the restored records, it releases the replaced device's (the records move, they are not
copied). Every function works in the caller's transaction.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import orjson
import sqlalchemy as sa
from sqlalchemy.engine import Connection

from edgeos.errors import ConfigError, ConflictError, NotFoundError, PermissionDeniedError
from edgeos.fleet import devices, tables
from edgeos.protocol.fleet import (
    MAX_MEMORY_BATCH_BYTES,
    MAX_MEMORY_PAGE,
    MemoryBackup,
    MemoryChange,
    MemoryRecordsPage,
)

_B, _R, _D = tables.memory_backups, tables.memory_backup_records, tables.device_replacements


def replaced_by(conn: Connection, device_id: str) -> str | None:
    """The device ``device_id`` was enrolled to replace, if any."""
    found = conn.execute(sa.select(_D.c.replaces).where(_D.c.device_id == device_id)).scalar()
    return None if found is None else str(found)


def backup(conn: Connection, device_id: str) -> MemoryBackup:
    """Where ``device_id``'s backup stands (position 0 and nothing held before its first
    batch)."""
    row = conn.execute(sa.select(_B).where(_B.c.device_id == device_id)).mappings().first()
    replaces = replaced_by(conn, device_id)
    if row is None:
        return MemoryBackup(device_id=device_id, position=0, records=0, bytes=0, changes=0,
                            replaces=replaces)  # fmt: skip
    return MemoryBackup(
        device_id=device_id, position=row["position"], records=row["records"],
        bytes=row["bytes"], changes=row["changes"], updated_at=row["updated_at"],
        replaces=replaces,
    )  # fmt: skip


def device_backup(conn: Connection, device_id: str) -> MemoryBackup:
    """:func:`backup` for an operator: NotFoundError when no such device ever enrolled."""
    d = tables.devices
    if conn.execute(sa.select(d.c.id).where(d.c.id == device_id)).first() is None:
        raise NotFoundError(f"no device {device_id!r}")
    return backup(conn, device_id)


def check_batch(changes: Sequence[MemoryChange]) -> None:
    """ConfigError naming the first change that does not fit the log: sequences must rise,
    a put's body must be of its record and agent, a delete carries no body."""
    previous = 0
    for index, change in enumerate(changes):
        where = f"changes[{index}] (seq {change.seq})"
        if change.seq <= previous:
            raise ConfigError(f"{where}: sequences must rise within a batch (after {previous})")
        previous = change.seq
        body = change.body
        if change.op == "delete" and body is not None:
            raise ConfigError(f"{where}: a delete carries no body")
        if body is not None and (body.id != change.record or body.agent != change.agent):
            raise ConfigError(f"{where}: the body is of record {body.id} of agent "
                              f"{body.agent}, not {change.record} of {change.agent}")  # fmt: skip
        if body is not None and len(body.vector) % 4:
            raise ConfigError(f"{where}: body.vector is not base64 of float32 values")


def apply_changes(
    conn: Connection, device_id: str, changes: Sequence[MemoryChange], *, now: float | None = None
) -> MemoryBackup:
    """Apply the changes past the backup's position, in order; the backup afterwards.

    ConfigError (nothing applied) for a batch :func:`check_batch` refuses; ConflictError
    when another transaction moved the position meanwhile (the device asks again).
    """
    check_batch(changes)
    now = time.time() if now is None else now
    current = conn.execute(
        sa.select(_B).where(_B.c.device_id == device_id).with_for_update()
    ).mappings().first()  # fmt: skip
    if current is None:
        conn.execute(sa.insert(_B).values(device_id=device_id, position=0, records=0, bytes=0,
                                          changes=0, updated_at=now))  # fmt: skip
        position, records, size, applied = 0, 0, 0, 0
    else:
        position, records, size = current["position"], current["records"], current["bytes"]
        applied = current["changes"]
    fresh = [c for c in changes if c.seq > position]
    for change in fresh:
        gone = conn.execute(
            sa.delete(_R).where(_R.c.device_id == device_id, _R.c.record == change.record)
            .returning(_R.c.size)
        ).scalar()  # fmt: skip
        if gone is not None:
            records, size = records - 1, size - int(gone)
        if change.op == "put" and change.body is not None:
            body = change.body.model_dump_json()
            conn.execute(sa.insert(_R).values(device_id=device_id, record=change.record,
                                              seq=change.seq, size=len(body), body=body))  # fmt: skip
            records, size = records + 1, size + len(body)
    if not fresh:
        return backup(conn, device_id)
    moved = conn.execute(
        sa.update(_B).where(_B.c.device_id == device_id, _B.c.position == position).values(
            position=fresh[-1].seq, records=records, bytes=size, changes=applied + len(fresh),
            updated_at=now,
        )
    )  # fmt: skip
    if moved.rowcount != 1:
        raise ConflictError(f"the memory backup of device {device_id} moved meanwhile: try again")
    return backup(conn, device_id)


def check_owner(conn: Connection, device: str, owner: str) -> None:
    """PermissionDeniedError unless ``device`` is ``owner``: a backup's position and
    changes are its own device's business alone."""
    if device != owner:
        raise PermissionDeniedError(
            f"device {device} may not use the memory backup of device {owner}: only its own"
        )


def check_reader(conn: Connection, reader: str, owner: str) -> None:
    """PermissionDeniedError unless ``reader`` may read ``owner``'s backup: its own, or
    that of the device it was enrolled to replace."""
    if reader != owner and replaced_by(conn, reader) != owner:
        raise PermissionDeniedError(
            f"device {reader} may not read the memory backup of device {owner}: only its "
            "own, or that of the device it replaces"
        )


def check_replacement(conn: Connection, device: str, owner: str) -> None:
    """PermissionDeniedError unless ``device`` was enrolled to replace ``owner``."""
    if replaced_by(conn, device) != owner:
        raise PermissionDeniedError(
            f"device {device} may not release the memory backup of device {owner}: only "
            "the device that replaces it"
        )


def release(conn: Connection, owner: str, *, now: float | None = None) -> MemoryBackup:
    """Drop ``owner``'s records once its replacement holds them in its own backup: the
    memory moved, and an erasure on the replacement must not leave a copy here."""
    conn.execute(sa.delete(_R).where(_R.c.device_id == owner))
    conn.execute(
        sa.update(_B).where(_B.c.device_id == owner)
        .values(records=0, bytes=0, updated_at=time.time() if now is None else now)
    )  # fmt: skip
    return backup(conn, owner)


def live_records(
    conn: Connection,
    device_id: str,
    *,
    after: str | None = None,
    limit: int = MAX_MEMORY_PAGE,
    max_bytes: int = MAX_MEMORY_BATCH_BYTES,
) -> MemoryRecordsPage:
    """A page of ``device_id``'s live records in record id order, past ``after``: at most
    ``limit`` records and, past the first, ``max_bytes`` of them."""
    query = sa.select(_R.c.record, _R.c.size, _R.c.body).where(_R.c.device_id == device_id)
    if after is not None:
        query = query.where(_R.c.record > after)
    rows = conn.execute(query.order_by(_R.c.record).limit(limit + 1)).all()
    count, size = 0, 0
    for row in rows[:limit]:
        size += row.size
        if count and size > max_bytes:
            break
        count += 1
    page = rows[:count]
    return MemoryRecordsPage.model_validate(
        {
            "records": [orjson.loads(row.body) for row in page],
            "next": page[-1].record if len(page) < len(rows) else None,
        }
    )


def replacement_target(conn: Connection, device_id: str) -> str:
    """The group of ``device_id``, which a join token is about to name as replaced;
    NotFoundError when no such device ever enrolled."""
    d = tables.devices
    group = conn.execute(sa.select(d.c.group_name).where(d.c.id == device_id)).scalar()
    if group is None:
        raise NotFoundError(f"no device {device_id!r} to replace")
    return str(group)


def take_over(conn: Connection, token_id: str, device_id: str, *, now: float) -> str | None:
    """At enrollment with join token ``token_id``: when it names a device to replace,
    record ``device_id`` as its replacement and revoke it; returns the replaced id."""
    t = tables.join_tokens
    replaces = conn.execute(sa.select(t.c.replaces).where(t.c.id == token_id)).scalar()
    if replaces is None:
        return None
    if replaces == device_id:
        raise ConfigError(f"device {device_id} cannot enroll as its own replacement")
    devices.revoke_device(conn, replaces)
    conn.execute(sa.delete(_D).where(_D.c.device_id == device_id))
    conn.execute(sa.insert(_D).values(device_id=device_id, replaces=replaces,
                                      join_token_id=token_id, replaced_at=now))  # fmt: skip
    return str(replaces)
