"""The inventory demo: store database, supplier service, and a short end-to-end run.

The end-to-end test runs the real thing for a few seconds: the node as a child process,
the supplier service on loopback, the store database fed by the simulator, the scripted
operator answering over the node's API and the fleet's, and the demo fleet (a real
``edgeos fleet serve``) the node joins, whose dashboard shows the node's runs and KPIs.
"""

from __future__ import annotations

import io
import sqlite3
import tempfile
import threading
import time
from pathlib import Path

import httpx
import pytest
from rich.console import Console
from typer.testing import CliRunner

from edgeos.agents import manage
from edgeos.agents.bundle import load_bundle
from edgeos.agents.context import RunContext, StepError
from edgeos.cli.main import app
from edgeos.connectors.contracts import ContractError
from edgeos.connectors.personal import is_pseudonym
from edgeos.demo.fleet import DemoFleet
from edgeos.demo.inventory_demo import (
    BUNDLE_DIR,
    CLOUD_PRICE,
    MODEL,
    bound_contracts,
    run_inventory_demo,
    write_connectors,
)
from edgeos.demo.operator import ScriptedOperator
from edgeos.demo.retail import FEATURE_NAMES
from edgeos.demo.store import (
    STORE_DB_ENV,
    Shipment,
    StoreFeeder,
    StoreSimulator,
    create_store,
    sales_export,
)
from edgeos.demo.supplier import SupplierService
from edgeos.demo.train import DemoModels
from edgeos.errors import ManifestError
from edgeos.state import Database

KPI_ROWS = (
    "finished runs",
    "decision latency p50",
    "decision latency p99",
    "task success rate",
    "human override rate",
    "cost per decision",
    "mean time to recovery",
    "reorders delivered",
    "customer messages delivered",
    "redeliveries deduplicated",
)


def test_supplier_applies_each_key_once_and_refuses_a_reused_key() -> None:
    order = {"store": "store-00", "sku": "sku-001", "qty": 6}
    with SupplierService() as supplier, httpx.Client(base_url=supplier.url) as client:
        first = client.post("/orders", json=order, headers={"Idempotency-Key": "k1"})
        again = client.post("/orders", json=order, headers={"Idempotency-Key": "k1"})
        other = client.post("/orders", json={**order, "qty": 7}, headers={"Idempotency-Key": "k1"})
        keyless = client.post("/orders", json=order)
        bad = client.post("/messages", json={"to": "c-1"}, headers={"Idempotency-Key": "m1"})
        sent = client.post(
            "/messages", json={"to": "c-1", "text": "back"}, headers={"Idempotency-Key": "m2"}
        )
        stats = client.get("/stats").json()
        shipped = supplier.take_shipments()
    assert first.status_code == 201
    assert again.status_code == 200
    assert again.headers["Idempotent-Replayed"] == "true"
    assert again.json() == first.json()
    assert other.status_code == 409
    assert "k1" in other.json()["error"]
    assert keyless.status_code == 400
    assert bad.status_code == 422
    assert sent.status_code == 201
    assert stats == {
        "orders": 1, "messages": 1, "replays": 1, "mismatched": 1, "dropped_replies": 0,
        "requests": 6,
    }  # fmt: skip
    assert [(s.sku, s.qty) for s in shipped] == [("sku-001", 6)]
    assert not supplier.running


def test_supplier_that_loses_its_answer_still_applies_the_order_once() -> None:
    # Random(3)'s first draw is 0.24: with a rate of 0.3 the first answer is lost.
    with (
        SupplierService(drop_reply_rate=0.3, seed=3) as supplier,
        httpx.Client(base_url=supplier.url) as client,
    ):
        body = {"store": "store-00", "sku": "sku-002", "qty": 3}
        with pytest.raises(httpx.RemoteProtocolError):
            client.post("/orders", json=body, headers={"Idempotency-Key": "lost"})
        retry = client.post("/orders", json=body, headers={"Idempotency-Key": "lost"})
    assert retry.status_code == 200
    assert retry.headers["Idempotent-Replayed"] == "true"
    assert supplier.snapshot()["orders"] == 1
    assert supplier.keys("order") == {"lost": 2}


