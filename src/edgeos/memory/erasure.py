"""Erasure on request: forget everything about a subject, and prove it is gone from disk.

Deleting the records removes their vectors and filter rows with them (cascades), and
``secure_delete`` overwrites the freed bytes in the database pages. Two more places can
still hold a copy: earlier versions of those pages in the WAL file, and free pages.
:func:`reclaim` checkpoints the WAL and truncates it to nothing, then ``VACUUM`` rebuilds
the file without free pages, so the space goes back to the file system as well. The
change log names erased records by id only, the journal only records ids, and replication
ships the deletions, so a backup forgets them too.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass

from edgeos.errors import InvalidRequestError, StateError
from edgeos.memory import store
from edgeos.state import Database, file_bytes

BUSY_TIMEOUT_MS = 10_000


@dataclass(frozen=True)
class Reclaimed:
    """What :func:`reclaim` did: file sizes before and after, and whether the WAL is empty."""

    bytes_before: int
    bytes_after: int
    wal_cleared: bool

    @property
    def freed(self) -> int:
        """Bytes given back to the file system."""
        return max(0, self.bytes_before - self.bytes_after)


def erase(
    db: Database,
    *,
    subject: str | None = None,
    ids: list[str] | None = None,
    agent: str | None = None,
) -> list[str]:
    """Delete every record about ``subject`` (or with one of ``ids``), of one agent or all
    of them, in one transaction; returns the ids deleted."""
    if (subject is None) == (ids is None):
        raise InvalidRequestError("erase needs exactly one of a subject or record ids")
    with db.transaction() as conn:
        if ids is not None:
            return store.delete_ids(conn, agent, ids)
        if not subject:
            raise InvalidRequestError("the subject to erase is empty")
        clause, params = "subject = ?", [subject]
        if agent is not None:
            clause, params = clause + " AND agent = ?", [*params, agent]
        return store.delete_where(conn, clause, params)


def reclaim(db: Database, *, vacuum: bool = True) -> Reclaimed:
    """Empty the WAL into the file and truncate it; with ``vacuum``, rebuild the file
    without its free pages.

    Runs on a connection of its own (``VACUUM`` cannot run inside a transaction); it waits
    up to 10 s for the node's writers, and holds writes off while it runs (seconds for a
    database of a few hundred MB).
    """
    before = file_bytes(db.path)
    conn = sqlite3.connect(db.path, isolation_level=None, timeout=BUSY_TIMEOUT_MS / 1000)
    try:
        conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        if vacuum:
            conn.execute("VACUUM")
        busy, _, _ = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
    except sqlite3.Error as exc:
        raise StateError(f"cannot reclaim space in {db.path}: {exc}") from exc
    finally:
        conn.close()
    return Reclaimed(before, file_bytes(db.path), busy == 0)
