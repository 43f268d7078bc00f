"""The model host: ONNX Runtime sessions for registered models, under a memory budget.

Sessions are created with explicit options (thread counts, spinning off, execution
providers from configuration), warmed up at load, and shared by concurrent callers
(``InferenceSession.run`` is thread-safe). When loading a model would exceed the memory
budget, the least recently used models are unloaded first.

The call path is kept short on purpose: for a small model, ONNX Runtime itself takes a
few microseconds, so every check the host adds is measured against that (see
``bench/runtime_overhead.py``). A call whose inputs pass the quick check goes straight
to the session; anything unusual takes the slow path, which explains what is wrong.

Neither numpy nor ONNX Runtime is imported here at module level: a node with no model
loaded imports neither. Both arrive with the first session (ORT imports numpy itself).
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from edgeos.errors import (
    EdgeOSError,
    InvalidModelError,
    InvalidRequestError,
    ModelRunError,
    ResourceError,
    UnavailableError,
)
from edgeos.protocol.datatypes import DATATYPES, from_numpy
from edgeos.runtime.batcher import MicroBatcher
from edgeos.runtime.registry import ModelRegistry
from edgeos.runtime.sessions import HostConfig, create_session
from edgeos.telemetry import CounterChild, HistogramChild, MetricsRegistry
from edgeos.threads import IdleThreadPool

if TYPE_CHECKING:
    import numpy as np
    import onnxruntime as ort

    from edgeos.manifests import ModelManifest

    Array = np.ndarray[Any, Any]

ModelKey = tuple[str, str]

# How often the host asks the database whether another process (the CLI) changed the
# registry. Changes made through this process's own database are seen at once.
REGISTRY_POLL_SECONDS = 0.25


class InferenceResult:
    """Outputs of one call, with the version that produced them.

    A plain slotted class: built on every call, it must cost next to nothing.
    """

    __slots__ = ("latency_s", "model", "outputs", "version")

    def __init__(
        self, model: str, version: str, outputs: dict[str, Array], latency_s: float
    ) -> None:
        self.model = model
        self.version = version
        self.outputs = outputs
        self.latency_s = latency_s

    def __repr__(self) -> str:
        return (
            f"InferenceResult(model={self.model!r}, version={self.version!r}, "
            f"outputs={list(self.outputs)}, latency_s={self.latency_s:.6f})"
        )


def _named(names: Sequence[str], arrays: Sequence[Array]) -> dict[str, Array]:
    return {names[0]: arrays[0]} if len(names) == 1 else dict(zip(names, arrays, strict=False))


class LoadedModel:
    """A model version with its live ONNX Runtime session."""

    def __init__(
        self,
        manifest: ModelManifest,
        session: ort.InferenceSession,
        latency: HistogramChild,
        errors: CounterChild,
    ) -> None:
        import numpy as np  # loaded already: ONNX Runtime imports it

        self.manifest = manifest
        self.latency = latency
        self.errors = errors
        self.session = session
        self.providers: list[str] = list(session.get_providers())
        self.output_names = [o.name for o in manifest.outputs]
        self.loaded_at = time.time()
        self.last_used = 0
        #: Fast enough to run on the event loop rather than in a thread (set at warm-up).
        self.inline = False
        self.batcher: MicroBatcher | None = None
        # Inputs are checked by the host, so call the binding under ORT's Python wrapper,
        # which would check them again.
        self._run: Callable[..., list[Array]] = getattr(session, "_sess", session).run
        self._quick = tuple(
            (
                spec.name,
                DATATYPES[spec.datatype].numpy,
                len(spec.shape),
                tuple((axis, size) for axis, size in enumerate(spec.shape) if size >= 0),
            )
            for spec in manifest.inputs
            if spec.datatype != "BYTES"
        )
        self._quick_ok = len(self._quick) == len(manifest.inputs)
        self._ndarray = np.ndarray

    @property
    def key(self) -> ModelKey:
        """(name, version)."""
        return (self.manifest.name, self.manifest.version)

    @property
    def size_bytes(self) -> int:
        """What the model counts against the memory budget: its weights."""
        return self.manifest.size_bytes

    def run(self, inputs: Mapping[str, Array], outputs: Sequence[str]) -> list[Array]:
        """Run the session on inputs already checked against the manifest (thread-safe)."""
        try:
            return self._run(outputs, inputs, None)
        except Exception as exc:  # ORT's own exception types
            raise self.run_error(exc) from exc

    def run_error(self, exc: Exception) -> ModelRunError:
        """Count a failed run and describe it."""
        self.errors.inc()
        return ModelRunError(
            f"model '{self.manifest.name}' version '{self.manifest.version}' failed: {exc}"
        )

    def quick_check(self, inputs: Mapping[str, Any]) -> bool:
        """True when every input is an ndarray of the right dtype and shape."""
        if not self._quick_ok or len(inputs) != len(self._quick):
            return False
        ndarray = self._ndarray
        for name, dtype, ndim, fixed in self._quick:
            array = inputs.get(name)
            if type(array) is not ndarray or array.dtype != dtype or array.ndim != ndim:
                return False
            shape = array.shape
            for axis, size in fixed:
                if shape[axis] != size:
                    return False
        return True


class ModelHost:
    """Loads, serves and unloads the registry's models. Sync and async APIs."""

    def __init__(
        self,
        registry: ModelRegistry,
        config: HostConfig | None = None,
        metrics: MetricsRegistry | None = None,
    ) -> None:
        self.registry = registry
        self._db = registry.db
        self.config = config or HostConfig()
        self._loaded: dict[ModelKey, LoadedModel] = {}
        self._tick = itertools.count(1)  # stamps uses for least-recently-used eviction
        self._routes: dict[tuple[str, str | None], LoadedModel] = {}
        self._lock = threading.RLock()
        self._load_locks: dict[ModelKey, threading.Lock] = {}
        self._seen = (-1, -1)
        self._next_poll = 0.0
        self._executor = IdleThreadPool(
            self.config.inference_threads, thread_name_prefix="edgeos-infer"
        )
        metrics = metrics or MetricsRegistry()
        labels = ("model", "version")
        self._latency = metrics.histogram(
            "edgeos_inference_latency_seconds",
            "Latency of successful inference calls per model version, in seconds.",
            labels,
        )
        metrics.histogram_count(
            "edgeos_inference_requests_total",
            "Successful inference requests per model version.",
            self._latency,
        )
        self._errors = metrics.counter(
            "edgeos_inference_errors_total", "Failed inference requests per model version.", labels
        )

    # -- loading ----------------------------------------------------------------------
    def resolve(self, name: str, version: str | None = None) -> ModelManifest:
        """The manifest a call to (name, version) is served by; default version if None."""
        self._refresh()
        routed = self._routes.get((name, version))
        if routed is not None:
            return routed.manifest
        return self.registry.get(name, version)

    def load(self, name: str, version: str | None = None) -> LoadedModel:
        """Load a model version (default version if None), evicting others if needed."""
        self._refresh()
        routed = self._routes.get((name, version))
        if routed is not None:
            routed.last_used = next(self._tick)
            return routed
        manifest = self.registry.get(name, version)
        key = (manifest.name, manifest.version)
        loaded = self._touch(key)
        if loaded is None:
            with self._lock:
                load_lock = self._load_locks.setdefault(key, threading.Lock())
            with load_lock:
                loaded = self._touch(key) or self._load(manifest)
        with self._lock:
            if self._loaded.get(key) is loaded:
                self._routes[(name, version)] = loaded
        return loaded

    def unload(self, name: str, version: str) -> bool:
        """Drop a loaded model; in-flight calls finish on the session they hold."""
        with self._lock:
            gone = self._loaded.pop((name, version), None)
            self._forget_routes()
        return gone is not None

    def loaded(self) -> list[LoadedModel]:
        """Loaded models, least recently used first."""
        self._refresh()
        with self._lock:
            return sorted(self._loaded.values(), key=lambda m: m.last_used)

    def memory_used(self) -> int:
        """Bytes of the memory budget taken by loaded models."""
        with self._lock:
            return sum(m.size_bytes for m in self._loaded.values())

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
        # Written out flat: each call saved here is a measurable share of a small model's run.
        start = time.perf_counter()
        model = self._routes.get((name, version))
        if model is None or not self._fresh():
            model = self._load_counting_errors(name, version)
        arrays, wanted = self._arguments(model, inputs, outputs)
        try:
            results = model._run(wanted, arrays, None)
        except Exception as exc:  # ORT's own exception types
            raise model.run_error(exc) from exc
        elapsed = time.perf_counter() - start
        model.latency.observe(elapsed)
        manifest = model.manifest
        return InferenceResult(manifest.name, manifest.version, _named(wanted, results), elapsed)

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
        loop = asyncio.get_running_loop()
        model = self._routes.get((name, version))
        if model is None or not self._fresh():
            model = await loop.run_in_executor(
                self._executor, self._load_counting_errors, name, version
            )
        arrays, wanted = self._arguments(model, inputs, outputs)
        if model.batcher is not None:
            results = await model.batcher.submit(arrays, wanted)
        elif model.inline:
            results = model.run(arrays, wanted)
        else:
            results = await loop.run_in_executor(self._executor, model.run, arrays, wanted)
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
        """Check inputs and requested outputs against the manifest; return run arguments.

        Raises InvalidRequestError naming the input or output and what is wrong.
        """
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
            array = _as_array(inputs[spec.name], spec.datatype, f"{where}: input '{spec.name}'")
            if not spec.accepts_shape(array.shape):
                raise InvalidRequestError(
                    f"{where}: input '{spec.name}' has shape {list(array.shape)} but the model "
                    f"takes {spec.shape} (-1: any size)"
                )
            arrays[spec.name] = array
        names = [o.name for o in manifest.outputs]
        if outputs is None:
            return arrays, names
        for out in outputs:
            if out not in names:
                raise InvalidRequestError(
                    f"{where} has no output named '{out}' (outputs: {', '.join(names)})"
                )
        return arrays, list(outputs)

    def close(self) -> None:
        """Unload everything and stop the inference threads. Safe to call twice."""
        with self._lock:
            self._loaded.clear()
            self._forget_routes()
        self._executor.shutdown(wait=True, cancel_futures=True)

    # -- internals --------------------------------------------------------------------
    def _load_counting_errors(self, name: str, version: str | None) -> LoadedModel:
        try:
            return self.load(name, version)
        except EdgeOSError:
            self._errors.inc(name, version or "")
            raise

    def _arguments(
        self, model: LoadedModel, inputs: Mapping[str, Any], outputs: Sequence[str] | None
    ) -> tuple[Mapping[str, Array], list[str]]:
        """Run arguments for a call; inputs that pass the quick check go through as given."""
        model.last_used = next(self._tick)
        if outputs is None and model.quick_check(inputs):
            return inputs, model.output_names
        try:
            return self.prepare(model.manifest, inputs, outputs)
        except EdgeOSError:
            model.errors.inc()
            raise

    def _finish(
        self, model: LoadedModel, wanted: Sequence[str], results: list[Array], start: float
    ) -> InferenceResult:
        elapsed = time.perf_counter() - start
        model.latency.observe(elapsed)
        manifest = model.manifest
        return InferenceResult(manifest.name, manifest.version, _named(wanted, results), elapsed)

    def _load(self, manifest: ModelManifest) -> LoadedModel:
        if manifest.kind == "generative":
            raise InvalidRequestError(
                f"model '{manifest.name}' is a generative model: it serves "
                "/v1/chat/completions, not tensor inference (see docs/genai.md)"
            )
        path = self.registry.path(manifest)
        if not path.exists():
            # Removed (or being replaced) by another process since we read the registry.
            self.registry.get(manifest.name, manifest.version)  # ModelNotFoundError if gone
            raise UnavailableError(
                f"model '{manifest.name}' version '{manifest.version}' has no file in the "
                "store right now (it is being changed); try again"
            )
        self._make_room(manifest)
        key = (manifest.name, manifest.version)
        loaded = LoadedModel(
            manifest,
            create_session(
                path,
                self.config,
                manifest.execution_providers,
                what=f"model '{manifest.name}' version '{manifest.version}'",
            ),
            self._latency.child(*key),
            self._errors.child(*key),
        )
        if self.config.warmup:
            loaded.inline = _warm_up(loaded) < self.config.inline_below_seconds
        if manifest.batching is not None:
            executor = None if loaded.inline else self._executor
            loaded.batcher = MicroBatcher(loaded.run, manifest.batching, executor)
        with self._lock:
            loaded.last_used = next(self._tick)
            self._loaded[loaded.key] = loaded
        return loaded

    def _fresh(self) -> bool:
        """Cheap test that cached routes may be used; refreshes them when due."""
        if self._db.commits == self._seen[0] and time.monotonic() < self._next_poll:
            return True
        self._refresh()
        return False

    def _refresh(self) -> None:
        """Drop cached routes and removed models when the registry may have changed."""
        db = self.registry.db
        now = time.monotonic()
        if db.commits == self._seen[0] and now < self._next_poll:
            return
        self._next_poll = now + REGISTRY_POLL_SECONDS
        seen = (db.commits, db.reader().execute("PRAGMA data_version").fetchone()[0])
        if seen == self._seen:
            return
        self._seen = seen
        with self._lock:
            self._forget_routes()
            for key in [k for k in self._loaded if not self._still_registered(k)]:
                del self._loaded[key]

    def _forget_routes(self) -> None:
        self._routes = {}

    def _still_registered(self, key: ModelKey) -> bool:
        try:
            self.registry.get(*key)
        except EdgeOSError:
            return False
        return True

    def _touch(self, key: ModelKey) -> LoadedModel | None:
        with self._lock:
            loaded = self._loaded.get(key)
            if loaded is not None:
                loaded.last_used = next(self._tick)
            return loaded

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
                coldest = min(self._loaded.values(), key=lambda m: m.last_used)
                del self._loaded[coldest.key]
                self._forget_routes()


