"""What a named API token may spend on paid venues, and what it spent.

A token made with ``cost_per_day`` (``edgeos node token create ... --cost-per-day X``)
may have the chat calls the node relays for it to paid venues cost that much in a sliding
day. A call is let through while the token's spend is under the budget and counted at its
real cost when it ends, so the last call may go over by its own cost. Spending is kept in
``api_token_spend``, one row per call, so a restart does not reset it.
"""

from __future__ import annotations

import time

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


def check_budget(db: Database, principal: Principal, now: float | None = None) -> None:
    """BudgetExceeded (429) when the token has spent its ``cost_per_day``, saying when
    enough of it leaves the window for the next call."""
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
    if total < principal.cost_per_day:
        return
    # The next call passes once what leaves the window brings the spend under the budget.
    left = total
    retry_after = DAY
    for at, cost in rows:
        left -= float(cost)
        if left < principal.cost_per_day:
            retry_after = float(at) + DAY - now
            break
    raise BudgetExceeded(
        window="day", budget=principal.cost_per_day, spent=total, cost=0.0,
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
