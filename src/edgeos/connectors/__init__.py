"""Connectors: how effects decided by agents reach the outside world, exactly once in effect.

``ctx.effect("supplier.reorder", payload)`` writes an outbox row; the
:class:`DeliveryWorker` delivers it through the connector bound as ``supplier`` in
``<data_dir>/connectors.yaml`` (HTTP, SQL, MQTT, SMTP, files, or a plugin installed as
a Python package), passing the row's idempotency key on so the receiver applies it once
however often it is delivered. A binding that implements a contract is held to it at
every delivery (:mod:`edgeos.connectors.boundary`), and every connector can be checked
against its contract with :mod:`edgeos.connectors.conformance`. Sources (MQTT
subscriptions, watched folders and CSV files) go the other way: they emit events that
start agents (:mod:`edgeos.connectors.events`).

May import ``edgeos.state``, ``edgeos.telemetry``, ``edgeos.manifests``, ``edgeos.errors``
and ``edgeos.retry`` only.

The names below are imported on first use (PEP 562): the configuration models need
pydantic, and a node without ``connectors.yaml`` must not pay for it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from edgeos.lazy import lazy_exports

if TYPE_CHECKING:
    from edgeos.connectors.base import Connector, DeliveryError, UnknownOperation
    from edgeos.connectors.boundary import ContractViolation, deliver_checked
    from edgeos.connectors.config import (
        ConnectorConfig,
        FileDrop,
        FilesSourceConfig,
        FileWatch,
        HttpConnectorConfig,
        HttpOperation,
        MqttConnectorConfig,
        MqttOperation,
        MqttSubscription,
        PluginBinding,
        SmtpConnectorConfig,
        SmtpOperation,
        SqlConnectorConfig,
        SqlOperation,
        build,
        build_all,
        load_connectors,
        parse_connectors,
    )
    from edgeos.connectors.delivery import DeliveryWorker
    from edgeos.connectors.events import EventSink, Source, start_sources, stop_sources

_HOME = {
    "Connector": "base",
    "DeliveryError": "base",
    "UnknownOperation": "base",
    "ContractViolation": "boundary",
    "deliver_checked": "boundary",
    "FileDrop": "config",
    "PluginBinding": "config",
    "ConnectorConfig": "config",
    "HttpConnectorConfig": "config",
    "HttpOperation": "config",
    "SqlConnectorConfig": "config",
    "SqlOperation": "config",
    "build": "config",
    "build_all": "config",
    "load_connectors": "config",
    "parse_connectors": "config",
    "DeliveryWorker": "delivery",
    "FilesSourceConfig": "config",
    "FileWatch": "config",
    "MqttConnectorConfig": "config",
    "MqttOperation": "config",
    "MqttSubscription": "config",
    "SmtpConnectorConfig": "config",
    "SmtpOperation": "config",
    "EventSink": "events",
    "Source": "events",
    "start_sources": "events",
    "stop_sources": "events",
}

__all__ = [
    "Connector",
    "ConnectorConfig",
    "ContractViolation",
    "DeliveryError",
    "DeliveryWorker",
    "EventSink",
    "FileDrop",
    "FileWatch",
    "FilesSourceConfig",
    "HttpConnectorConfig",
    "HttpOperation",
    "MqttConnectorConfig",
    "MqttOperation",
    "MqttSubscription",
    "PluginBinding",
    "SmtpConnectorConfig",
    "SmtpOperation",
    "Source",
    "SqlConnectorConfig",
    "SqlOperation",
    "UnknownOperation",
    "build",
    "build_all",
    "deliver_checked",
    "load_connectors",
    "parse_connectors",
    "start_sources",
    "stop_sources",
]


__getattr__, __dir__ = lazy_exports(__name__, _HOME, globals())
