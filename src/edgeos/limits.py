"""The limits a supervisor enforces on an agent: small, thread-safe, clock-injected primitives.

Each primitive answers one question and knows nothing about agents, runs or the database:

- :class:`TokenBucket` — may this agent make another model call now? (calls per minute)
- :class:`CostBudget` — may it spend this much? (sliding hour and day windows)
- :class:`CircuitBreaker` — may it call this connector, which keeps failing?
- :class:`ConcurrencyLimit` — may it start another run?
- :func:`backoff_delay` — how long to wait before the next attempt after a failure?
  (``edgeos.retry.backoff_delay``, re-exported.)

A breach is an exception deriving from :class:`LimitExceeded` whose ``limit`` names the
setting (``cost_per_hour``, ``model_calls_per_minute``, ...) and whose message says what
was reached and when it eases, so the event the supervisor records is actionable.

Every class takes ``clock``, a ``Callable[[], float]`` in seconds defaulting to
:func:`time.monotonic`, so tests drive time by hand instead of sleeping. All state is
guarded by a lock: a step may run on a worker thread while the event loop checks limits.
"""

from __future__ import annotations

import asyncio
import collections
import math
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, ClassVar, Literal

from edgeos.errors import EdgeOSError, StateError

# One backoff for every layer that retries (delivery, supervisor, workers); re-exported here
# because the supervisor's limits are where callers look for it.
from edgeos.retry import backoff_delay

__all__ = [
    "BreakerState",
    "BudgetExceeded",
    "CircuitBreaker",
    "CircuitOpen",
    "ConcurrencyLimit",
    "CostBudget",
    "LimitExceeded",
    "LoopBrake",
    "RateLimited",
    "StepTimeout",
    "TokenBucket",
    "backoff_delay",
]

Clock = Callable[[], float]

#: Float slack for comparisons of accumulated sums (0.1 + 0.2 + 0.3 is 0.6000000000000001).
_EPSILON = 1e-9


# -- errors ------------------------------------------------------------------------------


