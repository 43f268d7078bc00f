"""Learning: feedback as a training set, and drift measured with the PSI."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from edgeos.agents import manage, store
from edgeos.agents.learning import drift, export_feedback, psi
from edgeos.runtime import HostConfig, ModelHost, ModelRegistry
from edgeos.state import Database
from tests.test_agents import ESCALATING, make_bundle, running


def test_psi_is_near_zero_for_the_same_distribution_and_large_for_a_shift() -> None:
    rng = np.random.default_rng(0)
    reference = rng.normal(0, 1, 5000)
    assert psi(reference, rng.normal(0, 1, 2000)) < 0.02
    assert 0.05 < psi(reference, rng.normal(0.3, 1, 2000)) < 0.2
    assert psi(reference, rng.normal(1.0, 1, 2000)) > 0.5
    # Worked example: 10 equal bins, recent puts twice the share in the top bin.
    ref = np.arange(1000, dtype=float)
    recent = np.concatenate([np.arange(0, 900, 1.0)[::1][:800], np.full(200, 950.0)])
    expected = np.full(10, 0.1)
    actual = np.histogram(recent, np.quantile(ref, np.linspace(0, 1, 11)))[0] / recent.size
    actual = np.clip(actual, 1e-4, None)  # empty bins get the same floor as in psi()
    manual = float(np.sum((actual - expected) * np.log(actual / expected)))
    assert psi(ref, recent) == pytest.approx(manual, rel=1e-6)
    with pytest.raises(ValueError, match="samples in both windows"):
        psi(ref, np.array([]))


def add_observations(db: Database, values: np.ndarray, confidence: np.ndarray) -> None:
    with db.transaction() as conn:
        for x, c in zip(values, confidence, strict=True):
            conn.execute(
                "INSERT INTO observations (agent, model, run_id, at, confidence, inputs) "
                "VALUES ('a', 'm', 'r', 0, ?, ?)",
                (float(c), np.asarray(x, np.float32).tobytes()),
            )


def test_drift_signal_fires_when_inputs_shift(db: Database) -> None:
    rng = np.random.default_rng(1)
    add_observations(db, rng.normal(0, 1, (1000, 3)), rng.uniform(0.6, 1, 1000))
    steady = drift(db, "a", "m")
    assert steady.worst is not None
    assert not steady.drifting
    shifted = rng.normal(0, 1, (200, 3))
    shifted[:, 2] += 1.5  # the third feature moves
    add_observations(db, shifted, rng.uniform(0.6, 1, 200))
    report = drift(db, "a", "m")
    assert report.drifting
    assert report.feature_psi[2] > 0.2
    assert max(report.feature_psi[:2]) < 0.2
    assert (report.reference_n, report.recent_n) == (1000, 200)


def test_drift_needs_enough_observations(db: Database) -> None:
    add_observations(db, np.zeros((10, 2)), np.ones(10))
    report = drift(db, "a", "m")
    assert report.worst is None
    assert not report.drifting


CLASSIFYING = """
import numpy as np

def sense(ctx, data):
    return {"x": data["x"]}

def reason(ctx, data):
    d = ctx.model("risk").classify({"features": np.asarray([data["x"]], dtype=np.float32)})
    ctx.feedback({"label": d.label, "confidence": d.confidence}, outcome={"actual": "ok"})
    return {"label": d.label}

def act(ctx, data):
    return data

def learn(ctx, data):
    return data
"""


def test_classify_observations_and_feedback_are_recorded_with_the_step(
    db: Database, registry: ModelRegistry, mlp_file: Path, tmp_path: Path
) -> None:
    spec = tmp_path / "risk.yaml"
    spec.write_text(yaml.safe_dump({"task": "classification", "labels": ["ok", "stockout"]}))
    registry.add(mlp_file, name="risk", manifest=spec)
    bundle = make_bundle(tmp_path, code=CLASSIFYING, models=["risk"], connectors=[])
    manage.add_agent(db, bundle, tmp_path / "agents", models=["risk"], connectors=[])
    host = ModelHost(registry, HostConfig())

    async def go() -> None:
        async with running(db, host=host) as ex:
            for i in range(5):
                run = await ex.wait(await ex.submit("inventory", data={"x": [i, 1.0, 2.0, 3.0]}))
                assert run.state == "succeeded"

    asyncio.run(go())
    host.close()
    rows = db.reader().execute("SELECT confidence, inputs FROM observations").fetchall()
    assert len(rows) == 5
    assert np.frombuffer(rows[4][1], np.float32).tolist() == [4.0, 1.0, 2.0, 3.0]
    assert all(0.5 <= c <= 1.0 for c, _ in rows)
    examples = [json.loads(line) for line in export_feedback(db, "inventory")]
    assert len(examples) == 5
    assert examples[0]["outcome"] == {"actual": "ok"}
    assert examples[0]["decision"]["label"] in ("ok", "stockout")


def test_a_persons_answer_becomes_a_labelled_example(db: Database, tmp_path: Path) -> None:
    manage.add_agent(
        db, make_bundle(tmp_path, code=ESCALATING), tmp_path / "agents", models=[],
        connectors=["supplier"],
    )  # fmt: skip

    async def go() -> None:
        async with running(db) as ex:
            run_id = await ex.submit("inventory", data={"sku": "L-1"})
            await ex.wait(run_id)
            (esc,) = store.escalations(db)
            manage.answer(db, esc.id, "no", by="maria", note="promo ended")

    asyncio.run(go())
    (example,) = [json.loads(line) for line in export_feedback(db, "inventory")]
    assert example["decision"]["proposal"] == "yes"
    assert example["correction"] == {"answer": "no", "by": "maria", "note": "promo ended"}
