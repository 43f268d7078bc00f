"""Venue configuration: ``<data_dir>/venues.yaml`` as pydantic models.

Next to ``connectors.yaml``; each key under ``venues`` names a venue, and ``type`` says
what it is::

    probe_interval: 2s        # light health probes of every remote venue
    window: 200               # calls kept per venue for its latency percentiles
    venues:
      edge:
        type: local           # this node's model host (implicit when not declared)
        models:
          stockout-risk: {quality: 0.86}
      cloud:
        type: fleet           # the fleet's cloud venue, over mTLS with the device certificate
        price_per_call: 0.0004
        latency_ms: 40        # expected until calls have been measured
        models:
          stockout-risk: {model: stockout-risk-xl, quality: 0.93}
      lab:
        type: v2              # any Open Inference Protocol (V2) endpoint
        url: http://10.0.0.5:8000
        price_per_call: 0.0001
        timeout: 2s
        models:
          stockout-risk: {}
      llm:
        type: openai          # an OpenAI-compatible chat endpoint (llama.cpp, Ollama, vLLM)
        url: http://10.0.0.6:8080/v1
        api_key: ${secret:llm_key}   # sent as Authorization: Bearer; from the vault only
        price_per_input_token: 0.0000005
        price_per_output_token: 0.0000015
        models:
          drafter: {model: qwen2.5-7b-instruct}

The keys under ``models`` are the names agents ask for (``ctx.infer("stockout-risk", ...)``);
``model`` is the name at the venue when it differs, ``quality`` the venue's declared
quality for it (0 to 1, compared with a task's ``min_quality``). A local venue without
``models`` serves every model registered on the node.

An openai venue's ``api_key`` names a secret of the node's vault, granted to the scope
``venues.<venue name>`` (``edgeos secrets set llm_key --scope venues.llm``); a key written
in the file is refused. The key is read at each call (a rotation applies at the next one)
and goes nowhere but the request's ``Authorization`` header.

Errors name the file, the field (``venues.lab.url``) and the reason, like every manifest.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from edgeos.manifests.durations import Duration
from edgeos.manifests.loader import load_manifest
from edgeos.manifests.secrets import secret_name

#: Venue names end up in journal records and metric labels: plain identifiers.
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]{0,63}$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class VenueModel(_Strict):
    """One model a venue serves."""

    #: The model's name at the venue (default: the name agents ask for).
    model: str | None = Field(default=None, min_length=1, max_length=128)
    #: Declared quality (accuracy or similar, 0 to 1) for ``min_quality`` floors.
    quality: float | None = Field(default=None, ge=0, le=1)


class VenueConfig(_Strict):
    """One venue."""

    type: Literal["local", "v2", "fleet", "openai"]
    #: The V2 endpoint's base URL (``/v2/...`` is appended); a fleet venue defaults to the
    #: node's fleet; an openai venue's is the API's base (``.../v1``).
    url: str | None = None
    price_per_call: float = Field(default=0.0, ge=0)
    #: Generative calls: price per prompt token and per generated token.
    price_per_input_token: float = Field(default=0.0, ge=0)
    price_per_output_token: float = Field(default=0.0, ge=0)
    #: Expected latency until calls have been measured.
    latency_ms: float | None = Field(default=None, gt=0)
    timeout: Duration = Field(default=5.0, gt=0, le=300)
    models: dict[str, VenueModel] = Field(default_factory=dict)
    #: An openai or v2 venue's API key (another edgeos node's API token, for one), as
    #: ``${secret:NAME}`` only, granted to ``venues.<name>``.
    api_key: str | None = None

    @property
    def api_key_secret(self) -> str | None:
        """The name of the vault's secret that holds the API key, if the venue has one."""
        return None if self.api_key is None else secret_name(self.api_key)

    @field_validator("api_key")
    @classmethod
    def _api_key(cls, value: str | None) -> str | None:
        # The message never quotes the value: it may be a real key.
        if value is not None and secret_name(value) is None:
            raise ValueError(
                "give the API key as ${secret:NAME} and store it in the vault with edgeos "
                "secrets set NAME --scope venues.<venue name>: a key written in venues.yaml "
                "is refused"
            )
        return value

    @field_validator("url")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"{value!r} is not an http:// or https:// URL with a host")
        if parts.query or parts.fragment:
            raise ValueError(f"{value!r}: a venue URL has no query or fragment")
        return value.rstrip("/")

    @model_validator(mode="after")
    def _by_type(self) -> VenueConfig:
        if self.type in ("v2", "openai") and self.url is None:
            article = "an" if self.type == "openai" else "a"
            raise ValueError(f"{article} {self.type} venue needs its url")
        if self.type == "local" and self.url is not None:
            raise ValueError("a local venue is this node's model host: it has no url")
        priced = self.price_per_call or self.price_per_input_token or self.price_per_output_token
        if self.type == "local" and priced:
            raise ValueError("a local venue costs nothing: leave its prices out")
        if self.type != "local" and not self.models:
            raise ValueError("a remote venue must list the models it serves under models")
        if self.api_key is not None and self.type not in ("openai", "v2"):
            raise ValueError("api_key is for openai and v2 venues (a fleet venue uses the "
                             "device's certificate)")  # fmt: skip
        return self


class RoutingConfig(_Strict):
    """The whole ``venues.yaml``."""

    probe_interval: Duration = Field(default=2.0, ge=0.05, le=3600)
    window: int = Field(default=200, ge=5, le=100_000)
    venues: dict[str, VenueConfig] = Field(default_factory=dict)

    @field_validator("venues")
    @classmethod
    def _venues(cls, value: dict[str, VenueConfig]) -> dict[str, VenueConfig]:
        for name in value:
            if not _NAME.match(name):
                raise ValueError(
                    f"venue name {name!r}: use 1-64 of A-Z a-z 0-9 _ - starting with a letter or _"
                )
        if sum(1 for v in value.values() if v.type == "local") > 1:
            raise ValueError("at most one venue is of type local (this node's model host)")
        return value


def load_venues(path: Path) -> RoutingConfig:
    """Read ``venues.yaml``; raise ManifestError naming the file and each bad field."""
    return load_manifest(path, RoutingConfig)
