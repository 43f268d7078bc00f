"""A finished run's outline for the fleet: offered once per run, structural only.

A real executor runs a real agent over a real node database; the outline is what the
telemetry uplink would receive (the sink ``enqueue`` hands records to).
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import orjson

from edgeos.agents import outline
from edgeos.state import Database
from edgeos.telemetry import buffer, tracing
from tests.test_agents import install, running

SECRET_ERROR = "supplier said: account 4711-secret is overdrawn"
FAILING = f"""
def sense(ctx, data):
    return data

def reason(ctx, data):
    raise RuntimeError({SECRET_ERROR!r})
"""


def finished_outlines(db: Database, tmp_path: Path, data: dict[str, Any], **manifest: Any
                      ) -> tuple[str, list[dict[str, Any]]]:  # fmt: skip
    offered: list[tuple[str, dict[str, Any]]] = []

    def sink(kind: str, payload: dict[str, Any], **how: Any) -> bool:
        offered.append((kind, payload))
        return True

    install(db, tmp_path, **manifest)

    async def go() -> str:
        async with running(db) as ex:
            run_id = await ex.submit("inventory", data=data)
            await ex.wait(run_id)
            return run_id

    buffer.set_sink(sink)
    try:
        run_id = asyncio.run(go())
    finally:
        buffer.set_sink(None)
    return run_id, [p for kind, p in offered if kind == "log"]


def test_a_finished_run_is_outlined_without_its_payloads(db: Database, tmp_path: Path) -> None:
    personal = "ada.lovelace@example.org"
    run_id, outlines = finished_outlines(db, tmp_path, {"sku": "B-7", "customer": personal})
    (doc,) = outlines
    assert doc["type"] == outline.RUN_RECORD
    assert (doc["run_id"], doc["trace_id"]) == (run_id, tracing.trace_id(run_id))
    assert (doc["agent"], doc["version"], doc["trigger"], doc["state"]) == (
        "inventory", "1.0", "manual", "succeeded")  # fmt: skip
    assert (doc["steps"], doc["effects"], doc["escalations"], doc["failures"]) == (4, 1, 0, 0)
    assert doc["finished_at"] >= doc["started_at"]
    assert [(e["kind"], e.get("step")) for e in doc["journal"]] == [
        ("step_completed", "sense"), ("step_completed", "reason"), ("step_completed", "act"),
        ("effect_enqueued", "act"), ("step_completed", "learn"), ("run_finished", None),
    ]  # fmt: skip
    effect = doc["journal"][3]
    assert (effect["connector"], effect["operation"]) == ("supplier", "reorder")
    text = orjson.dumps(doc)
    for payload in (personal, "B-7", '"qty"', "risk"):  # input, output, effect payload
        assert payload.encode() not in text, payload


def test_a_failed_run_is_outlined_without_its_error_text(db: Database, tmp_path: Path) -> None:
    _, (doc,) = finished_outlines(db, tmp_path, {"sku": "B-7"}, code=FAILING,
                                  steps=["sense", "reason"])  # fmt: skip
    assert (doc["state"], doc["steps"], doc["failures"]) == ("failed", 1, 2)
    assert [e["kind"] for e in doc["journal"]][-1] == "run_finished"
    assert doc["journal"][-1]["outcome"] == "failed"
    assert b"4711" not in orjson.dumps(doc)


def test_routine_outlines_go_with_their_trace_and_notable_ones_always(
    db: Database, tmp_path: Path
) -> None:
    from edgeos.sync.telemetry_uplink import TelemetryUplink, UplinkConfig

    install(db, tmp_path / "routine")
    install(db, tmp_path / "failing", name="failing", code=FAILING, steps=["sense", "reason"])
    uplink = TelemetryUplink(db, UplinkConfig(trace_percent=0))  # no trace is sampled

    async def go() -> list[str]:
        async with running(db) as ex:
            ids = [await ex.submit("inventory", data={"sku": "B-7"}),
                   await ex.submit("failing", data={"sku": "B-7"})]  # fmt: skip
            return [(await ex.wait(i)).state for i in ids]

    uplink.install()
    try:
        assert asyncio.run(go()) == ["succeeded", "failed"]
    finally:
        uplink.uninstall()
    kept = [orjson.loads(p) for (p,) in db.reader().execute(
        "SELECT payload FROM telemetry_buffer WHERE kind = 'log'")]  # fmt: skip
    assert [(d["agent"], d["state"]) for d in kept] == [("failing", "failed")]
