"""Where a node's memory and disk go, by part: what ``node status`` and the guard read."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from edgeos.telemetry.process import rss_bytes


@dataclass(frozen=True)
class Usage:
    """Bytes used, by part."""

    memory: dict[str, int]
    disk: dict[str, int]

    @property
    def memory_total(self) -> int:
        """Resident memory of the node: its own process and the generative models' worker
        processes (ONNX models live inside the node process and are part of its figure)."""
        return self.memory.get("process", 0) + self.memory.get("generative", 0)

    @property
    def disk_total(self) -> int:
        """Bytes under the data directory."""
        return sum(self.disk.values())


def tree_bytes(path: Path) -> int:
    """Bytes of the files under ``path`` (0 if it does not exist)."""
    if path.is_file():
        return path.stat().st_size
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += (Path(root) / name).stat().st_size
            except FileNotFoundError:  # removed while we walked
                continue
    return total


def disk_usage(data_dir: Path) -> dict[str, int]:
    """The data directory by part: database (with its WAL), models, agent bundles, other."""
    database = sum(
        tree_bytes(data_dir / name) for name in ("node.db", "node.db-wal", "node.db-shm")
    )
    parts = {
        "database": database,
        "models": tree_bytes(data_dir / "models"),
        "agents": tree_bytes(data_dir / "agents"),
    }
    parts["other"] = max(0, tree_bytes(data_dir) - sum(parts.values()))
    return parts


def memory_usage(models_bytes: int, generative_bytes: int = 0) -> dict[str, int]:
    """The process's resident memory, and what loaded models account for: predictive
    (ONNX) models inside it, and generative ones, each in a worker process of its own
    (its resident memory, at least its weights and the KV caches it may fill)."""
    return {"process": rss_bytes(), "models": models_bytes, "generative": generative_bytes}
