"""Rollouts: selectors, gates, waves by stable hash, halts and rollbacks, pause/resume/abort,
refusals that change nothing, replicas ticking together, late devices, the HTTP API.

The engine tests run on SQLite and on PostgreSQL (``fleet_db_url``); time is driven with
``now=`` so soaks take no real time.
"""

from __future__ import annotations

import hashlib
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import sqlalchemy as sa

from edgeos.errors import ConfigError, ConflictError, NotFoundError, PermissionDeniedError
from edgeos.fleet import tables
from edgeos.fleet.db import FleetDatabase, current_revision
from edgeos.fleet.gates import Metrics, evaluate, metrics_of, parse_gate
from edgeos.fleet.rollout_engine import RolloutEngine
from edgeos.fleet.rollouts import (
    assign_new_device,
    check_waves,
    parse_artifact_ref,
    rollout_status,
    wave_order,
    wave_sizes,
)
from edgeos.fleet.selectors import parse_selector
from edgeos.protocol.fleet import ArtifactRef, Health
from tests.fleet_support import (  # noqa: F401 (fixtures)
    FleetServer,
    fleet_db_url,
    running_fleet,
    table_snapshot,
)

MODEL = "model/stockout-risk"
V3 = parse_artifact_ref(f"{MODEL}@3")
V4 = parse_artifact_ref(f"{MODEL}@4")
T0 = 1_000_000.0
GOOD = Health(runs=100, runs_failed=1, decisions=50, overrides=1, inference_p99_ms=20.0)
BASE = Health(runs=100, runs_failed=2, decisions=50, overrides=2, inference_p99_ms=20.0)
STORES = 20
STORE_IDS = [f"store-{uuid.uuid5(uuid.NAMESPACE_URL, str(i))}" for i in range(STORES)]
BAD = Health(runs=10, runs_failed=4, decisions=10, overrides=0, inference_p99_ms=25.0)


# -- selectors and gates ---------------------------------------------------------------


def test_selectors_parse_and_match() -> None:
    sel = parse_selector("group=stores, label:zone=north")
    assert str(sel) == "group=stores,label:zone=north"
    assert sel.matches("d1", "stores", {"zone": "north", "x": "y"})
    assert not sel.matches("d1", "stores", {"zone": "south"})
    assert not sel.matches("d1", "lab", {"zone": "north"})
    assert parse_selector("all").matches("any", "any", {})
    assert parse_selector("device=d7").matches("d7", "g", {})
    assert not parse_selector("device=d7").matches("d8", "g", {})


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("grup=stores", "'grup=stores'"),
        ("group=stores,,all", "empty term"),
        ("label:zone", "'label:zone'"),
        ("group=", "'group='"),
        ("", "empty"),
        ("group=st ores", "'group=st ores'"),
    ],
)
def test_selector_errors_name_the_term(text: str, named: str) -> None:
    with pytest.raises(ConfigError, match=named):
        parse_selector(text)


def test_gates_parse() -> None:
    assert parse_gate("failure_rate<=0.05").mode == "absolute"
    assert parse_gate(" failure_rate <= +0.05 ").mode == "increase"
    ratio = parse_gate("p99_ms<=x1.5")
    assert (ratio.metric, ratio.mode, ratio.limit, ratio.text) == (
        "p99_ms",
        "ratio",
        1.5,
        "p99_ms<=x1.5",
    )
    for bad in ("failure_rate<0.05", "latency<=5", "drift<=-1", "drift<=", "override_rate<=x"):
        with pytest.raises(ConfigError, match="gate"):
            parse_gate(bad)


