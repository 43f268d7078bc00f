"""``edgeos model ...``: the model registry, quantization and profiling."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from edgeos.cli.common import DataDirOption, console, node_settings, size, split_ref
from edgeos.node import host_config
from edgeos.runtime import ModelHost, ModelRegistry
from edgeos.settings import NodeSettings
from edgeos.state import Database

app = typer.Typer(help="Add, inspect, quantize and profile local models.", no_args_is_help=True)


@contextmanager
def _registry(data_dir: Path | None) -> Iterator[tuple[ModelRegistry, NodeSettings]]:
    settings = node_settings(data_dir)
    with Database(settings.database_path) as db:
        yield ModelRegistry(db, settings.model_store), settings


@app.command()
def add(
    file: Annotated[
        Path, typer.Argument(help="The ONNX model file, or a generative model's directory.")
    ],
    name: Annotated[str | None, typer.Option(help="Model name (default: file name).")] = None,
    version: Annotated[str | None, typer.Option(help="Version (default: next number).")] = None,
    manifest: Annotated[
        Path | None, typer.Option(help="Manifest YAML: task, labels, cost, privacy, ...")
    ] = None,
    default: Annotated[
        bool | None, typer.Option("--default/--no-default", help="Make it the default version.")
    ] = None,
    data_dir: DataDirOption = None,
) -> None:
    """Validate a model and register it as a new version.

    A directory is a generative model (ONNX Runtime GenAI's layout, see docs/genai.md): it
    is checked whole, weights, tokenizer and memory budget, before anything is stored.
    """
    if file.is_dir():
        from edgeos.runtime.genai_store import register_generative

        with _registry(data_dir) as (registry, _):
            model = register_generative(
                registry, file, name=name, version=version, manifest=manifest,
                make_default=default,
            )  # fmt: skip
        console.print(
            f"added generative [bold]{model.name}:{model.version}[/] "
            f"({size(model.size_bytes)}, sha256 {model.sha256[:12]})"
        )
        return
    with _registry(data_dir) as (registry, _):
        record = registry.add(
            file, name=name, version=version, manifest=manifest, make_default=default
        )
    console.print(
        f"added [bold]{record.name}:{record.version}[/] ({size(record.size_bytes)}, "
        f"opset {record.opset}, sha256 {record.sha256[:12]})"
    )


@app.command("list")
def list_models(data_dir: DataDirOption = None) -> None:
    """List registered models and versions."""
    with _registry(data_dir) as (registry, _):
        rows = registry.catalog()
    table = Table("name", "version", "default", "task", "size", "quantization", "privacy")
    for manifest, is_default in rows:
        table.add_row(
            manifest.name,
            manifest.version,
            "yes" if is_default else "",
            manifest.task,
            size(manifest.size_bytes),
            manifest.quantization or "",
            manifest.privacy,
        )
    console.print(table if rows else "no models registered")


@app.command()
def show(
    ref: Annotated[str, typer.Argument(help="NAME or NAME:VERSION.")],
    data_dir: DataDirOption = None,
) -> None:
    """Show a model version's manifest and stored profile as YAML."""
    import yaml

    name, version = split_ref(ref)
    with _registry(data_dir) as (registry, _):
        manifest = registry.get(name, version)
        doc = manifest.model_dump(mode="json")
        doc["default"] = registry.default_version(name) == manifest.version
        profile = registry.profile(manifest.name, manifest.version)
    if profile is not None:
        doc["profile"] = profile
    console.print(yaml.safe_dump(doc, sort_keys=False), highlight=False, end="")


@app.command()
def remove(
    ref: Annotated[str, typer.Argument(help="NAME (every version) or NAME:VERSION.")],
    data_dir: DataDirOption = None,
) -> None:
    """Remove one version, or every version of a model."""
    name, version = split_ref(ref)
    with _registry(data_dir) as (registry, _):
        removed = registry.remove(name, version)
    for manifest in removed:
        console.print(f"removed {manifest.name}:{manifest.version}")


@app.command("default")
def set_default(
    ref: Annotated[str, typer.Argument(help="NAME:VERSION to serve by default.")],
    data_dir: DataDirOption = None,
) -> None:
    """Choose the version served when a caller names none."""
    name, version = split_ref(ref)
    if version is None:
        raise typer.BadParameter("give NAME:VERSION")
    with _registry(data_dir) as (registry, _):
        registry.set_default(name, version)
    console.print(f"{name}:{version} is now the default")


@app.command()
def quantize(
    ref: Annotated[str, typer.Argument(help="NAME or NAME:VERSION (FP32) to quantize.")],
    mode: Annotated[str, typer.Option(help="static (QDQ S8S8, calibrated) or dynamic.")] = (
        "static"
    ),
    eval_data: Annotated[
        Path | None,
        typer.Option("--eval", help=".npz with one array per input and optional 'labels'."),
    ] = None,
    max_accuracy_drop: Annotated[
        float, typer.Option(help="Most accuracy points INT8 may lose and still be default.")
    ] = 1.0,
    data_dir: DataDirOption = None,
) -> None:
    """Make an INT8 version; it becomes default only if faster here and accurate enough."""
    from edgeos.runtime.quantize import load_eval_set, quantize_model

    if mode not in ("static", "dynamic"):
        raise typer.BadParameter("use static or dynamic", param_hint="--mode")
    name, version = split_ref(ref)
    with _registry(data_dir) as (registry, settings):
        source = registry.get(name, version)
        eval_set = load_eval_set(eval_data, source) if eval_data else None
        with console.status(f"quantizing {source.name}:{source.version} ({mode})"):
            report = quantize_model(
                registry,
                name,
                source.version,
                mode="static" if mode == "static" else "dynamic",
                eval_set=eval_set,
                max_accuracy_drop=max_accuracy_drop,
                config=host_config(settings),
            )
    table = Table("", f"FP32 {report.source_version}", f"INT8 {report.version}", title=name)
    table.add_row("size", size(report.fp32_bytes), size(report.int8_bytes))
    table.add_row(
        "p50 ms", f"{report.fp32_latency.p50_ms:.3f}", f"{report.int8_latency.p50_ms:.3f}"
    )
    table.add_row(
        "p99 ms", f"{report.fp32_latency.p99_ms:.3f}", f"{report.int8_latency.p99_ms:.3f}"
    )
    if report.fp32_accuracy is not None and report.int8_accuracy is not None:
        table.add_row("accuracy", f"{report.fp32_accuracy:.2%}", f"{report.int8_accuracy:.2%}")
    table.add_row("agreement", "", f"{report.agreement:.2%}")
    console.print(table)
    console.print(f"size ratio {report.size_ratio:.2f}")
    if report.made_default:
        console.print(f"[green]{name}:{report.version} is now the default[/]")
    else:
        console.print(f"[yellow]{name}:{report.version} registered but not made default:[/]")
        for reason in report.reasons:
            console.print(f"  - {reason}")


@app.command()
def profile(
    ref: Annotated[str, typer.Argument(help="NAME or NAME:VERSION.")],
    batch_sizes: Annotated[str, typer.Option(help="Comma-separated batch sizes.")] = "1,8,32",
    iterations: Annotated[int, typer.Option(help="Timed runs per batch size.")] = 200,
    data_dir: DataDirOption = None,
) -> None:
    """Measure latency, throughput and peak memory here, and store it with the model."""
    from edgeos.runtime.profile import profile_model

    try:
        sizes = [int(part) for part in batch_sizes.split(",") if part.strip()]
    except ValueError as exc:
        raise typer.BadParameter("use whole numbers", param_hint="--batch-sizes") from exc
    if not sizes or min(sizes) < 1:
        raise typer.BadParameter("use whole numbers of 1 or more", param_hint="--batch-sizes")
    name, version = split_ref(ref)
    with _registry(data_dir) as (registry, settings):
        host = ModelHost(registry, host_config(settings))
        try:
            with console.status(f"profiling {ref}"):
                result = profile_model(
                    host, name, version, batch_sizes=sizes, iterations=iterations
                )
        finally:
            host.close()
        registry.save_profile(result.name, result.version, result.to_dict())
    table = Table(
        "batch", "p50 ms", "p95 ms", "p99 ms", "max ms", "rows/s",
        title=f"{result.name}:{result.version} on {', '.join(result.providers)}",
    )  # fmt: skip
    for b in result.batches:
        lat = b.latency
        table.add_row(
            str(b.batch_size),
            f"{lat.p50_ms:.3f}",
            f"{lat.p95_ms:.3f}",
            f"{lat.p99_ms:.3f}",
            f"{lat.max_ms:.3f}",
            f"{b.rows_per_second:,.0f}",
        )
    console.print(table)
    console.print(
        f"load {result.load_seconds * 1000:.1f} ms, peak resident memory "
        f"{size(result.peak_memory_bytes)} (+{size(result.added_memory_bytes)} for this model)"
    )
