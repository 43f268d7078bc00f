"""Supervisor limits: token bucket, cost budget, circuit breaker, concurrency, backoff.

Time is a fake clock moved by hand; nothing here sleeps.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import threading
from collections.abc import Callable

import pytest

from edgeos import retry
from edgeos.errors import EdgeOSError, StateError
from edgeos.limits import (
    BreakerState,
    BudgetExceeded,
    CircuitBreaker,
    CircuitOpen,
    ConcurrencyLimit,
    CostBudget,
    LimitExceeded,
    LoopBrake,
    RateLimited,
    StepTimeout,
    TokenBucket,
    backoff_delay,
)

MINUTE = 60.0
HOUR = 3600.0
DAY = 86400.0


class FakeClock:
    """A clock that only moves when told to."""

    def __init__(self, start: float = 1_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def run_threads(count: int, target: Callable[[], None]) -> None:
    """Start ``count`` threads on ``target`` together and wait for all of them."""
    barrier = threading.Barrier(count)

    def body() -> None:
        barrier.wait()
        target()

    threads = [threading.Thread(target=body) for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


# -- errors ------------------------------------------------------------------------------


def test_limit_errors_belong_to_the_edgeos_tree_and_say_what_to_do() -> None:
    brake = LoopBrake(max_steps=64, owner="agent 'shelf-watch'")
    timeout = StepTimeout(timeout=2.5, step="sense")
    for error in (brake, timeout):
        assert isinstance(error, LimitExceeded)
        assert isinstance(error, EdgeOSError)
        assert error.retry_after is None
    assert brake.limit == "max_steps"
    assert "agent 'shelf-watch' run stopped by the loop brake after 64 steps" in str(brake)
    assert "raise max_steps in agent.yaml" in str(brake)
    assert timeout.limit == "step_timeout"
    assert str(timeout) == "agent step 'sense' ran longer than step_timeout 2.5 s and was stopped"
    assert RateLimited.retryable
    assert CircuitOpen.retryable
    assert not BudgetExceeded.retryable
    assert not LoopBrake.retryable


# -- token bucket ------------------------------------------------------------------------


def test_token_bucket_starts_full_and_allows_a_burst() -> None:
    clock = FakeClock()
    bucket = TokenBucket(30, burst=5, clock=clock)
    assert bucket.available == 5
    assert [bucket.try_take() for _ in range(6)] == [True] * 5 + [False]
    # 30 a minute is one every two seconds.
    assert bucket.wait_time() == pytest.approx(2.0)
    assert bucket.wait_time(3) == pytest.approx(6.0)


def test_token_bucket_refills_at_its_rate_up_to_the_burst() -> None:
    clock = FakeClock()
    bucket = TokenBucket(60, burst=3, clock=clock)
    for _ in range(3):
        assert bucket.try_take()
    clock.advance(0.5)
    assert bucket.available == pytest.approx(0.5)
    assert not bucket.try_take()
    clock.advance(0.5)
    assert bucket.try_take()
    clock.advance(3600)  # a long idle period refills to the burst, no more
    assert bucket.available == 3
    assert bucket.try_take(3)
    assert not bucket.try_take()


def test_token_bucket_burst_defaults_to_a_minute_of_tokens() -> None:
    assert TokenBucket(30).capacity == 30
    assert TokenBucket(2.5).capacity == 3
    assert TokenBucket(0.5).capacity == 1


def test_token_bucket_takes_all_or_nothing() -> None:
    clock = FakeClock()
    bucket = TokenBucket(60, burst=4, clock=clock)
    assert bucket.try_take(3)
    assert not bucket.try_take(2)
    assert bucket.available == pytest.approx(1)  # the failed take took nothing
    assert bucket.try_take(0)
    assert bucket.wait_time(5) == math.inf  # more than the burst: never


def test_token_bucket_take_raises_rate_limited_with_retry_after() -> None:
    clock = FakeClock()
    bucket = TokenBucket(6, burst=1, owner="agent 'pricing'", clock=clock)
    bucket.take()
    with pytest.raises(RateLimited) as caught:
        bucket.take()
    error = caught.value
    assert error.limit == "model_calls_per_minute"
    assert error.retry_after == pytest.approx(10.0)
    assert str(error) == (
        "agent 'pricing' rate limit model_calls_per_minute 6 reached; next call in 10 s"
    )
    with pytest.raises(RateLimited, match="more than the burst of 1") as too_many:
        bucket.take(2)
    assert too_many.value.retry_after is None
    clock.advance(10)
    bucket.take()


def test_token_bucket_survives_a_clock_that_steps_back() -> None:
    clock = FakeClock()
    bucket = TokenBucket(60, burst=2, clock=clock)
    assert bucket.try_take()
    clock.advance(-100)
    assert bucket.available == pytest.approx(1)
    clock.advance(1)
    assert bucket.available == pytest.approx(2)


@pytest.mark.parametrize(("rate", "burst"), [(0, None), (-1, None), (math.nan, None), (10, 0)])
def test_token_bucket_refuses_nonsense(rate: float, burst: int | None) -> None:
    with pytest.raises(ValueError, match="must be"):
        TokenBucket(rate, burst)


def test_token_bucket_is_exact_under_threads() -> None:
    bucket = TokenBucket(60, burst=1_000, clock=FakeClock())
    taken: list[int] = []
    lock = threading.Lock()

    def worker() -> None:
        mine = sum(bucket.try_take() for _ in range(500))
        with lock:
            taken.append(mine)

    run_threads(8, worker)
    assert sum(taken) == 1_000
    assert bucket.available == 0


# -- cost budget -------------------------------------------------------------------------


def test_budget_refuses_a_call_that_would_go_over_the_hour_before_spending() -> None:
    clock = FakeClock()
    budget = CostBudget(per_hour=0.5, per_day=None, clock=clock)
    budget.spend(0.49)
    clock.advance(48 * MINUTE)
    with pytest.raises(BudgetExceeded) as caught:
        budget.check(0.02)
    error = caught.value
    assert error.limit == "cost_per_hour"
    assert error.window == "hour"
    assert error.budget == 0.5
    assert error.spent == pytest.approx(0.49)
    assert error.cost == 0.02
    assert error.retry_after == pytest.approx(12 * MINUTE)
    assert str(error) == (
        "agent budget cost_per_hour 0.50 reached (spent 0.49, this call 0.02); resets in 12 min"
    )
    assert budget.spent_last_hour == pytest.approx(0.49)  # check spends nothing
    budget.check(0.01)  # exactly up to the budget is allowed


def test_budget_window_slides() -> None:
    clock = FakeClock()
    budget = CostBudget(per_hour=1.0, per_day=None, clock=clock)
    budget.spend(0.6)
    clock.advance(30 * MINUTE)
    budget.spend(0.4)
    clock.advance(15 * MINUTE)
    with pytest.raises(BudgetExceeded) as caught:
        budget.check(0.1)
    # The 0.6 spent 45 minutes ago leaves the window first.
    assert caught.value.retry_after == pytest.approx(15 * MINUTE)
    clock.advance(15 * MINUTE)
    assert budget.spent_last_hour == pytest.approx(0.4)
    budget.check(0.6)
    with pytest.raises(BudgetExceeded):
        budget.check(0.7)
    clock.advance(30 * MINUTE)
    assert budget.spent_last_hour == 0
    assert budget.spent_last_day == pytest.approx(1.0)


def test_budget_waits_for_as_many_old_spends_as_needed() -> None:
    clock = FakeClock()
    budget = CostBudget(per_hour=1.0, per_day=None, clock=clock)
    for _ in range(4):
        budget.spend(0.25)
        clock.advance(10 * MINUTE)
    # Spent 1.0 in spends at -40, -30, -20, -10 min; 0.5 needs the two oldest gone.
    with pytest.raises(BudgetExceeded) as caught:
        budget.check(0.5)
    assert caught.value.retry_after == pytest.approx(30 * MINUTE)


def test_budget_day_window() -> None:
    clock = FakeClock()
    budget = CostBudget(per_hour=None, per_day=2.0, owner="agent 'restock'", clock=clock)
    for _ in range(4):
        budget.spend(0.5)
        clock.advance(3 * HOUR)
    with pytest.raises(BudgetExceeded) as caught:
        budget.check(0.5)
    error = caught.value
    assert error.limit == "cost_per_day"
    assert error.retry_after == pytest.approx(12 * HOUR)
    assert str(error) == (
        "agent 'restock' budget cost_per_day 2.00 reached (spent 2.00, this call 0.50); "
        "resets in 12 h"
    )
    clock.advance(12 * HOUR)
    budget.check(0.5)
    assert budget.spent_last_day == pytest.approx(1.5)


def test_budget_checks_the_hour_before_the_day() -> None:
    clock = FakeClock()
    budget = CostBudget(per_hour=1.0, per_day=1.0, clock=clock)
    budget.spend(1.0)
    with pytest.raises(BudgetExceeded) as caught:
        budget.check(0.1)
    assert caught.value.limit == "cost_per_hour"
    clock.advance(HOUR)
    with pytest.raises(BudgetExceeded) as caught:
        budget.check(0.1)
    assert caught.value.limit == "cost_per_day"
    assert caught.value.retry_after == pytest.approx(DAY - HOUR)


def test_budget_names_a_call_that_can_never_fit() -> None:
    budget = CostBudget(per_hour=0.5, per_day=None, clock=FakeClock())
    with pytest.raises(BudgetExceeded) as caught:
        budget.check(0.6)
    assert caught.value.retry_after is None
    assert "this call alone is over the budget; raise cost_per_hour" in str(caught.value)


def test_budget_shows_tiny_costs_and_zero_is_free() -> None:
    budget = CostBudget(per_hour=0.001, per_day=None, clock=FakeClock())
    budget.spend(0.001)
    with pytest.raises(BudgetExceeded, match=r"spent 0.001, this call 0.0004\)"):
        budget.check(0.0004)
    budget.check(0)
    budget.charge(0)


def test_budget_float_sums_do_not_refuse_an_exact_fit() -> None:
    budget = CostBudget(per_hour=0.6, per_day=None, clock=FakeClock())
    budget.charge(0.1)
    budget.charge(0.2)
    budget.charge(0.3)  # 0.1 + 0.2 + 0.3 is 0.6000000000000001 in floats
    assert budget.spent_last_hour == pytest.approx(0.6)
    with pytest.raises(BudgetExceeded):
        budget.charge(0.01)


def test_budget_buckets_spends_per_minute_and_errs_toward_counting() -> None:
    clock = FakeClock()
    budget = CostBudget(per_hour=None, per_day=None, clock=clock)
    budget.spend(1.0)
    clock.advance(50)
    budget.spend(1.0)
    # One bucket whose latest spend was at +50 s: both count until that one is an hour old.
    clock.advance(HOUR - 50)
    assert budget.spent_last_hour == 2.0
    clock.advance(50)
    assert budget.spent_last_hour == 0.0


def test_budget_memory_is_bounded_by_minutes_not_calls() -> None:
    clock = FakeClock()
    budget = CostBudget(per_hour=None, per_day=None, clock=clock)
    for _ in range(2 * 24 * 3600 // 5):  # two days of a call every 5 s
        budget.spend(0.001)
        clock.advance(5)
    # Internal, but it is the property under test: about a day of one-minute buckets.
    assert len(budget._buckets) <= 24 * 60 + 1
    assert budget.spent_last_day == pytest.approx(24 * 720 * 0.001, rel=0.01)


def test_budget_state_round_trip_across_a_restart() -> None:
    clock, wall = FakeClock(), FakeClock(1.7e9)
    budget = CostBudget(per_hour=1.0, per_day=5.0, clock=clock, wall_clock=wall)
    budget.spend(0.5)
    clock.advance(20 * MINUTE)
    wall.advance(20 * MINUTE)
    budget.spend(0.25)
    state = json.loads(json.dumps(budget.to_state()))  # it must be JSON

    # The node is down for 10 minutes; the monotonic clock restarts from a new origin.
    new_clock, new_wall = FakeClock(5.0), FakeClock(wall.now + 10 * MINUTE)
    restored = CostBudget.from_state(state, clock=new_clock, wall_clock=new_wall)
    assert (restored.per_hour, restored.per_day) == (1.0, 5.0)
    assert restored.spent_last_hour == pytest.approx(0.75)
    with pytest.raises(BudgetExceeded) as caught:
        restored.check(0.5)
    # The 0.5 was spent 30 minutes ago (20 before the save, 10 of downtime).
    assert caught.value.retry_after == pytest.approx(30 * MINUTE)
    new_clock.advance(30 * MINUTE)
    assert restored.spent_last_hour == pytest.approx(0.25)


def test_budget_state_keeps_new_limits_and_forgets_spends_older_than_the_downtime() -> None:
    clock, wall = FakeClock(), FakeClock(1.7e9)
    budget = CostBudget(per_hour=1.0, per_day=5.0, clock=clock, wall_clock=wall)
    budget.spend(0.8)
    state = budget.to_state()

    stricter = CostBudget(per_hour=0.5, per_day=None, clock=FakeClock(), wall_clock=wall)
    stricter.load_state(state)
    assert stricter.per_hour == 0.5
    with pytest.raises(BudgetExceeded):
        stricter.check(0.1)

    wall.advance(DAY + 1)
    later = CostBudget.from_state(state, clock=FakeClock(), wall_clock=wall)
    assert later.spent_last_day == 0


@pytest.mark.parametrize(
    "state",
    [
        {"version": 2, "saved_at": 0, "spends": []},
        {"version": 1, "saved_at": "yesterday", "spends": []},
        {"version": 1, "saved_at": 0, "spends": {}},
        {"version": 1, "saved_at": 0, "spends": [[1, 2]]},
        {"version": 1, "saved_at": 0, "spends": [[1, 1, -3]]},
        {"version": 1, "saved_at": 0, "spends": [], "per_hour": "lots"},
    ],
)
def test_budget_refuses_a_bad_state(state: dict[str, object]) -> None:
    with pytest.raises(StateError, match="cost budget state"):
        CostBudget.from_state(state, clock=FakeClock(), wall_clock=FakeClock())


@pytest.mark.parametrize("cost", [-0.1, math.nan, math.inf])
def test_budget_refuses_nonsense_costs(cost: float) -> None:
    budget = CostBudget(per_hour=1.0, per_day=None, clock=FakeClock())
    with pytest.raises(ValueError, match="finite number"):
        budget.spend(cost)


def test_budget_spend_is_exact_under_threads() -> None:
    budget = CostBudget(per_hour=None, per_day=None, clock=FakeClock())

    def worker() -> None:
        for _ in range(500):
            budget.spend(0.5)

    run_threads(8, worker)
    assert budget.spent_last_hour == 2_000.0
    assert budget.spent_last_day == 2_000.0


def test_budget_charge_never_overshoots_under_threads() -> None:
    budget = CostBudget(per_hour=300.0, per_day=None, clock=FakeClock())
    charged: list[int] = []
    lock = threading.Lock()

    def worker() -> None:
        mine = 0
        for _ in range(100):
            try:
                budget.charge(1.0)
                mine += 1
            except BudgetExceeded:
                pass
        with lock:
            charged.append(mine)

    run_threads(8, worker)
    assert sum(charged) == 300
    assert budget.spent_last_hour == 300.0


# -- circuit breaker ---------------------------------------------------------------------


def state_of(breaker: CircuitBreaker) -> BreakerState:
    """The breaker's state, read through a call so the type checker does not narrow it."""
    return breaker.state


