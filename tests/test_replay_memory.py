"""Replay with memory: a step recalls on replay what it recalled in the run, whatever memory
holds since, and writes nothing; a step whose code now decides otherwise shows it."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from edgeos.agents import manage, store
from edgeos.agents.executor import Executor
from edgeos.agents.replay import replay
from edgeos.manifests.agent import Memory
from edgeos.memory.handle import AgentMemory
from edgeos.runtime import ModelHost
from edgeos.state import Database, journal
from edgeos.state.writer import GroupWriter
from tests.memory_support import make_bundle

STEPS = """
def first(ctx, data):
    found = ctx.memory.recall("who brings the milk on tuesday", k=2)
    top = found[0]
    return {"supplier": top.metadata["supplier"], "text": top.text,
            "ranked": [r.metadata["supplier"] for r in found],
            "scores": [r.score for r in found]}

def second(ctx, data):
    note = ctx.memory.remember(f"ordered milk from {data['supplier']}",
                               {"supplier": data["supplier"]})
    return {**data, "note": note}
"""

CONFIG = Memory.model_validate({"embedding_model": "hash-embed", "fields": ["supplier"]})


def remember(db: Database, host: ModelHost, *notes: tuple[str, str]) -> list[str]:
    memory = AgentMemory(db, host, "notes", CONFIG)
    ids = [memory.remember(text, {"supplier": supplier}) for text, supplier in notes]
    memory.commit()
    return ids


def memory_rows(db: Database) -> list[tuple[str, str]]:
    return db.reader().execute("SELECT id, text FROM memory_records ORDER BY seq").fetchall()


def run_once(db: Database, host: ModelHost) -> str:
    async def go() -> str:
        writer = GroupWriter(db).start()
        ex = Executor(db, writer, host=host, scan_interval=0.05)
        await ex.start()
        try:
            run = await ex.wait(await ex.submit("notes", data={}))
            assert run.state == "succeeded", run.error
            return run.id
        finally:
            await ex.stop()
            writer.stop()

    return asyncio.run(go())


@pytest.mark.parametrize("mode", ["thread", "process"])
def test_replay_serves_what_the_run_recalled_and_writes_nothing(
    db: Database, host: ModelHost, tmp_path: Path, mode: str
) -> None:
    bundle = make_bundle(tmp_path, STEPS, isolation={"mode": mode})
    manage.add_agent(db, bundle, tmp_path / "agents", models=[], connectors=[])
    remember(
        db, host,
        ("Acme delivers fresh milk every tuesday", "acme"),
        ("Zenith bread arrives late on fridays", "zenith"),
    )  # fmt: skip
    run_id = run_once(db, host)
    run = store.run(db, run_id)
    assert run.outcome is not None
    assert (run.outcome["supplier"], run.outcome["ranked"]) == ("acme", ["acme", "zenith"])
    recalled = [r for r in journal.for_run(db, run_id) if r.kind == "memory_recalled"]
    assert [r.payload["index"] for r in recalled] == [0]
    assert "Acme" not in str(recalled[0].payload)  # ids, scores and a digest: no content

    # Memory changes: a better match for the question arrives, and a live recall finds it.
    remember(db, host, ("who brings the milk on tuesday? Northwind, always", "northwind"))
    live = AgentMemory(db, host, "notes", CONFIG).recall("who brings the milk on tuesday", k=1)
    assert live[0].metadata["supplier"] == "northwind"
    before = (memory_rows(db), len(journal.for_run(db, run_id)))

    report = replay(db, run_id)
    assert report.same, report.lines()
    assert report.steps == 2
    # Replay recalled without searching and remembered without writing.
    assert (memory_rows(db), len(journal.for_run(db, run_id))) == before


def test_replay_shows_a_changed_decision_and_records_erased_since(
    db: Database, host: ModelHost, tmp_path: Path
) -> None:
    bundle = make_bundle(tmp_path, STEPS)
    manage.add_agent(db, bundle, tmp_path / "agents", models=[], connectors=[])
    acme, _ = remember(
        db, host,
        ("Acme delivers fresh milk every tuesday", "acme"),
        ("Zenith bread arrives late on fridays", "zenith"),
    )  # fmt: skip
    run_id = run_once(db, host)

    # The installed step's code now takes the second-best record, and remembers twice.
    installed = Path(store.agent(db, "notes").bundle_dir) / "agent.py"
    code = STEPS.replace("top = found[0]", "top = found[-1]").replace(
        "    return {**data", "    ctx.memory.remember('and once more')\n    return {**data"
    )
    installed.write_text(code)
    report = replay(db, run_id)
    assert not report.same
    text = "\n".join(report.lines())
    assert "step 0 'first' output differs" in text
    assert "'supplier': 'zenith'" in text
    assert "step 1 'second' remembers 2 record(s), journaled 1" in text

    # Back to the run's code, with the record it found first erased since: replay says so,
    # and the decision made without it differs.
    installed.write_text(STEPS)
    memory = AgentMemory(db, host, "notes", CONFIG)
    memory.forget(id=acme)
    memory.commit()
    report = replay(db, run_id)
    text = "\n".join(report.lines())
    assert "recall 1: 1 of the 2 records it found were erased since" in text
    assert "step 0 'first' output differs" in text


def test_a_recall_that_asks_something_else_is_a_difference(
    db: Database, host: ModelHost, tmp_path: Path
) -> None:
    bundle = make_bundle(tmp_path, STEPS)
    manage.add_agent(db, bundle, tmp_path / "agents", models=[], connectors=[])
    remember(db, host, ("Acme delivers fresh milk every tuesday", "acme"))
    run_id = run_once(db, host)
    installed = Path(store.agent(db, "notes").bundle_dir) / "agent.py"
    installed.write_text(STEPS.replace("k=2)", 'k=2, where={"supplier": "zenith"})'))
    report = replay(db, run_id)
    assert report.differences == [
        "step 0 'first' recall 1 asks something else than the first time; it is served what "
        "was found then"
    ]
