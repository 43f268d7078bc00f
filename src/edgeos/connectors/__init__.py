"""Connectors: how effects decided by agents reach the outside world, exactly once in effect.

``ctx.effect("supplier.reorder", payload)`` writes an outbox row; the
:class:`DeliveryWorker` delivers it through the connector bound as ``supplier`` in
``<data_dir>/connectors.yaml`` (HTTP or SQL), passing the row's idempotency key on so the
receiver applies it once however often it is delivered.

May import ``edgeos.state``, ``edgeos.telemetry``, ``edgeos.manifests``, ``edgeos.errors``
and ``edgeos.retry`` only.
"""

from edgeos.connectors.base import Connector, DeliveryError, UnknownOperation
from edgeos.connectors.config import (
    ConnectorConfig,
    HttpConnectorConfig,
    HttpOperation,
    SqlConnectorConfig,
    SqlOperation,
    build,
    build_all,
    load_connectors,
    parse_connectors,
)
from edgeos.connectors.delivery import DeliveryWorker

__all__ = [
    "Connector",
    "ConnectorConfig",
    "DeliveryError",
    "DeliveryWorker",
    "HttpConnectorConfig",
    "HttpOperation",
    "SqlConnectorConfig",
    "SqlOperation",
    "UnknownOperation",
    "build",
    "build_all",
    "load_connectors",
    "parse_connectors",
]
