"""The fleet simulator: virtual nodes that the fleet cannot tell from real ones.

A rollout rehearsal on a real TLS fleet: devices enroll with their own certificates,
take a good version, and a version they refuse halts the rollout in its first wave and
sends that wave back.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

from typer.testing import CliRunner

from edgeos.cli.main import app
from edgeos.fleet import telemetry_store
from edgeos.fleet.packing import pack_directory
from edgeos.fleet.simulator import Simulation, SimulationConfig
from tests.fleet_support import FleetServer, join_token, model_dir


def _rollout(fleet: FleetServer, artifact: str, waves: list[int], soak: float) -> str:
    with fleet.client() as client:
        body = {"artifact": artifact, "target": "group=stores", "waves": waves, "soak_s": soak}
        created: dict[str, Any] = client.request("POST", "/api/v1/rollouts", json=body)
    return str(created["id"])


def _status(fleet: FleetServer, rollout_id: str) -> dict[str, Any]:
    with fleet.client() as client:
        status: dict[str, Any] = client.request("GET", f"/api/v1/rollouts/{rollout_id}")
    return status


async def _sync_until(sim: Simulation, done: Any, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, "the simulated fleet did not settle in time"
        await asyncio.gather(*(sim.sync(device) for device in sim.devices))
        await asyncio.sleep(0.1)


def _versions(sim: Simulation) -> dict[str, int]:
    counts: dict[str, int] = {}
    for device in sim.devices:
        for item in device.actual.values():
            key = f"{item.version}:{item.state}"
            counts[key] = counts.get(key, 0) + 1
    return counts


def test_a_rollout_rehearsal_with_simulated_devices(
    running_fleet: FleetServer, tmp_path: Path
) -> None:
    fleet = running_fleet
    with fleet.client() as client:
        for version in ("1", "2"):
            data = pack_directory(model_dir(tmp_path / version, "risk", version))
            client.publish("model", "risk", version, data)
    token = join_token(fleet, "stores", uses=12)
    config = SimulationConfig(
        fleet.url, token, devices=12, sync_interval=0.2, fail=frozenset({"model/risk@2"})
    )
    sim = Simulation(config)

    async def rehearse() -> None:
        try:
            await rollouts()
        finally:
            await sim.disconnect()

    async def rollouts() -> None:
        await sim.enroll()
        assert len({d.device_id for d in sim.devices}) == 12
        first = _rollout(fleet, "model/risk@1", [100], 0.0)
        await _sync_until(sim, lambda: _status(fleet, first)["status"] == "completed")
        await _sync_until(sim, lambda: _versions(sim) == {"1:active": 12})

        bad = _rollout(fleet, "model/risk@2", [10, 100], 0.5)
        await _sync_until(sim, lambda: _status(fleet, bad)["status"] == "halted")
        await _sync_until(sim, lambda: _versions(sim) == {"1:active": 12})
        status = _status(fleet, bad)
        assert "health check failed (simulated)" in status["reason"]
        # The first wave was two devices (10% of 12, rounded up): only they saw version 2.
        assert status["wave_list"][0]["devices"] == 2
        assert status["wave_list"][1]["state"] != "passed"

    try:
        asyncio.run(rehearse())
    finally:
        sim.close()
    assert sim.stats.error_count == 0, sim.stats.errors


def test_simulate_command_reports_sync_latency(running_fleet: FleetServer) -> None:
    token = join_token(running_fleet, "stores", uses=5)
    result = CliRunner().invoke(
        app,
        ["fleet", "simulate", "--devices", "5", "--fleet", running_fleet.url,
         "--join-token", token, "--interval", "0.5", "--duration", "2", "--report-every", "1",
         "--telemetry"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "5 devices enrolled" in result.output
    assert "syncs/s" in result.output
    assert "p99" in result.output
    assert "telemetry p99" in result.output
    assert "no errors" in result.output
    with running_fleet.client() as client:
        assert len(client.devices(group="stores")) == 5


def test_simulated_devices_send_telemetry_the_fleet_stores(running_fleet: FleetServer) -> None:
    token = join_token(running_fleet, "stores", uses=6)
    sim = Simulation(SimulationConfig(running_fleet.url, token, devices=6, sync_interval=0.5,
                                      telemetry=True))  # fmt: skip

    async def go() -> None:
        try:
            await sim.enroll()
            await sim.run(1.2)  # each device: a sync and a batch, and another half a second on
        finally:
            await sim.disconnect()

    try:
        asyncio.run(go())
    finally:
        sim.close()
    assert sim.stats.error_count == 0, sim.stats.errors
    assert sim.telemetry_stats.error_count == 0, sim.telemetry_stats.errors
    batches = len(sim.telemetry_stats.latencies_ms)
    assert batches >= 12
    # Every batch is a minute of 60 runs of the same agent: the fleet summed them all, and
    # its fleet-wide latency sketch (the rows every batch updates) answers for them.
    summary = telemetry_store.kpi_summary(running_fleet.db, start=0, end=time.time() + 60)
    assert summary.runs == 60 * batches
    assert summary.decision_p99_ms is not None
    assert 20 < summary.decision_p99_ms < 500
    assert {d.device_id for d in sim.devices} == {
        d.device_id for d in telemetry_store.latest_per_device(running_fleet.db)
    }
