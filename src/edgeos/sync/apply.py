"""Reconcile: bring the node to the fleet's desired state, one artifact at a time.

For each desired artifact that does not run here at that version: fetch it (through TUF,
or any :class:`ArtifactSource`), stage it beside the running version, record the switch
(``switching``, with the version to go back to), switch, health-check, then commit
(``active``: the new last known good) or roll back and record ``failed`` with the reason.
Policies go first, then models, then agents (agents name models). A version refused once
is not tried again while the fleet still asks for it: the fleet sees ``failed`` and
decides. Artifacts no longer assigned stay installed and are still reported.

A node that stops between recording the switch and its verdict comes back with the row
still ``switching``: :meth:`Applier.recover`, run before anything else starts, rolls it
back to the last known good version and records why.
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

from edgeos.errors import EdgeOSError, UnavailableError
from edgeos.protocol.fleet import ActualArtifact, DesiredArtifact
from edgeos.runtime import ModelHost, ModelRegistry
from edgeos.state import Database
from edgeos.sync import state
from edgeos.sync.agent_kind import AgentKind, Connectors, bound_connectors
from edgeos.sync.identity import FleetPaths
from edgeos.sync.kinds import DEFAULT_LIMITS, HealthLimits, Interrupted, Kind, Staged
from edgeos.sync.model_kind import ModelKind
from edgeos.sync.policy import PolicyKind
from edgeos.sync.state import ACTIVE, FAILED, SWITCHING, ArtifactRow

log = logging.getLogger("edgeos.sync")

#: Policies first (they bound what runs), then models, then the agents that use them.
ORDER = {"policy": 0, "model": 1, "agent": 2}


class ArtifactSource(Protocol):
    """Where artifact bytes come from: the fleet's TUF repository, or a test's files.

    UnavailableError means "not now" (the artifact stays pending, tried again on the
    next pass); any other EdgeOSError refuses that version.
    """

    def fetch(self, artifact: DesiredArtifact) -> bytes:
        """The verified bytes of one artifact version."""


@dataclass(frozen=True)
class Outcome:
    """What one pass did with one desired artifact."""

    artifact: DesiredArtifact
    state: Literal["active", "failed", "pending"]
    reason: str | None = None
    #: True when this pass switched (and committed or rolled back).
    switched: bool = False

    @property
    def problem(self) -> str:
        """The outcome as a line of the health report's detail."""
        item = self.artifact
        return f"{item.kind}/{item.name}@{item.version} {self.state}: {self.reason}"