def test_gate_verdicts_explain_themselves() -> None:
    wave, base = metrics_of([BAD]), metrics_of([BASE, BASE])
    assert wave.failure_rate == pytest.approx(0.4)
    gates = [parse_gate("failure_rate<=+0.05"), parse_gate("p99_ms<=x1.5")]
    verdict = evaluate(gates, wave=1, new=wave, baseline=base)
    assert not verdict.passed
    assert "failure_rate 0.40 in wave 1 > baseline 0.02 + 0.05" in verdict.reason
    assert "p99_ms" not in verdict.reason  # 25 ms <= 20 ms x 1.5 passed
    # A sum that lands a hair above the limit in floating point still passes.
    edge = metrics_of([Health(runs=100, runs_failed=7)])
    assert evaluate(gates[:1], wave=1, new=edge, baseline=base).passed


def test_gates_without_data_cannot_fail_and_say_so() -> None:
    empty = metrics_of([Health()])
    gate = [parse_gate("failure_rate<=0.01"), parse_gate("drift<=+0.1")]
    verdict = evaluate(gate, wave=2, new=empty, baseline=metrics_of([BASE]))
    assert verdict.passed
    assert all(r.undecided for r in verdict.results)
    assert "no device in wave 2 reported failure_rate" in verdict.reason
    # The last wave has no baseline: absolute limits still judge, relative ones cannot.
    last = evaluate(
        [parse_gate("failure_rate<=0.05"), parse_gate("failure_rate<=+0.01")],
        wave=3,
        new=metrics_of([BAD]),
        baseline=None,
    )
    assert not last.passed
    assert [r.passed for r in last.results] == [False, True]
    assert "no baseline" in last.results[1].reason
    no_runs = Metrics(devices=1, failure_rate=None, p99_ms=None, override_rate=None, drift=None)
    assert evaluate([parse_gate("p99_ms<=x2")], wave=1, new=no_runs, baseline=None).passed


def test_waves_and_refs() -> None:
    assert wave_sizes(20, [1, 10, 50, 100]) == [1, 2, 10, 20]
    assert wave_sizes(3, [1, 10, 50, 100]) == [1, 1, 2, 3]
    assert wave_sizes(1, [50, 100]) == [1, 1]
    for bad in ([], [10, 50], [10, 10, 100], [0, 100], [50, 101], [100, 50]):
        with pytest.raises(ConfigError, match="waves"):
            check_waves(bad)
    assert str(parse_artifact_ref("agent/restock@1.2.0")) == "agent/restock@1.2.0"
    for bad_ref in ("model/x", "widget/x@1", "model/@1", "model/x@"):
        with pytest.raises(ConfigError, match="artifact"):
            parse_artifact_ref(bad_ref)


# -- an engine over a real database ----------------------------------------------------


