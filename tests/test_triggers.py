"""Triggers: cron expressions and interval triggers that start real runs."""

from __future__ import annotations

import asyncio
from datetime import datetime
from pathlib import Path

import pytest

from edgeos.agents import manage, store
from edgeos.manifests.cron import CronSchedule
from edgeos.state import Database
from tests.test_agents import install, running


@pytest.mark.parametrize(
    ("expr", "after", "expected"),
    [
        ("*/15 * * * *", "2026-11-23 10:07:30", "2026-11-23 10:15:00"),
        ("0 9 * * 1-5", "2026-11-21 12:00:00", "2026-11-23 09:00:00"),  # Sat -> Mon
        ("30 2 1 * *", "2026-11-23 00:00:00", "2026-12-01 02:30:00"),
        ("0 0 * * 0", "2026-11-23 00:00:00", "2026-11-29 00:00:00"),  # Sunday as 0
        ("0 0 * * 7", "2026-11-23 00:00:00", "2026-11-29 00:00:00"),  # and as 7
        ("0 12 13 * 5", "2026-11-01 00:00:00", "2026-11-06 12:00:00"),  # day OR weekday
        ("5,10 * * * *", "2026-11-23 10:05:00", "2026-11-23 10:10:00"),
    ],
)
def test_cron_next_fire(expr: str, after: str, expected: str) -> None:
    schedule = CronSchedule.parse(expr)
    got = schedule.next_after(datetime.fromisoformat(after))
    assert got == datetime.fromisoformat(expected)


@pytest.mark.parametrize(
    ("expr", "message"),
    [
        ("* * * *", "needs 5 fields"),
        ("60 * * * *", "minute field '60' is outside 0-59"),
        ("* 24 * * *", "hour field '24'"),
        ("*/0 * * * *", "outside"),
        ("a * * * *", "not a number, range or step"),
        ("5-1 * * * *", "outside"),
    ],
)
def test_bad_cron_is_refused(expr: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        CronSchedule.parse(expr)


def test_interval_trigger_starts_runs_until_paused(db: Database, tmp_path: Path) -> None:
    install(db, tmp_path, triggers=[{"interval": "150ms"}])

    async def go() -> None:
        async with running(db):
            await asyncio.sleep(1.0)
            manage.set_paused(db, "inventory", True)
            await asyncio.sleep(0.3)
            started = len(store.runs(db, agent="inventory"))
            await asyncio.sleep(0.5)
            assert len(store.runs(db, agent="inventory")) == started  # paused: no new runs
            assert 3 <= started <= 12
            assert {r.trigger for r in store.runs(db, agent="inventory")} == {"interval"}

    asyncio.run(go())


def test_an_event_starts_every_agent_that_listens_for_it(db: Database, tmp_path: Path) -> None:
    install(db, tmp_path, triggers=[{"event": "pos.sales"}])

    async def go() -> None:
        async with running(db) as ex:
            (run_id,) = await ex.emit("pos.sales", {"sku": "EV-1"})
            assert await ex.emit("pos.returns", {}) == []
            run = await ex.wait(run_id)
            assert (run.state, run.trigger, run.input) == (
                "succeeded", "event:pos.sales", {"sku": "EV-1"},
            )  # fmt: skip

    asyncio.run(go())