def test_feeder_writes_each_day_and_puts_shipments_on_the_shelf(tmp_path: Path) -> None:
    db = tmp_path / "store.db"
    sim = StoreSimulator(1, 4, seed=3)
    sim.fast_forward(100)
    arrived: list[list[Shipment]] = [[]]
    feeder = StoreFeeder(db, sim, shipments=lambda: arrived.pop() if arrived else [])
    create_store(db, feeder.lanes, seed=3)
    first = feeder.tick()
    arrived.append([Shipment("PO-1", "store-00", "sku-002", 500)])
    second = feeder.tick()
    conn = sqlite3.connect(db)
    try:
        days = conn.execute("SELECT day, count(*) FROM observations GROUP BY day").fetchall()
        features = conn.execute("SELECT features FROM observations LIMIT 1").fetchone()[0]
        delivered = conn.execute("SELECT order_id, sku, qty, day FROM deliveries").fetchall()
        shelf = conn.execute("SELECT on_hand FROM stock WHERE sku = 'sku-002'").fetchone()[0]
    finally:
        conn.close()
    assert [o.day for o in first] == [100] * 4
    assert days == [(100, 4), (101, 4)]
    assert len(features.split(",")) == len(FEATURE_NAMES)
    assert delivered == [("PO-1", "sku-002", 500, 101)]
    # A twin store without the shipment: the same day had 500 units fewer on the shelf.
    twin = StoreSimulator(1, 4, seed=3)
    twin.fast_forward(100)
    twin.step()
    (twin_lane,) = [o for o in twin.step() if o.sku == "sku-002"]
    (lane,) = [o for o in second if o.sku == "sku-002"]
    assert (
        lane.stock_on_hand + lane.units_sold == twin_lane.stock_on_hand + twin_lane.units_sold + 500
    )
    assert shelf == lane.stock_on_hand
    assert feeder.received_units == 500
    # The point of sale's export: a row per closed day, each a pos.sales event on the node.
    rows = sales_export(db).read_text().splitlines()
    assert rows == [
        "day,units_sold,skus",
        f"100,{sum(o.units_sold for o in first)},4",
        f"101,{sum(o.units_sold for o in second)},4",
    ]


def test_operator_agrees_mostly_and_overrides_sometimes() -> None:
    operator = ScriptedOperator("http://127.0.0.1:9", override_rate=0.25, seed=3)
    choices = [
        operator.choose(["in_stock", "stockout"], "stockout", "stockout") for _ in range(200)
    ]
    overrides = choices.count("in_stock")
    assert 20 < overrides < 80
    assert operator.choose(["a"], "a", "a") == "a"  # nothing else to choose


def test_the_bundle_loads_with_the_demo_models_and_connectors() -> None:
    bundle = load_bundle(BUNDLE_DIR)
    assert bundle.manifest.name == "inventory"
    assert bundle.manifest.steps == ["sense", "reason", "act", "learn"]
    assert bundle.manifest.models == ["stockout-risk"]
    assert bundle.manifest.connectors == ["supplier", "messaging", "pos"]
    assert bundle.manifest.requires == dict.fromkeys(("supplier", "messaging", "pos"), ">=1.0,<2.0")
    assert [t.event for t in bundle.manifest.triggers if t.event] == ["pos.sales"]
    assert bundle.manifest.escalation.confidence_threshold == 0.6
    assert bundle.manifest.escalation.timeout == 5.0