class Fleet:
    """A fleet database with devices and artifacts put in directly, and a rollout engine."""

    def __init__(self, db: FleetDatabase) -> None:
        self.db = db
        self.engine = RolloutEngine(db)

    def device(
        self,
        device_id: str,
        group: str = "stores",
        labels: dict[str, str] | None = None,
        *,
        status: str = "active",
        assigned: str | None = None,
    ) -> str:
        with self.db.begin() as conn:
            conn.execute(
                sa.insert(tables.devices).values(
                    id=device_id, group_name=group, status=status,
                    labels=orjson.dumps(labels or {}).decode(), inventory="{}", health="{}",
                    actual="[]", revision=0, enrolled_at=T0,
                )
            )  # fmt: skip
            if assigned:
                conn.execute(
                    sa.insert(tables.assignments).values(
                        device_id=device_id, kind=V4.kind, name=V4.name, version=assigned,
                        previous_version=None, rollout_id=None, assigned_at=T0 - 100,
                    )
                )  # fmt: skip
        return device_id

    def publish(self, ref: ArtifactRef) -> None:
        with self.db.begin() as conn:
            conn.execute(
                sa.insert(tables.artifacts).values(
                    kind=ref.kind, name=ref.name, version=ref.version,
                    target=f"{ref.kind}s/{ref.name}/{ref.version}.tar.gz", sha256="0" * 64,
                    length=1, published_at=T0, published_by="operator:test",
                )
            )  # fmt: skip

    def report(
        self, device_id: str, version: str, state: str = "active", health: Health = GOOD,
        reason: str | None = None,
    ) -> None:  # fmt: skip
        actual = [{"kind": V4.kind, "name": V4.name, "version": version, "state": state,
                   "reason": reason}]  # fmt: skip
        with self.db.begin() as conn:
            conn.execute(
                sa.update(tables.devices)
                .where(tables.devices.c.id == device_id)
                .values(actual=orjson.dumps(actual).decode(), health=health.model_dump_json())
            )

    def assigned(self) -> dict[str, str]:
        a = tables.assignments
        with self.db.read() as conn:
            return dict(conn.execute(sa.select(a.c.device_id, a.c.version)).all())

    def revision(self) -> int:
        with self.db.read() as conn:
            return current_revision(conn)

    def status(self, rollout_id: str, now: float) -> dict[str, Any]:
        with self.db.read() as conn:
            return rollout_status(conn, rollout_id, now=now)

    def audit(self, **where: str) -> list[Any]:
        a = tables.audit
        query = sa.select(a).order_by(a.c.id)
        for column, value in where.items():
            query = query.where(a.c[column] == value)
        with self.db.read() as conn:
            return list(conn.execute(query).all())

    def create(self, target: str = "group=stores", **options: Any) -> dict[str, Any]:
        values: dict[str, Any] = {"waves": [10, 50, 100], "soak_s": 60.0, "gates": []}
        values.update(options)
        ref = values.pop("ref", V4)
        return self.engine.create(ref=ref, selector=target, actor="operator:test", now=T0, **values)

    def report_wave(self, health: Health = GOOD) -> None:
        """Every device assigned the new version reports it running."""
        for device_id, version in self.assigned().items():
            if version == V4.version:
                self.report(device_id, V4.version, health=health)


@pytest.fixture
def fleet(fleet_db_url: str) -> Iterator[Fleet]:  # noqa: F811 (the imported fixture)
    db = FleetDatabase(fleet_db_url)
    db.migrate()
    f = Fleet(db)
    f.publish(V3)
    f.publish(V4)
    # Twenty stores, varied ids, half already on version 3; two lab devices; one revoked.
    for i, device_id in enumerate(STORE_IDS):
        f.device(device_id, labels={"zone": "north" if i % 2 else "south"},
                 assigned="3" if i % 2 else None)  # fmt: skip
    f.device("lab-a1b2c3d4", "lab", {"zone": "north"})
    f.device("lab-e5f6a7b8", "lab")
    f.device("store-revoked-1", status="revoked")
    try:
        yield f
    finally:
        db.close()


def test_waves_pick_devices_by_stable_hash(fleet: Fleet) -> None:
    created = fleet.create(waves=[1, 10, 50, 100])
    expected = sorted(STORE_IDS, key=lambda d: hashlib.sha256(d.encode()).hexdigest())
    with fleet.db.read() as conn:
        stored = orjson.loads(
            conn.execute(sa.select(tables.rollouts.c.devices)).scalar_one()
        )  # fmt: skip
    assert stored == expected == wave_order(reversed(expected))
    assert "store-revoked-1" not in stored
    assert [w["devices"] for w in created["wave_list"]] == [1, 2, 10, 20]
    assert [w["added"] for w in created["wave_list"]] == [1, 1, 8, 10]
    # Wave 1 is the first device in hash order, and only it got version 4.
    assert [d for d, v in fleet.assigned().items() if v == "4"] == expected[:1]
    assert created["status"] == "running"
    assert created["current_wave"] == 1
    # Aborted and made again: the same order, the same first wave.
    fleet.engine.abort(created["id"], "operator:test")
    again = fleet.create(waves=[1, 10, 50, 100])
    assert [d for d, v in fleet.assigned().items() if v == "4"] == expected[:1]
    assert again["id"] != created["id"]


