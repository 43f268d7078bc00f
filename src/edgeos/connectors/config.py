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
        report:                               # queued on disk, sent in batches
          path: /reports
          batch: {path: /reports/batch, priority: bulk, max_batch_bytes: 65536}
    store:
      type: sql
      url: sqlite:////var/lib/store.db        # or postgresql://app:${secret:pg_password}@host/db
      operations:
        record_order: {statement: "INSERT INTO orders (sku, qty) VALUES (:sku, :qty)"}
    plant:
      type: mqtt
      url: mqtt://broker.local:1883          # user:${secret:NAME}@ may precede the host
      operations:
        alarm: {topic: plant/line1/alarm}   # effects: published as JSON, QoS 1
      subscribe:
        reading: {topic: "plant/+/temperature"}   # events: each message starts agents
    inbox:
      type: files
      interval: 5s
      watch:
        invoice_arrived: {path: /srv/inbox, pattern: "*.pdf"}   # one event per new file
        sale: {path: /srv/exports/sales.csv, csv: true}          # one event per new row
      operations:
        export: {path: /srv/erp-import}       # effects: one JSON file per effect
    mail:
      type: smtp
      host: 127.0.0.1
      port: 25
      from: edge-42@example.com
      starttls: false
      username: edge-42                       # optional login; the password only as
      password: ${secret:smtp_password}       # a secret from the vault
      operations:
        send: {}                              # payload: to, subject, body

``http``, ``sql``, ``mqtt`` and ``smtp`` bindings take effects, and so do ``files``
bindings with ``operations``; the ``watch`` part of ``files`` bindings and the
``subscribe`` part of ``mqtt`` bindings are sources of events
(:mod:`edgeos.connectors.events`). Any other ``type`` is looked up among the connector
plugins installed as Python packages (:mod:`edgeos.connectors.plugins`).

Every binding may list the credential ``scopes`` it is granted; with its own name, they
decide which secrets of the vault its connector can read (:class:`BindingSecrets`), and
they must cover the scopes its contract requires::

    supplier:
      type: http
      scopes: [supplier.write]
      headers: {Authorization: "Bearer ${secret:supplier_token}"}
      ...

A binding may say which capability contract it provides, checked against
``<data_dir>/contracts/`` (:mod:`edgeos.connectors.contracts`): its operations must cover
the contract's operations, and its ``watch`` or ``subscribe`` names the contract's events
(``<capability>.<event>``)::

    supplier:
      type: http
      implements: {capability: supplier, version: "1.2.0"}
      ...
    pos:
      type: files
      implements: {capability: pos, version: "1.0"}
      watch:
        pos.sales: {path: exports/sales.csv, csv: true}

