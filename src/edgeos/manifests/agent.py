"""The agent manifest (``agent.yaml``): what an agent runs, on what triggers, within what limits."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

from edgeos.manifests.cron import CronSchedule
from edgeos.manifests.durations import Duration

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
    """How long finished runs and their journal records are kept."""

    runs: Duration = Field(default=30 * 86400.0, gt=0)


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
