"""What a process holding only these ONNX models takes: the floor under any node running them.

Python, numpy and ONNX Runtime, the models loaded with the node's own session options
(:func:`edgeos.runtime.sessions.create_session`) and heap settings
(:mod:`edgeos.node.heap`), each run a few times on zero inputs of its own shapes (one row
of 16 where a dimension is free); nothing else: no HTTP server, no database, no agent.
Prints JSON: ``peak`` and ``steady`` resident bytes (after the runs, free heap pages
handed back), and ``bare``, the interpreter with numpy and ONNX Runtime imported.

    python bench/model_floor.py MODEL.onnx [MODEL.onnx ...]

``bench/footprint.py`` runs it beside the node, so its memory goals can be read against
what their own components take.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

# The node sets its heap up before anything else; so does this.
from edgeos.node import heap

heap.tune()

import numpy as np  # noqa: E402  (after the heap settings, as in the node)

from edgeos.runtime.sessions import HostConfig, _release_freed_memory, create_session  # noqa: E402

_DTYPES = {"tensor(float)": np.float32, "tensor(int64)": np.int64, "tensor(int32)": np.int32}


def resident() -> dict[str, int]:
    """VmRSS and VmHWM of this process, in bytes."""
    values = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0]) * 1024
    return values


def zeros(session: Any) -> dict[str, np.ndarray]:
    """Zero inputs of each input's shape; free dimensions: 1 for the first, 16 after."""
    inputs = {}
    for spec in session.get_inputs():
        shape = [
            d if isinstance(d, int) else (1 if i == 0 else 16) for i, d in enumerate(spec.shape)
        ]
        inputs[spec.name] = np.zeros(shape, _DTYPES.get(spec.type, np.float32))
    return inputs


def main(argv: list[str]) -> int:
    import onnxruntime  # noqa: F401  (counted in "bare", as the node loads it with a model)

    bare = resident()["VmRSS"]
    config = HostConfig()
    sessions = [create_session(Path(path), config) for path in argv]
    for session in sessions:
        inputs = zeros(session)
        for _ in range(5):
            session.run(None, inputs)
    _release_freed_memory()
    now = resident()
    print(json.dumps({"bare": bare, "steady": now["VmRSS"], "peak": now["VmHWM"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
