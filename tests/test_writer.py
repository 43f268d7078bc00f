"""The group writer: each caller hears of its own write, once it is committed."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from edgeos.state import Database
from edgeos.state.writer import GroupWriter


@pytest.fixture
def writer(tmp_path: Path) -> Iterator[GroupWriter]:
    with Database(tmp_path / "node.db") as db:
        with db.transaction() as conn:
            conn.execute("CREATE TABLE t (n INTEGER PRIMARY KEY)")
        writer = GroupWriter(db).start()
        try:
            yield writer
        finally:
            writer.stop()


def _insert(n: int, *, refuse: bool = False) -> Callable[[sqlite3.Connection], int]:
    def write(conn: sqlite3.Connection) -> int:
        if refuse:
            raise ValueError(f"job {n} refused")
        conn.execute("INSERT INTO t (n) VALUES (?)", (n,))
        return n * 10

    return write


def _rows(db: Database) -> set[int]:
    return {n for (n,) in db.reader().execute("SELECT n FROM t")}


def test_each_caller_gets_its_own_outcome_from_a_shared_group(writer: GroupWriter) -> None:
    async def go() -> list[object]:
        return await asyncio.gather(
            *(writer.write(_insert(n, refuse=n % 7 == 3)) for n in range(200)),
            return_exceptions=True,
        )

    outcomes = asyncio.run(go())
    assert writer.groups < 200  # grouped: fewer commits than writes
    for n, outcome in enumerate(outcomes):
        if n % 7 == 3:
            assert isinstance(outcome, ValueError)
            assert f"job {n} " in str(outcome)
        else:
            assert outcome == n * 10
    assert _rows(writer.db) == {n for n in range(200) if n % 7 != 3}


def test_a_cancelled_caller_leaves_the_others_their_results(writer: GroupWriter) -> None:
    async def go() -> list[object]:
        tasks = [asyncio.ensure_future(writer.write(_insert(n))) for n in range(40)]
        await asyncio.sleep(0)
        tasks[0].cancel()  # its write may still commit: only its caller stopped listening
        return await asyncio.gather(*tasks[1:])

    assert asyncio.run(go()) == [n * 10 for n in range(1, 40)]
    assert set(range(1, 40)) <= _rows(writer.db)


def test_callers_on_several_event_loops_each_hear_on_their_own(writer: GroupWriter) -> None:
    results: dict[int, list[object]] = {}

    def loop_thread(k: int) -> None:
        async def go() -> list[object]:
            return list(
                await asyncio.gather(*(writer.write(_insert(1000 * k + n)) for n in range(60)))
            )

        results[k] = asyncio.run(go())

    threads = [threading.Thread(target=loop_thread, args=(k,)) for k in (1, 2, 3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    for k in (1, 2, 3):
        assert results[k] == [(1000 * k + n) * 10 for n in range(60)]
    assert len(_rows(writer.db)) == 180


def test_a_caller_whose_event_loop_closed_does_not_stop_the_writer(writer: GroupWriter) -> None:
    # A loop that handed over a write and closed before it was committed: the writer
    # commits it, has no one to tell, and serves the next callers.
    gone = asyncio.new_event_loop()
    blocked = threading.Event()

    def slow(conn: sqlite3.Connection) -> int:
        blocked.wait(5)
        conn.execute("INSERT INTO t (n) VALUES (1)")
        return 1

    async def hand_over() -> None:
        task = asyncio.ensure_future(writer.write(slow))
        await asyncio.sleep(0.05)
        task.cancel()
        await asyncio.sleep(0)

    gone.run_until_complete(hand_over())
    gone.close()
    blocked.set()

    async def later() -> int:
        return await asyncio.wait_for(writer.write(_insert(2)), 10)

    assert asyncio.run(later()) == 20
    assert _rows(writer.db) == {1, 2}