class Applier:
    """Applies desired states to one node: its database, registry, agents and policies."""

    def __init__(
        self,
        db: Database,
        registry: ModelRegistry,
        data_dir: Path,
        *,
        host: ModelHost | None = None,
        connectors: Connectors | None = None,
        limits: HealthLimits = DEFAULT_LIMITS,
        stopping: threading.Event | None = None,
    ) -> None:
        self.db = db
        self.paths = FleetPaths.of(data_dir)
        self.stopping = stopping or threading.Event()
        self.kinds: dict[str, Kind] = {
            "policy": PolicyKind(self.paths.policies),
            "model": ModelKind(
                registry, host=host, check_s=limits.model_check_s, stopping=self.stopping
            ),
            "agent": AgentKind(
                db, registry, Path(data_dir) / "agents", connectors or bound_connectors(data_dir),
                limits=limits, stopping=self.stopping,
            ),
        }  # fmt: skip

    # -- what to do -------------------------------------------------------------------
    def plan(self, desired: list[DesiredArtifact]) -> list[DesiredArtifact]:
        """The desired artifacts a pass would switch to, in the order it would."""
        todo = []
        for item in sorted(desired, key=lambda d: (ORDER[d.kind], d.name)):
            if self.kinds[item.kind].current(item.name) == item.version:
                continue
            row = state.row(self.db, item.kind, item.name)
            if row is not None and row.state == FAILED and row.version == item.version:
                continue
            todo.append(item)
        return todo

    def apply(self, desired: list[DesiredArtifact], source: ArtifactSource) -> list[Outcome]:
        """One pass over the desired state. Stops early (Interrupted) when told to stop."""
        state.mark_assigned(self.db, {(d.kind, d.name) for d in desired})
        outcomes = []
        for item in sorted(desired, key=lambda d: (ORDER[d.kind], d.name)):
            outcomes.append(self._one(item, source))
        shutil.rmtree(self.paths.staging, ignore_errors=True)
        return outcomes

    def actual(self) -> list[ActualArtifact]:
        """What to report: each artifact's running version, and each refused one."""
        report = []
        for r in state.rows(self.db):
            known = {"kind": r.kind, "name": r.name}
            if r.state == FAILED:
                failed = {**known, "version": r.version, "state": "failed", "reason": r.reason}
                report.append(ActualArtifact.model_validate(failed))
            if r.good_version is not None:
                active = {**known, "version": r.good_version, "state": "active"}
                report.append(ActualArtifact.model_validate(active))
        return report

    def recover(self) -> list[ArtifactRow]:
        """Roll back every switch a stop interrupted; returns the rows rolled back."""
        interrupted = [r for r in state.rows(self.db) if r.state == SWITCHING]
        for r in interrupted:
            note = self._roll_back(r.kind, r.name, r.version, r.previous_version, r.previous_ref)
            reason = (
                "the node stopped during the switch (a crash, kill or power cut) before the "
                f"health check passed; rolled back to {_named(r.previous_version)}{note}"
            )
            log.warning("%s/%s@%s: %s", r.kind, r.name, r.version, reason)
            state.record(
                self.db, r.kind, r.name, r.version, FAILED,
                previous_version=r.previous_version, reason=reason,
            )  # fmt: skip
        if interrupted:
            state.restart_health(self.db)
        shutil.rmtree(self.paths.staging, ignore_errors=True)
        return interrupted

    # -- one artifact -----------------------------------------------------------------
    def _one(self, item: DesiredArtifact, source: ArtifactSource) -> Outcome:
        kind = self.kinds[item.kind]
        ref = f"{item.kind}/{item.name}@{item.version}"
        current = kind.current(item.name)
        before = state.row(self.db, item.kind, item.name)
        if current == item.version:
            if before is None or (before.state, before.version) != (ACTIVE, item.version):
                state.record(self.db, item.kind, item.name, item.version, ACTIVE)
            return Outcome(item, "active")
        if before is not None and before.state == FAILED and before.version == item.version:
            return Outcome(item, "failed", before.reason)
        try:
            data = source.fetch(item)
        except UnavailableError as exc:
            log.info("%s: not fetched now, tried again later: %s", ref, exc)
            return Outcome(item, "pending", str(exc))
        except EdgeOSError as exc:
            return self._refuse(item, current, f"download refused: {exc}")
        workdir = self.paths.staging / f"{item.kind}-{item.name}-{item.version}"
        try:
            staged = kind.stage(item, data, workdir)
        except EdgeOSError as exc:
            return self._refuse(item, current, f"refused at staging: {exc}")
        except Exception as exc:  # an unexpected fault: not the artifact's; try again later
            log.exception("%s: staging failed", ref)
            return Outcome(item, "pending", f"staging failed: {type(exc).__name__}: {exc}")
        return self._switch(kind, staged, current, before)

    def _switch(
        self, kind: Kind, staged: Staged, current: str | None, before: ArtifactRow | None
    ) -> Outcome:
        item = staged.artifact
        previous_ref = kind.previous_ref(item.name)
        # Durable before anything changes: a stop from here on is rolled back at start.
        state.record(
            self.db, item.kind, item.name, item.version, SWITCHING,
            previous_version=current, previous_ref=previous_ref,
        )  # fmt: skip
        step = "switch"
        try:
            switched_at = time.time()
            kind.switch(staged)
            step = "health check"
            kind.check(staged, switched_at)
        except Interrupted:
            self._roll_back(item.kind, item.name, item.version, current, previous_ref)
            _restore(self.db, item, before)
            raise
        except Exception as exc:  # any failure of the new version fails its check
            note = self._roll_back(item.kind, item.name, item.version, current, previous_ref)
            why = f"{step} failed: {_text(exc)}; rolled back to {_named(current)}{note}"
            log.warning("%s/%s@%s: %s", item.kind, item.name, item.version, why)
            state.record(
                self.db, item.kind, item.name, item.version, FAILED,
                previous_version=current, reason=why,
            )  # fmt: skip
            state.restart_health(self.db)
            return Outcome(item, "failed", why, switched=True)
        kind.commit(staged)
        state.record(self.db, item.kind, item.name, item.version, ACTIVE, previous_version=current)
        state.restart_health(self.db)
        log.info("%s/%s@%s: switched and healthy", item.kind, item.name, item.version)
        return Outcome(item, "active", switched=True)

    def _refuse(self, item: DesiredArtifact, current: str | None, why: str) -> Outcome:
        log.warning("%s/%s@%s: %s", item.kind, item.name, item.version, why)
        state.record(
            self.db, item.kind, item.name, item.version, FAILED,
            previous_version=current, reason=why,
        )  # fmt: skip
        return Outcome(item, "failed", why)

    def _roll_back(
        self, kind: str, name: str, version: str, previous: str | None, ref: str | None
    ) -> str:
        """Roll back; returns a note for the reason when the rollback itself failed."""
        try:
            self.kinds[kind].rollback(name, version, previous, ref)
        except Exception as exc:
            log.exception("rolling back %s/%s@%s failed", kind, name, version)
            return f" (the rollback failed too: {_text(exc)})"
        return ""


def _restore(db: Database, item: DesiredArtifact, before: ArtifactRow | None) -> None:
    """Put an artifact's row back as it was before an interrupted switch."""
    if before is None:
        with db.transaction() as conn:
            conn.execute(
                "DELETE FROM fleet_artifacts WHERE kind = ? AND name = ?", (item.kind, item.name)
            )
        return
    state.record(
        db, before.kind, before.name, before.version, before.state,
        previous_version=before.previous_version, previous_ref=before.previous_ref,
        reason=before.reason, at=before.updated_at,
    )  # fmt: skip


def _named(version: str | None) -> str:
    return f"version {version}" if version is not None else "nothing (no previous version)"


def _text(exc: BaseException) -> str:
    return str(exc) if isinstance(exc, EdgeOSError) else f"{type(exc).__name__}: {exc}"