def test_circuit_breaker_full_cycle() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker(failure_threshold=3, reset_after=30.0, name="erp", clock=clock)
    assert state_of(breaker) is BreakerState.CLOSED
    breaker.record_failure()
    breaker.record_failure()
    breaker.record_success()  # a success in between resets the count
    assert breaker.consecutive_failures == 0
    for _ in range(3):
        assert breaker.allow()
        breaker.record_failure()
    assert state_of(breaker) is BreakerState.OPEN
    assert not breaker.allow()
    assert breaker.retry_after() == 30.0

    clock.advance(10)
    with pytest.raises(CircuitOpen) as caught:
        breaker.allow_or_raise()
    assert caught.value.limit == "circuit_open"
    assert caught.value.retry_after == pytest.approx(20.0)
    assert str(caught.value) == (
        "connector 'erp' circuit open after 3 consecutive failures; next trial call in 20 s"
    )

    clock.advance(20)
    assert state_of(breaker) is BreakerState.HALF_OPEN
    assert breaker.allow()  # the one trial call
    assert not breaker.allow()
    breaker.record_failure()  # the trial failed: open again, for a full reset_after
    assert state_of(breaker) is BreakerState.OPEN
    assert breaker.retry_after() == 30.0

    clock.advance(30)
    assert breaker.allow()
    breaker.record_success()
    assert state_of(breaker) is BreakerState.CLOSED
    assert breaker.consecutive_failures == 0
    assert breaker.retry_after() == 0.0
    assert all(breaker.allow() for _ in range(10))


