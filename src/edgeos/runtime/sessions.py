"""Creating ONNX Runtime sessions with edgeos's explicit options, in one place.

Everything that runs a model (the host, quantization, profiling, the registry's load
check) builds its session here, so measurements match what the node serves.

Options measured and left at ONNX Runtime's defaults, on the 8-bit all-MiniLM-L6-v2
(``bench/footprint.py``): turning off weight prepacking, memory patterns or graph
optimizations saves no resident memory once loaded and slows inference.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from edgeos.errors import InvalidModelError

if TYPE_CHECKING:
    import onnxruntime as ort


@dataclass(frozen=True)
class HostConfig:
    """How models are run. Defaults suit a small box shared with other work."""

    intra_op_threads: int = 1
    inter_op_threads: int = 1
    execution_providers: tuple[str, ...] = ("CPUExecutionProvider",)
    allow_spinning: bool = False
    memory_budget_bytes: int = 512 * 1024 * 1024
    inference_threads: int = field(default_factory=lambda: os.cpu_count() or 1)
    warmup: bool = True
    #: Async calls to models whose typical run is shorter than this run on the event loop
    #: itself: handing a 10 us run to a thread costs more than the run.
    inline_below_seconds: float = 0.0002


def create_session(
    source: Path | bytes,
    config: HostConfig,
    preferred_providers: Sequence[str] = ("CPUExecutionProvider",),
    *,
    what: str = "model",
) -> ort.InferenceSession:
    """An InferenceSession for a model file or bytes; InvalidModelError if ORT refuses it."""
    import onnxruntime as ort  # heavy: a node without models never imports it

    options = ort.SessionOptions()
    options.intra_op_num_threads = config.intra_op_threads
    options.inter_op_num_threads = config.inter_op_threads
    options.log_severity_level = 3
    # Without the arena, memory a run used goes back to the heap when the run ends instead
    # of being kept at the largest run's size for the session's life (measured: 1 MB less
    # for the demo node, no slower for its models, bench/runtime_overhead.py).
    options.enable_cpu_mem_arena = False
    if not config.allow_spinning:
        # Spinning threads burn a core after every run; on a shared box that is waste.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    available = set(ort.get_available_providers())
    providers = [
        p for p in preferred_providers if p in config.execution_providers and p in available
    ]
    if "CPUExecutionProvider" not in providers:
        providers.append("CPUExecutionProvider")
    try:
        data = str(source) if isinstance(source, Path) else source
        session = ort.InferenceSession(data, options, providers=providers)
    except Exception as exc:  # ORT raises its own Fail/InvalidGraph/NotImplemented types
        text = str(exc).strip()
        first = text.splitlines()[0] if text else type(exc).__name__
        raise InvalidModelError(f"{what} cannot be loaded by ONNX Runtime: {first}") from exc
    _release_freed_memory()
    return session


def _release_freed_memory() -> None:
    """Hand the C heap's free pages back to the system (glibc; elsewhere nothing).

    Loading a model parses the file and copies its weights: the buffers freed afterwards
    stay in the process's heap, resident, unless trimmed (4 MB of the demo node with its
    8-bit embedding model, ``bench/footprint.py``). Once per load, never per call.
    """
    import ctypes

    trim = getattr(ctypes.CDLL(None), "malloc_trim", None)
    if trim is not None:
        trim(0)
