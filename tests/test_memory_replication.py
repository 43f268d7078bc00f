"""Replication of long-term memory through the change log: complete, idempotent, resumable
after a kill or a torn write, erasures reach the replica, and a replacement node restores
another's memory."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from edgeos.errors import InvalidRequestError
from edgeos.manifests.agent import Memory
from edgeos.memory import replication
from edgeos.memory.handle import AgentMemory
from edgeos.memory.replication import FileTarget, restore, sync
from edgeos.runtime import ModelHost, ModelRegistry
from edgeos.state import Database
from tests.memory_support import register

CONFIG = Memory(embedding_model="hash-embed", fields=["supplier"])


def fill(db: Database, host: ModelHost, count: int, *, subject: str = "s") -> list[str]:
    m = AgentMemory(db, host, "notes", CONFIG)
    ids = [
        m.remember(f"note {i} about {subject}", {"supplier": f"x{i % 3}"}, subject=subject)
        for i in range(count)
    ]
    m.commit()
    return ids


def live(db: Database) -> dict[str, tuple[str, bytes]]:
    rows = db.reader().execute(
        "SELECT r.id, r.text, v.vector FROM memory_records r JOIN memory_vectors v USING (seq)"
    )
    return {i: (t, bytes(v)) for i, t, v in rows}


def log_seqs(db: Database) -> list[int]:
    return [s for (s,) in db.reader().execute("SELECT seq FROM memory_changes ORDER BY seq")]


def test_sync_ships_everything_once_and_a_replacement_restores_it(
    db: Database, host: ModelHost, tmp_path: Path, model_dir: Path
) -> None:
    fill(db, host, 30)
    target = FileTarget(tmp_path / "replica")
    done = sync(db, target, "node-a", batch=7)
    assert (done.shipped, done.position) == (30, log_seqs(db)[-1])
    again = sync(db, target, "node-a")
    assert again.shipped == 0  # nothing new: nothing shipped twice
    seqs = [c["seq"] for c in target.changes("node-a")]
    assert seqs == sorted(set(seqs)) == log_seqs(db)

    with Database(tmp_path / "new" / "node.db") as fresh:
        assert restore(fresh, target, "node-a") == 30
        assert restore(fresh, target, "node-a") == 0  # repeatable
        assert live(fresh) == live(db)
        registry = ModelRegistry(fresh, tmp_path / "new" / "models")
        new_host = register(registry, model_dir / "hash-embed.onnx")
        found = AgentMemory(fresh, new_host, "notes", CONFIG).recall("note 7 about s", k=1)
        assert found[0].text == "note 7 about s"
        new_host.close()


def test_applying_a_batch_twice_changes_nothing(
    db: Database, host: ModelHost, tmp_path: Path
) -> None:
    fill(db, host, 5)
    target = FileTarget(tmp_path / "replica")
    batch = replication.pending(db, 0)
    assert target.apply("n", batch) == batch[-1].seq
    assert target.apply("n", batch) == batch[-1].seq
    assert len(target.changes("n")) == 5


def test_erasure_reaches_the_replica(db: Database, host: ModelHost, tmp_path: Path) -> None:
    fill(db, host, 5, subject="alice-SECRET")
    keep = fill(db, host, 3, subject="bob")
    target = FileTarget(tmp_path / "replica")
    sync(db, target, "node-a")
    m = AgentMemory(db, host, "notes", CONFIG)
    m.forget(subject="alice-SECRET")
    m.commit()
    sync(db, target, "node-a")
    assert sorted(r["id"] for r in target.records("node-a")) == sorted(keep)
    for segment in (tmp_path / "replica" / "node-a").glob("*.jsonl"):
        assert b"alice-SECRET" not in segment.read_bytes()


def test_a_torn_last_line_is_cut_and_shipped_again(
    db: Database, host: ModelHost, tmp_path: Path
) -> None:
    fill(db, host, 10)
    target = FileTarget(tmp_path / "replica")
    sync(db, target, "node-a")
    segment = sorted((tmp_path / "replica" / "node-a").glob("*.jsonl"))[-1]
    lines = segment.read_bytes().splitlines(keepends=True)
    # A kill in the middle of writing the last line: half of it is on disk.
    segment.write_bytes(b"".join(lines[:-1]) + lines[-1][:25])
    assert target.position("node-a") == log_seqs(db)[-2]
    assert sync(db, target, "node-a").shipped == 1
    assert [c["seq"] for c in target.changes("node-a")] == log_seqs(db)


SYNC = """
import sys, time
from pathlib import Path
from edgeos.memory.replication import FileTarget, sync
from edgeos.state import Database

class Slow(FileTarget):
    def apply(self, node, changes):
        position = super().apply(node, changes)
        print(position, flush=True)
        time.sleep(0.05)
        return position

with Database(Path(sys.argv[1])) as db:
    sync(db, Slow(Path(sys.argv[2])), "node-a", batch=20)
"""


def test_a_sync_killed_midway_resumes_without_duplicates(
    db: Database, host: ModelHost, tmp_path: Path
) -> None:
    fill(db, host, 400)
    replica = tmp_path / "replica"
    with subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(SYNC), str(db.path), str(replica)],
        stdout=subprocess.PIPE,
    ) as child:
        assert child.stdout is not None
        for _ in range(3):  # three batches applied, then the kill
            assert child.stdout.readline()
        os.kill(child.pid, signal.SIGKILL)
    target = FileTarget(replica)
    shipped_before = len(target.changes("node-a"))
    assert 60 <= shipped_before < 400
    done = sync(db, target, "node-a")
    assert done.shipped == 400 - shipped_before
    seqs = [c["seq"] for c in target.changes("node-a")]
    assert seqs == sorted(set(seqs)) == log_seqs(db)


def test_a_target_behind_the_pruned_log_gets_a_snapshot(
    db: Database, host: ModelHost, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(replication, "KEEP_ENTRIES", 0)
    ids = fill(db, host, 12)
    m = AgentMemory(db, host, "notes", CONFIG)
    m.forget(id=ids[0])
    m.commit()
    first = FileTarget(tmp_path / "first")
    sync(db, first, "node-a")
    assert log_seqs(db) == []  # every registered target had it all: pruned
    fill(db, host, 2)
    late = FileTarget(tmp_path / "late")
    started = time.monotonic()
    done = sync(db, late, "node-a")
    assert done.snapshot
    assert sorted(r["id"] for r in late.records("node-a")) == sorted(live(db))
    assert time.monotonic() - started < 5
    assert sync(db, first, "node-a").shipped > 0  # the first target follows on


def test_node_ids_are_checked(db: Database, tmp_path: Path) -> None:
    with pytest.raises(InvalidRequestError, match="node id"):
        sync(db, FileTarget(tmp_path), "../elsewhere")
