"""Connector bindings: ``<data_dir>/connectors.yaml`` as pydantic models.

Each top-level key names a binding, the part before the dot in
``ctx.effect("supplier.reorder", ...)``; its ``type`` chooses the connector::

    supplier:
      type: http
      base_url: http://127.0.0.1:9000
      timeout_s: 5
      headers: {X-Store: "42"}
      operations:
        reorder: {method: POST, path: /orders}
    store:
      type: sql
      url: sqlite:////var/lib/store.db        # or postgresql://user@host/db
      operations:
        record_order: {statement: "INSERT INTO orders (sku, qty) VALUES (:sku, :qty)"}

Errors name the file, the field (``supplier.operations.reorder.path``) and the reason,
like every other manifest.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, RootModel, ValidationError, field_validator

from edgeos.connectors.base import Connector
from edgeos.errors import ManifestError
from edgeos.manifests.loader import load_manifest

# Binding and operation names end up in effect targets ("binding.operation") and metric
# labels, so they are plain identifiers: no dots, no spaces.
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]{0,63}$")
_NAME_RULE = "use 1-64 of A-Z a-z 0-9 _ - starting with a letter or _"

SQLITE_PREFIX = "sqlite:///"
POSTGRES_SCHEMES = ("postgresql", "postgres")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _check_operation_names(value: Mapping[str, Any]) -> None:
    for name in value:
        if not _NAME.match(name):
            raise ValueError(f"operation name {name!r}: {_NAME_RULE}")


class HttpOperation(_Strict):
    """One HTTP operation: the payload is sent as the JSON body of ``method path``."""

    method: Literal["POST", "PUT", "PATCH", "DELETE"] = "POST"
    path: str = Field(min_length=1)

    @field_validator("path")
    @classmethod
    def _path(cls, value: str) -> str:
        if not value.startswith("/"):
            raise ValueError("must start with '/' (it is joined to base_url)")
        return value


class HttpConnectorConfig(_Strict):
    """A binding to an HTTP API."""

    #: The binding's key in connectors.yaml (filled in by the loader).
    name: str
    type: Literal["http"]
    base_url: str
    timeout_s: float = Field(default=10.0, gt=0, le=600)
    headers: dict[str, str] = Field(default_factory=dict)
    operations: dict[str, HttpOperation] = Field(min_length=1)

    @field_validator("base_url")
    @classmethod
    def _base_url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"{value!r} is not an http:// or https:// URL with a host")
        if parts.query or parts.fragment:
            raise ValueError("must not have a query or fragment")
        return value

    @field_validator("headers")
    @classmethod
    def _headers(cls, value: dict[str, str]) -> dict[str, str]:
        for header in value:
            if header.lower() in ("idempotency-key", "content-type", "content-length"):
                raise ValueError(f"header {header!r} is set by the connector itself")
        return value

    @field_validator("operations")
    @classmethod
    def _operations(cls, value: dict[str, HttpOperation]) -> dict[str, HttpOperation]:
        _check_operation_names(value)
        return value


class SqlOperation(_Strict):
    """One SQL statement; ``:name`` placeholders take the payload's fields."""

    statement: str = Field(min_length=1)

    @field_validator("statement")
    @classmethod
    def _statement(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be blank")
        return value


class SqlConnectorConfig(_Strict):
    """A binding to an SQLite file or a PostgreSQL database."""

    name: str
    type: Literal["sql"]
    url: str
    timeout_s: float = Field(default=10.0, gt=0, le=600)
    operations: dict[str, SqlOperation] = Field(min_length=1)

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        if value.startswith("sqlite:"):
            path = value[len(SQLITE_PREFIX) :] if value.startswith(SQLITE_PREFIX) else ""
            if not path or path == ":memory:" or path.startswith("file:"):
                raise ValueError(
                    "an SQLite URL is sqlite:////absolute/path.db or sqlite:///relative.db "
                    "(relative to connectors.yaml); in-memory databases are refused"
                )
            return value
        if urlsplit(value).scheme in POSTGRES_SCHEMES:
            return value
        raise ValueError("must start with sqlite:/// or postgresql://")

    @field_validator("operations")
    @classmethod
    def _operations(cls, value: dict[str, SqlOperation]) -> dict[str, SqlOperation]:
        _check_operation_names(value)
        return value

    @property
    def sqlite_path(self) -> Path | None:
        """The database file of an SQLite binding; None for PostgreSQL."""
        if self.url.startswith(SQLITE_PREFIX):
            return Path(self.url[len(SQLITE_PREFIX) :])
        return None


ConnectorConfig = HttpConnectorConfig | SqlConnectorConfig

_TYPES: dict[str, type[HttpConnectorConfig] | type[SqlConnectorConfig]] = {
    "http": HttpConnectorConfig,
    "sql": SqlConnectorConfig,
}


class _Bindings(RootModel[dict[str, Any]]):
    """The file's outer shape; each binding is validated on its own for precise errors."""


def load_connectors(path: Path) -> dict[str, ConnectorConfig]:
    """Read ``connectors.yaml``; raise ManifestError naming the file and each bad field.

    A missing file is an error here; a node without connectors simply has no file and
    should not call this. Relative SQLite paths are taken relative to the file.
    """
    bindings = load_manifest(path, _Bindings)
    return parse_connectors(bindings.root, str(path), base_dir=path.parent)


def parse_connectors(
    data: Any, source: str, *, base_dir: Path | None = None
) -> dict[str, ConnectorConfig]:
    """Validate already-parsed bindings; ``source`` names them in errors."""
    if not isinstance(data, Mapping):
        raise ManifestError(source, ["the file must be a mapping of binding name: settings"])
    problems: list[str] = []
    configs: dict[str, ConnectorConfig] = {}
    for name, body in data.items():
        if not isinstance(name, str) or not _NAME.match(name):
            problems.append(f"field '{name}': binding name {name!r}: {_NAME_RULE}")
            continue
        if not isinstance(body, Mapping):
            problems.append(f"field '{name}': must be a mapping with a 'type'")
            continue
        if "name" in body:
            problems.append(f"field '{name}.name': unknown field (a binding is named by its key)")
            continue
        kind = body.get("type")
        if kind is None:
            problems.append(f"field '{name}.type': required (one of {', '.join(_TYPES)})")
            continue
        model = _TYPES.get(kind) if isinstance(kind, str) else None
        if model is None:
            problems.append(
                f"field '{name}.type': unknown connector type {kind!r} (known: {', '.join(_TYPES)})"
            )
            continue
        try:
            config = model.model_validate({**body, "name": name})
        except ValidationError as exc:
            problems += [_describe(name, err) for err in exc.errors()]
            continue
        configs[name] = _resolve(config, base_dir)
    if problems:
        raise ManifestError(source, problems)
    return configs


def build(config: ConnectorConfig) -> Connector:
    """The connector for one binding. Connecting is lazy: nothing is opened here."""
    # Imported here so that reading a configuration does not import httpx or psycopg.
    if isinstance(config, HttpConnectorConfig):
        from edgeos.connectors.http import HttpConnector

        return HttpConnector.from_config(config)
    from edgeos.connectors.sql import SqlConnector

    return SqlConnector.from_config(config)


def build_all(configs: Mapping[str, ConnectorConfig]) -> dict[str, Connector]:
    """A connector for every binding, keyed by binding name."""
    return {name: build(config) for name, config in configs.items()}


def _resolve(config: ConnectorConfig, base_dir: Path | None) -> ConnectorConfig:
    """Make a relative SQLite path absolute against the directory of connectors.yaml."""
    if isinstance(config, SqlConnectorConfig) and base_dir is not None:
        path = config.sqlite_path
        if path is not None and not path.is_absolute():
            absolute = (base_dir / path).absolute()
            return config.model_copy(update={"url": f"{SQLITE_PREFIX}{absolute}"})
    return config


def _describe(binding: str, err: Any) -> str:
    field = ".".join([binding, *(str(part) for part in err["loc"])])
    if err["type"] == "extra_forbidden":
        return f"field '{field}': unknown field"
    if err["type"] == "missing":
        return f"field '{field}': required"
    message = str(err["msg"]).removeprefix("Value error, ")
    return f"field '{field}': {message}"
