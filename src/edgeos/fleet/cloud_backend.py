"""Where the cloud venue runs its models: the seam, and the in-process backend.

The fleet's routes stay the front door (device certificates, audit, V2 decoding and
encoding); a ``CloudBackend`` only runs published models. ``InProcessBackend`` runs them in
ONNX Runtime in the fleet process; ``edgeos.fleet.cloud_ray`` runs them on a Ray cluster.
Both load a model with ``load_model`` and run it with ``run_model``, so a model answers
the same wherever it runs.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from starlette.concurrency import run_in_threadpool

from edgeos.errors import InvalidModelError, InvalidRequestError
from edgeos.protocol.datatypes import DatatypeInfo, from_ort_type

if TYPE_CHECKING:
    import numpy as np

    Array = np.ndarray[Any, Any]


@dataclass(frozen=True)
class PublishedModel:
    """One published version of a model artifact; ``sha256`` addresses its bytes."""

    name: str
    version: str
    sha256: str


#: The ONNX file of a published model, read from the fleet's artifact store (blocking).
FetchModel = Callable[[PublishedModel], bytes]


@dataclass(frozen=True)
class Signature:
    """A model's inputs (by name) and outputs (in order): V2 datatype and shape (-1: any)."""

    inputs: dict[str, tuple[DatatypeInfo, list[int]]]
    outputs: list[tuple[str, DatatypeInfo, list[int]]]


@dataclass(frozen=True)
class Ran:
    """A model's outputs, in the signature's order, and the replica that ran it (if any)."""

    arrays: list[Array]
    replica: str | None = None


class CloudBackend(Protocol):
    """Runs published models for the cloud venue; inputs arrive decoded and checked."""

    async def signature(self, model: PublishedModel) -> Signature:
        """The model's inputs and outputs (loading it if need be)."""
        ...

    async def run(self, model: PublishedModel, feeds: Mapping[str, Array]) -> Ran:
        """Run the model; InvalidRequestError if ONNX Runtime refuses the inputs."""
        ...

    async def ready(self) -> None:
        """Return when models can run now; UnavailableError saying why otherwise."""
        ...


@dataclass(frozen=True)
class LoadedModel:
    """An ONNX Runtime session of one published model, with its signature."""

    model: PublishedModel
    session: Any  # onnxruntime.InferenceSession
    signature: Signature


def _shape(dims: list[Any]) -> list[int]:
    return [d if isinstance(d, int) else -1 for d in dims]


def load_model(model: PublishedModel, onnx: bytes) -> LoadedModel:
    """A session over the ONNX file ``onnx``; InvalidModelError if it does not load or V2
    cannot carry one of its tensors."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    # As on a node: a shared box must not burn CPU spinning between calls.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.intra_op_num_threads = 1
    name, version = model.name, model.version
    try:
        session = ort.InferenceSession(onnx, options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types
        raise InvalidModelError(f"model {name} {version} does not load: {exc}") from exc
    inputs: dict[str, tuple[DatatypeInfo, list[int]]] = {}
    outputs: list[tuple[str, DatatypeInfo, list[int]]] = []
    for arg in session.get_inputs():
        info = from_ort_type(arg.type)
        if info is None:
            raise InvalidModelError(f"model {name} input {arg.name} has a type V2 cannot carry")
        inputs[arg.name] = (info, _shape(arg.shape))
    for arg in session.get_outputs():
        info = from_ort_type(arg.type)
        if info is None:
            raise InvalidModelError(f"model {name} output {arg.name} has a type V2 cannot carry")
        outputs.append((arg.name, info, _shape(arg.shape)))
    return LoadedModel(model, session, Signature(inputs, outputs))


def run_model(loaded: LoadedModel, feeds: Mapping[str, Array]) -> list[Array]:
    """The model's outputs on ``feeds`` (blocking); InvalidRequestError if refused."""
    try:
        return list(loaded.session.run(None, dict(feeds)))
    except Exception as exc:  # onnxruntime's own errors: shapes, values
        raise InvalidRequestError(f"model {loaded.model.name} refused the inputs: {exc}") from exc


class InProcessBackend:
    """Published models in ONNX Runtime in the fleet process, loaded on their first call."""

    def __init__(self, fetch: FetchModel) -> None:
        self._fetch = fetch
        self._loaded: dict[PublishedModel, LoadedModel] = {}
        self._lock = threading.Lock()

    def _get(self, model: PublishedModel) -> LoadedModel:
        loaded = self._loaded.get(model)
        if loaded is not None:
            return loaded
        with self._lock:
            loaded = self._loaded.get(model)
            if loaded is None:
                loaded = self._loaded[model] = load_model(model, self._fetch(model))
        return loaded

    async def signature(self, model: PublishedModel) -> Signature:
        """The model's signature, loading it on the thread pool on its first call."""
        loaded = self._loaded.get(model)
        if loaded is None:
            loaded = await run_in_threadpool(self._get, model)
        return loaded.signature

    async def run(self, model: PublishedModel, feeds: Mapping[str, Array]) -> Ran:
        """Run the model on the thread pool."""
        return Ran(await run_in_threadpool(self._run, model, feeds))

    def _run(self, model: PublishedModel, feeds: Mapping[str, Array]) -> list[Array]:
        return run_model(self._get(model), feeds)

    async def ready(self) -> None:
        """In process: ready whenever the fleet answers."""
