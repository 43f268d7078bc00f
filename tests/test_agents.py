"""The durable executor with real bundles, a real node database and real threads."""

from __future__ import annotations

import asyncio
import sqlite3
import textwrap
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import yaml

from edgeos.agents import manage, store
from edgeos.agents.executor import Executor
from edgeos.errors import ConflictError, ManifestError
from edgeos.state import Database, journal, outbox
from edgeos.state.writer import GroupWriter

STEPS = """
import json, pathlib, threading
from edgeos.agents.context import Goto

COUNTS = pathlib.Path(__file__).parent / "counts.json"
LOCK = threading.Lock()

def _count(name):
    with LOCK:  # steps of concurrent runs share this file
        counts = json.loads(COUNTS.read_text()) if COUNTS.exists() else {}
        counts[name] = counts.get(name, 0) + 1
        COUNTS.write_text(json.dumps(counts))
        return counts[name]

def sense(ctx, data):
    _count("sense")
    data = data or {}
    return {**data, "sku": data.get("sku", "A-1"), "stock": 3, "draw": ctx.random().random(),
            "now": ctx.now()}

def reason(ctx, data):
    _count("reason")
    mode = (data or {}).get("mode")
    return {**data, "risk": 0.8}

def act(ctx, data):
    _count("act")
    ctx.effect("supplier.reorder", {"sku": data["sku"], "qty": 10})
    return data

def learn(ctx, data):
    _count("learn")
    return {"done": True, "sku": data["sku"]}
"""


def make_bundle(root: Path, *, code: str = STEPS, **manifest: Any) -> Path:
    bundle = root / "bundle"
    bundle.mkdir(parents=True, exist_ok=True)
    doc = {
        "name": "inventory",
        "version": "1.0",
        "steps": ["sense", "reason", "act", "learn"],
        "connectors": ["supplier"],
        "retry": {"max_attempts": 2, "base_delay": "10ms"},
    }
    doc.update(manifest)
    (bundle / "agent.yaml").write_text(yaml.safe_dump(doc))
    (bundle / "agent.py").write_text(textwrap.dedent(code))
    return bundle


def counts(db: Database, name: str = "inventory") -> dict[str, int]:
    agent = store.agent(db, name)
    path = Path(agent.bundle_dir) / "counts.json"
    import json

    return json.loads(path.read_text()) if path.exists() else {}


@asynccontextmanager
async def running(db: Database, **kwargs: Any) -> AsyncIterator[Executor]:
    writer = GroupWriter(db).start()
    executor = Executor(db, writer, scan_interval=0.05, **kwargs)
    await executor.start()
    try:
        yield executor
    finally:
        await executor.stop()
        writer.stop()


def run_async(fn: Callable[[], Coroutine[Any, Any, None]]) -> None:
    asyncio.run(fn())


def install(db: Database, tmp_path: Path, **manifest: Any) -> None:
    bundle = make_bundle(tmp_path, **manifest)
    manage.add_agent(db, bundle, tmp_path / "agents", models=[], connectors=["supplier"])


def kinds(db: Database, run_id: str) -> list[str]:
    return [r.kind for r in journal.for_run(db, run_id)]


def test_a_run_commits_every_step_and_enqueues_its_effect(db: Database, tmp_path: Path) -> None:
    install(db, tmp_path)

    async def go() -> None:
        async with running(db) as ex:
            run_id = await ex.submit("inventory", data={"sku": "B-7"})
            run = await ex.wait(run_id)
            assert run.state == "succeeded"
            assert run.outcome == {"done": True, "sku": "B-7"}
            assert kinds(db, run_id) == [
                "run_started", "step_completed", "step_completed", "step_completed",
                "effect_enqueued", "step_completed", "run_finished",
            ]  # fmt: skip
            effects = outbox.for_run(db, run_id)
            assert [(e.key, e.connector, e.operation, e.payload) for e in effects] == [
                (f"{run_id}:2:0", "supplier", "reorder", {"sku": "B-7", "qty": 10})
            ]
            records = journal.for_run(db, run_id)
            assert records[1].payload["input_digest"] == journal.digest({"sku": "B-7"})
            assert records[2].payload["input_digest"] == journal.digest(
                records[1].payload["output"]
            )

    run_async(go)
    assert journal.verify(db).ok
    assert counts(db) == {"sense": 1, "reason": 1, "act": 1, "learn": 1}


