"""Rollouts: a new artifact version moves through the target devices in waves.

A rollout orders its target devices by the SHA-256 of their ids and assigns the new
version to a growing prefix of that order: wave i holds the first ceil(N x pct / 100)
devices (at least one). The :class:`RolloutEngine`, which runs in every fleet replica,
moves each running rollout on:

- a device of the current wave that reports the new version ``failed`` halts the
  rollout at once and rolls it back;
- when the wave has soaked and every device of it reports the new version ``active``,
  the gates judge the wave against the target devices still on another version: pass
  starts the next wave (or completes the rollout), fail halts and rolls back.

Rolling back assigns every device the rollout moved its previous version (or removes
the assignment when it had none): a halted rollout leaves the fleet as it found it.

The functions taking a ``conn`` work inside the caller's transaction and raise
:class:`~edgeos.errors.EdgeOSError` before writing anything when they refuse; the
:class:`RolloutEngine` methods of the same names run them in a transaction of their own
and record each refusal in the audit log after the refused work was rolled back.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import math
import re
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import orjson
import sqlalchemy as sa
from pydantic import ValidationError
from sqlalchemy.engine import Connection

from edgeos.errors import ConfigError, ConflictError, EdgeOSError, NotFoundError
from edgeos.fleet import tables
from edgeos.fleet.db import FleetDatabase, audit_refusal, bump_revision, write_audit
from edgeos.fleet.gates import Verdict, evaluate, metrics_of, parse_gates
from edgeos.fleet.selectors import Selector, parse_selector
from edgeos.protocol.fleet import ARTIFACT_KINDS, ActualArtifact, ArtifactRef, Health

log = logging.getLogger("edgeos.fleet.rollouts")

#: The audit actor of what the engine does by itself.
ENGINE_ACTOR = "fleet:rollouts"
#: How long one replica holds a rollout while it acts on it.
LEASE_S = 10.0
#: Rollouts that still hold their target: at most one per artifact (kind/name).
OPEN_STATES = ("running", "paused")
# SQLite allows 32766 bound parameters (older builds 999): look devices up in chunks.
_CHUNK = 500
_REF = re.compile(r"^([a-z]+)/([^@/\s]+)@(\S+)$")

DeviceState = Literal["active", "failed", "pending", "gone"]
T = TypeVar("T")


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


def wave_sizes(devices: int, waves: Sequence[int]) -> list[int]:
    """How many devices each (cumulative) wave holds: ceil(N x pct / 100), at least one."""
    return [max(1, min(devices, -(-devices * pct // 100))) for pct in waves]


def wave_order(device_ids: Iterable[str]) -> list[str]:
    """Device ids in rollout order: by SHA-256 of the id, the same order every time."""
    return sorted(device_ids, key=lambda d: (hashlib.sha256(d.encode()).hexdigest(), d))


# -- reading the database -------------------------------------------------------------


@dataclass(frozen=True)
class _Device:
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


def _loads(text: str | None) -> Any:
    try:
        return orjson.loads(text) if text else None
    except orjson.JSONDecodeError:
        return None


def _device(row: Any) -> _Device:
    # A device's reports are validated when they arrive; a row that does not parse any
    # more (an older format) counts as "no report", never as a crash of the engine.
    labels = _loads(row.labels)
    try:
        health = Health.model_validate(_loads(row.health) or {})
    except ValidationError:
        health = Health()
    actual: list[ActualArtifact] = []
    for item in _loads(row.actual) or []:
        try:
            actual.append(ActualArtifact.model_validate(item))
        except ValidationError:
            continue
    return _Device(
        id=row.id,
        group=row.group_name,
        active=row.status == "active",
        labels={str(k): str(v) for k, v in labels.items()} if isinstance(labels, dict) else {},
        health=health,
        actual=tuple(actual),
    )


_DEVICE_COLUMNS = (
    tables.devices.c.id,
    tables.devices.c.group_name,
    tables.devices.c.status,
    tables.devices.c.labels,
    tables.devices.c.health,
    tables.devices.c.actual,
)


def _devices(conn: Connection, ids: Sequence[str]) -> dict[str, _Device]:
    found: dict[str, _Device] = {}
    for start in range(0, len(ids), _CHUNK):
        chunk = ids[start : start + _CHUNK]
        rows = conn.execute(sa.select(*_DEVICE_COLUMNS).where(tables.devices.c.id.in_(chunk)))
        found.update((row.id, _device(row)) for row in rows)
    return found


@dataclass(frozen=True)
class _Rollout:
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


def _rollout(conn: Connection, rollout_id: str, *, lock: bool = False) -> _Rollout:
    query = sa.select(tables.rollouts).where(tables.rollouts.c.id == rollout_id)
    # Row lock on PostgreSQL (SQLite's write transactions are serialized already): an
    # operator's abort and a replica's tick never act on the same rollout at once.
    row = conn.execute(query.with_for_update() if lock else query).first()
    if row is None:
        raise NotFoundError(f"no rollout {rollout_id!r}")
    return _from_row(row)


def _from_row(row: Any) -> _Rollout:
    return _Rollout(
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


def _assign(
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


def _assign_wave(conn: Connection, r: _Rollout, ids: Sequence[str], now: float) -> int:
    return _assign(conn, ids, r.ref, r.id, now)


def _roll_back(conn: Connection, r: _Rollout, now: float) -> int:
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


def _set(conn: Connection, rollout_id: str, now: float, **values: Any) -> None:
    conn.execute(
        sa.update(tables.rollouts)
        .where(tables.rollouts.c.id == rollout_id)
        .values(updated_at=now, **values)
    )


def _audit(
    conn: Connection,
    r: _Rollout,
    *,
    actor: str,
    action: str,
    message: str,
    verdict: Verdict | None = None,
) -> None:
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
    r = _rollout(conn, rollout_id)
    moved = _assign_wave(conn, r, r.wave_devices(0), now)
    if moved:
        bump_revision(conn)
    _audit(
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
    rows = conn.execute(sa.select(*_DEVICE_COLUMNS).where(d.c.status == "active"))
    chosen = [
        dev.id for dev in map(_device, rows) if selector.matches(dev.id, dev.group, dev.labels)
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
    r = _rollout(conn, rollout_id, lock=True)
    if r.status != "running":
        raise ConflictError(f"rollout {rollout_id} is {r.status}; only a running one can be paused")
    _set(conn, r.id, now, status="paused", reason=f"paused by {actor}")
    _audit(
        conn, r, actor=actor, action="rollout.pause", message=f"paused in wave {r.current_wave + 1}"
    )
    return rollout_status(conn, rollout_id, now=now)


def resume(
    conn: Connection, rollout_id: str, actor: str, *, now: float | None = None
) -> dict[str, Any]:
    """Let a paused rollout go on."""
    now = time.time() if now is None else now
    r = _rollout(conn, rollout_id, lock=True)
    if r.status != "paused":
        raise ConflictError(f"rollout {rollout_id} is {r.status}; only a paused one can be resumed")
    _set(conn, r.id, now, status="running", reason=None)
    _audit(
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
    r = _rollout(conn, rollout_id, lock=True)
    if r.status not in OPEN_STATES:
        raise ConflictError(
            f"rollout {rollout_id} is {r.status} already; to undo a completed rollout, roll "
            "out the previous version"
        )
    moved = _roll_back(conn, r, now)
    if moved:
        bump_revision(conn)
    message = (
        f"aborted by {actor} in wave {r.current_wave + 1}; rolled back {moved} devices "
        "(every device this rollout moved)"
    )
    _set(conn, r.id, now, status="aborted", reason=message)
    _audit(conn, r, actor=actor, action="rollout.abort", message=message)
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
    rows = _devices(conn, [device_id])
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
        _assign(conn, [device_id], ref, row.id, now)
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


def _selects(selector: str, device: _Device) -> bool:
    try:
        return parse_selector(selector).matches(device.id, device.group, device.labels)
    except ConfigError:
        return False  # stored selectors were parsed at creation; a later grammar may differ


# -- the engine -----------------------------------------------------------------------


class RolloutEngine:
    """Moves running rollouts on; runs in every replica, one acts on a rollout at a time."""

    def __init__(self, db: FleetDatabase) -> None:
        self.db = db

    def tick(self, now: float | None = None) -> None:
        """Act once on every running rollout this replica can lease."""
        now = time.time() if now is None else now
        t = tables.rollouts
        with self.db.read() as conn:
            ids = (
                conn.execute(
                    sa.select(t.c.id).where(t.c.status == "running", t.c.lease_until < now)
                )
                .scalars()
                .all()
            )
        for rollout_id in ids:
            if not self._lease(rollout_id, now):
                continue  # another replica acts on it now
            try:
                self._step(rollout_id, now)
            except Exception:
                # One rollout that cannot be moved must not stop the others; its lease
                # runs out and the next tick tries again.
                log.exception("rollout %s: tick failed", rollout_id)

    def _step(self, rollout_id: str, now: float) -> None:
        # Judging reads every device of the wave (and the baseline): done in a read
        # transaction, so SQLite's single writer (device syncs) is held only to act.
        with self.db.read() as conn:
            decision = _decide(conn, rollout_id, now)
        t = tables.rollouts
        with self.db.begin() as conn:
            if decision is not None:
                _apply(conn, rollout_id, now, decision)
            conn.execute(sa.update(t).where(t.c.id == rollout_id).values(lease_until=0.0))

    def _lease(self, rollout_id: str, now: float) -> bool:
        t = tables.rollouts
        with self.db.begin() as conn:
            taken = conn.execute(
                sa.update(t)
                .where(t.c.id == rollout_id, t.c.status == "running", t.c.lease_until < now)
                .values(lease_until=now + LEASE_S)
            )
        return taken.rowcount == 1

    # Operator actions in a transaction of their own, refusals audited. ``now`` is for
    # tests that drive time, as with tick.

    def create(
        self,
        *,
        ref: ArtifactRef,
        selector: str,
        waves: Sequence[int],
        soak_s: float,
        gates: Sequence[str],
        actor: str,
        now: float | None = None,
    ) -> dict[str, Any]:
        """:func:`create_rollout` in its own transaction; a refusal is audited."""
        return self._act(
            actor,
            "rollout.create",
            str(ref),
            lambda conn: create_rollout(
                conn,
                ref=ref,
                selector=selector,
                waves=waves,
                soak_s=soak_s,
                gates=gates,
                actor=actor,
                now=now,
            ),
        )

    def pause(self, rollout_id: str, actor: str, *, now: float | None = None) -> dict[str, Any]:
        """:func:`pause` in its own transaction; a refusal is audited."""
        return self._act(
            actor,
            "rollout.pause",
            f"rollout/{rollout_id}",
            lambda conn: pause(conn, rollout_id, actor, now=now),
        )

    def resume(self, rollout_id: str, actor: str, *, now: float | None = None) -> dict[str, Any]:
        """:func:`resume` in its own transaction; a refusal is audited."""
        return self._act(
            actor,
            "rollout.resume",
            f"rollout/{rollout_id}",
            lambda conn: resume(conn, rollout_id, actor, now=now),
        )

    def abort(self, rollout_id: str, actor: str, *, now: float | None = None) -> dict[str, Any]:
        """:func:`abort` in its own transaction; a refusal is audited."""
        return self._act(
            actor,
            "rollout.abort",
            f"rollout/{rollout_id}",
            lambda conn: abort(conn, rollout_id, actor, now=now),
        )

    def status(self, rollout_id: str) -> dict[str, Any]:
        """:func:`rollout_status` in a read transaction."""
        with self.db.read() as conn:
            return rollout_status(conn, rollout_id)

    def list_rollouts(self) -> list[dict[str, Any]]:
        """:func:`list_rollouts` in a read transaction."""
        with self.db.read() as conn:
            return list_rollouts(conn)

    def _act(self, actor: str, action: str, target: str, work: Callable[[Connection], T]) -> T:
        try:
            with self.db.begin() as conn:
                return work(conn)
        except EdgeOSError as exc:
            audit_refusal(self.db, actor=actor, action=action, target=target, detail=str(exc))
            raise


@dataclass(frozen=True)
class _Decision:
    """What the engine decided about wave ``wave`` (0-based): halt (with why) or go on."""

    wave: int
    halt: str | None
    verdict: Verdict | None


def _decide(conn: Connection, rollout_id: str, now: float) -> _Decision | None:
    """Halt, go on, or (None) wait: a failed device halts at once, else after the soak
    and once every device of the wave runs the version, the gates decide."""
    r = _rollout(conn, rollout_id)
    if r.status != "running":
        return None
    wave = r.current_wave
    wave_ids = r.wave_devices(wave)
    in_wave = _devices(conn, wave_ids)
    states = {d: in_wave[d].state_of(r.ref) if d in in_wave else ("gone", None) for d in wave_ids}
    for device_id, (state, why) in states.items():
        if state == "failed":
            why = f"device {device_id} reports {r.ref} failed: {why or 'no reason given'}"
            return _Decision(wave, why, None)
    started = r.wave_started_at if r.wave_started_at is not None else r.created_at
    if now - started < r.soak_s or any(s == "pending" for s, _ in states.values()):
        return None
    verdict = _judge(conn, r, in_wave, states)
    if not verdict.passed:
        return _Decision(wave, f"gate failed in wave {wave + 1}: {verdict.reason}", verdict)
    return _Decision(wave, None, verdict)


def _apply(conn: Connection, rollout_id: str, now: float, decision: _Decision) -> None:
    r = _rollout(conn, rollout_id, lock=True)
    if r.status != "running" or r.current_wave != decision.wave:
        return  # an operator paused or aborted it since it was judged
    if decision.halt is not None:
        _halt(conn, r, now, decision.halt, decision.verdict)
    elif decision.verdict is not None:
        _advance(conn, r, now, decision.verdict)


def _judge(
    conn: Connection,
    r: _Rollout,
    in_wave: dict[str, _Device],
    states: dict[str, tuple[DeviceState, str | None]],
) -> Verdict:
    size = r.sizes[r.current_wave]
    new = [in_wave[d].health for d, (state, _) in states.items() if state == "active"]
    rest = _devices(conn, r.devices[size:])
    # The baseline is the target devices still on another version; when the wave holds
    # every target device there is none, and only absolute limits can be judged.
    old = [dev.health for dev in rest.values() if dev.state_of(r.ref)[0] in ("pending", "failed")]
    return evaluate(
        parse_gates(r.gates),
        wave=r.current_wave + 1,
        new=metrics_of(new),
        baseline=metrics_of(old) if old else None,
    )


def _halt(
    conn: Connection, r: _Rollout, now: float, why: str, verdict: Verdict | None = None
) -> None:
    moved = _roll_back(conn, r, now)
    if moved:
        bump_revision(conn)
    message = (
        f"{why}; halted in wave {r.current_wave + 1} and rolled back {moved} devices "
        "(every device this rollout moved)"
    )
    _set(conn, r.id, now, status="halted", reason=message)
    _audit(conn, r, actor=ENGINE_ACTOR, action="rollout.halt", message=message, verdict=verdict)


def _advance(conn: Connection, r: _Rollout, now: float, verdict: Verdict) -> None:
    sizes = r.sizes
    wave = r.current_wave
    following = wave + 1
    # With few devices, successive percentages can round to the same count: such a wave
    # adds nobody and has nothing to soak.
    while following < len(sizes) and sizes[following] == sizes[wave]:
        following += 1
    if following >= len(sizes):
        late = _assign_late_devices(conn, r, now)
        if late:
            bump_revision(conn)
        message = (
            f"completed: wave {wave + 1} passed its gates; {len(r.devices)} devices run {r.ref}"
            + (f"; assigned to {late} devices that joined the target meanwhile" if late else "")
        )
        _set(conn, r.id, now, status="completed", current_wave=len(sizes) - 1, reason=None)
        _audit(
            conn, r, actor=ENGINE_ACTOR, action="rollout.complete", message=message, verdict=verdict
        )
        return
    added = r.devices[sizes[wave] : sizes[following]]
    moved = _assign_wave(conn, r, added, now)
    if moved:
        bump_revision(conn)
    _set(conn, r.id, now, current_wave=following, wave_started_at=now)
    message = (
        f"wave {wave + 1} passed its gates; wave {following + 1} ({r.waves[following]}%) "
        f"started: {len(added)} more devices, {moved} newly assigned"
    )
    _audit(conn, r, actor=ENGINE_ACTOR, action="rollout.wave", message=message, verdict=verdict)


# -- reading rollouts -----------------------------------------------------------------


def list_rollouts(conn: Connection) -> list[dict[str, Any]]:
    """Every rollout, newest first, without per-device detail."""
    t = tables.rollouts
    rows = conn.execute(sa.select(t).order_by(t.c.created_at.desc(), t.c.id))
    return [_summary(_from_row(row)) for row in rows]


def _summary(r: _Rollout) -> dict[str, Any]:
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
    r = _rollout(conn, rollout_id)
    sizes = r.sizes
    devices = _devices(conn, r.devices)
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


def _assign_late_devices(conn: Connection, r: _Rollout, now: float) -> int:
    """At completion, give the version to active devices the selector matches that joined
    (or were relabelled into the target) after the rollout chose its devices."""
    selector, known = parse_selector(r.selector), set(r.devices)
    rows = conn.execute(sa.select(*_DEVICE_COLUMNS).where(tables.devices.c.status == "active"))
    late = [
        dev.id
        for dev in map(_device, rows)
        if dev.id not in known and selector.matches(dev.id, dev.group, dev.labels)
    ]
    return _assign_wave(conn, r, late, now)


def _wave_state(r: _Rollout, index: int) -> str:
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
        doc = _loads(detail)
        verdict = doc.get("verdict") if isinstance(doc, dict) else None
        if isinstance(verdict, dict) and isinstance(verdict.get("wave"), int):
            found[verdict["wave"]] = verdict
    return found
