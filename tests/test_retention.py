"""Retention: expired runs and a prefix of the journal go; the chain still verifies."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from edgeos.agents import manage, store
from edgeos.agents.retention import apply_retention
from edgeos.manifests.policy import load_policy_text
from edgeos.state import Database, journal, outbox
from edgeos.sync.policy import merge
from tests.test_agents import make_bundle, running


def test_expired_runs_are_removed_and_the_chain_still_verifies(
    db: Database, tmp_path: Path
) -> None:
    short = make_bundle(tmp_path / "short", retention={"runs": "1h"})
    long = make_bundle(tmp_path / "long", name="archive", retention={"runs": "365d"})
    for bundle in (short, long):
        manage.add_agent(db, bundle, tmp_path / "agents", models=[], connectors=["supplier"])

    async def go() -> tuple[list[str], list[str]]:
        async with running(db) as ex:
            old = [await ex.submit("inventory") for _ in range(3)]
            kept = [await ex.submit("archive") for _ in range(2)]
            for run_id in old + kept:
                await ex.wait(run_id)
            return old, kept

    old, kept = asyncio.run(go())
    with db.transaction() as conn:  # deliver the effects, as the delivery worker would
        conn.execute("UPDATE outbox SET state = 'delivered'")
    assert journal.verify(db).ok
    # Two hours later the short-lived runs are past their retention, the archive's are not;
    # the archive's records are interleaved with theirs, so only a prefix can go now.
    done = apply_retention(db, now=time.time() + 7200)
    assert journal.verify(db).ok
    remaining = {r.id for r in store.runs(db)}
    assert set(kept) <= remaining
    assert done.runs == len(set(old) - remaining)
    assert done.records > 0
    for run_id in set(old) - remaining:
        assert journal.for_run(db, run_id) == []
        assert outbox.for_run(db, run_id) == []
    # A year later, everything is past retention: all of it goes and the chain verifies.
    final = apply_retention(db, now=time.time() + 400 * 86400)
    assert store.runs(db) == []
    assert journal.verify(db).ok
    assert final.runs == len(remaining)
    assert journal.anchor(db)[0] > 0


def test_a_pending_effect_of_an_expired_run_is_never_lost(db: Database, tmp_path: Path) -> None:
    manage.add_agent(
        db, make_bundle(tmp_path, retention={"runs": "1h"}), tmp_path / "agents", models=[],
        connectors=["supplier"],
    )  # fmt: skip

    async def go() -> str:
        async with running(db) as ex:
            run_id = await ex.submit("inventory")
            await ex.wait(run_id)
            return run_id

    run_id = asyncio.run(go())
    apply_retention(db, now=time.time() + 7200)
    assert [e.state for e in outbox.for_run(db, run_id)] == ["pending"]
    assert journal.verify(db).ok


def add_feedback(db: Database, agent: str, at: float) -> None:
    with db.transaction() as conn:
        conn.execute(
            "INSERT INTO feedback (agent, run_id, at, decision) VALUES (?, 'r', ?, '{}')",
            (agent, at),
        )


def feedback_times(db: Database, agent: str) -> list[float]:
    rows = db.reader().execute("SELECT at FROM feedback WHERE agent = ? ORDER BY at", (agent,))
    return [at for (at,) in rows]


def test_feedback_is_kept_for_its_own_retention_and_no_longer(db: Database, tmp_path: Path) -> None:
    # A busy agent's training set would otherwise grow for as long as the box runs.
    short = make_bundle(tmp_path / "short", retention={"feedback": "1h"})
    manage.add_agent(db, short, tmp_path / "agents", models=[], connectors=["supplier"])
    usual = make_bundle(tmp_path / "usual", name="archive")  # the default: 90 days
    manage.add_agent(db, usual, tmp_path / "agents", models=[], connectors=["supplier"])
    now = time.time()
    for agent in ("inventory", "archive"):
        for age in (100 * 86400, 2 * 3600, 600):
            add_feedback(db, agent, now - age)

    done = apply_retention(db, now=now)

    assert feedback_times(db, "inventory") == [now - 600]
    assert feedback_times(db, "archive") == [now - 2 * 3600, now - 600]
    assert done.feedback == 3


def test_a_fleet_policy_shortens_how_long_feedback_is_kept(db: Database, tmp_path: Path) -> None:
    manage.add_agent(db, make_bundle(tmp_path), tmp_path / "agents", models=[],
                     connectors=["supplier"])  # fmt: skip
    policy = load_policy_text(
        "kind: policy\nname: stores\nversion: '1'\nretention: {feedback: 30m}\n", "stores"
    )
    other = load_policy_text(
        "kind: policy\nname: hq\nversion: '1'\nretention: {runs: 7d, feedback: 2h}\n", "hq"
    )
    merged = merge([policy, other])
    assert (merged.retention.runs, merged.retention.feedback) == (7 * 86400, 1800)
    now = time.time()
    for age in (3600, 600):
        add_feedback(db, "inventory", now - age)

    apply_retention(db, now=now, tighten=merged.tighten)

    assert feedback_times(db, "inventory") == [now - 600]