def test_sense_claims_each_day_once_and_a_second_try_finds_its_own_claim(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    db = tmp_path / "store.db"
    feeder = StoreFeeder(db, StoreSimulator(1, 3, seed=3))
    create_store(db, feeder.lanes)
    feeder.tick()
    bundle = load_bundle(BUNDLE_DIR)
    sense = bundle.steps["sense"]

    def ctx(run_id: str) -> RunContext:
        return RunContext(
            run_id=run_id, manifest=bundle.manifest, step="sense", step_index=0, attempt=1,
            now=1.0, seed=1, answers={}, host=None,
        )  # fmt: skip

    first = sense(ctx("run-a"), {"store_db": str(db)})
    again = sense(ctx("run-a"), {"store_db": str(db)})  # the step cut off and run again
    other = sense(ctx("run-b"), {"store_db": str(db)})
    assert first["new"]
    assert [lane["sku"] for lane in first["lanes"]] == ["sku-000", "sku-001", "sku-002"]
    assert len(first["lanes"][0]["features"]) == len(FEATURE_NAMES)
    assert again == first
    assert (other["new"], other["day"], other["lanes"]) == (False, first["day"], [])
    feeder.tick()
    feeder.tick()
    monkeypatch.setenv(STORE_DB_ENV, str(db))  # an event's data does not say where the store is
    closed = {"path": "sales.csv", "line": 2, "row": {"day": str(first["day"] + 1)}}
    assert sense(ctx("run-b"), closed)["day"] == first["day"] + 1  # the event's day
    assert sense(ctx("run-c"), {})["day"] == first["day"] + 2  # by hand: the latest
    monkeypatch.delenv(STORE_DB_ENV)
    with pytest.raises(RuntimeError, match=STORE_DB_ENV):
        sense(ctx("run-c"), {})


def test_every_effect_and_sense_of_the_demo_goes_through_a_contract(tmp_path: Path) -> None:
    data_dir = tmp_path / "node"
    bindings = write_connectors(data_dir, "http://127.0.0.1:9", tmp_path / "sales.csv")
    contracts = bound_contracts(data_dir)
    assert {b: c.label for b, c in contracts.items()} == {
        "supplier": "supplier@1.0", "messaging": "messaging@1.0", "pos": "pos@1.0",
    }  # fmt: skip
    assert bindings == list(contracts)  # no binding without a contract
    assert contracts["pos"].event_names == {"pos.sales": "sales"}

    # agent add checks the agent's requires against what the bindings implement.
    bundle = load_bundle(BUNDLE_DIR)
    with Database(data_dir / "node.db") as db:
        with pytest.raises(ManifestError, match=r"field 'requires\.supplier': no connector"):
            manage.add_agent(db, BUNDLE_DIR, data_dir / "agents", models=[MODEL],
                             connectors=bindings)  # fmt: skip
        manage.add_agent(
            db, BUNDLE_DIR, data_dir / "agents", models=[MODEL], connectors=bindings,
            contracts=contracts,
        )  # fmt: skip

    # What the agent decides is checked when it decides it: a bad payload fails the step.
    ctx = RunContext(
        run_id="r", manifest=bundle.manifest, step="act", step_index=2, attempt=1, now=1.0,
        seed=1, answers={}, host=None, contracts=contracts,
    )  # fmt: skip
    with pytest.raises(StepError, match=r"supplier@1\.0 reorder input: /qty: 0 is less than"):
        ctx.effect("supplier.reorder", {"store": "store-00", "sku": "sku-001", "qty": 0})
    with pytest.raises(StepError, match="Additional properties are not allowed"):
        ctx.effect("messaging.send", {"to": "customer-1", "text": "hi", "cc": "everyone"})
    ctx.effect("messaging.send", {"to": "customer-1234-0", "text": "back", "sku": "sku-001"})
    (sent,) = ctx.record.effects
    assert sent.payload["to"] == "customer-1234-0"  # delivered with the value...
    assert is_pseudonym(sent.journaled["to"])  # ...journaled with a pseudonym
    # And what the point of sale sends is checked before it starts a run.
    contracts["pos"].check("sales", {"row": {"day": "12", "units_sold": "40", "skus": "12"}},
                           direction="event")  # fmt: skip
    with pytest.raises(ContractError, match=r"/row: 'skus' is a required property"):
        contracts["pos"].check("sales", {"row": {"day": "12", "units_sold": "40"}},
                               direction="event")  # fmt: skip


def test_demo_command_takes_a_duration() -> None:
    result = CliRunner().invoke(app, ["demo", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    assert "--duration" in result.output


@pytest.mark.slow
def test_inventory_demo_end_to_end(demo_models: DemoModels) -> None:
    threads_before = set(threading.enumerate())
    temp = Path(tempfile.gettempdir())
    temp_before = set(temp.glob("edgeos-inventory-*")) | set(temp.glob("edgeos-demo-fleet-*"))
    out = io.StringIO()
    console = Console(file=out, width=160)
    started = time.monotonic()
    with DemoFleet() as fleet:
        result = run_inventory_demo(
            demo_models.out_dir, duration=6.0, console=console, drop_reply_rate=0.3, fleet=fleet
        )
        # The demo's login opens the dashboard (the demo itself signed in with it).
        with httpx.Client(base_url=fleet.url, verify=False) as web:
            assert web.get("/ui/").status_code == 303  # to the sign-in page
    elapsed = time.monotonic() - started
    text = out.getvalue()

    # Runs reviewed the store's days and all succeeded.
    kpis = result.kpis
    assert kpis.finished >= 3, text
    assert (kpis.failed, kpis.success_rate) == (0, 1.0), text
    assert result.reviewed_days >= 3
    assert result.simulated_days >= result.reviewed_days
    assert kpis.latency is not None
    assert kpis.latency.p50_ms > 0
    assert kpis.open_escalations == 0

    # The model was unsure at least once, and the scripted operator answered.
    assert result.operator_answers >= 1, text
    assert kpis.answered_by_people == result.operator_answers
    assert kpis.overrides == result.operator_overrides
    # Each answer is also a labelled example in the agent's training set.
    assert result.training_examples["corrections"] == result.operator_answers
    assert "operator:" in text

    # Every reorder the agent decided was applied by the supplier exactly once per key;
    # the answers it lost on purpose were resent with the same key and replayed.
    assert result.enqueued_order_keys, text
    assert set(result.order_requests) == result.enqueued_order_keys
    assert result.supplier["orders"] == len(result.enqueued_order_keys)
    assert result.outbox["supplier"] == {
        "pending": 0, "delivered": len(result.enqueued_order_keys), "dead": 0,
    }  # fmt: skip
    assert result.supplier["dropped_replies"] >= 1
    assert result.supplier["replays"] == result.supplier["dropped_replies"]
    assert result.supplier["mismatched"] == 0
    assert result.store_deliveries >= 1

    # Every run came from a pos.sales event through the pos binding, every effect went
    # through a binding that implements its contract, and the recipients of customer
    # messages (personal in the messaging contract) are in the journal as pseudonyms only.
    assert result.contracts == {
        "supplier": "supplier@1.0", "messaging": "messaging@1.0", "pos": "pos@1.0",
    }  # fmt: skip
    assert set(result.outbox) <= set(result.contracts)
    assert result.event_runs >= result.reviewed_days
    assert sum(result.runs.values()) == result.event_runs
    assert result.personal_leaks == 0
    assert result.pseudonymised == sum(result.outbox.get("messaging", {}).values())
    assert "contracts: supplier@1.0 (reorder), messaging@1.0 (send; to is personal)" in text

    # The summary has every KPI row, printed and returned.
    labels = [label for label, _ in result.rows]
    for row in KPI_ROWS:
        assert row in labels
        assert row in text
    assert "100.0%" in dict(result.rows)["task success rate"]

    # The node joined the demo fleet: its dashboard shows the device and its latest runs,
    # its KPIs arrived, and the operator answered some questions there.
    seen = result.fleet
    assert seen is not None, text
    assert seen.runs_listed == min(kpis.finished, 20), seen
    assert 1 <= seen.kpi_runs <= kpis.finished, seen
    assert seen.telemetry_records > seen.kpi_runs
    assert 1 <= result.fleet_answers <= result.operator_answers, text
    assert seen.escalations >= result.fleet_answers
    assert "operator at the fleet:" in text
    assert f"device {seen.device_id[:13]}" in dict(result.rows)["on the fleet's dashboard"]

    # Every stockout-risk call was routed: the unsure ones went to the fleet's cloud venue
    # (and cost), the rest stayed on the device (free); shown live and in the summary.
    routed = result.venues
    assert routed is not None, text
    edge, cloud = routed.by_venue["edge"][0], routed.by_venue["cloud"][0]
    assert edge > 0, text
    assert cloud > 0, text
    assert routed.cost == pytest.approx(CLOUD_PRICE * cloud)
    # At most every decision at the cloud's price (a draft has no cloud price); a sum of
    # prices, so compared with a float's tolerance.
    assert routed.all_cloud_cost <= CLOUD_PRICE * routed.decisions + 1e-9
    assert routed.saving > 0, text
    row = dict(result.rows)["venue decisions"]
    assert row.startswith(f"{edge} edge, {cloud} cloud, {result.deferred_calls} deferred"), row
    assert f"saved {routed.saving:.4f} against all-cloud" in row
    assert "venue decisions" in text
    assert "| venues so far: " in text

    # Nothing is left running or lying around.
    assert result.node_stopped_cleanly, text
    assert result.leftovers == []
    assert "everything stopped and removed" in text
    deadline = time.monotonic() + 5
    while set(threading.enumerate()) - threads_before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert set(threading.enumerate()) - threads_before == set()
    temp_after = set(temp.glob("edgeos-inventory-*")) | set(temp.glob("edgeos-demo-fleet-*"))
    assert temp_after == temp_before
    # KPIs travel per closed minute: the demo waits for the first (at most about a minute).
    assert elapsed < 100
