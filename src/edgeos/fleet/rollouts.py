"""Rollouts: a new artifact version moves through the target devices in waves.

A rollout orders its target devices by the SHA-256 of their ids and assigns the new
version to a growing prefix of that order: wave i holds the first ceil(N x pct / 100)
devices (at least one). The :class:`~edgeos.fleet.rollout_engine.RolloutEngine`, which
runs in every fleet replica, moves each running rollout on (see
:mod:`edgeos.fleet.rollout_engine`).

Rolling back assigns every device the rollout moved its previous version (or removes
the assignment when it had none): a halted rollout leaves the fleet as it found it.

The functions taking a ``conn`` work inside the caller's transaction and raise
:class:`~edgeos.errors.EdgeOSError` before writing anything when they refuse; the
:class:`~edgeos.fleet.rollout_engine.RolloutEngine` methods of the same names run them
in a transaction of their own and record each refusal in the audit log after the
refused work was rolled back.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import re
import time
import uuid
from collections.abc import Iterable, Sequence
from typing import Any

import orjson
import sqlalchemy as sa
from pydantic import ValidationError
from sqlalchemy.engine import Connection

from edgeos.errors import ConfigError, ConflictError, NotFoundError
from edgeos.fleet import tables
from edgeos.fleet.db import bump_revision, write_audit
from edgeos.fleet.gates import parse_gates
from edgeos.fleet.rollout_records import (
    DEVICE_COLUMNS,
    ENGINE_ACTOR,
    DeviceView,
    RolloutRecord,
    assign_devices,
    assign_wave,
    audit_rollout,
    device_from_row,
    load_devices,
    load_json,
    load_rollout,
    roll_back,
    rollout_from_row,
    update_rollout,
)
from edgeos.fleet.rollout_records import wave_sizes as wave_sizes  # re-exported
from edgeos.fleet.selectors import Selector, parse_selector
from edgeos.protocol.fleet import ARTIFACT_KINDS, ArtifactRef

#: Rollouts that still hold their target: at most one per artifact (kind/name).
OPEN_STATES = ("running", "paused")
_REF = re.compile(r"^([a-z]+)/([^@/\s]+)@(\S+)$")


def parse_artifact_ref(text: str) -> ArtifactRef:
    """``kind/name@version`` as an ArtifactRef; ConfigError naming what is wrong."""
    match = _REF.match(text.strip())
    if not match:
        raise ConfigError(f"artifact {text!r}: write KIND/NAME@VERSION, e.g. model/stockout-risk@4")
    kind, name, version = match.groups()
    if kind not in ARTIFACT_KINDS:
        raise ConfigError(
            f"artifact {text!r}: kind {kind!r} is not one of {', '.join(ARTIFACT_KINDS)}"
        )
    try:
        return ArtifactRef.model_validate({"kind": kind, "name": name, "version": version})
    except ValidationError as exc:
        field = ".".join(str(p) for p in exc.errors()[0]["loc"])
        raise ConfigError(f"artifact {text!r}: {field} is not valid") from exc


def check_waves(waves: Sequence[int]) -> list[int]:
    """``waves`` if they are cumulative percentages 1..100, strictly increasing, ending at 100."""
    if not waves:
        raise ConfigError("waves: give at least one, e.g. 1,10,50,100")
    values = list(waves)
    for value in values:
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 100:
            raise ConfigError(f"waves {values}: {value!r} is not a whole percentage from 1 to 100")
    for before, after in itertools.pairwise(values):
        if after <= before:
            raise ConfigError(f"waves {values}: must increase strictly ({before} then {after})")
    if values[-1] != 100:
        raise ConfigError(f"waves {values}: the last wave must be 100 (every target device)")
    return values


def wave_order(device_ids: Iterable[str]) -> list[str]:
    """Device ids in rollout order: by SHA-256 of the id, the same order every time."""
    return sorted(device_ids, key=lambda d: (hashlib.sha256(d.encode()).hexdigest(), d))


# -- creating -------------------------------------------------------------------------


def create_rollout(
    conn: Connection,
    *,
    ref: ArtifactRef,
    selector: str,
    waves: Sequence[int],
    soak_s: float,
    gates: Sequence[str],
    actor: str,
    now: float | None = None,
) -> dict[str, Any]:
    """Start rolling ``ref`` out to the devices ``selector`` picks; returns its status.

    Refuses (raising before anything is written) a malformed selector, waves or gate, an
    unpublished artifact, an unknown group, a target with no active device, and an
    artifact that has a running or paused rollout already.
    """
    now = time.time() if now is None else now
    waves = check_waves(waves)
    if not (math.isfinite(soak_s) and soak_s >= 0):
        raise ConfigError(f"soak {soak_s!r}: give a number of seconds, 0 or more")
    parsed_gates = parse_gates(gates)
    parsed = parse_selector(selector)
    _check_artifact(conn, ref)
    _check_no_open_rollout(conn, ref)
    targets = _targets(conn, parsed, selector)

    rollout_id = f"ro-{uuid.uuid4().hex[:16]}"
    conn.execute(
        sa.insert(tables.rollouts).values(
            id=rollout_id,
            kind=ref.kind,
            name=ref.name,
            version=ref.version,
            selector=str(parsed),
            waves=orjson.dumps(waves).decode(),
            soak_s=float(soak_s),
            gates=orjson.dumps([g.text for g in parsed_gates]).decode(),
            devices=orjson.dumps(targets).decode(),
            status="running",
            current_wave=0,
            wave_started_at=now,
            reason=None,
            created_at=now,
            created_by=actor,
            updated_at=now,
            lease_until=0.0,
        )
    )
    r = load_rollout(conn, rollout_id)
    moved = assign_wave(conn, r, r.wave_devices(0), now)
    if moved:
        bump_revision(conn)
    audit_rollout(
        conn,
        r,
        actor=actor,
        action="rollout.create",
        message=f"{ref} to {len(targets)} devices ({parsed}); wave 1 of {len(waves)}: "
        f"{r.sizes[0]} devices, {moved} newly assigned",
    )
    return rollout_status(conn, rollout_id, now=now)


def _check_artifact(conn: Connection, ref: ArtifactRef) -> None:
    t = tables.artifacts
    found = conn.execute(
        sa.select(t.c.version).where(
            t.c.kind == ref.kind, t.c.name == ref.name, t.c.version == ref.version
        )
    ).first()
    if found is None:
        raise NotFoundError(f"artifact {ref} is not published (edgeos fleet publish ...)")


def _check_no_open_rollout(conn: Connection, ref: ArtifactRef) -> None:
    if conn.dialect.name == "postgresql":
        # Two operators creating a rollout of the same artifact at once: one waits here
        # until the other committed, then sees its rollout below.
        conn.execute(
            sa.text("SELECT pg_advisory_xact_lock(hashtext(:key))"),
            {"key": f"edgeos-rollout:{ref.kind}/{ref.name}"},
        )
    t = tables.rollouts
    other = conn.execute(
        sa.select(t.c.id, t.c.version, t.c.status).where(
            t.c.kind == ref.kind, t.c.name == ref.name, t.c.status.in_(OPEN_STATES)
        )
    ).first()
    if other is not None:
        raise ConflictError(
            f"{ref.kind}/{ref.name} has a {other.status} rollout already ({other.id}, version "
            f"{other.version}): abort it or let it finish first"
        )


def _targets(conn: Connection, selector: Selector, text: str) -> list[str]:
    d = tables.devices
    for group in selector.groups:
        if conn.execute(sa.select(d.c.id).where(d.c.group_name == group).limit(1)).first() is None:
            raise NotFoundError(f"target {text!r}: there is no group {group!r}")
    rows = conn.execute(sa.select(*DEVICE_COLUMNS).where(d.c.status == "active"))
    chosen = [
        dev.id
        for dev in map(device_from_row, rows)
        if selector.matches(dev.id, dev.group, dev.labels)
    ]
    if not chosen:
        raise NotFoundError(f"target {text!r} matches no active device")
    return wave_order(chosen)


# -- operator actions -----------------------------------------------------------------


def pause(
    conn: Connection, rollout_id: str, actor: str, *, now: float | None = None
) -> dict[str, Any]:
    """Stop a running rollout where it is; its devices keep what they were assigned.

    The soak clock keeps running while paused: the wave's devices still run the version.
    """
    now = time.time() if now is None else now
    r = load_rollout(conn, rollout_id, lock=True)
    if r.status != "running":
        raise ConflictError(f"rollout {rollout_id} is {r.status}; only a running one can be paused")
    update_rollout(conn, r.id, now, status="paused", reason=f"paused by {actor}")
    audit_rollout(
        conn, r, actor=actor, action="rollout.pause", message=f"paused in wave {r.current_wave + 1}"
    )
    return rollout_status(conn, rollout_id, now=now)


def resume(
    conn: Connection, rollout_id: str, actor: str, *, now: float | None = None
) -> dict[str, Any]:
    """Let a paused rollout go on."""
    now = time.time() if now is None else now
    r = load_rollout(conn, rollout_id, lock=True)
    if r.status != "paused":
        raise ConflictError(f"rollout {rollout_id} is {r.status}; only a paused one can be resumed")
    update_rollout(conn, r.id, now, status="running", reason=None)
    audit_rollout(
        conn,
        r,
        actor=actor,
        action="rollout.resume",
        message=f"resumed in wave {r.current_wave + 1}",
    )
    return rollout_status(conn, rollout_id, now=now)


def abort(
    conn: Connection, rollout_id: str, actor: str, *, now: float | None = None
) -> dict[str, Any]:
    """Stop a running or paused rollout and roll back every device it moved."""
    now = time.time() if now is None else now
    r = load_rollout(conn, rollout_id, lock=True)
    if r.status not in OPEN_STATES:
        raise ConflictError(
            f"rollout {rollout_id} is {r.status} already; to undo a completed rollout, roll "
            "out the previous version"
        )
    moved = roll_back(conn, r, now)
    if moved:
        bump_revision(conn)
    message = (
        f"aborted by {actor} in wave {r.current_wave + 1}; rolled back {moved} devices "
        "(every device this rollout moved)"
    )
    update_rollout(conn, r.id, now, status="aborted", reason=message)
    audit_rollout(conn, r, actor=actor, action="rollout.abort", message=message)
    return rollout_status(conn, rollout_id, now=now)


# -- new devices ----------------------------------------------------------------------


def assign_new_device(
    conn: Connection, device_id: str, *, now: float | None = None
) -> list[ArtifactRef]:
    """Give a device the versions completed rollouts gave its peers; returns what changed.

    For each artifact, the latest completed rollout whose selector matches the device
    decides, unless the device was assigned something after that rollout completed.
    Call it when a device enrolls and when its labels change, in the same transaction.
    """
    now = time.time() if now is None else now
    rows = load_devices(conn, [device_id])
    device = rows.get(device_id)
    if device is None or not device.active:
        return []
    t, a = tables.rollouts, tables.assignments
    completed = conn.execute(
        sa.select(t.c.id, t.c.kind, t.c.name, t.c.version, t.c.selector, t.c.updated_at)
        .where(t.c.status == "completed")
        .order_by(t.c.updated_at.desc(), t.c.id)
    ).all()
    current = {
        (row.kind, row.name): row
        for row in conn.execute(
            sa.select(a.c.kind, a.c.name, a.c.version, a.c.assigned_at).where(
                a.c.device_id == device_id
            )
        )
    }
    decided: set[tuple[str, str]] = set()
    given: list[ArtifactRef] = []
    for row in completed:
        key = (row.kind, row.name)
        if key in decided or not _selects(row.selector, device):
            continue
        decided.add(key)
        mine = current.get(key)
        if mine is not None and (mine.version == row.version or mine.assigned_at >= row.updated_at):
            continue
        ref = ArtifactRef(kind=row.kind, name=row.name, version=row.version)
        assign_devices(conn, [device_id], ref, row.id, now)
        write_audit(
            conn,
            actor=ENGINE_ACTOR,
            action="rollout.assign",
            target=f"device/{device_id}",
            outcome="ok",
            detail=f"{ref} from completed rollout {row.id}",
        )
        given.append(ref)
    if given:
        bump_revision(conn)
    return given


def _selects(selector: str, device: DeviceView) -> bool:
    try:
        return parse_selector(selector).matches(device.id, device.group, device.labels)
    except ConfigError:
        return False  # stored selectors were parsed at creation; a later grammar may differ


# -- reading rollouts -----------------------------------------------------------------


def list_rollouts(conn: Connection) -> list[dict[str, Any]]:
    """Every rollout, newest first, without per-device detail."""
    t = tables.rollouts
    rows = conn.execute(sa.select(t).order_by(t.c.created_at.desc(), t.c.id))
    return [_summary(rollout_from_row(row)) for row in rows]


def _summary(r: RolloutRecord) -> dict[str, Any]:
    return {
        "id": r.id,
        "artifact": str(r.ref),
        "kind": r.ref.kind,
        "name": r.ref.name,
        "version": r.ref.version,
        "target": r.selector,
        "waves": r.waves,
        "soak_s": r.soak_s,
        "gates": r.gates,
        "devices": len(r.devices),
        "status": r.status,
        "current_wave": r.current_wave + 1,
        "wave_started_at": r.wave_started_at,
        "reason": r.reason,
        "created_at": r.created_at,
        "created_by": r.created_by,
        "updated_at": r.updated_at,
    }


def rollout_status(
    conn: Connection, rollout_id: str, *, now: float | None = None
) -> dict[str, Any]:
    """A rollout with per-wave progress: devices, how many report the version
    active/failed/pending, each judged wave's gate verdict, the current soak remaining."""
    now = time.time() if now is None else now
    r = load_rollout(conn, rollout_id)
    sizes = r.sizes
    devices = load_devices(conn, r.devices)
    states = {d: devices[d].state_of(r.ref)[0] if d in devices else "gone" for d in r.devices}
    verdicts = _verdicts(conn, r.id)
    waves: list[dict[str, Any]] = []
    for index, (pct, size) in enumerate(zip(r.waves, sizes, strict=True)):
        counts = {"active": 0, "failed": 0, "pending": 0, "gone": 0}
        for device_id in r.devices[:size]:
            counts[states[device_id]] += 1
        waves.append(
            {
                "number": index + 1,
                "percent": pct,
                "devices": size,
                "added": size - (sizes[index - 1] if index else 0),
                "state": _wave_state(r, index),
                **counts,
                "verdict": verdicts.get(index + 1),
            }
        )
    soak_remaining: float | None = None
    if r.status in OPEN_STATES:
        started = r.wave_started_at if r.wave_started_at is not None else r.created_at
        soak_remaining = max(0.0, started + r.soak_s - now)
    return {**_summary(r), "soak_remaining_s": soak_remaining, "wave_list": waves}


def _wave_state(r: RolloutRecord, index: int) -> str:
    if r.status == "completed" or index < r.current_wave:
        return "passed"
    if index > r.current_wave:
        return "waiting" if r.status in OPEN_STATES else "not started"
    return {"running": "soaking", "paused": "paused"}.get(r.status, r.status)


def _verdicts(conn: Connection, rollout_id: str) -> dict[int, dict[str, Any]]:
    t = tables.audit
    rows = conn.execute(
        sa.select(t.c.detail)
        .where(
            t.c.target == f"rollout/{rollout_id}",
            t.c.outcome == "ok",
            t.c.action.in_(("rollout.wave", "rollout.complete", "rollout.halt")),
        )
        .order_by(t.c.id)
    ).scalars()
    found: dict[int, dict[str, Any]] = {}
    for detail in rows:
        doc = load_json(detail)
        verdict = doc.get("verdict") if isinstance(doc, dict) else None
        if isinstance(verdict, dict) and isinstance(verdict.get("wave"), int):
            found[verdict["wave"]] = verdict
    return found
