"""The telemetry uplink's wire format, shared by the node and the fleet.

``POST /api/v1/telemetry`` (device mTLS) carries one :class:`TelemetryBatch` as JSON,
compressed with zstd and the raw-content dictionary :data:`ZSTD_DICTIONARY` (content type
:data:`CONTENT_TYPE`), at most
:data:`MAX_BATCH_BYTES` compressed and :data:`MAX_BATCH_RAW_BYTES` once decompressed.
``seq`` counts a device's batches from 1; the fleet refuses a batch whose ``seq`` is not
above the last one it accepted from that device (409, a replay). The answer is a
:class:`TelemetryAck`.

A ``kpi`` record's ``data`` is a :class:`KpiRecord`: one agent (``model`` empty) or one
model version (``agent`` empty) over one minute. Latencies travel as DDSketches
(:mod:`edgeos.telemetry.sketch`, base64 of the binary form, values in seconds), so the
fleet merges them into true percentiles over devices and time.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

CONTENT_TYPE = "application/vnd.edgeos.telemetry+zstd"
MAX_BATCH_BYTES = 1024 * 1024
MAX_BATCH_RAW_BYTES = 16 * 1024 * 1024
MAX_RECORDS = 100_000
#: The resolution of KPI records.
MINUTE_S = 60

#: What every batch repeats (field names, the start of every sketch): a minute's batch
#: is a few hundred bytes, too few for zstd to learn them from the batch alone. Never
#: changed once released (a new one would need a new content type).
ZSTD_DICTIONARY = (
    b'{"device_id":"","seq":1,"sent_at":0,"records":[{"kind":"kpi","at":0,"data":{"minute":0,'
    b'"agent":"","runs":0,"succeeded":0,"failed":0,"answered":0,"overrides":0,"cost":0,'
    b'"recoveries":0,"recovery_s":0,"drift":0,"decision":"REQxAXsUrkfheoQ/"}},{"kind":"kpi",'
    b'"at":0,"data":{"minute":0,"model":"","version":"","errors":0,'
    b'"inference":"REQxAHsUrkfheoQ/"}},{"kind":"alert","at":0,"data":{}},{"kind":"trace",'
    b'"at":0,"data":{}},{"kind":"log","at":0,"data":{}}],"dropped":{}}'
)

Kind = Literal["alert", "kpi", "trace", "log"]
_NAME = Field(default="", max_length=128)


class KpiRecord(BaseModel):
    """One minute of one agent's (or one model version's) figures."""

    model_config = ConfigDict(extra="forbid")

    minute: int = Field(ge=0, multiple_of=MINUTE_S, description="Start of the minute, Unix s.")
    agent: str = _NAME
    model: str = _NAME
    version: str = Field(default="", max_length=64)
    runs: int = Field(default=0, ge=0, description="Runs finished (succeeded, failed, cancelled).")
    succeeded: int = Field(default=0, ge=0)
    failed: int = Field(default=0, ge=0)
    answered: int = Field(default=0, ge=0, description="Escalations answered by people.")
    overrides: int = Field(default=0, ge=0, description="Answers that overrode the agent.")
    cost: float = Field(default=0.0, ge=0.0, allow_inf_nan=False)
    recoveries: int = Field(default=0, ge=0, description="Failures recovered from.")
    recovery_s: float = Field(default=0.0, ge=0.0, allow_inf_nan=False,
                              description="Their total time to recovery.")  # fmt: skip
    drift: float | None = Field(default=None, ge=0.0, allow_inf_nan=False)
    decision: str | None = Field(default=None, max_length=65536,
                                 description="Sketch of end-to-end decision latency (s).")  # fmt: skip
    inference: str | None = Field(default=None, max_length=65536,
                                  description="Sketch of local inference latency (s).")  # fmt: skip
    errors: int = Field(default=0, ge=0, description="Failed inference calls.")


class TelemetryRecord(BaseModel):
    """One record of a batch."""

    model_config = ConfigDict(extra="forbid")

    kind: Kind
    at: float = Field(ge=0.0, allow_inf_nan=False)
    data: dict[str, Any]


class TelemetryBatch(BaseModel):
    """What a device sends at once (JSON, then zstd)."""

    model_config = ConfigDict(extra="forbid")

    device_id: str = Field(min_length=1, max_length=64)
    seq: int = Field(ge=1)
    sent_at: float = Field(ge=0.0, allow_inf_nan=False)
    records: list[TelemetryRecord] = Field(max_length=MAX_RECORDS)
    dropped: dict[Kind, int] = Field(default_factory=dict,
                                     description="Records dropped since the last batch.")  # fmt: skip


def compressor() -> Any:
    """A ``zstandard.ZstdCompressor`` for batch bodies."""
    import zstandard  # here: only a node with a fleet link, and the fleet, need it

    return zstandard.ZstdCompressor(level=9, dict_data=_dictionary())


def decompressor() -> Any:
    """A ``zstandard.ZstdDecompressor`` for batch bodies."""
    import zstandard

    return zstandard.ZstdDecompressor(dict_data=_dictionary())


def _dictionary() -> Any:
    import zstandard

    return zstandard.ZstdCompressionDict(ZSTD_DICTIONARY, dict_type=zstandard.DICT_TYPE_RAWCONTENT)


class TelemetryAck(BaseModel):
    """The fleet's answer to an accepted batch."""

    seq: int
    stored: int
