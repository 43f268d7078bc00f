"""The inventory agent's steps: sense, reason, act, learn.

- **sense** claims the day the ``pos.sales`` event closed (the latest day for a run started
  by hand; one review per day, whichever run is first: an event may come twice), reads
  every SKU's observation, finds SKUs back on the shelf since the previous review, and
  collects earlier predictions whose horizon (the lead time) has closed.
- **reason** asks the ``stockout-risk`` model about every SKU with a routed ``classify``,
  so the node routes each call (``routing`` in agent.yaml): the edge model answers, and
  when it is less sure than the cascade threshold the fleet's larger model answers
  instead; when the answer is still less sure than ``escalation.confidence_threshold``,
  ``classify`` asks a person, and the run waits.
  For each SKU at risk it recalls, by meaning, what its memory holds about orders of that
  SKU: a supplier note that it arrives short raises the quantity to make up for the share
  the supplier does not fill; a past reorder that did not keep the shelf stocked adds a
  day of sales. Without an embedding model on the node it decides from the model alone.
- **act** places an expedited reorder with the supplier for each SKU judged at risk, and
  sends a back-in-stock message to each subscriber of a SKU that came back. Who the
  subscribers are is looked up here, where the messages are decided, so that no step's
  output (which the journal keeps) holds them: the messaging contract marks the
  recipient personal, and the journal holds only a pseudonym of it. When the node
  process's ``INVENTORY_DRAFTER`` names a generative model, that model drafts each
  message on the device, held to a schema that keeps the recipient and the SKU exact
  (:mod:`edgeos.demo.drafting`); otherwise the message is a template.
- **learn** records the day's predictions in the store database, gives each earlier
  prediction whose horizon has closed to the agent's training set with what actually
  happened (``ctx.feedback``), remembers the reorders that did not keep the shelf stocked
  (long-term memory, with the step's commit), and returns a summary.

Where the store is: the run's input ``{"store_db": PATH}``, else the node process's
``INVENTORY_STORE_DB`` environment variable (an event's data does not say). The node runs
a copy of this bundle from its own data directory, so no path is relative to this file.

A step that asked a person runs again from its start once answered, so ``reason`` only
depends on its input and the model. Writes to the store database (the day's claim, the
predictions, the marks on scored predictions) carry the run's id or are keyed by day and
lane, so a step run twice writes the same rows.
"""

from __future__ import annotations

import math
import os
import sqlite3
from contextlib import closing
from pathlib import Path
from typing import Any

import orjson

from edgeos.agents.context import RunContext
from edgeos.demo.drafting import DRAFTER_ENV, back_in_stock
from edgeos.demo.retail import FEATURE_NAMES
from edgeos.demo.store import STORE_DB_ENV, transaction
from edgeos.errors import NotFoundError

MODEL = "stockout-risk"
AT_RISK = "stockout"
# An expedited order arrives the next day; it covers sales until the planner's next
# delivery plus this many days of margin.
MARGIN_DAYS = 2
# Records recalled about a SKU weigh in only when at least this similar to the question
# (all-MiniLM-L6-v2 cosine: notes on the point score 0.55 and more, others 0.35-0.5).
RELEVANT = 0.45

_COLUMN = {name: i for i, name in enumerate(FEATURE_NAMES)}


def _store_path(data: Any) -> str:
    given = data.get("store_db") if isinstance(data, dict) else None
    path = given or os.environ.get(STORE_DB_ENV)
    if not path:
        raise RuntimeError(
            f"no store database: give the run input {{'store_db': PATH}} or set {STORE_DB_ENV}"
        )
    return str(path)


def _connect(path: str) -> sqlite3.Connection:
    # mode=rw: a missing file is an error, not a new empty store.
    uri = f"{Path(path).absolute().as_uri()}?mode=rw"
    conn = sqlite3.connect(uri, uri=True, timeout=5.0, isolation_level=None)
    conn.execute("PRAGMA busy_timeout = 5000")
    return conn


