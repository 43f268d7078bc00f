"""The wire format of a run moved between nodes: its envelope (see
:mod:`edgeos.agents.migration`, which seals, signs and checks it, and the fleet's relay,
which carries it from one device to another).
"""

from __future__ import annotations

from typing import Any, Final, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field

FORMAT: Final = "edgeos-run-envelope/1"

_HEX64 = r"^[0-9a-f]{64}$"
Scalar = str | int | float | None


class _Wire(BaseModel):
    # Unknown fields are refused: an envelope says exactly what this edgeos signs.
    model_config = ConfigDict(extra="forbid", frozen=True)


class AgentRef(_Wire):
    """The agent version the run needs: name, version and the bundle's sha256."""

    name: str = Field(min_length=1, max_length=128)
    version: str = Field(min_length=1, max_length=64)
    digest: str = Field(pattern=_HEX64)


class Digests(_Wire):
    """sha256 of each part of the envelope the chain head does not cover."""

    run: str = Field(pattern=_HEX64)
    context: str = Field(pattern=_HEX64)
    effects: str = Field(pattern=_HEX64)


class Statement(_Wire):
    """What the source device signs."""

    format: Literal["edgeos-run-envelope/1"]
    envelope_id: str = Field(min_length=8, max_length=64)
    run_id: str = Field(min_length=1, max_length=128)
    agent: AgentRef
    source: str = Field(min_length=1, max_length=64)
    destination: str = Field(min_length=1, max_length=64)
    created_at: float
    expires_at: float
    records: int = Field(ge=1)
    head: str = Field(pattern=_HEX64)
    digests: Digests


class RunState(_Wire):
    """The run's row: where it stands."""

    trigger: str
    input: Any
    next_step: str | None
    step_count: int = Field(ge=0)
    carry: Any
    seed: int
    created_at: float
    cost: float


class Turn(_Wire):
    """One conversational turn of ``ctx.context``."""

    n: int = Field(ge=1)
    role: str
    text: str
    at: float


class Context(_Wire):
    """The run's short-term context and the answers its steps may ask for again."""

    values: dict[str, Any]
    turns: list[Turn]
    escalations: list[list[Scalar]]
    deferred: list[list[Scalar]]


class Record(_Wire):
    """One journal record of the run, with its run hash."""

    kind: str = Field(min_length=1, max_length=64)
    step: str | None
    at: float
    payload: dict[str, Any]
    run_hash: str = Field(pattern=_HEX64)


class Effect(_Wire):
    """An effect decided and not delivered yet: the destination delivers it, same key."""

    key: str = Field(min_length=1, max_length=256)
    connector: str
    operation: str
    payload: dict[str, Any]
    attempts: int = Field(ge=0)


class Envelope(_Wire):
    """A sealed run: the signed statement, the certificate, and the parts it covers."""

    statement: Statement
    signature: str
    certificate: str
    run: RunState
    context: Context
    records: list[Record]
    effects: list[Effect]

    def to_bytes(self) -> bytes:
        """The envelope as JSON (what ``edgeos runs migrate --out`` writes)."""
        return orjson.dumps(self.model_dump(mode="json"), option=orjson.OPT_SORT_KEYS)


#: The most envelopes one fetch from the fleet's relay returns; the rest come next time.
MAX_RELAYED = 20


class Revocations(_Wire):
    """``GET /api/v1/revocations`` (mTLS): the device certificates the fleet revoked that
    are still within their validity, and whose they were. A node refuses a run any of
    them sealed, however it arrived (through the fleet or as a file)."""

    serials: list[str] = Field(default_factory=list, max_length=1_000_000)
    devices: list[str] = Field(default_factory=list, max_length=1_000_000)


class RunEnvelopes(_Wire):
    """``GET /api/v1/runs/envelopes`` (mTLS): envelopes sealed for the asking device."""

    envelopes: list[Envelope] = Field(max_length=MAX_RELAYED)
