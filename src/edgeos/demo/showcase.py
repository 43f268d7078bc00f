"""The demo a new user runs first: local models served by a real node, measured.

It builds the demo models if missing, registers them in a fresh node data directory,
quantizes them (keeping INT8 only where it pays), starts ``edgeos node run`` as a child
process, sends a burst of inferences over the Open Inference Protocol, prints p50/p99 per
model and version, and leaves the API up for a few seconds.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path

import httpx
import numpy as np
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from edgeos.demo.train import INPUT_NAME, LABELS, OUTPUT_NAME, build_demo_models
from edgeos.node import host_config
from edgeos.node.process import node_process
from edgeos.runtime import ModelRegistry
from edgeos.runtime.quantize import load_eval_set, quantize_model
from edgeos.settings import load_settings
from edgeos.state import Database
from edgeos.telemetry.stats import LatencySummary


def run_demo(
    models_dir: Path, *, requests: int = 300, linger: float = 5.0, console: Console
) -> None:
    """Run the demo end to end; every figure printed is measured in this run."""
    console.rule("[bold]edgeos demo: local models on this device")
    with console.status("building demo models (once)"):
        built = build_demo_models(models_dir)
    for name, m in built.metrics.items():
        console.print(
            f"model {name}: {m.parameters:,} parameters, held-out accuracy {m.accuracy:.1%}, "
            f"AUC {m.auc:.3f}"
        )
    data_dir = Path(tempfile.mkdtemp(prefix="edgeos-demo-"))
    try:
        _register(built.models, built.manifests, built.eval_set, data_dir, console)
        with node_process(data_dir) as node:
            console.print(f"node running at [bold]{node.url}[/] (data in {data_dir})")
            _burst(node.client(timeout=10.0), built.eval_set, requests, console)
            console.print(
                f"Open Inference Protocol API up at [bold]{node.url}/v2[/] for {linger:.0f} s "
                f'(try: curl -H "Authorization: Bearer $(cat {data_dir}/api-token)" '
                f"{node.url}/v2/models/stockout-risk)"
            )
            time.sleep(linger)
        console.print("node stopped cleanly")
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)


def _register(
    models: Mapping[str, Path],
    manifests: Mapping[str, Path],
    eval_path: Path,
    data_dir: Path,
    console: Console,
) -> None:
    settings = load_settings({"data_dir": data_dir})
    with Database(settings.database_path) as db:
        registry = ModelRegistry(db, settings.model_store)
        for name, path in models.items():
            record = registry.add(path, name=name, version="1", manifest=manifests[name])
            console.print(
                f"registered {record.name}:{record.version} ({record.size_bytes:,} bytes)"
            )
            eval_set = load_eval_set(eval_path, record)
            with console.status(f"quantizing {name} to INT8 and measuring both"):
                report = quantize_model(
                    registry, name, "1", eval_set=eval_set, config=host_config(settings)
                )
            verdict = (
                "[green]INT8 made default[/]"
                if report.made_default
                else "[yellow]FP32 stays default[/]: " + "; ".join(report.reasons)
            )
            delta = report.accuracy_delta
            console.print(
                f"  {name}:{report.version}: size x{report.size_ratio:.2f}, p50 "
                f"{report.fp32_latency.p50_ms:.3f} -> {report.int8_latency.p50_ms:.3f} ms, "
                f"accuracy {'n/a' if delta is None else f'{delta:+.2f} pts'}. {verdict}"
            )


def _burst(client: httpx.Client, eval_path: Path, requests: int, console: Console) -> None:
    with np.load(eval_path) as data:
        features, labels = data[INPUT_NAME], data["labels"]
    with client:
        targets = [
            (name, version)
            for name in ("stockout-risk", "stockout-risk-xl")
            for version in client.get(f"/v2/models/{name}").json()["versions"]
        ]
        defaults = {
            name: client.get(f"/v2/models/{name}/ready").json()["version"]
            for name in ("stockout-risk", "stockout-risk-xl")
        }
        table = Table(
            "model", "version", "default", "requests", "p50 ms", "p99 ms", "accuracy",
            title="Local inference over HTTP (Open Inference Protocol, JSON)",
        )  # fmt: skip
        with Progress(console=console, transient=True) as progress:
            task = progress.add_task("inference burst", total=requests * len(targets))
            for name, version in targets:
                latencies, correct = [], 0
                for i in range(requests):
                    row = features[i % len(features)]
                    body = {
                        "inputs": [
                            {
                                "name": INPUT_NAME,
                                "datatype": "FP32",
                                "shape": [1, len(row)],
                                "data": row.tolist(),
                            }
                        ]
                    }
                    start = time.perf_counter()
                    response = client.post(f"/v2/models/{name}/versions/{version}/infer", json=body)
                    latencies.append(time.perf_counter() - start)
                    response.raise_for_status()
                    out = next(o for o in response.json()["outputs"] if o["name"] == OUTPUT_NAME)
                    correct += int(np.argmax(out["data"]) == labels[i % len(labels)])
                    progress.advance(task)
                summary = LatencySummary.of(latencies)
                table.add_row(
                    name,
                    version,
                    "yes" if defaults[name] == version else "",
                    str(requests),
                    f"{summary.p50_ms:.2f}",
                    f"{summary.p99_ms:.2f}",
                    f"{correct / requests:.1%}",
                )
    console.print(table)
    console.print(f"classes: {', '.join(LABELS)}; latency is end to end, client to node and back")