class LimitExceeded(EdgeOSError):
    """A configured limit ends or parks a run.

    ``limit`` names the setting that was reached (``cost_per_hour``, ``cost_per_day``,
    ``model_calls_per_minute``, ``max_steps``, ``step_timeout``, ``max_concurrent_runs``,
    ``circuit_open``); ``retry_after`` is the number of seconds after which the same
    request may pass, or None when waiting will not help.
    """

    http_status: ClassVar[int] = 429

    def __init__(self, message: str, *, limit: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.limit = limit
        self.retry_after = retry_after


class BudgetExceeded(LimitExceeded):
    """A cost budget (per hour or per day) does not allow the next spend."""

    def __init__(
        self,
        *,
        window: Literal["hour", "day"],
        budget: float,
        spent: float,
        cost: float,
        retry_after: float | None,
        owner: str = "agent",
    ) -> None:
        self.window = window
        self.budget = budget
        self.spent = spent
        self.cost = cost
        limit = f"cost_per_{window}"
        # A cost of 0: the call's cost is known only once it is made (a relayed call).
        this_call = f", this call {_money(cost)}" if cost else ""
        head = f"{owner} budget {limit} {_money(budget)} reached (spent {_money(spent)}{this_call})"
        if retry_after is None:
            tail = f"this call alone is over the budget; raise {limit} to allow it"
        else:
            tail = f"resets in {_duration(retry_after)}"
        super().__init__(f"{head}; {tail}", limit=limit, retry_after=retry_after)


class RateLimited(LimitExceeded):
    """A rate or concurrency limit is reached; the same request passes a little later."""

    retryable: bool = True


class CircuitOpen(LimitExceeded):
    """A connector's circuit breaker is open after repeated failures; calls are refused."""

    retryable: bool = True
    http_status: ClassVar[int] = 503

    def __init__(self, *, name: str, failures: int, retry_after: float) -> None:
        self.name = name
        self.failures = failures
        super().__init__(
            f"connector {name!r} circuit open after {failures} consecutive failures; "
            f"next trial call in {_duration(retry_after)}",
            limit="circuit_open",
            retry_after=retry_after,
        )


class LoopBrake(LimitExceeded):
    """A run took ``max_steps`` steps without finishing: the loop brake ends it."""

    def __init__(self, *, max_steps: int, owner: str = "agent") -> None:
        self.max_steps = max_steps
        super().__init__(
            f"{owner} run stopped by the loop brake after {max_steps} steps; "
            "raise max_steps in agent.yaml if the run needs more",
            limit="max_steps",
        )


class StepTimeout(LimitExceeded):
    """One step ran longer than ``step_timeout`` seconds."""

    http_status: ClassVar[int] = 504

    def __init__(self, *, timeout: float, step: str | None = None, owner: str = "agent") -> None:
        self.timeout = timeout
        self.step = step
        what = f"step {step!r}" if step else "step"
        super().__init__(
            f"{owner} {what} ran longer than step_timeout {timeout:g} s and was stopped",
            limit="step_timeout",
        )


def _money(amount: float) -> str:
    """Costs as people read them: two decimals unless that would change the amount
    (0.025 stays 0.025, a tiny amount keeps its digits)."""
    if abs(amount - round(amount, 2)) < 1e-9:
        return f"{amount:.2f}"
    return f"{amount:.4g}"


def _duration(seconds: float) -> str:
    """A wait as a person would say it: "12 s", "12 min", "3 h 5 min"."""
    seconds = max(0.0, seconds)
    if seconds < 10:
        return f"{seconds:.1f} s"
    if seconds < 90:
        return f"{math.ceil(seconds)} s"
    minutes = math.ceil(seconds / 60)
    if minutes < 90:
        return f"{minutes} min"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min" if minutes else f"{hours} h"


# -- token bucket ------------------------------------------------------------------------


class TokenBucket:
    """A rate limit: ``rate_per_minute`` tokens refill continuously, up to ``burst`` kept.

    ``burst`` defaults to one minute's worth of tokens, so an agent allowed 30 calls a
    minute may make them all at once and then one every two seconds. The bucket starts
    full.
    """

    def __init__(
        self,
        rate_per_minute: float,
        burst: int | None = None,
        *,
        limit: str = "model_calls_per_minute",
        owner: str = "agent",
        clock: Clock = time.monotonic,
    ) -> None:
        if not rate_per_minute > 0 or math.isinf(rate_per_minute):
            raise ValueError(f"rate_per_minute must be a positive number, got {rate_per_minute}")
        capacity = max(1, math.ceil(rate_per_minute)) if burst is None else burst
        if capacity < 1:
            raise ValueError(f"burst must be at least 1, got {burst}")
        self.rate_per_minute = rate_per_minute
        self.capacity = capacity
        self.limit = limit
        self.owner = owner
        self._per_second = rate_per_minute / 60.0
        self._clock = clock
        self._lock = threading.Lock()
        self._tokens = float(capacity)
        self._updated = clock()

    def _refill(self) -> None:
        now = self._clock()
        # A clock that steps back (a test's, or a wall clock) must not drain the bucket.
        elapsed = max(0.0, now - self._updated)
        self._tokens = min(float(self.capacity), self._tokens + elapsed * self._per_second)
        self._updated = now

    def try_take(self, n: int = 1) -> bool:
        """Take ``n`` tokens if they are all there; never blocks, never takes part of them."""
        _check_count(n)
        with self._lock:
            self._refill()
            if self._tokens + _EPSILON >= n:
                self._tokens = max(0.0, self._tokens - n)
                return True
            return False

    def take(self, n: int = 1) -> None:
        """Take ``n`` tokens or raise :class:`RateLimited` saying when they will be there."""
        _check_count(n)
        with self._lock:
            self._refill()
            if self._tokens + _EPSILON >= n:
                self._tokens = max(0.0, self._tokens - n)
                return
            wait = self._wait_locked(n)
        retry_after = None if math.isinf(wait) else wait
        tail = (
            f"next call in {_duration(wait)}"
            if retry_after is not None
            else f"{n} at once is more than the burst of {self.capacity}"
        )
        raise RateLimited(
            f"{self.owner} rate limit {self.limit} {self.rate_per_minute:g} reached; {tail}",
            limit=self.limit,
            retry_after=retry_after,
        )

    def wait_time(self, n: int = 1) -> float:
        """Seconds until ``n`` tokens are available (0 now; ``inf`` if ``n`` > burst)."""
        _check_count(n)
        with self._lock:
            self._refill()
            return self._wait_locked(n)

    def _wait_locked(self, n: int) -> float:
        if n > self.capacity:
            return math.inf
        missing = n - self._tokens
        return 0.0 if missing <= _EPSILON else missing / self._per_second

    @property
    def available(self) -> float:
        """Tokens available now (fractional while refilling)."""
        with self._lock:
            self._refill()
            return self._tokens


def _check_count(n: int) -> None:
    if n < 0:
        raise ValueError(f"cannot take a negative number of tokens ({n})")


# -- cost budget -------------------------------------------------------------------------

HOUR = 3600.0
DAY = 86400.0
#: Spends closer together than this share one bucket, which bounds memory to about
#: 1,440 buckets for a day whatever the call rate.
BUCKET_SECONDS = 60.0
_STATE_VERSION = 1


@dataclass(slots=True)
class _Bucket:
    first: float  # clock time of the bucket's first spend
    last: float  # clock time of its latest spend: the bucket stays in a window until this ages out
    amount: float


class CostBudget:
    """Cost budgets over a sliding hour and a sliding day (either may be None: unlimited).

    Spends within a minute of each other share a bucket that stays in a window until its
    *latest* spend is older than the window, so a spend may be counted up to a minute
    longer than exact accounting would — never shorter: the budget errs toward refusing.

    ``check`` before a call raises :class:`BudgetExceeded` if the call's cost would go
    over; ``spend`` records it afterwards. ``charge`` does both atomically, for callers
    that know the cost up front and run concurrently.
    """

    def __init__(
        self,
        per_hour: float | None,
        per_day: float | None,
        *,
        owner: str = "agent",
        clock: Clock = time.monotonic,
        wall_clock: Clock = time.time,
    ) -> None:
        for name, value in (("per_hour", per_hour), ("per_day", per_day)):
            if value is not None and not value >= 0:
                raise ValueError(f"{name} must be >= 0 or None, got {value}")
        self.per_hour = per_hour
        self.per_day = per_day
        self.owner = owner
        self._clock = clock
        # Only to_state/load_state use the wall clock: monotonic time restarts with the
        # machine, so the downtime between save and load is measured in wall time.
        self._wall_clock = wall_clock
        self._lock = threading.Lock()
        self._buckets: collections.deque[_Bucket] = collections.deque()

    def _expire(self, now: float) -> None:
        # The day is the longest window; keep a day even without a per-day limit so that
        # spent_last_day reports something useful.
        while self._buckets and self._buckets[0].last + DAY <= now:
            self._buckets.popleft()

    def _in_window(self, now: float, window: float) -> list[_Bucket]:
        return [b for b in self._buckets if b.last + window > now]

    def _check_locked(self, now: float, cost: float) -> None:
        self._expire(now)
        windows: tuple[tuple[Literal["hour", "day"], float, float | None], ...] = (
            ("hour", HOUR, self.per_hour),
            ("day", DAY, self.per_day),
        )
        for label, window, budget in windows:
            if budget is None or cost == 0:
                continue
            buckets = self._in_window(now, window)
            spent = math.fsum(b.amount for b in buckets)
            if spent + cost <= budget * (1 + _EPSILON) + _EPSILON:
                continue
            raise BudgetExceeded(
                window=label,
                budget=budget,
                spent=spent,
                cost=cost,
                retry_after=_time_until_fits(buckets, now, window, spent, cost, budget),
                owner=self.owner,
            )

    def check(self, cost: float) -> None:
        """Raise :class:`BudgetExceeded` if spending ``cost`` now would exceed a budget.

        The hour is checked first, so a run over both budgets is told the nearer reset.
        """
        _check_cost(cost)
        with self._lock:
            self._check_locked(self._clock(), cost)

    def spend(self, cost: float) -> None:
        """Record a spend (unconditionally: the money is gone whether or not it fitted)."""
        _check_cost(cost)
        with self._lock:
            self._spend_locked(self._clock(), cost)

    def charge(self, cost: float) -> None:
        """``check`` then ``spend`` under one lock, so concurrent callers cannot overshoot."""
        _check_cost(cost)
        with self._lock:
            now = self._clock()
            self._check_locked(now, cost)
            self._spend_locked(now, cost)

    def _spend_locked(self, now: float, cost: float) -> None:
        if cost == 0:
            return
        self._expire(now)
        last = self._buckets[-1] if self._buckets else None
        # "now < last.last" happens only if the clock stepped back; folding the spend into
        # the newest bucket keeps the deque ordered without losing it.
        if last is not None and (now - last.first < BUCKET_SECONDS or now < last.last):
            last.amount += cost
            last.last = max(last.last, now)
        else:
            self._buckets.append(_Bucket(now, now, cost))

    def _spent(self, window: float) -> float:
        with self._lock:
            now = self._clock()
            self._expire(now)
            return math.fsum(b.amount for b in self._in_window(now, window))

    @property
    def spent_last_hour(self) -> float:
        """Total spent in the sliding hour."""
        return self._spent(HOUR)

    @property
    def spent_last_day(self) -> float:
        """Total spent in the sliding day."""
        return self._spent(DAY)

    def to_state(self) -> dict[str, Any]:
        """A JSON-able snapshot of limits and spends, for persisting across a restart.

        Times are stored as ages relative to the save, plus the wall-clock save time, so
        ``load_state`` works with a monotonic clock that restarted with the machine.
        """
        with self._lock:
            now = self._clock()
            self._expire(now)
            spends = [[now - b.first, now - b.last, b.amount] for b in self._buckets]
        return {
            "version": _STATE_VERSION,
            "per_hour": self.per_hour,
            "per_day": self.per_day,
            "saved_at": self._wall_clock(),
            "spends": spends,
        }

    def load_state(self, state: Mapping[str, Any]) -> None:
        """Replace the recorded spends with those of ``state``, keeping this budget's limits.

        The time the node was down (wall clock, never negative) ages the spends, so
        spending from before a long outage no longer counts.
        """
        spends, saved_at = _parse_state(state)
        downtime = max(0.0, self._wall_clock() - saved_at)
        with self._lock:
            now = self._clock()
            self._buckets = collections.deque(
                _Bucket(now - downtime - age_first, now - downtime - age_last, amount)
                for age_first, age_last, amount in sorted(spends, key=lambda s: -s[1])
            )
            self._expire(now)

    @classmethod
    def from_state(
        cls,
        state: Mapping[str, Any],
        *,
        owner: str = "agent",
        clock: Clock = time.monotonic,
        wall_clock: Clock = time.time,
    ) -> CostBudget:
        """A budget with the limits and spends of ``state`` (from :meth:`to_state`).

        To apply limits that changed since, build ``CostBudget(...)`` with the new limits
        and call :meth:`load_state` on it instead.
        """
        per_hour, per_day = state.get("per_hour"), state.get("per_day")
        for name, value in (("per_hour", per_hour), ("per_day", per_day)):
            if value is not None and not _is_number(value):
                raise StateError(f"cost budget state: {name} must be a number or null")
        budget = cls(per_hour, per_day, owner=owner, clock=clock, wall_clock=wall_clock)
        budget.load_state(state)
        return budget


def _time_until_fits(
    buckets: list[_Bucket], now: float, window: float, spent: float, cost: float, budget: float
) -> float | None:
    """Seconds until enough old spends leave the window for ``cost`` to fit (None: never)."""
    if cost > budget * (1 + _EPSILON) + _EPSILON:
        return None
    remaining = spent
    for bucket in sorted(buckets, key=lambda b: b.last):
        remaining -= bucket.amount
        if remaining + cost <= budget * (1 + _EPSILON) + _EPSILON:
            return max(0.0, bucket.last + window - now)
    return None  # unreachable when cost <= budget; kept for the type checker


def _check_cost(cost: float) -> None:
    if not cost >= 0 or math.isinf(cost):
        raise ValueError(f"a cost must be a finite number >= 0, got {cost}")


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _parse_state(state: Mapping[str, Any]) -> tuple[list[tuple[float, float, float]], float]:
    if state.get("version") != _STATE_VERSION:
        raise StateError(
            f"cost budget state version {state.get('version')!r} is not {_STATE_VERSION}"
        )
    saved_at = state.get("saved_at")
    raw = state.get("spends")
    if not isinstance(saved_at, int | float) or not _is_number(saved_at):
        raise StateError("cost budget state needs a numeric saved_at")
    if not isinstance(raw, list):
        raise StateError("cost budget state needs a list of spends")
    spends: list[tuple[float, float, float]] = []
    for item in raw:
        if (
            not isinstance(item, list | tuple)
            or len(item) != 3
            or not all(_is_number(v) and v >= 0 for v in item)
        ):
            raise StateError(f"cost budget state: bad spend {item!r} (want [age, age, amount])")
        spends.append((float(item[0]), float(item[1]), float(item[2])))
    return spends, float(saved_at)


# -- circuit breaker ---------------------------------------------------------------------


class BreakerState(StrEnum):
    """Where a :class:`CircuitBreaker` is in its cycle."""

    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class CircuitBreaker:
    """Stops calling a connector that keeps failing, and probes it again later.

    closed → open after ``failure_threshold`` consecutive failures; open → half_open once
    ``reset_after`` seconds have passed; half_open lets ``half_open_max`` trial calls
    through, then closes on a success or opens again on a failure. A trial whose outcome
    is never reported (its caller died) stops blocking after another ``reset_after``.
    """

    def __init__(
        self,
        failure_threshold: int = 5,
        reset_after: float = 30.0,
        half_open_max: int = 1,
        *,
        name: str = "connector",
        clock: Clock = time.monotonic,
    ) -> None:
        if failure_threshold < 1 or half_open_max < 1 or not reset_after >= 0:
            raise ValueError(
                "failure_threshold and half_open_max must be >= 1 and reset_after >= 0, got "
                f"{failure_threshold}, {half_open_max}, {reset_after}"
            )
        self.failure_threshold = failure_threshold
        self.reset_after = reset_after
        self.half_open_max = half_open_max
        self.name = name
        self._clock = clock
        self._lock = threading.Lock()
        self._state = BreakerState.CLOSED
        self._failures = 0
        self._opened_at = 0.0
        self._trials = 0  # trial calls let through in half_open whose outcome is pending
        self._trial_at = 0.0

    def _advance(self, now: float) -> BreakerState:
        if self._state is BreakerState.OPEN and now - self._opened_at >= self.reset_after:
            self._state = BreakerState.HALF_OPEN
            self._trials = 0
        return self._state

    @property
    def state(self) -> BreakerState:
        """The current state (an open breaker reads half_open once ``reset_after`` passed)."""
        with self._lock:
            return self._advance(self._clock())

    @property
    def consecutive_failures(self) -> int:
        """Failures since the last success (what opened the breaker, while it is open)."""
        with self._lock:
            return self._failures

    def allow(self) -> bool:
        """Whether a call may go now; in half_open, a True takes one trial slot."""
        with self._lock:
            now = self._clock()
            state = self._advance(now)
            if state is BreakerState.CLOSED:
                return True
            if state is BreakerState.OPEN:
                return False
            if self._trials >= self.half_open_max and now - self._trial_at >= self.reset_after:
                self._trials = 0  # the trials' callers never reported back
            if self._trials < self.half_open_max:
                self._trials += 1
                self._trial_at = now
                return True
            return False

    def allow_or_raise(self) -> None:
        """Like :meth:`allow`, raising :class:`CircuitOpen` instead of returning False."""
        if not self.allow():
            raise CircuitOpen(
                name=self.name, failures=self.consecutive_failures, retry_after=self.retry_after()
            )

    def record_success(self) -> None:
        """A call succeeded: close the breaker (from half_open) and forget past failures."""
        with self._lock:
            state = self._advance(self._clock())
            if state is BreakerState.OPEN:
                return  # a late answer to a call made before the breaker opened
            self._state = BreakerState.CLOSED
            self._failures = 0
            self._trials = 0

    def record_failure(self) -> None:
        """A call failed: count it, opening the breaker at the threshold or on a failed trial."""
        with self._lock:
            now = self._clock()
            state = self._advance(now)
            if state is BreakerState.OPEN:
                return  # a late failure of a call made before the breaker opened
            self._failures += 1
            if state is BreakerState.HALF_OPEN or self._failures >= self.failure_threshold:
                self._state = BreakerState.OPEN
                self._opened_at = now
                self._trials = 0

    def retry_after(self) -> float:
        """Seconds until :meth:`allow` may say yes again (0 if it would now)."""
        with self._lock:
            now = self._clock()
            state = self._advance(now)
            if state is BreakerState.OPEN:
                return max(0.0, self._opened_at + self.reset_after - now)
            if state is BreakerState.HALF_OPEN and self._trials >= self.half_open_max:
                return max(0.0, self._trial_at + self.reset_after - now)
            return 0.0


# -- concurrency -------------------------------------------------------------------------


class ConcurrencyLimit:
    """At most ``max_concurrent`` holders at a time (an agent's concurrent runs).

    ``try_acquire``/``release`` never block and may be used from any thread. The
    coroutine :meth:`acquire` waits for a slot in FIFO order; a released slot is handed
    directly to the oldest waiter, so ``try_acquire`` cannot jump the queue.
    """

    def __init__(self, max_concurrent: int, *, limit: str = "max_concurrent_runs") -> None:
        if max_concurrent < 1:
            raise ValueError(f"max_concurrent must be at least 1, got {max_concurrent}")
        self.max_concurrent = max_concurrent
        self.limit = limit
        self._lock = threading.Lock()
        self._in_use = 0
        self._waiters: collections.deque[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = (
            collections.deque()
        )

    @property
    def in_use(self) -> int:
        """Slots held now (including slots handed to a waiter that has not resumed yet)."""
        with self._lock:
            return self._in_use

    def try_acquire(self) -> bool:
        """Take a slot if one is free."""
        with self._lock:
            if self._in_use < self.max_concurrent:
                self._in_use += 1
                return True
            return False

    def release(self) -> None:
        """Give a slot back: to the oldest waiter if there is one, else to the pool."""
        with self._lock:
            if self._in_use <= 0:
                raise RuntimeError("ConcurrencyLimit.release() without a matching acquire")
            if not self._waiters:
                self._in_use -= 1
                return
            loop, future = self._waiters.popleft()
        # The slot stays counted in _in_use: it now belongs to the waiter.
        try:
            loop.call_soon_threadsafe(self._hand_over, future)
        except RuntimeError:  # the waiter's loop is closed: nobody will take the slot
            self.release()

    def _hand_over(self, future: asyncio.Future[None]) -> None:
        if future.done():  # cancelled while the slot was on its way: pass it on
            self.release()
        else:
            future.set_result(None)

    async def acquire(self, timeout: float | None = None) -> None:
        """Wait for a slot; raise :class:`RateLimited` if none frees up within ``timeout``."""
        loop = asyncio.get_running_loop()
        with self._lock:
            if self._in_use < self.max_concurrent:
                self._in_use += 1
                return
            future: asyncio.Future[None] = loop.create_future()
            entry = (loop, future)
            self._waiters.append(entry)
        try:
            async with asyncio.timeout(timeout):
                await future
        except BaseException as exc:
            with self._lock:
                queued = entry in self._waiters
                if queued:
                    self._waiters.remove(entry)
            if not queued and future.done() and not future.cancelled():
                self.release()  # the slot arrived just as we gave up: give it back
            # (not queued and cancelled: _hand_over will see that and pass the slot on)
            if isinstance(exc, TimeoutError):
                raise RateLimited(
                    f"{self.limit} {self.max_concurrent} reached: no slot freed up "
                    f"within {timeout:g} s",
                    limit=self.limit,
                ) from exc
            raise
