"""Policies on the node: the ones in force, cached as files, and how agents feel them.

Each policy the fleet deployed is ``DATA_DIR/fleet/policies/NAME.yaml``, written only
after its bytes passed TUF and it parsed. The node runs under all of them at once: where
two disagree, the stricter wins (as a policy against a manifest). With none, it runs
under :data:`edgeos.manifests.policy.SAFE_DEFAULTS`.

:meth:`PolicyCache.tighten` is what the executor applies to every agent manifest it
runs: budgets (concurrency, model call rate, cost), escalation (confidence floor,
timeout), retention of finished runs and agents' memory caps.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

from edgeos.errors import EdgeOSError, ManifestError
from edgeos.files import write_atomic
from edgeos.protocol.fleet import DesiredArtifact
from edgeos.sync.kinds import HealthCheckError, Staged

if TYPE_CHECKING:
    from edgeos.manifests.agent import AgentManifest
    from edgeos.manifests.policy import PolicyManifest

log = logging.getLogger("edgeos.sync")

_SUFFIX = ".yaml"
_BACKUP = ".yaml.previous"


class PolicyKind:
    """Policies as files under ``directory``; the previous file is kept until commit."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def _path(self, name: str) -> Path:
        return self.directory / f"{name}{_SUFFIX}"

    def current(self, name: str) -> str | None:
        """The version of the policy in force, or None."""
        path = self._path(name)
        if not path.exists():
            return None
        try:
            return _load(path).version
        except EdgeOSError:
            return None  # unreadable: whatever comes replaces it

    def previous_ref(self, name: str) -> str | None:
        """Where the file in force is kept while the new one is checked."""
        return str(self.directory / f"{name}{_BACKUP}") if self._path(name).exists() else None

    def stage(self, artifact: DesiredArtifact, data: bytes, workdir: Path) -> Staged:
        """Parse the policy; ManifestError names the artifact and each bad field."""
        from edgeos.manifests.policy import load_policy_text

        source = f"policy/{artifact.name}@{artifact.version}"
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ManifestError(source, ["not UTF-8 text"]) from exc
        policy = load_policy_text(text, source)
        if (policy.name, policy.version) != (artifact.name, artifact.version):
            raise ManifestError(
                source,
                [f"names policy {policy.name!r} version {policy.version!r}, not the one deployed"],
            )
        return Staged(artifact, text)

    def switch(self, staged: Staged) -> None:
        """Keep the file in force aside, then write the new one (each atomically)."""
        path = self._path(staged.artifact.name)
        if path.exists():
            write_atomic(self.directory / f"{staged.artifact.name}{_BACKUP}", path.read_bytes())
        write_atomic(path, str(staged.payload).encode())

    def check(self, staged: Staged, switched_at: float) -> None:
        """The file in force parses and is the deployed version."""
        policy = _load(self._path(staged.artifact.name))
        if policy.version != staged.artifact.version:
            raise HealthCheckError(
                f"policy {policy.name}: version {policy.version} is in force, not "
                f"{staged.artifact.version}"
            )

    def rollback(
        self, name: str, version: str, previous: str | None, previous_ref: str | None
    ) -> None:
        """Put the previous file back (or remove the policy when there was none)."""
        path = self._path(name)
        if previous is None:
            path.unlink(missing_ok=True)
        elif previous_ref is not None and Path(previous_ref).exists():
            os.replace(previous_ref, path)
        # Otherwise the switch never wrote: the previous file is still in force.

    def commit(self, staged: Staged) -> None:
        """Drop the kept-aside file."""
        (self.directory / f"{staged.artifact.name}{_BACKUP}").unlink(missing_ok=True)


def _load(path: Path) -> PolicyManifest:
    from edgeos.manifests.policy import load_policy_text

    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ManifestError(str(path), [f"cannot be read ({exc})"]) from exc
    return load_policy_text(text, str(path))


class PolicyCache:
    """The policy in force, re-read when a file under ``directory`` changes."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._seen: tuple[tuple[str, int, int], ...] | None = None
        self._policy: PolicyManifest | None = None

    def current(self) -> PolicyManifest:
        """Every deployed policy merged (the stricter wins), or the safe defaults."""
        from edgeos.manifests.policy import SAFE_DEFAULTS

        seen = self._signature()
        if seen != self._seen or self._policy is None:
            policies = []
            for name, _, _ in seen:
                try:
                    policies.append(_load(self.directory / name))
                except EdgeOSError as exc:  # verified when applied; damaged since
                    log.error("policy file ignored: %s", exc)
            self._policy = merge(policies) if policies else SAFE_DEFAULTS
            self._seen = seen
        return self._policy

    def tighten(self, manifest: AgentManifest) -> AgentManifest:
        """The agent's manifest under the policy in force (the stricter value wins)."""
        return self.current().tighten(manifest)

    def _signature(self) -> tuple[tuple[str, int, int], ...]:
        found = []
        with contextlib.suppress(FileNotFoundError):
            for entry in os.scandir(self.directory):
                if entry.name.endswith(_SUFFIX) and not entry.name.startswith("."):
                    stat = entry.stat()
                    found.append((entry.name, stat.st_mtime_ns, stat.st_size))
        return tuple(sorted(found))


def merge(policies: list[PolicyManifest]) -> PolicyManifest:
    """One policy as strict as all of them together."""
    from edgeos.manifests.policy import (
        BudgetCaps,
        EscalationFloor,
        MemoryCaps,
        RetentionCaps,
        VenueRule,
    )

    if len(policies) == 1:
        return policies[0]

    def least(values: list[float | None]) -> float | None:
        known = [v for v in values if v is not None]
        return min(known) if known else None

    def most(values: list[float | None]) -> float | None:
        known = [v for v in values if v is not None]
        return max(known) if known else None

    budgets = {
        field: least([getattr(p.budgets, field) for p in policies])
        for field in BudgetCaps.model_fields
    }
    strictness = {"edge": 0, "cloud": 1, "any": 2}
    venues: dict[str, str] = {}
    for rule in (r for p in policies for r in p.venues):
        held = venues.get(rule.privacy)
        if held is None or strictness[rule.venue] < strictness[held]:
            venues[rule.privacy] = rule.venue
    return policies[0].model_copy(
        update={
            "name": "merged",
            "version": ",".join(f"{p.name}@{p.version}" for p in policies)[:64],
            "budgets": BudgetCaps.model_validate(budgets),
            "escalation": EscalationFloor(
                confidence_threshold=most([p.escalation.confidence_threshold for p in policies]),
                timeout=least([p.escalation.timeout for p in policies]),
            ),
            "retention": RetentionCaps.model_validate(
                {
                    field: least([getattr(p.retention, field) for p in policies])
                    for field in RetentionCaps.model_fields
                }
            ),
            "memory": MemoryCaps.model_validate(
                {
                    field: least([getattr(p.memory, field) for p in policies])
                    for field in MemoryCaps.model_fields
                }
            ),
            "venues": [
                VenueRule.model_validate({"privacy": k, "venue": v}) for k, v in venues.items()
            ],
        }
    )