def test_good_version_progresses_wave_by_wave_to_completed(fleet: Fleet) -> None:
    gates = ["failure_rate<=+0.05", "p99_ms<=x1.5", "override_rate<=0.2"]
    rollout = fleet.create(gates=gates, soak_s=60.0)["id"]
    for device_id, version in fleet.assigned().items():
        if version == "3":
            fleet.report(device_id, "3", health=BASE)
    revisions = [fleet.revision()]
    now = T0
    for wave, expected in ((1, 2), (2, 10), (3, 20)):
        status = fleet.status(rollout, now)
        assert status["current_wave"] == wave
        assert sum(v == "4" for v in fleet.assigned().values()) == expected
        # Not a device has reported yet: the soak passes, nothing moves.
        now += 61
        fleet.engine.tick(now=now)
        assert fleet.status(rollout, now)["current_wave"] == wave
        fleet.report_wave()
        status = fleet.status(rollout, now)
        assert status["wave_list"][wave - 1]["active"] == expected
        assert status["wave_list"][wave - 1]["pending"] == 0
        fleet.engine.tick(now=now)
        revisions.append(fleet.revision())
    status = fleet.status(rollout, now)
    assert status["status"] == "completed", status["reason"]
    assert all(v == "4" for d, v in fleet.assigned().items() if d.startswith("store-"))
    assert "lab-a1b2c3d4" not in fleet.assigned()
    # Each new wave changed assignments and bumped the revision; completing changed none.
    assert revisions[0] < revisions[1] < revisions[2] == revisions[3]
    verdicts = [w["verdict"] for w in status["wave_list"]]
    assert all(v is not None and v["passed"] for v in verdicts)
    assert "baseline" in verdicts[0]["reason"]
    # The last wave had no baseline left: the relative gates said so instead of failing.
    assert "no baseline" in verdicts[2]["reason"]
    assert [w["state"] for w in status["wave_list"]] == ["passed"] * 3
    assert [r.action for r in fleet.audit(target=f"rollout/{rollout}")] == [
        "rollout.create", "rollout.wave", "rollout.wave", "rollout.complete",
    ]  # fmt: skip


def test_failed_device_halts_and_rolls_back_at_next_tick(fleet: Fleet) -> None:
    before = fleet.assigned()
    rollout = fleet.create(soak_s=3600.0)["id"]
    moved = [d for d, v in fleet.assigned().items() if v == "4"]
    assert len(moved) == 2
    revision = fleet.revision()
    fleet.report(moved[0], "4")
    fleet.report(moved[1], "4", state="failed", reason="smoke test gave NaN")
    fleet.engine.tick(now=T0 + 1)  # long before the soak ends
    status = fleet.status(rollout, T0 + 1)
    assert status["status"] == "halted"
    assert f"device {moved[1]} reports {V4} failed: smoke test gave NaN" in status["reason"]
    assert "rolled back 2 devices" in status["reason"]
    assert fleet.assigned() == before  # version 3 back where it was, new assignments gone
    assert fleet.revision() == revision + 1
    fleet.engine.tick(now=T0 + 7200)
    assert fleet.status(rollout, T0 + 7200)["status"] == "halted"  # final
    assert fleet.revision() == revision + 1


def test_gate_failure_after_soak_halts_and_rolls_back(fleet: Fleet) -> None:
    before = fleet.assigned()
    rollout = fleet.create(gates=["failure_rate<=+0.05"], soak_s=600.0)["id"]
    for device_id in fleet.assigned():
        if fleet.assigned()[device_id] == "4":
            fleet.report(device_id, "4", health=BAD)
        else:
            fleet.report(device_id, "3", health=BASE)
    fleet.engine.tick(now=T0 + 300)
    assert fleet.status(rollout, T0 + 300)["status"] == "running"  # still soaking
    assert fleet.status(rollout, T0 + 300)["soak_remaining_s"] == pytest.approx(300)
    revision = fleet.revision()
    fleet.engine.tick(now=T0 + 601)
    status = fleet.status(rollout, T0 + 601)
    assert status["status"] == "halted"
    assert "failure_rate 0.40 in wave 1 > baseline 0.02 + 0.05" in status["reason"]
    assert "every device this rollout moved" in status["reason"]
    assert status["wave_list"][0]["verdict"]["passed"] is False
    assert fleet.assigned() == before
    assert fleet.revision() == revision + 1
    assert [w["state"] for w in status["wave_list"]] == ["halted", "not started", "not started"]


