"""Memory in agent runs: ``ctx.memory`` and ``ctx.context`` commit with their step (in a
thread or a worker process), short-term context is purged when the run finishes, and a
SIGKILL between a step's memory write and its commit leaves neither or both."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import orjson
import pytest

from edgeos.agents import manage, store
from edgeos.agents.executor import Executor
from edgeos.runtime import ModelHost, ModelRegistry
from edgeos.state import Database, journal
from edgeos.state.writer import GroupWriter
from tests.memory_support import make_bundle
from tests.stored import stored_bytes

STEPS = """
from edgeos.agents.context import Goto

def first(ctx, data):
    ctx.memory.remember("Acme delivers fresh milk every tuesday", {"supplier": "acme"},
                        subject="acme-rep")
    ctx.context["order"] = {"sku": "milk", "qty": 3}
    ctx.context.add_turn("user", "we are out of milk")
    if data.get("fail"):
        raise RuntimeError("failed after remembering")
    return data

def second(ctx, data):
    if data.get("ask"):
        ctx.escalate("go on?", ["yes", "no"], default="yes")
    found = ctx.memory.recall("who brings the milk on tuesday", k=1,
                              where={"supplier": "acme"})
    ctx.context.add_turn("agent", "Acme brings it on tuesday")
    return {"found": [r.text for r in found], "order": ctx.context.get("order"),
            "turns": [t.role for t in ctx.context.turns()], "missing": ctx.context.get("x", 7)}
"""


@asynccontextmanager
async def running(db: Database, host: ModelHost) -> AsyncIterator[Executor]:
    writer = GroupWriter(db).start()
    executor = Executor(db, writer, host=host, scan_interval=0.05)
    await executor.start()
    try:
        yield executor
    finally:
        await executor.stop()
        writer.stop()


def install(db: Database, tmp_path: Path, code: str = STEPS, **manifest: Any) -> None:
    bundle = make_bundle(tmp_path, code, **manifest)
    manage.add_agent(db, bundle, tmp_path / "agents", models=[], connectors=[])


def context_rows(db: Database, run_id: str) -> int:
    conn = db.reader()
    return sum(
        conn.execute(f"SELECT count(*) FROM {table} WHERE run_id = ?", (run_id,)).fetchone()[0]
        for table in ("run_context", "run_turns")
    )


@pytest.mark.parametrize("mode", ["thread", "process"])
def test_memory_and_context_commit_with_their_steps(
    db: Database, host: ModelHost, tmp_path: Path, mode: str
) -> None:
    install(db, tmp_path, isolation={"mode": mode})

    async def go() -> str:
        async with running(db, host) as ex:
            run_id = await ex.submit("notes", data={})
            run = await ex.wait(run_id)
            assert run.state == "succeeded", run.error
            assert run.outcome == {
                "found": ["Acme delivers fresh milk every tuesday"],
                "order": {"sku": "milk", "qty": 3},
                "turns": ["user", "agent"],
                "missing": 7,
            }
            return run_id

    run_id = asyncio.run(go())
    kinds = [r.kind for r in journal.for_run(db, run_id)]
    assert kinds == ["run_started", "step_completed", "memory_written", "step_completed",
                     "memory_recalled", "run_finished"]  # fmt: skip
    written = next(r for r in journal.for_run(db, run_id) if r.kind == "memory_written")
    row = db.reader().execute("SELECT id, run_id, subject FROM memory_records").fetchone()
    assert written.payload["remembered"] == [row[0]]
    assert row[1:] == (run_id, "acme-rep")
    assert "Acme" not in orjson.dumps(written.payload).decode()  # ids only: erasable
    assert context_rows(db, run_id) == 0  # purged with the outcome


def test_a_failed_step_writes_no_memory_and_its_run_is_purged(
    db: Database, host: ModelHost, tmp_path: Path
) -> None:
    install(db, tmp_path)

    async def go() -> str:
        async with running(db, host) as ex:
            run_id = await ex.submit("notes", data={"fail": True})
            run = await ex.wait(run_id)
            assert run.state == "failed"
            return run_id

    run_id = asyncio.run(go())
    assert db.reader().execute("SELECT count(*) FROM memory_records").fetchone()[0] == 0
    assert context_rows(db, run_id) == 0


def test_context_lives_while_the_run_waits_and_is_purged_when_it_ends(
    db: Database, host: ModelHost, tmp_path: Path
) -> None:
    install(db, tmp_path)

    async def go() -> str:
        async with running(db, host) as ex:
            run_id = await ex.submit("notes", data={"ask": True})
            run = await ex.wait(run_id)
            assert run.state == "waiting_human"
            assert context_rows(db, run_id) == 2  # the value and the first turn
            escalation = store.escalations(db, state="open")[0]
            manage.answer(db, escalation.id, "yes", by="tester")
            ex.nudge()
            run = await ex.wait(run_id)
            assert run.state == "succeeded"
            assert run.outcome is not None
            assert run.outcome["order"] == {"sku": "milk", "qty": 3}
            return run_id

    run_id = asyncio.run(go())
    assert context_rows(db, run_id) == 0
    db.checkpoint()
    assert b"we are out of milk" not in stored_bytes([db.path])  # overwritten, not unlinked


CRASH_STEPS = """
import time
from pathlib import Path

MARKS = Path(__file__).with_name("marks.txt")  # beside the node's copy of the bundle

