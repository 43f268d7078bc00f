"""Bodies of the operator API (the device protocol is in ``edgeos.protocol.fleet``)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

Scope = Literal["read", "deploy", "admin"]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TokenCreate(_Body):
    """``POST /api/v1/tokens``: a new operator token."""

    name: str = Field(min_length=1, max_length=128)
    scopes: list[Scope] = Field(min_length=1)


class TokenCreated(_Body):
    """The new token: shown once, never again."""

    id: str
    name: str
    scopes: list[str]
    token: str


class JoinTokenCreate(_Body):
    """``POST /api/v1/join-tokens``: a token that enrolls devices into ``group``, or one
    device as the replacement of device ``replaces`` (which is revoked when it enrolls,
    and whose memory it restores; the group defaults to that device's)."""

    group: str | None = Field(default=None, min_length=1, max_length=128)
    ttl_s: float = Field(default=3600.0, gt=0)
    uses: int = Field(default=1, ge=1)
    replaces: str | None = Field(default=None, min_length=1, max_length=64)

    @model_validator(mode="after")
    def _group_or_replaced(self) -> JoinTokenCreate:
        if self.replaces is None and self.group is None:
            raise ValueError("give group (or replaces: the id of a device to replace)")
        if self.replaces is not None and self.uses != 1:
            raise ValueError("a token that replaces a device enrolls one device: uses must be 1")
        return self


class JoinTokenCreated(_Body):
    """The new join token: shown once, never again."""

    id: str
    token: str
    group: str
    expires_at: float
    uses: int
    replaces: str | None = None


class LabelsUpdate(_Body):
    """``PUT /api/v1/devices/{id}/labels``: the device's labels, replacing the old ones."""

    labels: dict[str, str]