def test_pause_stops_progress_and_resume_continues(fleet: Fleet) -> None:
    rollout = fleet.create(soak_s=60.0)["id"]
    assert fleet.engine.pause(rollout, "operator:test")["status"] == "paused"
    fleet.report_wave()
    fleet.engine.tick(now=T0 + 120)
    status = fleet.status(rollout, T0 + 120)
    assert (status["status"], status["current_wave"]) == ("paused", 1)
    assert status["wave_list"][0]["state"] == "paused"
    with pytest.raises(ConflictError, match="only a running one can be paused"):
        fleet.engine.pause(rollout, "operator:test")
    assert fleet.audit(action="rollout.pause", outcome="refused")
    assert fleet.engine.resume(rollout, "operator:test")["status"] == "running"
    fleet.engine.tick(now=T0 + 121)
    assert fleet.status(rollout, T0 + 121)["current_wave"] == 2
    with pytest.raises(ConflictError, match="only a paused one can be resumed"):
        fleet.engine.resume(rollout, "operator:test")


def test_abort_rolls_back_every_device_the_rollout_moved(fleet: Fleet) -> None:
    before = fleet.assigned()
    rollout = fleet.create(soak_s=0.0)["id"]
    fleet.report_wave()
    fleet.engine.tick(now=T0 + 1)
    assert sum(v == "4" for v in fleet.assigned().values()) == 10  # wave 2 of 3
    revision = fleet.revision()
    status = fleet.engine.abort(rollout, "operator:test")
    assert status["status"] == "aborted"
    assert "rolled back 10 devices" in status["reason"]
    assert fleet.assigned() == before
    assert fleet.revision() == revision + 1
    with pytest.raises(ConflictError, match="aborted already"):
        fleet.engine.abort(rollout, "operator:test")
    with pytest.raises(NotFoundError, match="no rollout 'ro-nope'"):
        fleet.engine.abort("ro-nope", "operator:test")
    refused = fleet.audit(action="rollout.abort", outcome="refused")
    assert [r.target for r in refused] == [f"rollout/{rollout}", "rollout/ro-nope"]


@pytest.mark.parametrize(
    ("options", "error", "message"),
    [
        ({"gates": ["failure_rate<=+0.05", "latency<=5"]}, ConfigError, "gate 'latency<=5'"),
        ({"target": "grup=stores"}, ConfigError, "term 'grup=stores'"),
        ({"target": "group=warehouses"}, NotFoundError, "no group 'warehouses'"),
        ({"target": "group=stores,label:zone=east"}, NotFoundError, "matches no active device"),
        ({"target": "device=store-revoked-1"}, NotFoundError, "matches no active device"),
        ({"ref": parse_artifact_ref(f"{MODEL}@9")}, NotFoundError, "model/stockout-risk@9 is not"),
        ({"waves": [10, 50]}, ConfigError, "the last wave must be 100"),
        ({"waves": [50, 10, 100]}, ConfigError, "must increase strictly"),
        ({"soak_s": -1.0}, ConfigError, "soak"),
    ],
)
def test_bad_rollouts_are_refused_and_change_nothing(
    fleet: Fleet, options: dict[str, Any], error: type[Exception], message: str
) -> None:
    before, audited = table_snapshot(fleet.db), len(fleet.audit())
    with pytest.raises(error, match=message):
        fleet.create(**options)
    assert table_snapshot(fleet.db) == before
    rows = fleet.audit()
    assert len(rows) == audited + 1
    assert (rows[-1].action, rows[-1].outcome) == ("rollout.create", "refused")
    assert message in rows[-1].detail


