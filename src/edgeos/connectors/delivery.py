"""The delivery worker: drains the outbox through the connectors, exactly once in effect.

Delivery is at-least-once: an effect is marked delivered only after its connector said
so, in one transaction with its ``effect_delivered`` journal record. A crash between the
receiver applying the effect and that commit means the effect is delivered again, with
the same idempotency key, and the receiver deduplicates it. Together: exactly once in
effect.

Per outcome, in one transaction:

- success: ``outbox.mark_delivered`` + journal ``effect_delivered``;
- retryable failure: ``outbox.mark_retry`` at ``now + retry_after`` (the receiver's hint)
  or ``backoff_delay(attempt)``;
- permanent failure, or the last of ``max_attempts``: ``outbox.mark_dead`` + journal
  ``effect_dead`` + an ERROR log record + ``edgeos_outbox_dead_total{connector}``;
- a failure after which the effect may have been applied (``maybe_applied``: a timeout
  after sending, a connection lost mid-call, an answer that breaks the contract) of an
  operation whose contract says it has side effects and is not idempotent, through a
  connector whose target cannot deduplicate by key: not retried, since sending it again
  could apply it twice. It is dead with an error starting ``needs review:`` and
  ``"needs_review": true`` in its ``effect_dead`` record
  (``edgeos_outbox_needs_review_total{connector}``): a person checks at the target
  whether it was applied. (The outbox has no state of its own for this.)

When the binding implements a contract (``contracts``), every delivery passes its
boundary (:mod:`edgeos.connectors.boundary`): the payload is checked against the input
schema before any I/O (a violation is permanent), the call is bounded by the contract's
timeout, and the result is checked against the output schema (a violation is retryable,
then dead with the contract, operation and field named); the contract's rate is shared by
every agent that uses the binding. Fields the contract marks personal
(:mod:`edgeos.connectors.personal`) are pseudonymised in the stored result, their values
are masked in error texts and log lines, and the outbox row's old versions are overwritten
on disk as it changes.

An effect for a connector that is not configured (yet) is postponed without counting an
attempt: the binding may arrive with the next configuration.

The worker wakes when :meth:`DeliveryWorker.wake` is called (the executor just wrote
rows), when a delivery finishes, when the next row is due (``outbox.next_due_at``), and
at least every ``poll_interval`` seconds, which catches rows written by other processes;
otherwise it sleeps.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from edgeos.connectors.base import Connector, DeliveryError, deduplicates
from edgeos.connectors.boundary import call_checked, check_input
from edgeos.connectors.personal import overwritten
from edgeos.connectors.vault import Redactor
from edgeos.limits import CircuitBreaker, TokenBucket
from edgeos.retry import backoff_delay
from edgeos.state import journal, outbox
from edgeos.state.database import Database
from edgeos.state.outbox import OutboxEntry
from edgeos.telemetry.metrics import MetricsRegistry
from edgeos.telemetry.tracing import delivery_span

if TYPE_CHECKING:
    # contracts imports pydantic: a node without connectors.yaml must not pay for it.
    from edgeos.connectors.contracts import Contract

logger = logging.getLogger(__name__)

#: How the error of an effect set aside for a person begins.
NEEDS_REVIEW = "needs review"


@dataclass(frozen=True)
class OperationLimits:
    """What a contract asks of every call to one operation of a binding."""

    timeout: float
    per_minute: float | None = None


def contract_limits(contracts: Mapping[str, Contract]) -> dict[str, OperationLimits]:
    """The limits of every operation of every bound contract, by ``binding.operation``."""
    return {
        f"{binding}.{name}": OperationLimits(op.timeout, op.rate_limit_per_minute)
        for binding, contract in contracts.items()
        for name, op in contract.operations.items()
    }


class DeliveryWorker:
    """An asyncio task that delivers due outbox rows through their connectors.

    ``connectors`` is read at every delivery, so the daemon may add bindings to the
    mapping it passed in; the worker does not close connectors (their owner does).
    ``contracts`` is the contract of each binding that implements one: its schemas, flags
    and limits apply to every delivery; ``limits`` adds or overrides limits by
    ``binding.operation``.
    """

    def __init__(
        self,
        db: Database,
        connectors: Mapping[str, Connector],
        *,
        max_attempts: int = 8,
        base_delay: float = 0.5,
        max_delay: float = 60.0,
        metrics: MetricsRegistry | None = None,
        clock: Callable[[], float] = time.time,
        concurrency: int = 8,
        poll_interval: float = 1.0,
        grace: float = 5.0,
        batch_size: int = 100,
        breaker_threshold: int = 5,
        breaker_reset: float = 30.0,
        limits: Mapping[str, OperationLimits] | None = None,
        contracts: Mapping[str, Contract] | None = None,
    ) -> None:
        #: By binding: the contract whose boundary every delivery passes.
        self.contracts = dict(contracts or {})
        #: Per "binding.operation": a rate shared by every agent, and a time limit per call.
        self.limits = {**contract_limits(self.contracts), **(limits or {})}
        self._buckets: dict[str, TokenBucket] = {}
        self.breaker_threshold = breaker_threshold
        self.breaker_reset = breaker_reset
        if max_attempts < 1:
            raise ValueError(f"max_attempts must be at least 1, got {max_attempts}")
        if concurrency < 1:
            raise ValueError(f"concurrency must be at least 1, got {concurrency}")
        if base_delay <= 0 or max_delay < base_delay:
            raise ValueError(f"need 0 < base_delay <= max_delay, got {base_delay}, {max_delay}")
        if poll_interval <= 0:
            raise ValueError(f"poll_interval must be positive, got {poll_interval}")
        self.db = db
        self.connectors = connectors
        self.max_attempts = max_attempts
        self.base_delay = base_delay
        self.max_delay = max_delay
        self.clock = clock
        self.concurrency = concurrency
        self.poll_interval = poll_interval
        self.grace = grace
        self.batch_size = batch_size
        self.metrics = metrics if metrics is not None else MetricsRegistry()
        by_connector = ("connector",)
        self.delivered_total = self.metrics.counter(
            "edgeos_outbox_delivered_total", "Effects delivered, by connector.", by_connector
        )
        self.retries_total = self.metrics.counter(
            "edgeos_outbox_retries_total",
            "Failed delivery attempts that will be retried, by connector.",
            by_connector,
        )
        self.dead_total = self.metrics.counter(
            "edgeos_outbox_dead_total",
            "Effects given up on (permanent failure or attempts exhausted), by connector.",
            by_connector,
        )
        self.needs_review_total = self.metrics.counter(
            "edgeos_outbox_needs_review_total",
            "Dead effects that may have been applied and were not sent again, by connector.",
            by_connector,
        )
        self.delivery_seconds = self.metrics.histogram(
            "edgeos_outbox_delivery_seconds",
            "Time a connector took to deliver one effect (successful or not).",
            by_connector,
        )
        #: Times the background loop woke up; lets tests (and people) see that it sleeps.
        self.loops = 0
        self._slots = asyncio.Semaphore(concurrency)
        self._wake = asyncio.Event()
        self._in_flight: dict[str, asyncio.Task[bool]] = {}
        # Keys whose outcome could not be recorded (the node database failed): not tried
        # again before the given clock time, so a broken disk cannot cause a hot loop.
        self._hold: dict[str, float] = {}
        self._breakers: dict[str, CircuitBreaker] = {}
        self._record_failures = 0
        self._warned: set[str] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()
        self._stop_task: asyncio.Future[None] | None = None

    # -- control ----------------------------------------------------------------------
    def start(self) -> None:
        """Start the background task on the running event loop. Idempotent."""
        if self._stopping.is_set():
            raise RuntimeError("a stopped DeliveryWorker cannot be started again")
        if self._task is None:
            self._loop = asyncio.get_running_loop()
            self._task = self._loop.create_task(self._run(), name="edgeos-outbox-delivery")

    def wake(self) -> None:
        """Look at the outbox now (new rows were written). Callable from any thread."""
        loop = self._loop
        try:
            running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if loop is not None and running is not loop:
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody to wake
                loop.call_soon_threadsafe(self._wake.set)
        else:
            self._wake.set()

    async def stop(self, grace: float | None = None) -> None:
        """Stop taking rows; let in-flight deliveries finish for ``grace`` s, then cancel.

        A cancelled delivery stays pending and is delivered again (same key) later.
        Safe to call twice, and concurrently.
        """
        if self._stop_task is None:
            wait = self.grace if grace is None else grace
            self._stop_task = asyncio.ensure_future(self._shutdown(wait))
        await asyncio.shield(self._stop_task)

    async def drain_once(self) -> int:
        """Deliver everything due now; returns how many delivery attempts were made.

        Each due row is tried at most once per call, so a row rescheduled for "now"
        (Retry-After: 0) cannot keep the call going. Rows of unconfigured connectors are
        postponed and not counted.
        """
        seen: set[str] = set()
        attempts = 0
        while True:
            now = self.clock()
            self._expire_holds(now)
            limit = self.batch_size + len(seen) + len(self._in_flight) + len(self._hold)
            entries = await asyncio.to_thread(outbox.due, self.db, now, limit)
            fresh = [e for e in entries if e.key not in seen and self._free(e.key)]
            if not fresh:
                return attempts
            seen.update(e.key for e in fresh)
            results = await asyncio.gather(*(self._spawn(e) for e in fresh))
            attempts += sum(results)

    # -- the loop ---------------------------------------------------------------------
    async def _run(self) -> None:
        while not self._stopping.is_set():
            self._wake.clear()
            self.loops += 1
            try:
                await self._dispatch()
                timeout = await self._idle_time()
            except Exception:
                logger.exception(
                    "outbox delivery loop failed; trying again in %.1f s", self.poll_interval
                )
                timeout = self.poll_interval
            if self._stopping.is_set():
                break
            if timeout > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout)

    async def _dispatch(self) -> None:
        """Start deliveries for due rows while there are free slots."""
        free = self.concurrency - len(self._in_flight)
        if free <= 0:
            return
        now = self.clock()
        self._expire_holds(now)
        limit = free + len(self._in_flight) + len(self._hold)
        entries = await asyncio.to_thread(outbox.due, self.db, now, limit)
        for entry in entries:
            if free == 0 or self._stopping.is_set():
                break
            if self._free(entry.key):
                self._spawn(entry)
                free -= 1

    async def _idle_time(self) -> float:
        """Seconds to sleep before looking again, unless woken."""
        if len(self._in_flight) >= self.concurrency:
            return self.poll_interval  # a finishing delivery wakes the loop
        next_due = await asyncio.to_thread(outbox.next_due_at, self.db)
        now = self.clock()
        candidates = [self.poll_interval]
        if next_due is not None:
            if next_due > now:
                candidates.append(next_due - now)
            elif not self._in_flight and not self._hold:
                return 0.0  # became due since the dispatch: look again at once
            # else the due rows are in flight (their end wakes us) or held (below)
        candidates += [max(until - now, 0.01) for until in self._hold.values()]
        return min(candidates)

    def _free(self, key: str) -> bool:
        return key not in self._in_flight and key not in self._hold

    def _expire_holds(self, now: float) -> None:
        for key in [k for k, until in self._hold.items() if until <= now]:
            del self._hold[key]

    def _spawn(self, entry: OutboxEntry) -> asyncio.Task[bool]:
        task = asyncio.get_running_loop().create_task(
            self._attempt(entry), name=f"edgeos-deliver-{entry.key}"
        )
        self._in_flight[entry.key] = task
        task.add_done_callback(lambda t: self._finished(entry.key, t))
        return task

    def _finished(self, key: str, task: asyncio.Task[bool]) -> None:
        self._in_flight.pop(key, None)
        self._wake.set()  # a slot is free, and the next due time may have changed
        if not task.cancelled() and task.exception() is not None:
            logger.error("delivery of effect %s crashed", key, exc_info=task.exception())

    async def _shutdown(self, grace: float) -> None:
        self._stopping.set()
        self._wake.set()
        deadline = time.monotonic() + max(grace, 0.0)
        task, self._task = self._task, None
        if task is not None:
            # The loop notices _stopping after its current database read.
            await asyncio.wait({task}, timeout=max(deadline - time.monotonic(), 0.0))
            if not task.done():
                task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        in_flight = list(self._in_flight.values())
        if in_flight:
            _, unfinished = await asyncio.wait(
                in_flight, timeout=max(deadline - time.monotonic(), 0.0)
            )
            if unfinished:
                logger.warning(
                    "outbox delivery stopped with %d deliveries unfinished after %.1f s; "
                    "they stay pending and will be delivered again with the same key",
                    len(unfinished),
                    grace,
                )
                for pending in unfinished:
                    pending.cancel()
                await asyncio.gather(*unfinished, return_exceptions=True)

    # -- one row ----------------------------------------------------------------------
    async def _attempt(self, entry: OutboxEntry) -> bool:
        """Deliver one row and record the outcome; True if a delivery was attempted."""
        # The row was listed before this task existed: an earlier attempt at the same key
        # may have committed its outcome since. Read it again (this key is now ours) so
        # that an effect already delivered, dead or rescheduled is not sent once more.
        current = await asyncio.to_thread(outbox.get, self.db, entry.key)
        if current is None or current.state != outbox.PENDING:
            return False
        if current.next_attempt_at > self.clock():
            return False
        entry = current
        connector = self.connectors.get(entry.connector)
        if connector is None:
            await self._record(self._postpone, entry)
            return False
        contract = self.contracts.get(entry.connector)
        try:
            # Before the rate limit and the breaker: a payload that breaks the contract
            # fails the same way whenever it is tried, and costs the target nothing.
            check_input(entry.connector, contract, entry.operation, entry.payload)
        except DeliveryError as exc:
            error = self._masked(entry, str(exc))
            await self._record(self._dead, entry, entry.attempts + 1, error)
            return True
        breaker = self._breaker(entry.connector)
        limit = self.limits.get(f"{entry.connector}.{entry.operation}")
        bucket = self._bucket(entry, limit)
        if bucket is not None and not bucket.try_take():
            # Over the contract's rate: wait for a token without spending an attempt.
            await self._record(self._rate_held, entry, bucket.wait_time())
            return False
        attempt = entry.attempts + 1
        failure: DeliveryError | None = None
        result: dict[str, Any] | None = None
        async with self._slots:
            # Asked only once a slot is ours, so failures of deliveries ahead count.
            if not breaker.allow():
                # The target keeps failing: wait for the breaker instead of spending attempts.
                await self._record(self._hold_back, entry, breaker.retry_after())
                return False
            started = time.perf_counter()
            try:
                # Every attempt is a span of its run's trace, whatever the connector; a
                # contract's timeout bounds every call, a custom connector's included.
                with delivery_span(entry.key, connector=entry.connector, operation=entry.operation):
                    result = await call_checked(
                        connector, entry.operation, entry.payload, entry.key,
                        contract=contract, timeout=limit.timeout if limit else None,
                    )  # fmt: skip
            except DeliveryError as exc:
                failure = exc
            except Exception as exc:
                # A bug in a connector must not stop delivery; retrying may still help,
                # and exhausting the attempts makes it visible as a dead effect. Where it
                # failed is unknown, so the effect may have been applied.
                self._log_crash(entry, exc)
                failure = DeliveryError(
                    entry.connector, entry.operation, f"unexpected {type(exc).__name__}: {exc}",
                    retryable=True, maybe_applied=True,
                )  # fmt: skip
            self.delivery_seconds.observe(time.perf_counter() - started, entry.connector)
        if failure is None:
            breaker.record_success()
            await self._record(self._delivered, entry, attempt, result)
            return True
        error = self._masked(entry, str(failure))
        if failure.retryable:  # a refused request says nothing about the target's health
            breaker.record_failure()
        review = self._unsafe_to_retry(entry, connector, failure)
        if review is not None:
            await self._record(
                self._dead, entry, attempt, f"{NEEDS_REVIEW}: {error}; {review}", True
            )
        elif not failure.retryable or attempt >= self.max_attempts:
            if failure.retryable:
                error = f"{error} (gave up after {attempt} attempts)"
            await self._record(self._dead, entry, attempt, error)
        else:
            delay = (
                max(failure.retry_after, 0.0)
                if failure.retry_after is not None
                else backoff_delay(attempt, base=self.base_delay, cap=self.max_delay)
            )
            await self._record(self._retry, entry, attempt, error, delay)
        return True

    def _personal(self, entry: OutboxEntry) -> Redactor | None:
        """Masks the personal values of the entry's payload in text; None if it has none."""
        contract = self.contracts.get(entry.connector)
        if contract is None:
            return None
        values = contract.personal_values(entry.operation, entry.payload)
        return Redactor(values, mask="[personal]") if values else None

    def _masked(self, entry: OutboxEntry, text: str) -> str:
        """``text`` (an error: a receiver may quote the request) without personal values."""
        mask = self._personal(entry)
        return text if mask is None else mask(text)

    def _log_crash(self, entry: OutboxEntry, exc: Exception) -> None:
        if self._personal(entry) is None:
            logger.exception("connector %r crashed delivering %s", entry.connector, entry.key)
        else:  # a traceback's messages could quote the payload: the masked message only
            logger.error(
                "connector %r crashed delivering %s: %s", entry.connector, entry.key,
                self._masked(entry, f"{type(exc).__name__}: {exc}"),
            )  # fmt: skip

    @contextlib.contextmanager
    def _transaction(self, entry: OutboxEntry) -> Iterator[sqlite3.Connection]:
        """A write transaction for the entry's outcome; when its payload holds personal
        values, rows the transaction moves or frees are overwritten on disk, so the old
        versions of the outbox row leave no copy behind in free space."""
        with self.db.transaction() as conn:
            if self._personal(entry) is None:
                yield conn
            else:
                with overwritten(conn):
                    yield conn

    def _unsafe_to_retry(
        self, entry: OutboxEntry, connector: Connector, failure: DeliveryError
    ) -> str | None:
        """Why a failure that may have applied the effect must not be retried, if so.

        Sending again is safe when the operation changes nothing or is idempotent (its
        contract says so), or when the connector's target deduplicates by key; without a
        contract nothing is known, and retrying (with the key) stays the rule.
        """
        if not failure.retryable or not failure.maybe_applied:
            return None
        contract = self.contracts.get(entry.connector)
        op = None if contract is None else contract.operations.get(entry.operation)
        if contract is None or op is None or op.retry_safe or deduplicates(connector):
            return None
        return (
            f"not sent again: {contract.label} {entry.operation} has side effects and is not "
            f"idempotent, and connector '{entry.connector}' cannot deduplicate by key; check "
            f"at the target whether it was applied"
        )

    async def _record(self, write: Callable[..., None], entry: OutboxEntry, *args: Any) -> None:
        """Run one outcome's transaction off the event loop; on failure, hold the key."""
        try:
            await asyncio.to_thread(write, entry, *args)
        except Exception as exc:  # sqlite3.Error, StateError, a full disk...
            # Back off while the database keeps refusing (a full disk lasts): each failure
            # doubles the wait, and only the first of a streak carries a traceback.
            self._record_failures += 1
            first = max(self.base_delay, self.poll_interval)
            # Capped low: space usually returns at once, and delivery should follow it.
            hold = min(self.max_delay, 8 * first, first * 2 ** min(self._record_failures - 1, 3))
            self._hold[entry.key] = self.clock() + hold
            logger.error(
                "cannot record the delivery outcome of effect %s (%s); trying it again in "
                "%.1f s: %s",
                entry.key,
                entry.connector,
                hold,
                exc,
                exc_info=exc if self._record_failures == 1 else None,
            )
        else:
            self._record_failures = 0

    def _delivered(self, entry: OutboxEntry, attempt: int, result: dict[str, Any] | None) -> None:
        now = self.clock()
        contract = self.contracts.get(entry.connector)
        if contract is not None and result is not None:
            # The answer is a record, not something to deliver: no personal values in it.
            result = contract.redact(entry.operation, result, direction="output")
        with self._transaction(entry) as conn:
            before = conn.total_changes
            # Plain JSON already (the boundary made it so, to check it).
            outbox.mark_delivered(conn, entry.key, at=now, result=result)
            if conn.total_changes == before:
                return  # no longer pending (delivered by another worker): journal nothing
            journal.append(
                conn, entry.run_id, "effect_delivered",
                {"key": entry.key, "connector": entry.connector,
                 "operation": entry.operation, "attempts": attempt},
                at=now,
            )  # fmt: skip
        self.delivered_total.inc(entry.connector)
        logger.debug("delivered effect %s via %s.%s", entry.key, entry.connector, entry.operation)

    def _retry(self, entry: OutboxEntry, attempt: int, error: str, delay: float) -> None:
        with self._transaction(entry) as conn:
            outbox.mark_retry(conn, entry.key, error=error, next_attempt_at=self.clock() + delay)
        self.retries_total.inc(entry.connector)
        logger.info(
            "effect %s: attempt %d of %d failed, retrying in %.2f s: %s",
            entry.key, attempt, self.max_attempts, delay, error,
        )  # fmt: skip

    def _dead(self, entry: OutboxEntry, attempt: int, error: str, review: bool = False) -> None:
        now = self.clock()
        record: dict[str, Any] = {
            "key": entry.key, "connector": entry.connector, "operation": entry.operation,
            "attempts": attempt, "error": error,
        }  # fmt: skip
        if review:
            record["needs_review"] = True
        with self._transaction(entry) as conn:
            before = conn.total_changes
            outbox.mark_dead(conn, entry.key, error=error)
            if conn.total_changes == before:
                return
            journal.append(conn, entry.run_id, "effect_dead", record, at=now)
        self.dead_total.inc(entry.connector)
        if review:
            self.needs_review_total.inc(entry.connector)
        logger.error(
            "effect %s of run %s (%s.%s) is dead after %d attempt(s): %s",
            entry.key, entry.run_id, entry.connector, entry.operation, attempt, error,
        )  # fmt: skip

    def _breaker(self, connector: str) -> CircuitBreaker:
        breaker = self._breakers.get(connector)
        if breaker is None:
            breaker = self._breakers[connector] = CircuitBreaker(
                failure_threshold=self.breaker_threshold,
                reset_after=self.breaker_reset,
                name=f"connector {connector}",
                clock=time.monotonic,
            )
        return breaker

    def _bucket(self, entry: OutboxEntry, limit: OperationLimits | None) -> TokenBucket | None:
        if limit is None or limit.per_minute is None:
            return None
        key = f"{entry.connector}.{entry.operation}"
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = TokenBucket(
                limit.per_minute, burst=1, limit="rate_limit_per_minute", owner=key
            )
        return bucket

    def _rate_held(self, entry: OutboxEntry, wait: float) -> None:
        with self._transaction(entry) as conn:
            outbox.postpone(
                conn,
                entry.key,
                error=f"waiting for the rate limit of {entry.connector}.{entry.operation}",
                next_attempt_at=self.clock() + max(wait, 0.01),
            )

    def _hold_back(self, entry: OutboxEntry, wait: float) -> None:
        with self._transaction(entry) as conn:
            outbox.postpone(
                conn,
                entry.key,
                error=f"circuit open for connector '{entry.connector}': it kept failing",
                next_attempt_at=self.clock() + max(wait, 0.05),
            )

    def _postpone(self, entry: OutboxEntry) -> None:
        error = (
            f"connector '{entry.connector}' is not configured on this node (connectors.yaml); "
            f"the effect waits for it"
        )
        with self.db.transaction() as conn:
            outbox.postpone(
                conn, entry.key, error=error, next_attempt_at=self.clock() + self.max_delay
            )
        if entry.connector not in self._warned:
            self._warned.add(entry.connector)
            logger.warning("%s (effect %s)", error, entry.key)
