"""Crash test: a real node is SIGKILLed at random moments while its agent works.

The agent's effects go to a real HTTP service on loopback. After every kill the node is
started again; at the end every run has finished, and each effect key was applied
exactly once: none lost, none done twice (redeliveries carry the same key).
"""

from __future__ import annotations

from pathlib import Path

from edgeos.demo.soak import run_soak


def test_sigkill_at_random_moments_loses_nothing_and_repeats_nothing(tmp_path: Path) -> None:
    result = run_soak(tmp_path, runs=200)
    assert result.kills >= 5, f"the work finished after only {result.kills} kills"
    assert result.states == {"succeeded": 200}
    assert result.effects == 200  # one reorder per run
    assert result.applied == 200  # each applied by the supplier exactly once
    assert result.missing == []
    assert result.unexpected == []
    assert result.wrong_payload == []
    assert result.dead == 0
    assert result.journal_ok
    assert result.ok
    print(f"200 runs, {result.kills} SIGKILLs, {result.redeliveries} redeliveries deduplicated")
