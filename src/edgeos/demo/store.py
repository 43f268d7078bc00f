"""The demo store's own database, fed day by day by the retail simulator.

The inventory agent senses the world through this file, as an agent at a real store
would read the store's point-of-sale database. It is an SQLite file of its own, never the
node's, with these tables:

``observations``
    One row per store, SKU and day at close: units sold, stock on hand, the lane's
    supplier lead time, and ``features``, a JSON array in
    :data:`edgeos.demo.retail.FEATURE_NAMES` order, exactly what the stockout-risk
    models take.
``stock``
    The current stock on hand of every lane, as the shelf-level view of a store system.
``deliveries``
    Supplier shipments received (the agent's expedited reorders), and on which day.
``subscribers``
    Customers who asked to be told when a SKU is back in stock.
``reviews`` and ``predictions``
    The agent's own working records: which run reviewed which day, what it predicted
    for each lane, and which later run scored that prediction against what happened.

Beside the database, the point of sale exports a CSV file (:func:`sales_export`), a row
``day,units_sold,skus`` per day it closes: the node watches it and each new row is a
``pos.sales`` event that starts the agent.

:class:`StoreFeeder` advances the simulator one simulated day per tick in a background
thread, writes the day in one transaction, after receiving the shipments the supplier
sent since the last tick, then appends the day's row to the export.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import numpy as np

from edgeos.demo.background import BackgroundThread
from edgeos.demo.retail import FEATURE_NAMES, Observation, SalesSimulator

STORE_DB_ENV = "INVENTORY_STORE_DB"
"""Environment variable through which the demo tells the node's agent where the store is."""

SALES_COLUMNS = ("day", "units_sold", "skus")
"""The columns of the point of sale's export."""
_HEADER = ",".join(SALES_COLUMNS) + "\n"

# Lead time is a feature too; its own column keeps outcome queries plain SQL.
LEAD_TIME_COLUMN = FEATURE_NAMES.index("lead_time_days")

SCHEMA = """
CREATE TABLE IF NOT EXISTS observations (
    day INTEGER NOT NULL,
    store TEXT NOT NULL,
    sku TEXT NOT NULL,
    units_sold INTEGER NOT NULL,
    stock_on_hand INTEGER NOT NULL,
    lead_time_days INTEGER NOT NULL,
    features TEXT NOT NULL,
    PRIMARY KEY (day, store, sku)
);
CREATE TABLE IF NOT EXISTS stock (
    store TEXT NOT NULL,
    sku TEXT NOT NULL,
    on_hand INTEGER NOT NULL,
    day INTEGER NOT NULL,
    PRIMARY KEY (store, sku)
);
CREATE TABLE IF NOT EXISTS deliveries (
    order_id TEXT PRIMARY KEY,
    store TEXT NOT NULL,
    sku TEXT NOT NULL,
    qty INTEGER NOT NULL,
    day INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS subscribers (
    customer TEXT NOT NULL,
    store TEXT NOT NULL,
    sku TEXT NOT NULL,
    PRIMARY KEY (customer, store, sku)
);
CREATE TABLE IF NOT EXISTS reviews (
    day INTEGER PRIMARY KEY,
    run_id TEXT NOT NULL,
    claimed_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS predictions (
    day INTEGER NOT NULL,
    store TEXT NOT NULL,
    sku TEXT NOT NULL,
    label TEXT NOT NULL,
    p_stockout REAL NOT NULL,
    escalated INTEGER NOT NULL,
    run_id TEXT NOT NULL,
    scored_by TEXT,
    PRIMARY KEY (day, store, sku)
);
"""


def sales_export(store_db: Path) -> Path:
    """The point of sale's export file, beside the store database."""
    return store_db.with_name("sales.csv")


def export_day(export: Path, day: int, units_sold: int, skus: int) -> None:
    """Append a closed day's row to the export (its header first, for a new file).

    One write of a whole line: a reader never sees half a row as complete.
    """
    header = "" if export.exists() else _HEADER
    with export.open("a", encoding="utf-8") as handle:
        handle.write(f"{header}{day},{units_sold},{skus}\n")


