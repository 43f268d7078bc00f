"""The transactional outbox: effects waiting to be delivered to the outside world.

An effect is written here in the same transaction as the journal record of the step
that decided it, keyed by an idempotency key derived from (run, step, index), so a
replayed step cannot enqueue it twice and a delivery can be retried safely.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from edgeos.state.database import Database

PENDING, DELIVERED, DEAD = "pending", "delivered", "dead"
#: Set aside by a person (``edgeos effects discard``): never delivered.
DISCARDED = "discarded"
#: Sealed with its run into an envelope: the node the run moved to delivers it, with the
#: same key, so the delivery worker here never picks it (it is not pending).
HANDED_OVER = "handed_over"


@dataclass(frozen=True)
class OutboxEntry:
    """One effect and its delivery state."""

    key: str
    run_id: str
    connector: str
    operation: str
    payload: dict[str, Any]
    state: str = PENDING
    attempts: int = 0
    next_attempt_at: float = 0.0
    last_error: str | None = None
    created_at: float = 0.0
    delivered_at: float | None = None


_COLUMNS = (
    "key, run_id, connector, operation, payload, state, attempts, next_attempt_at, "
    "last_error, created_at, delivered_at"
)


def _entry(row: tuple[Any, ...]) -> OutboxEntry:
    values = list(row)
    values[4] = orjson.loads(values[4])
    return OutboxEntry(*values)


def enqueue(conn: sqlite3.Connection, entry: OutboxEntry, *, at: float) -> bool:
    """Add an effect inside the caller's transaction; False if its key was already there."""
    cursor = conn.execute(
        "INSERT INTO outbox (key, run_id, connector, operation, payload, state, attempts, "
        "next_attempt_at, created_at) VALUES (?, ?, ?, ?, ?, 'pending', 0, ?, ?) "
        "ON CONFLICT (key) DO NOTHING",
        (entry.key, entry.run_id, entry.connector, entry.operation,
         orjson.dumps(entry.payload).decode(), at, at),
    )  # fmt: skip
    return cursor.rowcount == 1


def hand_over(conn: sqlite3.Connection, run_id: str) -> list[OutboxEntry]:
    """Take a run's pending effects out of delivery here (inside the caller's transaction,
    the one that seals the run); returns them as they were, in the order they were decided."""
    rows = conn.execute(
        f"SELECT {_COLUMNS} FROM outbox WHERE run_id = ? AND state = 'pending' "
        "ORDER BY created_at, key",
        (run_id,),
    ).fetchall()
    conn.execute(
        "UPDATE outbox SET state = ? WHERE run_id = ? AND state = 'pending'", (HANDED_OVER, run_id)
    )
    return [_entry(r) for r in rows]


def adopt(conn: sqlite3.Connection, entry: OutboxEntry, *, at: float) -> bool:
    """Take over an effect another node handed over, with its key and attempts (inside the
    caller's transaction): a new pending row, or this node's own handed-over row pending
    again when the run comes back. False when the key is here in any other state."""
    cursor = conn.execute(
        "INSERT INTO outbox (key, run_id, connector, operation, payload, state, attempts, "
        "next_attempt_at, created_at) VALUES (?, ?, ?, ?, ?, 'pending', ?, ?, ?) "
        "ON CONFLICT (key) DO UPDATE SET state = 'pending', attempts = excluded.attempts, "
        "next_attempt_at = excluded.next_attempt_at, payload = excluded.payload "
        "WHERE outbox.state = ? AND outbox.run_id = excluded.run_id",
        (entry.key, entry.run_id, entry.connector, entry.operation,
         orjson.dumps(entry.payload).decode(), entry.attempts, at, at, HANDED_OVER),
    )  # fmt: skip
    return cursor.rowcount == 1


def due(db: Database, now: float, limit: int = 100) -> list[OutboxEntry]:
    """Pending effects whose next attempt is due, oldest first."""
    rows = db.reader().execute(
        f"SELECT {_COLUMNS} FROM outbox WHERE state = 'pending' AND next_attempt_at <= ? "
        "ORDER BY next_attempt_at, created_at LIMIT ?",
        (now, limit),
    )
    return [_entry(r) for r in rows]


def next_due_at(db: Database) -> float | None:
    """When the earliest pending effect is due, or None when nothing is pending."""
    row = (
        db.reader()
        .execute("SELECT min(next_attempt_at) FROM outbox WHERE state = 'pending'")
        .fetchone()
    )
    return None if row is None or row[0] is None else float(row[0])


