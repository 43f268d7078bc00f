"""Agents with ``isolation: process``: their steps run in real worker processes, for real.

The same bundles as the thread-mode tests, run through the same durable executor; what
must not change (journal, outbox, escalations, retries, random draws) is checked against
the thread mode, and what must (a step that runs out of memory takes down its worker
only) is shown with real rlimits.
"""

from __future__ import annotations

import asyncio
import os
import re
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from edgeos.agents import manage, store
from edgeos.agents.bundle import load_bundle
from edgeos.agents.context import RunContext
from edgeos.agents.isolated import IsolatedRunner, step_context
from edgeos.agents.isolation import WorkerBusy
from edgeos.runtime import HostConfig, ModelHost, ModelRegistry
from edgeos.state import Database, journal, outbox
from tests.test_agent_isolation import assert_gone
from tests.test_agents import ESCALATING, STEPS, make_bundle, running

PROCESS = {"mode": "process", "memory_mb": 256, "cpu_seconds": 10}

MODEL_STEPS = """
import os

import numpy as np

from edgeos.agents.context import Goto


def sense(ctx, data):
    draws = [ctx.random().random() for _ in range(3)]
    return {"x": [0.1, 0.2, 0.3, 0.4], "draws": draws, "pids": [os.getpid()]}


def reason(ctx, data):
    features = np.asarray([data["x"]], dtype=np.float32)
    out = ctx.model("risk").infer({"features": features})
    decision = ctx.model("risk").classify({"features": features})
    return {**data, "p": out["probabilities"][0], "dtype": str(out["probabilities"].dtype),
            "label": decision.label, "draws": data["draws"] + [ctx.random().randint(0, 10**9)],
            "pids": data["pids"] + [os.getpid()]}


def act(ctx, data):
    key = ctx.effect("supplier.reorder", {"sku": "A-1", "qty": np.int64(10)})
    return {**data, "key": key}


def learn(ctx, data):
    if not data.get("looped"):
        return Goto("learn", {**data, "looped": True})
    return {**data, "done": True}
"""


def register_risk(registry: ModelRegistry, mlp_file: Path, tmp_path: Path) -> None:
    spec = tmp_path / "risk.yaml"
    spec.write_text(
        yaml.safe_dump(
            {"task": "classification", "labels": ["ok", "stockout"], "cost_per_call": 0.01}
        )
    )
    registry.add(mlp_file, name="risk", manifest=spec)


def add(db: Database, root: Path, code: str, **manifest: Any) -> None:
    """Install a bundle made under ``root`` (one directory per agent)."""
    manifest.setdefault("isolation", PROCESS)
    bundle = make_bundle(root, code=code, **manifest)
    models = manifest.get("models", [])
    manage.add_agent(db, bundle, root / "agents", models=models, connectors=["supplier"])


def records(db: Database, run_id: str, kind: str) -> list[journal.JournalRecord]:
    return [r for r in journal.for_run(db, run_id) if r.kind == kind]


def test_a_process_isolated_agent_runs_as_it_would_in_a_thread(
    db: Database, registry: ModelRegistry, mlp_file: Path, tmp_path: Path
) -> None:
    register_risk(registry, mlp_file, tmp_path)
    for name, mode in (("in-process", "process"), ("in-thread", "thread")):
        add(db, tmp_path / name, MODEL_STEPS, name=name, models=["risk"],
            isolation={**PROCESS, "mode": mode})  # fmt: skip
    runs = {name: manage.queue_run(db, name, {}) for name in ("in-process", "in-thread")}
    with db.transaction() as conn:  # one seed for both: their draws must be the same
        conn.execute("UPDATE runs SET seed = 1234567")
    host = ModelHost(registry, HostConfig())

    async def go() -> int:
        async with running(db, host=host) as ex:
            done = {name: await ex.wait(run_id) for name, run_id in runs.items()}
            assert {r.state for r in done.values()} == {"succeeded"}, done
            isolated, threaded = done["in-process"].outcome, done["in-thread"].outcome
            worker = isolated["pids"][0]
            assert isolated["pids"] == [worker, worker] != [os.getpid()] * 2
            assert threaded["pids"] == [os.getpid()] * 2
            for field in ("draws", "p", "dtype", "label", "looped", "done"):
                assert isolated[field] == threaded[field], field
            return int(worker)

    worker = asyncio.run(go())
    host.close()
    assert_gone(worker)  # the executor's stop ended the worker
    for name, run_id in runs.items():
        run = store.run(db, run_id)
        # Journaled through the node's own ctx: two calls, with their cost.
        (reason,) = [r for r in records(db, run_id, "step_completed") if r.step == "reason"]
        assert [c[0] for c in reason.payload["model_calls"]] == ["risk", "risk"], name
        assert reason.payload["cost"] == run.cost == 0.02
        # The effect's key is the node's, and the step saw the same key.
        effects = outbox.for_run(db, run_id)
        assert [(e.key, e.connector, e.operation, e.payload) for e in effects] == [
            (f"{run_id}:2:0", "supplier", "reorder", {"sku": "A-1", "qty": 10})
        ]
        assert run.outcome["key"] == f"{run_id}:2:0"
        assert [r.step for r in records(db, run_id, "step_completed")] == [
            "sense", "reason", "act", "learn", "learn",
        ]  # fmt: skip
    assert journal.verify(db).ok


