"""A crash soak: a real node SIGKILLed at random moments while its agent decides reorders.

The agent's effects go to the loopback supplier, which applies each once per
``Idempotency-Key``. After every kill the node is started again, until every run has
finished and the outbox is empty. The suite runs it over 200 runs; ``bench/crash_soak.py``
runs it longer and prints the figures.
"""

from __future__ import annotations

import random
import textwrap
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from edgeos.agents import manage, store
from edgeos.demo.supplier import SupplierService
from edgeos.node.process import node_process
from edgeos.state import Database, journal, outbox

AGENT = """
import time

def sense(ctx, data):
    time.sleep(0.02)
    return {"sku": data["sku"], "stock": ctx.random().randint(0, 9)}

def reason(ctx, data):
    time.sleep(0.01)
    return {**data, "order": 10 - data["stock"]}

def act(ctx, data):
    ctx.effect("supplier.reorder", {"store": "store-00", "sku": data["sku"], "qty": data["order"]})
    time.sleep(0.01)
    return data

def learn(ctx, data):
    time.sleep(0.005)
    return {"sku": data["sku"], "ordered": data["order"]}
"""


@dataclass
class SoakResult:
    """What a soak did and found."""

    runs: int
    kills: int = 0
    seconds: float = 0.0
    states: dict[str, int] = field(default_factory=dict)
    effects: int = 0
    applied: int = 0
    requests: int = 0
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    wrong_payload: list[str] = field(default_factory=list)
    journal_ok: bool = False
    dead: int = 0

    @property
    def redeliveries(self) -> int:
        """Requests beyond the first per key: retries the supplier deduplicated."""
        return self.requests - self.applied

    @property
    def ok(self) -> bool:
        """Every run succeeded; every effect applied exactly once; the journal verifies."""
        return (
            self.states == {"succeeded": self.runs}
            and self.effects == self.runs == self.applied
            and not (self.missing or self.unexpected or self.wrong_payload or self.dead)
            and self.journal_ok
        )


def install_restock(
    root: Path,
    data_dir: Path,
    supplier_url: str,
    *,
    code: str = AGENT,
    steps: tuple[str, ...] = ("sense", "reason", "act", "learn"),
) -> None:
    """Bind ``supplier`` to the loopback supplier and install the ``restock`` agent."""
    data_dir.mkdir(parents=True)
    (data_dir / "connectors.yaml").write_text(
        yaml.safe_dump(
            {
                "supplier": {
                    "type": "http",
                    "base_url": supplier_url,
                    "operations": {"reorder": {"method": "POST", "path": "/orders"}},
                }
            }
        )
    )
    bundle = root / "bundle"
    bundle.mkdir()
    (bundle / "agent.py").write_text(textwrap.dedent(code))
    (bundle / "agent.yaml").write_text(
        yaml.safe_dump(
            {
                "name": "restock",
                "version": "1",
                "steps": list(steps),
                "connectors": ["supplier"],
                "budgets": {"max_concurrent_runs": 8},
            }
        )
    )
    with Database(data_dir / "node.db") as db:
        manage.add_agent(db, bundle, data_dir / "agents", models=[], connectors=["supplier"])


def _setup(root: Path, url: str, runs: int) -> tuple[Path, list[str]]:
    data_dir = root / "node"
    install_restock(root, data_dir, url)
    with Database(data_dir / "node.db") as db:
        ids = [manage.queue_run(db, "restock", {"sku": f"SKU-{i:05d}"}) for i in range(runs)]
    return data_dir, ids


def _progress(data_dir: Path) -> tuple[int, int]:
    with Database(data_dir / "node.db") as db:
        counts = store.state_counts(db)
        return counts.get("succeeded", 0) + counts.get("failed", 0), outbox.counts(db)["pending"]


def run_soak(
    root: Path,
    *,
    runs: int = 200,
    seed: int = 2026,
    max_kill_delay: float = 0.45,
    max_seconds: float = 240.0,
    on_kill: Callable[[int, int, int], None] | None = None,
) -> SoakResult:
    """Kill and restart a node until ``runs`` runs are done; check nothing was lost or doubled."""
    rng = random.Random(seed)
    result = SoakResult(runs)
    started = time.monotonic()
    with SupplierService() as supplier:
        data_dir, ids = _setup(root, supplier.url, runs)
        while True:
            if time.monotonic() - started > max_seconds:
                raise TimeoutError(
                    f"soak not done after {max_seconds:.0f} s: {_progress(data_dir)}"
                )
            node = node_process(data_dir).start()
            finished, pending = _progress(data_dir)
            if finished == runs and pending == 0:
                node.stop()
                break
            time.sleep(rng.uniform(0.05, max_kill_delay))
            node.kill()  # SIGKILL: no shutdown code runs
            result.kills += 1
            if on_kill is not None:
                on_kill(result.kills, *_progress(data_dir))
        result.seconds = time.monotonic() - started
        applied = supplier.keys("order")
        bodies = {key: a.body for key, a in supplier.applied.items() if a.kind == "order"}
    with Database(data_dir / "node.db") as db:
        result.states = store.state_counts(db)
        result.journal_ok = journal.verify(db).ok
        effects = {e.key: e for run_id in ids for e in outbox.for_run(db, run_id)}
        outbox_dead = outbox.counts(db)["dead"]
    result.effects = len(effects)
    result.applied = len(applied)
    result.requests = sum(applied.values())
    result.missing = sorted(set(effects) - set(applied))
    result.unexpected = sorted(set(applied) - set(effects))
    result.wrong_payload = sorted(
        k for k, body in bodies.items() if k in effects and body != effects[k].payload
    )
    result.dead = outbox_dead
    return result