def test_circuit_breaker_half_open_lets_several_trials_through() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker(failure_threshold=1, reset_after=5.0, half_open_max=2, clock=clock)
    breaker.record_failure()
    clock.advance(5)
    assert [breaker.allow() for _ in range(3)] == [True, True, False]
    assert breaker.retry_after() == pytest.approx(5.0)


def test_circuit_breaker_forgets_a_trial_nobody_reported() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker(failure_threshold=1, reset_after=5.0, clock=clock)
    breaker.record_failure()
    clock.advance(5)
    assert breaker.allow()  # this caller dies and never reports
    clock.advance(4.9)
    assert not breaker.allow()
    clock.advance(0.1)
    assert breaker.allow()


def test_circuit_breaker_ignores_late_outcomes_while_open() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker(failure_threshold=2, reset_after=10.0, clock=clock)
    breaker.record_failure()
    breaker.record_failure()
    clock.advance(4)
    breaker.record_failure()  # a call made before it opened: does not extend the wait
    breaker.record_success()  # nor does a late success close it
    assert state_of(breaker) is BreakerState.OPEN
    assert breaker.retry_after() == pytest.approx(6.0)


# -- concurrency -------------------------------------------------------------------------


def test_concurrency_limit_try_acquire_and_release() -> None:
    limit = ConcurrencyLimit(2)
    assert limit.try_acquire()
    assert limit.try_acquire()
    assert not limit.try_acquire()
    assert limit.in_use == 2
    limit.release()
    assert limit.in_use == 1
    assert limit.try_acquire()
    limit.release()
    limit.release()
    with pytest.raises(RuntimeError, match="without a matching acquire"):
        limit.release()
    with pytest.raises(ValueError, match="at least 1"):
        ConcurrencyLimit(0)