def get(db: Database, key: str) -> OutboxEntry | None:
    """One effect by its idempotency key."""
    row = db.reader().execute(f"SELECT {_COLUMNS} FROM outbox WHERE key = ?", (key,)).fetchone()
    return None if row is None else _entry(row)


def for_run(db: Database, run_id: str) -> list[OutboxEntry]:
    """Every effect of one run, in the order they were decided."""
    rows = db.reader().execute(
        f"SELECT {_COLUMNS} FROM outbox WHERE run_id = ? ORDER BY created_at, key", (run_id,)
    )
    return [_entry(r) for r in rows]


def mark_delivered(
    conn: sqlite3.Connection, key: str, *, at: float, result: dict[str, Any] | None = None
) -> None:
    """Record a successful delivery (inside the caller's transaction)."""
    conn.execute(
        "UPDATE outbox SET state = 'delivered', attempts = attempts + 1, delivered_at = ?, "
        "result = ?, last_error = NULL WHERE key = ? AND state = 'pending'",
        (at, orjson.dumps(result).decode() if result is not None else None, key),
    )


def mark_retry(conn: sqlite3.Connection, key: str, *, error: str, next_attempt_at: float) -> None:
    """Record a failed attempt that will be tried again at ``next_attempt_at``."""
    conn.execute(
        "UPDATE outbox SET attempts = attempts + 1, last_error = ?, next_attempt_at = ? "
        "WHERE key = ? AND state = 'pending'",
        (error, next_attempt_at, key),
    )


def postpone(conn: sqlite3.Connection, key: str, *, error: str, next_attempt_at: float) -> None:
    """Try again later without counting an attempt (none was made, e.g. no binding yet)."""
    conn.execute(
        "UPDATE outbox SET last_error = ?, next_attempt_at = ? WHERE key = ? AND state = 'pending'",
        (error, next_attempt_at, key),
    )


def mark_dead(conn: sqlite3.Connection, key: str, *, error: str) -> None:
    """Give up on an effect: it stays in the outbox as dead, for a person to look at."""
    conn.execute(
        "UPDATE outbox SET state = 'dead', attempts = attempts + 1, last_error = ? "
        "WHERE key = ? AND state = 'pending'",
        (error, key),
    )


def entries(
    db: Database, *, states: Sequence[str] = (), error_prefix: str | None = None, limit: int = 100
) -> list[OutboxEntry]:
    """Effects in any of ``states`` (every state when empty) whose error starts with
    ``error_prefix`` (if given), newest first."""
    where: list[str] = ["1 = 1"]
    params: list[object] = []
    if states:
        where.append(f"state IN ({', '.join('?' * len(states))})")
        params += list(states)
    if error_prefix is not None:
        where.append("substr(last_error, 1, ?) = ?")
        params += [len(error_prefix), error_prefix]
    rows = db.reader().execute(
        f"SELECT {_COLUMNS} FROM outbox WHERE {' AND '.join(where)} "
        "ORDER BY created_at DESC, key LIMIT ?",
        (*params, limit),
    )
    return [_entry(r) for r in rows]


def requeue(conn: sqlite3.Connection, key: str, *, at: float) -> bool:
    """Make a dead or waiting effect due at ``at``, its attempts counted again from zero;
    False if it is neither."""
    cursor = conn.execute(
        "UPDATE outbox SET state = 'pending', attempts = 0, next_attempt_at = ? "
        "WHERE key = ? AND state IN ('pending', 'dead')",
        (at, key),
    )
    return cursor.rowcount == 1


def discard(conn: sqlite3.Connection, key: str, *, error: str) -> bool:
    """Set a dead or waiting effect aside for good; False if it is neither."""
    cursor = conn.execute(
        "UPDATE outbox SET state = 'discarded', last_error = ? "
        "WHERE key = ? AND state IN ('pending', 'dead')",
        (error, key),
    )
    return cursor.rowcount == 1


def counts(db: Database) -> dict[str, int]:
    """How many effects are pending, delivered and dead."""
    rows = db.reader().execute("SELECT state, count(*) FROM outbox GROUP BY state")
    found = {state: int(n) for state, n in rows}
    return {state: found.get(state, 0) for state in (PENDING, DELIVERED, DEAD)}
