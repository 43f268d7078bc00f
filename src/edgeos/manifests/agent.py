"""The agent manifest (``agent.yaml``): what an agent runs, on what triggers, within what limits."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)

from edgeos.manifests.cron import CronSchedule
from edgeos.manifests.durations import Duration
from edgeos.protocol.privacy import PrivacyClass

_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
_STEP = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
#: One comparison of a version range: ``>=1.0`` (ranges join them with commas).
VERSION_CLAUSE = re.compile(r"^\s*(>=|<=|==|!=|>|<)\s*(\d+(?:\.\d+)*)\s*$")


def check_version_range(spec: str) -> str:
    """Raise ValueError unless ``spec`` is a version range like ``>=1.0,<2.0``."""
    if not all(VERSION_CLAUSE.match(clause) for clause in spec.split(",")):
        raise ValueError(
            f"{spec!r} is not a version range: use comparisons like '>=1.0,<2.0' "
            "(>=, >, <=, <, ==, != with dotted integers)"
        )
    return spec


#: A version range, checked where it is read (errors name ``requires.<capability>``).
VersionRange = Annotated[str, AfterValidator(check_version_range)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Trigger(_Strict):
    """One way a run starts. Exactly one of the fields is set."""

    interval: Duration | None = Field(default=None, gt=0)
    cron: str | None = None
    event: str | None = None
    webhook: bool = False
    manual: bool = False

    @model_validator(mode="after")
    def _one_kind(self) -> Trigger:
        kinds = [k for k in ("interval", "cron", "event") if getattr(self, k) is not None] + [
            k for k in ("webhook", "manual") if getattr(self, k)
        ]
        if len(kinds) != 1:
            raise ValueError("a trigger has exactly one of interval, cron, event, webhook, manual")
        if self.cron is not None:
            CronSchedule.parse(self.cron)  # raises naming the bad field
        return self

    @property
    def kind(self) -> str:
        """interval, cron, event, webhook or manual."""
        for k in ("interval", "cron", "event"):
            if getattr(self, k) is not None:
                return k
        return "webhook" if self.webhook else "manual"


class Budgets(_Strict):
    """Limits the supervisor enforces; a breach ends or parks the run with an event."""

    max_concurrent_runs: int = Field(default=4, ge=1, le=1024)
    max_steps: int = Field(default=64, ge=1, le=100_000)
    step_timeout: Duration = Field(default=30.0, gt=0)
    model_calls_per_minute: float = Field(default=600.0, gt=0)
    cost_per_hour: float | None = Field(default=None, ge=0)
    cost_per_day: float | None = Field(default=None, ge=0)


class Escalation(_Strict):
    """When the agent asks a person, and what happens if nobody answers."""

    confidence_threshold: float | None = Field(default=None, ge=0, le=1)
    timeout: Duration = Field(default=600.0, gt=0)


class RetryPolicy(_Strict):
    """What happens when a step raises."""

    max_attempts: int = Field(default=3, ge=1, le=100)
    base_delay: Duration = Field(default=1.0, ge=0)


class Isolation(_Strict):
    """Where the agent's step code runs."""

    mode: Literal["thread", "process"] = "thread"
    memory_mb: int = Field(default=256, ge=16)
    cpu_seconds: int = Field(default=60, ge=1)


class Retention(_Strict):
    """How long finished runs and their journal records are kept, and the feedback the
    agent learns from (``edgeos agent feedback`` exports it, to keep it longer)."""

    runs: Duration = Field(default=30 * 86400.0, gt=0)
    feedback: Duration = Field(default=90 * 86400.0, gt=0)


_SIZE = re.compile(r"^\s*(\d+)\s*(B|KB|MB|GB|KiB|MiB|GiB)?\s*$")
_SIZE_UNITS = {None: 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KiB": 1 << 10,
               "MiB": 1 << 20, "GiB": 1 << 30}  # fmt: skip


