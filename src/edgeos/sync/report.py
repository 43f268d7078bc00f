"""The fleet part of ``edgeos node status``: identity, link, deployed artifacts, the
telemetry uplink's buffer and memory replication to the fleet.

Read from the data directory and the node database, plus the live link when the node is
running. Only the standard library and orjson: a status of a node without a running
process must not pay for the sync machinery.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import orjson

from edgeos.errors import EdgeOSError
from edgeos.memory.replication import last_seq
from edgeos.state import Database
from edgeos.sync import state
from edgeos.sync.identity import load_identity

#: ``edgeos.sync.memory_target.TARGET``, not imported from there: it brings httpx along.
MEMORY_TARGET = "fleet"


def fleet_report(
    db: Database, data_dir: Path, live: dict[str, Any] | None
) -> dict[str, Any] | None:
    """The fleet link of the node, or None when it has never had one.

    ``live`` is the running sync loop's link; without it, the link the node saved last
    (``stale`` is then True: the node is not running, its link is as it last was).
    """
    error = None
    try:
        identity = load_identity(data_dir)
    except EdgeOSError as exc:
        identity, error = None, str(exc)
    saved = live if live is not None else state.get_value(db, "link")
    artifacts = [r.to_json() for r in state.rows(db)]
    if identity is None and not saved and not artifacts and error is None:
        return None
    link = dict(saved) if isinstance(saved, dict) else {}
    report: dict[str, Any] = {
        "url": link.get("url"),
        "device_id": link.get("device_id"),
        "group": link.get("group"),
        "certificate_expires": link.get("certificate_expires"),
        "link": link.get("link_state", "unknown"),
        "link_since": link.get("link_since"),
        "last_sync": link.get("last_sync"),
        "last_error": error or link.get("last_error"),
        "stale": live is None,
        "artifacts": artifacts,
        "telemetry": telemetry_report(db),
        "memory": None,
    }
    if identity is not None:  # the files are the truth about who the node is
        report.update(
            url=identity.url, device_id=identity.device_id, group=identity.group,
            certificate_expires=identity.certificate_not_after,
        )  # fmt: skip
    if report["device_id"]:
        report["memory"] = memory_report(db, str(report["device_id"]))
    return report


def telemetry_report(db: Database) -> dict[str, Any]:
    """The telemetry uplink's buffer: records and bytes waiting by kind, the batch sent
    and not yet acknowledged, drops not yet reported, the last batch the fleet took."""
    conn = db.reader()
    kinds = conn.execute(
        "SELECT kind, count(*), coalesce(sum(size), 0) FROM telemetry_buffer GROUP BY kind"
    ).fetchall()
    pending = conn.execute(
        "SELECT seq, records, length(body), created_at FROM telemetry_batch ORDER BY seq LIMIT 1"
    ).fetchone()
    next_seq, day, day_bytes, dropped = conn.execute(
        "SELECT next_seq, day, day_bytes, dropped FROM telemetry_uplink WHERE id = 1"
    ).fetchone()
    # Batches are numbered in order and one is in flight at most: every one before the
    # pending batch (or before the next one) was acknowledged, or refused for good.
    acknowledged = (int(pending[0]) if pending else int(next_seq)) - 1
    return {
        "records": {str(k): int(n) for k, n, _ in kinds},
        "bytes": {str(k): int(b) for k, _, b in kinds},
        "dropped": orjson.loads(dropped),
        "pending_batch": None if pending is None else {
            "seq": int(pending[0]), "records": int(pending[1]), "bytes": int(pending[2]),
            "since": float(pending[3]),
        },
        "last_acknowledged_seq": acknowledged or None,
        "sent_today_bytes": int(day_bytes) if int(day) == int(time.time() // 86_400) else 0,
    }  # fmt: skip


def memory_report(db: Database, device_id: str) -> dict[str, Any]:
    """Memory replication to the fleet: this node's change log against the position the
    fleet last confirmed."""
    row = (
        db.reader()
        .execute(
            "SELECT position, updated_at FROM memory_replicas WHERE target = ?",
            (f"{MEMORY_TARGET}:{device_id}",),
        )
        .fetchone()
    )
    local = last_seq(db)
    position = int(row[0]) if row else 0
    return {
        "local_seq": local,
        "fleet_position": position,
        "behind": max(local - position, 0),
        "confirmed_at": float(row[1]) if row else None,
    }
