"""Effects as a person sees them: list, show, retry, discard (``edgeos effects ...``).

An effect the delivery worker gave up on is ``dead``; one it did not send again because
it may have been applied (:data:`~edgeos.connectors.delivery.NEEDS_REVIEW`) is shown as
``needs-review``: someone checks at the target whether it was applied, then retries it
(sent again, same idempotency key) or discards it with a reason. Each decision is
journaled in the run's hash-chained journal (``effect_retried``, ``effect_discarded``)
with who made it, in the transaction that changes the outbox row.

A payload is shown as the journal recorded it, with fields its contract marks personal
pseudonymized; the outbox's own copy (which keeps the values to deliver) is never shown.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from edgeos.connectors.delivery import NEEDS_REVIEW
from edgeos.errors import ConfigError, ConflictError, NotFoundError
from edgeos.state import journal, outbox
from edgeos.state.database import Database
from edgeos.state.journal import JournalRecord
from edgeos.state.outbox import OutboxEntry

#: What ``edgeos effects list --state`` accepts.
STATES = ("pending", "needs-review", "dead", "discarded", "delivered")


@dataclass(frozen=True)
class Effect:
    """One effect in the outbox, with the state a person acts on."""

    entry: OutboxEntry
    state: str

    @property
    def key(self) -> str:
        """The effect's id: its idempotency key."""
        return self.entry.key


def _view(entry: OutboxEntry) -> Effect:
    review = entry.state == outbox.DEAD and (entry.last_error or "").startswith(NEEDS_REVIEW)
    return Effect(entry, "needs-review" if review else entry.state)


def list_effects(db: Database, state: str | None = None, *, limit: int = 100) -> list[Effect]:
    """Effects, newest first: in ``state`` (``dead`` includes those needing review), or
    every one not delivered when ``state`` is None."""
    if state is not None and state not in STATES:
        raise ConfigError(f"effect state {state!r}: use one of {', '.join(STATES)}")
    if state == "needs-review":
        found = outbox.entries(db, states=[outbox.DEAD], error_prefix=NEEDS_REVIEW, limit=limit)
    elif state is None:
        states = [outbox.PENDING, outbox.DEAD, outbox.DISCARDED]
        found = outbox.entries(db, states=states, limit=limit)
    else:
        found = outbox.entries(db, states=[state], limit=limit)
    return [_view(e) for e in found]


def get_effect(db: Database, key: str) -> Effect:
    """One effect; NotFoundError naming the key."""
    entry = outbox.get(db, key)
    if entry is None:
        raise NotFoundError(f"no effect {key!r} in the outbox (edgeos effects list)")
    return _view(entry)


def history(db: Database, effect: Effect) -> tuple[dict[str, Any] | None, list[JournalRecord]]:
    """The payload as journaled (personal fields pseudonymized; None once retention took
    the record), and the journal records about the effect, oldest first."""
    records = [
        r for r in journal.for_run(db, effect.entry.run_id)
        if r.kind.startswith("effect_") and r.payload.get("key") == effect.key
    ]  # fmt: skip
    enqueued = next((r for r in records if r.kind == "effect_enqueued"), None)
    payload = None if enqueued is None else enqueued.payload.get("payload")
    return (payload if isinstance(payload, dict) else None), records


def retry_effect(db: Database, key: str, *, by: str, now: float | None = None) -> Effect:
    """Send a dead (or waiting) effect again, now, with the same key; journaled."""
    now = time.time() if now is None else now
    with db.transaction() as conn:
        effect = get_effect(db, key)
        if not outbox.requeue(conn, key, at=now):
            raise ConflictError(f"effect {key} is {effect.state}: only a pending or dead one "
                                "can be retried")  # fmt: skip
        journal.append(
            conn, effect.entry.run_id, "effect_retried",
            {"key": key, "connector": effect.entry.connector, "by": by, "was": effect.state,
             "last_error": effect.entry.last_error},
            at=now,
        )  # fmt: skip
    return get_effect(db, key)


def discard_effect(
    db: Database, key: str, *, reason: str, by: str, now: float | None = None
) -> Effect:
    """Set a dead (or waiting) effect aside for good, with the reason; journaled."""
    if not reason.strip():
        raise ConfigError("--reason: say why the effect is discarded (it is kept in the journal)")
    now = time.time() if now is None else now
    with db.transaction() as conn:
        effect = get_effect(db, key)
        if not outbox.discard(conn, key, error=f"discarded by {by}: {reason.strip()}"):
            raise ConflictError(f"effect {key} is {effect.state}: only a pending or dead one "
                                "can be discarded")  # fmt: skip
        journal.append(
            conn, effect.entry.run_id, "effect_discarded",
            {"key": key, "connector": effect.entry.connector, "by": by, "was": effect.state,
             "reason": reason.strip()},
            at=now,
        )  # fmt: skip
    return get_effect(db, key)
