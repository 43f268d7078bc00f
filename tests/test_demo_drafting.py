"""The demo's customer messages, drafted by its language model and held to a schema: the
recipient, store and SKU come out exact whatever the model is like (here the tiny test
model, which writes shop-like text badly), the message goes out through the messaging
contract, and replay serves the journaled draft without generating again."""

from __future__ import annotations

import asyncio
import json
import shutil
import sqlite3
import textwrap
from pathlib import Path
from typing import Any

import pytest
import yaml
from jsonschema import validate  # type: ignore[import-untyped]

from edgeos.agents import manage
from edgeos.agents.bundle import load_bundle
from edgeos.agents.context import RunContext
from edgeos.agents.replay import replay
from edgeos.connectors.personal import is_pseudonym, pseudonym
from edgeos.demo.drafting import DRAFTER, DRAFTER_ENV, draft_schema, lead, template
from edgeos.demo.inventory_demo import BUNDLE_DIR, bound_contracts, write_connectors
from edgeos.demo.store import create_store
from edgeos.routing.build import build_router
from edgeos.routing.router import Router
from edgeos.runtime import HostConfig, ModelHost, ModelRegistry
from edgeos.runtime.genai_store import register_generative
from edgeos.runtime.generative import GenerativeHost
from edgeos.settings import load_settings
from edgeos.state import Database, journal, outbox
from tests.genai_support import tiny_model
from tests.test_agents import running

CUSTOMERS = ["customer-4242-0", "customer-7001-1"]
STORE, SKU = "store-00", "sku-007"

NOTIFY = """
from edgeos.demo.drafting import back_in_stock

def tell(ctx, data):
    for customer in data["customers"]:
        ctx.effect("messaging.send", back_in_stock(ctx, data["drafter"], customer,
                                                   data["store"], data["sku"]))
    return {"told": len(data["customers"])}
"""


@pytest.fixture
def node(tmp_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A node data directory with the demo's contracts and bindings and the tiny model
    registered as the demo's drafter."""
    model = tiny_model(tmp_path_factory.getbasetemp())
    data_dir = tmp_path / "node"
    write_connectors(data_dir, "http://127.0.0.1:9", tmp_path / "sales.csv")
    with Database(data_dir / "node.db") as db:
        register_generative(ModelRegistry(db, data_dir / "models"), model, name=DRAFTER)
    return data_dir


def routed(db: Database, data_dir: Path) -> tuple[ModelHost, GenerativeHost, Router]:
    registry = ModelRegistry(db, data_dir / "models")
    host, generative = ModelHost(registry, HostConfig()), GenerativeHost(registry)
    return host, generative, build_router(host, generative=generative)


def check_drafted(message: dict[str, Any], customer: str) -> None:
    """A message drafted to ``customer``: its recipient and SKU exact, then the model's
    sentence."""
    assert (message["to"], message["store"], message["sku"]) == (customer, STORE, SKU)
    assert message["text"].startswith(f"{SKU} is back on the shelf. ")
    assert len(message["text"]) > len(lead(SKU)) + 5  # the model wrote the rest
    validate({"to": customer, "text": message["text"]}, draft_schema(customer, SKU))


def test_the_inventory_agent_drafts_its_messages_exact_where_they_must_be(
    node: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store_db = node.parent / "store.db"
    create_store(store_db, [(STORE, SKU)], max_subscribers=0)
    with sqlite3.connect(store_db) as conn:
        conn.executemany("INSERT INTO subscribers (customer, store, sku) VALUES (?, ?, ?)",
                         [(c, STORE, SKU) for c in CUSTOMERS])  # fmt: skip
    bundle = load_bundle(BUNDLE_DIR)
    data = {"store_db": str(store_db), "day": 3, "new": True, "decisions": [],
            "back": [{"store": STORE, "sku": SKU}]}  # fmt: skip
    with Database(node / "node.db") as db:
        host, generative, router = routed(db, node)
        try:
            out = {}
            for drafter in (DRAFTER, None):
                if drafter:
                    monkeypatch.setenv(DRAFTER_ENV, drafter)
                else:
                    monkeypatch.delenv(DRAFTER_ENV)
                ctx = RunContext(
                    run_id="run-1", manifest=bundle.manifest, step="act", step_index=2,
                    attempt=1, now=1.0, seed=1, answers={}, host=host, router=router,
                    contracts=bound_contracts(node),
                )  # fmt: skip
                out[drafter] = (bundle.steps["act"](ctx, data), ctx.record)
        finally:
            router.close()
            generative.close()
            host.close()
    (drafted, record), (templated, plain) = out[DRAFTER], out[None]
    assert (drafted["messages"], drafted["drafted"]) == (2, 2)
    for effect, customer in zip(record.effects, CUSTOMERS, strict=True):
        assert (effect.connector, effect.operation) == ("messaging", "send")
        check_drafted(effect.payload, customer)
        assert effect.journaled["to"] == pseudonym(customer)
    # Drafted on the device (the recipient is personal), journaled with a pseudonym of it.
    for decision, customer in zip(record.venue_decisions, CUSTOMERS, strict=True):
        assert (decision["venue"], decision["privacy"]) == ("edge", "local-only")
        assert json.loads(decision["text"])["to"] == pseudonym(customer)
        assert customer not in json.dumps(decision)
    # Without the drafter: the template, and no model call.
    assert (templated["messages"], templated["drafted"]) == (2, 0)
    assert [e.payload["text"] for e in plain.effects] == [template(STORE, SKU)] * 2
    assert plain.venue_decisions == []


def test_a_drafted_message_is_enqueued_once_and_replay_does_not_generate_it(node: Path) -> None:
    bundle = node.parent / "notify"
    bundle.mkdir()
    doc = {"name": "notify", "version": "1.0", "steps": ["tell"], "connectors": ["messaging"],
           "routing": {"models": [DRAFTER]}, "retry": {"max_attempts": 1}}  # fmt: skip
    (bundle / "agent.yaml").write_text(yaml.safe_dump(doc))
    (bundle / "agent.py").write_text(textwrap.dedent(NOTIFY))
    contracts = bound_contracts(node)
    data = {"customers": CUSTOMERS[:1], "drafter": DRAFTER, "store": STORE, "sku": SKU}
    with Database(node / "node.db") as db:
        manage.add_agent(db, bundle, node / "agents", models=[], connectors=["messaging"],
                         contracts=contracts)  # fmt: skip
        host, generative, router = routed(db, node)

        async def go() -> Any:
            async with running(db, host=host, contracts=contracts) as executor:
                executor.router = router
                return await executor.wait(await executor.submit("notify", data=data))

        try:
            run = asyncio.run(go())
        finally:
            router.close()
            generative.close()
            host.close()
        assert (run.state, run.error) == ("succeeded", None)
        (entry,) = outbox.for_run(db, run.id)
        check_drafted(entry.payload, CUSTOMERS[0])
        (decided,) = [r.payload for r in journal.for_run(db, run.id) if r.kind == "venue_decided"]
        assert decided["completion_tokens"] > 0
        # The model is gone: replay can only serve the journaled draft, and it does.
        shutil.rmtree(node / "models")
        report = replay(db, run.id, settings=load_settings({"data_dir": node}))
        assert report.same, report.lines()
        (enqueued,) = [r.payload for r in journal.for_run(db, run.id)
                       if r.kind == "effect_enqueued"]  # fmt: skip
        assert is_pseudonym(enqueued["payload"]["to"])
