"""The database view rollouts share: device and rollout rows, and writing them.

:class:`DeviceView` and :class:`RolloutRecord` are the rows of ``devices`` and
``rollouts`` with their JSON columns parsed; the functions here read them, assign
versions to devices (remembering what each had, so a rollout can be rolled back), and
update and audit rollout rows, inside the caller's transaction.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import orjson
import sqlalchemy as sa
from pydantic import ValidationError
from sqlalchemy.engine import Connection

from edgeos.errors import NotFoundError
from edgeos.fleet import tables
from edgeos.fleet.db import write_audit
from edgeos.fleet.gates import Verdict
from edgeos.protocol.fleet import ActualArtifact, ArtifactRef, Health

#: The audit actor of what the engine does by itself.
ENGINE_ACTOR = "fleet:rollouts"
# SQLite allows 32766 bound parameters (older builds 999): look devices up in chunks.
_CHUNK = 500

DeviceState = Literal["active", "failed", "pending", "gone"]


def wave_sizes(devices: int, waves: Sequence[int]) -> list[int]:
    """How many devices each (cumulative) wave holds: ceil(N x pct / 100), at least one."""
    return [max(1, min(devices, -(-devices * pct // 100))) for pct in waves]


@dataclass(frozen=True)
class DeviceView:
    """What the engine needs of a device row, its JSON columns parsed."""

    id: str
    group: str
    active: bool
    labels: dict[str, str]
    health: Health
    actual: tuple[ActualArtifact, ...]

    def state_of(self, ref: ArtifactRef) -> tuple[DeviceState, str | None]:
        """Whether the device runs ``ref`` (``active``), refused it (``failed``), or neither."""
        if not self.active:
            return "gone", None
        for item in self.actual:
            if (item.kind, item.name, item.version) == (ref.kind, ref.name, ref.version):
                return item.state, item.reason
        return "pending", None


def load_json(text: str | None) -> Any:
    """``text`` parsed as JSON; None when it is empty or not JSON."""
    try:
        return orjson.loads(text) if text else None
    except orjson.JSONDecodeError:
        return None


def device_from_row(row: Any) -> DeviceView:
    """A :class:`DeviceView` of a row selected with :data:`DEVICE_COLUMNS`."""
    # A device's reports are validated when they arrive; a row that does not parse any
    # more (an older format) counts as "no report", never as a crash of the engine.
    labels = load_json(row.labels)
    try:
        health = Health.model_validate(load_json(row.health) or {})
    except ValidationError:
        health = Health()
    actual: list[ActualArtifact] = []
    for item in load_json(row.actual) or []:
        try:
            actual.append(ActualArtifact.model_validate(item))
        except ValidationError:
            continue
    return DeviceView(
        id=row.id,
        group=row.group_name,
        active=row.status == "active",
        labels={str(k): str(v) for k, v in labels.items()} if isinstance(labels, dict) else {},
        health=health,
        actual=tuple(actual),
    )


#: The devices columns :func:`device_from_row` reads.
DEVICE_COLUMNS = (
    tables.devices.c.id,
    tables.devices.c.group_name,
    tables.devices.c.status,
    tables.devices.c.labels,
    tables.devices.c.health,
    tables.devices.c.actual,
)


def load_devices(conn: Connection, ids: Sequence[str]) -> dict[str, DeviceView]:
    """The devices of ``ids`` that exist, by id."""
    found: dict[str, DeviceView] = {}
    for start in range(0, len(ids), _CHUNK):
        chunk = ids[start : start + _CHUNK]
        rows = conn.execute(sa.select(*DEVICE_COLUMNS).where(tables.devices.c.id.in_(chunk)))
        found.update((row.id, device_from_row(row)) for row in rows)
    return found


@dataclass(frozen=True)
class RolloutRecord:
    """A rollouts row, its JSON columns parsed."""

    id: str
    ref: ArtifactRef
    selector: str
    waves: list[int]
    soak_s: float
    gates: list[str]
    devices: list[str]
    status: str
    current_wave: int
    wave_started_at: float | None
    reason: str | None
    created_at: float
    created_by: str
    updated_at: float

    @property
    def sizes(self) -> list[int]:
        """Devices per cumulative wave."""
        return wave_sizes(len(self.devices), self.waves)

    def wave_devices(self, index: int) -> list[str]:
        """The devices of (cumulative) wave ``index``, 0-based."""
        return self.devices[: self.sizes[index]]


def load_rollout(conn: Connection, rollout_id: str, *, lock: bool = False) -> RolloutRecord:
    """The rollout ``rollout_id`` (row-locked when ``lock``); NotFoundError if none."""
    query = sa.select(tables.rollouts).where(tables.rollouts.c.id == rollout_id)
    # Row lock on PostgreSQL (SQLite's write transactions are serialized already): an
    # operator's abort and a replica's tick never act on the same rollout at once.
    row = conn.execute(query.with_for_update() if lock else query).first()
    if row is None:
        raise NotFoundError(f"no rollout {rollout_id!r}")
    return rollout_from_row(row)


def rollout_from_row(row: Any) -> RolloutRecord:
    """A :class:`RolloutRecord` of a full ``rollouts`` row."""
    return RolloutRecord(
        id=row.id,
        ref=ArtifactRef(kind=row.kind, name=row.name, version=row.version),
        selector=row.selector,
        waves=list(orjson.loads(row.waves)),
        soak_s=float(row.soak_s),
        gates=list(orjson.loads(row.gates)),
        devices=list(orjson.loads(row.devices)),
        status=row.status,
        current_wave=int(row.current_wave),
        wave_started_at=row.wave_started_at,
        reason=row.reason,
        created_at=row.created_at,
        created_by=row.created_by,
        updated_at=row.updated_at,
    )


# -- assignments ----------------------------------------------------------------------


def assign_devices(
    conn: Connection, device_ids: Sequence[str], ref: ArtifactRef, rollout_id: str, now: float
) -> int:
    """Give devices ``ref``, keeping what each had as its previous version; returns how
    many changed (a device assigned that version already is left alone, and so is not
    one this rollout moved)."""
    a = tables.assignments
    changed = 0
    # A wave can hold thousands of devices: read and write them a chunk at a time, in bulk.
    for start in range(0, len(device_ids), _CHUNK):
        chunk = device_ids[start : start + _CHUNK]
        current = dict(
            conn.execute(
                sa.select(a.c.device_id, a.c.version).where(
                    a.c.device_id.in_(chunk), a.c.kind == ref.kind, a.c.name == ref.name
                )
            ).all()
        )
        fresh = [d for d in chunk if d not in current]
        moved = [d for d in chunk if d in current and current[d] != ref.version]
        if fresh:
            conn.execute(
                sa.insert(a),
                [
                    {"device_id": d, "kind": ref.kind, "name": ref.name, "version": ref.version,
                     "previous_version": None, "rollout_id": rollout_id, "assigned_at": now}
                    for d in fresh
                ],
            )  # fmt: skip
        if moved:
            conn.execute(
                sa.update(a)
                .where(a.c.device_id == sa.bindparam("d"), a.c.kind == ref.kind,
                       a.c.name == ref.name)
                .values(version=ref.version, previous_version=sa.bindparam("previous"),
                        rollout_id=rollout_id, assigned_at=now),
                [{"d": d, "previous": current[d]} for d in moved],
            )  # fmt: skip
        changed += len(fresh) + len(moved)
    return changed


def assign_wave(conn: Connection, r: RolloutRecord, ids: Sequence[str], now: float) -> int:
    """Give devices ``ids`` the version of rollout ``r``; returns how many changed."""
    return assign_devices(conn, ids, r.ref, r.id, now)


def roll_back(conn: Connection, r: RolloutRecord, now: float) -> int:
    """Give every device this rollout moved its previous version back; returns how many."""
    a = tables.assignments
    mine = (a.c.kind == r.ref.kind, a.c.name == r.ref.name)
    moved = (a.c.rollout_id == r.id, a.c.version == r.ref.version, *mine)
    rows = conn.execute(sa.select(a.c.device_id, a.c.previous_version).where(*moved)).all()
    restore = [{"d": d, "previous": previous} for d, previous in rows if previous is not None]
    if restore:
        conn.execute(
            sa.update(a)
            .where(a.c.device_id == sa.bindparam("d"), *mine)
            .values(version=sa.bindparam("previous"), previous_version=None, rollout_id=None,
                    assigned_at=now),
            restore,
        )  # fmt: skip
    # Devices that had no version before the rollout have none again.
    conn.execute(sa.delete(a).where(*moved, a.c.previous_version.is_(None)))
    return len(rows)


def update_rollout(conn: Connection, rollout_id: str, now: float, **values: Any) -> None:
    """Set columns of a rollouts row, and its ``updated_at`` to ``now``."""
    conn.execute(
        sa.update(tables.rollouts)
        .where(tables.rollouts.c.id == rollout_id)
        .values(updated_at=now, **values)
    )


def audit_rollout(
    conn: Connection,
    r: RolloutRecord,
    *,
    actor: str,
    action: str,
    message: str,
    verdict: Verdict | None = None,
) -> None:
    """Record what was done to rollout ``r`` in the audit log (with a wave verdict)."""
    # Wave verdicts live only in the audit log: rollout_status reads them back from here.
    detail: dict[str, Any] = {"message": message, "artifact": str(r.ref)}
    if verdict is not None:
        detail["verdict"] = verdict.to_json()
    write_audit(
        conn,
        actor=actor,
        action=action,
        target=f"rollout/{r.id}",
        outcome="ok",
        detail=orjson.dumps(detail).decode(),
    )