def _warm_up(loaded: LoadedModel, runs: int = 5) -> float:
    """Run a few times at load, so the first real call does not pay for lazy
    initialisation; returns the fastest run in seconds."""
    import numpy as np

    inputs = {}
    for spec in loaded.manifest.inputs:
        shape = [d if d >= 0 else 1 for d in spec.shape]
        if spec.datatype == "BYTES":
            inputs[spec.name] = np.full(shape, "", dtype=np.object_)
        else:
            inputs[spec.name] = np.zeros(shape, dtype=DATATYPES[spec.datatype].numpy)
    best = float("inf")
    try:
        for _ in range(runs):
            start = time.perf_counter()
            loaded.run(inputs, loaded.output_names)
            best = min(best, time.perf_counter() - start)
    except ModelRunError as exc:
        raise InvalidModelError(
            f"model '{loaded.manifest.name}' version '{loaded.manifest.version}' failed "
            f"its warm-up run on zero inputs: {exc}"
        ) from exc
    return best


def _as_array(value: Any, datatype: str, where: str) -> Array:
    """The value as an array of the datatype's numpy dtype, or InvalidRequestError."""
    import numpy as np  # the slow path only: the quick check passes arrays straight on

    dtype = DATATYPES[datatype].numpy
    if isinstance(value, np.ndarray):
        if datatype == "BYTES" and value.dtype.kind in "OSU":
            return _as_onnx_strings(value, where)
        if value.dtype != dtype:
            info = from_numpy(value.dtype)
            given = info.name if info else str(value.dtype)
            raise InvalidRequestError(
                f"{where} has datatype {given} but the model takes {datatype}"
            )
        return value
    try:
        array = np.asarray(value, dtype=dtype)
    except (ValueError, TypeError, OverflowError) as exc:
        raise InvalidRequestError(f"{where} is not a valid {datatype} tensor") from exc
    return _as_onnx_strings(array, where) if datatype == "BYTES" else array


def _as_onnx_strings(array: Array, where: str) -> Array:
    """ONNX string tensors hold text: ORT wants ``str`` elements, V2 BYTES carries bytes."""
    import numpy as np

    try:
        text = [x.decode() if isinstance(x, bytes) else str(x) for x in array.reshape(-1)]
    except UnicodeDecodeError as exc:
        raise InvalidRequestError(
            f"{where} holds bytes that are not UTF-8; ONNX string tensors hold UTF-8 text"
        ) from exc
    return np.array(text, dtype=np.object_).reshape(array.shape)
