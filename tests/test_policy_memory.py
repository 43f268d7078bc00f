"""Fleet policies tighten agents' memory retention: the stricter of the agent's ``memory:``
section and the policy applies, at each step's commit and in the executor's retention pass."""

from __future__ import annotations

import asyncio
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from edgeos.agents import manage
from edgeos.agents.executor import Executor
from edgeos.errors import ManifestError
from edgeos.manifests.agent import AgentManifest, Memory
from edgeos.manifests.policy import SAFE_DEFAULTS, load_policy_text
from edgeos.runtime import ModelHost
from edgeos.state import Database
from edgeos.state.writer import GroupWriter
from edgeos.sync.policy import PolicyCache, merge
from tests.memory_support import make_bundle

POLICY = """
kind: policy
name: stores
version: "3"
memory:
  ttl: 1h          # no agent keeps a memory record longer than an hour
  max_records: 3
  max_bytes: 64KB
"""

REMEMBERS = """
def first(ctx, data):
    for i in range(5):
        ctx.memory.remember(f"delivery note {i} about the milk supplier", importance=i / 10)
    ctx.memory.remember("kept a month by the agent's own choice", ttl="30d", importance=0.9)
    return data
"""

HOUR = 3600.0
START = 1_000_000.0


def test_a_policy_text_caps_memory_and_the_stricter_value_wins() -> None:
    policy = load_policy_text(POLICY, "policy/stores@3")
    assert (policy.memory.ttl, policy.memory.max_records, policy.memory.max_bytes) == (
        HOUR, 3, 64_000,
    )  # fmt: skip
    own = Memory.model_validate(
        {"retention": {"ttl": "10m", "max_records": 100, "eviction": "lru"}}
    )
    tightened = policy.apply_memory(own).retention
    assert (tightened.ttl, tightened.max_records, tightened.max_bytes) == (600.0, 3, 64_000)
    assert tightened.eviction == "lru"  # what the policy does not cap stays the agent's
    assert SAFE_DEFAULTS.apply_memory(own) == own
    # Two policies in force at once: the lower of each cap.
    other = load_policy_text(
        "kind: policy\nname: hq\nversion: '1'\nmemory: {ttl: 2h, max_bytes: 16KB}\n", "hq"
    )
    merged = merge([policy, other]).memory
    assert (merged.ttl, merged.max_records, merged.max_bytes) == (HOUR, 3, 16_000)
    # The age no record may pass is the policy's, even when the agent's default is shorter.
    agent = AgentManifest(name="a", version="1", steps=["s"], memory=own)
    assert policy.tighten(agent).memory.retention.ttl == 600.0
    assert policy.tighten(agent).memory.retention.max_ttl == HOUR
    assert SAFE_DEFAULTS.tighten(agent).memory.retention.max_ttl is None
    # An agent's own max_ttl shorter than the policy's stays; its default follows it.
    bounded = Memory.model_validate({"retention": {"max_ttl": "20m"}})
    under = policy.apply_memory(bounded).retention
    assert (under.ttl, under.max_ttl) == (1200.0, 1200.0)
    assert under.life(None) == 1200.0
    assert under.life(30 * 86400) == 1200.0
    assert under.life(60) == 60


def test_an_agents_max_ttl_bounds_every_record_it_remembers() -> None:
    retention = Memory.model_validate({"retention": {"ttl": "1d", "max_ttl": "30d"}}).retention
    assert retention.life(None) == 86400
    assert retention.life(7 * 86400) == 7 * 86400
    assert retention.life(90 * 86400) == 30 * 86400
    unbounded = Memory.model_validate({"retention": {}}).retention
    assert unbounded.life(None) is None
    assert unbounded.life(90 * 86400) == 90 * 86400
    with pytest.raises(ValidationError, match="longer than max_ttl"):
        Memory.model_validate({"retention": {"ttl": "60d", "max_ttl": "30d"}})


