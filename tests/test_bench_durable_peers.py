"""Smoke tests of the durable-runs benchmark's peers: bare SQLite and LangGraph."""

from __future__ import annotations

import importlib.util
import json
import sqlite3
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[1]
LANGGRAPH_PYTHON = ROOT / ".venv-langgraph" / "bin" / "python"

RESULT_KEYS = {
    "system",
    "runs",
    "seconds",
    "runs_per_second",
    "db_bytes",
    "bytes_per_run",
    "versions",
}


def _load_peers() -> ModuleType:
    # bench/ is a directory of scripts, not a package: load the file itself.
    spec = importlib.util.spec_from_file_location(
        "durable_peers", ROOT / "bench" / "durable_peers.py"
    )
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # typing.get_type_hints on its TypedDict looks it up here
    spec.loader.exec_module(module)
    return module


peers = _load_peers()


def journal_rows(db: Path) -> list[tuple[str, int, str]]:
    """(run_id, seq, kind) of every row, read through a new connection: only committed rows."""
    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT run_id, seq, kind FROM journal ORDER BY id").fetchall()
    conn.close()
    return rows


@pytest.mark.parametrize(("runs", "group"), [(12, 1), (11, 4)])
def test_bare_sqlite_commits_every_row(tmp_path: Path, runs: int, group: int) -> None:
    db = tmp_path / "bare.db"
    result = peers.bare_sqlite(runs, db, group=group)

    assert result.keys() >= RESULT_KEYS
    assert result["system"] == "bare-sqlite"
    assert result["runs"] == runs
    assert result["group"] == group
    assert result["runs_per_second"] > 0
    assert result["pragmas"] == {"journal_mode": "wal", "synchronous": "FULL"}
    assert result["db_bytes"] == db.stat().st_size  # the WAL was checkpointed into the file
    assert result["bytes_per_run"] == pytest.approx(result["db_bytes"] / runs, abs=0.1)
    # 6 phases per run; the last batch of 11 runs in groups of 4 has only 3.
    assert result["transactions_per_run"] == pytest.approx(6 * -(-runs // group) / runs, abs=1e-3)

    rows = journal_rows(db)
    assert len(rows) == runs * 6
    by_run: dict[str, list[tuple[int, str]]] = {}
    for run_id, seq, kind in rows:
        by_run.setdefault(run_id, []).append((seq, kind))
    assert sorted(by_run) == [peers.run_id(i) for i in range(runs)]
    expected = [(0, "started"), (1, "step"), (2, "step"), (3, "step"), (4, "step"), (5, "finished")]
    assert all(entries == expected for entries in by_run.values())


def test_bare_sqlite_step_payloads(tmp_path: Path) -> None:
    db = tmp_path / "bare.db"
    peers.bare_sqlite(2, db, steps=6)
    with sqlite3.connect(db) as conn:
        payloads = [
            json.loads(p)
            for (p,) in conn.execute(
                "SELECT payload FROM journal WHERE run_id = ? ORDER BY seq", (peers.run_id(1),)
            )
        ]
    conn.close()
    steps = [p["step"] for p in payloads[1:-1]]
    assert steps == ["sense", "reason", "act", "learn", "sense", "reason"]
    effect = payloads[3]["output"]["effects"][0]
    assert effect["kind"] == "reorder"
    assert effect["idempotency_key"] == f"{peers.run_id(1)}/act/0"
    assert payloads[-1]["status"] == "succeeded"
    assert len(payloads[1]["output"]["features"]) == len(peers.FEATURES)


def test_bare_sqlite_refuses_an_existing_file(tmp_path: Path) -> None:
    db = tmp_path / "bare.db"
    db.write_bytes(b"")
    with pytest.raises(FileExistsError):
        peers.bare_sqlite(1, db)


def test_bare_cli_prints_one_json_line(tmp_path: Path) -> None:
    db = tmp_path / "cli.db"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "durable_peers.py"), "bare", "--runs", "5",
         "--db", str(db), "--group", "2"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["runs"] == 5
    assert result["group"] == 2
    assert len(journal_rows(db)) == 5 * 6


@pytest.mark.skipif(
    not LANGGRAPH_PYTHON.exists(),
    reason="the LangGraph peer's virtualenv (.venv-langgraph) is created by the first `make bench`",
)
@pytest.mark.parametrize("threads", [1, 3])
def test_langgraph_peer(tmp_path: Path, threads: int) -> None:
    db = tmp_path / "langgraph.db"
    runs = 7
    result = peers.run_langgraph(LANGGRAPH_PYTHON, runs, db, threads=threads)

    assert result.keys() >= RESULT_KEYS
    assert result["system"] == "langgraph"
    assert result["runs"] == runs
    assert result["threads"] == threads
    assert result["runs_per_second"] > 0
    assert result["pragmas"] == {"journal_mode": "wal", "synchronous": "FULL"}
    assert result["versions"].keys() >= {"langgraph", "langgraph-checkpoint-sqlite"}
    with sqlite3.connect(db) as conn:
        stored = conn.execute("SELECT COUNT(DISTINCT thread_id) FROM checkpoints").fetchone()[0]
    conn.close()
    assert stored == runs