HOG = """
import os
import pathlib

MARK = pathlib.Path(__file__).with_name("allocated")


def sense(ctx, data):
    return {"pids": [os.getpid()]}


def reason(ctx, data):
    if not MARK.exists():  # only the first attempt: the retry must get through
        MARK.write_text("once")
        hog = bytearray(300 * 1024 * 1024)
    return {"pids": data["pids"] + [os.getpid()]}
"""

STEADY = """
import os
import time


def sense(ctx, data):
    time.sleep(0.02)
    return {"pids": [os.getpid()]}


def reason(ctx, data):
    time.sleep(0.02)
    return {"pids": data["pids"] + [os.getpid()]}
"""


def test_a_worker_over_its_memory_limit_is_restarted_and_other_agents_keep_running(
    db: Database, tmp_path: Path
) -> None:
    add(db, tmp_path / "hog", HOG, name="hog", steps=["sense", "reason"], connectors=[],
        isolation={**PROCESS, "memory_mb": 128},
        retry={"max_attempts": 3, "base_delay": "10ms"})  # fmt: skip
    add(db, tmp_path / "steady", STEADY, name="steady", steps=["sense", "reason"],
        connectors=[], isolation={**PROCESS, "memory_mb": 128})  # fmt: skip

    async def go() -> None:
        async with running(db) as ex:
            hog = await ex.submit("hog")
            steady = [await ex.submit("steady", data={"n": i}) for i in range(20)]
            run = await ex.wait(hog)
            assert run.state == "succeeded", run.error
            others = [await ex.wait(run_id) for run_id in steady]
            assert {r.state for r in others} == {"succeeded"}

            (failed,) = records(db, hog, "step_failed")
            assert (failed.step, failed.payload["attempt"]) == ("reason", 1)
            assert "WorkerCrashed" in failed.payload["error"]
            assert "reached its memory limit of 128 MB" in failed.payload["error"]
            assert "MemoryError" in failed.payload["traceback"]  # the worker's stderr
            first, second = run.outcome["pids"]
            assert first != second  # the retry ran in a new worker
            # The other agent's worker was never touched: one process for all its steps.
            assert len({pid for r in others for pid in r.outcome["pids"]}) == 1
            # ... and it was running while the hog crashed.
            started = min(records(db, r.id, "run_started")[0].at for r in others)
            finished = max(records(db, r.id, "run_finished")[0].at for r in others)
            assert started < failed.at < finished

    asyncio.run(go())


def test_an_escalation_in_a_worker_parks_the_run_until_answered(
    db: Database, tmp_path: Path
) -> None:
    add(db, tmp_path, ESCALATING)

    async def go() -> None:
        async with running(db) as ex:
            run_id = await ex.submit("inventory", data={"sku": "D-4"})
            run = await ex.wait(run_id)
            assert run.state == "waiting_human"
            (row,) = store.escalations(db)
            assert row.id == f"{run_id}:1:0"
            assert (row.question, row.options, row.proposal) == (
                "Reorder 10 of D-4?", ["yes", "no"], "yes",
            )  # fmt: skip
            assert 59 < row.deadline - records(db, run_id, "escalation_raised")[0].at <= 60
            assert manage.answer(db, row.id, "yes", by="alice")
            ex.nudge()
            run = await ex.wait(run_id)
            assert run.state == "succeeded", run.error
            assert [e.key for e in outbox.for_run(db, run_id)] == [f"{run_id}:2:0"]

    asyncio.run(go())


def test_a_step_that_raises_in_a_worker_is_retried_then_fails_the_run(
    db: Database, tmp_path: Path
) -> None:
    code = STEPS.replace(
        '    mode = (data or {}).get("mode")', '    raise RuntimeError("sensor offline")'
    )
    add(db, tmp_path, code)

    async def go() -> None:
        async with running(db) as ex:
            run = await ex.wait(await ex.submit("inventory"))
            assert run.state == "failed"
            assert "reason raised RuntimeError: sensor offline" in (run.error or "")
            failures = records(db, run.id, "step_failed")
            assert [f.payload["attempt"] for f in failures] == [1, 2]
            # The child's traceback, down to the line of the agent's code that raised.
            assert 'raise RuntimeError("sensor offline")' in failures[0].payload["traceback"]
            assert outbox.for_run(db, run.id) == []
            # An exception is not a crash: the worker lived through both attempts.
            (runner,) = ex._isolated.values()
            assert runner.worker.alive
            assert runner.worker.crashes == 0

    asyncio.run(go())


