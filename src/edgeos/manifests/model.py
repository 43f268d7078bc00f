"""The model manifest: what a model is, what it takes and gives, what it costs."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from edgeos.errors import ManifestError
from edgeos.protocol.datatypes import Datatype
from edgeos.protocol.privacy import PrivacyClass as PrivacyClass

Task = Literal["classification", "regression", "embedding", "detection", "generation", "other"]

_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
_VERSION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,31}$")


def validate_model_name(name: str) -> str:
    """Return ``name`` if it is a valid model name, else raise ManifestError."""
    if not _NAME.match(name):
        raise ManifestError(
            "model name",
            [f"{name!r} must be 1-64 of a-z 0-9 . _ - and start with a letter or digit"],
        )
    return name


def validate_version(version: str) -> str:
    """Return ``version`` if it is a valid version label, else raise ManifestError."""
    if not _VERSION.match(version):
        raise ManifestError(
            "model version",
            [f"{version!r} must be 1-32 of A-Z a-z 0-9 . _ - and start with a letter or digit"],
        )
    return version


class TensorSpec(BaseModel):
    """A named input or output tensor; -1 in a shape is a dimension of any size."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1)
    datatype: Datatype
    shape: list[int]

    def accepts_shape(self, shape: tuple[int, ...]) -> bool:
        """True if a concrete shape fits this spec."""
        return len(shape) == len(self.shape) and all(
            want < 0 or want == got for want, got in zip(self.shape, shape, strict=True)
        )


class BatchingSpec(BaseModel):
    """Dynamic micro-batching: gather concurrent calls into one run of the model."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_batch_size: int = Field(default=32, ge=1, le=4096)
    max_queue_delay_ms: float = Field(default=2.0, ge=0, le=1000)


class GenerationSpec(BaseModel):
    """Limits of a generative model: its context, its memory, how many requests it takes."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    context_length: int | None = Field(default=None, ge=8, le=1_048_576)
    """Tokens of prompt and output together; at most the model's own (the default)."""
    memory_budget_mb: float = Field(default=512.0, gt=0)
    """Weights plus the KV cache of every request running at once must fit in this."""
    max_running: int = Field(default=1, ge=1, le=64)
    """Requests generating at the same time; the others wait their turn, first come first served."""
    max_queued: int = Field(default=16, ge=0, le=10_000)
    """Requests waiting for a turn; one more is refused at once (retry later)."""


class ModelSpec(BaseModel):
    """What a person writes in a model manifest file (``--manifest M.yaml``).

    Inputs and outputs are read from the ONNX file; when a manifest states them too, they
    must agree with the file.
    """

    model_config = ConfigDict(extra="forbid")

    name: str | None = None
    version: str | None = None
    task: Task = "other"
    description: str = ""
    labels: list[str] = Field(default_factory=list)
    cost_per_call: float = Field(default=0.0, ge=0)
    privacy: PrivacyClass = "internal"
    execution_providers: list[str] = Field(default_factory=lambda: ["CPUExecutionProvider"])
    batching: BatchingSpec | None = None
    kind: Literal["predictive", "generative"] = "predictive"
    """``generative``: a language model directory run token by token (see docs/genai.md)."""
    generation: GenerationSpec | None = None
    inputs: list[TensorSpec] | None = None
    outputs: list[TensorSpec] | None = None


class ModelManifest(ModelSpec):
    """A registered model version: the person's spec plus facts read from the file."""

    name: str
    version: str
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    opset: int
    size_bytes: int
    sha256: str
    quantization: str | None = None
    derived_from: str | None = None

    def spec(self) -> ModelSpec:
        """The person-written part, e.g. to register a derived version with the same intent."""
        return ModelSpec.model_validate(
            self.model_dump(include=set(ModelSpec.model_fields) - {"name", "version"})
        )