def test_concurrent_runs_share_commits(db: Database, tmp_path: Path) -> None:
    install(db, tmp_path, budgets={"max_concurrent_runs": 16})

    async def go() -> None:
        async with running(db) as ex:
            ids = [await ex.submit("inventory", data={"sku": f"S{i}"}) for i in range(40)]
            finished = [await ex.wait(i) for i in ids]
            assert {r.state for r in finished} == {"succeeded"}
            assert ex.writer.groups < ex.writer.writes  # some writes were grouped

    run_async(go)
    assert outbox.counts(db)["pending"] == 40
    assert journal.verify(db).ok


def test_resume_after_a_crash_continues_at_the_first_uncommitted_step(
    db: Database, tmp_path: Path
) -> None:
    install(db, tmp_path)

    async def first() -> str:
        async with running(db) as ex:
            run_id = await ex.submit("inventory", data={"sku": "C-3"})
            await ex.wait(run_id)
            return run_id

    run_id = asyncio.run(first())
    # Rewind the run to just after its second step, as if the process died during 'act'.
    with db.transaction() as conn:
        records = journal.for_run(db, run_id)
        after_reason = next(r for r in records if r.kind == "step_completed" and r.step == "reason")
        conn.execute("DELETE FROM journal WHERE run_id = ? AND seq > ?", (run_id, after_reason.seq))
        conn.execute("DELETE FROM outbox WHERE run_id = ?", (run_id,))
        conn.execute(
            "UPDATE runs SET state = 'running', next_step = 'act', step_count = 2, carry = ?, "
            "finished_at = NULL, outcome = NULL WHERE id = ?",
            (store.dumps(after_reason.payload["output"]), run_id),
        )
    before = counts(db)

    async def second() -> None:
        async with running(db) as ex:
            run = await ex.wait(run_id)
            assert run.state == "succeeded"

    asyncio.run(second())
    after = counts(db)
    assert after["sense"] == before["sense"]
    assert after["reason"] == before["reason"]
    assert after["act"] == before["act"] + 1
    assert len(outbox.for_run(db, run_id)) == 1


def test_loop_brake_ends_a_run_that_never_finishes(db: Database, tmp_path: Path) -> None:
    code = STEPS + "\ndef spin(ctx, data):\n    return Goto('spin', data)\n"
    bundle = make_bundle(tmp_path, code=code, steps=["spin"], budgets={"max_steps": 5})
    manage.add_agent(db, bundle, tmp_path / "agents", models=[], connectors=["supplier"])

    async def go() -> None:
        async with running(db) as ex:
            run = await ex.wait(await ex.submit("inventory"))
            assert run.state == "failed"
            assert "loop brake" in (run.error or "")
            assert run.step_count == 5
            last = journal.for_run(db, run.id)[-1]
            assert last.kind == "run_finished"
            assert last.payload["limit"] == "max_steps"

    run_async(go)


def test_a_failing_step_is_retried_then_fails_the_run(db: Database, tmp_path: Path) -> None:
    steps = STEPS.replace(
        '    mode = (data or {}).get("mode")', '    raise RuntimeError("sensor offline")'
    )
    bundle = make_bundle(tmp_path, code=steps)
    manage.add_agent(db, bundle, tmp_path / "agents", models=[], connectors=["supplier"])

    async def go() -> None:
        async with running(db) as ex:
            run = await ex.wait(await ex.submit("inventory"))
            assert run.state == "failed"
            assert "sensor offline" in (run.error or "")
            failures = [r for r in journal.for_run(db, run.id) if r.kind == "step_failed"]
            assert [f.payload["attempt"] for f in failures] == [1, 2]
            assert "RuntimeError" in failures[0].payload["traceback"]
            assert outbox.for_run(db, run.id) == []

    run_async(go)


