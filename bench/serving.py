"""The edgeos V2 server against the KServe Python model server, on the same ONNX model.

Both serve the demo's stockout-risk model over the Open Inference Protocol (KServe V2)
REST API, one process each, and are driven in one run by the same ``tritonclient[http]``
load (JSON tensors, keep-alive connections) at concurrency 1, 8 and 32. Printed side by
side: throughput and p50/p99 latency, and each server's resident memory.

edgeos serves the model as it would on a device: its manifest turns on dynamic
micro-batching (``max_batch_size: 32``, no added queue delay), which only gathers requests
that are already waiting. KServe runs its Python server with one worker, as documented.

Goals: at least 1.5x KServe's throughput at concurrency 32 with a lower p99, and never
worse at concurrency 1.

    python bench/serving.py [--models var/demo-models] [--duration 10]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))

from edgeos.demo.train import INPUT_NAME, build_demo_models
from edgeos.manifests import BatchingSpec, ModelSpec, load_manifest
from edgeos.node.process import free_port
from edgeos.node.tokens import bearer, ensure_local_token
from edgeos.runtime import ModelRegistry
from edgeos.state import Database
from load import LoadResult, ensure_kserve_venv, infer_once, run_load, serve_process

MODEL = "stockout-risk"
HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def rss_mb(pid: int) -> float:
    """Resident memory of a process, from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def edgeos_node(
    model: Path, manifest: Path, data_dir: Path, port: int, max_batch: int
) -> tuple[list[str], dict[str, str]]:
    """Register the model (batching up to ``max_batch`` rows; 0: off): the command that
    serves it, and the headers that present the node's API token (made here, before the
    node's first start, so its readiness can be asked from the start)."""
    spec = load_manifest(manifest, ModelSpec)
    batching = BatchingSpec(max_batch_size=max_batch, max_queue_delay_ms=0) if max_batch else None
    spec = spec.model_copy(update={"batching": batching})
    with Database(data_dir / "node.db") as db:
        ModelRegistry(db, data_dir / "models").add(model, name=MODEL, manifest=spec)
    command = [
        sys.executable, "-m", "edgeos", "node", "run", "--data-dir", str(data_dir),
        "--port", str(port), "--host", "127.0.0.1",
    ]  # fmt: skip
    return command, bearer(ensure_local_token(data_dir))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=Path, default=ROOT / "var" / "demo-models")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per measurement")
    parser.add_argument("--concurrency", default="1,8,32")
    parser.add_argument("--kserve-venv", type=Path, default=ROOT / ".venv-kserve")
    parser.add_argument(
        "--max-batch", type=int, default=32, help="edgeos micro-batch size (0: no batching)"
    )
    args = parser.parse_args(argv)
    levels = [int(c) for c in args.concurrency.split(",")]
    console = Console()

    built = build_demo_models(args.models)
    model_file = built.models[MODEL]
    with np.load(built.eval_set) as data:
        row = data[INPUT_NAME][:1]
    expected = ort.InferenceSession(str(model_file), providers=["CPUExecutionProvider"]).run(
        None, {INPUT_NAME: row}
    )[0]
    kserve_python = ensure_kserve_venv(args.kserve_venv)

    with tempfile.TemporaryDirectory(prefix="edgeos-bench-") as tmp:
        e_port, k_port = free_port(), free_port()
        e_url, k_url = f"127.0.0.1:{e_port}", f"127.0.0.1:{k_port}"
        e_cmd, e_headers = edgeos_node(
            model_file, built.manifests[MODEL], Path(tmp) / "node", e_port, args.max_batch
        )
        k_cmd = [
            str(kserve_python), str(HERE / "kserve_peer.py"),
            "--model", str(model_file), "--name", MODEL, "--port", str(k_port),
        ]  # fmt: skip
        results: dict[str, dict[int, LoadResult]] = {"edgeos": {}, "kserve": {}}
        memory: dict[str, float] = {}
        headers = {"edgeos": e_headers, "kserve": {}}
        with (
            serve_process(e_cmd, e_url, MODEL, headers=e_headers) as e_proc,
            serve_process(k_cmd, k_url, MODEL) as k_proc,
        ):
            for name, url in (("edgeos", e_url), ("kserve", k_url)):
                got = infer_once(url, MODEL, {INPUT_NAME: row}, headers=headers[name])[
                    "probabilities"
                ]
                if not np.allclose(got, expected, rtol=1e-5, atol=1e-6):
                    raise SystemExit(f"{name} answered {got}, onnxruntime says {expected}")
            for level in levels:
                # Alternate who goes first so neither always gets the warmer machine.
                order = [("edgeos", e_url), ("kserve", k_url)]
                if level % 2:
                    order.reverse()
                for name, url in order:
                    with console.status(f"{name}: concurrency {level} for {args.duration:.0f} s"):
                        results[name][level] = run_load(
                            url, MODEL, {INPUT_NAME: row}, concurrency=level,
                            duration=args.duration, warmup=200, headers=headers[name],
                        )  # fmt: skip
            memory = {"edgeos": rss_mb(e_proc.pid), "kserve": rss_mb(k_proc.pid)}

    table = Table(
        "concurrency",
        "edgeos req/s", "KServe req/s", "ratio",
        "edgeos p50 ms", "KServe p50 ms", "edgeos p99 ms", "KServe p99 ms", "errors",
        title=f"V2 REST serving of {MODEL}: edgeos vs KServe 0.21 (same tritonclient load)",
    )  # fmt: skip
    for level in levels:
        e, k = results["edgeos"][level], results["kserve"][level]
        table.add_row(
            str(level),
            f"{e.throughput:,.0f}", f"{k.throughput:,.0f}", f"{e.throughput / k.throughput:.2f}x",
            f"{e.p50_ms:.2f}", f"{k.p50_ms:.2f}", f"{e.p99_ms:.2f}", f"{k.p99_ms:.2f}",
            f"{e.errors} / {k.errors}",
        )  # fmt: skip
    console.print(table)
    console.print(
        f"resident memory after the run: edgeos {memory['edgeos']:.0f} MB, "
        f"KServe {memory['kserve']:.0f} MB"
    )
    top = max(levels)
    e, k = results["edgeos"][top], results["kserve"][top]
    low = min(levels)
    goals = [
        (f"throughput at c={top} >= 1.5x KServe", e.throughput >= 1.5 * k.throughput),
        (f"p99 at c={top} lower than KServe", e.p99_ms < k.p99_ms),
        (
            f"throughput at c={low} not worse than KServe",
            results["edgeos"][low].throughput >= results["kserve"][low].throughput,
        ),
    ]
    for text, ok in goals:
        console.print(f"goal: {text} -> {'met' if ok else 'NOT met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
