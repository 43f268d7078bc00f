"""The fleet protocol: what a node and the fleet say to each other.

Both sides import these models and nothing else of each other. Every body is JSON.
Device endpoints (``/api/v1/sync``, ``/tuf/...``) need the device's client
certificate (mTLS); enrollment needs a join token; operator endpoints need a bearer
operator token with the right scope. See docs/fleet.md for the flows.
"""

from __future__ import annotations

from typing import Any, Literal

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


class SealedSecret(_Wire):
    """A secret the fleet granted to one device, sealed to that device's certificate key.

    ``sealed`` is base64 of a sealed box (ECDH P-256, HKDF, AES-GCM) whose associated data
    is :meth:`associated_data` for the receiving device: a grant replayed to another
    device, or with any field edited, does not open.
    """

    grant_id: str
    name: str
    version: int
    scopes: list[str]
    expires_at: float
    sealed: str

    def associated_data(self, device_id: str) -> bytes:
        """What the sealed box is bound to, for ``device_id``."""
        import orjson

        fields = [
            "edgeos-secret-grant/1", self.grant_id, self.name, self.version,
            sorted(self.scopes), self.expires_at, device_id,
        ]  # fmt: skip
        return orjson.dumps(fields)


class SecretGrants(_Wire):
    """``GET /api/v1/secrets``: every secret granted to the asking device, in force now."""

    revision: int
    grants: list[SealedSecret]


class ErrorBody(_Wire):
    """Every refusal: a machine-readable code and a message a person can act on."""

    error: str
    message: str


class PendingEscalation(_Wire):
    """A question an agent on the device asked a person, still open there."""

    id: str = Field(min_length=1, max_length=200)
    agent: str = Field(max_length=128)
    run_id: str = Field(max_length=128)
    step: str = Field(max_length=128)
    question: str = Field(max_length=4000)
    options: list[Any] = Field(min_length=1, max_length=64)
    proposal: Any = None
    default: Any = None
    deadline: float


class AnswerResult(_Wire):
    """What the device did with an operator's answer: applied, or refused and why."""

    id: str = Field(min_length=1, max_length=200)
    applied: bool
    detail: str | None = Field(default=None, max_length=1000)


class EscalationReport(_Wire):
    """``POST /api/v1/escalations`` (mTLS): the device's open escalations (all of them,
    or None when unchanged since its last report) and the results of answers it got."""

    device_id: str
    open: list[PendingEscalation] | None = Field(default=None, max_length=500)
    results: list[AnswerResult] = Field(default=[], max_length=500)


class EscalationAnswer(_Wire):
    """An operator's answer for the device to apply as if given locally."""

    id: str
    choice: Any
    by: str
    note: str | None = None


class EscalationAnswers(_Wire):
    """The answers waiting for the device (until it reports their results)."""

    answers: list[EscalationAnswer]


# -- memory backups (``/api/v1/memory/...``, mTLS) ---------------------------------------
#: The most changes, and bytes of JSON, one memory batch may carry; a node splits its
#: batches to fit. Any one record fits: its text is at most 1 MiB, its metadata 64 KiB.
MAX_MEMORY_BATCH_CHANGES = 1000
MAX_MEMORY_BATCH_BYTES = 8 * 1024 * 1024
#: The most records one page of ``GET /api/v1/memory/{device}/records`` holds.
MAX_MEMORY_PAGE = 500


class MemoryRecordBody(_Wire):
    """A long-term memory record as a device replicates it (the vector: base64 float32)."""

    id: str = Field(min_length=1, max_length=128)
    agent: str = Field(min_length=1, max_length=128)
    subject: str | None = Field(default=None, max_length=256)
    text: str = Field(min_length=1, max_length=1 << 20)
    metadata: dict[str, Any]
    importance: float
    model: str = Field(min_length=1, max_length=128)
    created_at: float
    expires_at: float | None = None
    vector: str = Field(min_length=4, max_length=1 << 20, pattern=r"^[A-Za-z0-9+/]*={0,2}$")


class MemoryChange(_Wire):
    """One entry of a device's memory change log: a record put (with its body, unless a
    later delete undid it) or deleted."""

    seq: int = Field(ge=1)
    op: Literal["put", "delete"]
    agent: str = Field(min_length=1, max_length=128)
    record: str = Field(min_length=1, max_length=128)
    body: MemoryRecordBody | None = None


class MemoryBatch(_Wire):
    """``POST /api/v1/memory/{device}/changes``: changes in log order, applied idempotently
    (those at or below the backup's position are skipped)."""

    changes: list[MemoryChange] = Field(min_length=1, max_length=MAX_MEMORY_BATCH_CHANGES)


class MemoryBackup(_Wire):
    """How far a device's memory backup goes: the last sequence applied, what it holds,
    and the device whose memory this device replaces (it may read that backup)."""

    device_id: str
    position: int
    records: int
    bytes: int
    changes: int
    updated_at: float | None = None
    replaces: str | None = None


class MemoryRecordsPage(_Wire):
    """Live records of a backup in id order; ``next`` is the ``after`` of the next page."""

    records: list[MemoryRecordBody]
    next: str | None = None
