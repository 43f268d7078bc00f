"""What the fleet deployed on this node, as rows of the node database.

One row per artifact (kind, name) in ``fleet_artifacts``:

- ``switching``: ``version`` is switched to and being health-checked; ``previous_version``
  (and ``previous_ref``, what the kind needs to restore it) is the last known good. A row
  still ``switching`` when the node starts means the node stopped mid-switch: it is rolled
  back before anything runs.
- ``active``: ``version`` passed its health check and is the last known good.
- ``failed``: ``version`` was refused (download, staging or health check) for ``reason``;
  ``previous_version`` is what runs instead (None: nothing).

``fleet_state`` holds a few key-value facts: ``health_since`` (when the health counters
restarted, at the last switch), ``revision`` (the desired state last applied) and ``link``
(the fleet link's state, for ``edgeos node status`` when the node is not running).

Only the standard library and orjson here: ``edgeos node status`` reads this module.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import orjson

from edgeos.state import Database

SWITCHING, ACTIVE, FAILED = "switching", "active", "failed"


@dataclass(frozen=True)
class ArtifactRow:
    """One artifact the fleet deployed here, and how it stands."""

    kind: str
    name: str
    version: str
    state: str
    previous_version: str | None
    previous_ref: str | None
    reason: str | None
    assigned: bool
    updated_at: float

    @property
    def good_version(self) -> str | None:
        """The last known good version: what runs (or should) on this node."""
        return self.version if self.state == ACTIVE else self.previous_version

    def to_json(self) -> dict[str, Any]:
        """Plain JSON types (``previous_ref`` is a local detail and left out)."""
        return {
            "kind": self.kind, "name": self.name, "version": self.version, "state": self.state,
            "previous_version": self.previous_version, "reason": self.reason,
            "assigned": self.assigned, "updated_at": self.updated_at,
        }  # fmt: skip


_COLUMNS = (
    "kind, name, version, state, previous_version, previous_ref, reason, assigned, updated_at"
)


def rows(db: Database) -> list[ArtifactRow]:
    """Every artifact row, by kind and name."""
    found = db.reader().execute(f"SELECT {_COLUMNS} FROM fleet_artifacts ORDER BY kind, name")
    return [_row(r) for r in found]


def row(db: Database, kind: str, name: str) -> ArtifactRow | None:
    """The row of one artifact, or None."""
    found = (
        db.reader()
        .execute(
            f"SELECT {_COLUMNS} FROM fleet_artifacts WHERE kind = ? AND name = ?", (kind, name)
        )
        .fetchone()
    )
    return None if found is None else _row(found)


def _row(r: tuple[Any, ...]) -> ArtifactRow:
    kind, name, version, state, previous, ref, reason, assigned, updated = r
    return ArtifactRow(kind, name, version, state, previous, ref, reason, bool(assigned), updated)


def record(
    db: Database,
    kind: str,
    name: str,
    version: str,
    state: str,
    *,
    previous_version: str | None = None,
    previous_ref: str | None = None,
    reason: str | None = None,
    at: float | None = None,
) -> None:
    """Write (insert or replace) the row of one artifact; it is assigned, by definition."""
    with db.transaction() as conn:
        conn.execute(
            f"INSERT OR REPLACE INTO fleet_artifacts ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, 1, ?)",
            (kind, name, version, state, previous_version, previous_ref, reason,
             time.time() if at is None else at),
        )  # fmt: skip


def mark_assigned(db: Database, assigned: set[tuple[str, str]]) -> None:
    """Flag which rows the fleet still assigns; the others stay installed, reported as such."""
    with db.transaction() as conn:
        for r in conn.execute("SELECT kind, name, assigned FROM fleet_artifacts").fetchall():
            wanted = (r[0], r[1]) in assigned
            if wanted != bool(r[2]):
                conn.execute(
                    "UPDATE fleet_artifacts SET assigned = ? WHERE kind = ? AND name = ?",
                    (wanted, r[0], r[1]),
                )


def get_value(db: Database, key: str) -> Any:
    """A ``fleet_state`` value (JSON), or None."""
    found = db.reader().execute("SELECT value FROM fleet_state WHERE key = ?", (key,)).fetchone()
    return None if found is None else orjson.loads(found[0])


def set_value(db: Database, key: str, value: Any) -> None:
    """Store a ``fleet_state`` value (JSON)."""
    with db.transaction() as conn:
        conn.execute(
            "INSERT OR REPLACE INTO fleet_state (key, value) VALUES (?, ?)",
            (key, orjson.dumps(value).decode()),
        )


def health_since(db: Database) -> float:
    """When the health counters restarted (the last switch); 0 before any."""
    value = get_value(db, "health_since")
    return float(value) if isinstance(value, int | float) else 0.0


def restart_health(db: Database, at: float | None = None) -> None:
    """Restart the health counters: a switch (or a rollback) just happened."""
    set_value(db, "health_since", time.time() if at is None else at)