def test_a_second_rollout_of_the_same_artifact_is_refused(fleet: Fleet) -> None:
    first = fleet.create()["id"]
    before = table_snapshot(fleet.db)
    with pytest.raises(ConflictError, match=f"running rollout already \\({first}"):
        fleet.create(ref=V3)
    assert table_snapshot(fleet.db) == before
    fleet.engine.pause(first, "operator:test")
    with pytest.raises(ConflictError, match="paused rollout"):
        fleet.create(target="group=lab")
    # Another artifact is independent.
    other = parse_artifact_ref("policy/budgets@1")
    fleet.publish(other)
    assert fleet.create(ref=other, target="group=lab")["status"] == "running"


def test_replicas_ticking_together_advance_once(
    fleet: Fleet,
    fleet_db_url: str,  # noqa: F811
) -> None:
    rollout = fleet.create(soak_s=60.0)["id"]
    fleet.report_wave()
    # Another replica holds the lease: this one leaves the rollout alone.
    with fleet.db.begin() as conn:
        conn.execute(sa.update(tables.rollouts).values(lease_until=T0 + 65))
    fleet.engine.tick(now=T0 + 61)
    assert fleet.status(rollout, T0 + 61)["current_wave"] == 1
    # Two replicas (two engines, two connection pools) tick at the same moment.
    other = FleetDatabase(fleet_db_url)
    try:
        engines = [fleet.engine, RolloutEngine(other)]
        barrier = threading.Barrier(len(engines))

        def tick(engine: RolloutEngine) -> None:
            barrier.wait()
            engine.tick(now=T0 + 70)

        threads = [threading.Thread(target=tick, args=(e,)) for e in engines]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
    finally:
        other.close()
    status = fleet.status(rollout, T0 + 70)
    assert status["current_wave"] == 2
    assert len(fleet.audit(action="rollout.wave")) == 1
    assert sum(v == "4" for v in fleet.assigned().values()) == 10
    with fleet.db.read() as conn:
        lease = conn.execute(sa.select(tables.rollouts.c.lease_until)).scalar_one()
    assert lease < T0 + 70  # released once the step was done


def test_a_late_device_gets_the_completed_version(fleet: Fleet) -> None:
    rollout = fleet.create(target="group=stores,label:zone=north", waves=[100], soak_s=0)["id"]
    fleet.report_wave()
    fleet.engine.tick(now=T0 + 1)
    assert fleet.status(rollout, T0)["status"] == "completed"
    late = fleet.device("store-late-0190c3a1", labels={"zone": "north"})
    elsewhere = fleet.device("store-late-0190c3a2", labels={"zone": "south"})
    revision = fleet.revision()
    with fleet.db.begin() as conn:
        assert assign_new_device(conn, late) == [V4]
        assert assign_new_device(conn, elsewhere) == []
        assert assign_new_device(conn, "no-such-device") == []
    assert fleet.assigned()[late] == "4"
    assert elsewhere not in fleet.assigned()
    assert fleet.revision() == revision + 1
    with fleet.db.begin() as conn:
        assert assign_new_device(conn, late) == []  # already there
    # Relabelled into the target: the hook, called after the label change, moves it.
    with fleet.db.begin() as conn:
        conn.execute(
            sa.update(tables.devices)
            .where(tables.devices.c.id == elsewhere)
            .values(labels='{"zone": "north"}')
        )
        assert assign_new_device(conn, elsewhere) == [V4]
    row = fleet.audit(action="rollout.assign")[-1]
    assert row.target == f"device/{elsewhere}"
    assert rollout in row.detail


