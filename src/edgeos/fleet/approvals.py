"""Approvals: escalations devices report, and the answers operators send back.

A device reports its open escalations (``EscalationReport``); an operator answers one;
the answer waits as ``answered`` until the device has applied it through the same path
as a local answer and reported the result (``applied``, or ``refused`` with why: the
escalation was answered locally or timed out first). An escalation the device stops
reporting before anyone here answered it is ``closed``. Answering moves that device's
revision alone (``nudge_device``), so it hears of it at once if it is long-polling, and
no other device wakes.

Every function works inside the caller's transaction and raises before writing anything
when it refuses. A device only ever reads and changes rows under its own id.
"""

from __future__ import annotations

import time
from typing import Any

import orjson
import sqlalchemy as sa
from sqlalchemy.engine import Connection

from edgeos.errors import ConfigError, ConflictError, NotFoundError
from edgeos.fleet import tables
from edgeos.fleet.db import nudge_device
from edgeos.protocol.fleet import EscalationAnswer, EscalationReport

#: The states an escalation has at the fleet; ``open`` ones can be answered.
STATES = ("open", "answered", "applied", "refused", "closed")
_E = tables.escalations


def _dumps(value: Any) -> str:
    return orjson.dumps(value).decode()


def record_report(
    conn: Connection, device_id: str, report: EscalationReport, *, now: float | None = None
) -> None:
    """Take in what ``device_id`` reports: its open escalations and its answers' results."""
    now = time.time() if now is None else now
    if report.open is not None:
        reported = {e.id for e in report.open}
        known = set(conn.execute(sa.select(_E.c.id).where(_E.c.device_id == device_id)).scalars())
        for e in report.open:
            if e.id in known:
                continue
            conn.execute(
                sa.insert(_E).values(
                    device_id=device_id, id=e.id, agent=e.agent, run_id=e.run_id, step=e.step,
                    question=e.question, options=_dumps(e.options), proposal=_dumps(e.proposal),
                    default_choice=_dumps(e.default), deadline=e.deadline, reported_at=now,
                    state="open", updated_at=now,
                )
            )  # fmt: skip
        # Open here but no longer on the device: answered there, timed out, or cancelled.
        conn.execute(
            sa.update(_E)
            .where(_E.c.device_id == device_id, _E.c.state == "open", _E.c.id.not_in(reported))
            .values(state="closed", detail="closed on the device before an answer from the fleet",
                    updated_at=now)
        )  # fmt: skip
    for result in report.results:
        # Only answers this fleet sent to this device: anything else is not the device's to settle.
        conn.execute(
            sa.update(_E)
            .where(_E.c.device_id == device_id, _E.c.id == result.id, _E.c.state == "answered")
            .values(state="applied" if result.applied else "refused", detail=result.detail,
                    updated_at=now)
        )  # fmt: skip


def pending_answers(conn: Connection, device_id: str) -> list[EscalationAnswer]:
    """The answers waiting for ``device_id``, oldest first."""
    rows = conn.execute(
        sa.select(_E.c.id, _E.c.answer, _E.c.answered_by, _E.c.note)
        .where(_E.c.device_id == device_id, _E.c.state == "answered")
        .order_by(_E.c.answered_at, _E.c.id)
    )
    return [
        EscalationAnswer(id=r.id, choice=orjson.loads(r.answer), by=r.answered_by, note=r.note)
        for r in rows
    ]


def _row(row: Any) -> dict[str, Any]:
    doc = dict(row)
    for column in ("options", "proposal", "answer"):
        doc[column] = orjson.loads(doc[column]) if doc[column] is not None else None
    doc["default"] = orjson.loads(doc.pop("default_choice"))
    return doc


def list_escalations(
    conn: Connection,
    *,
    state: str | None = None,
    device_id: str | None = None,
    limit: int = 500,
) -> list[dict[str, Any]]:
    """Escalations, newest first, filtered by state and device; ConfigError for a bad state."""
    query = sa.select(_E).order_by(_E.c.reported_at.desc(), _E.c.id).limit(limit)
    if state is not None:
        if state not in STATES:
            raise ConfigError(f"approval state {state!r}: use one of {', '.join(STATES)}")
        query = query.where(_E.c.state == state)
    if device_id is not None:
        query = query.where(_E.c.device_id == device_id)
    return [_row(r) for r in conn.execute(query).mappings()]


def get_escalation(conn: Connection, device_id: str, escalation_id: str) -> dict[str, Any]:
    """One escalation of one device; NotFoundError if there is none."""
    row = (
        conn.execute(sa.select(_E).where(_E.c.device_id == device_id, _E.c.id == escalation_id))
        .mappings()
        .first()
    )
    if row is None:
        raise NotFoundError(f"device {device_id} has no escalation {escalation_id!r}")
    return _row(row)


def answer(
    conn: Connection,
    device_id: str,
    escalation_id: str,
    choice: Any,
    *,
    actor: str,
    note: str | None = None,
    now: float | None = None,
) -> dict[str, Any]:
    """Answer an open escalation; the device applies it on its next sync (at once when
    long-polling). Returns the row.

    NotFoundError for an unknown escalation; ConflictError when it is not open (answered
    already, or closed on the device) or its deadline passed (the device applies its
    default); ConfigError when ``choice`` is not one of its options.
    """
    now = time.time() if now is None else now
    row = get_escalation(conn, device_id, escalation_id)
    if row["state"] != "open":
        by = f" by {row['answered_by']}" if row["answered_by"] else ""
        raise ConflictError(
            f"escalation {escalation_id} of device {device_id} is {row['state']}{by}"
        )
    if row["deadline"] <= now:
        raise ConflictError(
            f"escalation {escalation_id} of device {device_id} passed its deadline: the device "
            f"applies its default ({row['default']!r})"
        )
    # The same matching as a local answer: an option, or its text (a form sends text).
    match = [o for o in row["options"] if o == choice or str(o) == str(choice)]
    if not match:
        options = ", ".join(map(str, row["options"]))
        raise ConfigError(f"{choice!r} is not an option of escalation {escalation_id} ({options})")
    if note is not None and len(note) > 1000:
        raise ConfigError(f"a note of {len(note)} characters: at most 1000")
    conn.execute(
        sa.update(_E)
        .where(_E.c.device_id == device_id, _E.c.id == escalation_id, _E.c.state == "open")
        .values(state="answered", answer=_dumps(match[0]), note=note, answered_by=actor,
                answered_at=now, updated_at=now)
    )  # fmt: skip
    nudge_device(conn, device_id)  # wakes this device's long poll, and no other
    return get_escalation(conn, device_id, escalation_id)