Errors name the file, the field (``supplier.operations.reorder.path``) and the reason,
like every other manifest.
"""

from __future__ import annotations

import email.utils
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    RootModel,
    ValidationError,
    field_validator,
    model_validator,
)

from edgeos.connectors.base import Connector
from edgeos.connectors.secret_refs import SECRET_REF, check_refs, has_refs
from edgeos.connectors.vault import BindingSecrets, check_scopes
from edgeos.errors import ConfigError, ManifestError
from edgeos.manifests.durations import Duration
from edgeos.manifests.loader import load_manifest

# Binding and operation names end up in effect targets ("binding.operation") and metric
# labels, so they are plain identifiers: no dots, no spaces.
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]{0,63}$")
_NAME_RULE = "use 1-64 of A-Z a-z 0-9 _ - starting with a letter or _"

# Event names are matched against agents' ``event:`` triggers; dots are allowed there
# ("sensor.reading"), so they are allowed here too.
_EVENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_.:-]{0,127}$")
_EVENT_RULE = "use 1-128 of A-Z a-z 0-9 _ . : - starting with a letter or _"

SQLITE_PREFIX = "sqlite:///"
POSTGRES_SCHEMES = ("postgresql", "postgres")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Implements(_Strict):
    """``implements: {capability: supplier, version: "1.2.0"}``: the contract a binding
    provides (:mod:`edgeos.connectors.contracts`)."""

    capability: str = Field(min_length=1)
    version: str = Field(pattern=r"^\d+(\.\d+)*$")


def _check_operation_names(value: Mapping[str, Any]) -> None:
    for name in value:
        if not _NAME.match(name):
            raise ValueError(f"operation name {name!r}: {_NAME_RULE}")


class _Binding(_Strict):
    """What every binding has, whatever its type."""

    #: The binding's key in connectors.yaml (filled in by the loader).
    name: str
    #: The capability contract the binding provides, if any.
    implements: Implements | None = None
    #: Credential scopes granted to the binding, besides its own name.
    scopes: list[str] = Field(default_factory=list)

    @field_validator("scopes")
    @classmethod
    def _scopes(cls, value: list[str]) -> list[str]:
        return check_scopes(value)

    @property
    def granted_scopes(self) -> tuple[str, ...]:
        """The scopes whose secrets the binding's connector may read: its name, then
        ``scopes``."""
        return (self.name, *(s for s in self.scopes if s != self.name))


def _check_path(value: str) -> str:
    if not value.startswith("/"):
        raise ValueError("must start with '/' (it is joined to base_url)")
    return value


class HttpBatch(_Strict):
    """``batch:`` of an HTTP operation: its effects wait in the node's outbound queue (on
    disk, bounded, with a declared drop order) and go to the service in batches, one
    ``POST path`` carrying ``{"seq", "messages", "dropped"}``, the receiver deduplicating
    by ``seq`` (see :mod:`edgeos.routing.outbound`)."""

    #: The batch endpoint, joined to ``base_url``.
    path: str = Field(min_length=1)
    #: Which messages are kept longest and sent first: critical, normal, bulk (dropped
    #: first when the queue is full).
    priority: Literal["critical", "normal", "bulk"] = "normal"
    #: The most message bytes one batch carries.
    max_batch_bytes: int = Field(default=256 << 10, ge=1024, le=16 << 20)

    @field_validator("path")
    @classmethod
    def _path(cls, value: str) -> str:
        return _check_path(value)


class HttpOperation(_Strict):
    """One HTTP operation: the payload is sent as the JSON body of ``method path``, or,
    with ``batch``, queued and sent in batches."""

    method: Literal["POST", "PUT", "PATCH", "DELETE"] = "POST"
    path: str = Field(min_length=1)
    batch: HttpBatch | None = None

    @field_validator("path")
    @classmethod
    def _path(cls, value: str) -> str:
        return _check_path(value)


class HttpConnectorConfig(_Binding):
    """A binding to an HTTP API."""

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
            check_refs(value[header])
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


class SqlConnectorConfig(_Binding):
    """A binding to an SQLite file or a PostgreSQL database."""

    type: Literal["sql"]
    url: str
    timeout_s: float = Field(default=10.0, gt=0, le=600)
    operations: dict[str, SqlOperation] = Field(min_length=1)

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        check_refs(value)
        if value.startswith("sqlite:"):
            if has_refs(value):
                raise ValueError("an SQLite path is not a secret: ${secret:...} is for "
                                 "PostgreSQL URLs (the password, or the user)")  # fmt: skip
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


class MqttOperation(_Strict):
    """One MQTT operation: the payload is published as JSON to ``topic`` with QoS 1."""

    topic: str

    @field_validator("topic")
    @classmethod
    def _topic(cls, value: str) -> str:
        _check_topic(value, wildcards=False)
        return value


class MqttSubscription(_Strict):
    """One subscription: each message on ``topic`` (a filter, ``+``/``#`` allowed) is an event."""

    topic: str

    @field_validator("topic")
    @classmethod
    def _topic(cls, value: str) -> str:
        _check_topic(value, wildcards=True)
        return value


class MqttConnectorConfig(_Binding):
    """A binding to an MQTT broker: effects publish, subscriptions start agents."""

    type: Literal["mqtt"]
    url: str
    #: MQTT 5 carries the idempotency key as a user property; 3.1.1 has no properties, so
    #: the payload is wrapped in an envelope ``{"idempotency_key": ..., "payload": ...}``.
    protocol: Literal["5", "3.1.1"] = "5"
    timeout_s: float = Field(default=10.0, gt=0, le=600)
    keepalive_s: int = Field(default=60, ge=5, le=65535)
    #: Set it to keep a persistent session: messages published while the node is down are
    #: queued by the broker and delivered when it comes back. Unset, each start is a fresh
    #: session (a random client id), and messages sent meanwhile are missed.
    client_id: str | None = Field(default=None, min_length=1, max_length=64)
    operations: dict[str, MqttOperation] = Field(default_factory=dict)
    subscribe: dict[str, MqttSubscription] = Field(default_factory=dict)

    @field_validator("protocol", mode="before")
    @classmethod
    def _protocol(cls, value: Any) -> Any:
        # YAML reads `protocol: 5` as an integer.
        return str(value) if isinstance(value, int) and not isinstance(value, bool) else value

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        check_refs(value)
        parts = urlsplit(value)
        if parts.scheme != "mqtt" or not parts.hostname:
            raise ValueError(f"{_shown(value)!r} is not an mqtt://host[:port] URL")
        try:
            parts.port  # noqa: B018  (raises on a port out of range)
        except ValueError as exc:
            raise ValueError(f"bad port: {exc}") from None
        if parts.path not in ("", "/") or parts.query or parts.fragment:
            raise ValueError("must not have a path, query or fragment (topics go in operations)")
        return value

    @field_validator("operations")
    @classmethod
    def _operations(cls, value: dict[str, MqttOperation]) -> dict[str, MqttOperation]:
        _check_operation_names(value)
        return value

    @field_validator("subscribe")
    @classmethod
    def _subscribe(cls, value: dict[str, MqttSubscription]) -> dict[str, MqttSubscription]:
        _check_event_names(value)
        return value

    @model_validator(mode="after")
    def _something(self) -> MqttConnectorConfig:
        if not self.operations and not self.subscribe:
            raise ValueError("needs operations (to publish) or subscribe (to receive), or both")
        return self

    @property
    def host(self) -> str:
        """The broker's host name or address."""
        return mqtt_address(self.url)[0]

    @property
    def port(self) -> int:
        """The broker's port (1883 unless the URL says otherwise)."""
        return mqtt_address(self.url)[1]

    @property
    def credentials(self) -> tuple[str | None, str | None]:
        """User name and password from the URL, if it has them."""
        return mqtt_address(self.url)[2:]


def mqtt_address(url: str) -> tuple[str, int, str | None, str | None]:
    """Host, port (default 1883), user name and password of a validated mqtt:// URL."""
    parts = urlsplit(url)
    return parts.hostname or "", parts.port or 1883, parts.username, parts.password


class FileWatch(_Strict):
    """One watched place: a folder (new files matching ``pattern``) or a CSV (new rows)."""

    path: str = Field(min_length=1)
    #: A glob for the names of new files in the folder ``path`` (not recursive).
    pattern: str | None = Field(default=None, min_length=1)
    #: ``path`` is a CSV file with a header line: each appended row is an event.
    csv: bool = False
    #: On the very first start, count what is already there as seen instead of emitting it.
    skip_existing: bool = False

    @model_validator(mode="after")
    def _one_kind(self) -> FileWatch:
        if self.csv and self.pattern is not None:
            raise ValueError("a watch is a folder (pattern) or a CSV file (csv: true), not both")
        return self

    @field_validator("pattern")
    @classmethod
    def _pattern(cls, value: str | None) -> str | None:
        if value is not None and "/" in value:
            raise ValueError("a pattern matches names in the folder: no '/'")
        return value


class FileDrop(_Strict):
    """One files operation: each effect becomes a JSON file in the folder ``path``, named
    after its idempotency key (:mod:`edgeos.connectors.filedrop`)."""

    path: str = Field(min_length=1)


class FilesSourceConfig(_Binding):
    """A ``files`` binding: it watches folders and CSV files and emits an event per new file
    or row, and/or writes effects as files into folders."""

    type: Literal["files"]
    #: How often to look; the source sleeps in between (no busy loop, no inotify).
    interval: Duration = Field(default=2.0, gt=0, le=86400)
    watch: dict[str, FileWatch] = Field(default_factory=dict)
    operations: dict[str, FileDrop] = Field(default_factory=dict)

    @field_validator("watch")
    @classmethod
    def _watch(cls, value: dict[str, FileWatch]) -> dict[str, FileWatch]:
        _check_event_names(value)
        return value

    @field_validator("operations")
    @classmethod
    def _operations(cls, value: dict[str, FileDrop]) -> dict[str, FileDrop]:
        _check_operation_names(value)
        return value

    @model_validator(mode="after")
    def _something(self) -> FilesSourceConfig:
        if not self.watch and not self.operations:
            raise ValueError(
                "needs watch (to emit events) or operations (to write effects), or both"
            )
        return self


class SmtpOperation(_Strict):
    """An e-mail operation; the payload gives ``to``, ``subject`` and ``body``."""

    #: Recipients used when the payload names none.
    to: list[str] = Field(default_factory=list)

    @field_validator("to")
    @classmethod
    def _to(cls, value: list[str]) -> list[str]:
        for address in value:
            check_address(address)
        return value


class SmtpConnectorConfig(_Binding):
    """A binding to an SMTP server (a relay on the site's network, usually)."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    type: Literal["smtp"]
    host: str = Field(min_length=1)
    port: int = Field(default=25, ge=1, le=65535)
    #: The From address (``from`` in YAML, a Python keyword).
    sender: str = Field(alias="from")
    starttls: bool = False
    timeout_s: float = Field(default=30.0, gt=0, le=600)
    #: SMTP login (AUTH); the password only as ``${secret:NAME}``, never in this file.
    username: str | None = Field(default=None, min_length=1)
    password: str | None = None
    operations: dict[str, SmtpOperation] = Field(min_length=1)

    @field_validator("sender")
    @classmethod
    def _sender(cls, value: str) -> str:
        check_address(value)
        return value

    @field_validator("username")
    @classmethod
    def _username(cls, value: str | None) -> str | None:
        return None if value is None else check_refs(value)

    @field_validator("password")
    @classmethod
    def _password(cls, value: str | None) -> str | None:
        if value is not None and not SECRET_REF.fullmatch(check_refs(value)):
            raise ValueError(
                "give the password as ${secret:NAME} and store it with edgeos secrets set "
                "(or grant it from the fleet): a password in connectors.yaml is refused"
            )
        return value

    @model_validator(mode="after")
    def _login(self) -> SmtpConnectorConfig:
        if (self.username is None) != (self.password is None):
            raise ValueError("username and password go together: give both or neither")
        return self

    @field_validator("operations")
    @classmethod
    def _operations(cls, value: dict[str, SmtpOperation]) -> dict[str, SmtpOperation]:
        _check_operation_names(value)
        return value


class PluginBinding(_Binding):
    """The settings every binding of a plugin connector has; a plugin's ``config_model``
    extends it with its own fields (and may narrow ``operations`` and ``subscribe``).

    ``operations`` are its effects; ``subscribe`` names the events it emits (the sense
    side, for a plugin that provides a source), each with the plugin's own settings."""

    type: str
    operations: dict[str, Any] = Field(default_factory=dict)
    subscribe: dict[str, Any] = Field(default_factory=dict)

    @field_validator("operations")
    @classmethod
    def _operations(cls, value: dict[str, Any]) -> dict[str, Any]:
        _check_operation_names(value)
        return value

    @field_validator("subscribe")
    @classmethod
    def _subscribe(cls, value: dict[str, Any]) -> dict[str, Any]:
        _check_event_names(value)
        return value

    @model_validator(mode="after")
    def _something(self) -> PluginBinding:
        if not self.operations and not self.subscribe:
            raise ValueError("needs operations (effects) or subscribe (events), or both")
        return self


ConnectorConfig = (
    HttpConnectorConfig
    | SqlConnectorConfig
    | MqttConnectorConfig
    | SmtpConnectorConfig
    | FilesSourceConfig
    | PluginBinding
)

_TYPES: dict[str, type[ConnectorConfig]] = {
    "http": HttpConnectorConfig,
    "sql": SqlConnectorConfig,
    "mqtt": MqttConnectorConfig,
    "files": FilesSourceConfig,
    "smtp": SmtpConnectorConfig,
}
#: Connector types that come with edgeos; a plugin cannot take one of these names.
BUILT_IN_TYPES = tuple(_TYPES)


def check_address(value: str) -> str:
    """An e-mail address, plain (``a@b.example``) or with a name (``Edge <a@b.example>``).

    Raises ValueError otherwise; CR and LF are refused so an address cannot add headers.
    """
    if "\r" in value or "\n" in value:
        raise ValueError(f"{value!r} contains a line break")
    _, address = email.utils.parseaddr(value)
    local, at, domain = address.rpartition("@")
    if not at or not local or not domain or " " in address:
        raise ValueError(f"{value!r} is not an e-mail address")
    return value


def _check_event_names(value: Mapping[str, Any]) -> None:
    for name in value:
        if not _EVENT.match(name):
            raise ValueError(f"event name {name!r}: {_EVENT_RULE}")


def _check_topic(value: str, *, wildcards: bool) -> None:
    """MQTT topic rules (MQTT 5 section 4.7): the broker would refuse or misroute others."""
    if not value:
        raise ValueError("must not be empty")
    if len(value.encode()) > 65535 or "\0" in value:
        raise ValueError("must be at most 65535 bytes of UTF-8 without NUL")
    levels = value.split("/")
    for index, level in enumerate(levels):
        if not wildcards:
            if "+" in level or "#" in level:
                raise ValueError("a topic to publish to cannot contain the wildcards + or #")
        elif ("+" in level and level != "+") or ("#" in level and level != "#"):
            raise ValueError(f"wildcard in {level!r}: + and # must be a whole level")
        elif level == "#" and index != len(levels) - 1:
            raise ValueError("# must be the last level")


def _shown(url: str) -> str:
    """A URL without its password, for messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rpartition("@")[2]
    return parts._replace(netloc=f"{parts.username}:***@{netloc}").geturl()


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
        try:
            model = _model(kind)
        except ConfigError as exc:
            problems.append(f"field '{name}.type': {exc}")
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


def _model(kind: Any) -> type[ConnectorConfig]:
    """The settings model of a connector type: built-in first, then installed plugins."""
    if not isinstance(kind, str) or not kind:
        raise ConfigError(f"unknown connector type {kind!r} (known: {', '.join(_TYPES)})")
    if kind in _TYPES:
        return _TYPES[kind]
    # Here, not at the top: importlib.metadata is only needed for a type not built in.
    from edgeos.connectors.plugins import load_plugin

    return load_plugin(kind).config_model


def takes_effects(config: ConnectorConfig) -> bool:
    """Whether the binding has operations (a ``files`` or plugin binding may only emit
    events)."""
    if isinstance(config, FilesSourceConfig | PluginBinding):
        return bool(config.operations)
    return True


def build(config: ConnectorConfig, secrets: SecretLookup | None = None) -> Connector:
    """The connector for one binding. Connecting is lazy: nothing is opened here.

    ``secrets(name, scope)`` is the node's vault; the connector gets only the part of it
    its binding's scopes are granted (:class:`BindingSecrets`), which fills
    ``${secret:NAME}`` in HTTP headers, PostgreSQL and MQTT URLs and the SMTP login when
    connecting (:mod:`edgeos.connectors.secret_refs`). Raises ConfigError for a ``files`` or
    plugin binding without operations: it is only a source of events.
    """
    scoped = (
        None if secrets is None else BindingSecrets(secrets, config.name, config.granted_scopes)
    )
    # Imported here so that reading a configuration does not import httpx, psycopg or paho.
    if isinstance(config, HttpConnectorConfig):
        from edgeos.connectors.http import HttpConnector

        return HttpConnector.from_config(config, secrets=scoped)
    if isinstance(config, SqlConnectorConfig):
        from edgeos.connectors.sql import SqlConnector

        return SqlConnector.from_config(config, scoped)
    if isinstance(config, MqttConnectorConfig):
        from edgeos.connectors.mqtt import MqttConnector

        return MqttConnector.from_config(config, scoped)
    if isinstance(config, SmtpConnectorConfig):
        from edgeos.connectors.smtp import SmtpConnector

        return SmtpConnector.from_config(config, scoped)
    if isinstance(config, PluginBinding) and takes_effects(config):
        from edgeos.connectors.plugins import build_plugin

        return build_plugin(config, scoped)
    if isinstance(config, FilesSourceConfig) and takes_effects(config):
        from edgeos.connectors.filedrop import FileDropConnector

        return FileDropConnector.from_config(config)
    raise ConfigError(
        f"binding '{config.name}' ({config.type}) is a source of events: it takes no effects"
    )


def build_all(
    configs: Mapping[str, ConnectorConfig], secrets: SecretLookup | None = None
) -> dict[str, Connector]:
    """A connector for every binding that takes effects, keyed by binding name.

    ``files`` bindings without operations are left out (they only emit events). An
    ``mqtt`` binding with only subscriptions still gets one, so that an effect sent to it
    fails with a clear "no such operation" instead of waiting for a connector that never
    comes.
    """
    return {
        name: build(config, secrets) for name, config in configs.items() if takes_effects(config)
    }


SecretLookup = Callable[[str, str], str]
"""``(secret name, scope) -> value``: the node's vault, narrowed for each binding by
:func:`build`."""


_P = TypeVar("_P", FileWatch, FileDrop)


def _resolve(config: ConnectorConfig, base_dir: Path | None) -> ConnectorConfig:
    """Make relative SQLite and watched paths absolute against the directory of
    connectors.yaml, not the node's working directory."""
    if isinstance(config, SqlConnectorConfig) and base_dir is not None:
        path = config.sqlite_path
        if path is not None and not path.is_absolute():
            absolute = (base_dir / path).absolute()
            return config.model_copy(update={"url": f"{SQLITE_PREFIX}{absolute}"})
    if isinstance(config, FilesSourceConfig) and base_dir is not None:
        watch = {event: _absolute(w, base_dir) for event, w in config.watch.items()}
        operations = {op: _absolute(d, base_dir) for op, d in config.operations.items()}
        return config.model_copy(update={"watch": watch, "operations": operations})
    return config


def _absolute(place: _P, base_dir: Path) -> _P:
    if Path(place.path).is_absolute():
        return place
    return place.model_copy(update={"path": str((base_dir / place.path).absolute())})


def _describe(binding: str, err: Any) -> str:
    # A model-level check (mqtt: operations or subscribe) is reported on the binding.
    field = ".".join([binding, *(str(part) for part in err["loc"])])
    if err["type"] == "extra_forbidden":
        return f"field '{field}': unknown field"
    if err["type"] == "missing":
        return f"field '{field}': required"
    message = str(err["msg"]).removeprefix("Value error, ")
    return f"field '{field}': {message}"
