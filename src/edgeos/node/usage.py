"""Where a node's memory and disk go, by part: what ``node status`` and the guard read."""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterator
from contextlib import closing
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
    return sum(size for _, size in _files(path))


def _files(path: Path) -> Iterator[tuple[Path, int]]:
    """Each file under ``path`` (relative to it) with its size; files removed while the
    walk goes are left out."""
    for root, _, files in os.walk(path):
        for name in files:
            full = Path(root) / name
            try:
                size = full.stat().st_size
            except FileNotFoundError:
                continue
            yield full.relative_to(path), size


#: The node database's files; everything else at the top of the data directory is "other".
DATABASE_FILES = frozenset({"node.db", "node.db-wal", "node.db-shm"})


def disk_usage(data_dir: Path) -> dict[str, int]:
    """The data directory by part: database (with its WAL), models, agent bundles, other.

    One walk, each file counted once where it lies: the parts add up to the directory even
    while the database grows under it.
    """
    parts = dict.fromkeys(("database", "models", "agents", "other"), 0)
    for relative, size in _files(data_dir):
        top = relative.parts[0]
        if len(relative.parts) == 1 and top in DATABASE_FILES:
            parts["database"] += size
        elif len(relative.parts) > 1 and top in ("models", "agents"):
            parts[top] += size
        else:
            parts["other"] += size
    return parts


#: What the node database holds, by part: each part's tables by name or name prefix (a
#: table's indexes count with it); tables of no part are "other", unused pages "free".
DATABASE_PARTS: dict[str, tuple[str, ...]] = {
    "journal": ("journal",),
    "memory": ("memory_", "run_context", "run_turns"),
    "runs": ("runs", "observations", "run_envelopes", "escalations"),
    "learning": ("feedback",),
    "buffers": ("outbox", "outbound_", "deferred_tasks", "telemetry_"),
    "traces": ("spans",),
}


#: :func:`table_usage`'s name for the pages SQLite keeps to map the others.
PAGE_MAP = "(page map)"


def table_usage(path: Path) -> dict[str, int] | None:
    """Bytes of the SQLite database at ``path`` by table, its indexes included, plus
    :data:`PAGE_MAP` for the page map and ``""`` for the free pages; None where SQLite was
    built without its ``dbstat`` table or the file cannot be read. It reads every page:
    for ``node status``, not for a timer."""
    try:
        with closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as conn:
            rows = conn.execute(
                # The schema's own pages have no row in it: they count under their name.
                "SELECT coalesce(s.tbl_name, d.name), sum(d.pgsize) FROM dbstat d "
                "LEFT JOIN sqlite_schema s ON s.name = d.name GROUP BY 1"
            ).fetchall()
            free = conn.execute("PRAGMA freelist_count").fetchone()[0]
            page = conn.execute("PRAGMA page_size").fetchone()[0]
            pages = conn.execute("PRAGMA page_count").fetchone()[0]
    except sqlite3.Error:
        return None
    tables = {str(name): int(size) for name, size in rows}
    # The page map that lets the file shrink in place (auto_vacuum) belongs to no table.
    unlisted = int(pages) * int(page) - sum(tables.values()) - int(free) * int(page)
    return {**tables, PAGE_MAP: unlisted, "": int(free) * int(page)}


def database_usage(path: Path) -> dict[str, int]:
    """The node database's pages by part (:data:`DATABASE_PARTS`, then "other" and
    "free"), largest first; empty where :func:`table_usage` cannot tell."""
    tables = table_usage(path)
    if tables is None:
        return {}
    parts: dict[str, int] = {}
    for table, size in tables.items():
        part = "free" if table == "" else next(
            (name for name, prefixes in DATABASE_PARTS.items() if table.startswith(prefixes)),
            "other",
        )  # fmt: skip
        parts[part] = parts.get(part, 0) + size
    return dict(sorted(parts.items(), key=lambda kv: -kv[1]))


def memory_usage(models_bytes: int, generative_bytes: int = 0) -> dict[str, int]:
    """The process's resident memory, and what loaded models account for: predictive
    (ONNX) models inside it, and generative ones, each in a worker process of its own
    (its resident memory, at least its weights and the KV caches it may fill)."""
    return {"process": rss_bytes(), "models": models_bytes, "generative": generative_bytes}