def connect(path: Path, *, timeout: float = 10.0) -> sqlite3.Connection:
    """A connection to the store database in WAL mode (readers never wait for the feeder).

    Autocommit mode: writers open their transactions explicitly with ``BEGIN IMMEDIATE``.
    """
    conn = sqlite3.connect(path, timeout=timeout, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    return conn


@contextmanager
def transaction(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """``BEGIN IMMEDIATE`` ... ``COMMIT``, or ``ROLLBACK`` on any exception."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def create_store(
    path: Path, lanes: Sequence[tuple[str, str]], *, seed: int = 7, max_subscribers: int = 3
) -> None:
    """Create the store database with its tables and a few back-in-stock subscribers, and
    the point of sale's export with its header.

    Every lane (store, SKU) gets 0 to ``max_subscribers`` subscribers, drawn with ``seed``.
    """
    rng = np.random.default_rng([seed, 2])
    conn = connect(path)
    try:
        conn.executescript(SCHEMA)
        with transaction(conn):
            for store, sku in lanes:
                for n in range(int(rng.integers(0, max_subscribers + 1))):
                    customer = f"customer-{int(rng.integers(1000, 10000))}-{n}"
                    conn.execute(
                        "INSERT OR IGNORE INTO subscribers (customer, store, sku) VALUES (?, ?, ?)",
                        (customer, store, sku),
                    )
    finally:
        conn.close()
    export = sales_export(path)
    if not export.exists():
        export.write_text(_HEADER, encoding="utf-8")


@dataclass(frozen=True)
class Shipment:
    """Units a supplier sent to one lane; the store receives them at its next day."""

    order_id: str
    store: str
    sku: str
    qty: int


class StoreSimulator(SalesSimulator):
    """The retail simulator, plus receiving shipments that are not the planner's own."""

    def fast_forward(self, day: int) -> None:
        """Simulate, without recording, every day before ``day`` (day 0 is January 1st)."""
        while self.day < day - 1:
            self.step()

    def receive(self, lane: int, units: int) -> None:
        """Put ``units`` on lane ``lane``'s shelf now (before the next day's sales)."""
        if units < 0:
            raise ValueError("a shipment cannot take units away")
        # The simulator keeps its stock private; a subclass is where an outside delivery
        # can reach it without the simulator knowing about suppliers beyond its planner.
        self._stock[lane] += units


class StoreFeeder(BackgroundThread):
    thread_name = "store-feeder"

    """Advances a :class:`StoreSimulator` one day per tick and writes each day to the store.

    ``shipments`` is called at every tick for what the supplier sent since the last one;
    those units are on the shelf before the day's sales. ``start`` writes the first day at
    once, then a day every ``tick_seconds`` in a background thread, until ``stop``.
    """

    def __init__(
        self,
        path: Path,
        simulator: StoreSimulator,
        *,
        tick_seconds: float = 1.0,
        shipments: Callable[[], list[Shipment]] = list,
    ) -> None:
        super().__init__()
        if tick_seconds <= 0:
            raise ValueError("tick_seconds must be positive")
        self.path = path
        self.simulator = simulator
        self.tick_seconds = tick_seconds
        self._shipments = shipments
        self._lanes = {
            (f"store-{lane // simulator.n_skus:02d}", f"sku-{lane % simulator.n_skus:03d}"): lane
            for lane in range(simulator.n_lanes)
        }
        self._lock = threading.Lock()
        self.days = 0
        self.received_units = 0
        self.error: BaseException | None = None

    @property
    def lanes(self) -> list[tuple[str, str]]:
        """Every (store, SKU) the simulator runs, in lane order."""
        return list(self._lanes)

    @property
    def day(self) -> int:
        """The last day written (-1 before the first tick)."""
        return self.simulator.day

    def tick(self) -> list[Observation]:
        """Receive shipments, simulate one day, write it in one transaction; return it."""
        with self._lock:
            arrived = [s for s in self._shipments() if (s.store, s.sku) in self._lanes]
            for shipment in arrived:
                self.simulator.receive(self._lanes[(shipment.store, shipment.sku)], shipment.qty)
            observations = self.simulator.step()
            day = self.simulator.day
            conn = connect(self.path)
            try:
                with transaction(conn):
                    conn.executemany(
                        "INSERT OR IGNORE INTO deliveries (order_id, store, sku, qty, day) "
                        "VALUES (?, ?, ?, ?, ?)",
                        [(s.order_id, s.store, s.sku, s.qty, day) for s in arrived],
                    )
                    conn.executemany(
                        "INSERT INTO observations (day, store, sku, units_sold, stock_on_hand, "
                        "lead_time_days, features) VALUES (?, ?, ?, ?, ?, ?, ?)",
                        [
                            (o.day, o.store, o.sku, o.units_sold, o.stock_on_hand,
                             int(o.features[LEAD_TIME_COLUMN]), json.dumps(o.features.tolist()))
                            for o in observations
                        ],
                    )  # fmt: skip
                    conn.executemany(
                        "INSERT INTO stock (store, sku, on_hand, day) VALUES (?, ?, ?, ?) "
                        "ON CONFLICT (store, sku) DO UPDATE SET on_hand = excluded.on_hand, "
                        "day = excluded.day",
                        [(o.store, o.sku, o.stock_on_hand, o.day) for o in observations],
                    )
            finally:
                conn.close()
            # After the commit: whoever the row wakes finds the day in the database.
            export_day(
                sales_export(self.path), day, sum(o.units_sold for o in observations),
                len(observations),
            )  # fmt: skip
            self.days += 1
            self.received_units += sum(s.qty for s in arrived)
            return observations

    def start(self) -> StoreFeeder:
        """Write the first day now, then one per tick in a background thread."""
        self.tick()
        super().start()
        return self

    def _loop(self) -> None:
        # Deadlines on a fixed grid, so slow ticks do not make days drift longer.
        next_at = time.monotonic() + self.tick_seconds
        while not self._stop.wait(max(0.0, next_at - time.monotonic())):
            try:
                self.tick()
            except Exception as exc:  # keep the reason for the demo to report
                self.error = exc
                return
            next_at += self.tick_seconds

    def __enter__(self) -> StoreFeeder:
        return self.start()

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
