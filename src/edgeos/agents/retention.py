"""Retention: finished runs older than their agent's ``retention.runs`` are removed.

Their journal records go too, but only as a prefix of the chain (the journal is
append-only and hash-chained): compaction removes every record before the oldest one
that must be kept, and anchors the chain there so it still verifies. Rows that hang off
removed runs (delivered or dead effects, answered escalations, step observations, settled
deferred calls) go with them, overwritten on disk. Feedback, the agent's training set,
outlives its runs: it goes after its own ``retention.feedback`` (90 days unless the
manifest or a fleet policy says otherwise), so a busy agent's does not fill the disk.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from edgeos.agents import store
from edgeos.connectors.personal import overwritten
from edgeos.state import Database, journal

if TYPE_CHECKING:
    from edgeos.manifests.agent import AgentManifest


@dataclass(frozen=True)
class Compaction:
    """What one retention pass removed."""

    runs: int
    records: int
    feedback: int = 0


def apply_retention(
    db: Database,
    *,
    now: float,
    tighten: Callable[[AgentManifest], AgentManifest] | None = None,
) -> Compaction:
    """Remove expired finished runs and compact the journal before the oldest kept record.

    ``tighten`` is the fleet's policy, when there is one: it may shorten retention.
    """
    kept = {
        a.name: (tighten(a.manifest) if tighten else a.manifest).retention for a in store.agents(db)
    }
    feedback = _drop_feedback(db, {name: r.feedback for name, r in kept.items()}, now)
    retention = {name: r.runs for name, r in kept.items()}
    default = 30 * 86400.0
    with db.transaction() as conn:
        # A run that moved to another node counts from when it left: it finishes there
        # (if it comes back, it brings its whole journal with it).
        finished = conn.execute(
            "SELECT id, agent, finished_at FROM runs WHERE state IN ('succeeded', 'failed', "
            "'cancelled') AND finished_at IS NOT NULL "
            "UNION ALL SELECT id, agent, updated_at FROM runs WHERE state = 'migrated'"
        ).fetchall()
        expired = [
            run_id
            for run_id, agent, finished_at in finished
            if finished_at < now - retention.get(agent, default)
        ]
        if not expired:
            return Compaction(0, 0, feedback)
        conn.execute("CREATE TEMP TABLE IF NOT EXISTS expired_runs (id TEXT PRIMARY KEY)")
        conn.execute("DELETE FROM expired_runs")
        conn.executemany("INSERT INTO expired_runs (id) VALUES (?)", [(r,) for r in expired])
        # The oldest record that must stay: one of a run that is not expired.
        keep = conn.execute(
            "SELECT min(seq) FROM journal WHERE run_id NOT IN (SELECT id FROM expired_runs)"
        ).fetchone()[0]
        if keep is None:
            keep = conn.execute("SELECT coalesce(max(seq), 0) + 1 FROM journal").fetchone()[0]
        removed_records = journal.compact(conn, keep, at=now)
        # Only runs whose every record is gone can go; the rest wait for a later pass.
        gone = [
            r
            for (r,) in conn.execute(
                "SELECT id FROM expired_runs WHERE id NOT IN (SELECT run_id FROM journal)"
            )
        ]
        # Effects' payloads and runs' inputs may hold personal values: their bytes are
        # overwritten, not left in the file's free space.
        with overwritten(conn):
            for table in ("outbox", "escalations", "observations", "deferred_tasks"):
                conn.executemany(
                    f"DELETE FROM {table} WHERE run_id = ?"
                    + (" AND state != 'pending'" if table == "outbox" else ""),
                    [(r,) for r in gone],
                )
            conn.executemany("DELETE FROM runs WHERE id = ?", [(r,) for r in gone])
            # Envelope ids stay (a replay is still refused); what they held goes.
            conn.executemany(
                "UPDATE run_envelopes SET body = NULL WHERE run_id = ?", [(r,) for r in gone]
            )
        conn.execute("DROP TABLE expired_runs")
    return Compaction(len(gone), removed_records, feedback)


def _drop_feedback(db: Database, kept_for: dict[str, float], now: float) -> int:
    """Remove each agent's feedback older than it is kept for; how many rows went."""
    removed = 0
    with db.transaction() as conn, overwritten(conn):  # decisions may hold personal values
        for agent, seconds in kept_for.items():
            removed += conn.execute(
                "DELETE FROM feedback WHERE agent = ? AND at < ?", (agent, now - seconds)
            ).rowcount
    return removed
