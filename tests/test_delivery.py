"""The delivery worker against a real node database, a real HTTP receiver and SQLite.

Rows are enqueued the way the executor does it (``outbox.enqueue`` inside
``db.transaction()``); the worker's clock is injected so retries are due when a test says
so, and the background loop is checked with the real clock.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from edgeos.connectors import Connector, DeliveryWorker, HttpOperation, SqlOperation
from edgeos.connectors.http import HttpConnector
from edgeos.connectors.sql import SqlConnector
from edgeos.state import Database, journal, outbox
from edgeos.state.outbox import OutboxEntry
from edgeos.telemetry import MetricsRegistry
from tests.test_connectors import ORDERS_SQLITE, Receiver, run

T0 = 1_700_000_000.0
ROUTES = ("orders", "flaky", "always503", "bad", "busy", "hold", "slow")


class Clock:
    """A clock the test moves by hand."""

    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    server = Receiver()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def store(tmp_path: Path) -> Path:
    path = tmp_path / "store.db"
    conn = sqlite3.connect(path)
    conn.execute(ORDERS_SQLITE)
    conn.commit()
    conn.close()
    return path


def supplier(receiver: Receiver, name: str = "supplier") -> HttpConnector:
    """An HTTP connector with one operation per receiver route."""
    operations = {r: HttpOperation(method="POST", path=f"/{r}") for r in ROUTES}
    return HttpConnector(name, base_url=receiver.url, operations=operations, timeout_s=5)


def sqlite_store(path: Path) -> SqlConnector:
    statement = "INSERT INTO orders (sku, qty) VALUES (:sku, :qty)"
    return SqlConnector(
        "store", url=f"sqlite:///{path}", operations={"reorder": SqlOperation(statement=statement)}
    )


def order(sku: str = "A-1", qty: int = 3, **extra: Any) -> dict[str, Any]:
    return {"sku": sku, "qty": qty, **extra}


def enqueue(
    db: Database,
    key: str,
    connector: str = "supplier",
    operation: str = "orders",
    payload: dict[str, Any] | None = None,
    *,
    at: float = T0,
    run_id: str = "run1",
) -> None:
    entry = OutboxEntry(key, run_id, connector, operation, payload or order())
    with db.transaction() as conn:
        assert outbox.enqueue(conn, entry, at=at)


def row(db: Database, key: str) -> OutboxEntry:
    entry = outbox.get(db, key)
    assert entry is not None
    return entry


def stored_result(db: Database, key: str) -> Any:
    (text,) = db.reader().execute("SELECT result FROM outbox WHERE key = ?", (key,)).fetchone()
    return None if text is None else orjson.loads(text)


def records(db: Database, run_id: str = "run1") -> list[tuple[str, dict[str, Any], float]]:
    return [(r.kind, r.payload, r.at) for r in journal.for_run(db, run_id)]


def make_worker(
    db: Database, connectors: dict[str, Connector], clock: Callable[[], float], **kwargs: Any
) -> DeliveryWorker:
    options: dict[str, Any] = {"max_attempts": 4, "base_delay": 0.01, "max_delay": 0.05}
    return DeliveryWorker(db, connectors, clock=clock, **(options | kwargs))


async def close_all(connectors: dict[str, Connector]) -> None:
    for connector in connectors.values():
        await connector.close()


async def until(check: Callable[[], bool], timeout: float = 5.0) -> float:
    """Wait until ``check()`` holds; return how long it took."""
    start = time.monotonic()
    while not check():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"condition not met within {timeout} s")
        await asyncio.sleep(0.01)
    return time.monotonic() - start


# -- outcomes ---------------------------------------------------------------------------
def test_due_rows_are_delivered_marked_and_journaled(
    db: Database, receiver: Receiver, store: Path
) -> None:
    clock = Clock()
    enqueue(db, "run1:0:0", payload=order("A-1", 3))
    enqueue(db, "run1:1:0", payload=order("B-2", 1))
    enqueue(db, "run2:0:0", "store", "reorder", order("C-3", 2), run_id="run2")
    metrics = MetricsRegistry()

    async def go() -> list[int]:
        connectors: dict[str, Connector] = {
            "supplier": supplier(receiver),
            "store": sqlite_store(store),
        }
        worker = make_worker(db, connectors, clock, metrics=metrics)
        try:
            return [await worker.drain_once(), await worker.drain_once()]
        finally:
            await close_all(connectors)

    assert run(go()) == [3, 0]
    for key in ("run1:0:0", "run1:1:0", "run2:0:0"):
        entry = row(db, key)
        assert (entry.state, entry.attempts, entry.delivered_at, entry.last_error) == (
            "delivered", 1, T0, None,
        )  # fmt: skip
    assert stored_result(db, "run1:0:0")["status"] == 201
    assert stored_result(db, "run2:0:0") == {"duplicate": False, "rowcount": 1}
    assert sorted(a["key"] for a in receiver.applied) == ["run1:0:0", "run1:1:0"]
    # Deliveries run concurrently, so the journal has them in completion order.
    assert sorted(records(db, "run1"), key=lambda r: str(r[1]["key"])) == [
        ("effect_delivered", {"key": k, "connector": "supplier", "operation": "orders",
                              "attempts": 1}, T0)
        for k in ("run1:0:0", "run1:1:0")
    ]  # fmt: skip
    assert records(db, "run2") == [
        ("effect_delivered", {"key": "run2:0:0", "connector": "store", "operation": "reorder",
                              "attempts": 1}, T0),
    ]  # fmt: skip
    assert journal.verify(db).ok
    assert outbox.counts(db) == {"pending": 0, "delivered": 3, "dead": 0}
    text = metrics.render()
    assert 'edgeos_outbox_delivered_total{connector="supplier"} 2' in text
    assert 'edgeos_outbox_delivered_total{connector="store"} 1' in text


def test_a_receiver_that_fails_twice_then_succeeds(db: Database, receiver: Receiver) -> None:
    clock = Clock()
    enqueue(db, "run1:0:0", operation="flaky", payload=order(fail=2))
    worker_metrics = MetricsRegistry()

    async def go() -> list[tuple[int, OutboxEntry]]:
        connectors: dict[str, Connector] = {"supplier": supplier(receiver)}
        worker = make_worker(db, connectors, clock, metrics=worker_metrics)
        seen = []
        try:
            for _ in range(3):
                attempts = await worker.drain_once()
                seen.append((attempts, row(db, "run1:0:0")))
                clock.advance(1.0)  # past any backoff (max_delay 0.05)
        finally:
            await close_all(connectors)
        return seen

    (a1, r1), (a2, r2), (a3, r3) = run(go())
    assert (a1, a2, a3) == (1, 1, 1)
    assert (r1.state, r1.attempts) == ("pending", 1)
    assert r1.last_error is not None
    assert "answered 503" in r1.last_error
    assert "failure 1" in r1.last_error
    # Backoff with full jitter: somewhere in [0, base_delay] after the failed attempt.
    assert T0 <= r1.next_attempt_at <= T0 + 0.01
    assert (r2.state, r2.attempts) == ("pending", 2)
    assert T0 + 1 <= r2.next_attempt_at <= T0 + 1 + 0.02
    assert (r3.state, r3.attempts, r3.last_error) == ("delivered", 3, None)
    assert len(receiver.seen("/flaky")) == 3
    assert len(receiver.applied) == 1
    assert records(db) == [
        ("effect_delivered", {"key": "run1:0:0", "connector": "supplier", "operation": "flaky",
                              "attempts": 3}, T0 + 2),
    ]  # fmt: skip
    retries = worker_metrics.counter("edgeos_outbox_retries_total", "", ["connector"])
    assert retries.value("supplier") == 2


def test_a_receiver_that_always_fails_makes_the_effect_dead(
    db: Database, receiver: Receiver, caplog: pytest.LogCaptureFixture
) -> None:
    clock = Clock()
    enqueue(db, "run1:0:0", operation="always503")
    metrics = MetricsRegistry()

    async def go() -> list[int]:
        connectors: dict[str, Connector] = {"supplier": supplier(receiver)}
        worker = make_worker(db, connectors, clock, max_attempts=3, metrics=metrics)
        counts = []
        try:
            for _ in range(4):
                counts.append(await worker.drain_once())
                clock.advance(1.0)
        finally:
            await close_all(connectors)
        return counts

    with caplog.at_level(logging.ERROR, logger="edgeos.connectors.delivery"):
        assert run(go()) == [1, 1, 1, 0]
    entry = row(db, "run1:0:0")
    assert (entry.state, entry.attempts) == ("dead", 3)
    assert entry.last_error is not None
    assert "gave up after 3 attempts" in entry.last_error
    (kind, payload, at) = records(db)[-1]
    assert kind == "effect_dead"
    assert at == T0 + 2
    assert payload["attempts"] == 3
    assert payload["key"] == "run1:0:0"
    assert "answered 503" in payload["error"]
    assert journal.verify(db).ok
    assert len(receiver.seen("/always503")) == 3
    dead = metrics.counter("edgeos_outbox_dead_total", "", ["connector"])
    retries = metrics.counter("edgeos_outbox_retries_total", "", ["connector"])
    assert (dead.value("supplier"), retries.value("supplier")) == (1, 2)
    alerts = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(alerts) == 1
    assert "run1:0:0" in alerts[0].getMessage()
    assert "dead" in alerts[0].getMessage()


def test_a_permanent_failure_is_dead_at_once(db: Database, receiver: Receiver) -> None:
    clock = Clock()
    enqueue(db, "run1:0:0", operation="bad")
    metrics = MetricsRegistry()

    async def go() -> int:
        connectors: dict[str, Connector] = {"supplier": supplier(receiver)}
        worker = make_worker(db, connectors, clock, metrics=metrics)
        try:
            return await worker.drain_once()
        finally:
            await close_all(connectors)

    assert run(go()) == 1
    entry = row(db, "run1:0:0")
    assert (entry.state, entry.attempts) == ("dead", 1)
    assert entry.last_error is not None
    assert "answered 400" in entry.last_error
    assert "gave up" not in entry.last_error
    assert [kind for kind, _, _ in records(db)] == ["effect_dead"]
    assert metrics.counter("edgeos_outbox_dead_total", "", ["connector"]).value("supplier") == 1
    assert metrics.counter("edgeos_outbox_retries_total", "", ["connector"]).value("supplier") == 0


def test_retry_after_sets_the_next_attempt(db: Database, receiver: Receiver) -> None:
    clock = Clock()
    enqueue(db, "run1:0:0", operation="busy", payload={"retry_after": "7"})

    async def go() -> list[int]:
        connectors: dict[str, Connector] = {"supplier": supplier(receiver)}
        worker = make_worker(db, connectors, clock)
        try:
            first = await worker.drain_once()
            assert row(db, "run1:0:0").next_attempt_at == T0 + 7
            clock.advance(6.9)
            early = await worker.drain_once()
            clock.advance(0.1)
            return [first, early, await worker.drain_once()]
        finally:
            await close_all(connectors)

    assert run(go()) == [1, 0, 1]
    assert row(db, "run1:0:0").attempts == 2


def test_an_unconfigured_connector_stays_pending_until_bound(
    db: Database, receiver: Receiver, caplog: pytest.LogCaptureFixture
) -> None:
    clock = Clock()
    enqueue(db, "run1:0:0", connector="erp", operation="orders")
    enqueue(db, "run1:0:1", connector="erp", operation="orders")

    async def go() -> list[int]:
        connectors: dict[str, Connector] = {}
        worker = make_worker(db, connectors, clock, max_attempts=1)
        try:
            counts = [await worker.drain_once()]
            entry = row(db, "run1:0:0")
            assert (entry.state, entry.attempts) == ("pending", 0)
            assert entry.next_attempt_at == T0 + worker.max_delay
            assert entry.last_error is not None
            assert "connector 'erp' is not configured" in entry.last_error
            clock.advance(worker.max_delay)
            counts.append(await worker.drain_once())
            # The binding arrives (a configuration reload): the effects go out, with all
            # their attempts still available (max_attempts=1 would have killed them).
            connectors["erp"] = supplier(receiver, name="erp")
            clock.advance(worker.max_delay)
            counts.append(await worker.drain_once())
            return counts
        finally:
            await close_all(connectors)

    with caplog.at_level(logging.WARNING, logger="edgeos.connectors.delivery"):
        assert run(go()) == [0, 0, 2]
    assert outbox.counts(db) == {"pending": 0, "delivered": 2, "dead": 0}
    warnings = [r for r in caplog.records if "not configured" in r.getMessage()]
    assert len(warnings) == 1  # once per connector, not once per row and poll


@pytest.mark.parametrize("kind", ["http", "sqlite"])
def test_redelivery_after_a_crash_applies_once(
    db: Database, receiver: Receiver, store: Path, kind: str
) -> None:
    """The receiver applied the effect, then the node died before mark_delivered."""
    clock = Clock()
    name, operation = ("supplier", "orders") if kind == "http" else ("store", "reorder")
    enqueue(db, "run1:0:0", name, operation, order("A-1", 3))

    async def go() -> int:
        connector: Connector = supplier(receiver) if kind == "http" else sqlite_store(store)
        connectors = {name: connector}
        try:
            await connector.deliver(operation, order("A-1", 3), "run1:0:0")  # ...crash
            worker = make_worker(db, connectors, clock)  # the node restarts
            return await worker.drain_once()
        finally:
            await close_all(connectors)

    assert run(go()) == 1
    assert row(db, "run1:0:0").state == "delivered"
    if kind == "http":
        assert len(receiver.applied) == 1
        assert len(receiver.seen("/orders")) == 2
    else:
        conn = sqlite3.connect(store)
        assert conn.execute("SELECT count(*) FROM orders").fetchone() == (1,)
        conn.close()
        assert stored_result(db, "run1:0:0") == {"duplicate": True}


def test_a_crashing_connector_does_not_stop_the_others(db: Database, receiver: Receiver) -> None:
    class Broken:
        """A connector with a bug: it raises something that is not a DeliveryError."""

        name = "broken"

        async def deliver(self, operation: str, payload: dict[str, Any], key: str) -> None:
            raise RuntimeError("bug in connector")

        async def close(self) -> None:
            pass

    clock = Clock()
    enqueue(db, "run1:0:0", connector="broken", operation="anything")
    enqueue(db, "run1:0:1")

    async def go() -> list[int]:
        connectors: dict[str, Connector] = {"broken": Broken(), "supplier": supplier(receiver)}
        worker = make_worker(db, connectors, clock, max_attempts=2)
        try:
            first = await worker.drain_once()
            clock.advance(1)
            return [first, await worker.drain_once()]
        finally:
            await close_all(connectors)

    assert run(go()) == [2, 1]
    broken = row(db, "run1:0:0")
    assert broken.state == "dead"
    assert broken.last_error is not None
    assert "unexpected RuntimeError: bug in connector" in broken.last_error
    assert row(db, "run1:0:1").state == "delivered"


def test_deliveries_run_concurrently_within_the_bound(db: Database, receiver: Receiver) -> None:
    clock = Clock()
    for i in range(20):
        enqueue(db, f"run1:{i}:0", operation="slow", payload=order(f"S-{i}", 1))

    async def go() -> int:
        connectors: dict[str, Connector] = {"supplier": supplier(receiver)}
        worker = make_worker(db, connectors, clock, concurrency=4)
        try:
            return await worker.drain_once()
        finally:
            await close_all(connectors)

    assert run(go()) == 20
    # Several requests were open at the receiver at once, never more than the bound.
    assert 2 <= receiver.max_active <= 4
    assert outbox.counts(db)["delivered"] == 20


# -- the background loop (real clock) ---------------------------------------------------
def test_wake_delivers_at_once(db: Database, receiver: Receiver) -> None:
    async def go() -> float:
        connectors: dict[str, Connector] = {"supplier": supplier(receiver)}
        # A long poll interval: only wake() can explain a quick delivery.
        worker = make_worker(db, connectors, time.time, poll_interval=5.0)
        worker.start()
        try:
            await asyncio.sleep(0.05)  # the loop looked, found nothing, and sleeps
            enqueue(db, "run1:0:0", at=time.time())
            await asyncio.to_thread(worker.wake)  # the executor may call it from a thread
            return await until(lambda: row(db, "run1:0:0").state == "delivered")
        finally:
            await worker.stop()
            await close_all(connectors)

    assert run(go()) < 1.0


def test_a_row_due_later_is_delivered_when_due(db: Database, receiver: Receiver) -> None:
    async def go() -> float:
        connectors: dict[str, Connector] = {"supplier": supplier(receiver)}
        enqueue(db, "run1:0:0", at=time.time() + 0.3)  # next_attempt_at = at
        worker = make_worker(db, connectors, time.time, poll_interval=5.0)
        worker.start()
        try:
            took = await until(lambda: row(db, "run1:0:0").state == "delivered")
            assert worker.loops <= 4
            return took
        finally:
            await worker.stop()
            await close_all(connectors)

    assert 0.25 <= run(go()) < 1.5


def test_the_worker_sleeps_when_nothing_is_due(db: Database, receiver: Receiver) -> None:
    enqueue(db, "run1:0:0", at=time.time() + 3600)  # due in an hour
    enqueue(db, "run1:0:1", connector="erp")  # due now, but nobody to deliver it

    async def go() -> int:
        connectors: dict[str, Connector] = {"supplier": supplier(receiver)}
        worker = make_worker(db, connectors, time.time, max_delay=30.0)
        worker.start()
        try:
            await asyncio.sleep(0.5)
            return worker.loops
        finally:
            await worker.stop()
            await close_all(connectors)

    # First look, the postponement finishing, perhaps one poll: never a busy loop.
    loops = run(go())
    assert 1 <= loops <= 3, loops
    assert row(db, "run1:0:0").attempts == 0
    assert receiver.requests == []


def test_stop_lets_in_flight_deliveries_finish(db: Database, receiver: Receiver) -> None:
    async def go() -> float:
        connectors: dict[str, Connector] = {"supplier": supplier(receiver)}
        worker = make_worker(db, connectors, time.time)
        worker.start()
        try:
            enqueue(db, "run1:0:0", operation="hold", at=time.time())
            worker.wake()
            await until(lambda: bool(receiver.seen("/hold")))
            asyncio.get_running_loop().call_later(0.2, receiver.release.set)
            start = time.monotonic()
            await worker.stop(grace=5.0)
            took = time.monotonic() - start
            await worker.stop()  # twice is fine
            with pytest.raises(RuntimeError, match="cannot be started again"):
                worker.start()
            return took
        finally:
            await close_all(connectors)

    assert 0.15 <= run(go()) < 2.0
    assert row(db, "run1:0:0").state == "delivered"
    assert [kind for kind, _, _ in records(db)] == ["effect_delivered"]


def test_stop_cancels_after_the_grace_period_and_the_effect_is_redelivered_once(
    db: Database, receiver: Receiver, caplog: pytest.LogCaptureFixture
) -> None:
    async def go() -> float:
        connectors: dict[str, Connector] = {"supplier": supplier(receiver)}
        worker = make_worker(db, connectors, time.time)
        worker.start()
        try:
            enqueue(db, "run1:0:0", operation="hold", at=time.time())
            worker.wake()
            await until(lambda: bool(receiver.seen("/hold")))
            start = time.monotonic()
            await asyncio.gather(worker.stop(grace=0.2), worker.stop(grace=0.2))
            took = time.monotonic() - start
            entry = row(db, "run1:0:0")
            assert (entry.state, entry.attempts, entry.last_error) == ("pending", 0, None)
            # The receiver finishes the request it got; the next node start redelivers
            # with the same key and the receiver answers from its record.
            receiver.release.set()
            await until(lambda: bool(receiver.applied))
            again = make_worker(db, connectors, time.time)
            assert await again.drain_once() == 1
            return took
        finally:
            await close_all(connectors)

    with caplog.at_level(logging.WARNING, logger="edgeos.connectors.delivery"):
        took = run(go())
    assert took < 1.0
    assert any("1 deliveries unfinished" in r.getMessage() for r in caplog.records)
    assert row(db, "run1:0:0").state == "delivered"
    assert len(receiver.applied) == 1
    assert journal.verify(db).ok


def test_stop_without_start_is_harmless(db: Database) -> None:
    async def go() -> None:
        worker = make_worker(db, {}, time.time)
        await worker.stop()
        await worker.stop()

    run(go())


def test_worker_options_are_checked(db: Database) -> None:
    with pytest.raises(ValueError, match="max_attempts"):
        DeliveryWorker(db, {}, max_attempts=0)
    with pytest.raises(ValueError, match="base_delay"):
        DeliveryWorker(db, {}, base_delay=2.0, max_delay=1.0)


def test_a_circuit_breaker_stops_hammering_a_failing_connector(
    db: Database, receiver: Receiver
) -> None:
    clock = Clock()
    for i in range(6):
        enqueue(db, f"run1:0:{i}", operation="always503")

    async def go() -> None:
        connectors: dict[str, Connector] = {"supplier": supplier(receiver)}
        worker = make_worker(
            db, connectors, clock, max_attempts=8, concurrency=1, breaker_threshold=2,
            breaker_reset=60.0,
        )  # fmt: skip
        try:
            await worker.drain_once()
        finally:
            await close_all(connectors)

    run(go())
    # Two failures open the breaker: the other four effects are held back, not attempted.
    assert len(receiver.seen("/always503")) == 2
    entries = [row(db, f"run1:0:{i}") for i in range(6)]
    assert sorted(e.attempts for e in entries) == [0, 0, 0, 0, 1, 1]
    held = [e for e in entries if e.attempts == 0]
    assert all("circuit open for connector 'supplier'" in (e.last_error or "") for e in held)
    assert all(e.state == "pending" for e in entries)


def test_a_contract_rate_is_shared_and_costs_no_attempts(db: Database, receiver: Receiver) -> None:
    from edgeos.connectors.delivery import OperationLimits

    clock = Clock()
    for i in range(3):
        enqueue(db, f"run1:0:{i}")

    async def go() -> None:
        connectors: dict[str, Connector] = {"supplier": supplier(receiver)}
        worker = make_worker(
            db, connectors, clock, concurrency=1,
            limits={"supplier.orders": OperationLimits(timeout=5.0, per_minute=60.0)},
        )  # fmt: skip
        try:
            await worker.drain_once()
        finally:
            await close_all(connectors)

    run(go())
    entries = [row(db, f"run1:0:{i}") for i in range(3)]
    assert sorted(e.state for e in entries) == ["delivered", "pending", "pending"]
    held = [e for e in entries if e.state == "pending"]
    assert all(e.attempts == 0 for e in held)
    assert all(
        "waiting for the rate limit of supplier.orders" in (e.last_error or "") for e in held
    )
    assert len(receiver.seen("/orders")) == 1


def test_a_contract_timeout_bounds_a_slow_call(db: Database, receiver: Receiver) -> None:
    from edgeos.connectors.delivery import OperationLimits

    clock = Clock()
    enqueue(db, "run1:0:0", operation="hold")  # held until the test releases it

    async def go() -> None:
        connectors: dict[str, Connector] = {"supplier": supplier(receiver)}
        worker = make_worker(
            db, connectors, clock, limits={"supplier.hold": OperationLimits(timeout=0.2)}
        )
        try:
            await worker.drain_once()
        finally:
            receiver.release.set()
            await close_all(connectors)

    run(go())
    entry = row(db, "run1:0:0")
    assert (entry.state, entry.attempts) == ("pending", 1)
    assert "no answer within the contract's 0.2 s" in (entry.last_error or "")


# -- contracts at the boundary: input, output, side effects and idempotency ------------------
def supplier_contract(
    operation: str = "orders", output: dict[str, Any] | None = None, **flags: Any
) -> Any:
    from edgeos.connectors.contracts import Contract

    op: dict[str, Any] = {
        "input": {
            "type": "object",
            "required": ["sku", "qty"],
            "properties": {"sku": {"type": "string"}, "qty": {"type": "integer", "minimum": 1}},
        },
        "timeout": "5s",
        **flags,
    }
    if output is not None:
        op["output"] = output
    return Contract.model_validate(
        {"capability": "supplier", "version": "1.0.0", "operations": {operation: op}}
    )


def test_a_payload_that_breaks_the_contract_is_dead_without_any_io(
    db: Database, receiver: Receiver
) -> None:
    clock = Clock()
    enqueue(db, "run1:0:0", payload=order("A-1", -1))

    async def go() -> None:
        connectors: dict[str, Connector] = {"supplier": supplier(receiver)}
        worker = make_worker(db, connectors, clock, contracts={"supplier": supplier_contract()})
        try:
            await worker.drain_once()
        finally:
            await close_all(connectors)

    run(go())
    entry = row(db, "run1:0:0")
    assert (entry.state, entry.attempts) == ("dead", 1)
    assert entry.last_error == (
        "connector 'supplier' operation 'orders': supplier@1.0.0 orders input: "
        "/qty: -1 is less than the minimum of 1"
    )
    assert receiver.requests == []
    assert [kind for kind, _, _ in records(db)] == ["effect_dead"]


def test_a_result_that_breaks_the_contract_is_retried_then_dead_never_accepted(
    db: Database, receiver: Receiver
) -> None:
    clock = Clock()
    enqueue(db, "run1:0:0")
    # The receiver answers {"order": n}; the contract wants an id.
    output = {"type": "object", "required": ["status", "body"],
              "properties": {"body": {"type": "object", "required": ["id"]}}}  # fmt: skip
    contracts = {"supplier": supplier_contract(output=output, idempotent=True)}

    async def go() -> list[OutboxEntry]:
        connectors: dict[str, Connector] = {"supplier": supplier(receiver)}
        worker = make_worker(db, connectors, clock, max_attempts=3, contracts=contracts)
        seen = []
        try:
            for _ in range(3):
                await worker.drain_once()
                seen.append(row(db, "run1:0:0"))
                clock.advance(1.0)
        finally:
            await close_all(connectors)
        return seen

    first, _, last = run(go())
    named = "supplier@1.0.0 orders output: /body: 'id' is a required property"
    assert (first.state, first.attempts) == ("pending", 1)
    assert named in (first.last_error or "")
    assert (last.state, last.attempts) == ("dead", 3)
    assert named in (last.last_error or "")
    assert "gave up after 3 attempts" in (last.last_error or "")
    assert stored_result(db, "run1:0:0") is None
    # Sent three times with one key: applied once, the receiver replayed its answer.
    assert len(receiver.seen("/orders")) == 3
    assert len(receiver.applied) == 1
    kind, payload, _ = records(db)[-1]
    assert kind == "effect_dead"
    assert named in payload["error"]
    assert "needs_review" not in payload


def test_a_result_within_the_contract_is_stored(db: Database, receiver: Receiver) -> None:
    enqueue(db, "run1:0:0")
    output = {"type": "object", "required": ["status"]}
    contracts = {"supplier": supplier_contract(output=output)}

    async def go() -> None:
        connectors: dict[str, Connector] = {"supplier": supplier(receiver)}
        worker = make_worker(db, connectors, Clock(), contracts=contracts)
        try:
            await worker.drain_once()
        finally:
            await close_all(connectors)

    run(go())
    assert row(db, "run1:0:0").state == "delivered"
    assert stored_result(db, "run1:0:0")["status"] == 201


class Unsure:
    """A connector whose first calls fail after sending (no answer came), then succeed."""

    def __init__(self, *, fails: int = 1, dedupe: bool = False, maybe_applied: bool = True):
        self.name = "plant"
        self.idempotency_keys = dedupe
        self.fails = fails
        self.maybe_applied = maybe_applied
        self.calls = 0

    async def deliver(self, operation: str, payload: dict[str, Any], key: str) -> Any:
        from edgeos.connectors import DeliveryError

        self.calls += 1
        if self.calls <= self.fails:
            raise DeliveryError(
                self.name, operation, "no PUBACK within 1 s",
                retryable=True, maybe_applied=self.maybe_applied,
            )  # fmt: skip
        return {"ok": True}

    async def close(self) -> None:
        return None


@pytest.mark.parametrize(
    ("flags", "dedupe", "maybe_applied", "bound", "outcome"),
    [
        # Side effects, not idempotent, a target that cannot deduplicate: set aside.
        ({"side_effect": True, "idempotent": False}, False, True, True, ("dead", 1)),
        # Any of these makes sending again safe.
        ({"side_effect": True, "idempotent": True}, False, True, True, ("delivered", 2)),
        ({"side_effect": True, "idempotent": False}, True, True, True, ("delivered", 2)),
        ({"side_effect": False, "idempotent": False}, False, True, True, ("delivered", 2)),
        # Nothing was sent: retry.
        ({"side_effect": True, "idempotent": False}, False, False, True, ("delivered", 2)),
        # No contract, nothing known: retrying with the key stays the rule.
        ({}, False, True, False, ("delivered", 2)),
    ],
)
def test_an_effect_that_may_have_been_applied_is_retried_only_when_safe(
    db: Database,
    flags: dict[str, Any],
    dedupe: bool,
    maybe_applied: bool,
    bound: bool,
    outcome: tuple[str, int],
) -> None:
    clock = Clock()
    enqueue(db, "run1:0:0", "plant", "orders")
    connector = Unsure(dedupe=dedupe, maybe_applied=maybe_applied)
    contracts = {"plant": supplier_contract(**flags)} if bound else {}
    metrics = MetricsRegistry()

    async def go() -> None:
        worker = make_worker(db, {"plant": connector}, clock, contracts=contracts, metrics=metrics)
        for _ in range(2):
            await worker.drain_once()
            clock.advance(1.0)

    run(go())
    entry = row(db, "run1:0:0")
    assert (entry.state, connector.calls) == outcome
    review = metrics.counter("edgeos_outbox_needs_review_total", "", ["connector"])
    if entry.state == "dead":
        assert entry.last_error == (
            "needs review: connector 'plant' operation 'orders': no PUBACK within 1 s; not sent "
            "again: supplier@1.0.0 orders has side effects and is not idempotent, and "
            "connector 'plant' cannot deduplicate by key; check at the target whether it was "
            "applied"
        )
        kind, payload, _ = records(db)[-1]
        assert (kind, payload["needs_review"], payload["attempts"]) == ("effect_dead", True, 1)
        assert review.value("plant") == 1
    else:
        assert review.value("plant") == 0


def test_a_contract_timeout_on_a_non_idempotent_effect_sets_it_aside(db: Database) -> None:
    class Stuck(Unsure):
        async def deliver(self, operation: str, payload: dict[str, Any], key: str) -> Any:
            self.calls += 1
            await asyncio.sleep(10)

    clock = Clock()
    enqueue(db, "run1:0:0", "plant", "orders")
    connector = Stuck()
    contract = supplier_contract(side_effect=True, idempotent=False, timeout="100ms")

    async def go() -> None:
        worker = make_worker(db, {"plant": connector}, clock, contracts={"plant": contract})
        assert worker.limits["plant.orders"].timeout == 0.1  # from the contract
        await worker.drain_once()
        clock.advance(1.0)
        await worker.drain_once()

    run(go())
    entry = row(db, "run1:0:0")
    assert (entry.state, connector.calls) == ("dead", 1)
    assert (entry.last_error or "").startswith(
        "needs review: connector 'plant' operation 'orders': no answer within the contract's "
        "0.1 s; not sent again"
    )
