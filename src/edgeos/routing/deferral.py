"""Deferred calls: routed model calls that wait, in the node database, for an offline venue.

A call whose venue is offline, and whose task will not take a lower-quality answer, is
deferred (:class:`~edgeos.routing.decide.CallDeferred`). Its run parks as
``waiting_venue`` with a row in ``deferred_tasks`` (id ``run:step_index:call``), both in
one transaction, so a SIGKILL loses nothing: a restarted node finds the same queue.

The executor settles the queue on each scan: a call whose awaited venue the link monitor
sees online again is ``resumed`` and its run set pending (the step runs again from its
start and routes the call anew; deferred again if the link drops again, under its first
deadline); a call past its deadline is ``defaulted`` and its run set pending (the call
then returns the task's declared default, or fails the step when it declares none).
Each transition is journaled: ``call_deferred``, ``call_resumed``, ``call_defaulted``.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson

from edgeos.routing.decide import CallDeferred
from edgeos.state import journal

if TYPE_CHECKING:
    from edgeos.state import Database

#: The state of a run parked on a deferred call.
WAITING_VENUE = "waiting_venue"

_COLUMNS = "id, run_id, model, awaiting, state, deadline, default_outputs"


@dataclass(frozen=True)
class DeferredCall:
    """One deferred call, as stored."""

    id: str
    run_id: str
    model: str
    awaiting: list[str]
    #: waiting, resumed (a venue came back) or defaulted (the deadline passed).
    state: str
    deadline: float
    #: The declared default outputs (None: the task declares none).
    default: dict[str, Any] | None


def call_id(run_id: str, step_index: int, call: int) -> str:
    """The id of a step's ``call``-th routed call: the same on every attempt of the step."""
    return f"{run_id}:{step_index}:{call}"


def park(
    conn: sqlite3.Connection,
    *,
    call: str,
    run_id: str,
    agent: str,
    step: str,
    deferred: CallDeferred,
    wait_s: float,
    default: Mapping[str, Any] | None,
    at: float,
) -> None:
    """Queue a deferred call and park its run, in the caller's write transaction.

    A call deferred again (its venue dropped again after it resumed) keeps its first
    deadline: waiting never restarts. A run cancelled while its step ran stays cancelled.
    """
    parked = conn.execute(
        f"UPDATE runs SET state = '{WAITING_VENUE}', updated_at = ? "
        "WHERE id = ? AND state IN ('pending', 'running')",
        (at, run_id),
    ).rowcount
    if not parked:
        return
    conn.execute(
        "INSERT INTO deferred_tasks (id, run_id, agent, step, model, awaiting, reason, "
        "default_outputs, deadline, deferred_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
        "ON CONFLICT (id) DO UPDATE SET state = 'waiting', awaiting = excluded.awaiting, "
        "reason = excluded.reason, settled_at = NULL",
        (call, run_id, agent, step, deferred.model, _dumps(deferred.awaiting), deferred.reason,
         None if default is None else _dumps(dict(default)), at + wait_s, at),
    )  # fmt: skip
    deadline = conn.execute("SELECT deadline FROM deferred_tasks WHERE id = ?", (call,)).fetchone()
    journal.append(
        conn, run_id, "call_deferred",
        {"call": call, "model": deferred.model, "awaiting": deferred.awaiting,
         "reason": deferred.reason, "deadline": deadline[0]},
        step=step, at=at,
    )  # fmt: skip


def waiting(db: Database) -> bool:
    """Whether any call waits (a cheap read before a scan writes anything)."""
    row = db.reader().execute("SELECT 1 FROM deferred_tasks WHERE state = 'waiting' LIMIT 1")
    return row.fetchone() is not None


def settle(conn: sqlite3.Connection, *, online: Collection[str], at: float) -> int:
    """Resume the calls whose venue is back and default those past their deadline.

    Runs in the caller's write transaction; returns how many calls it settled.
    """
    rows = conn.execute(
        "SELECT id, run_id, step, model, awaiting, deadline, default_outputs "
        "FROM deferred_tasks WHERE state = 'waiting' ORDER BY deadline"
    ).fetchall()
    settled = 0
    for call, run_id, step, model, awaiting, deadline, default in rows:
        back = sorted(set(orjson.loads(awaiting)) & set(online))
        if back:
            state, kind = "resumed", "call_resumed"
            payload: dict[str, Any] = {"call": call, "model": model, "venues_back": back}
        elif deadline <= at:
            state, kind = "defaulted", "call_defaulted"
            payload = {"call": call, "model": model, "deadline": deadline,
                       "default": None if default is None else orjson.loads(default)}  # fmt: skip
        else:
            continue
        conn.execute(
            "UPDATE deferred_tasks SET state = ?, settled_at = ? WHERE id = ?", (state, at, call)
        )
        parked = conn.execute(
            f"UPDATE runs SET state = 'pending', updated_at = ? "
            f"WHERE id = ? AND state = '{WAITING_VENUE}'",
            (at, run_id),
        ).rowcount
        if parked:  # a run cancelled meanwhile stays cancelled
            journal.append(conn, run_id, kind, payload, step=step, at=at)
        settled += 1
    return settled


def deferred_call(db: Database, call: str) -> DeferredCall | None:
    """The stored deferred call ``call``, if it was ever deferred."""
    reader = db.reader()
    row = reader.execute(f"SELECT {_COLUMNS} FROM deferred_tasks WHERE id = ?", (call,)).fetchone()
    return None if row is None else _row(row)


def queue(db: Database, *, state: str | None = "waiting") -> list[DeferredCall]:
    """Deferred calls in a state (all when None), by deadline."""
    where, args = ("", ()) if state is None else (" WHERE state = ?", (state,))
    rows = db.reader().execute(
        f"SELECT {_COLUMNS} FROM deferred_tasks{where} ORDER BY deadline", args
    )
    return [_row(r) for r in rows]


def _row(row: tuple[Any, ...]) -> DeferredCall:
    id_, run_id, model, awaiting, state, deadline, default = row
    return DeferredCall(
        id_, run_id, model, orjson.loads(awaiting), state, deadline,
        None if default is None else orjson.loads(default),
    )  # fmt: skip


def _dumps(value: Any) -> str:
    return orjson.dumps(value).decode()
