"""Sources: the sense side of connectors, which turn things that happen into events.

A source (an MQTT subscription, a watched folder or CSV file, a plugin's source) calls an
injected ``emit(event_name, data)`` for each thing that happened; the node passes
``Executor.emit``, which starts every agent with an ``event:`` trigger of that name. The
sink is injected so that connectors never import agents (imports point down only).

A source emits at least once: it records what it has emitted (an MQTT acknowledgement,
a file offset) only after ``emit`` returned, so a crash in between emits that thing
again on the next start, and a failing ``emit`` is retried, never skipped. The one
exception is an event the contract of its capability refuses (``Executor.emit`` checks
``<capability>.<event>`` events against their schema): it is logged and skipped, since it
would be refused again every time.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from edgeos.connectors.config import (
    ConnectorConfig,
    FilesSourceConfig,
    MqttConnectorConfig,
    PluginBinding,
    SecretLookup,
)
from edgeos.connectors.contracts import ContractError
from edgeos.connectors.vault import BindingSecrets

log = logging.getLogger("edgeos.connectors")

#: ``emit(event_name, data)``: start whatever waits for the event; returns when that is
#: durable (``Executor.emit`` returns the ids of the runs it started).
EventSink = Callable[[str, Any], Awaitable[object]]


@runtime_checkable
class Source(Protocol):
    """Something that emits events of one binding in ``connectors.yaml``."""

    #: The binding's name.
    name: str

    async def start(self, emit: EventSink) -> None:
        """Begin watching in the background and call ``emit`` for each event.

        Returns promptly: a target that is not there yet (a broker down, a folder not
        mounted) is retried in the background and logged, not raised.
        """
        ...

    async def stop(self) -> None:
        """Stop watching and release what was opened. Safe to call twice."""
        ...


def sources_of(
    configs: Mapping[str, ConnectorConfig],
    *,
    state_dir: Path,
    secrets: SecretLookup | None = None,
) -> list[Source]:
    """A source for every binding that has events: ``files`` bindings with ``watch``, and
    ``mqtt`` and plugin bindings with ``subscribe``. ``state_dir`` keeps what sources have
    emitted. ``secrets(name, scope)`` is the node's vault; like a connector, a source sees
    only the secrets its binding's scopes are granted (:class:`BindingSecrets`).
    ConfigError when a plugin cannot build the source of its binding."""

    def scoped(config: ConnectorConfig) -> BindingSecrets | None:
        if secrets is None:
            return None
        return BindingSecrets(secrets, config.name, config.granted_scopes)

    sources: list[Source] = []
    for config in configs.values():
        if isinstance(config, FilesSourceConfig) and config.watch:
            from edgeos.connectors.files import FileSource

            sources.append(FileSource.from_config(config, state_dir=state_dir))
        elif isinstance(config, MqttConnectorConfig) and config.subscribe:
            from edgeos.connectors.mqtt import MqttSource

            sources.append(MqttSource.from_config(config, scoped(config)))
        elif isinstance(config, PluginBinding) and config.subscribe:
            from edgeos.connectors.plugins import build_plugin_source

            sources.append(build_plugin_source(config, scoped(config), state_dir=state_dir))
    return sources


async def start_sources(
    configs: Mapping[str, ConnectorConfig],
    emit: EventSink,
    *,
    state_dir: Path,
    secrets: SecretLookup | None = None,
) -> list[Source]:
    """Build and start every source of ``configs``; returns them for :func:`stop_sources`."""
    started: list[Source] = []
    try:
        for source in sources_of(configs, state_dir=state_dir, secrets=secrets):
            await source.start(_refusing(source.name, emit))
            started.append(source)
    except BaseException:
        await stop_sources(started)
        raise
    if started:
        log.info("event sources started: %s", ", ".join(s.name for s in started))
    return started


def _refusing(source: str, emit: EventSink) -> EventSink:
    """``emit``, for which an event that breaks its contract is done with: it is logged
    (naming the contract, event and field) and counts as emitted, since sending it again
    would break the contract again and hold up the events behind it."""

    async def checked(event: str, data: Any) -> object:
        try:
            return await emit(event, data)
        except ContractError as exc:
            log.error("event source '%s': %s refused: %s", source, event, exc)
            return []

    return checked


async def stop_sources(sources: list[Source]) -> None:
    """Stop sources in reverse order; one failing to stop does not keep the others up."""
    for source in reversed(sources):
        try:
            await source.stop()
        except Exception:
            log.exception("stopping event source '%s' failed", source.name)
