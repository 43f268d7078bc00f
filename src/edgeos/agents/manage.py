"""Installing and steering agents: what the CLI and the node's API both call."""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgeos.agents import store
from edgeos.agents.bundle import check_references, install_copy, load_bundle
from edgeos.agents.executor import answer_escalation, cancel_run, create_run
from edgeos.agents.store import InstalledAgent
from edgeos.state import Database

if TYPE_CHECKING:
    from edgeos.connectors.contracts import Contract


def add_agent(
    db: Database,
    bundle_dir: Path,
    agents_dir: Path,
    *,
    models: Iterable[str],
    connectors: Iterable[str],
    contracts: Mapping[str, Contract] | None = None,
) -> InstalledAgent:
    """Check a bundle completely, copy it into the node, and install it.

    ``contracts`` is the contract of each binding that implements one (by binding name):
    the agent's ``requires`` must be satisfied by the connectors it lists, and its
    ``event:`` triggers of a required capability must be events of its contract.
    Raises ManifestError naming file, field and reason, with nothing installed.
    """
    bundle = load_bundle(bundle_dir)
    check_references(bundle, models=models, connectors=connectors)
    if bundle.manifest.requires:
        from edgeos.connectors.contracts import check_requirements

        check_requirements(
            bundle.manifest.requires,
            bundle.manifest.connectors,
            contracts or {},
            str(bundle.directory / "agent.yaml"),
            events=[t.event for t in bundle.manifest.triggers if t.event is not None],
        )
    copy = install_copy(bundle, agents_dir)
    with db.transaction() as conn:
        store.install(conn, bundle.manifest, str(copy), at=time.time())
    return store.agent(db, bundle.manifest.name)


def set_paused(db: Database, name: str, paused: bool) -> None:
    """Pause (no new runs; running ones park at their next step) or resume an agent."""
    with db.transaction() as conn:
        store.set_paused(conn, name, paused)


def remove_agent(db: Database, name: str) -> None:
    """Uninstall an agent that has no unfinished runs."""
    with db.transaction() as conn:
        store.remove(conn, name)


def queue_run(db: Database, name: str, data: Any = None, trigger: str = "manual") -> str:
    """Start a run from outside the node process: it waits as pending until the node takes it."""
    agent = store.agent(db, name)
    with db.transaction() as conn:
        return create_run(
            conn, agent=agent, trigger=trigger, data=data, at=time.time(), state="pending"
        )


def answer(
    db: Database, escalation_id: str, choice: Any, *, by: str, note: str | None = None
) -> bool:
    """A person's answer to an escalation; False if it was already answered or timed out."""
    with db.transaction() as conn:
        return answer_escalation(
            conn, escalation_id=escalation_id, choice=choice, by=by, note=note, at=time.time()
        )


def cancel(db: Database, run_id: str, *, by: str) -> bool:
    """Cancel an unfinished run; False if it had already finished."""
    with db.transaction() as conn:
        return cancel_run(conn, run_id=run_id, by=by, at=time.time())
