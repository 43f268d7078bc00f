"""Retention of long-term memory: TTL expiry and the per-agent caps of ``agent.yaml``.

Caps are enforced in the transaction that writes (a step's commit): after it, the agent
holds at most ``max_records`` records and ``max_bytes`` bytes, never more, even for a
moment another process could see. Expired records go first; then, by the agent's
``eviction`` order, the least important (least recently used among equals), the least
recently used, or the oldest. Recall never returns an expired record, whether or not a
pass has removed it yet; :func:`expire_all` removes them for every agent (``edgeos memory
expire``, and the node's maintenance).
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from typing import TYPE_CHECKING

from edgeos.memory import store

if TYPE_CHECKING:
    from edgeos.manifests.agent import MemoryRetention

_ORDER = {
    "importance": "importance ASC, last_used_at ASC, seq ASC",
    "lru": "last_used_at ASC, seq ASC",
    "oldest": "seq ASC",
}


@dataclass(frozen=True)
class Removed:
    """Record ids one pass removed, by why."""

    expired: list[str]
    evicted: list[str]


def expire(conn: sqlite3.Connection, agent: str, now: float) -> list[str]:
    """Remove an agent's records whose TTL has passed."""
    return store.delete_where(
        conn, "agent = ? AND expires_at IS NOT NULL AND expires_at <= ?", (agent, now)
    )


def expire_all(conn: sqlite3.Connection, now: float) -> list[str]:
    """Remove every agent's expired records."""
    return store.delete_where(conn, "expires_at IS NOT NULL AND expires_at <= ?", (now,))


def enforce(conn: sqlite3.Connection, agent: str, policy: MemoryRetention, now: float) -> Removed:
    """Expire, then evict until the agent is within both caps."""
    expired = expire(conn, agent, now)
    evicted: list[str] = []
    records, size = store.usage(conn, agent)
    order = _ORDER[policy.eviction]
    if policy.max_records is not None and records > policy.max_records:
        rows = conn.execute(
            f"SELECT id, bytes FROM memory_records WHERE agent = ? ORDER BY {order} LIMIT ?",
            (agent, records - policy.max_records),
        ).fetchall()
        evicted += store.delete_ids(conn, agent, [r[0] for r in rows])
        size -= sum(r[1] for r in rows)
    if policy.max_bytes is not None and size > policy.max_bytes:
        excess = size - policy.max_bytes
        doomed: list[str] = []
        for record_id, nbytes in conn.execute(
            f"SELECT id, bytes FROM memory_records WHERE agent = ? ORDER BY {order}", (agent,)
        ):
            doomed.append(record_id)
            excess -= nbytes
            if excess <= 0:
                break
        evicted += store.delete_ids(conn, agent, doomed)
    return Removed(expired, evicted)
