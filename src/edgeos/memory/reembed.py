"""Embedding an agent's memory again when its embedding model changes.

Every record carries the model that embedded it, as ``name@version``. Vectors of two
models are not comparable (nor, often, of one size), so recall searches only the vectors
of the agent's current model: the manifest's ``memory.embedding_model`` at the default
version the registry holds now. When that changes (the agent names another model, or a
new version of it becomes the default), the records of the old one are embedded again
with the new one, in the background: a batch at a time, oldest first, each batch in one
transaction that also logs the records as put again (indexes and replicas follow).

Nothing but the records says how far it got, so a restart simply goes on: what is left is
the records of another model. Until they are all done, recall sees only those already
embedded again (:func:`outdated` says how many it does not see), and ``memory_models``
holds the progress ``edgeos memory stats`` shows.

Standard library at import: the embedder (numpy, ONNX Runtime) loads when a batch runs.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from edgeos.errors import EdgeOSError
from edgeos.memory import retention

if TYPE_CHECKING:
    from edgeos.manifests.agent import AgentManifest
    from edgeos.manifests.agent import Memory as MemoryConfig
    from edgeos.memory.embeddings import InferFn
    from edgeos.runtime import ModelHost
    from edgeos.state import Database

log = logging.getLogger("edgeos.memory")

#: Records embedded per batch (and per write transaction).
BATCH = 64


@dataclass(frozen=True)
class Progress:
    """How far an agent's memory is from being all of its current model."""

    agent: str
    model: str
    #: Records embedded again since the model changed, and how many there were to do.
    done: int
    total: int
    #: Records still of another model (recall does not see them).
    left: int
    #: Records the last batch embedded again.
    embedded: int = 0


def model_key(host: ModelHost, name: str) -> str:
    """``name@version`` of the registered model's default version (loads nothing)."""
    manifest = host.resolve(name)
    return f"{manifest.name}@{manifest.version}"


def outdated(conn: sqlite3.Connection, agent: str, key: str) -> int:
    """How many of the agent's records another model embedded."""
    row = conn.execute(
        "SELECT count(*) FROM memory_records WHERE agent = ? AND model != ?", (agent, key)
    ).fetchone()
    return int(row[0])


def _any_outdated(conn: sqlite3.Connection, agent: str, key: str) -> bool:
    # Two seeks on the (agent, model) index, not a count over all the agent's records:
    # this runs on every scan of the executor.
    return any(
        conn.execute(
            f"SELECT 1 FROM memory_records WHERE agent = ? AND model {op} ? LIMIT 1", (agent, key)
        ).fetchone()
        for op in ("<", ">")
    )


def waiting(db: Database, host: ModelHost, manifests: Iterable[AgentManifest]) -> list[str]:
    """The agents whose memory holds records of a model other than their current one."""
    conn = db.reader()
    held = {r[0] for r in conn.execute("SELECT agent FROM memory_usage WHERE records > 0")}
    names = []
    for manifest in manifests:
        if manifest.name not in held:
            continue
        try:
            key = model_key(host, manifest.memory.embedding_model)
        except EdgeOSError:
            continue  # not registered (recall says so): nothing to embed with
        if _any_outdated(conn, manifest.name, key):
            names.append(manifest.name)
    return names


def reembed_batch(
    db: Database,
    host: ModelHost,
    agent: str,
    config: MemoryConfig,
    *,
    batch: int = BATCH,
    infer: InferFn | None = None,
    now: float | None = None,
) -> Progress:
    """Embed up to ``batch`` of the agent's oldest records of another model with its
    current one; the progress after it."""
    from edgeos.memory.embeddings import describe, embed, host_infer

    model = describe(host, config.embedding_model)
    key = model.key
    conn = db.reader()
    rows = conn.execute(
        "SELECT r.seq, r.model, r.text, r.bytes - length(v.vector) FROM memory_records r "
        "JOIN memory_vectors v ON v.seq = r.seq WHERE r.agent = ? AND r.model != ? "
        "ORDER BY r.seq LIMIT ?",
        (agent, key, batch),
    ).fetchall()
    # Embedded before the write transaction: the writer is not held while the model runs.
    texts = [r[2] for r in rows]
    vectors = [v.tobytes() for v in embed(model, texts, infer or host_infer(host))] if rows else []
    at = time.time() if now is None else now
    with db.transaction() as tx:
        done = 0
        for (seq, old, _, rest), vector in zip(rows, vectors, strict=True):
            # Only if it is still there and still of the old model (a step may have
            # forgotten it meanwhile).
            changed = tx.execute(
                "UPDATE memory_records SET model = ?, bytes = ? WHERE seq = ? AND model = ?",
                (key, rest + len(vector), seq, old),
            ).rowcount
            if changed:
                tx.execute("UPDATE memory_vectors SET vector = ? WHERE seq = ?", (vector, seq))
                done += 1
        if done and (config.retention.max_bytes is not None):
            retention.enforce(tx, agent, config.retention, at)  # vectors may have grown
        return replace(_record(tx, agent, key, model.dim, done, at), embedded=done)


def _record(
    conn: sqlite3.Connection, agent: str, key: str, dim: int, done: int, at: float
) -> Progress:
    """Add ``done`` to the agent's progress towards ``key`` (a new model starts afresh)."""
    left = outdated(conn, agent, key)
    row = conn.execute(
        "SELECT model, done, total FROM memory_models WHERE agent = ?", (agent,)
    ).fetchone()
    if row is None or row[0] != key:
        total, so_far = left + done, done
        conn.execute(
            "INSERT INTO memory_models (agent, model, dim, since, total, done, updated_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (agent) DO UPDATE SET "
            "model = excluded.model, dim = excluded.dim, since = excluded.since, "
            "total = excluded.total, done = excluded.done, updated_at = excluded.updated_at",
            (agent, key, dim, at, total, so_far, at),
        )
    else:
        so_far = int(row[1]) + done
        # Records of the old model restored or remembered meanwhile add to the work.
        total = max(int(row[2]), so_far + left)
        conn.execute(
            "UPDATE memory_models SET done = ?, total = ?, updated_at = ? WHERE agent = ?",
            (so_far, total, at, agent),
        )
    return Progress(agent, key, so_far, total, left)


def catch_up(
    db: Database,
    host: ModelHost,
    manifests: Iterable[AgentManifest],
    *,
    stop: Callable[[], bool] = lambda: False,
    batch: int = BATCH,
) -> int:
    """Embed again every record of these agents that another model embedded, batch by
    batch until none is left or ``stop()`` says so; how many were embedded again."""
    total = 0
    for manifest in manifests:
        try:
            while not stop():
                progress = reembed_batch(db, host, manifest.name, manifest.memory, batch=batch)
                total += progress.embedded
                if progress.left == 0:
                    log.info(
                        "agent %s: memory embedded again with %s (%d records)",
                        manifest.name, progress.model, progress.done,
                    )  # fmt: skip
                    break
        except EdgeOSError as exc:  # the model cannot run now: the next scan tries again
            log.warning("agent %s: memory not embedded again yet: %s", manifest.name, exc)
    return total
