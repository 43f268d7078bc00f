"""Fleet policies: budgets, escalation, retention and venue rules delivered as signed YAML.

A policy tightens what agent manifests declare; it never loosens it. Where a manifest and
the policy disagree, the stricter value wins (lower budgets, a higher escalation
threshold, shorter retention of runs and of agents' memory, smaller memory caps). A node
that has never received a policy runs with :data:`SAFE_DEFAULTS`: no cloud venue, and the
manifests' own values.
"""

from __future__ import annotations

from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from edgeos.errors import ManifestError
from edgeos.manifests.agent import (
    AgentManifest,
    Budgets,
    ByteSize,
    Escalation,
    Memory,
    Retention,
)
from edgeos.manifests.durations import Duration
from edgeos.manifests.loader import parse_manifest
from edgeos.protocol.privacy import PrivacyClass

Venue = Literal["edge", "cloud", "any"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class BudgetCaps(_Strict):
    """Upper bounds on every agent's budgets; unset means the manifest's value stands."""

    max_concurrent_runs: int | None = Field(default=None, ge=1)
    model_calls_per_minute: float | None = Field(default=None, gt=0)
    cost_per_hour: float | None = Field(default=None, ge=0)
    cost_per_day: float | None = Field(default=None, ge=0)


class EscalationFloor(_Strict):
    """Escalate at least this eagerly: a confidence under the threshold asks a person."""

    confidence_threshold: float | None = Field(default=None, ge=0, le=1)
    timeout: Duration | None = Field(default=None, gt=0)


class RetentionCaps(_Strict):
    """Keep finished runs, and agents' feedback, at most this long."""

    runs: Duration | None = Field(default=None, gt=0)
    feedback: Duration | None = Field(default=None, gt=0)


class MemoryCaps(_Strict):
    """Bounds on every agent's long-term memory (its ``memory.retention``).

    ``ttl`` is the longest any record is kept: records remembered without a TTL get the
    shorter of it and the agent's own default, and it caps the agent's ``max_ttl``, so no
    record is kept longer, whatever TTL its step gave it. ``max_records`` and
    ``max_bytes`` cap what each agent holds, like the agent's own caps (the lower wins).
    """

    ttl: Duration | None = Field(default=None, gt=0)
    max_records: int | None = Field(default=None, ge=1)
    max_bytes: ByteSize | None = Field(default=None, ge=1)


class VenueRule(_Strict):
    """Where tasks whose data has this privacy class may run."""

    privacy: PrivacyClass
    venue: Venue

    @model_validator(mode="after")
    def _local_only_stays(self) -> VenueRule:
        if self.privacy == "local-only" and self.venue != "edge":
            raise ValueError("local-only data never leaves the device: its venue can only be edge")
        return self


class PolicyManifest(_Strict):
    """One policy artifact (``kind: policy``)."""

    kind: Literal["policy"]
    name: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    version: str = Field(min_length=1, max_length=64)
    description: str = ""
    budgets: BudgetCaps = BudgetCaps()
    escalation: EscalationFloor = EscalationFloor()
    retention: RetentionCaps = RetentionCaps()
    memory: MemoryCaps = MemoryCaps()
    venues: list[VenueRule] = []

    def venue_for(self, privacy: str) -> Venue:
        """The venue allowed for data of this privacy class (edge when no rule says)."""
        for rule in self.venues:
            if rule.privacy == privacy:
                return rule.venue
        return "edge"

    def apply_budgets(self, budgets: Budgets) -> Budgets:
        """The agent's budgets with this policy's caps applied (the stricter wins)."""
        caps = self.budgets.model_dump(exclude_none=True)
        tightened = {
            field: cap if getattr(budgets, field) is None else min(getattr(budgets, field), cap)
            for field, cap in caps.items()
        }
        return budgets.model_copy(update=tightened)

    def apply_escalation(self, escalation: Escalation) -> Escalation:
        """The agent's escalation settings with this policy's floor applied."""
        update: dict[str, float] = {}
        floor = self.escalation.confidence_threshold
        if floor is not None:
            own = escalation.confidence_threshold
            update["confidence_threshold"] = floor if own is None else max(own, floor)
        if self.escalation.timeout is not None:
            update["timeout"] = min(escalation.timeout, self.escalation.timeout)
        return escalation.model_copy(update=update)

    def apply_retention(self, retention: Retention) -> Retention:
        """The agent's retention with this policy's caps applied (the shorter wins)."""
        caps = self.retention.model_dump(exclude_none=True)
        return retention.model_copy(
            update={field: min(getattr(retention, field), cap) for field, cap in caps.items()}
        )

    def apply_memory(self, memory: Memory) -> Memory:
        """The agent's memory settings with this policy's caps applied (the lower wins)."""
        caps = self.memory.model_dump(exclude_none=True)
        if not caps:
            return memory
        own = memory.retention
        tightened = {
            field: cap if getattr(own, field) is None else min(getattr(own, field), cap)
            for field, cap in caps.items()
        }
        if "ttl" in caps:  # the policy's TTL bounds every record, not only the default
            longest = caps["ttl"] if own.max_ttl is None else min(own.max_ttl, caps["ttl"])
            tightened["max_ttl"] = longest
            tightened["ttl"] = min(tightened["ttl"], longest)
        return memory.model_copy(update={"retention": own.model_copy(update=tightened)})

    def tighten(self, manifest: AgentManifest) -> AgentManifest:
        """An agent's manifest under this policy: every section it caps, the stricter wins."""
        return manifest.model_copy(
            update={
                "budgets": self.apply_budgets(manifest.budgets),
                "escalation": self.apply_escalation(manifest.escalation),
                "retention": self.apply_retention(manifest.retention),
                "memory": self.apply_memory(manifest.memory),
            }
        )


SAFE_DEFAULTS = PolicyManifest(kind="policy", name="safe-defaults", version="0")
"""What a node runs with before any policy reached it: manifests as written, edge only."""


def load_policy_text(text: str, source: str) -> PolicyManifest:
    """Parse a policy from YAML text; ManifestError names ``source`` and each bad field."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ManifestError(source, [f"not valid YAML ({exc})"]) from exc
    return parse_manifest({} if data is None else data, PolicyManifest, source)