def _claim(conn: sqlite3.Connection, day: int, run_id: str, now: float) -> bool:
    """True if this run reviews ``day``: it claimed it now, or in an earlier try of this step."""
    with transaction(conn):
        conn.execute(
            "INSERT OR IGNORE INTO reviews (day, run_id, claimed_at) VALUES (?, ?, ?)",
            (day, run_id, now),
        )
        owner = conn.execute("SELECT run_id FROM reviews WHERE day = ?", (day,)).fetchone()[0]
    return bool(owner == run_id)


_HORIZON_CLOSED = (
    "FROM predictions p JOIN observations q ON q.day = p.day AND q.store = p.store "
    "AND q.sku = p.sku WHERE p.day + q.lead_time_days <= ?"
)
# Empty-shelf closes in the prediction's horizon (day, day + lead time], the definition of
# the models' training label.
_EMPTY_DAYS = (
    "(SELECT count(*) FROM observations o WHERE o.store = p.store AND o.sku = p.sku "
    "AND o.day > p.day AND o.day <= p.day + q.lead_time_days AND o.stock_on_hand = 0)"
)


def _outcomes(conn: sqlite3.Connection, latest: int) -> dict[str, int]:
    """Score every prediction whose horizon (its lane's lead time) has closed by ``latest``.

    A prediction of ``stockout`` is right if the shelf was empty at a close in its
    horizon. The agent's own reorders can prevent the stockouts it predicts, so this
    measures the decisions as made, not the model alone.
    """
    rows = conn.execute(f"SELECT p.label, {_EMPTY_DAYS} {_HORIZON_CLOSED}", (latest,)).fetchall()
    return {
        "resolved": len(rows),
        "correct": sum(1 for label, empty in rows if (label == AT_RISK) == bool(empty)),
        "stockouts": sum(1 for _, empty in rows if empty),
    }


def _newly_resolved(conn: sqlite3.Connection, latest: int, run_id: str) -> list[dict[str, Any]]:
    """Predictions resolved by ``latest`` and not yet scored: this run scores them.

    Marked with the run's id, so a second try of the step finds the same ones again and
    a concurrent run does not take them too.
    """
    with transaction(conn):
        conn.execute(
            "UPDATE predictions SET scored_by = ? WHERE scored_by IS NULL AND EXISTS ("
            "SELECT 1 FROM observations q WHERE q.day = predictions.day "
            "AND q.store = predictions.store AND q.sku = predictions.sku "
            "AND predictions.day + q.lead_time_days <= ?)",
            (run_id, latest),
        )
    rows = conn.execute(
        "SELECT p.day, p.store, p.sku, p.label, p.p_stockout, p.escalated, q.features, "
        f"{_EMPTY_DAYS} {_HORIZON_CLOSED} AND p.scored_by = ? ORDER BY p.day, p.store, p.sku",
        (latest, run_id),
    ).fetchall()
    return [
        {"day": day, "store": store, "sku": sku, "label": label, "p_stockout": p,
         "escalated": bool(escalated), "features": orjson.loads(features),
         "stockout": bool(empty)}
        for day, store, sku, label, p, escalated, features, empty in rows
    ]  # fmt: skip


def _closed_day(data: Any) -> int | None:
    """The day a ``pos.sales`` event closed (its contract says the row has one), else None."""
    row = data.get("row") if isinstance(data, dict) else None
    return int(row["day"]) if isinstance(row, dict) else None


def sense(ctx: RunContext, data: Any) -> dict[str, Any]:
    """Claim the day the event closed (or the latest) and read what the store knows."""
    path = _store_path(data)
    with closing(_connect(path)) as conn:
        day = _closed_day(data)
        if day is None:
            day = conn.execute("SELECT max(day) FROM observations").fetchone()[0]
        if day is None or not _claim(conn, day, ctx.run_id, ctx.now()):
            # Nothing new since the last review: the run ends without deciding anything.
            return {"store_db": path, "day": day, "new": False, "lanes": [], "back": []}
        previous = conn.execute("SELECT max(day) FROM reviews WHERE day < ?", (day,)).fetchone()[0]
        since = day - 1 if previous is None else previous
        lanes = [
            {"store": store, "sku": sku, "stock": stock, "features": orjson.loads(features)}
            for store, sku, stock, features in conn.execute(
                "SELECT store, sku, stock_on_hand, features FROM observations WHERE day = ? "
                "ORDER BY store, sku",
                (day,),
            )
        ]
        # Back in stock: on the shelf today, empty at a close since the previous review.
        back = []
        for lane in lanes:
            if lane["stock"] == 0:
                continue
            was_empty = conn.execute(
                "SELECT count(*) FROM observations WHERE store = ? AND sku = ? AND day >= ? "
                "AND day < ? AND stock_on_hand = 0",
                (lane["store"], lane["sku"], since, day),
            ).fetchone()[0]
            if was_empty:
                back.append({"store": lane["store"], "sku": lane["sku"]})
        resolved = _newly_resolved(conn, day, ctx.run_id)
        outcomes = _outcomes(conn, day)
    return {
        "store_db": path, "day": day, "new": True, "lanes": lanes, "back": back,
        "resolved": resolved, "outcomes": outcomes,
    }  # fmt: skip