def test_a_flaky_step_succeeds_on_retry(db: Database, tmp_path: Path) -> None:
    steps = STEPS.replace(
        '    mode = (data or {}).get("mode")',
        '    if _count("reason-tries") == 1:\n        raise TimeoutError("flaky")',
    )
    manage.add_agent(
        db,
        make_bundle(tmp_path, code=steps),
        tmp_path / "agents",
        models=[],
        connectors=["supplier"],
    )

    async def go() -> None:
        async with running(db) as ex:
            run = await ex.wait(await ex.submit("inventory"))
            assert run.state == "succeeded"
            assert kinds(db, run.id).count("step_failed") == 1

    run_async(go)


def test_step_timeout(db: Database, tmp_path: Path) -> None:
    steps = STEPS.replace('    mode = (data or {}).get("mode")', "    import time; time.sleep(1)")
    bundle = make_bundle(tmp_path, code=steps, budgets={"step_timeout": "100ms"})
    manage.add_agent(db, bundle, tmp_path / "agents", models=[], connectors=["supplier"])

    async def go() -> None:
        async with running(db) as ex:
            run = await ex.wait(await ex.submit("inventory"))
            assert run.state == "failed"
            assert "took longer than step_timeout (0.1 s)" in (run.error or "")

    run_async(go)


ESCALATING = STEPS.replace(
    '    mode = (data or {}).get("mode")',
    '    choice = ctx.escalate("Reorder 10 of " + data["sku"] + "?", ["yes", "no"], default="no",'
    ' proposal="yes", timeout=data.get("timeout", 60))\n'
    '    if choice == "no":\n        return Goto("learn", data)',
)


def test_escalation_parks_the_run_until_a_person_answers(db: Database, tmp_path: Path) -> None:
    manage.add_agent(
        db, make_bundle(tmp_path, code=ESCALATING), tmp_path / "agents", models=[],
        connectors=["supplier"],
    )  # fmt: skip

    async def go() -> None:
        async with running(db) as ex:
            run_id = await ex.submit("inventory", data={"sku": "D-4"})
            run = await ex.wait(run_id)
            assert run.state == "waiting_human"
            (open_row,) = store.escalations(db)
            assert open_row.question == "Reorder 10 of D-4?"
            assert open_row.proposal == "yes"
            assert manage.answer(db, open_row.id, "no", by="alice", note="stock is fine")
            assert not manage.answer(db, open_row.id, "yes", by="bob")  # already answered
            ex.nudge()
            run = await ex.wait(run_id)
            assert run.state == "succeeded"
            assert outbox.for_run(db, run_id) == []  # 'no' skipped the reorder
            answered = store.escalation(db, open_row.id)
            assert (answered.state, answered.answer, answered.override) == ("answered", "no", True)
            assert "escalation_answered" in kinds(db, run_id)

    run_async(go)


def test_escalation_timeout_applies_the_default(db: Database, tmp_path: Path) -> None:
    manage.add_agent(
        db, make_bundle(tmp_path, code=ESCALATING), tmp_path / "agents", models=[],
        connectors=["supplier"],
    )  # fmt: skip

    async def go() -> None:
        async with running(db) as ex:
            run_id = await ex.submit("inventory", data={"sku": "E-5", "timeout": 0.2})
            await asyncio.sleep(0.6)
            run = await ex.wait(run_id)
            assert run.state == "succeeded"
            (row,) = store.escalations(db, state=None)
            assert (row.state, row.answer, row.answered_by, row.override) == (
                "timed_out", "no", "timeout", None,
            )  # fmt: skip

    run_async(go)