MODEL_AGENT = """
import numpy as np


def sense(ctx, data):
    return {**data, "x": [0.1, 0.2, 0.3, 0.4]}


def reason(ctx, data):
    features = np.asarray([data["x"]], dtype=np.float32)
    ctx.model(data.get("model", "risk")).infer({"features": features})
    ctx.model("risk").infer({"features": features})
    return data
"""


def test_the_node_limits_and_checks_model_calls_made_from_a_worker(
    db: Database, registry: ModelRegistry, mlp_file: Path, tmp_path: Path
) -> None:
    register_risk(registry, mlp_file, tmp_path)
    add(db, tmp_path, MODEL_AGENT, steps=["sense", "reason"], models=["risk"],
        budgets={"cost_per_hour": 0.05})  # fmt: skip
    host = ModelHost(registry, HostConfig())

    async def go() -> None:
        async with running(db, host=host) as ex:
            runs = [await ex.wait(await ex.submit("inventory", data={})) for _ in range(3)]
            # The parent's cost budget, raised in the step, ends the run as in a thread.
            assert [r.state for r in runs] == ["succeeded", "succeeded", "failed"]
            last = journal.for_run(db, runs[2].id)[-1]
            assert (last.kind, last.payload["limit"]) == ("run_finished", "cost_per_hour")
            assert records(db, runs[2].id, "step_failed") == []
            # A model the manifest does not list fails the step at once, without retries.
            run = await ex.wait(await ex.submit("inventory", data={"model": "ghost"}))
            assert run.state == "failed"
            assert "StepError" in (run.error or "")
            assert "does not list under models" in (run.error or "")
            assert len(records(db, run.id, "step_failed")) == 1

    asyncio.run(go())
    host.close()


SLEEPER = """
import os
import pathlib
import time


def sense(ctx, data):
    pathlib.Path(__file__).with_name("pid").write_text(str(os.getpid()))
    time.sleep(60)
    return data
"""


def test_a_step_past_its_timeout_is_killed_with_its_worker(db: Database, tmp_path: Path) -> None:
    add(db, tmp_path, SLEEPER, steps=["sense"], connectors=[],
        budgets={"step_timeout": "300ms"}, retry={"max_attempts": 1})  # fmt: skip

    async def go() -> None:
        async with running(db) as ex:
            run = await ex.wait(await ex.submit("inventory"))
            assert run.state == "failed"
            # The executor's timeout, or (when its event loop was slower to notice than the
            # worker, on a busy machine) the worker's kill at the same deadline.
            assert re.search(r"longer than (step_timeout \(|its )0\.3 s", run.error or "")
            pid = int((Path(store.agent(db, "inventory").bundle_dir) / "pid").read_text())
            # Unlike a thread, the stuck step does not linger: its worker is killed.
            (runner,) = ex._isolated.values()
            for _ in range(100):
                if runner.worker.crashes:
                    break
                await asyncio.sleep(0.02)
            assert runner.worker.last_crash is not None
            assert runner.worker.last_crash.kind == "timeout"
            assert_gone(pid)

    asyncio.run(go())


QUEUED = """
import pathlib
import time


def slow(ctx, data):
    with (pathlib.Path(__file__).parent / "ran").open("a") as log:
        log.write(f"{data}\\n")
    time.sleep(data)
    return data
"""


def test_a_step_still_queued_at_its_deadline_does_not_run(tmp_path: Path) -> None:
    """Steps of one agent take turns in its worker; one whose caller gave up never starts."""
    bundle = load_bundle(
        make_bundle(tmp_path, code=QUEUED, steps=["slow"], connectors=[], isolation=PROCESS)
    )
    runner = IsolatedRunner(bundle, bundle.manifest.isolation)
    ctx = RunContext(run_id="r", manifest=bundle.manifest, step="slow", step_index=0,
                     attempt=1, now=0.0, seed=1, answers={}, host=None)  # fmt: skip
    runner.worker.start()
    first = threading.Thread(target=runner, args=("slow", ctx, 0.5))
    first.start()
    time.sleep(0.1)  # the first step is running
    started = time.monotonic()
    with pytest.raises(WorkerBusy, match="busy with other calls"):
        runner.worker.run_step(
            "slow", step_context(ctx), 0.0, 5.0, lambda message: None,
            deadline=time.monotonic() + 0.1,
        )  # fmt: skip
    assert 0.1 <= time.monotonic() - started < 0.3
    first.join()
    assert (tmp_path / "bundle" / "ran").read_text() == "0.5\n"  # only the first step ran
    runner.stop()
