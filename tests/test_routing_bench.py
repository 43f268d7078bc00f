"""A smoke run of bench/routing.py: four strategies side by side over an open-loop stream,
link drops, no leak."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from edgeos.demo.train import DemoModels

ROOT = Path(__file__).resolve().parents[1]


def test_routing_bench_runs_and_keeps_local_only_data_home(demo_models: DemoModels) -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "routing.py"), "--models", str(demo_models.out_dir),
         "--tasks", "60", "--wan-ms", "5", "--down-every", "20", "--down-for", "5",
         "--rate", "200", "--workers", "2", "--connections", "8"],
        capture_output=True, text=True, timeout=240, env={"COLUMNS": "200", "PATH": "/usr/bin:/bin"},
        cwd=ROOT,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    for strategy in ("all-edge", "all-cloud", "cascade (confidence only)", "edgeos"):
        assert strategy in out
    assert "local-only to cloud" in out
    assert "decision overhead" in out
    assert "link down for 15 tasks, 2 workers, 8 connections" in out
    assert "goal: no privacy violation: 0 local-only tasks sent to the cloud, met" in out

    def row(name: str) -> list[str]:
        line = next(line for line in out.splitlines() if line.startswith(f"│ {name} "))
        return [cell.strip() for cell in line.strip("│ ").split("│")]

    # Columns from the end: no answer, to cloud, local-only to cloud.
    assert row("edgeos")[-1] == "0"
    assert row("edgeos")[-3] == "0"  # the drops cost edgeos no answer
    assert row("all-cloud")[-3] == "15"  # all-cloud had none while the link was down
