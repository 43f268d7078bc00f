"""Re-embedding memory when the embedding model changes: recall never mixes vectors of two
models, the old records are embedded again in batches, in the background, resuming after
a restart, with the progress in ``edgeos memory stats``. Two real models: the hashing
model (128 dimensions) and all-MiniLM-L6-v2 (384)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import orjson
import pytest
from typer.testing import CliRunner

from edgeos.agents import manage
from edgeos.agents.executor import Executor
from edgeos.cli.main import app
from edgeos.demo.knowledge import NOTES, PARAPHRASES
from edgeos.manifests.agent import Memory
from edgeos.memory.export import build_hashing, write_model
from edgeos.memory.handle import AgentMemory
from edgeos.memory.reembed import reembed_batch
from edgeos.runtime import ModelHost, ModelRegistry
from edgeos.state import Database
from edgeos.state.writer import GroupWriter
from tests.memory_support import make_bundle, minilm_model, register

runner = CliRunner()
FIELDS = ["kind", "sku"]
OLD = Memory.model_validate({"embedding_model": "hash-embed", "fields": FIELDS})
NEW = Memory.model_validate({"embedding_model": "all-minilm-l6-v2", "fields": FIELDS})


@pytest.fixture(scope="module")
def minilm_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return minilm_model(tmp_path_factory.mktemp("minilm"))


@pytest.fixture
def two_models(registry: ModelRegistry, model_dir: Path, minilm_file: Path) -> ModelHost:
    host = register(registry, model_dir / "hash-embed.onnx")
    registry.add(minilm_file, manifest=minilm_file.with_suffix(".yaml"))
    return host


def rows(db: Database) -> list[tuple[str, str, int]]:
    """(id, model, vector bytes) of every record, oldest first."""
    return (
        db.reader()
        .execute(
            "SELECT r.id, r.model, length(v.vector) FROM memory_records r "
            "JOIN memory_vectors v ON v.seq = r.seq ORDER BY r.seq"
        )
        .fetchall()
    )


def stats(db: Database) -> str:
    result = runner.invoke(app, ["memory", "stats", "--data-dir", str(db.path.parent)])
    assert result.exit_code == 0, result.output
    return " ".join(result.output.split())


def test_a_new_model_embeds_memory_again_and_recall_never_mixes_models(
    db: Database, two_models: ModelHost, tmp_path: Path
) -> None:
    host = two_models
    old = AgentMemory(db, host, "notes", OLD)
    ids = [old.remember(n.text, n.metadata, subject=n.subject) for n in NOTES]
    old.commit()
    hash_key = old.model().key
    assert {model for _, model, _ in rows(db)} == {hash_key}

    # The agent now names MiniLM: until its records are embedded again, recall finds
    # nothing rather than compare MiniLM queries with hashing vectors, and says why.
    new = AgentMemory(db, host, "notes", NEW)
    minilm_key = new.model().key
    assert new.recall("which customer cannot drink regular milk?", k=3) == []
    assert new.outdated() == len(NOTES)

    # One batch (as a node stopped after its first one would leave it).
    progress = reembed_batch(db, host, "notes", NEW, batch=5)
    assert (progress.done, progress.total, progress.left, progress.embedded) == (5, 12, 7, 5)
    assert [(m, size) for _, m, size in rows(db)] == [(minilm_key, 384 * 4)] * 5 + [
        (hash_key, 128 * 4)
    ] * 7
    # Each model's recall sees its own records only.
    seen_new = {r.id for r in new.recall("supplier deliveries", k=12)}
    seen_old = {r.id for r in old.recall("supplier deliveries", k=12)}
    assert (seen_new, seen_old) == (set(ids[:5]), set(ids[5:]))
    assert f"again with {minilm_key} (384 dimensions): 5/12 records done" in stats(db)
    assert "recall does not see the 7 left yet" in stats(db)
    # The agent's search on the command line says what it did not search.
    bundle = make_bundle(
        tmp_path, "def first(ctx, data):\n    return data\n", steps=["first"],
        memory={"embedding_model": "all-minilm-l6-v2", "fields": FIELDS},
    )  # fmt: skip
    manage.add_agent(db, bundle, tmp_path / "agents", models=[], connectors=[])
    searched = runner.invoke(
        app, ["memory", "search", "notes", "oat milk", "--data-dir", str(db.path.parent)]
    )
    assert searched.exit_code == 0, searched.output
    assert "7 record(s) of another embedding model were not searched" in searched.output
    host.close()

    # A restart: the node's executor finds what is left and finishes it in the background.
    restarted = ModelHost(ModelRegistry(db, db.path.parent / "models"))

    async def node() -> None:
        writer = GroupWriter(db).start()
        ex = Executor(db, writer, host=restarted, scan_interval=0.02)
        await ex.start()
        try:
            deadline = time.monotonic() + 30
            while AgentMemory(db, restarted, "notes", NEW).outdated():
                assert time.monotonic() < deadline, "memory was not embedded again"
                await asyncio.sleep(0.05)
        finally:
            await ex.stop()
            writer.stop()

    try:
        asyncio.run(node())
        assert [(i, m, size) for i, m, size in rows(db)] == [(i, minilm_key, 384 * 4) for i in ids]
        assert f"all memory embedded with {minilm_key} (384 dimensions)" in stats(db)
        # The sizes the caps count followed the vectors.
        conn = db.reader()
        usage = conn.execute("SELECT records, bytes FROM memory_usage").fetchone()
        assert usage == conn.execute("SELECT count(*), sum(bytes) FROM memory_records").fetchone()
        expected = sum(
            len(n.text.encode()) + len(orjson.dumps(n.metadata))
            + len((n.subject or "").encode()) + 384 * 4
            for n in NOTES
        )  # fmt: skip
        assert usage == (len(NOTES), expected)
        # Each record is logged as put again: indexes and replicas take the new vectors.
        puts = conn.execute("SELECT count(*) FROM memory_changes WHERE op = 'put'").fetchone()
        assert puts[0] == 2 * len(NOTES)

        # Recall by meaning works on the new vectors: the paraphrases find their notes.
        memory = AgentMemory(db, restarted, "notes", NEW)
        key_of = dict(zip(ids, (n.key for n in NOTES), strict=True))
        for query, expected_key in PARAPHRASES.items():
            found = [key_of[r.id] for r in memory.recall(query, k=3)]
            assert expected_key in found, (query, found)
        assert old.recall("supplier deliveries", k=12) == []  # nothing left of the old model
    finally:
        restarted.close()


def test_a_new_default_version_of_the_same_model_counts_as_a_change(
    db: Database, registry: ModelRegistry, model_dir: Path, tmp_path: Path
) -> None:
    host = register(registry, model_dir / "hash-embed.onnx")
    try:
        memory = AgentMemory(db, host, "notes", OLD)
        first = memory.remember("Acme delivers milk on tuesdays")
        memory.commit()
        v1 = memory.model().key
        # Version 2 of hash-embed: other weights, 64 dimensions, made the default.
        v2_file = write_model(build_hashing(dim=64, seed=1), tmp_path / "v2" / "hash-embed.onnx")
        registry.add(v2_file, version="2", manifest=v2_file.with_suffix(".yaml"),
                     make_default=True)  # fmt: skip
        memory = AgentMemory(db, host, "notes", OLD)
        assert memory.model().key == "hash-embed@2" != v1
        assert memory.recall("milk", k=1) == []
        assert memory.outdated() == 1
        progress = reembed_batch(db, host, "notes", OLD)
        assert (progress.done, progress.total, progress.left) == (1, 1, 0)
        assert [r.id for r in memory.recall("milk", k=1)] == [first]
        assert rows(db) == [(first, "hash-embed@2", 64 * 4)]
    finally:
        host.close()
