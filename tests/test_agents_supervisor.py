"""The supervisor's limits, enforced on real runs that call a real model."""

from __future__ import annotations

import asyncio
from pathlib import Path

import yaml

from edgeos.agents import manage, store
from edgeos.limits import TokenBucket
from edgeos.runtime import HostConfig, ModelHost, ModelRegistry
from edgeos.state import Database, journal
from tests.test_agents import make_bundle, running

MODEL_AGENT = """
import numpy as np

def sense(ctx, data):
    return {"x": [0.1, 0.2, 0.3, 0.4]}

def reason(ctx, data):
    out = ctx.model("risk").infer({"features": np.asarray([data["x"]], dtype=np.float32)})
    decision = ctx.model("risk").classify({"features": np.asarray([data["x"]], dtype=np.float32)})
    return {"p": out["probabilities"][0].tolist(), "label": decision.label}

def act(ctx, data):
    return data

def learn(ctx, data):
    return data
"""


def setup(
    db: Database, registry: ModelRegistry, mlp_file: Path, tmp_path: Path, **manifest: object
) -> None:
    spec = tmp_path / "risk.yaml"
    spec.write_text(
        yaml.safe_dump(
            {"task": "classification", "labels": ["ok", "stockout"], "cost_per_call": 0.01}
        )
    )
    registry.add(mlp_file, name="risk", manifest=spec)
    bundle = make_bundle(tmp_path, code=MODEL_AGENT, models=["risk"], connectors=[], **manifest)
    manage.add_agent(db, bundle, tmp_path / "agents", models=["risk"], connectors=[])


def test_model_calls_are_journaled_with_their_cost(
    db: Database, registry: ModelRegistry, mlp_file: Path, tmp_path: Path
) -> None:
    setup(db, registry, mlp_file, tmp_path)
    host = ModelHost(registry, HostConfig())

    async def go() -> None:
        async with running(db, host=host) as ex:
            run = await ex.wait(await ex.submit("inventory"))
            assert run.state == "succeeded", run.error
            assert run.cost == 0.02  # two calls at 0.01
            reason = next(r for r in journal.for_run(db, run.id) if r.step == "reason")
            calls = reason.payload["model_calls"]
            assert [c[0] for c in calls] == ["risk", "risk"]
            assert reason.payload["output"]["label"] in ("ok", "stockout")

    asyncio.run(go())
    host.close()


def test_cost_budget_ends_the_run_with_an_explicit_event(
    db: Database, registry: ModelRegistry, mlp_file: Path, tmp_path: Path
) -> None:
    setup(db, registry, mlp_file, tmp_path, budgets={"cost_per_hour": 0.05})
    host = ModelHost(registry, HostConfig())

    async def go() -> None:
        async with running(db, host=host) as ex:
            states = [(await ex.wait(await ex.submit("inventory"))).state for _ in range(4)]
            assert states[:2] == ["succeeded", "succeeded"]
            assert states[2:] == ["failed", "failed"]  # 0.05 allows two runs of 0.02 only

    asyncio.run(go())
    conn = db.reader()
    last = journal.payload_bytes(
        conn.execute(
            "SELECT payload FROM journal WHERE kind = 'run_finished' ORDER BY seq DESC LIMIT 1"
        ).fetchone()[0],
        conn,
    ).decode()
    assert '"limit":"cost_per_hour"' in last
    assert "cost_per_hour 0.05 reached" in last
    host.close()


def test_model_call_rate_limit_throttles_and_journals_the_wait(
    db: Database, registry: ModelRegistry, mlp_file: Path, tmp_path: Path
) -> None:
    setup(db, registry, mlp_file, tmp_path, budgets={"model_calls_per_minute": 60})
    host = ModelHost(registry, HostConfig())

    async def go() -> None:
        async with running(db, host=host) as ex:
            # A burst of one token makes the step's second call wait for the refill (1 s).
            guard = ex._guard(store.agent(db, "inventory").manifest)
            guard.calls = TokenBucket(
                60, burst=1, limit="model_calls_per_minute", owner="inventory"
            )
            run = await ex.wait(await ex.submit("inventory"), timeout=30)
            assert run.state == "succeeded"
            reason = next(r for r in journal.for_run(db, run.id) if r.step == "reason")
            assert 500 < reason.payload["throttled_ms"] < 1500

    asyncio.run(go())
    host.close()


def test_unlisted_model_fails_the_step_without_retry(
    db: Database, registry: ModelRegistry, mlp_file: Path, tmp_path: Path
) -> None:
    setup(db, registry, mlp_file, tmp_path)
    bundle = make_bundle(
        tmp_path / "other", code=MODEL_AGENT.replace('ctx.model("risk").infer', 'ctx.model("ghost").infer'),
        models=["risk"], connectors=[], retry={"max_attempts": 3, "base_delay": "10ms"},
    )  # fmt: skip
    manage.add_agent(db, bundle, tmp_path / "agents", models=["risk"], connectors=[])
    host = ModelHost(registry, HostConfig())

    async def go() -> None:
        async with running(db, host=host) as ex:
            run = await ex.wait(await ex.submit("inventory"))
            assert run.state == "failed"
            assert "does not list under models" in (run.error or "")
            assert [r.kind for r in journal.for_run(db, run.id)].count("step_failed") == 1

    asyncio.run(go())
    host.close()