def test_concurrency_limit_is_exact_under_threads() -> None:
    limit = ConcurrencyLimit(5)
    got: list[int] = []
    lock = threading.Lock()

    def worker() -> None:
        mine = sum(limit.try_acquire() for _ in range(100))
        with lock:
            got.append(mine)

    run_threads(8, worker)
    assert sum(got) == 5
    assert limit.in_use == 5


def test_concurrency_limit_async_waiters_are_served_in_order() -> None:
    async def scenario() -> None:
        limit = ConcurrencyLimit(1)
        await limit.acquire()
        order: list[str] = []

        async def waiter(name: str) -> None:
            await limit.acquire()
            order.append(name)

        first = asyncio.create_task(waiter("first"))
        await asyncio.sleep(0)
        second = asyncio.create_task(waiter("second"))
        await asyncio.sleep(0)
        limit.release()
        assert not limit.try_acquire()  # the slot went to the first waiter, not to us
        await first
        assert order == ["first"]
        # Released from another thread, as a step finishing on a worker thread would.
        await asyncio.to_thread(limit.release)
        await second
        assert order == ["first", "second"]
        assert limit.in_use == 1

    asyncio.run(scenario())


def test_concurrency_limit_async_timeout_and_cancel_do_not_leak_slots() -> None:
    async def scenario() -> None:
        limit = ConcurrencyLimit(1)
        assert limit.try_acquire()
        with pytest.raises(RateLimited, match="max_concurrent_runs 1 reached") as caught:
            await limit.acquire(timeout=0.01)
        assert caught.value.limit == "max_concurrent_runs"
        assert limit.in_use == 1

        task = asyncio.create_task(limit.acquire())
        await asyncio.sleep(0)
        limit.release()  # the slot is on its way to the task...
        task.cancel()  # ...which is cancelled before it runs again
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.sleep(0)
        assert limit.in_use == 0
        assert limit.try_acquire()

    asyncio.run(scenario())


# -- backoff -----------------------------------------------------------------------------


def test_backoff_is_the_shared_retry_backoff() -> None:
    assert backoff_delay is retry.backoff_delay


def test_backoff_full_jitter_stays_within_a_growing_ceiling() -> None:
    rng = random.Random(7)
    for attempt in range(1, 12):
        ceiling = min(60.0, 0.5 * 2 ** (attempt - 1))
        samples = [backoff_delay(attempt, rng=rng) for _ in range(300)]
        assert all(0.0 <= s <= ceiling for s in samples)
        # Full jitter spreads over the whole range: the mean is near half the ceiling.
        assert sum(samples) / len(samples) == pytest.approx(ceiling / 2, rel=0.15)
    means = [
        sum(backoff_delay(a, base=1.0, cap=1e9, rng=rng) for _ in range(300)) / 300
        for a in range(1, 8)
    ]
    assert means == sorted(means)


def test_backoff_caps_and_never_overflows() -> None:
    rng = random.Random(1)
    assert all(0.0 <= backoff_delay(10_000, cap=5.0, rng=rng) <= 5.0 for _ in range(100))
    with pytest.raises(ValueError, match="from 1"):
        backoff_delay(0)
