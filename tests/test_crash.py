"""Crash test: a real node is SIGKILLed at random moments while its agent works.

The agent's effects go to a real HTTP service on loopback. After every kill the node is
started again; at the end every run has finished, and each effect key was applied
exactly once: none lost, none done twice (redeliveries carry the same key).
"""

from __future__ import annotations

import random
import textwrap
import time
from pathlib import Path

import yaml

from edgeos.agents import manage, store
from edgeos.node.process import node_process
from edgeos.state import Database, journal, outbox
from tests.receiver import Receiver

AGENT = """
import time

def sense(ctx, data):
    time.sleep(0.02)
    return {"sku": data["sku"], "stock": ctx.random().randint(0, 9)}

def reason(ctx, data):
    time.sleep(0.01)
    return {**data, "order": 10 - data["stock"]}

def act(ctx, data):
    ctx.effect("supplier.reorder", {"sku": data["sku"], "qty": data["order"]})
    time.sleep(0.01)
    return data

def learn(ctx, data):
    time.sleep(0.005)
    return {"sku": data["sku"], "ordered": data["order"]}
"""


def setup_node(root: Path, url: str, runs: int) -> tuple[Path, list[str]]:
    data_dir = root / "node"
    data_dir.mkdir(parents=True)
    (data_dir / "connectors.yaml").write_text(
        yaml.safe_dump(
            {
                "supplier": {
                    "type": "http",
                    "base_url": url,
                    "operations": {"reorder": {"method": "POST", "path": "/orders"}},
                }
            }
        )
    )
    bundle = root / "bundle"
    bundle.mkdir()
    (bundle / "agent.py").write_text(textwrap.dedent(AGENT))
    (bundle / "agent.yaml").write_text(
        yaml.safe_dump(
            {
                "name": "restock",
                "version": "1",
                "steps": ["sense", "reason", "act", "learn"],
                "connectors": ["supplier"],
                "budgets": {"max_concurrent_runs": 8},
            }
        )
    )
    with Database(data_dir / "node.db") as db:
        manage.add_agent(db, bundle, data_dir / "agents", models=[], connectors=["supplier"])
        ids = [manage.queue_run(db, "restock", {"sku": f"SKU-{i:04d}"}) for i in range(runs)]
    return data_dir, ids


def progress(data_dir: Path) -> tuple[int, int]:
    with Database(data_dir / "node.db") as db:
        finished = sum(n for s, n in store.state_counts(db).items() if s in ("succeeded", "failed"))
        return finished, outbox.counts(db)["pending"]


def test_sigkill_at_random_moments_loses_nothing_and_repeats_nothing(tmp_path: Path) -> None:
    rng = random.Random(2026)
    runs = 200
    with Receiver() as receiver:
        data_dir, ids = setup_node(tmp_path, receiver.url, runs)
        kills = 0
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            node = node_process(data_dir).start()
            finished, pending = progress(data_dir)
            if finished == runs and pending == 0:
                node.stop()
                break
            time.sleep(rng.uniform(0.05, 0.45))
            node.kill()  # SIGKILL: no shutdown code runs
            kills += 1
        else:
            raise AssertionError(f"not done after {kills} kills: {progress(data_dir)}")

    assert kills >= 5, f"the work finished after only {kills} kills; make steps slower"
    with Database(data_dir / "node.db") as db:
        states = {store.run(db, i).state for i in ids}
        assert states == {"succeeded"}
        assert journal.verify(db).ok
        effects = {e.key: e for i in ids for e in outbox.for_run(db, i)}
        skus = {i: store.run(db, i).input["sku"] for i in ids}
    assert len(effects) == runs  # one reorder per run, exactly
    assert set(receiver.applied) == set(effects)  # every effect applied, none invented
    for key, body in receiver.applied.items():
        assert body == effects[key].payload
        assert body["sku"] == skus[key.split(":")[0]]
    redelivered = sum(n - 1 for n in receiver.seen.values())
    print(f"{runs} runs, {kills} SIGKILLs, {redelivered} redeliveries deduplicated by key")