@pytest.mark.parametrize(
    ("memory", "field"),
    [
        ("{ttl: soon}", "memory.ttl"),
        ("{max_records: 0}", "memory.max_records"),
        ("{max_bytes: lots}", "memory.max_bytes"),
        ("{eviction: oldest}", "memory.eviction"),  # the agent's choice, not the fleet's
    ],
)
def test_a_bad_memory_section_is_refused_naming_the_field(memory: str, field: str) -> None:
    text = f"kind: policy\nname: stores\nversion: '4'\nmemory: {memory}\n"
    with pytest.raises(ManifestError, match=rf"policy/stores@4.*{field}"):
        load_policy_text(text, "policy/stores@4")


def run_and_retain(
    db: Database, host: ModelHost, cache: PolicyCache | None
) -> list[list[tuple[Any, ...]]]:
    """One run that remembers six records, then a retention pass two hours later; the
    records left after the run and after the pass."""
    now = [START]
    kept: list[list[tuple[Any, ...]]] = []

    def records() -> list[tuple[Any, ...]]:
        rows = (
            db.reader()
            .execute("SELECT text, expires_at FROM memory_records ORDER BY seq")
            .fetchall()
        )
        return [tuple(row) for row in rows]

    async def go() -> None:
        writer = GroupWriter(db).start()
        ex = Executor(
            db, writer, host=host, clock=lambda: now[0], scan_interval=0.02,
            retention_interval=HOUR,
        )  # fmt: skip
        ex.policy = None if cache is None else cache.tighten
        await ex.start()
        try:
            run = await ex.wait(await ex.submit("notes", data={}))
            assert run.state == "succeeded", run.error
            kept.append(records())
            now[0] += 2 * HOUR  # the next scan runs the retention pass
            # A scan every 20 ms: the pass runs within a few, or a few seconds on a loaded
            # machine. A pass expected to remove every record is waited for up to 10 s
            # (the first scan's pass may also have changed a record meanwhile: only an
            # empty table ends the wait); one expected to remove nothing is given 1 s to
            # do harm.
            deadline = time.monotonic() + (10.0 if cache is not None else 1.0)
            while time.monotonic() < deadline:
                await asyncio.sleep(0.02)
                if not records():
                    break
            kept.append(records())
        finally:
            await ex.stop()
            writer.stop()

    asyncio.run(go())
    return [kept[0], kept[1]]


def install(db: Database, tmp_path: Path) -> None:
    bundle = make_bundle(
        tmp_path, textwrap.dedent(REMEMBERS), steps=["first"],
        memory={"embedding_model": "hash-embed", "retention": {"max_records": 10}},
    )  # fmt: skip
    manage.add_agent(db, bundle, tmp_path / "agents", models=[], connectors=[])


def test_the_policy_caps_memory_at_commit_and_in_the_retention_pass(
    db: Database, host: ModelHost, tmp_path: Path
) -> None:
    install(db, tmp_path)
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "stores.yaml").write_text(POLICY)
    cache = PolicyCache(policies)

    after_run, after_pass = run_and_retain(db, host, cache)
    # At the step's commit: at most the policy's 3 records (the agent allows 10), the least
    # important evicted; remembered without a TTL, a record gets the policy's hour.
    assert after_run[:2] == [
        ("delivery note 3 about the milk supplier", START + HOUR),
        ("delivery note 4 about the milk supplier", START + HOUR),
    ]
    # The month the agent asked for is cut to the policy's hour at the commit already.
    assert after_run[2] == ("kept a month by the agent's own choice", START + HOUR)
    # Two hours later the retention pass has removed all of them: the one the agent gave a
    # month too, since the policy keeps no record longer than an hour.
    assert after_pass == []


def test_without_a_policy_the_agent_keeps_what_its_manifest_allows(
    db: Database, host: ModelHost, tmp_path: Path
) -> None:
    install(db, tmp_path)
    after_run, after_pass = run_and_retain(db, host, None)
    assert len(after_run) == 6
    assert after_pass == after_run  # no TTL: the pass leaves them
