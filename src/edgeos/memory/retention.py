"""Retention of long-term memory: TTL expiry and the per-agent caps of ``agent.yaml``.

Caps are enforced in the transaction that writes (a step's commit): after it, the agent
holds at most ``max_records`` records and ``max_bytes`` bytes, never more, even for a
moment another process could see. Expired records go first; then, by the agent's
``eviction`` order, the least important (least recently used among equals), the least
recently used, or the oldest. Recall never returns an expired record, whether or not a
pass has removed it yet; :func:`expire_all` removes them for every agent (``edgeos memory
expire``).

The executor's retention pass (:func:`retention_pass`) does the same for every agent under
the fleet's policy, when the node follows one: the stricter of the agent's caps and the
policy's applies, and no record outlives the policy's TTL, whatever TTL it was given.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from edgeos.memory import store

if TYPE_CHECKING:
    from edgeos.manifests.agent import AgentManifest, MemoryRetention
    from edgeos.state import Database

_ORDER = {
    "importance": "importance ASC, last_used_at ASC, seq ASC",
    "lru": "last_used_at ASC, seq ASC",
    "oldest": "seq ASC",
}


@dataclass(frozen=True)
class Removed:
    """Record ids one pass removed, by why."""

    expired: list[str] = field(default_factory=list)
    evicted: list[str] = field(default_factory=list)


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


def cap_age(conn: sqlite3.Connection, agent: str, max_age: float) -> int:
    """Make every record of an agent expire at most ``max_age`` after it was made; how
    many records got a shorter life (each is logged, so indexes and replicas follow)."""
    return conn.execute(
        "UPDATE memory_records SET expires_at = created_at + ? WHERE agent = ? "
        "AND (expires_at IS NULL OR expires_at > created_at + ?)",
        (max_age, agent, max_age),
    ).rowcount


def retention_pass(
    db: Database,
    manifests: Iterable[AgentManifest],
    now: float,
    *,
    tighten: Callable[[AgentManifest], AgentManifest] | None = None,
) -> Removed:
    """Expire every agent's records past their TTL and hold each installed agent to its
    caps, under the fleet's policy when ``tighten`` is given; one transaction."""
    removed = Removed()
    limits: list[tuple[str, MemoryRetention]] = [
        (m.name, (m if tighten is None else tighten(m)).memory.retention) for m in manifests
    ]
    with db.transaction() as conn:
        for agent, policy in limits:
            if policy.max_ttl is not None:  # records written before it was set, or shortened
                cap_age(conn, agent, policy.max_ttl)
            if policy.max_records is not None or policy.max_bytes is not None:
                done = enforce(conn, agent, policy, now)
                removed.expired.extend(done.expired)
                removed.evicted.extend(done.evicted)
        removed.expired.extend(expire_all(conn, now))
    return removed
