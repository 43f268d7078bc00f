"""The thread pool whose idle threads end (:mod:`edgeos.threads`): it runs what it is
given, never more at once than its limit, starts threads only as work needs them, lets
them go once idle, and loses no work when threads end and work arrives at once."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from concurrent.futures import CancelledError, wait

import pytest

from edgeos.threads import IdleThreadPool


def eventually(check: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.01)
    return False


def named(prefix: str) -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith(prefix)]


def test_it_runs_work_and_hands_back_results_and_errors() -> None:
    pool = IdleThreadPool(2, thread_name_prefix="t-results")
    assert pool.submit(lambda a, b: a + b, 2, b=3).result(timeout=5) == 5
    failed = pool.submit(lambda: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        failed.result(timeout=5)
    pool.shutdown()
    assert named("t-results") == []


def test_never_more_at_once_than_its_limit_and_threads_only_as_needed() -> None:
    pool = IdleThreadPool(3, thread_name_prefix="t-limit")
    # One piece of work at a time: one thread does it all.
    for i in range(20):
        assert pool.submit(abs, i).result(timeout=5) == i
    assert pool.thread_count == 1
    lock, running, most = threading.Lock(), [0], [0]
    gate = threading.Event()

    def held() -> None:
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        gate.wait(5)
        with lock:
            running[0] -= 1

    futures = [pool.submit(held) for _ in range(10)]
    assert eventually(lambda: running[0] == 3)
    time.sleep(0.1)  # a fourth would have started by now
    assert most[0] == 3
    assert pool.thread_count == 3
    gate.set()
    _, not_done = wait(futures, timeout=10)
    assert not not_done
    assert most[0] == 3
    pool.shutdown()


def test_idle_threads_end_and_a_later_burst_starts_them_again() -> None:
    pool = IdleThreadPool(4, thread_name_prefix="t-idle", idle_seconds=0.2)
    gate = threading.Barrier(4)
    arrived = [pool.submit(gate.wait) for _ in range(4)]  # all four at once, or none
    assert sorted(f.result(timeout=5) for f in arrived) == [0, 1, 2, 3]
    assert pool.thread_count == 4
    assert eventually(lambda: pool.thread_count == 0)
    assert eventually(lambda: named("t-idle") == [])
    # Work after the threads went: new threads, the same results.
    assert pool.submit(lambda: "again").result(timeout=5) == "again"
    assert pool.thread_count == 1
    pool.shutdown()


def test_no_work_is_lost_while_threads_time_out_as_it_arrives() -> None:
    # Threads give up after 1 ms: work keeps arriving just as they leave.
    pool = IdleThreadPool(3, thread_name_prefix="t-race", idle_seconds=0.001)
    results: list[int] = []

    def submitter(start: int) -> None:
        for i in range(start, start + 500):
            results.append(pool.submit(abs, i).result(timeout=10))
            if i % 7 == 0:
                time.sleep(0.002)  # long enough for idle threads to end

    submitters = [threading.Thread(target=submitter, args=(n * 1000,)) for n in range(4)]
    for t in submitters:
        t.start()
    for t in submitters:
        t.join(30)
    assert sorted(results) == [n * 1000 + i for n in range(4) for i in range(500)]
    assert pool.thread_count <= 3
    pool.shutdown()


def test_shutdown_refuses_new_work_and_cancels_what_waits_when_asked() -> None:
    pool = IdleThreadPool(1, thread_name_prefix="t-shut")
    gate = threading.Event()
    first = pool.submit(gate.wait, 5)
    waiting = [pool.submit(lambda: "late") for _ in range(3)]
    assert eventually(lambda: first.running())
    pool.shutdown(wait=False, cancel_futures=True)
    with pytest.raises(RuntimeError, match="shut down"):
        pool.submit(lambda: None)
    for future in waiting:
        with pytest.raises(CancelledError):
            future.result(timeout=5)
    gate.set()
    assert first.result(timeout=5) is True  # what was running finishes
    assert eventually(lambda: pool.thread_count == 0)


def test_asyncio_runs_blocking_calls_on_it() -> None:
    pool = IdleThreadPool(2, thread_name_prefix="t-async")

    async def main() -> list[str]:
        loop = asyncio.get_running_loop()
        calls = [loop.run_in_executor(pool, threading.current_thread) for _ in range(4)]
        return [t.name for t in await asyncio.gather(*calls)]

    names = asyncio.run(main())
    assert all(name.startswith("t-async_") for name in names)
    pool.shutdown()


def test_a_pool_needs_a_thread() -> None:
    with pytest.raises(ValueError, match="at least one thread"):
        IdleThreadPool(0, thread_name_prefix="t-none")
