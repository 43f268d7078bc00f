"""Taking a run back when its envelope expired before any node accepted it.

A sealed envelope is kept on its source until the run comes back. Once it has expired
(with a margin for the destination's clock), no node accepts it any more, so the source
may continue the run itself: the kept envelope is imported here as if it had come back,
with its context and its handed-over effects, and the run resumes at its next step.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime

from edgeos.agents.migration.accept import (
    CLOCK_SKEW,
    Accepted,
    check_content,
    import_run,
    kept_records,
    parse,
)
from edgeos.errors import ConflictError, NotFoundError
from edgeos.state import Database


def reclaim(db: Database, run_id: str, *, now: float | None = None) -> Accepted:
    """Continue here a run whose envelope expired unaccepted.

    NotFoundError when this node holds no unspent envelope of the run; ConflictError while
    the envelope may still be accepted, or when the run moved on here since.
    """
    at = time.time() if now is None else now
    row = (
        db.reader()
        .execute(
            "SELECT body FROM run_envelopes WHERE run_id = ? AND direction = 'out' "
            "AND body IS NOT NULL ORDER BY at DESC LIMIT 1",
            (run_id,),
        )
        .fetchone()
    )
    if row is None:
        raise NotFoundError(f"run {run_id} has no envelope sealed here that is not spent")
    envelope = parse(bytes(row[0]), source=f"the envelope of run {run_id} kept here")
    statement = envelope.statement
    usable_until = statement.expires_at + CLOCK_SKEW
    if at <= usable_until:
        when = datetime.fromtimestamp(usable_until, UTC).isoformat(timespec="seconds")
        raise ConflictError(
            f"run {run_id}'s envelope may still be accepted by device {statement.destination}: "
            f"take the run back after {when}"
        )
    check_content(envelope)
    with db.transaction() as conn:
        kept = kept_records(conn, envelope)
        if kept != len(envelope.records):
            raise ConflictError(f"run {run_id} moved on here since it was sealed")
        import_run(conn, envelope, kept, at)
    return Accepted(run_id, statement.envelope_id, statement.source, 1, len(envelope.effects), True)