def parse_size(value: Any) -> int:
    """Bytes from ``"64MB"``-style text or a plain number of bytes; ValueError otherwise."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    match = _SIZE.match(str(value)) if isinstance(value, str) else None
    if not match:
        raise ValueError(f"{value!r} is not a size (use e.g. 4096, 512KB, 64MB, 1GiB)")
    return int(match.group(1)) * _SIZE_UNITS[match.group(2)]


ByteSize = Annotated[int, BeforeValidator(parse_size)]
"""A pydantic field type: bytes, parsed from text like ``64MB``."""


class MemoryRanking(_Strict):
    """How recall orders the records most similar to a query: a weighted sum of their
    similarity, their recency (1 when new, halving every ``half_life``) and importance."""

    similarity: float = Field(default=1.0, ge=0)
    recency: float = Field(default=0.0, ge=0)
    importance: float = Field(default=0.0, ge=0)
    half_life: Duration = Field(default=30 * 86400.0, gt=0)


class MemoryRetention(_Strict):
    """How long records live and how much of them an agent keeps.

    ``ttl`` is the life of a record remembered without one; ``max_ttl`` the longest any
    record lives, whatever TTL its step gave it (a fleet policy's memory TTL sets it too).
    Past a cap, records go in ``eviction`` order: expired ones first, then the least
    important (least recently used among equals), or the least recently used, or the oldest.
    """

    ttl: Duration | None = Field(default=None, gt=0)
    max_ttl: Duration | None = Field(default=None, gt=0)
    max_records: int | None = Field(default=None, ge=1)
    max_bytes: ByteSize | None = Field(default=None, ge=1)
    eviction: Literal["importance", "lru", "oldest"] = "importance"

    @model_validator(mode="after")
    def _ttl_within_max(self) -> MemoryRetention:
        if self.ttl is not None and self.max_ttl is not None and self.ttl > self.max_ttl:
            raise ValueError(
                f"ttl ({self.ttl:g} s) is longer than max_ttl ({self.max_ttl:g} s): "
                "no record would live that long"
            )
        return self

    def life(self, asked: float | None) -> float | None:
        """How long a record remembered with TTL ``asked`` (None: the default) lives, in
        seconds; None for ever."""
        seconds = self.ttl if asked is None else asked
        if self.max_ttl is None:
            return seconds
        return self.max_ttl if seconds is None else min(seconds, self.max_ttl)


class Memory(_Strict):
    """The agent's long-term memory (``ctx.memory``)."""

    #: The registered embedding model (task ``embedding``) that turns text into vectors.
    embedding_model: str = "all-minilm-l6-v2"
    #: Metadata fields recall can filter on (``where={"supplier": "acme"}``), besides subject.
    fields: list[str] = Field(default_factory=list)
    max_text_bytes: ByteSize = Field(default=16 * 1024, ge=1, le=1 << 20)
    ranking: MemoryRanking = Field(default_factory=MemoryRanking)
    retention: MemoryRetention = Field(default_factory=MemoryRetention)

    @field_validator("fields")
    @classmethod
    def _fields(cls, value: list[str]) -> list[str]:
        for name in value:
            if not _STEP.match(name) or len(name) > 64:
                raise ValueError(f"field {name!r} is not a name (letters, digits, _)")
            if name == "subject":
                raise ValueError("'subject' is always filterable; do not list it")
        if len(set(value)) != len(value):
            raise ValueError("field names must be unique")
        return value


class Offline(_Strict):
    """What a routed call does when the venue it needs is offline (offline autonomy)."""

    #: ``edge``: run where it can now, at lower quality; ``wait``: defer the call (the run
    #: parks) until the venue is back or ``wait`` has passed.
    fallback: Literal["edge", "wait"] = "edge"
    #: How long a deferred call waits before ``default`` applies.
    wait: Duration = Field(default=900.0, gt=0)
    #: The call's outputs when it waited in vain, by output name (``{probabilities:
    #: [[0.5, 0.5]]}``); without one, the step fails when the wait is over.
    default: dict[str, Any] | None = None


class Routing(_Strict):
    """What the agent's ``ctx.infer`` calls need, by default (see :mod:`edgeos.routing`)."""

    #: Models ``ctx.infer`` may call that need not be registered on this node (a venue
    #: off the device serves them).
    models: list[str] = Field(default_factory=list)
    #: Privacy class of the data: ``local-only`` never leaves the device.
    privacy: PrivacyClass = "internal"
    slo_ms: float | None = Field(default=None, gt=0)
    min_quality: float | None = Field(default=None, ge=0, le=1)
    #: Cascade: run on the edge, escalate when its confidence is under this.
    cascade: float | None = Field(default=None, ge=0, le=1)
    offline: Offline = Field(default_factory=Offline)


class AgentManifest(_Strict):
    """An agent bundle's ``agent.yaml``."""

    name: str
    version: str = Field(min_length=1, max_length=32)
    description: str = ""
    module: str = "agent.py"
    steps: list[str] = Field(min_length=1)
    triggers: list[Trigger] = Field(default_factory=lambda: [Trigger(manual=True)])
    models: list[str] = Field(default_factory=list)
    connectors: list[str] = Field(default_factory=list)
    #: Capability contracts the agent needs, with the versions it accepts:
    #: ``{supplier: ">=1.0,<2.0"}`` (see :mod:`edgeos.connectors.contracts`).
    requires: dict[str, VersionRange] = Field(default_factory=dict)
    budgets: Budgets = Field(default_factory=Budgets)
    escalation: Escalation = Field(default_factory=Escalation)
    retry: RetryPolicy = Field(default_factory=RetryPolicy)
    isolation: Isolation = Field(default_factory=Isolation)
    retention: Retention = Field(default_factory=Retention)
    memory: Memory = Field(default_factory=Memory)
    routing: Routing = Field(default_factory=Routing)

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not _NAME.match(value):
            raise ValueError("use 1-64 of a-z 0-9 . _ - starting with a letter or digit")
        return value

    @field_validator("steps")
    @classmethod
    def _steps(cls, value: list[str]) -> list[str]:
        for step in value:
            if not _STEP.match(step):
                raise ValueError(f"step {step!r} is not a Python function name")
        if len(set(value)) != len(value):
            raise ValueError("step names must be unique")
        return value

    @field_validator("module")
    @classmethod
    def _module(cls, value: str) -> str:
        if "/" in value or "\\" in value or not value.endswith(".py"):
            raise ValueError("the module is a .py file at the top of the bundle")
        return value

    def dump(self) -> dict[str, Any]:
        """A JSON-ready form, as stored on the node."""
        return self.model_dump(mode="json")
