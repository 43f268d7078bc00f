"""Agents: staged as an unpacked, loaded and checked bundle; switched by installing it (the
previous version's copy stays, to go back to); checked by its first runs.

An agent with a scheduled trigger (interval or cron) that fires within the check's time
limit must see its first runs after the switch succeed; one that fails fails the check.
An agent that would not run in that time (only events, webhooks, a daily cron) is
healthy once it loads: waiting longer would hold every other deployment up.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

from edgeos.agents import manage, store
from edgeos.agents.bundle import AgentBundle, check_references, load_bundle
from edgeos.agents.executor import cancel_run
from edgeos.errors import ManifestError, NotFoundError
from edgeos.protocol.fleet import DesiredArtifact
from edgeos.runtime import ModelRegistry
from edgeos.state import Database
from edgeos.sync.archive import unpack
from edgeos.sync.kinds import (
    DEFAULT_LIMITS,
    HealthCheckError,
    HealthLimits,
    Interrupted,
    Staged,
)

if TYPE_CHECKING:
    from edgeos.connectors.contracts import Contract
    from edgeos.manifests.agent import AgentManifest

#: The bindings' names and the contract of each that implements one.
Connectors = Callable[[], tuple[list[str], Mapping[str, "Contract"]]]


def bound_connectors(data_dir: Path) -> Connectors:
    """The node's connector bindings (``connectors.yaml``), read when asked."""

    def read() -> tuple[list[str], Mapping[str, Contract]]:
        path = data_dir / "connectors.yaml"
        if not path.exists():
            return [], {}
        from edgeos.connectors.config import load_connectors
        from edgeos.connectors.contracts import node_contracts

        bindings = load_connectors(path)
        return list(bindings), node_contracts(data_dir, bindings)

    return read


class AgentKind:
    """Agents installed in the node database, their copies under ``agents_dir``."""

    def __init__(
        self,
        db: Database,
        registry: ModelRegistry,
        agents_dir: Path,
        connectors: Connectors,
        *,
        limits: HealthLimits = DEFAULT_LIMITS,
        stopping: threading.Event | None = None,
        poll_s: float = 0.05,
    ) -> None:
        self.db = db
        self.registry = registry
        self.agents_dir = agents_dir
        self.connectors = connectors
        self.limits = limits
        self.stopping = stopping or threading.Event()
        self.poll_s = poll_s

    def current(self, name: str) -> str | None:
        """The installed version, or None."""
        try:
            return store.agent(self.db, name).version
        except NotFoundError:
            return None

    def previous_ref(self, name: str) -> str | None:
        """The installed version's bundle copy, which a rollback reinstalls."""
        try:
            return store.agent(self.db, name).bundle_dir
        except NotFoundError:
            return None

    def stage(self, artifact: DesiredArtifact, data: bytes, workdir: Path) -> Staged:
        """Unpack the bundle and check it completely (manifest, code, models, connectors)."""
        source = f"agent/{artifact.name}@{artifact.version}"
        bundle = load_bundle(unpack(data, workdir, source))
        manifest = bundle.manifest
        if (manifest.name, manifest.version) != (artifact.name, artifact.version):
            raise ManifestError(
                f"{source}: agent.yaml",
                [
                    f"names agent {manifest.name!r} version {manifest.version!r}, not the one deployed"
                ],
            )
        names, _ = self.connectors()
        check_references(bundle, models=self._models(), connectors=names)
        return Staged(artifact, bundle)

    def switch(self, staged: Staged) -> None:
        """Install the staged bundle; runs started from now on run the new version."""
        bundle: AgentBundle = staged.payload
        names, contracts = self.connectors()
        manage.add_agent(
            self.db, bundle.directory, self.agents_dir,
            models=self._models(), connectors=names, contracts=contracts,
        )  # fmt: skip

    def check(self, staged: Staged, switched_at: float) -> None:
        """Wait (within the limit) for the first scheduled runs of the new version to succeed."""
        manifest: AgentManifest = staged.payload.manifest
        limit = self.limits.agent_check_s
        if store.agent(self.db, manifest.name).paused or not fires_within(manifest, limit):
            return
        deadline = time.monotonic() + limit
        while True:
            runs = (
                self.db.reader()
                .execute(
                    "SELECT id, state, error FROM runs WHERE agent = ? AND agent_version = ? "
                    "AND created_at >= ? ORDER BY id LIMIT ?",
                    (manifest.name, manifest.version, switched_at, self.limits.agent_runs),
                )
                .fetchall()
            )
            for run_id, state, error in runs:
                if state == "failed":
                    raise HealthCheckError(
                        f"agent '{manifest.name}' version '{manifest.version}': its run "
                        f"{run_id} after the switch failed: {error or 'no reason given'}"
                    )
            finished = [r for r in runs if r[1] in ("succeeded", "cancelled", "waiting_human")]
            if len(finished) >= self.limits.agent_runs or time.monotonic() >= deadline:
                return
            if self.stopping.wait(self.poll_s):
                raise Interrupted(f"the node is stopping during the check of {manifest.name}")

    def rollback(
        self, name: str, version: str, previous: str | None, previous_ref: str | None
    ) -> None:
        """Reinstall the previous version's copy; with none, remove the agent."""
        now = time.time()
        if previous is not None and previous_ref is not None and Path(previous_ref).is_dir():
            manifest = load_bundle(Path(previous_ref)).manifest
            with self.db.transaction() as conn:
                store.install(conn, manifest, previous_ref, at=now)
            return
        with self.db.transaction() as conn:
            if conn.execute("SELECT 1 FROM agents WHERE name = ?", (name,)).fetchone() is None:
                return
            store.set_paused(conn, name, True)
            unfinished = conn.execute(
                f"SELECT id FROM runs WHERE agent = ? AND state IN {store.ACTIVE_STATES}", (name,)
            ).fetchall()
            for (run_id,) in unfinished:
                cancel_run(conn, run_id=run_id, by=f"rollback of {name} {version}", at=now)
            store.remove(conn, name)

    def commit(self, staged: Staged) -> None:
        """Nothing to drop: the previous copy stays on disk, small, for a later rollback."""

    def _models(self) -> set[str]:
        return {m.name for m, _ in self.registry.catalog()}


def fires_within(manifest: AgentManifest, seconds: float, now: float | None = None) -> bool:
    """Whether a scheduled trigger of the agent fires within ``seconds``."""
    from edgeos.manifests.cron import CronSchedule

    now = time.time() if now is None else now
    for trigger in manifest.triggers:
        if trigger.interval is not None and trigger.interval <= seconds:
            return True
        if trigger.cron is not None:
            next_at = CronSchedule.parse(trigger.cron).next_after(datetime.fromtimestamp(now))
            if next_at.timestamp() - now <= seconds:
                return True
    return False