def test_devices_that_join_during_a_rollout_get_it_at_completion(fleet: Fleet) -> None:
    rollout = fleet.create(target="group=lab", waves=[50, 100], soak_s=0)["id"]
    joined = fleet.device("lab-joined-0190c3a9", "lab")
    fleet.device("store-joined-0190c3b0")  # not in the target
    for step in (1, 2):
        fleet.report_wave()
        fleet.engine.tick(now=T0 + step)
    status = fleet.status(rollout, T0 + 2)
    assert status["status"] == "completed"
    assert status["devices"] == 2
    assert fleet.assigned()[joined] == "4"
    assert "store-joined-0190c3b0" not in fleet.assigned()
    assert "1 devices that joined" in fleet.audit(action="rollout.complete")[-1].detail


def test_a_device_assigned_after_completion_keeps_its_version(fleet: Fleet) -> None:
    rollout = fleet.create(target="group=lab", waves=[100], soak_s=0)["id"]
    fleet.report_wave()
    fleet.engine.tick(now=T0 + 1)
    assert fleet.status(rollout, T0 + 1)["status"] == "completed"
    newer = fleet.device("lab-newer-0001", "lab")
    with fleet.db.begin() as conn:
        conn.execute(
            sa.insert(tables.assignments).values(
                device_id=newer, kind=V4.kind, name=V4.name, version="5", previous_version="4",
                rollout_id="ro-later", assigned_at=T0 + 10,
            )
        )  # fmt: skip
        assert assign_new_device(conn, newer) == []
    assert fleet.assigned()[newer] == "5"


def test_status_counts_devices_per_wave(fleet: Fleet) -> None:
    rollout = fleet.create(waves=[10, 50, 100], soak_s=600)["id"]
    moved = [d for d, v in fleet.assigned().items() if v == "4"]
    fleet.report(moved[0], "4")
    status = fleet.status(rollout, T0 + 100)
    first = status["wave_list"][0]
    assert (first["devices"], first["active"], first["pending"], first["failed"]) == (2, 1, 1, 0)
    assert first["state"] == "soaking"
    assert first["verdict"] is None
    assert status["wave_list"][1]["state"] == "waiting"
    assert status["soak_remaining_s"] == pytest.approx(500)
    assert (status["artifact"], status["target"], status["devices"]) == (
        str(V4), "group=stores", STORES,
    )  # fmt: skip
    listed = fleet.engine.list_rollouts()
    assert [r["id"] for r in listed] == [rollout]
    assert "wave_list" not in listed[0]


# -- the HTTP API ------------------------------------------------------------------------


