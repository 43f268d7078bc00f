"""What the edgeos model host adds to a bare ONNX Runtime call, on the demo models.

Both sides run the same model file in the same process with the same session options
(one intra-op thread, spinning off), on the same rows, interleaved in rounds so that
neither side gets a quieter machine. Printed side by side: p50 and p99 per call and the
ratio. Goal: under 10% overhead at p50 for the demo model.

    python bench/runtime_overhead.py [--models var/demo-models] [--calls 20000]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from edgeos.demo.train import INPUT_NAME, build_demo_models
from edgeos.runtime import HostConfig, ModelHost, ModelRegistry
from edgeos.runtime.sessions import create_session
from edgeos.state import Database
from edgeos.telemetry.stats import LatencySummary

GOAL = 0.10


def measure(models_dir: Path, calls: int, rounds: int, console: Console) -> list[dict[str, object]]:
    """Time both sides on every demo model; returns one row per model."""
    built = build_demo_models(models_dir)
    with np.load(built.eval_set) as data:
        rows = data[INPUT_NAME][:256]
    config = HostConfig()
    results = []
    with tempfile.TemporaryDirectory() as tmp, Database(Path(tmp) / "node.db") as db:
        registry = ModelRegistry(db, Path(tmp) / "models")
        host = ModelHost(registry, config)
        for name, path in built.models.items():
            registry.add(path, name=name)
            bare = create_session(path, config)
            host.load(name)
            inputs = [{INPUT_NAME: rows[i : i + 1]} for i in range(len(rows))]
            bare_times: list[float] = []
            host_times: list[float] = []
            per_round = max(1, calls // rounds)
            clock = time.perf_counter
            for _ in range(20):  # warm both
                bare.run(None, inputs[0])
                host.infer(name, inputs[0])
            for _ in range(rounds):
                for i in range(per_round):
                    x = inputs[i % len(inputs)]
                    t0 = clock()
                    bare.run(None, x)
                    t1 = clock()
                    host.infer(name, x)
                    t2 = clock()
                    bare_times.append(t1 - t0)
                    host_times.append(t2 - t1)
            b, h = LatencySummary.of(bare_times), LatencySummary.of(host_times)
            results.append({"model": name, "bare": b, "host": h})
        host.close()
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=Path, default=Path("var/demo-models"))
    parser.add_argument("--calls", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args(argv)
    console = Console()
    results = measure(args.models, args.calls, args.rounds, console)
    table = Table(
        "model", "bare ORT p50 us", "edgeos p50 us", "p50 overhead",
        "bare ORT p99 us", "edgeos p99 us", "p99 ratio",
        title="edgeos model host vs bare onnxruntime.InferenceSession.run (batch 1, same process)",
    )  # fmt: skip
    worst = 0.0
    for row in results:
        b, h = row["bare"], row["host"]
        assert isinstance(b, LatencySummary)
        assert isinstance(h, LatencySummary)
        overhead = h.p50_ms / b.p50_ms - 1
        worst = max(worst, overhead)
        table.add_row(
            str(row["model"]),
            f"{b.p50_ms * 1000:.2f}",
            f"{h.p50_ms * 1000:.2f}",
            f"{overhead:+.1%}",
            f"{b.p99_ms * 1000:.2f}",
            f"{h.p99_ms * 1000:.2f}",
            f"{h.p99_ms / b.p99_ms:.2f}x",
        )
    console.print(table)
    verdict = "met" if worst < GOAL else "NOT met"
    console.print(f"goal: p50 overhead under {GOAL:.0%} -> {verdict} (worst {worst:+.1%})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