def _reorder_qty(features: list[float], extra_days: int = 0) -> int:
    """Units that carry the shelf from tomorrow to the planner's next delivery, with margin."""
    f = {name: features[i] for name, i in _COLUMN.items()}
    cover = f["days_to_next_delivery"] + MARGIN_DAYS
    rate = max(f["sales_mean_7d"], f["sales_mean_28d"])
    if f["promo_starts_in_days"] <= cover:
        rate *= f["promo_uplift"]
    needed = math.ceil(rate * cover - f["stock_on_hand"] - f["units_on_order"])
    # The model says the shelf will run dry: send at least a day of sales even when the
    # open orders look sufficient on paper (they may be late or short).
    # Days more that memory asks for go on top: the order it would have made fell short.
    return max(needed, math.ceil(rate), 1) + extra_days * math.ceil(rate)


def _recalled(ctx: RunContext, sku: str) -> list[Any]:
    """What memory holds that bears on the size of an order of ``sku``: supplier notes
    that it arrives short, earlier reorders that were not enough; most relevant first."""
    try:
        found = ctx.memory.recall(
            f"do orders of {sku} arrive short, or fail to keep the shelf stocked?",
            k=3,
            where={"sku": sku},
        )
    except NotFoundError:  # no embedding model on this node: the model alone decides
        return []
    return [
        r
        for r in found
        if r.similarity >= RELEVANT
        and ("fill_rate" in r.metadata or r.metadata.get("kind") == "outcome")
    ]


def _adjusted_qty(features: list[float], recalled: list[Any]) -> int:
    """The reorder, raised for what memory says: the supplier's fill rate of the SKU, and
    a day more when an earlier reorder of it did not keep the shelf stocked."""
    ran_out = any(r.metadata.get("kind") == "outcome" for r in recalled)
    qty = _reorder_qty(features, extra_days=1 if ran_out else 0)
    fill = min(
        (float(r.metadata["fill_rate"]) for r in recalled if "fill_rate" in r.metadata),
        default=1.0,
    )
    return math.ceil(qty / fill) if 0 < fill < 1 else qty


def reason(ctx: RunContext, data: dict[str, Any]) -> dict[str, Any]:
    """Judge every SKU; calls are routed, and unsure answers go to a person; reorders of
    SKUs at risk follow what memory recalls about them."""
    model = ctx.model(MODEL)
    decisions = []
    for lane in data["lanes"]:
        decision = model.classify(
            {"features": [lane["features"]]},
            question=f"{lane['sku']} at {lane['store']}, day {data['day']}: stockout within "
            "the lead time?",
            routed=True,
        )
        p_stockout = decision.scores.get(AT_RISK, 0.0)
        at_risk = decision.label == AT_RISK
        recalled = _recalled(ctx, lane["sku"]) if at_risk else []
        qty = _adjusted_qty(lane["features"], recalled) if at_risk else 0
        raised = at_risk and qty > _reorder_qty(lane["features"])
        decisions.append(
            {
                "store": lane["store"],
                "sku": lane["sku"],
                "label": decision.label,
                "p_stockout": round(p_stockout, 4),
                "escalated": decision.escalated,
                "qty": qty,
                # What memory changed: the records behind a raised quantity.
                "raised_by": [r.id for r in recalled] if raised else [],
            }
        )
    return {
        "store_db": data["store_db"], "day": data["day"], "new": data["new"],
        "decisions": decisions, "back": data["back"], "resolved": data.get("resolved", []),
        "outcomes": data.get("outcomes"),
    }  # fmt: skip


