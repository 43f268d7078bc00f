"""A small but honest retail simulator and the stockout data set built from it.

Every store/SKU pair (a *lane*) sells a negative-binomial number of units a day around a
base rate shaped by a weekly cycle, a retail calendar (Easter, back to school, Black
Friday, Christmas...) and per-SKU promotions. Shelves are refilled by a reorder-point
policy whose orders arrive after a noisy supplier lead time and are now and then
short-shipped. Planners forecast from trailing sales, which stockouts censor, and ignore
both the calendar and promotions: the classic ways shelves go empty.

:func:`generate` runs that simulation for many lanes over a year and samples observation
days. A row's label is ``1`` when the lane's shelf is empty at the close of at least one
of the next ``lead_time_days`` days. It is read from the simulated future, not computed
from the features, so part of it is noise (demand draws, late or short deliveries). Much
of the rest needs the calendar, promotion timing, delivery timing and the sales history
combined multiplicatively, which a tiny model only approximates.

:class:`SalesSimulator` is the same engine stepped one day at a time, for live demos.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

FEATURE_NAMES: tuple[str, ...] = (
    "sales_mean_7d",  # units/day sold over the last 7 days (censored by stockouts)
    "sales_mean_28d",  # units/day sold over the last 28 days
    "sales_trend_7d",  # last 7 days' mean minus the 7 days before (units/day)
    "stock_on_hand",  # units on the shelf at close
    "days_of_cover",  # stock_on_hand / sales_mean_7d, capped
    "lead_time_days",  # supplier's nominal lead time; also the label's horizon
    "lead_time_std_days",  # supplier's lead-time variability
    "days_to_next_delivery",  # until the earliest open order is due (lead time if none)
    "units_on_order",  # ordered and not yet delivered
    "promo_uplift",  # planned demand multiplier of a running or announced promotion, else 1
    "promo_starts_in_days",  # 0 while one runs; PROMO_NOTICE_DAYS + 1 if none is announced
    "promo_days_left",  # days of that promotion after today (0 if none)
    "day_of_week_sin",
    "day_of_week_cos",
    "week_of_year_sin",
    "week_of_year_cos",
)
"""Names of the feature columns, in the order models consume them."""

HISTORY_DAYS = 28
"""Days of sales history each lane keeps; the longest feature window."""

WARMUP_DAYS = 56
"""Days simulated before the first observation so stock levels and history settle."""

MAX_LEAD_TIME_DAYS = 14
"""Longest nominal supplier lead time, hence the longest label horizon."""

PROMO_NOTICE_DAYS = 14
"""How far ahead promotions are announced; at least the longest label horizon."""

OBSERVATION_WINDOW_DAYS = 364
"""Days over which :func:`generate` samples observations: a year, so every event appears."""

_MAX_OPEN_ORDERS = 4
_MAX_COVER_DAYS = 120.0
# Fraction of lane-days the data set samples. Sparse sampling spreads rows over many
# lanes, so that rows are closer to independent and a random split is a fair test.
_SAMPLING_DENSITY = 1.0 / 14.0
_DATASET_STORES = 8

# Demand multiplier by weekday, Monday first (day 0 of a simulation is a Monday).
_WEEKDAY_PROFILE = np.array([0.75, 0.75, 0.85, 0.95, 1.2, 1.6, 0.9])
# Retail calendar: (first day of year, days, demand multiplier), chain-wide.
_EVENTS = (
    (0, 4, 0.7),  # New Year lull
    (40, 5, 1.6),  # Valentine's
    (92, 7, 1.7),  # Easter
    (124, 5, 1.5),  # Mother's day
    (166, 7, 1.4),  # Father's day and the first barbecues
    (180, 14, 1.5),  # start of the summer holidays
    (240, 10, 1.6),  # back to school
    (297, 6, 1.7),  # Halloween
    (329, 4, 2.5),  # Black Friday weekend
    (345, 14, 2.0),  # Christmas
    (359, 6, 0.7),  # the quiet days after
)


def _calendar_factor() -> NDArray[np.float64]:
    """Demand multiplier for each day of the year: a mild winter peak plus events."""
    day = np.arange(365)
    factor = 1.0 + 0.1 * np.cos(2 * np.pi * (day - 350) / 365)
    for first, days, multiplier in _EVENTS:
        factor[first : first + days] *= multiplier
    return factor


_CALENDAR = _calendar_factor()


@dataclass(frozen=True, eq=False)
class RetailDataset:
    """Feature rows and stockout labels.

    ``features`` is float32 ``[n, len(feature_names)]``; ``labels`` is int64 ``[n]`` with
    ``1`` meaning the shelf went empty within the lead time.
    """

    features: NDArray[np.float32]
    labels: NDArray[np.int64]
    feature_names: tuple[str, ...] = FEATURE_NAMES

    def __post_init__(self) -> None:
        if self.features.dtype != np.float32 or self.features.ndim != 2:
            raise ValueError("features must be a float32 matrix")
        if self.labels.dtype != np.int64 or self.labels.shape != (self.features.shape[0],):
            raise ValueError("labels must be an int64 vector with one entry per row")
        if self.features.shape[1] != len(self.feature_names):
            raise ValueError("features must have one column per feature name")

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def positive_rate(self) -> float:
        """Fraction of rows labelled ``1`` (stockout)."""
        return float(self.labels.mean()) if len(self) else 0.0

    def split(self, fraction: float, seed: int) -> tuple[RetailDataset, RetailDataset]:
        """Shuffle rows with ``seed`` and cut them in two.

        The first part holds ``round(fraction * len(self))`` rows, the second the rest;
        both must be non-empty.
        """
        n_first = round(fraction * len(self))
        if not 0 < n_first < len(self):
            raise ValueError(f"fraction {fraction} leaves one side of the split empty")
        order = np.random.default_rng(seed).permutation(len(self))
        first, second = order[:n_first], order[n_first:]
        return (
            RetailDataset(self.features[first], self.labels[first], self.feature_names),
            RetailDataset(self.features[second], self.labels[second], self.feature_names),
        )


@dataclass(frozen=True, eq=False)
class Observation:
    """One lane at the close of one day, as a live system would see it."""

    store: str
    sku: str
    day: int
    units_sold: int
    stock_on_hand: int
    features: NDArray[np.float32]
    """Float32 row in :data:`FEATURE_NAMES` order, ready for the stockout-risk models."""


class SalesSimulator:
    """Day-by-day sales, stock and replenishment of ``n_stores x n_skus`` lanes.

    SKUs carry demand, seasonality, promotions and supplier; stores scale demand and add
    transport days; each lane has its own planner settings, which the features never
    show. Construction simulates ``warmup_days`` so the first :meth:`step` already has a
    full sales history. Day 0 is a Monday and the first day of the year. The same
    arguments give the same simulation.

    ``lead_time`` holds each lane's nominal supplier lead time in days, the horizon of
    its stockout label.
    """

    def __init__(
        self, n_stores: int = 2, n_skus: int = 4, *, seed: int = 7, warmup_days: int = WARMUP_DAYS
    ) -> None:
        if n_stores < 1 or n_skus < 1:
            raise ValueError("a simulation needs at least one store and one SKU")
        if warmup_days < HISTORY_DAYS:
            raise ValueError(f"warmup_days must be at least {HISTORY_DAYS}")
        rng = np.random.default_rng(seed)
        self._rng = rng
        self.n_stores = n_stores
        self.n_skus = n_skus
        n = n_stores * n_skus
        self._store_of = np.repeat(np.arange(n_stores), n_skus)
        self._sku_of = np.tile(np.arange(n_skus), n_stores)
        sku, store = self._sku_of, self._store_of

        sku_rate = np.clip(np.exp(rng.normal(math.log(12.0), 0.9, n_skus)), 0.5, 150.0)
        self._base_rate = sku_rate[sku] * np.exp(rng.normal(0.0, 0.4, n_stores))[store]
        # Negative-binomial shape: small values are bursty, large ones close to Poisson.
        self._dispersion = rng.uniform(10.0, 60.0, n_skus)[sku]
        self._weekly_sensitivity = rng.uniform(0.8, 1.0, n_skus)[sku]
        self._calendar_sensitivity = rng.uniform(0.8, 1.0, n_skus)[sku]
        # 2-12 supplier days plus 0-2 transport days stay within MAX_LEAD_TIME_DAYS.
        supplier_lead = rng.integers(2, MAX_LEAD_TIME_DAYS - 1, n_skus)
        transport_days = rng.integers(0, 3, n_stores)
        self.lead_time: NDArray[np.int64] = (supplier_lead[sku] + transport_days[store]).astype(
            np.int64
        )
        self._lead_std = (rng.uniform(0.0, 0.12, n_skus) * supplier_lead)[sku]
        # Fast movers ship in bigger cases.
        self._pack = np.clip(2 ** np.floor(np.log2(sku_rate)), 1, 24).astype(np.int64)[sku]
        # Planner settings the features never show: safety stock, review cycle, and how
        # often the supplier short-ships this lane.
        self._safety_days = rng.gamma(2.0, 1.3, n)
        self._review_days = rng.choice(np.array([2, 3, 7]), n)
        self._short_ship_prob = rng.uniform(0.0, 0.04, n)

        self._promo_start = rng.integers(0, 60, n_skus)
        self._promo_end = self._promo_start + rng.integers(3, 11, n_skus)
        self._promo_uplift = 1.0 + rng.gamma(2.0, 0.6, n_skus)

        self._day = -warmup_days - 1
        self._history = rng.poisson(self._base_rate[:, None], (n, HISTORY_DAYS)).astype(np.float64)
        self._stock = np.ceil(
            self._base_rate * (self.lead_time + self._review_days / 2 + self._safety_days)
        ).astype(np.int64)
        self._sold = np.zeros(n, np.int64)
        self._empty = np.zeros(n, bool)
        # Open orders, one slot per column; a quantity of 0 marks a free slot. The store
        # knows the due date (eta); the simulator also knows the real arrival and amount.
        self._order_qty = np.zeros((n, _MAX_OPEN_ORDERS), np.int64)
        self._order_delivered = np.zeros((n, _MAX_OPEN_ORDERS), np.int64)
        self._order_eta = np.zeros((n, _MAX_OPEN_ORDERS), np.int64)
        self._order_arrival = np.zeros((n, _MAX_OPEN_ORDERS), np.int64)
        for _ in range(warmup_days):
            self._advance()

    @property
    def n_lanes(self) -> int:
        """Number of store/SKU lanes simulated."""
        return self.n_stores * self.n_skus

    @property
    def day(self) -> int:
        """The last simulated day (-1 before the first :meth:`step`)."""
        return self._day

    def step(self) -> list[Observation]:
        """Simulate one more day and return every lane's observation at its close."""
        self._advance()
        features = self._features()
        return [
            Observation(
                store=f"store-{self._store_of[i]:02d}",
                sku=f"sku-{self._sku_of[i]:03d}",
                day=self._day,
                units_sold=int(self._sold[i]),
                stock_on_hand=int(self._stock[i]),
                features=features[i],
            )
            for i in range(self.n_lanes)
        ]

    def _advance(self) -> None:
        """Simulate the next day: promotions, deliveries, sales, then reordering."""
        t = self._day + 1
        rng = self._rng
        self._schedule_promotions(t)

        arriving = (self._order_qty > 0) & (self._order_arrival <= t)
        self._stock += (self._order_delivered * arriving).sum(axis=1)
        self._order_qty[arriving] = 0

        mean = self._expected_demand(t)
        k = self._dispersion
        demand = rng.negative_binomial(k, k / (k + mean))
        self._sold = np.minimum(demand, self._stock)
        self._stock -= self._sold
        self._empty = self._stock == 0
        self._history[:, :-1] = self._history[:, 1:]
        self._history[:, -1] = self._sold

        self._reorder(t)
        self._day = t

    def _schedule_promotions(self, t: int) -> None:
        """Plan the next promotion of every SKU whose last one has ended."""
        over = np.flatnonzero(t >= self._promo_end)
        if over.size:
            rng = self._rng
            self._promo_start[over] = t + rng.integers(7, 35, over.size)
            self._promo_end[over] = self._promo_start[over] + rng.integers(3, 11, over.size)
            self._promo_uplift[over] = 1.0 + rng.gamma(2.0, 0.6, over.size)

    def _expected_demand(self, t: int) -> NDArray[np.float64]:
        """Mean demand of every lane on day ``t``."""
        weekly = 1.0 + self._weekly_sensitivity * (_WEEKDAY_PROFILE[t % 7] - 1.0)
        calendar = 1.0 + self._calendar_sensitivity * (_CALENDAR[t % 365] - 1.0)
        running = (self._promo_start <= t) & (t < self._promo_end)
        promo = np.where(running, self._promo_uplift, 1.0)[self._sku_of]
        mean: NDArray[np.float64] = self._base_rate * weekly * calendar * promo
        return mean

    def _reorder(self, t: int) -> None:
        """Order, at close, for lanes whose inventory position fell below reorder point.

        The forecast is trailing observed sales, so stockouts depress it and calendar
        events and promotions catch it out, as they catch out many store planners.
        """
        forecast = np.maximum(self._history[:, -7:].mean(axis=1), self._history.mean(axis=1))
        position = self._stock + self._order_qty.sum(axis=1)
        min_stock = np.maximum(self._pack, 2)
        reorder_point = np.maximum(forecast * (self.lead_time + self._safety_days), min_stock)
        free = self._order_qty == 0
        lanes = np.flatnonzero((position < reorder_point) & free.any(axis=1))
        if not lanes.size:
            return
        rng = self._rng
        pack = self._pack[lanes]
        target = np.maximum(
            forecast[lanes] * (self.lead_time + self._review_days + self._safety_days)[lanes],
            reorder_point[lanes] + pack,
        )
        qty = (np.ceil((target - position[lanes]) / pack) * pack).astype(np.int64)
        lead = self.lead_time[lanes] + self._lead_std[lanes] * rng.standard_normal(lanes.size)
        short = rng.random(lanes.size) < self._short_ship_prob[lanes]
        delivered = np.where(short, np.floor(qty * rng.uniform(0.4, 0.9, lanes.size)), qty)
        slot = free[lanes].argmax(axis=1)
        self._order_qty[lanes, slot] = qty
        self._order_delivered[lanes, slot] = delivered.astype(np.int64)
        self._order_eta[lanes, slot] = t + self.lead_time[lanes]
        self._order_arrival[lanes, slot] = t + np.maximum(np.rint(lead), 1).astype(np.int64)

    def _features(self, lanes: NDArray[np.int64] | None = None) -> NDArray[np.float32]:
        """Feature rows (in :data:`FEATURE_NAMES` order) of ``lanes`` (all by default)."""
        idx = np.arange(self.n_lanes) if lanes is None else lanes
        t = self._day
        history = self._history[idx]
        mean_7d = history[:, -7:].mean(axis=1)
        stock = self._stock[idx]
        # A lane that sold nothing last week still sells slower than one unit a week.
        cover = np.minimum(stock / np.maximum(mean_7d, 1.0 / 7.0), _MAX_COVER_DAYS)
        lead = self.lead_time[idx]
        open_orders = self._order_qty[idx] > 0
        # Overdue orders count as due today.
        due_in = np.where(open_orders, np.maximum(self._order_eta[idx] - t, 0), MAX_LEAD_TIME_DAYS)
        next_delivery = np.where(open_orders.any(axis=1), due_in.min(axis=1), lead)
        sku = self._sku_of[idx]
        start, end = self._promo_start[sku], self._promo_end[sku]
        announced = (start - t <= PROMO_NOTICE_DAYS) & (t < end)
        dow = 2 * np.pi * (t % 7) / 7
        woy = 2 * np.pi * ((t % 365) // 7) / 52
        n = idx.size
        columns = (
            mean_7d,
            history.mean(axis=1),
            mean_7d - history[:, -14:-7].mean(axis=1),
            stock,
            cover,
            lead,
            self._lead_std[idx],
            next_delivery,
            self._order_qty[idx].sum(axis=1),
            np.where(announced, self._promo_uplift[sku], 1.0),
            np.where(announced, np.maximum(start - t, 0), PROMO_NOTICE_DAYS + 1),
            np.where(announced, end - np.maximum(start, t + 1), 0),
            np.full(n, math.sin(dow)),
            np.full(n, math.cos(dow)),
            np.full(n, math.sin(woy)),
            np.full(n, math.cos(woy)),
        )
        return np.stack(columns, axis=1).astype(np.float32)


def generate(n_rows: int, seed: int = 7) -> RetailDataset:
    """Simulate a retail chain for a year and sample ``n_rows`` labelled observations.

    Rows are random lane-days, shuffled. The same ``seed`` gives identical data; another
    seed simulates another chain.
    """
    if n_rows < 1:
        raise ValueError("n_rows must be positive")
    n_lanes_wanted = math.ceil(n_rows / (OBSERVATION_WINDOW_DAYS * _SAMPLING_DENSITY))
    n_stores = min(_DATASET_STORES, n_lanes_wanted)
    sim = SalesSimulator(n_stores, math.ceil(n_lanes_wanted / n_stores), seed=seed)
    n_lanes = sim.n_lanes

    # A stream separate from the simulator's, so sampling never perturbs the simulation.
    picks = np.random.default_rng([seed, 1]).choice(
        n_lanes * OBSERVATION_WINDOW_DAYS, size=n_rows, replace=False
    )
    obs_day, obs_lane = np.divmod(picks, n_lanes)
    by_day = np.argsort(obs_day, kind="stable")
    day_bounds = np.searchsorted(obs_day[by_day], np.arange(OBSERVATION_WINDOW_DAYS + 1))

    features = np.empty((n_rows, len(FEATURE_NAMES)), np.float32)
    total_days = OBSERVATION_WINDOW_DAYS + MAX_LEAD_TIME_DAYS
    empty = np.zeros((n_lanes, total_days), bool)
    for d in range(total_days):
        sim._advance()
        empty[:, d] = sim._empty
        if d < OBSERVATION_WINDOW_DAYS:
            rows = by_day[day_bounds[d] : day_bounds[d + 1]]
            if rows.size:
                features[rows] = sim._features(obs_lane[rows])

    # Empty-shelf closes in (day, day + lead time], from a running count per lane.
    empty_so_far = np.cumsum(empty, axis=1)
    horizon_end = obs_day + sim.lead_time[obs_lane]
    stockouts = empty_so_far[obs_lane, horizon_end] - empty_so_far[obs_lane, obs_day]
    return RetailDataset(features, (stockouts > 0).astype(np.int64), FEATURE_NAMES)
