"""The fleet part of ``edgeos node status``: identity, link, deployed artifacts.

Read from the data directory and the node database, plus the live link when the node is
running. Only the standard library and orjson: a status of a node without a running
process must not pay for the sync machinery.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edgeos.errors import EdgeOSError
from edgeos.state import Database
from edgeos.sync import state
from edgeos.sync.identity import load_identity


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
    }
    if identity is not None:  # the files are the truth about who the node is
        report.update(
            url=identity.url, device_id=identity.device_id, group=identity.group,
            certificate_expires=identity.certificate_not_after,
        )  # fmt: skip
    return report
