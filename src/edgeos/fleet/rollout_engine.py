"""The rollout engine: moves running rollouts on, one wave at a time.

The :class:`RolloutEngine` runs in every fleet replica; a lease on the rollout row lets
one replica at a time act on a rollout. It moves each running rollout on:

- a device of the current wave that reports the new version ``failed`` halts the
  rollout at once and rolls it back;
- when the wave has soaked and every device of it reports the new version ``active``,
  the gates judge the wave against the target devices still on another version: pass
  starts the next wave (or completes the rollout), fail halts and rolls back.

Its operator methods run the functions of :mod:`edgeos.fleet.rollouts` of the same
names in a transaction of their own and record each refusal in the audit log.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from edgeos.errors import EdgeOSError
from edgeos.fleet import tables
from edgeos.fleet.db import FleetDatabase, audit_refusal, bump_revision
from edgeos.fleet.gates import Verdict, evaluate, metrics_of, parse_gates
from edgeos.fleet.rollout_records import (
    DEVICE_COLUMNS,
    ENGINE_ACTOR,
    DeviceState,
    DeviceView,
    RolloutRecord,
    assign_wave,
    audit_rollout,
    device_from_row,
    load_devices,
    load_rollout,
    roll_back,
    update_rollout,
)
from edgeos.fleet.rollouts import (
    abort,
    create_rollout,
    list_rollouts,
    pause,
    resume,
    rollout_status,
)
from edgeos.fleet.selectors import parse_selector
from edgeos.protocol.fleet import ArtifactRef

log = logging.getLogger("edgeos.fleet.rollouts")

#: How long one replica holds a rollout while it acts on it.
LEASE_S = 10.0

T = TypeVar("T")


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
    r = load_rollout(conn, rollout_id)
    if r.status != "running":
        return None
    wave = r.current_wave
    wave_ids = r.wave_devices(wave)
    in_wave = load_devices(conn, wave_ids)
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
    r = load_rollout(conn, rollout_id, lock=True)
    if r.status != "running" or r.current_wave != decision.wave:
        return  # an operator paused or aborted it since it was judged
    if decision.halt is not None:
        _halt(conn, r, now, decision.halt, decision.verdict)
    elif decision.verdict is not None:
        _advance(conn, r, now, decision.verdict)


def _judge(
    conn: Connection,
    r: RolloutRecord,
    in_wave: dict[str, DeviceView],
    states: dict[str, tuple[DeviceState, str | None]],
) -> Verdict:
    size = r.sizes[r.current_wave]
    new = [in_wave[d].health for d, (state, _) in states.items() if state == "active"]
    rest = load_devices(conn, r.devices[size:])
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
    conn: Connection, r: RolloutRecord, now: float, why: str, verdict: Verdict | None = None
) -> None:
    moved = roll_back(conn, r, now)
    if moved:
        bump_revision(conn)
    message = (
        f"{why}; halted in wave {r.current_wave + 1} and rolled back {moved} devices "
        "(every device this rollout moved)"
    )
    update_rollout(conn, r.id, now, status="halted", reason=message)
    audit_rollout(
        conn, r, actor=ENGINE_ACTOR, action="rollout.halt", message=message, verdict=verdict
    )


def _advance(conn: Connection, r: RolloutRecord, now: float, verdict: Verdict) -> None:
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
        update_rollout(
            conn, r.id, now, status="completed", current_wave=len(sizes) - 1, reason=None
        )
        audit_rollout(
            conn, r, actor=ENGINE_ACTOR, action="rollout.complete", message=message, verdict=verdict
        )
        return
    added = r.devices[sizes[wave] : sizes[following]]
    moved = assign_wave(conn, r, added, now)
    if moved:
        bump_revision(conn)
    update_rollout(conn, r.id, now, current_wave=following, wave_started_at=now)
    message = (
        f"wave {wave + 1} passed its gates; wave {following + 1} ({r.waves[following]}%) "
        f"started: {len(added)} more devices, {moved} newly assigned"
    )
    audit_rollout(
        conn, r, actor=ENGINE_ACTOR, action="rollout.wave", message=message, verdict=verdict
    )


def _assign_late_devices(conn: Connection, r: RolloutRecord, now: float) -> int:
    """At completion, give the version to active devices the selector matches that joined
    (or were relabelled into the target) after the rollout chose its devices."""
    selector, known = parse_selector(r.selector), set(r.devices)
    rows = conn.execute(sa.select(*DEVICE_COLUMNS).where(tables.devices.c.status == "active"))
    late = [
        dev.id
        for dev in map(device_from_row, rows)
        if dev.id not in known and selector.matches(dev.id, dev.group, dev.labels)
    ]
    return assign_wave(conn, r, late, now)
