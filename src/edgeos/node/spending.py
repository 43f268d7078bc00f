"""What a named API token may spend on paid venues, and what it spent.

A token made with ``cost_per_day`` (``edgeos node token create ... --cost-per-day X``)
may have the chat calls the node relays for it to paid venues cost that much in a sliding
day. A call is let through while the token's spend is under the budget and counted at its
real cost when it ends, so the last call may go over by its own cost. Calls made together
do not add up to more: while one is in flight, what it may cost (:class:`Holds`, priced
from its prompt and ``max_tokens`` at the venue's prices) counts as spent. Spending is
kept in ``api_token_spend``, one row per call, so a restart does not reset it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from edgeos.limits import BudgetExceeded
from edgeos.node.tokens import Principal
from edgeos.state import Database

#: The window of a token's budget.
DAY = 86_400.0


def spent(db: Database, token_digest: str, now: float | None = None) -> float:
    """What the token's relayed calls cost in the day up to ``now``."""
    now = time.time() if now is None else now
    row = (
        db.reader()
        .execute(
            "SELECT COALESCE(SUM(cost), 0) FROM api_token_spend WHERE digest = ? AND at > ?",
            (token_digest, now - DAY),
        )
        .fetchone()
    )
    return float(row[0])


def check_budget(
    db: Database, principal: Principal, now: float | None = None, *, held: float = 0.0
) -> None:
    """BudgetExceeded (429) when the token has spent its ``cost_per_day``, counting
    ``held`` (its calls in flight) as spent, saying when the next call may pass."""
    if principal.digest is None or principal.cost_per_day is None:
        return
    now = time.time() if now is None else now
    rows = (
        db.reader()
        .execute(
            "SELECT at, cost FROM api_token_spend WHERE digest = ? AND at > ? ORDER BY at",
            (principal.digest, now - DAY),
        )
        .fetchall()
    )
    total = sum(float(cost) for _, cost in rows)
    if total + held < principal.cost_per_day:
        return
    # Refused for calls in flight only: they end (and are charged) in seconds.
    # Else the next call passes once what leaves the window brings the spend under it.
    retry_after = 1.0 if total < principal.cost_per_day else DAY
    left = total
    for at, cost in rows if total >= principal.cost_per_day else ():
        left -= float(cost)
        if left < principal.cost_per_day:
            retry_after = float(at) + DAY - now
            break
    raise BudgetExceeded(
        window="day", budget=principal.cost_per_day, spent=total + held, cost=0.0,
        retry_after=max(1.0, retry_after), owner=f"token '{principal.name}'",
    )  # fmt: skip


def record_spend(db: Database, principal: Principal, cost: float) -> None:
    """Count a relayed call's cost against the token (nothing for the local token); rows
    out of the window go at the same time."""
    if principal.digest is None or cost <= 0:
        return
    now = time.time()
    with db.transaction() as conn:
        conn.execute(
            "INSERT INTO api_token_spend (digest, at, cost) VALUES (?, ?, ?)",
            (principal.digest, now, cost),
        )
        conn.execute("DELETE FROM api_token_spend WHERE at <= ?", (now - DAY,))


class Holds:
    """What each token's relayed calls in flight may cost, counted as spent until they
    end: calls made together cannot pass the budget by more than the last one's cost."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._held: dict[str, float] = {}

    def take(
        self, db: Database, principal: Principal | None, estimate: float
    ) -> Callable[[], None]:
        """Check the token's budget with its calls in flight, and hold ``estimate`` for this
        one; BudgetExceeded if it is spent. Returns the release (call it once the call
        was charged or failed; calling it again does nothing). No caller (an app without
        the API's gate): nothing to check or hold."""
        if principal is None:
            return _nothing
        digest = principal.digest
        if digest is None or principal.cost_per_day is None or estimate <= 0:
            check_budget(db, principal)
            return _nothing
        with self._lock:
            check_budget(db, principal, held=self._held.get(digest, 0.0))
            self._held[digest] = self._held.get(digest, 0.0) + estimate
        released = False

        def release() -> None:
            nonlocal released
            with self._lock:
                if released:
                    return
                released = True
                left = self._held[digest] - estimate
                if left > 1e-12:
                    self._held[digest] = left
                else:
                    del self._held[digest]

        return release


def _nothing() -> None:
    """The release of a call nothing was held for."""
