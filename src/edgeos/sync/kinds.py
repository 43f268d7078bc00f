"""What each kind of artifact (model, agent, policy) does at each step of a switch.

:mod:`edgeos.sync.apply` drives the steps and keeps the records; a kind knows how to
stage its artifact beside the running version, switch to it, check it, and go back.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from edgeos.errors import EdgeOSError
from edgeos.protocol.fleet import DesiredArtifact


class HealthCheckError(EdgeOSError):
    """A version the node switched to did not pass its health check."""


class Interrupted(Exception):  # control flow, not an error: not an EdgeOSError
    """The node is stopping: a health check gave up waiting (the switch is undone)."""


@dataclass(frozen=True)
class HealthLimits:
    """How long health checks may take, and what they wait for."""

    #: A model must load and pass its smoke test within this many seconds.
    model_check_s: float = 30.0
    #: An agent with scheduled triggers: how long to wait for its first runs to finish.
    agent_check_s: float = 60.0
    #: How many of those first runs must succeed.
    agent_runs: int = 1


DEFAULT_LIMITS = HealthLimits()


@dataclass(frozen=True)
class Staged:
    """An artifact unpacked and checked beside the running version, ready to switch to."""

    artifact: DesiredArtifact
    #: The kind's own handle on what it staged (a manifest, a bundle, the policy text).
    payload: Any


class Kind(Protocol):
    """One kind of artifact on this node."""

    def current(self, name: str) -> str | None:
        """The version that runs now, or None."""

    def previous_ref(self, name: str) -> str | None:
        """What :meth:`rollback` needs, beyond the version, to restore what runs now."""

    def stage(self, artifact: DesiredArtifact, data: bytes, workdir: Path) -> Staged:
        """Unpack and check ``data`` beside the running version; nothing switches yet.

        Raises EdgeOSError (naming file and field) when the artifact is refused.
        """

    def switch(self, staged: Staged) -> None:
        """Make the staged version the one that runs, in one step."""

    def check(self, staged: Staged, switched_at: float) -> None:
        """Raise unless the version that now runs is healthy; Interrupted if told to stop."""

    def rollback(
        self, name: str, version: str, previous: str | None, previous_ref: str | None
    ) -> None:
        """Go back from ``version`` to ``previous`` (None: remove it). Safe to repeat."""

    def commit(self, staged: Staged) -> None:
        """The staged version passed: drop what only a rollback would have needed."""
