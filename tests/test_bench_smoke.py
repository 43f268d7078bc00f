"""Smoke runs of the benchmarks: they run end to end and print their comparison."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from edgeos.demo.train import DemoModels

ROOT = Path(__file__).resolve().parents[1]


def run_bench(script: str, *args: str) -> str:
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / script), *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={"COLUMNS": "200", "PATH": "/usr/bin:/bin"},
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_runtime_overhead_bench(demo_models: DemoModels) -> None:
    out = run_bench("runtime_overhead.py", "--models", str(demo_models.out_dir), "--calls", "300")
    assert "bare ORT p50 us" in out
    assert "stockout-risk-xl" in out
    assert "goal: p50 overhead under 10%" in out


@pytest.mark.skipif(
    not (ROOT / ".venv-kserve" / "bin" / "python").exists(),
    reason="the KServe peer's virtualenv is made by the first `make bench`",
)
def test_serving_bench(demo_models: DemoModels) -> None:
    out = run_bench(
        "serving.py", "--models", str(demo_models.out_dir), "--duration", "0.5",
        "--concurrency", "1,4",
    )  # fmt: skip
    assert "edgeos req/s" in out
    assert "KServe req/s" in out
    assert "goal: throughput at c=4" in out


def test_fleet_scale_bench() -> None:
    out = run_bench(
        "fleet_scale.py", "--db", "sqlite", "--sizes", "20", "--interval", "1", "--window", "2"
    )
    assert "20 devices" in out
    assert "telemetry p99" in out
    assert "0 errors, telemetry" in out
    assert "KubeEdge (published)" in out
    assert "edgeos fleet on SQLite" in out


def test_durable_runs_bench() -> None:
    out = run_bench("durable_runs.py", "--runs", "40", "--concurrency", "4", "--skip-langgraph")
    assert "edgeos, 4 concurrent" in out
    assert "bare SQLite, a commit per step" in out
