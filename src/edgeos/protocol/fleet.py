"""The fleet protocol: what a node and the fleet say to each other.

Both sides import these models and nothing else of each other. Every body is JSON.
Device endpoints (``/api/v1/sync``, ``/tuf/...``) need the device's client
certificate (mTLS); enrollment needs a join token; operator endpoints need a bearer
operator token with the right scope. See docs/fleet.md for the flows.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

ArtifactKind = Literal["agent", "model", "policy"]
ARTIFACT_KINDS: tuple[ArtifactKind, ...] = ("agent", "model", "policy")

API = "/api/v1"
"""Prefix of every fleet API route (the TUF repository is served under ``/tuf``)."""


class _Wire(BaseModel):
    # Unknown fields are refused: a typo in a request is an error, not a silent default.
    model_config = ConfigDict(extra="forbid", frozen=True)


class ArtifactRef(_Wire):
    """One version of one artifact: ``model/stockout-risk@3``."""

    kind: ArtifactKind
    name: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    version: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")

    def __str__(self) -> str:
        return f"{self.kind}/{self.name}@{self.version}"


class Inventory(_Wire):
    """What a node reports about itself."""

    edgeos_version: str
    hostname: str
    machine: str
    cpu_count: int
    memory_mb: int
    execution_providers: list[str] = []


class Health(_Wire):
    """How the node's work has gone since its last switch of artifacts.

    Counters restart at every switch, so a rollout wave's figures describe the new
    versions alone and the devices still on the old versions form the baseline.
    """

    since: float = 0.0
    runs: int = 0
    runs_failed: int = 0
    decisions: int = 0
    overrides: int = 0
    inference_p99_ms: float | None = None
    drift: float | None = None
    status: Literal["ok", "degraded", "failing"] = "ok"
    detail: str | None = None


class ActualArtifact(_Wire):
    """What the node runs (``active``), or a version it refused and why (``failed``)."""

    kind: ArtifactKind
    name: str
    version: str
    state: Literal["active", "failed"]
    reason: str | None = None


class DesiredArtifact(_Wire):
    """One artifact version the fleet wants on the device, as a TUF target path."""

    kind: ArtifactKind
    name: str
    version: str
    target: str
    rollout_id: str | None = None


class EnrollRequest(_Wire):
    """First contact: a join token, the device's own id, and a CSR for that id."""

    join_token: str
    device_id: str = Field(min_length=8, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    csr_pem: str
    inventory: Inventory


class EnrollResponse(_Wire):
    """The device's certificate, the fleet's CA, and the TUF root to trust."""

    device_id: str
    group: str
    certificate_pem: str
    ca_pem: str
    tuf_root: str
    sync_interval_s: float


class SyncRequest(_Wire):
    """A node's periodic report; ``wait_s`` > 0 makes it a long poll.

    ``device_id`` must be the id in the client certificate: a device asking for
    another device's state is refused.
    """

    device_id: str
    revision: int = 0
    actual: list[ActualArtifact] = []
    health: Health = Health()
    inventory: Inventory | None = None
    csr_pem: str | None = None
    wait_s: float = Field(default=0.0, ge=0.0, le=60.0)


class SyncResponse(_Wire):
    """The device's desired state and, when it asked, a renewed certificate."""

    revision: int
    desired: list[DesiredArtifact]
    certificate_pem: str | None = None
    sync_interval_s: float


class ErrorBody(_Wire):
    """Every refusal: a machine-readable code and a message a person can act on."""

    error: str
    message: str