def test_pause_and_resume_across_restarts(db: Database, tmp_path: Path) -> None:
    install(db, tmp_path)
    run_id = manage.queue_run(db, "inventory", {"sku": "F-6"})
    manage.set_paused(db, "inventory", True)

    async def while_paused() -> None:
        async with running(db) as ex:
            with pytest.raises(ConflictError, match="paused"):
                await ex.submit("inventory")
            run = await ex.wait(run_id)
            assert run.state == "paused"

    asyncio.run(while_paused())
    manage.set_paused(db, "inventory", False)

    async def after_resume() -> None:
        async with running(db) as ex:
            await asyncio.sleep(0.2)
            run = await ex.wait(run_id)
            assert run.state == "succeeded"

    asyncio.run(after_resume())
    assert [k for k in kinds(db, run_id) if k in ("run_paused", "run_resumed")] == [
        "run_paused",
        "run_resumed",
    ]


def test_journal_tampering_is_found(db: Database, tmp_path: Path) -> None:
    install(db, tmp_path)

    async def go() -> None:
        async with running(db) as ex:
            for _ in range(3):
                await ex.wait(await ex.submit("inventory"))

    run_async(go)
    assert journal.verify(db).ok
    target = (
        db.reader()
        .execute("SELECT seq FROM journal WHERE kind = 'effect_enqueued' LIMIT 1 OFFSET 1")
        .fetchone()[0]
    )
    raw = sqlite3.connect(db.path)
    raw.execute(
        "UPDATE journal SET payload = replace(payload, '\"qty\":10', '\"qty\":99') WHERE seq = ?",
        (target,),
    )
    raw.commit()
    raw.close()
    result = journal.verify(db)
    assert not result.ok
    assert result.first_bad_seq == target
    assert "does not match its hash" in (result.reason or "")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"colour": "red"}, "field 'colour': unknown field"),
        ({"steps": ["sense", "missing"]}, "field 'steps.1': agent.py has no function 'missing'"),
        ({"triggers": [{"cron": "61 * * * *"}]}, "cron minute field '61' is outside 0-59"),
        ({"triggers": [{"interval": "soon"}]}, "is not a duration"),
        ({"models": ["ghost"]}, "field 'models.0': model 'ghost' is not registered"),
        ({"connectors": ["smtp"]}, "field 'connectors.0': connector 'smtp' is not bound"),
        ({"budgets": {"max_steps": 0}}, "field 'budgets.max_steps'"),
    ],
)
def test_bad_bundles_are_refused_and_install_nothing(
    db: Database, tmp_path: Path, change: dict[str, Any], message: str
) -> None:
    bundle = make_bundle(tmp_path, **change)
    with pytest.raises(ManifestError) as info:
        manage.add_agent(db, bundle, tmp_path / "agents", models=[], connectors=["supplier"])
    assert message in str(info.value)
    assert str(bundle / "agent.yaml") in str(info.value)
    assert store.agents(db) == []
    assert not (tmp_path / "agents").exists()


def test_a_bundle_whose_code_does_not_import_is_refused(db: Database, tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path, code="import no_such_module\n")
    with pytest.raises(ManifestError, match=r"importing agent\.py failed: ModuleNotFoundError"):
        manage.add_agent(db, bundle, tmp_path / "agents", models=[], connectors=["supplier"])
    assert store.agents(db) == []


CONCURRENCY_PROBE = """
import threading, time, json, pathlib

LOCK = threading.Lock()
STATE = {"now": 0, "max": 0}
OUT = pathlib.Path(__file__).parent / "concurrency.json"

def sense(ctx, data):
    with LOCK:
        STATE["now"] += 1
        STATE["max"] = max(STATE["max"], STATE["now"])
        OUT.write_text(json.dumps(STATE))
    time.sleep(0.05)
    return data

def reason(ctx, data):
    with LOCK:
        STATE["now"] -= 1
    return data

def act(ctx, data):
    return data

def learn(ctx, data):
    return data
"""


