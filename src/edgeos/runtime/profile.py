"""Profiling a model on this machine: latency across batch sizes, throughput, peak memory."""

from __future__ import annotations

import functools
import platform
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from edgeos.manifests import ModelManifest
from edgeos.protocol.datatypes import DATATYPES
from edgeos.runtime.host import ModelHost
from edgeos.telemetry.process import peak_rss_bytes, reset_peak_rss, rss_bytes
from edgeos.telemetry.stats import LatencySummary, time_calls

Array = np.ndarray[Any, Any]


@dataclass(frozen=True)
class BatchProfile:
    """Latency and throughput at one batch size."""

    batch_size: int
    latency: LatencySummary
    rows_per_second: float


@dataclass(frozen=True)
class ModelProfile:
    """A model version measured on this machine with the node's session options."""

    name: str
    version: str
    providers: list[str]
    intra_op_threads: int
    load_seconds: float
    peak_memory_bytes: int
    """Peak resident memory of the profiling process while the model ran."""
    added_memory_bytes: int
    """How far that peak rose above the resident memory before the model was loaded
    (memory the process had already freed and reused is not counted)."""
    batches: list[BatchProfile]
    machine: str
    created_at: float

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready form, as stored with the model."""
        return asdict(self)


def sample_inputs(manifest: ModelManifest, batch_size: int, seed: int = 0) -> dict[str, Array]:
    """Random inputs that fit the manifest, with dynamic dimensions set to ``batch_size``
    (first dimension) or 1 (others)."""
    rng = np.random.default_rng(seed)
    inputs: dict[str, Array] = {}
    for spec in manifest.inputs:
        shape = [d if d >= 0 else (batch_size if i == 0 else 1) for i, d in enumerate(spec.shape)]
        info = DATATYPES[spec.datatype]
        if spec.datatype == "BYTES":
            inputs[spec.name] = np.full(shape, b"edgeos", dtype=np.object_)
        elif info.numpy.kind == "f":
            inputs[spec.name] = rng.standard_normal(shape).astype(info.numpy)
        elif info.numpy.kind == "b":
            inputs[spec.name] = rng.integers(0, 2, shape).astype(np.bool_)
        else:
            inputs[spec.name] = rng.integers(0, 8, shape).astype(info.numpy)
    return inputs


def profile_model(
    host: ModelHost,
    name: str,
    version: str | None = None,
    *,
    batch_sizes: Sequence[int] = (1, 8, 32),
    iterations: int = 200,
    max_seconds_per_batch: float = 5.0,
) -> ModelProfile:
    """Load the model in ``host`` (fresh, so load time and memory are its own) and time it.

    Batch sizes other than 1 are skipped when the model's first input dimension is fixed.
    """
    manifest = host.resolve(name, version)
    host.unload(manifest.name, manifest.version)
    before = rss_bytes()
    reset_peak_rss()
    start = time.perf_counter()
    model = host.load(manifest.name, manifest.version)
    load_seconds = time.perf_counter() - start
    batchable = all(spec.shape and spec.shape[0] < 0 for spec in manifest.inputs)
    batches = []
    for size in batch_sizes if batchable else [1]:
        inputs = sample_inputs(manifest, size)
        samples = time_calls(
            functools.partial(model.run, inputs, model.output_names),
            iterations=iterations,
            max_seconds=max_seconds_per_batch,
        )
        latency = LatencySummary.of(samples)
        batches.append(BatchProfile(size, latency, size * 1000.0 / latency.mean_ms))
    return ModelProfile(
        name=manifest.name,
        version=manifest.version,
        providers=model.providers,
        intra_op_threads=host.config.intra_op_threads,
        load_seconds=load_seconds,
        peak_memory_bytes=peak_rss_bytes(),
        added_memory_bytes=max(0, peak_rss_bytes() - before),
        batches=batches,
        machine=f"{platform.machine()} {platform.processor() or ''}".strip(),
        created_at=time.time(),
    )
