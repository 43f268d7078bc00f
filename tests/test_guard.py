"""The resource guard against real models, a real database and a real filesystem."""

from __future__ import annotations

import logging
import sqlite3
from pathlib import Path

import numpy as np
import pytest

from edgeos.node.guard import MB, Budgets, ResourceGuard
from edgeos.runtime import HostConfig, ModelHost, ModelRegistry
from edgeos.state import Database
from edgeos.telemetry import MetricsRegistry
from tests import onnx_models


def test_usage_is_reported_by_part(db: Database, registry: ModelRegistry, mlp_file: Path) -> None:
    registry.add(mlp_file, name="risk")
    guard = ResourceGuard(db, db.path.parent, Budgets())
    usage, free = guard.measure()
    assert usage.disk["database"] > 0
    assert usage.disk["models"] == mlp_file.stat().st_size
    assert usage.memory["process"] > 10 * MB
    assert free > 0
    assert guard.check().actions == []  # no budget, nothing to do


def test_over_its_memory_budget_the_node_unloads_models_and_alerts(
    db: Database,
    registry: ModelRegistry,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    for i in range(3):
        registry.add(onnx_models.mlp(tmp_path / f"m{i}.onnx", seed=i), name=f"m{i}")
    host = ModelHost(registry, HostConfig())
    x = {"features": np.ones((1, 4), np.float32)}
    for i in range(3):
        host.infer(f"m{i}", x)
    metrics = MetricsRegistry()
    # A budget the process is already over: everything that can go goes, and it says so.
    guard = ResourceGuard(
        db, db.path.parent, Budgets(memory_bytes=16 * MB), host=host, metrics=metrics
    )
    with caplog.at_level(logging.WARNING, logger="edgeos.node.guard"):
        report = guard.check()
    host.close()
    assert [a for a in report.actions if a.startswith("unload")] == [
        "unload model m0:1", "unload model m1:1", "unload model m2:1",
    ]  # fmt: skip
    assert host.loaded() == []
    assert report.alerts
    assert "over the node's budget of 16 MB" in report.alerts[0]
    assert 'edgeos_node_guard_alerts_total{resource="memory"} 1' in metrics.render()
    assert any(r.levelno == logging.ERROR for r in caplog.records)


def test_near_its_disk_budget_the_node_prunes_checkpoints_and_compacts(
    db: Database, tmp_path: Path
) -> None:
    with db.transaction() as conn:
        conn.executemany(
            "INSERT INTO observations (agent, model, run_id, at, confidence, inputs) "
            "VALUES ('a', 'm', 'r', ?, 0.5, ?)",
            [(i, bytes(4096)) for i in range(3000)],
        )
    db.checkpoint()
    calls: list[float] = []
    guard = ResourceGuard(db, db.path.parent, Budgets(disk_bytes=1 * MB), retention=calls.append)
    before = guard.measure()[0].disk["database"]
    report = guard.check(now=123.0)
    assert calls == [123.0]
    assert "trimmed 2000 drift observations" in report.actions
    assert "checkpoint WAL" in report.actions
    # The pages the trimmed rows held go back to the filesystem, not only to SQLite.
    assert any(a.startswith("compacted the database by") for a in report.actions)
    assert report.usage.disk["database"] < 0.45 * before
    assert db.reader().execute("PRAGMA freelist_count").fetchone()[0] == 0
    kept = db.reader().execute("SELECT min(at), count(*) FROM observations").fetchone()
    assert kept == (2000, 1000)  # the latest 1,000, whole
    wal = db.path.with_name(db.path.name + "-wal")
    assert not wal.exists() or wal.stat().st_size == 0
    assert any("over its budget of 1 MB" in a for a in report.alerts)  # 1,000 rows are still 8 MB


def test_a_budget_too_small_to_start_is_refused(tmp_path: Path) -> None:
    from edgeos.errors import ConfigError
    from edgeos.settings import load_settings

    with pytest.raises(ConfigError, match="below the 64 MB a node needs to start"):
        load_settings({"data_dir": tmp_path, "memory_budget_mb": 32}, environ={})


def test_a_small_database_from_before_page_maps_gets_one_at_the_first_pass(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def older_database(path: Path) -> Database:
        # Older versions marked the file before anything else: no page map.
        path.parent.mkdir(parents=True)
        conn = sqlite3.connect(path)
        conn.execute(f"PRAGMA application_id={int.from_bytes(b'edgo', 'big')}")
        conn.close()
        return Database(path).open()

    db = older_database(tmp_path / "small" / "node.db")
    try:
        assert not db.has_page_map()
        guard = ResourceGuard(db, db.path.parent, Budgets())
        first = guard.check()
        assert [a for a in first.actions if a.startswith("gave the database a page map")]
        assert db.has_page_map()
        assert guard.check().actions == []  # once
    finally:
        db.close()
    # A large one is left to `edgeos node compact`: its rebuild would hold writes too long.
    monkeypatch.setattr("edgeos.node.guard.REBUILD_BELOW", 1024)
    db = older_database(tmp_path / "large" / "node.db")
    try:
        assert ResourceGuard(db, db.path.parent, Budgets()).check().actions == []
        assert not db.has_page_map()
    finally:
        db.close()
