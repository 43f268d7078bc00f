"""The model host: ONNX Runtime sessions for registered models, under a memory budget.

Sessions are created with explicit options (thread counts, spinning off, execution
providers from configuration), warmed up at load, and shared by concurrent callers
(``InferenceSession.run`` is thread-safe). When loading a model would exceed the memory
budget, the least recently used models are unloaded first.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from edgeos.errors import EdgeOSError, InvalidModelError, InvalidRequestError, ResourceError
from edgeos.manifests import ModelManifest
from edgeos.protocol.datatypes import DATATYPES, from_numpy
from edgeos.runtime.batcher import MicroBatcher
from edgeos.runtime.registry import ModelRegistry
from edgeos.runtime.sessions import HostConfig, create_session
from edgeos.telemetry import MetricsRegistry

if TYPE_CHECKING:
    import onnxruntime as ort

Array = np.ndarray[Any, Any]


@dataclass(frozen=True)
class InferenceResult:
    """Outputs of one call, with the version that produced them."""

    model: str
    version: str
    outputs: dict[str, Array]
    latency_s: float


class LoadedModel:
    """A model version with its live ONNX Runtime session."""

    def __init__(self, manifest: ModelManifest, session: ort.InferenceSession) -> None:
        self.manifest = manifest
        self.session = session
        self.providers: list[str] = list(session.get_providers())
        self.output_names = [o.name for o in manifest.outputs]
        self.loaded_at = time.time()
        self.batcher: MicroBatcher | None = None

    @property
    def key(self) -> tuple[str, str]:
        """(name, version)."""
        return (self.manifest.name, self.manifest.version)

    @property
    def size_bytes(self) -> int:
        """What the model counts against the memory budget: its weights."""
        return self.manifest.size_bytes

    def run(self, inputs: Mapping[str, Array], outputs: Sequence[str]) -> list[Array]:
        """Run the session directly (thread-safe)."""
        return list(self.session.run(list(outputs), dict(inputs)))


class ModelHost:
    """Loads, serves and unloads the registry's models. Sync and async APIs."""

    def __init__(
        self,
        registry: ModelRegistry,
        config: HostConfig | None = None,
        metrics: MetricsRegistry | None = None,
    ) -> None:
        self.registry = registry
        self.config = config or HostConfig()
        self._loaded: OrderedDict[tuple[str, str], LoadedModel] = OrderedDict()
        self._lock = threading.RLock()
        self._load_locks: dict[tuple[str, str], threading.Lock] = {}
        self._defaults: dict[str, str] = {}
        self._data_version = -1
        self._executor = ThreadPoolExecutor(
            max_workers=self.config.inference_threads, thread_name_prefix="edgeos-infer"
        )
        metrics = metrics or MetricsRegistry()
        labels = ("model", "version")
        self._requests = metrics.counter(
            "edgeos_inference_requests_total", "Inference requests per model version.", labels
        )
        self._errors = metrics.counter(
            "edgeos_inference_errors_total", "Failed inference requests per model version.", labels
        )
        self._latency = metrics.histogram(
            "edgeos_inference_latency_seconds",
            "Model run latency per model version, in seconds.",
            labels,
        )

    # -- loading ----------------------------------------------------------------------
    def resolve(self, name: str, version: str | None = None) -> ModelManifest:
        """The manifest a call to (name, version) is served by; default version if None."""
        self._refresh()
        if version is None:
            version = self._defaults.get(name)
        if version is not None:
            loaded = self._loaded.get((name, version))
            if loaded is not None:
                return loaded.manifest
        manifest = self.registry.get(name, version)
        if version is None:
            self._defaults[name] = manifest.version
        return manifest

    def load(self, name: str, version: str | None = None) -> LoadedModel:
        """Load a model version (default version if None), evicting others if needed."""
        manifest = self.resolve(name, version)
        key = (manifest.name, manifest.version)
        loaded = self._touch(key)
        if loaded is not None:
            return loaded
        with self._lock:
            load_lock = self._load_locks.setdefault(key, threading.Lock())
        with load_lock:
            loaded = self._touch(key)
            if loaded is not None:
                return loaded
            self._make_room(manifest)
            loaded = LoadedModel(manifest, self._session(manifest))
            if manifest.batching is not None:
                loaded.batcher = MicroBatcher(loaded.run, manifest.batching, self._executor)
            if self.config.warmup:
                self._warm_up(loaded)
            with self._lock:
                self._loaded[key] = loaded
        return loaded

    def unload(self, name: str, version: str) -> bool:
        """Drop a loaded model; in-flight calls finish on the session they hold."""
        with self._lock:
            return self._loaded.pop((name, version), None) is not None

    def loaded(self) -> list[LoadedModel]:
        """Loaded models, least recently used first."""
        self._refresh()
        with self._lock:
            return list(self._loaded.values())

    def memory_used(self) -> int:
        """Bytes of the memory budget taken by loaded models."""
        return sum(m.size_bytes for m in self.loaded())

    # -- inference --------------------------------------------------------------------
    def infer(
        self,
        name: str,
        inputs: Mapping[str, Any],
        *,
        version: str | None = None,
        outputs: Sequence[str] | None = None,
    ) -> InferenceResult:
        """Run a model on the calling thread."""
        start = time.perf_counter()
        labels = (name, version or "")
        try:
            model = self.load(name, version)
            labels = model.key
            arrays, wanted = self.prepare(model.manifest, inputs, outputs)
            results = model.run(arrays, wanted)
        except EdgeOSError:
            self._errors.inc(*labels)
            raise
        return self._finish(model, wanted, results, start)

    async def infer_async(
        self,
        name: str,
        inputs: Mapping[str, Any],
        *,
        version: str | None = None,
        outputs: Sequence[str] | None = None,
    ) -> InferenceResult:
        """Run a model without blocking the event loop; uses the model's batcher if any."""
        start = time.perf_counter()
        labels = (name, version or "")
        loop = asyncio.get_running_loop()
        try:
            manifest = self.resolve(name, version)
            labels = (manifest.name, manifest.version)
            model = self._touch(labels)
            if model is None:
                model = await loop.run_in_executor(
                    self._executor, self.load, manifest.name, manifest.version
                )
            arrays, wanted = self.prepare(model.manifest, inputs, outputs)
            if model.batcher is not None:
                results = await model.batcher.submit(arrays, wanted)
            else:
                results = await loop.run_in_executor(self._executor, model.run, arrays, wanted)
        except EdgeOSError:
            self._errors.inc(*labels)
            raise
        return self._finish(model, wanted, results, start)

    def record_error(self, name: str, version: str) -> None:
        """Count a failed request that ended before reaching the host (e.g. a bad body)."""
        self._errors.inc(name, version)

    def prepare(
        self,
        manifest: ModelManifest,
        inputs: Mapping[str, Any],
        outputs: Sequence[str] | None,
    ) -> tuple[dict[str, Array], list[str]]:
        """Check inputs and requested outputs against the manifest; return run arguments."""
        where = f"model '{manifest.name}' version '{manifest.version}'"
        unknown = sorted(set(inputs) - {t.name for t in manifest.inputs})
        if unknown:
            raise InvalidRequestError(
                f"{where} has no input named {', '.join(repr(u) for u in unknown)} "
                f"(inputs: {', '.join(t.name for t in manifest.inputs)})"
            )
        arrays: dict[str, Array] = {}
        for spec in manifest.inputs:
            if spec.name not in inputs:
                raise InvalidRequestError(f"{where}: input '{spec.name}' is missing")
            dtype = DATATYPES[spec.datatype].numpy
            value = inputs[spec.name]
            if isinstance(value, np.ndarray):
                if value.dtype != dtype and not (
                    spec.datatype == "BYTES" and value.dtype.kind in "OSU"
                ):
                    raise InvalidRequestError(
                        f"{where}: input '{spec.name}' has datatype "
                        f"{_datatype_name(value.dtype)} but the model takes {spec.datatype}"
                    )
                array = value
            else:
                try:
                    array = np.asarray(value, dtype=dtype)
                except (ValueError, TypeError, OverflowError) as exc:
                    raise InvalidRequestError(
                        f"{where}: input '{spec.name}' is not a valid {spec.datatype} tensor"
                    ) from exc
            if not spec.accepts_shape(array.shape):
                raise InvalidRequestError(
                    f"{where}: input '{spec.name}' has shape {list(array.shape)} but the model "
                    f"takes {spec.shape} (-1: any size)"
                )
            if spec.datatype == "BYTES":
                array = _as_onnx_strings(array, f"{where}: input '{spec.name}'")
            arrays[spec.name] = array
        if outputs is None:
            return arrays, list(self._output_names(manifest))
        known = set(self._output_names(manifest))
        for out in outputs:
            if out not in known:
                raise InvalidRequestError(
                    f"{where} has no output named '{out}' (outputs: {', '.join(sorted(known))})"
                )
        return arrays, list(outputs)

    def close(self) -> None:
        """Unload everything and stop the inference threads. Safe to call twice."""
        with self._lock:
            self._loaded.clear()
        self._executor.shutdown(wait=True, cancel_futures=True)

    # -- internals --------------------------------------------------------------------
    def _finish(
        self, model: LoadedModel, wanted: list[str], results: list[Array], start: float
    ) -> InferenceResult:
        elapsed = time.perf_counter() - start
        self._requests.inc(*model.key)
        self._latency.observe(elapsed, *model.key)
        return InferenceResult(
            model.manifest.name,
            model.manifest.version,
            dict(zip(wanted, results, strict=True)),
            elapsed,
        )

    @staticmethod
    def _output_names(manifest: ModelManifest) -> list[str]:
        return [o.name for o in manifest.outputs]

    def _refresh(self) -> None:
        """Forget cached defaults when another connection (the CLI) changed the registry."""
        version = self.registry.db.reader().execute("PRAGMA data_version").fetchone()[0]
        if version != self._data_version:
            self._data_version = version
            self._defaults.clear()
            with self._lock:
                stale = [key for key in self._loaded if not self._still_registered(key)]
                for key in stale:
                    del self._loaded[key]

    def _still_registered(self, key: tuple[str, str]) -> bool:
        try:
            self.registry.get(*key)
        except EdgeOSError:
            return False
        return True

    def _touch(self, key: tuple[str, str]) -> LoadedModel | None:
        with self._lock:
            loaded = self._loaded.get(key)
            if loaded is not None:
                self._loaded.move_to_end(key)
            return loaded

    @staticmethod
    def _warm_up(loaded: LoadedModel) -> None:
        """One run at load, so the first real call does not pay for lazy initialisation."""
        try:
            loaded.run(_warmup_inputs(loaded.manifest), loaded.output_names)
        except Exception as exc:  # ORT's own exception types
            raise InvalidModelError(
                f"model '{loaded.manifest.name}' version '{loaded.manifest.version}' failed "
                f"its warm-up run on zero inputs: {exc}"
            ) from exc

    def _make_room(self, manifest: ModelManifest) -> None:
        budget = self.config.memory_budget_bytes
        if manifest.size_bytes > budget:
            raise ResourceError(
                f"model '{manifest.name}' version '{manifest.version}' needs "
                f"{manifest.size_bytes} bytes, more than the whole model memory budget "
                f"({budget} bytes); raise model_memory_budget_mb"
            )
        with self._lock:
            while self._loaded and self.memory_used() + manifest.size_bytes > budget:
                self._loaded.popitem(last=False)

    def _session(self, manifest: ModelManifest) -> ort.InferenceSession:
        return create_session(
            self.registry.path(manifest),
            self.config,
            manifest.execution_providers,
            what=f"model '{manifest.name}' version '{manifest.version}'",
        )


def _warmup_inputs(manifest: ModelManifest) -> dict[str, Array]:
    inputs = {}
    for spec in manifest.inputs:
        shape = [d if d >= 0 else 1 for d in spec.shape]
        if spec.datatype == "BYTES":
            inputs[spec.name] = np.full(shape, b"", dtype=np.object_)
        else:
            inputs[spec.name] = np.zeros(shape, dtype=DATATYPES[spec.datatype].numpy)
    return inputs


def _as_onnx_strings(array: Array, where: str) -> Array:
    """ONNX string tensors hold text: ORT wants ``str`` elements, V2 BYTES carries bytes."""
    try:
        text = [x.decode() if isinstance(x, bytes) else str(x) for x in array.reshape(-1)]
    except UnicodeDecodeError as exc:
        raise InvalidRequestError(
            f"{where} holds bytes that are not UTF-8; ONNX string tensors hold UTF-8 text"
        ) from exc
    return np.array(text, dtype=np.object_).reshape(array.shape)


def _datatype_name(dtype: np.dtype[Any]) -> str:
    info = from_numpy(dtype)
    return info.name if info else str(dtype)