def _subscribers(path: str, store: str, sku: str) -> list[str]:
    with closing(_connect(path)) as conn:
        rows = conn.execute(
            "SELECT customer FROM subscribers WHERE store = ? AND sku = ? ORDER BY customer",
            (store, sku),
        )
        return [customer for (customer,) in rows]


def act(ctx: RunContext, data: dict[str, Any]) -> dict[str, Any]:
    """Reorder what is at risk; tell subscribers what is back. Delivered after commit."""
    reorders = 0
    for d in data["decisions"]:
        if d["qty"] > 0:
            ctx.effect(
                "supplier.reorder",
                {"store": d["store"], "sku": d["sku"], "qty": d["qty"], "day": data["day"],
                 "p_stockout": d["p_stockout"], "expedite": True},
            )  # fmt: skip
            reorders += 1
    messages = 0
    drafter = os.environ.get(DRAFTER_ENV) or None
    for lane in data["back"]:
        for customer in _subscribers(data["store_db"], lane["store"], lane["sku"]):
            message = back_in_stock(ctx, drafter, customer, lane["store"], lane["sku"])
            ctx.effect("messaging.send", message)
            messages += 1
    return {**data, "reorders": reorders, "messages": messages,
            "drafted": messages if drafter else 0}  # fmt: skip


def learn(ctx: RunContext, data: dict[str, Any]) -> dict[str, Any]:
    """Record the day's predictions, feed back the ones resolved, and summarise the run.

    Each prediction whose horizon closed goes to the agent's training set with what
    happened (``ctx.feedback``); the day's new predictions wait in the store database
    until theirs closes.
    """
    if data["new"]:
        with closing(_connect(data["store_db"])) as conn, transaction(conn):
            conn.executemany(
                "INSERT INTO predictions (day, store, sku, label, p_stockout, escalated, "
                "run_id) VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (day, store, sku) DO "
                "UPDATE SET label = excluded.label, p_stockout = excluded.p_stockout, "
                "escalated = excluded.escalated, run_id = excluded.run_id",
                [
                    (data["day"], d["store"], d["sku"], d["label"], d["p_stockout"],
                     int(d["escalated"]), ctx.run_id)
                    for d in data["decisions"]
                ],
            )  # fmt: skip
    learned = 0
    for p in data.get("resolved", []):
        decision = {k: p[k] for k in ("day", "store", "sku", "label", "p_stockout", "escalated")}
        actual = AT_RISK if p["stockout"] else "in_stock"
        ctx.feedback(
            {**decision, "model": MODEL, "features": p["features"]},
            {"label": actual, "right": p["label"] == actual},
        )
        if p["label"] == AT_RISK and p["stockout"]:
            learned += _remember_shortfall(ctx, p)
    outcomes = data.get("outcomes") or {"resolved": 0, "correct": 0, "stockouts": 0}
    return {
        "day": data["day"],
        "reviewed": data["new"],
        "decisions": len(data["decisions"]),
        "at_risk": [d["sku"] for d in data["decisions"] if d["label"] == AT_RISK],
        "escalated": sum(1 for d in data["decisions"] if d["escalated"]),
        "reorders": data["reorders"],
        "messages": data["messages"],
        "drafted": data.get("drafted", 0),
        "scored": len(data.get("resolved", [])),
        "outcomes": outcomes,
        "raised": sum(1 for d in data["decisions"] if d.get("raised_by")),
        "learned": learned,
    }


def _remember_shortfall(ctx: RunContext, p: dict[str, Any]) -> int:
    """Remember a reorder that did not keep the shelf stocked (1), or nothing without memory."""
    try:
        ctx.memory.remember(
            f"{p['sku']} ran out at {p['store']} within its lead time although it was "
            f"reordered on day {p['day']}: the order was not enough to keep the shelf stocked.",
            {"kind": "outcome", "sku": p["sku"], "day": p["day"]},
            importance=0.7,
        )
    except NotFoundError:
        return 0
    return 1