def test_max_concurrent_runs_is_held(db: Database, tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path, code=CONCURRENCY_PROBE, budgets={"max_concurrent_runs": 2})
    manage.add_agent(db, bundle, tmp_path / "agents", models=[], connectors=["supplier"])

    async def go() -> None:
        async with running(db) as ex:
            ids = [await ex.submit("inventory", data={"i": i}) for i in range(8)]
            for run_id in ids:
                assert (await ex.wait(run_id)).state == "succeeded"

    run_async(go)
    import json

    probe = Path(store.agent(db, "inventory").bundle_dir) / "concurrency.json"
    assert json.loads(probe.read_text())["max"] == 2


BLOCKED_STEP = """
import time

def call(ctx, data):
    time.sleep(1.5)  # as a step waits on a cloud call over a link that hangs
    return data
"""
QUICK_STEP = """
def count(ctx, data):
    return data
"""


def test_an_agent_whose_steps_block_does_not_hold_up_another_agent(
    db: Database, tmp_path: Path
) -> None:
    for name, code, step in (("caller", BLOCKED_STEP, "call"), ("local", QUICK_STEP, "count")):
        bundle = make_bundle(
            tmp_path / name, code=code, name=name, steps=[step],
            budgets={"max_concurrent_runs": 12, "step_timeout": "10s"},
        )  # fmt: skip
        manage.add_agent(db, bundle, tmp_path / "agents", models=[], connectors=["supplier"])

    async def go() -> None:
        async with running(db) as ex:
            blocked = [await ex.submit("caller") for _ in range(12)]
            await asyncio.sleep(0.3)  # all twelve are inside their step
            started = time.monotonic()
            quick = await ex.submit("local")
            assert (await ex.wait(quick)).state == "succeeded"
            waited = time.monotonic() - started
            assert waited < 0.7, f"the local agent waited {waited:.2f} s for the other's steps"
            for run_id in blocked:
                assert (await ex.wait(run_id)).state == "succeeded"

    run_async(go)


def test_cancel_stops_a_run_and_drops_its_step_in_flight(db: Database, tmp_path: Path) -> None:
    steps = STEPS.replace('    mode = (data or {}).get("mode")', "    import time; time.sleep(0.3)")
    manage.add_agent(
        db, make_bundle(tmp_path, code=steps), tmp_path / "agents", models=[],
        connectors=["supplier"],
    )  # fmt: skip

    async def go() -> None:
        async with running(db) as ex:
            run_id = await ex.submit("inventory")
            await asyncio.sleep(0.1)  # 'reason' is running now
            assert manage.cancel(db, run_id, by="ops")
            assert not manage.cancel(db, run_id, by="ops")
            await asyncio.sleep(0.5)
            run = store.run(db, run_id)
            assert (run.state, run.error, run.step_count) == ("cancelled", "cancelled by ops", 1)
            assert outbox.for_run(db, run_id) == []  # 'act' never ran
            assert kinds(db, run_id)[-1] == "run_finished"

    run_async(go)


def test_a_steps_output_is_kept_as_plain_json_values() -> None:
    import collections

    import numpy as np

    from edgeos.agents.context import plain

    output = {
        1: (np.float32(0.5), [np.int64(3), None, True]),
        "grid": np.arange(4).reshape(2, 2),
        "counts": collections.Counter(a=2),
        "text": "kept",
    }
    assert plain(output) == {
        "1": [0.5, [3, None, True]],
        "grid": [[0, 1], [2, 3]],
        "counts": {"a": 2},
        "text": "kept",
    }
    converted = plain(output)
    assert type(converted["1"][0]) is float
    assert type(converted["1"][1][0]) is int
    assert type(converted["counts"]) is dict