def test_api_scopes_and_lifecycle(running_fleet: FleetServer, tmp_path: Path) -> None:  # noqa: F811
    from tests.fleet_support import enroll_device, join_token

    fleet = Fleet(running_fleet.db)
    fleet.publish(V4)
    token = join_token(running_fleet, "stores", uses=3)
    devices = [enroll_device(running_fleet, token, tmp_path / "devices") for _ in range(3)]
    for device in devices:
        device.close()
    body = {"artifact": str(V4), "target": "group=stores", "waves": "34,100", "soak_s": "10m",
            "gates": ["failure_rate<=+0.05"]}  # fmt: skip
    with running_fleet.client() as admin:
        reader = admin.create_token("reader", ["read"])["token"]
        with running_fleet.client(reader) as client:
            before = table_snapshot(running_fleet.db)
            with pytest.raises(PermissionDeniedError, match="deploy"):
                client.request("POST", "/api/v1/rollouts", json=body)
            assert table_snapshot(running_fleet.db) == before
            assert client.request("GET", "/api/v1/rollouts") == []
        with pytest.raises(ConfigError, match="waves"):
            admin.request("POST", "/api/v1/rollouts", json={**body, "waves": [50]})
        with pytest.raises(ConfigError, match="colour"):
            admin.request("POST", "/api/v1/rollouts", json={**body, "colour": "red"})
        created = admin.request("POST", "/api/v1/rollouts", json=body)
        assert created["soak_s"] == 600.0
        assert [w["devices"] for w in created["wave_list"]] == [2, 3]
        rollout = created["id"]
        shown = admin.request("GET", f"/api/v1/rollouts/{rollout}")
        assert shown["status"] == "running"
        assert shown["gates"] == ["failure_rate<=+0.05"]
        with running_fleet.client(reader) as client:
            with pytest.raises(PermissionDeniedError):
                client.request("POST", f"/api/v1/rollouts/{rollout}/abort")
            assert client.request("GET", f"/api/v1/rollouts/{rollout}")["id"] == rollout
        assert admin.request("POST", f"/api/v1/rollouts/{rollout}/pause")["status"] == "paused"
        assert admin.request("POST", f"/api/v1/rollouts/{rollout}/resume")["status"] == "running"
        aborted = admin.request("POST", f"/api/v1/rollouts/{rollout}/abort")
        assert aborted["status"] == "aborted"
        with pytest.raises(ConflictError):
            admin.request("POST", f"/api/v1/rollouts/{rollout}/abort")
        with pytest.raises(NotFoundError):
            admin.request("GET", "/api/v1/rollouts/ro-missing")
        refusals = admin.audit(limit=100, outcome="refused")
    actions = {r["action"] for r in refusals}
    assert {"authorize", "rollout.create", "rollout.abort"} <= actions
    assert fleet.assigned() == {}


def test_cli_drives_a_rollout(
    running_fleet: FleetServer,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from typer.testing import CliRunner

    from edgeos.cli.fleet_rollout_cmd import parse_soak, parse_waves, rollout_app
    from tests.fleet_support import enroll_device, join_token

    assert parse_soak("10m") == 600.0
    assert parse_soak("90") == 90.0
    assert parse_waves("1,10,50,100") == [1, 10, 50, 100]
    for bad_soak in ("ten minutes", "-5", "inf"):
        with pytest.raises(ConfigError, match="--soak"):
            parse_soak(bad_soak)
    with pytest.raises(ConfigError, match="--waves '1,x'"):
        parse_waves("1,x")

    fleet = Fleet(running_fleet.db)
    fleet.publish(V4)
    token = join_token(running_fleet, "stores", uses=2)
    for _ in range(2):
        enroll_device(running_fleet, token, tmp_path / "devices").close()
    monkeypatch.setenv("EDGEOS_FLEET_CONFIG", str(tmp_path / "login.json"))
    monkeypatch.setenv("EDGEOS_FLEET_URL", running_fleet.url)
    monkeypatch.setenv("EDGEOS_FLEET_TOKEN", running_fleet.admin_token)
    runner = CliRunner()

    def run(*args: str) -> str:
        result = runner.invoke(rollout_app, list(args), catch_exceptions=False)
        assert result.exit_code == 0, result.output
        return result.output

    created = orjson.loads(
        run("create", str(V4), "--target", "group=stores", "--waves", "50,100", "--soak", "30m",
            "--gate", "failure_rate<=+0.05", "--json")
    )  # fmt: skip
    rollout = created["id"]
    assert created["soak_s"] == 1800.0
    assert created["waves"] == [50, 100]
    shown = run("status", rollout)
    assert rollout in shown
    assert "running" in shown
    assert "wave 1 of 2" in shown
    assert "failure_rate<=+0.05" in shown
    assert rollout in run("list")
    assert "paused" in run("pause", rollout)
    assert "resumed" in run("resume", rollout)
    aborted = run("abort", rollout)
    assert "aborted" in aborted
    assert "rolled back 1 devices" in aborted
    # --watch returns at once for a rollout that is over.
    assert "aborted" in run("status", rollout, "--watch", "--interval", "0.2")
    with pytest.raises(ConflictError, match="aborted already"):
        runner.invoke(rollout_app, ["abort", rollout], catch_exceptions=False)
