"""Models: staged as a registered version that is not the default, switched by making it
the default, checked by loading it and running it once on inputs made from its manifest.

The smoke test feeds zeros to the warm-up (the host does that on every load) and then
seeded random values in [0, 1) to every numeric input; every floating-point output must
be finite. It runs under a time limit: a model that hangs fails its check.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgeos.errors import ConflictError, ManifestError, ModelNotFoundError, ModelRunError
from edgeos.protocol.datatypes import DATATYPES
from edgeos.protocol.fleet import DesiredArtifact
from edgeos.runtime import HostConfig, ModelHost, ModelRegistry
from edgeos.sync.archive import unpack
from edgeos.sync.kinds import Interrupted, Staged

if TYPE_CHECKING:
    from edgeos.manifests import ModelManifest


class ModelKind:
    """Models in the node's registry, checked in ``host`` (a private one when None)."""

    def __init__(
        self,
        registry: ModelRegistry,
        *,
        host: ModelHost | None = None,
        check_s: float = 30.0,
        stopping: threading.Event | None = None,
    ) -> None:
        self.registry = registry
        self.host = host
        self.check_s = check_s
        self.stopping = stopping or threading.Event()

    def current(self, name: str) -> str | None:
        """The default version, or None when the model is not registered."""
        try:
            return self.registry.default_version(name)
        except ModelNotFoundError:
            return None

    def previous_ref(self, name: str) -> str | None:
        """Nothing beyond the version: the previous version stays registered."""
        return None

    def stage(self, artifact: DesiredArtifact, data: bytes, workdir: Path) -> Staged:
        """Register the archive's model as a version that is not served yet."""
        source = f"model/{artifact.name}@{artifact.version}"
        root = unpack(data, workdir, source)
        onnx_files = sorted(root.glob("*.onnx"))
        if len(onnx_files) != 1:
            raise ManifestError(source, [f"holds {len(onnx_files)} .onnx files, not exactly one"])
        spec = root / "model.yaml"
        file_bytes = onnx_files[0].read_bytes()
        try:
            existing = self.registry.get(artifact.name, artifact.version)
        except ModelNotFoundError:
            existing = None
        if existing is not None:
            # Staged before (the node stopped before switching): the same bytes are reused.
            if existing.sha256 != hashlib.sha256(file_bytes).hexdigest():
                raise ConflictError(
                    f"{source}: this node has a version {artifact.version} of model "
                    f"{artifact.name} with other bytes; remove it or publish another version"
                )
            return Staged(artifact, existing)
        manifest = self.registry.add(
            onnx_files[0],
            name=artifact.name,
            version=artifact.version,
            manifest=spec if spec.is_file() else None,
            make_default=False,
        )
        return Staged(artifact, manifest)

    def switch(self, staged: Staged) -> None:
        """Make the staged version the default: callers that name no version get it."""
        self.registry.set_default(staged.artifact.name, staged.artifact.version)

    def check(self, staged: Staged, switched_at: float) -> None:
        """Load the version and smoke-test it within ``check_s`` seconds."""
        host = self.host or ModelHost(self.registry, HostConfig(inference_threads=1))
        pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="edgeos-smoke")
        try:
            future = pool.submit(smoke_test, host, staged.artifact.name, staged.artifact.version)
            deadline = time.monotonic() + self.check_s
            while True:
                try:
                    future.result(timeout=0.1)
                    return
                except concurrent.futures.TimeoutError:
                    if self.stopping.is_set():
                        raise Interrupted(
                            "the node is stopping during a model's smoke test"
                        ) from None
                    if time.monotonic() >= deadline:
                        raise ModelRunError(
                            f"model '{staged.artifact.name}' version '{staged.artifact.version}' "
                            f"did not load and pass its smoke test within {self.check_s:g} s"
                        ) from None
        finally:
            pool.shutdown(wait=False, cancel_futures=True)
            if self.host is None:
                host.close()

    def rollback(
        self, name: str, version: str, previous: str | None, previous_ref: str | None
    ) -> None:
        """Serve ``previous`` again and remove ``version`` (with no previous: the model)."""
        if previous is not None:
            with contextlib.suppress(ModelNotFoundError):
                self.registry.set_default(name, previous)
        with contextlib.suppress(ModelNotFoundError):
            self.registry.remove(name, version)

    def commit(self, staged: Staged) -> None:
        """Nothing to drop: the previous version stays registered, to go back to."""


def smoke_test(host: ModelHost, name: str, version: str) -> None:
    """Load a model version and run it once; ModelRunError unless every float output is
    finite (InvalidModelError when it does not even load or run on zeros)."""
    import numpy as np

    loaded = host.load(name, version)
    inputs = smoke_inputs(loaded.manifest)
    result = host.infer(name, inputs, version=version)
    for output, array in result.outputs.items():
        values = np.asarray(array)
        if values.dtype.kind in "fc" and not np.isfinite(values).all():
            bad = int(values.size - np.isfinite(values).sum())
            raise ModelRunError(
                f"model '{name}' version '{version}' output '{output}' holds {bad} NaN or "
                f"infinite value(s) of {values.size} on the smoke-test inputs"
            )


def smoke_inputs(manifest: ModelManifest) -> dict[str, Any]:
    """Inputs built from the manifest's tensor specs (any-size axes as 1): random values in
    [0, 1) for floats, zeros for integers and booleans, empty strings for BYTES."""
    import numpy as np

    rng = np.random.default_rng(0)
    inputs: dict[str, Any] = {}
    for spec in manifest.inputs:
        shape = [d if d >= 0 else 1 for d in spec.shape]
        if spec.datatype == "BYTES":
            inputs[spec.name] = np.full(shape, "", dtype=np.object_)
            continue
        dtype = DATATYPES[spec.datatype].numpy
        if np.dtype(dtype).kind == "f":
            inputs[spec.name] = rng.random(shape).astype(dtype)
        else:
            inputs[spec.name] = np.zeros(shape, dtype=dtype)
    return inputs
