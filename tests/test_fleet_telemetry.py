"""Telemetry from nodes to a real fleet over mTLS: storage, queries, refusals, /metrics."""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import sqlite3
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest

from edgeos.errors import ConfigError
from edgeos.fleet import telemetry_store
from edgeos.protocol.telemetry import compressor
from edgeos.state import Database
from edgeos.sync.client import async_fleet_client
from edgeos.sync.telemetry_uplink import TelemetryUplink, UplinkConfig
from edgeos.telemetry.metrics import MetricsRegistry
from edgeos.telemetry.sketch import DEFAULT_ALPHA, DDSketch
from tests.fleet_support import (
    Device,
    FleetServer,
    audit_rows,
    enroll_device,
    join_token,
    running_fleet,
    table_snapshot,
)
from tests.test_telemetry_uplink import Clock, add_run

__all__ = ["running_fleet"]

CT = {"content-type": "application/vnd.edgeos.telemetry+zstd"}


def minute_ago(n: int) -> float:
    return float((int(time.time()) // 60 - n) * 60)


def body(device_id: str, seq: int, records: list[dict[str, Any]], **extra: Any) -> bytes:
    doc = {"device_id": device_id, "seq": seq, "sent_at": time.time(), "records": records, **extra}
    return bytes(compressor().compress(orjson.dumps(doc)))


def kpi(minute: float, **fields: Any) -> dict[str, Any]:
    return {"kind": "kpi", "at": minute, "data": {"minute": int(minute), "agent": "restock",
                                                  **fields}}  # fmt: skip


def sketch_of(values: list[float]) -> str:
    sketch = DDSketch()
    sketch.extend(values)
    return base64.b64encode(sketch.to_bytes()).decode()


class Node:
    """A node's database and uplink, sending as an enrolled device."""

    def __init__(self, root: Path, device: Device, clock: Clock) -> None:
        self.device = device
        self.db = Database(root / f"{device.device_id}.db").open()
        self.metrics = MetricsRegistry()
        self.latency = self.metrics.histogram(
            "edgeos_inference_latency_seconds", "x", ("model", "version")
        )
        self.uplink = TelemetryUplink(self.db, UplinkConfig(), metrics=self.metrics, clock=clock)

    def send(self, fleet: FleetServer) -> bool:
        async def go() -> bool:
            client = async_fleet_client(fleet.url, fleet.ca_pem, cert=self.device.cert_path,
                                        key=self.device.key_path, timeout=30)  # fmt: skip
            async with client:
                return await self.uplink.send(client, self.device.device_id)

        return asyncio.run(go())

    def close(self) -> None:
        self.db.close()
        self.device.close()


def test_fleet_wide_percentiles_from_two_devices(
    running_fleet: FleetServer, tmp_path: Path
) -> None:
    fleet = running_fleet
    token = join_token(fleet, uses=2)
    start = minute_ago(10)
    clock = Clock(start)
    rng = np.random.default_rng(3)
    nodes = [Node(tmp_path, enroll_device(fleet, token, tmp_path), clock) for _ in range(2)]
    every: list[float] = []
    inference: list[float] = []
    try:
        for n, node in enumerate(nodes):
            node.uplink.collect()  # the first start: minutes from now on
            # Device 1 is ten times slower: an average of the two p99s would hide it.
            latencies = rng.lognormal(-1.0 + 2.3 * n, 0.4, 200).tolist()
            every += latencies
            for i, seconds in enumerate(latencies):
                at = start + 60 * (i % 3) + 1 + i * 0.1
                add_run(node.db, "restock", "succeeded", at - seconds, at, cost=0.01)
            add_run(node.db, "restock", "failed", start + 5, start + 6)
            model_latencies = rng.lognormal(-6 + n, 0.5, 500).tolist()
            inference += model_latencies
            for seconds in model_latencies:
                node.latency.observe(seconds, "stockout-risk", "4")
        clock.now = start + 180
        for node in nodes:
            assert node.uplink.collect() > 0
            assert node.send(fleet)
            assert node.uplink.buffer.pending() is None  # acknowledged
        with fleet.client() as operator:
            q: dict[str, Any] = {"start": start, "end": start + 600, "bucket": 600}
            points = operator.telemetry_kpis(**q)["points"]
            by_device = operator.telemetry_kpis("device", **q)
            by_model = operator.telemetry_kpis("model", **q)
            devices = operator.telemetry_devices()
    finally:
        for node in nodes:
            node.close()
    (point,) = points
    assert point["devices"] == 2
    assert point["runs"] == 402
    assert point["decisions"] == 400
    assert point["success_rate"] == pytest.approx(400 / 402)
    assert point["cost_per_decision"] == pytest.approx(4.0 / 402)
    exact = np.percentile(np.array(every) * 1000, 99, method="lower")
    assert abs(point["decision_p99_ms"] - exact) <= DEFAULT_ALPHA * exact * 1.01
    exact_inference = np.percentile(np.array(inference) * 1000, 99, method="lower")
    assert (
        abs(point["inference_p99_ms"] - exact_inference) <= DEFAULT_ALPHA * exact_inference * 1.01
    )
    assert set(by_device) == {n.device.device_id for n in nodes}
    assert list(by_model) == ["stockout-risk@4"]
    assert by_model["stockout-risk@4"]["inferences"] == 1000
    assert sorted(d["last_seq"] for d in devices) == [1, 1]
    assert all(d["latest"]["runs"] > 0 for d in devices)


@pytest.fixture
def device(running_fleet: FleetServer, tmp_path: Path) -> Iterator[Device]:
    enrolled = enroll_device(running_fleet, join_token(running_fleet), tmp_path)
    yield enrolled
    enrolled.close()


def test_replayed_batch_is_refused_and_the_node_moves_on(
    running_fleet: FleetServer, device: Device, tmp_path: Path
) -> None:
    fleet = running_fleet
    clock = Clock(minute_ago(3))
    node = Node(tmp_path, device, clock)
    try:
        node.uplink.offer("alert", {"rule": "p99", "state": "firing"})
        batch = node.uplink.next_batch(device.device_id)
        assert batch is not None
        first = device.http.post("/api/v1/telemetry", content=batch.body, headers=CT)
        assert first.status_code == 200, first.text
        assert first.json() == {"seq": 1, "stored": 1}
        before = table_snapshot(fleet.db)
        again = device.http.post("/api/v1/telemetry", content=batch.body, headers=CT)
        assert again.status_code == 409
        assert "replayed" in again.json()["message"]
        assert table_snapshot(fleet.db) == before
        refusals = audit_rows(fleet, action="telemetry", outcome="refused")
        assert refusals
        assert refusals[0]["actor"] == f"device:{device.device_id}"
        # The node's own copy (its acknowledgement was lost): it forgets it and goes on.
        assert not node.send(fleet)
        assert node.uplink.buffer.pending() is None
        node.uplink.offer("alert", {"rule": "p99", "state": "resolved"})
        assert not node.send(fleet)  # the rate: one batch per interval
        clock.now += 60
        assert node.send(fleet)
        with fleet.client() as operator:
            alerts = operator.telemetry_events(kind="alert")
        assert [a["data"]["state"] for a in alerts] == ["resolved", "firing"]
    finally:
        node.close()


def test_a_node_restored_from_a_backup_is_heard_again(
    running_fleet: FleetServer, device: Device, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Its database comes back from a backup taken after its first batch: its sequence is
    # behind the fleet's, and what it sends now must not be refused as replays.
    fleet = running_fleet
    clock = Clock(minute_ago(5))
    node = Node(tmp_path, device, clock)
    backup = tmp_path / "backup" / f"{device.device_id}.db"
    backup.parent.mkdir()
    bodies = []
    for n, state in enumerate(("firing", "resolved", "firing again")):
        node.uplink.offer("alert", {"rule": "p99", "state": state})
        batch = node.uplink.next_batch(device.device_id)
        assert batch is not None
        bodies.append(batch.body)
        assert node.send(fleet)
        if n == 0:
            with sqlite3.connect(node.db.path) as live, sqlite3.connect(backup) as copy:
                live.backup(copy)
        clock.now += 60
    node.db.close()

    restored = Node(backup.parent, device, clock)
    try:
        restored.uplink.offer("alert", {"rule": "p99", "state": "after the restore"})
        with caplog.at_level(logging.WARNING, logger="edgeos.fleet.telemetry_store"):
            assert restored.send(fleet)  # sequence 2 again, made later: taken
        assert f"device {device.device_id} started its telemetry sequence again at 2" in (
            caplog.text
        )
        with fleet.client() as operator:
            (seen,) = operator.telemetry_devices()
            assert seen["last_seq"] == 2
        before = table_snapshot(fleet.db)
        for old in bodies:  # every batch sent before, replayed as it was: refused
            again = device.http.post("/api/v1/telemetry", content=old, headers=CT)
            assert again.status_code == 409, again.text
            assert "replayed" in again.json()["message"]
        assert table_snapshot(fleet.db) == before
        clock.now += 60
        restored.uplink.offer("alert", {"rule": "p99", "state": "later still"})
        assert restored.send(fleet)
        with fleet.client() as operator:
            alerts = operator.telemetry_events(kind="alert")
        assert [a["data"]["state"] for a in alerts] == [
            "later still", "after the restore", "firing again", "resolved", "firing",
        ]  # fmt: skip
    finally:
        restored.db.close()


def test_a_node_whose_clock_stepped_back_is_heard(
    running_fleet: FleetServer, device: Device, tmp_path: Path
) -> None:
    # A box without a battery-backed clock boots in the past until it syncs its time:
    # its sequence still moves on, and that is what counts.
    clock = Clock(minute_ago(5))
    node = Node(tmp_path, device, clock)
    node.uplink.offer("alert", {"rule": "p99", "state": "firing"})
    assert node.send(running_fleet)
    node.db.close()
    clock.now -= 3600  # the box restarts an hour in the past
    node = Node(tmp_path, device, clock)
    try:
        node.uplink.offer("alert", {"rule": "p99", "state": "resolved"})
        assert node.send(running_fleet)
        with running_fleet.client() as operator:
            assert operator.telemetry_devices()[0]["last_seq"] == 2
    finally:
        node.db.close()


def _bomb() -> bytes:
    return bytes(compressor().compress(b"[" + b" " * (20 * 1024 * 1024) + b"]"))


BAD_BATCHES: dict[str, tuple[Any, int, str]] = {
    "not zstd": (lambda d: b'{"seq": 1}', 400, "not zstd"),
    "not json": (lambda d: compressor().compress(b"seq=1"), 400, "telemetry batch"),
    "no sequence": (
        lambda d: compressor().compress(
            orjson.dumps({"device_id": d, "sent_at": 1.0, "records": []})
        ),
        400,
        "seq",
    ),
    "bad kind": (lambda d: body(d, 1, [{"kind": "spam", "at": 1.0, "data": {}}]), 400, "kind"),
    "bad sketch": (
        lambda d: body(d, 1, [kpi(minute_ago(1), runs=1, decision="AAAA")]),
        400,
        "not a sketch",
    ),
    "other accuracy": (
        lambda d: body(
            d,
            1,
            [
                kpi(
                    minute_ago(1),
                    decision=base64.b64encode(DDSketch(alpha=0.05).to_bytes()).decode(),
                )
            ],
        ),
        400,
        "accuracy",
    ),
    "counts": (lambda d: body(d, 1, [kpi(minute_ago(1), runs=1, succeeded=2)]), 400, "add up"),
    "odd minute": (lambda d: body(d, 1, [kpi(minute_ago(1) + 7)]), 400, "minute"),
    "from the future": (lambda d: body(d, 1, [kpi(minute_ago(-24 * 60))]), 400, "ahead of"),
    "too large": (lambda d: os.urandom(1024 * 1024 + 1), 400, "at most"),
    "bomb": (lambda d: _bomb(), 400, "decompresses to more"),
    "another device": (lambda d: body(str(uuid.uuid4()), 1, []), 403, "of device"),
}


@pytest.mark.parametrize("case", sorted(BAD_BATCHES))
def test_bad_batches_are_refused_without_harm(
    running_fleet: FleetServer, device: Device, case: str
) -> None:
    fleet = running_fleet
    make, status, message = BAD_BATCHES[case]
    good = device.http.post("/api/v1/telemetry", content=body(device.device_id, 1, [
        kpi(minute_ago(2), runs=2, succeeded=2, decision=sketch_of([0.2, 0.3]))]), headers=CT)  # fmt: skip
    assert good.status_code == 200, good.text
    before = table_snapshot(fleet.db)
    response = device.http.post("/api/v1/telemetry", content=make(device.device_id), headers=CT)
    assert response.status_code == status, response.text
    assert message in response.json()["message"]
    assert table_snapshot(fleet.db) == before
    refusal = audit_rows(fleet, action="telemetry", outcome="refused")[0]
    assert message in refusal["detail"]
    # The device's sequence did not move: its next real batch is still welcome.
    nxt = device.http.post("/api/v1/telemetry", content=body(device.device_id, 2, []), headers=CT)
    assert nxt.status_code == 200, nxt.text


def test_revoked_device_is_refused_and_keeps_its_batch(
    running_fleet: FleetServer, device: Device, tmp_path: Path
) -> None:
    fleet = running_fleet
    node = Node(tmp_path, device, Clock(minute_ago(2)))
    try:
        node.uplink.offer("alert", {"rule": "offline"})
        with fleet.client() as admin:
            admin.revoke_device(device.device_id)
        before = table_snapshot(fleet.db)
        assert not node.send(fleet)
        assert node.uplink.buffer.pending() is not None  # kept for a later enrollment
        assert "revoked" in (node.uplink.last_error or "")
        assert table_snapshot(fleet.db) == before
        refused = audit_rows(fleet, action="authenticate", outcome="refused")
        assert any("/api/v1/telemetry" in r["target"] for r in refused)
    finally:
        node.close()


def test_retention_and_metrics(running_fleet: FleetServer, device: Device) -> None:
    fleet = running_fleet
    old, recent = minute_ago(31 * 24 * 60), minute_ago(24 * 60)
    response = device.http.post("/api/v1/telemetry", content=body(device.device_id, 1, [
        kpi(old, runs=1, succeeded=1), kpi(recent, runs=1, succeeded=1),
        {"kind": "log", "at": old, "data": {"message": "old"}},
        {"kind": "log", "at": recent, "data": {"message": "recent"}},
    ]), headers=CT)  # fmt: skip
    assert response.status_code == 200, response.text
    with fleet.client() as operator:
        span: dict[str, Any] = {"start": old - 60, "end": time.time()}
        points = operator.telemetry_kpis(**span, bucket=3600)
        logs = operator.telemetry_events(kind="log")
        for bad, problem in (({"start": "soon"}, "not a number"),
                             ({"bucket": 90}, "multiple of 60"),
                             ({"by": "color"}, "device, agent or model"),
                             ({"start": 10.0, "end": 5.0}, "end must be after start")):  # fmt: skip
            with pytest.raises(ConfigError, match=problem):
                operator.telemetry_kpis(**bad)
        with pytest.raises(ConfigError, match="use alert, trace or log"):
            operator.telemetry_events(kind="secrets")
    # The month-old minute and log went at once; yesterday's stay.
    assert [(p["runs"], p["start"] <= recent < p["start"] + 3600) for p in points["points"]] == [
        (1, True)
    ]
    assert [e["data"]["message"] for e in logs] == ["recent"]
    with fleet.http() as anonymous:
        assert anonymous.get("/metrics").status_code == 401
        for path in ("kpis", "kpis/agent", "devices", "events"):
            assert anonymous.get(f"/api/v1/telemetry/{path}").status_code == 401
    with fleet.http() as http:
        text = http.get("/metrics", headers={"authorization": f"Bearer {fleet.admin_token}"}).text
    assert 'edgeos_fleet_devices{status="active"} 1' in text
    assert 'edgeos_fleet_telemetry_batches_total{outcome="stored"} 1' in text
    assert 'edgeos_fleet_telemetry_records_total{kind="kpi"} 2' in text
    assert (
        'edgeos_fleet_requests_total{method="POST",route="/api/v1/telemetry",status="200"} 1'
        in text
    )
    assert "edgeos_fleet_request_duration_seconds_bucket" in text


def test_a_node_following_the_fleet_sends_what_is_enqueued(
    running_fleet: FleetServer, tmp_path: Path
) -> None:
    from edgeos.runtime import ModelRegistry
    from edgeos.settings import load_settings
    from edgeos.sync.service import FleetService
    from edgeos.telemetry.buffer import enqueue

    fleet = running_fleet
    data = tmp_path / "node"
    settings = load_settings({"data_dir": data, "fleet_url": fleet.url}, environ={})
    with Database(settings.database_path) as db:
        service = FleetService(settings, db, ModelRegistry(db, settings.model_store),
                               join_token=join_token(fleet))  # fmt: skip

        async def life() -> None:
            await service.start()
            try:
                deadline = time.monotonic() + 20
                while service.loop.link.state != "online":
                    assert time.monotonic() < deadline, "the node did not come online"
                    await asyncio.sleep(0.05)
                assert enqueue("alert", {"rule": "inference p99", "state": "firing"})
                while not telemetry_store.events(fleet.db, kind="alert"):
                    assert time.monotonic() < deadline + 10, "the alert did not arrive"
                    await asyncio.sleep(0.1)
            finally:
                await service.stop()
                await asyncio.sleep(0.1)  # let closed TLS connections finish

        asyncio.run(life())
        assert not enqueue("alert", {"rule": "after stop"})  # the sink went with the service
    (alert,) = telemetry_store.events(fleet.db, kind="alert")
    assert alert.device_id == service.loop.status()["device_id"]
    assert alert.data == {"rule": "inference p99", "state": "firing"}


def test_a_batch_survives_a_disconnection_and_a_restart(
    running_fleet: FleetServer, device: Device, tmp_path: Path
) -> None:
    from tests.fleet_support import free_port

    fleet = running_fleet
    clock = Clock(minute_ago(2))
    node = Node(tmp_path, device, clock)
    node.uplink.offer("alert", {"rule": "offline", "state": "firing"})

    async def send_to_nowhere() -> bool:
        client = async_fleet_client(f"https://127.0.0.1:{free_port()}", fleet.ca_pem,
                                    cert=device.cert_path, key=device.key_path, timeout=5)  # fmt: skip
        async with client:
            return await node.uplink.send(client, device.device_id)

    assert not asyncio.run(send_to_nowhere())
    pending = node.uplink.buffer.pending()
    assert pending is not None
    assert "did not answer" in (node.uplink.last_error or "")
    node.db.close()
    # The node restarts: the same batch, the same bytes, goes out once the fleet answers.
    node.db = Database(node.db.path).open()
    node.uplink = TelemetryUplink(node.db, UplinkConfig(), clock=clock)
    assert node.uplink.buffer.pending() == pending
    try:
        assert node.send(fleet)
    finally:
        node.close()
    (alert,) = telemetry_store.events(fleet.db, kind="alert")
    assert alert.data["rule"] == "offline"