def first(ctx, data):
    for i in range(3):
        ctx.memory.remember(f"note {i} of run {ctx.run_id}", subject=ctx.run_id)
    with MARKS.open("a") as marks:  # remembered, not committed yet
        marks.write(ctx.run_id + "\\n")
    time.sleep(0.02 + ctx.random().random() * 0.3)
    return data

def second(ctx, data):
    return data
"""

NODE = """
import asyncio, sys
from pathlib import Path
from edgeos.agents.executor import Executor
from edgeos.runtime import ModelHost, ModelRegistry
from edgeos.state import Database
from edgeos.state.writer import GroupWriter

async def main(path, store):
    with Database(Path(path)) as db:
        host = ModelHost(ModelRegistry(db, Path(store)))
        writer = GroupWriter(db).start()
        ex = Executor(db, writer, host=host, scan_interval=0.05)
        await ex.start()
        for _ in range(200):
            await ex.submit("notes", data={})
            await asyncio.sleep(0.01)
        await asyncio.sleep(60)

asyncio.run(main(sys.argv[1], sys.argv[2]))
"""


def check_neither_or_both(db: Database) -> int:
    """Every committed step has its records and every record its committed step; returns
    how many runs committed their first step."""
    conn = db.reader()
    conn.execute("BEGIN")  # one snapshot: the node may be committing meanwhile
    try:
        return _check(conn)
    finally:
        conn.execute("COMMIT")


def _check(conn: Any) -> int:
    committed = {
        run_id: set(journal.load_payload(payload, conn)["remembered"])
        for run_id, payload in conn.execute(
            "SELECT run_id, payload FROM journal WHERE kind = 'memory_written'"
        )
    }
    stored: dict[str, set[str]] = {}
    for record_id, run_id in conn.execute("SELECT id, run_id FROM memory_records"):
        stored.setdefault(run_id, set()).add(record_id)
    assert stored == committed
    assert all(len(ids) == 3 for ids in stored.values())
    return len(committed)


def test_sigkill_between_memory_writes_and_commit_leaves_neither_or_both(
    db: Database, registry: ModelRegistry, host: ModelHost, tmp_path: Path
) -> None:
    install(db, tmp_path, CRASH_STEPS, budgets={"max_concurrent_runs": 16})
    marks = Path(store.agent(db, "notes").bundle_dir) / "marks.txt"
    log = tmp_path / "node.log"
    with log.open("wb") as errors:
        node = subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(NODE), str(db.path), str(registry.store)],
            stderr=errors,
        )
    try:
        deadline = time.monotonic() + 60
        while check_neither_or_both(db) < 20:
            assert node.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "the node committed too few steps"
            time.sleep(0.02)
    finally:
        os.kill(node.pid, signal.SIGKILL)
        node.wait()
    committed = check_neither_or_both(db)
    remembered = set(marks.read_text().split())
    # Steps that had remembered when the kill came, and never committed: nothing of them.
    cut = remembered - {r for (r,) in db.reader().execute("SELECT run_id FROM memory_records")}
    assert cut, "the kill did not land between a step's memory writes and its commit"

    async def resume() -> None:
        async with running(db, host) as ex:
            for run_id in store.active_run_ids(db):
                run = await ex.wait(run_id, timeout=60)
                assert run.state == "succeeded", run.error

    asyncio.run(resume())
    finished = check_neither_or_both(db)
    runs = db.reader().execute("SELECT count(*) FROM runs").fetchone()[0]
    assert finished == runs > committed  # each run remembered once, none twice


def test_misusing_memory_in_a_step_fails_the_run_at_once_and_writes_nothing(
    db: Database, host: ModelHost, tmp_path: Path
) -> None:
    code = """
def first(ctx, data):
    ctx.memory.remember("kept only if the step commits")
    ctx.memory.recall("anything", where={"colour": "red"})
    return data

def second(ctx, data):
    return data
"""
    install(db, tmp_path, code, retry={"max_attempts": 3, "base_delay": "10ms"})

    async def go() -> str:
        async with running(db, host) as ex:
            run_id = await ex.submit("notes", data={})
            run = await ex.wait(run_id)
            assert run.state == "failed"
            assert "unknown filter field 'colour'" in (run.error or "")
            return run_id

    run_id = asyncio.run(go())
    failures = [r for r in journal.for_run(db, run_id) if r.kind == "step_failed"]
    assert len(failures) == 1  # a StepError: not retried
    assert db.reader().execute("SELECT count(*) FROM memory_records").fetchone()[0] == 0


def test_the_executor_removes_expired_memory_on_its_retention_pass(
    db: Database, host: ModelHost, tmp_path: Path
) -> None:
    code = """
def first(ctx, data):
    ctx.memory.remember("a note that expires soon", ttl="1s")
    return data

def second(ctx, data):
    return data
"""
    install(db, tmp_path, code)

    async def go() -> None:
        writer = GroupWriter(db).start()
        ex = Executor(db, writer, host=host, scan_interval=0.05, retention_interval=0.2)
        await ex.start()
        try:
            await ex.wait(await ex.submit("notes", data={}))
            assert db.reader().execute("SELECT count(*) FROM memory_records").fetchone()[0] == 1
            for _ in range(100):  # the note expires after 1 s; a pass runs every 0.2 s
                await asyncio.sleep(0.05)
                if not db.reader().execute("SELECT count(*) FROM memory_records").fetchone()[0]:
                    return
            raise AssertionError("the expired note is still in the database")
        finally:
            await ex.stop()
            writer.stop()

    asyncio.run(go())
