"""The demo agent's memory: the notes the demo gives it raise its reorders of SKUs the
supplier ships short, recalled by meaning with the real embedding model; without the
model it decides from the stockout model alone."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from edgeos.agents.bundle import load_bundle
from edgeos.agents.context import RunContext
from edgeos.demo.inventory_demo import BUNDLE_DIR, MODEL, remember_notes
from edgeos.demo.knowledge import FILL_RATES, NOTES
from edgeos.demo.store import StoreFeeder, StoreSimulator, create_store
from edgeos.demo.supplier import SupplierService
from edgeos.demo.train import DemoModels
from edgeos.manifests.agent import Escalation
from edgeos.routing.build import build_router
from edgeos.runtime import ModelHost, ModelRegistry
from edgeos.state import Database
from tests.memory_support import minilm_model

SKUS = ["sku-001", "sku-002", "sku-004"]


@pytest.fixture(scope="module")
def minilm_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return minilm_model(tmp_path_factory.mktemp("minilm"))


@pytest.fixture
def lanes(tmp_path: Path) -> list[dict[str, Any]]:
    """Today's lanes of a simulated store, as the agent's ``sense`` step reads them."""
    store_db = tmp_path / "store.db"
    feeder = StoreFeeder(store_db, StoreSimulator(1, 12, seed=3))
    create_store(store_db, feeder.lanes)
    feeder.tick()
    bundle = load_bundle(BUNDLE_DIR)
    ctx = RunContext(
        run_id="run-1", manifest=bundle.manifest, step="sense", step_index=0, attempt=1,
        now=1000.0, seed=1, answers={}, host=None,
    )  # fmt: skip
    sensed = bundle.steps["sense"](ctx, {"store_db": str(store_db)})
    return [lane for lane in sensed["lanes"] if lane["sku"] in SKUS]


@pytest.fixture
def node_host(registry: ModelRegistry, demo_models: DemoModels) -> Iterator[ModelHost]:
    registry.add(
        demo_models.models[MODEL], name=MODEL, version="1", manifest=demo_models.manifests[MODEL]
    )
    host = ModelHost(registry)
    yield host
    host.close()


def reason(db: Database, host: ModelHost, lanes: list[dict[str, Any]]) -> dict[str, Any]:
    """The agent's ``reason`` step, every SKU judged at risk (a person says so)."""
    bundle = load_bundle(BUNDLE_DIR)
    # Every judgement goes to a person, whose answer is "stockout": all SKUs are at risk.
    manifest = bundle.manifest.model_copy(
        update={"escalation": Escalation(confidence_threshold=1.0)}
    )
    answers = {f"run-1:1:{i}": "stockout" for i in range(len(lanes))}
    router = build_router(host)  # the step's model calls are routed (here: the host alone)
    ctx = RunContext(
        run_id="run-1", manifest=manifest, step="reason", step_index=1, attempt=1,
        now=1000.0, seed=1, answers=answers, host=host, db=db, router=router,
    )  # fmt: skip
    data = {"store_db": "store.db", "day": 1, "new": True, "lanes": lanes, "back": []}
    try:
        out: dict[str, Any] = bundle.steps["reason"](ctx, data)
    finally:
        router.close()
    return {d["sku"]: d for d in out["decisions"]}


def test_supplier_notes_recalled_by_meaning_raise_the_reorders_of_short_skus(
    db: Database,
    registry: ModelRegistry,
    node_host: ModelHost,
    minilm_file: Path,
    lanes: list[dict[str, Any]],
) -> None:
    without = reason(db, node_host, lanes)  # no embedding model on the node yet
    assert all(d["qty"] > 0 and d["raised_by"] == [] for d in without.values())

    registry.add(minilm_file, manifest=minilm_file.with_suffix(".yaml"))
    manifest = load_bundle(BUNDLE_DIR).manifest
    assert remember_notes(db, ModelHost(registry), manifest.memory) == len(NOTES)
    key_of = {r[0]: r[1] for r in db.reader().execute("SELECT id, text FROM memory_records")}
    with_memory = reason(db, node_host, lanes)

    # The supplier fills 75% of sku-001 and 80% of sku-004 orders: the agent orders more,
    # each raise traced to the note it recalled; sku-002 has no such note.
    for sku in ("sku-001", "sku-004"):
        decision = with_memory[sku]
        assert decision["qty"] == math.ceil(without[sku]["qty"] / FILL_RATES[sku])
        (note,) = decision["raised_by"]
        assert "short" in key_of[note]
        assert sku in key_of[note]
    assert with_memory["sku-002"] == without["sku-002"]
    # The late-truck note about sku-001 was recalled too, but says nothing of quantities.
    assert not any("late" in key_of[n] for d in with_memory.values() for n in d["raised_by"])

    # The agent learns: a reorder of sku-002 that did not keep the shelf stocked is
    # remembered with the learn step's commit, and the next reorder of it is larger.
    learned = learn(db, node_host, without["sku-002"], lanes)
    assert learned["learned"] == 1
    (outcome,) = (
        db.reader()
        .execute("SELECT id FROM memory_records WHERE metadata LIKE '%\"outcome\"%'")
        .fetchone()
    )
    after = reason(db, node_host, lanes)["sku-002"]
    assert after["raised_by"] == [outcome]
    assert after["qty"] > without["sku-002"]["qty"]


def learn(
    db: Database, host: ModelHost, decision: dict[str, Any], lanes: list[dict[str, Any]]
) -> dict[str, Any]:
    """The agent's ``learn`` step scoring a reorder whose shelf still ran empty, committed."""
    bundle = load_bundle(BUNDLE_DIR)
    ctx = RunContext(
        run_id="run-2", manifest=bundle.manifest, step="learn", step_index=3, attempt=1,
        now=2000.0, seed=1, answers={}, host=host, db=db,
    )  # fmt: skip
    (lane,) = [lane for lane in lanes if lane["sku"] == decision["sku"]]
    resolved = {**{k: decision[k] for k in ("store", "sku", "label", "p_stockout", "escalated")},
                "day": 1, "features": lane["features"], "stockout": True}  # fmt: skip
    data = {"store_db": "store.db", "day": 4, "new": False, "decisions": [], "back": [],
            "resolved": [resolved], "reorders": 0, "messages": 0}  # fmt: skip
    out: dict[str, Any] = bundle.steps["learn"](ctx, data)
    with db.transaction() as conn:  # as the executor commits the step
        for write in ctx.record.writes:
            write(conn, 2000.0)
    return out


def test_the_supplier_ships_short_what_its_notes_say() -> None:
    with SupplierService(fill_rates=FILL_RATES) as supplier:
        with httpx.Client(base_url=supplier.url) as client:
            for i, sku in enumerate(("sku-001", "sku-002")):
                body = {"store": "store-00", "sku": sku, "qty": 20}
                client.post("/orders", json=body, headers={"Idempotency-Key": f"k{i}"})
        shipped = {s.sku: s.qty for s in supplier.take_shipments()}
    assert shipped == {"sku-001": 15, "sku-002": 20}
    with pytest.raises(ValueError, match="fill rates"):
        SupplierService(fill_rates={"sku-001": 0.0})
